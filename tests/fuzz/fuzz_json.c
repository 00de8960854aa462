/*
 * The quick JSON reader of request bodies against jansson as the daemon
 * calls it (JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL): whatever the quick
 * reader accepts, jansson accepts with the same values (json_equal);
 * everything else gets jansson's verdict, so the pair, as api_input_open
 * uses it, accepts exactly what jansson accepts. Both forms of the quick
 * reader: api_flat_json_read, and api_flat_json_read_inplace as the daemon
 * calls it (the "mime" string decoded inside the body), which must accept
 * the same, leave the body as it was when it declines, and return a
 * "mime" that, put back into its object, makes jansson's.
 */
#include <stdint.h>

#include <jansson.h>

#include "api/internal.h"
#include "fuzz.h"

/* Only a flat object: what the quick reader may return. */
static int is_flat_object(json_t *v)
{
    const char *name;
    json_t *item;

    if (!json_is_object(v))
        return 0;
    json_object_foreach (v, name, item) {
        if (!json_is_string(item) && !json_is_boolean(item) &&
            !json_is_null(item))
            return 0;
    }
    return 1;
}

static void check_against(json_t *quick, json_t *ref, const char *jerr,
                          const char *which)
{
    FUZZ_CHECK(ref != NULL, "%s accepts, jansson says: %s", which, jerr);
    FUZZ_CHECK(is_flat_object(quick), "%s made no flat object", which);
    FUZZ_CHECK(json_equal(quick, ref), "%s and jansson disagree on values",
               which);
    FUZZ_CHECK(json_object_size(quick) == json_object_size(ref),
               "%s has %zu members, jansson %zu", which,
               json_object_size(quick), json_object_size(ref));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *body = malloc(size ? size : 1);
    const unsigned char *mime = NULL;
    size_t mime_len = 0;
    json_error_t jerr;
    json_t *quick, *inplace, *ref;

    if (body == NULL)
        fuzz_die("out of memory");
    memcpy(body, data, size);
    quick = api_flat_json_read(data, size);
    ref = json_loadb((const char *)data, size,
                     JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (quick != NULL)
        check_against(quick, ref, jerr.text, "api_flat_json_read");

    inplace = api_flat_json_read_inplace(body, size, "mime", &mime, &mime_len);
    FUZZ_CHECK((inplace != NULL) == (quick != NULL),
               "api_flat_json_read %s, api_flat_json_read_inplace %s",
               quick != NULL ? "accepts" : "declines",
               inplace != NULL ? "accepts" : "declines");
    if (inplace == NULL) {
        FUZZ_CHECK(size == 0 || memcmp(body, data, size) == 0,
                   "api_flat_json_read_inplace declined and changed the body");
    } else if (mime != NULL) {
        FUZZ_CHECK(mime >= body && mime_len <= size &&
                       (size_t)(mime - body) <= size - mime_len,
                   "\"mime\" points outside the body");
        FUZZ_CHECK(json_object_get(inplace, "mime") == NULL,
                   "\"mime\" both decoded in place and in the object");
        if (json_object_set_new(
                inplace, "mime",
                json_stringn_nocheck((const char *)mime, mime_len)) != 0)
            fuzz_die("out of memory");
    }
    if (inplace != NULL)
        check_against(inplace, ref, jerr.text, "api_flat_json_read_inplace");
    json_decref(quick);
    json_decref(inplace);
    json_decref(ref);
    free(body);
    return 0;
}
