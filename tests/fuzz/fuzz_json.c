/*
 * The quick JSON reader of request bodies (api_flat_json_read) against
 * jansson as the daemon calls it (JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL):
 * whatever the quick reader accepts, jansson accepts with the same values
 * (json_equal); everything else gets jansson's verdict, so the pair, as
 * api_input_open uses it, accepts exactly what jansson accepts.
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t jerr;
    json_t *quick, *ref;

    quick = api_flat_json_read(data, size);
    ref = json_loadb((const char *)data, size,
                     JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (quick != NULL) {
        FUZZ_CHECK(ref != NULL, "quick reader accepts, jansson says: %s",
                   jerr.text);
        FUZZ_CHECK(is_flat_object(quick), "quick reader made no flat object");
        FUZZ_CHECK(json_equal(quick, ref), "the two readers disagree on values");
        FUZZ_CHECK(json_object_size(quick) == json_object_size(ref),
                   "%zu members against jansson's %zu",
                   json_object_size(quick), json_object_size(ref));
    }
    json_decref(quick);
    json_decref(ref);
    return 0;
}
