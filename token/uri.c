/*
 * RFC 7512 PKCS#11 URIs, parsed strictly: the URI chooses which token and
 * which key sign mail, so anything this parser does not understand is an
 * error rather than something to skip. Skipping an attribute would widen
 * the selection ("tokn=prod" would match every token).
 *
 * Accepted path attributes: token, manufacturer, serial, model, slot-id
 * (decimal), object, id (any bytes), and type=private (accepted and
 * ignored, since only private keys are ever selected; any other type is an
 * error). Refused: library-manufacturer, library-description,
 * library-version, slot-manufacturer, slot-description. The module is
 * chosen by its path in the configuration, so library-* could only repeat
 * or contradict it, and nothing here matches on them; refusing them keeps a
 * URI from looking narrower than it is.
 *
 * Accepted query attribute: pin-source, tolerated so that URIs copied from
 * tools that append it still parse, and ignored because the PIN comes from
 * the token's pin_file or pin_env. pin-value is refused (a PIN written into
 * a configuration URI is a leaked PIN), as are module-name, module-path and
 * any other query attribute.
 *
 * Structure is checked strictly (scheme, "name=value" pairs, no empty
 * value, no duplicate, no fragment, well-formed %XX escapes, no NUL in a
 * text attribute, no control characters). Literal characters the RFC would
 * want percent-encoded, such as a space or UTF-8, are accepted: these URIs
 * are written by hand into configuration files and the meaning is not in
 * doubt.
 *
 * Error messages name the attribute but never repeat a value.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "token/internal.h"

enum {
    SEEN_TOKEN = 1 << 0,
    SEEN_MANUFACTURER = 1 << 1,
    SEEN_SERIAL = 1 << 2,
    SEEN_MODEL = 1 << 3,
    SEEN_OBJECT = 1 << 4,
    SEEN_ID = 1 << 5,
    SEEN_SLOT_ID = 1 << 6,
    SEEN_TYPE = 1 << 7,
    SEEN_PIN_SOURCE = 1 << 8,
};

/* Attribute names are echoed in messages; cap them so a garbage URI cannot
 * push the rest of the message out of token_error.message. */
#define NAME_FMT "\"%.*s\""
#define NAME_ARG(name, len) (int)((len) > 40 ? 40 : (len)), (name)

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes value[0..len) into a new buffer, NUL-terminated so text
 * attributes can be used as C strings; *out_len excludes the terminator. */
static int decode(const char *name, size_t name_len, const char *value,
                  size_t len, unsigned char **out, size_t *out_len,
                  token_error *err)
{
    unsigned char *buf = NULL;
    size_t i, n = 0;
    int r = -1;

    if (len == 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute " NAME_FMT " has an empty value",
                 NAME_ARG(name, name_len));
        goto out;
    }
    buf = malloc(len + 1);
    if (buf == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)value[i];

        if (c == '%') {
            int h = i + 2 < len ? hex_value(value[i + 1]) : -1;
            int l = h >= 0 ? hex_value(value[i + 2]) : -1;

            if (h < 0 || l < 0) {
                tk_error(err, TOKEN_ERR_CONFIG,
                         "PKCS#11 URI attribute " NAME_FMT
                         " has a malformed percent-escape",
                         NAME_ARG(name, name_len));
                goto out;
            }
            buf[n++] = (unsigned char)(h << 4 | l);
            i += 2;
        } else if (c < 0x20 || c == 0x7f) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 URI attribute " NAME_FMT
                     " contains a control character",
                     NAME_ARG(name, name_len));
            goto out;
        } else {
            buf[n++] = c;
        }
    }
    buf[n] = '\0';
    *out = buf;
    *out_len = n;
    buf = NULL;
    r = 0;
out:
    free(buf);
    return r;
}

/* A text attribute: decoded, and refused when it holds a NUL byte, which
 * no C string comparison could honour. */
static int decode_text(const char *name, size_t name_len, const char *value,
                       size_t len, char **out, token_error *err)
{
    unsigned char *buf = NULL;
    size_t n;

    if (decode(name, name_len, value, len, &buf, &n, err) < 0)
        return -1;
    if (strlen((char *)buf) != n) {
        free(buf);
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute " NAME_FMT " contains a NUL byte",
                 NAME_ARG(name, name_len));
        return -1;
    }
    *out = (char *)buf;
    return 0;
}

static int parse_slot_id(const char *name, size_t name_len, const char *value,
                         size_t len, unsigned long *out, token_error *err)
{
    unsigned long v = 0;
    size_t i;

    for (i = 0; i < len; i++) {
        unsigned long d = (unsigned long)(value[i] - '0');

        if (value[i] < '0' || value[i] > '9' || v > (~0UL - d) / 10) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 URI attribute " NAME_FMT
                     " is not a decimal slot number",
                     NAME_ARG(name, name_len));
            return -1;
        }
        v = v * 10 + d;
    }
    if (len == 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute " NAME_FMT " has an empty value",
                 NAME_ARG(name, name_len));
        return -1;
    }
    *out = v;
    return 0;
}

static int name_is(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && memcmp(name, want, len) == 0;
}

enum attr_kind { ATTR_TEXT, ATTR_ID, ATTR_SLOT_ID, ATTR_TYPE };

static const struct {
    const char *name;
    unsigned bit;
    enum attr_kind kind;
    size_t offset; /* of the char * field, for ATTR_TEXT */
} path_attrs[] = {
    {"token", SEEN_TOKEN, ATTR_TEXT, offsetof(token_uri, token)},
    {"manufacturer", SEEN_MANUFACTURER, ATTR_TEXT,
     offsetof(token_uri, manufacturer)},
    {"serial", SEEN_SERIAL, ATTR_TEXT, offsetof(token_uri, serial)},
    {"model", SEEN_MODEL, ATTR_TEXT, offsetof(token_uri, model)},
    {"object", SEEN_OBJECT, ATTR_TEXT, offsetof(token_uri, object)},
    {"id", SEEN_ID, ATTR_ID, 0},
    {"slot-id", SEEN_SLOT_ID, ATTR_SLOT_ID, 0},
    {"type", SEEN_TYPE, ATTR_TYPE, 0},
};

static int check_type(const char *name, size_t name_len, const char *value,
                      size_t len, token_error *err)
{
    char *type = NULL;
    int ok;

    if (decode_text(name, name_len, value, len, &type, err) < 0)
        return -1;
    ok = strcmp(type, "private") == 0;
    free(type);
    if (!ok) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute \"type\": only private keys are "
                 "selected (type=private)");
        return -1;
    }
    return 0;
}

static int path_attribute(token_uri *u, unsigned *seen, const char *name,
                          size_t name_len, const char *value, size_t len,
                          token_error *err)
{
    size_t i, n = sizeof(path_attrs) / sizeof(path_attrs[0]);

    for (i = 0; i < n && !name_is(name, name_len, path_attrs[i].name); i++)
        ;
    if (i == n) {
        if (name_len > 8 && memcmp(name, "library-", 8) == 0)
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 URI attribute " NAME_FMT
                     " is not supported: the module is chosen by its path",
                     NAME_ARG(name, name_len));
        else
            tk_error(err, TOKEN_ERR_CONFIG,
                     "unknown PKCS#11 URI attribute " NAME_FMT,
                     NAME_ARG(name, name_len));
        return -1;
    }
    if (*seen & path_attrs[i].bit) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute " NAME_FMT " appears twice",
                 NAME_ARG(name, name_len));
        return -1;
    }
    *seen |= path_attrs[i].bit;

    switch (path_attrs[i].kind) {
    case ATTR_ID:
        return decode(name, name_len, value, len, &u->id, &u->id_len, err);
    case ATTR_SLOT_ID:
        if (parse_slot_id(name, name_len, value, len, &u->slot_id, err) < 0)
            return -1;
        u->has_slot_id = 1;
        return 0;
    case ATTR_TYPE:
        return check_type(name, name_len, value, len, err);
    case ATTR_TEXT:
        break;
    }
    return decode_text(name, name_len, value, len,
                       (char **)((char *)u + path_attrs[i].offset), err);
}

static int query_attribute(unsigned *seen, const char *name, size_t name_len,
                           const char *value, size_t len, token_error *err)
{
    char *ignored = NULL;

    if (name_is(name, name_len, "pin-value")) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute \"pin-value\" is refused: "
                 "give the PIN through pin_file or pin_env");
        return -1;
    }
    if (!name_is(name, name_len, "pin-source")) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "unsupported PKCS#11 URI query attribute " NAME_FMT,
                 NAME_ARG(name, name_len));
        return -1;
    }
    if (*seen & SEEN_PIN_SOURCE) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI attribute \"pin-source\" appears twice");
        return -1;
    }
    *seen |= SEEN_PIN_SOURCE;
    /* Decoded only to hold it to the same syntax as everything else. */
    if (decode_text(name, name_len, value, len, &ignored, err) < 0)
        return -1;
    free(ignored);
    return 0;
}

/* Splits [p, end) at sep and hands each "name=value" to the path or query
 * handler. */
static int parse_part(token_uri *u, unsigned *seen, const char *p,
                      const char *end, char sep, int query, token_error *err)
{
    if (p == end)
        return 0;
    for (;;) {
        const char *next = memchr(p, sep, (size_t)(end - p));
        const char *eq;
        int r;

        if (next == NULL)
            next = end;
        if (next == p) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 URI has an empty attribute (stray '%c')", sep);
            return -1;
        }
        eq = memchr(p, '=', (size_t)(next - p));
        if (eq == NULL) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 URI attribute " NAME_FMT " has no '='",
                     NAME_ARG(p, (size_t)(next - p)));
            return -1;
        }
        if (query)
            r = query_attribute(seen, p, (size_t)(eq - p), eq + 1,
                                (size_t)(next - eq - 1), err);
        else
            r = path_attribute(u, seen, p, (size_t)(eq - p), eq + 1,
                               (size_t)(next - eq - 1), err);
        if (r < 0 || next == end)
            return r;
        p = next + 1;
    }
}

int token_uri_parse(const char *text, token_uri *uri, token_error *err)
{
    static const char scheme[] = "pkcs11:";
    token_uri u = {0};
    unsigned seen = 0;
    const char *path, *query, *end;
    int r = -1;

    if (text == NULL || text[0] == '\0') {
        tk_error(err, TOKEN_ERR_CONFIG, "empty PKCS#11 URI");
        goto out;
    }
    if (strncasecmp(text, scheme, sizeof(scheme) - 1) != 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI must start with \"pkcs11:\"");
        goto out;
    }
    path = text + sizeof(scheme) - 1;
    end = path + strlen(path);
    if (memchr(path, '#', (size_t)(end - path)) != NULL) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI must not have a fragment ('#')");
        goto out;
    }
    query = memchr(path, '?', (size_t)(end - path));
    if (parse_part(&u, &seen, path, query != NULL ? query : end, ';', 0, err) <
        0)
        goto out;
    if (query != NULL && parse_part(&u, &seen, query + 1, end, '&', 1, err) < 0)
        goto out;
    if ((seen & ~(unsigned)(SEEN_TYPE | SEEN_PIN_SOURCE)) == 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 URI selects nothing: give token=, serial=, "
                 "object= or another attribute");
        goto out;
    }
    *uri = u;
    memset(&u, 0, sizeof(u));
    r = 0;
out:
    token_uri_clear(&u);
    return r;
}

void token_uri_clear(token_uri *uri)
{
    if (uri == NULL)
        return;
    free(uri->token);
    free(uri->manufacturer);
    free(uri->serial);
    free(uri->model);
    free(uri->object);
    free(uri->id);
    memset(uri, 0, sizeof(*uri));
}
