/*
 * token_uri_parse (RFC 7512 PKCS#11 URIs from the configuration). Beyond
 * not crashing: a refused URI leaves the result untouched and says why in
 * a configuration error; an accepted one has text attributes without NUL,
 * selects something, and written out again with every octet
 * percent-encoded parses to the same attributes.
 */
#include <stdint.h>

#include "token/token.h"
#include "fuzz.h"

static void put_attr(char **p, const char *name, const unsigned char *v,
                     size_t n, int *first)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t i;

    if (v == NULL)
        return;
    *p += sprintf(*p, "%s%s=", *first ? "" : ";", name);
    for (i = 0; i < n; i++) {
        *(*p)++ = '%';
        *(*p)++ = hex[v[i] >> 4];
        *(*p)++ = hex[v[i] & 15];
    }
    **p = '\0';
    *first = 0;
}

static void put_text(char **p, const char *name, const char *v, int *first)
{
    put_attr(p, name, (const unsigned char *)v, v != NULL ? strlen(v) : 0,
             first);
}

static int same_text(const char *a, const char *b)
{
    return (a == NULL && b == NULL) ||
           (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static void check_text(const char *what, const char *v, size_t input_len)
{
    if (v != NULL)
        FUZZ_CHECK(v[0] != '\0' && strlen(v) <= input_len,
                   "%s is empty or longer than the URI", what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const token_uri zero;
    token_uri uri = {0}, again = {0};
    token_error err = {0};
    char *text = malloc(size + 1), *out, *p;
    int first = 1;

    if (text == NULL)
        fuzz_die("out of memory");
    memcpy(text, data, size);
    text[size] = '\0';
    if (token_uri_parse(text, &uri, &err) != 0) {
        FUZZ_CHECK(memcmp(&uri, &zero, sizeof(uri)) == 0,
                   "a refused URI filled the result");
        FUZZ_CHECK(err.status == TOKEN_ERR_CONFIG && err.message[0] != '\0',
                   "refused with status %d", err.status);
        free(text);
        return 0;
    }
    FUZZ_CHECK(uri.token || uri.manufacturer || uri.serial || uri.model ||
                   uri.object || uri.id || uri.has_slot_id,
               "accepted a URI that selects nothing");
    check_text("token", uri.token, size);
    check_text("manufacturer", uri.manufacturer, size);
    check_text("serial", uri.serial, size);
    check_text("model", uri.model, size);
    check_text("object", uri.object, size);
    FUZZ_CHECK(uri.id == NULL || (uri.id_len > 0 && uri.id_len <= size),
               "id of %zu octets", uri.id_len);

    /* every attribute came from at least its name, '=' and one octet of
     * the input, and grows at most threefold */
    out = malloc(64 + 4 * size);
    if (out == NULL)
        fuzz_die("out of memory");
    p = out + sprintf(out, "pkcs11:");
    put_text(&p, "token", uri.token, &first);
    put_text(&p, "manufacturer", uri.manufacturer, &first);
    put_text(&p, "serial", uri.serial, &first);
    put_text(&p, "model", uri.model, &first);
    put_text(&p, "object", uri.object, &first);
    put_attr(&p, "id", uri.id, uri.id_len, &first);
    if (uri.has_slot_id)
        sprintf(p, "%sslot-id=%lu", first ? "" : ";", uri.slot_id);
    FUZZ_CHECK(token_uri_parse(out, &again, &err) == 0,
               "its own rewrite \"%s\" is refused: %s", out, err.message);
    FUZZ_CHECK(
        same_text(uri.token, again.token) &&
            same_text(uri.manufacturer, again.manufacturer) &&
            same_text(uri.serial, again.serial) &&
            same_text(uri.model, again.model) &&
            same_text(uri.object, again.object) && uri.id_len == again.id_len &&
            (uri.id == NULL) == (again.id == NULL) &&
            (uri.id == NULL || memcmp(uri.id, again.id, uri.id_len) == 0) &&
            uri.has_slot_id == again.has_slot_id &&
            uri.slot_id == again.slot_id,
        "the rewrite \"%s\" parses to other attributes", out);
    token_uri_clear(&again);
    token_uri_clear(&uri);
    free(out);
    free(text);
    return 0;
}
