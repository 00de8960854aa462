/*
 * The v1 routes and what every endpoint shares: error bodies, responses in
 * JSON or raw (message/rfc822) form, and request input. Checks run in the
 * contract's order, first failure wins: route and method, then media type
 * (service/ checks the size), then request syntax, then the key, then the
 * content, then the token.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <openssl/err.h>

#include "api/internal.h"

typedef int (*api_handler)(api *a, const api_request *req, api_response *res,
                           api_error *err);

struct api_route {
    const char *path;
    const char *method;
    api_handler handler;
    int raw_ok; /* accepts message/rfc822 bodies */
};

static const api_route routes[] = {
    {"/v1/sign", "POST", api_handle_sign, 1},
    {"/v1/encrypt", "POST", api_handle_encrypt, 1},
    {"/v1/decrypt", "POST", api_handle_decrypt, 1},
    {"/v1/verify", "POST", api_handle_verify, 1},
    {"/v1/keys", "GET", api_handle_keys, 0},
    {"/healthz", "GET", api_handle_healthz, 0},
    {"/readyz", "GET", api_handle_readyz, 0},
};

#define NROUTES (sizeof(routes) / sizeof(routes[0]))

int api_fail(api_error *err, int status, const char *code, const char *fmt, ...)
{
    va_list ap;

    err->status = status;
    err->code = code;
    err->allow = NULL;
    err->authenticate = 0;
    err->retry_after = 0;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    /* messages quote requests and certificates, and may be cut mid
     * character: the JSON error body must still be built */
    api_utf8_sanitize(err->message);
    return -1;
}

int api_fail_rkey(api_error *err, const rkey_error *e)
{
    switch (e->status) {
    case RKEY_BUSY:
        api_fail(err, 503, "token_busy", "%s", e->message);
        err->retry_after = e->retry_after > 0 ? (int)e->retry_after : 1;
        return -1;
    case RKEY_NOT_FOUND:
        return api_fail(err, 404, "unknown_key", "%s", e->message);
    case RKEY_UNSUPPORTED:
        return api_fail(err, 422, "operation_unsupported", "%s", e->message);
    case RKEY_AUDIT_FAILED:
        return api_fail(err, 500, "audit_failed",
                        "the audit record could not be written; the result "
                        "is withheld");
    case RKEY_BAD_REQUEST:
    case RKEY_INTERNAL:
        return api_fail(err, 500, "internal_error", "%s", e->message);
    default:
        api_fail(err, 503, "token_unavailable", "%s", e->message);
        err->retry_after = e->retry_after > 0 ? (int)e->retry_after : 5;
        return -1;
    }
}

int api_fail_cms(api_error *err, const cms_error *cerr)
{
    switch (cerr->status) {
    case CMS_ERR_INPUT:
        /* malformed MIME is as much the request's syntax as bad JSON;
         * undecodable CMS stays 422 invalid_smime, as the contract says */
        return api_fail(err, 400, "invalid_mime", "%s", cerr->message);
    case CMS_ERR_DECRYPT:
        return api_fail(err, 422, "decryption_failed", "%s", cerr->message);
    case CMS_ERR_RECIPIENT:
        return api_fail(err, 422, "unfit_recipient", "%s", cerr->message);
    case CMS_ERR_ALGORITHM:
        return api_fail(err, 422, "unsupported_algorithm", "%s", cerr->message);
    case CMS_ERR_KEY:
        api_fail(err, 503, "token_unavailable",
                 "private-key operation "
                 "failed: %s",
                 cerr->message);
        err->retry_after = 5;
        return -1;
    default:
        return api_fail(err, 500, "internal_error", "%s", cerr->message);
    }
}

const api_route *api_route_find(const char *method, const char *path,
                                api_error *err)
{
    size_t i;

    for (i = 0; i < NROUTES; i++) {
        if (strcmp(routes[i].path, path) != 0)
            continue;
        /* HEAD is GET without a body; libmicrohttpd drops the body */
        if (strcmp(routes[i].method, method) == 0 ||
            (strcmp(method, "HEAD") == 0 &&
             strcmp(routes[i].method, "GET") == 0))
            return &routes[i];
        api_fail(err, 405, "method_not_allowed", "%s is not allowed on %s",
                 method, path);
        err->allow = routes[i].method;
        return NULL;
    }
    api_fail(err, 404, "not_found", "no such endpoint: %s", path);
    return NULL;
}

int api_route_has_body(const api_route *route)
{
    return strcmp(route->method, "POST") == 0;
}

const char *api_route_path(const api_route *route)
{
    return route->path;
}

/* Compares the media type of a Content-Type value, ignoring parameters
 * (charset) and case. */
static int media_is(const char *content_type, const char *type)
{
    size_t n = strlen(type);

    while (*content_type == ' ' || *content_type == '\t')
        content_type++;
    if (strncasecmp(content_type, type, n) != 0)
        return 0;
    content_type += n;
    while (*content_type == ' ' || *content_type == '\t')
        content_type++;
    return *content_type == '\0' || *content_type == ';';
}

int api_route_check_media(const api_route *route, const char *content_type,
                          api_body_kind *kind, api_error *err)
{
    if (!api_route_has_body(route)) {
        *kind = API_BODY_NONE;
        return 0;
    }
    if (content_type != NULL && media_is(content_type, "application/json")) {
        *kind = API_BODY_JSON;
        return 0;
    }
    if (content_type != NULL && route->raw_ok &&
        media_is(content_type, "message/rfc822")) {
        *kind = API_BODY_RAW;
        return 0;
    }
    return api_fail(err, 415, "unsupported_media_type",
                    "Content-Type must be application/json%s (got %s)",
                    route->raw_ok ? " or message/rfc822" : "",
                    content_type != NULL ? content_type : "none");
}

api *api_new(rkey_client *keys, STACK_OF(X509) *trust, const char *trust_dir,
             STACK_OF(X509_CRL) *crls)
{
    api *a = calloc(1, sizeof(*a));

    if (a == NULL)
        return NULL;
    a->keys = keys;
    a->trust = trust;
    a->trust_dir = trust_dir;
    a->crls = crls;
    return a;
}

void api_free(api *a)
{
    free(a);
}

void api_response_clear(api_response *res)
{
    size_t i;

    free(res->body);
    for (i = 0; i < res->nheaders; i++)
        free(res->headers[i].value);
    memset(res, 0, sizeof(*res));
}

static int response_add_header(api_response *res, const char *name,
                               const char *value)
{
    char *copy;

    if (res->nheaders == API_MAX_HEADERS)
        return -1;
    copy = strdup(value);
    if (copy == NULL)
        return -1;
    res->headers[res->nheaders].name = name;
    res->headers[res->nheaders].value = copy;
    res->nheaders++;
    return 0;
}

int api_respond_json(api_response *res, int status, json_t *body)
{
    char *text = NULL;

    if (body != NULL)
        text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (text == NULL)
        return -1;
    free(res->body);
    res->body = (unsigned char *)text;
    res->body_len = strlen(text);
    res->status = status;
    res->content_type = "application/json";
    return 0;
}

int api_response_set_error(api_response *res, const api_error *err)
{
    char num[16];
    api_response kept = *res;
    json_t *body;

    /* the key stays for the access log and, with the rest of the audit
     * fields, for the audit trail; headers of a half-built success go */
    api_response_clear(res);
    memcpy(res->key, kept.key, sizeof(res->key));
    res->operation = kept.operation;
    res->key_op = kept.key_op;
    memcpy(res->client, kept.client, sizeof(res->client));
    memcpy(res->content_sha256, kept.content_sha256,
           sizeof(res->content_sha256));
    body = json_pack("{s:{s:s,s:o}}", "error", "code", err->code, "message",
                     api_json_text(err->message, strlen(err->message)));
    if (api_respond_json(res, err->status, body) != 0)
        return -1;
    res->error = err->code;
    if (err->allow != NULL && response_add_header(res, "Allow", err->allow))
        return -1;
    if (err->authenticate &&
        response_add_header(res, "WWW-Authenticate", "Bearer") != 0)
        return -1;
    if (err->retry_after > 0) {
        snprintf(num, sizeof(num), "%d", err->retry_after);
        if (response_add_header(res, "Retry-After", num) != 0)
            return -1;
    }
    return 0;
}

/* Response fields that raw mode carries as headers. Header names must be
 * static for api_header. */
static const struct {
    const char *field, *header;
} raw_headers[] = {
    {"key", "X-Smimed-Key"},
    {"digest", "X-Smimed-Digest"},
    {"mode", "X-Smimed-Mode"},
    {"reencoded", "X-Smimed-Reencoded"},
    {"cipher", "X-Smimed-Cipher"},
    {"signed", "X-Smimed-Signed"},
    {"verification", "X-Smimed-Verification"},
};

/* Room for "N parts, first K:" ahead of a cut list. */
#define LIST_PREFIX_MAX 64

/* A list as one header value: its strings joined with ", " ("none" when
 * empty: an empty header value does not survive every client). A list
 * longer than API_HEADER_VALUE_MAX becomes "N parts, first K: " and the
 * first K strings that fit. */
static char *header_list(json_t *v)
{
    size_t i, n = json_array_size(v), len = 0, fit, used = 0, add, o;
    json_t *item;
    char *s;

    if (n == 0)
        return strdup("none");
    json_array_foreach (v, i, item)
        len += strlen(json_string_value(item)) + (i > 0 ? 2 : 0);
    fit = n;
    if (len > API_HEADER_VALUE_MAX) {
        for (fit = 0; fit < n; fit++) {
            add = strlen(json_string_value(json_array_get(v, fit))) +
                  (fit > 0 ? 2 : 0);
            if (LIST_PREFIX_MAX + used + add > API_HEADER_VALUE_MAX)
                break;
            used += add;
        }
        len = LIST_PREFIX_MAX + used;
    }
    s = malloc(len + 1);
    if (s == NULL)
        return NULL;
    o = 0;
    if (fit < n)
        o = (size_t)snprintf(s, LIST_PREFIX_MAX, "%zu parts, first %zu:%s", n,
                             fit, fit > 0 ? " " : "");
    for (i = 0; i < fit; i++) {
        const char *t = json_string_value(json_array_get(v, i));

        if (i > 0) {
            memcpy(s + o, ", ", 2);
            o += 2;
        }
        memcpy(s + o, t, strlen(t));
        o += strlen(t);
    }
    s[o] = '\0';
    return s;
}

/* One header value for a field: strings as they are, booleans as
 * true/false, lists as header_list writes them, a verification as "valid"
 * or its reason. NULL when out of memory. */
static char *header_value(json_t *v)
{
    if (json_is_string(v))
        return strdup(json_string_value(v));
    if (json_is_boolean(v))
        return strdup(json_is_true(v) ? "true" : "false");
    if (json_is_object(v))
        return strdup(json_is_true(json_object_get(v, "valid"))
                          ? "valid"
                          : json_string_value(json_object_get(v, "reason")));
    return header_list(v);
}

/* Takes ownership of body (malloc'd, NULL only when len is 0). */
static int respond_raw_owned(api_response *res, unsigned char *body, size_t len,
                             json_t *fields)
{
    size_t i;
    json_t *v;
    char *value;
    int r;

    free(res->body);
    res->body = body != NULL ? body : malloc(1);
    if (res->body == NULL)
        return -1;
    res->body_len = len;
    res->status = 200;
    res->content_type = "message/rfc822";
    for (i = 0; i < sizeof(raw_headers) / sizeof(raw_headers[0]); i++) {
        v = json_object_get(fields, raw_headers[i].field);
        if (v == NULL)
            continue;
        value = header_value(v);
        r = value != NULL
                ? response_add_header(res, raw_headers[i].header, value)
                : -1;
        free(value);
        if (r != 0)
            return -1;
    }
    return 0;
}

static int respond_raw(api_response *res, const unsigned char *data, size_t len,
                       json_t *fields)
{
    unsigned char *copy = malloc(len ? len : 1);

    if (copy == NULL)
        return -1;
    memcpy(copy, data, len);
    return respond_raw_owned(res, copy, len, fields);
}

int api_set_mime_field(json_t *obj, const unsigned char *data, size_t len)
{
    char *b64;
    int r;

    if (api_utf8_valid(data, len) && memchr(data, '\0', len) == NULL)
        return json_object_set_new(obj, "mime",
                                   json_stringn((const char *)data, len));
    b64 = api_base64_encode(data, len);
    if (b64 == NULL)
        return -1;
    r = json_object_set_new(obj, "mime_base64", json_string(b64));
    free(b64);
    return r;
}

/* Octets each input octet takes inside a JSON string, as jansson writes
 * it: two for the short escapes, six for \u00XX, one otherwise. */
static const unsigned char json_escaped_len[256] = {
    [0x00 ... 0x07] = 6, ['\b'] = 2, ['\t'] = 2,          ['\n'] = 2,
    [0x0b] = 6,          ['\f'] = 2, ['\r'] = 2,          [0x0e ... 0x1f] = 6,
    [0x20 ... 0x21] = 1, ['"'] = 2,  [0x23 ... 0x5b] = 1, ['\\'] = 2,
    [0x5d ... 0xff] = 1,
};

/* Escapes buf[0..len) in place into buf[at..at+n), n its escaped length
 * (buf has room for it): from the end backwards, so every octet is read
 * before an escape can cover it (at > 0, and escapes only lengthen). */
static void json_escape_in_place(unsigned char *buf, size_t len, size_t at,
                                 size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i = len, run, o = at + n;
    unsigned char c;

    while (i > 0) {
        for (run = i; run > 0 && json_escaped_len[buf[run - 1]] == 1; run--)
            ;
        o -= i - run;
        memmove(buf + o, buf + run, i - run);
        if (run == 0)
            break;
        i = run - 1;
        c = buf[i];
        switch (c) {
        case '\b':
            c = 'b';
            break;
        case '\f':
            c = 'f';
            break;
        case '\n':
            c = 'n';
            break;
        case '\r':
            c = 'r';
            break;
        case '\t':
            c = 't';
            break;
        case '"':
        case '\\':
            break;
        default:
            o -= 6;
            memcpy(buf + o, "\\u00", 4);
            buf[o + 4] = (unsigned char)hex[c >> 4];
            buf[o + 5] = (unsigned char)hex[c & 15];
            continue;
        }
        buf[--o] = c;
        buf[--o] = '\\';
    }
}

/*
 * {"mime":"...", then the other fields}: the entity, most of the body,
 * escaped here in two passes (count, then write); jansson's writer goes
 * through a callback per character and was a sixth of a small signing
 * request's CPU (callgrind, script/bench). The entity is valid UTF-8
 * without NUL, so only quotes, backslashes and controls need escapes.
 * Built in place: buf holds the entity at its start and grows to the
 * whole body (realloc extends a large buffer where it lies, or remaps it),
 * so a large entity is not in memory twice, as it and its escaped copy.
 * Takes buf on every path.
 */
static int respond_json_mime_in(api_response *res, unsigned char *buf,
                                size_t len, json_t *fields)
{
    static const char head[] = "{\"mime\":\"";
    const size_t at = sizeof(head) - 1;
    char *rest = json_dumps(fields, JSON_COMPACT);
    size_t rest_len, n = 0, i, o;
    unsigned char *out = NULL;

    json_decref(fields);
    if (rest == NULL)
        goto fail;
    rest_len = strlen(rest);
    for (i = 0; i < len; i++)
        n += json_escaped_len[buf[i]];
    /* head, the string, its closing quote, a comma and the rest minus its
     * opening brace (or the bare closing brace of an empty object) */
    out = realloc(buf, at + n + 2 + rest_len);
    if (out == NULL)
        goto fail;
    buf = NULL;
    o = at + n;
    out[o++] = '"';
    if (rest_len > 2)
        out[o++] = ',';
    memcpy(out + o, rest + 1, rest_len - 1);
    o += rest_len - 1;
    json_escape_in_place(out, len, at, n);
    memcpy(out, head, at);
    free(rest);
    free(res->body);
    res->body = out;
    res->body_len = o;
    res->status = 200;
    res->content_type = "application/json";
    return 0;
fail:
    free(rest);
    free(buf);
    return -1;
}

static int respond_json_mime(api_response *res, const unsigned char *data,
                             size_t len, json_t *fields)
{
    unsigned char *buf = malloc(len ? len : 1);

    if (buf == NULL) {
        json_decref(fields);
        return -1;
    }
    memcpy(buf, data, len);
    return respond_json_mime_in(res, buf, len, fields);
}

/* Whether fields and the entity data[0..len) go out through
 * respond_json_mime. */
static int json_mime_fits(json_t *fields, const unsigned char *data, size_t len)
{
    return json_object_get(fields, "mime") == NULL &&
           json_object_get(fields, "mime_base64") == NULL &&
           api_utf8_valid(data, len) && memchr(data, '\0', len) == NULL;
}

int api_respond_entity(api_response *res, api_body_kind kind,
                       const unsigned char *data, size_t len, json_t *fields)
{
    int r;

    if (fields == NULL)
        return -1;
    if (kind == API_BODY_RAW) {
        r = respond_raw(res, data, len, fields);
        json_decref(fields);
        return r;
    }
    if (json_mime_fits(fields, data, len))
        return respond_json_mime(res, data, len, fields);
    if (api_set_mime_field(fields, data, len) != 0) {
        json_decref(fields);
        return -1;
    }
    return api_respond_json(res, 200, fields);
}

int api_respond_result(api_response *res, api_body_kind kind,
                       cms_result *result, json_t *fields)
{
    unsigned char *data;
    size_t len;
    int r;

    data = (unsigned char *)cms_result_data(result, &len);
    if (fields != NULL && kind != API_BODY_RAW &&
        json_mime_fits(fields, data, len)) {
        /* escaped where it is */
        data = cms_result_take_data(result, &len);
        return respond_json_mime_in(res, data, len, fields);
    }
    if (kind != API_BODY_RAW || fields == NULL)
        return api_respond_entity(res, kind, data, len, fields);
    /* the entity goes out as the body itself: hand it over, no copy */
    data = cms_result_take_data(result, &len);
    r = respond_raw_owned(res, data, len, fields);
    json_decref(fields);
    return r;
}

static int is_known(const char *name, const char *const *known)
{
    size_t i;

    for (i = 0; known[i] != NULL; i++)
        if (strcmp(name, known[i]) == 0)
            return 1;
    return 0;
}

/* in->mime is already set when the quick reader left "mime" decoded in
 * the body. */
static int input_mime_json(api_input *in, api_error *err)
{
    json_t *text = json_object_get(in->root, "mime");
    json_t *b64 = json_object_get(in->root, "mime_base64");
    cms_error cerr = {0};
    int in_body = in->mime != NULL;

    if ((text != NULL || in_body) && b64 != NULL)
        return api_fail(err, 400, "invalid_field",
                        "give either mime or mime_base64, not both");
    if (text == NULL && !in_body && b64 == NULL)
        return api_fail(err, 400, "missing_field", "mime is required");
    if (in_body)
        return 0;
    if (text != NULL) {
        if (!json_is_string(text))
            return api_fail(err, 400, "invalid_field", "mime must be a string");
        in->mime = (const unsigned char *)json_string_value(text);
        in->mime_len = json_string_length(text);
        return 0;
    }
    if (!json_is_string(b64))
        return api_fail(err, 400, "invalid_field",
                        "mime_base64 must be a string");
    in->mime_owned =
        cms_base64_decode((const unsigned char *)json_string_value(b64),
                          json_string_length(b64), &in->mime_len, &cerr);
    if (in->mime_owned == NULL && cerr.status == CMS_ERR_INTERNAL)
        return api_fail(err, 500, "internal_error", "out of memory");
    if (in->mime_owned == NULL)
        return api_fail(err, 400, "invalid_base64",
                        "mime_base64 is not valid base64");
    in->mime = in->mime_owned;
    return 0;
}

int api_input_open(api_input *in, const api_request *req,
                   const char *const *known, api_error *err)
{
    static const api_body none = {NULL, 0};
    const api_body *body = req->body != NULL ? req->body : &none;
    json_error_t jerr;
    const char *name;
    json_t *v;
    size_t i;
    int r;

    memset(in, 0, sizeof(*in));
    in->req = req;
    if (req->kind == API_BODY_RAW) {
        if (api_query_parse(req->query != NULL ? req->query : "",
                            req->query != NULL ? req->query_len : 0, &in->query,
                            err) != 0)
            return -1;
        for (i = 0; i < api_query_count(in->query); i++) {
            name = api_query_name_at(in->query, i);
            if (!is_known(name, known))
                return api_fail(err, 400, "invalid_field",
                                "unknown query parameter \"%s\"", name);
        }
        in->mime = body->data;
        in->mime_len = body->len;
        in->mime_in_body = 1;
        return 0;
    }
    /* NUL is legal inside a JSON string and may be part of a binary
     * entity; duplicate keys would make one of two values silently win */
    if (body->data != NULL)
        in->root = api_flat_json_read_inplace(body->data, body->len, "mime",
                                              &in->mime, &in->mime_len);
    if (in->root == NULL)
        in->root = json_loadb((const char *)body->data, body->len,
                              JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (in->root == NULL)
        return api_fail(err, 400, "invalid_json", "line %d column %d: %s",
                        jerr.line, jerr.column, jerr.text);
    if (!json_is_object(in->root))
        return api_fail(err, 400, "invalid_json",
                        "the request body must be a JSON object");
    json_object_foreach (in->root, name, v) {
        /* a typo in an option must not silently fall back to a default */
        if (!is_known(name, known) && strcmp(name, "mime") != 0 &&
            strcmp(name, "mime_base64") != 0)
            return api_fail(err, 400, "invalid_field", "unknown field \"%s\"",
                            name);
    }
    in->mime_in_body = in->mime != NULL;
    r = input_mime_json(in, err);
    /* the entity is a jansson string or decoded base64 now, unless the
     * quick reader left it in the body */
    if (!in->mime_in_body)
        api_input_drop_body(in);
    return r;
}

void api_input_drop_body(api_input *in)
{
    api_body *body = in->req->body;

    if (body == NULL || body->data == NULL)
        return;
    api_digest_finish(in);
    if (in->mime_in_body) {
        in->mime = NULL;
        in->mime_len = 0;
        in->mime_in_body = 0;
    }
    free(body->data);
    body->data = NULL;
    body->len = 0;
}

void api_input_close(api_input *in)
{
    api_digest_finish(in);
    json_decref(in->root);
    api_query_free(in->query);
    free(in->mime_owned);
    memset(in, 0, sizeof(*in));
}

int api_input_string(api_input *in, const char *name, const char **out,
                     api_error *err)
{
    json_t *v;

    if (in->root == NULL) {
        *out = api_query_get(in->query, name);
        return 0;
    }
    v = json_object_get(in->root, name);
    if (v == NULL)
        return 0;
    /* NUL is allowed in JSON strings (for mime), but an option cut at it
     * would silently mean something else */
    if (!json_is_string(v) ||
        strlen(json_string_value(v)) != json_string_length(v))
        return api_fail(err, 400, "invalid_field",
                        "%s must be a string without NUL", name);
    *out = json_string_value(v);
    return 0;
}

int api_input_key(api_input *in, const char *name, const char **out,
                  api_error *err)
{
    if (api_input_string(in, name, out, err) != 0)
        return -1;
    if (*out != NULL && strlen(*out) > PROTO_NAME_MAX)
        return api_fail(err, 400, "invalid_field",
                        "%s: key names are at most %d bytes", name,
                        PROTO_NAME_MAX);
    return 0;
}

int api_input_bool(api_input *in, const char *name, int *out, api_error *err)
{
    const char *s;
    json_t *v;

    if (in->root == NULL) {
        s = api_query_get(in->query, name);
        if (s == NULL)
            return 0;
        if (strcmp(s, "true") != 0 && strcmp(s, "false") != 0)
            return api_fail(err, 400, "invalid_field",
                            "%s must be true or false", name);
        *out = strcmp(s, "true") == 0;
        return 0;
    }
    v = json_object_get(in->root, name);
    if (v == NULL)
        return 0;
    if (!json_is_boolean(v))
        return api_fail(err, 400, "invalid_field", "%s must be a boolean",
                        name);
    *out = json_is_true(v);
    return 0;
}

void api_strings_clear(api_strings *s)
{
    size_t i;

    for (i = 0; i < s->count; i++)
        free(s->items[i]);
    free(s->items);
    s->items = NULL;
    s->count = 0;
}

static int strings_add(api_strings *s, const char *text, size_t len)
{
    char **grown = realloc(s->items, (s->count + 1) * sizeof(*grown));

    if (grown == NULL)
        return -1;
    s->items = grown;
    s->items[s->count] = strndup(text, len);
    if (s->items[s->count] == NULL)
        return -1;
    s->count++;
    return 0;
}

int api_input_strings(api_input *in, const char *name, api_strings *out,
                      api_error *err)
{
    const char *s, *comma;
    json_t *v, *item;
    size_t i;

    memset(out, 0, sizeof(*out));
    if (in->root == NULL) {
        s = api_query_get(in->query, name);
        for (; s != NULL; s = comma != NULL ? comma + 1 : NULL) {
            comma = strchr(s, ',');
            if (strings_add(out, s, comma ? (size_t)(comma - s) : strlen(s)))
                goto oom;
        }
        return 0;
    }
    v = json_object_get(in->root, name);
    if (v == NULL)
        return 0;
    if (!json_is_array(v))
        return api_fail(err, 400, "invalid_field",
                        "%s must be an array of strings", name);
    json_array_foreach (v, i, item) {
        if (!json_is_string(item) ||
            strlen(json_string_value(item)) != json_string_length(item)) {
            api_strings_clear(out);
            return api_fail(err, 400, "invalid_field",
                            "%s[%zu] must be a string without NUL", name, i);
        }
        if (strings_add(out, json_string_value(item),
                        strlen(json_string_value(item))) != 0)
            goto oom;
    }
    return 0;
oom:
    api_strings_clear(out);
    return api_fail(err, 500, "internal_error", "out of memory");
}

int api_handle(api *a, const api_request *req, api_response *res)
{
    api_error err = {0};
    api_request r = *req;
    int rc = 0;

    /* again here, not only on the headers: a reload may have revoked the
     * client while its body was arriving */
    if ((api_path_is_open(req->route->path) ||
         api_authenticate(a, req, &r.client, &err) == 0) &&
        req->route->handler(a, &r, res, &err) == 0)
        goto out;
    /* a library error left on this thread's queue would be reported
     * against the next request served by it */
    ERR_clear_error();
    rc = api_response_set_error(res, &err);
out:
    if (req->body != NULL) {
        free(req->body->data);
        req->body->data = NULL;
        req->body->len = 0;
    }
    return rc;
}
