/*
 * The v1 endpoints. Checks run in the contract's order, first failure wins:
 * route and method, then media type (service/ checks the size), then request
 * syntax, then the key, then the content, then the token.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <openssl/err.h>

#include "api/api.h"
#include "api/internal.h"
#include "cms/cms.h"

typedef int (*api_handler)(api *a, const api_request *req, api_response *res,
                           api_error *err);

struct api_route {
    const char *path;
    const char *method;
    api_handler handler;
    int raw_ok; /* accepts message/rfc822 bodies */
};

struct api {
    token_set *tokens;
};

static int handle_sign(api *a, const api_request *req, api_response *res,
                       api_error *err);
static int handle_keys(api *a, const api_request *req, api_response *res,
                       api_error *err);
static int handle_healthz(api *a, const api_request *req, api_response *res,
                          api_error *err);
static int handle_readyz(api *a, const api_request *req, api_response *res,
                         api_error *err);

static const api_route routes[] = {
    {"/v1/sign", "POST", handle_sign, 1},
    {"/v1/keys", "GET", handle_keys, 0},
    {"/healthz", "GET", handle_healthz, 0},
    {"/readyz", "GET", handle_readyz, 0},
};

#define NROUTES (sizeof(routes) / sizeof(routes[0]))

__attribute__((format(printf, 4, 5))) static int
fail(api_error *err, int status, const char *code, const char *fmt, ...)
{
    va_list ap;

    err->status = status;
    err->code = code;
    err->allow = NULL;
    err->retry_after = 0;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return -1;
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
        fail(err, 405, "method_not_allowed", "%s is not allowed on %s",
             method, path);
        err->allow = routes[i].method;
        return NULL;
    }
    fail(err, 404, "not_found", "no such endpoint: %s", path);
    return NULL;
}

int api_route_has_body(const api_route *route)
{
    return strcmp(route->method, "POST") == 0;
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
    return fail(err, 415, "unsupported_media_type",
                "Content-Type must be application/json%s (got %s)",
                route->raw_ok ? " or message/rfc822" : "",
                content_type != NULL ? content_type : "none");
}

api *api_new(token_set *tokens)
{
    api *a = calloc(1, sizeof(*a));

    if (a != NULL)
        a->tokens = tokens;
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

/* Takes ownership of body (a JSON value) on every path. */
static int response_set_json(api_response *res, int status, json_t *body)
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
    char key[sizeof(res->key)];
    json_t *body;

    /* the key stays for the access log; headers of a half-built success go */
    memcpy(key, res->key, sizeof(key));
    api_response_clear(res);
    memcpy(res->key, key, sizeof(key));
    body = json_pack("{s:{s:s,s:s}}", "error", "code", err->code, "message",
                     err->message);
    if (response_set_json(res, err->status, body) != 0)
        return -1;
    if (err->allow != NULL && response_add_header(res, "Allow", err->allow))
        return -1;
    if (err->retry_after > 0) {
        snprintf(num, sizeof(num), "%d", err->retry_after);
        if (response_add_header(res, "Retry-After", num) != 0)
            return -1;
    }
    return 0;
}

/* Options of a request, from the JSON object or from the query string in
 * raw mode. Strings are borrowed from the request. */
typedef struct sign_params {
    const char *key;
    const unsigned char *mime;
    size_t mime_len;
    unsigned char *mime_owned; /* decoded base64 */
    cms_mode mode;
    cms_digest digest;
} sign_params;

static int json_opt_string(json_t *obj, const char *field, const char **out,
                           api_error *err)
{
    json_t *v = json_object_get(obj, field);

    if (v == NULL)
        return 0;
    if (!json_is_string(v))
        return fail(err, 400, "invalid_field", "%s must be a string", field);
    *out = json_string_value(v);
    return 0;
}

static int params_options(sign_params *p, const char *mode, const char *digest,
                          api_error *err)
{
    p->mode = CMS_MODE_DETACHED;
    p->digest = CMS_DIGEST_SHA256;
    if (mode != NULL && cms_mode_from_name(mode, &p->mode) != 0)
        return fail(err, 400, "invalid_field",
                    "mode must be \"detached\" or \"opaque\"");
    if (digest != NULL && cms_digest_from_name(digest, &p->digest) != 0)
        return fail(err, 400, "invalid_field",
                    "digest must be \"sha256\", \"sha384\" or \"sha512\"");
    return 0;
}

static int reject_unknown_fields(json_t *obj, const char *const *known,
                                 api_error *err)
{
    const char *name;
    json_t *v;
    size_t i;

    json_object_foreach(obj, name, v)
    {
        for (i = 0; known[i] != NULL; i++)
            if (strcmp(name, known[i]) == 0)
                break;
        /* a typo in an option must not silently fall back to a default */
        if (known[i] == NULL)
            return fail(err, 400, "invalid_field", "unknown field \"%s\"",
                        name);
    }
    return 0;
}

static int json_mime(json_t *obj, sign_params *p, api_error *err)
{
    json_t *text = json_object_get(obj, "mime");
    json_t *b64 = json_object_get(obj, "mime_base64");

    if (text != NULL && b64 != NULL)
        return fail(err, 400, "invalid_field",
                    "give either mime or mime_base64, not both");
    if (text == NULL && b64 == NULL)
        return fail(err, 400, "missing_field", "mime is required");
    if (text != NULL) {
        if (!json_is_string(text))
            return fail(err, 400, "invalid_field", "mime must be a string");
        p->mime = (const unsigned char *)json_string_value(text);
        p->mime_len = json_string_length(text);
        return 0;
    }
    if (!json_is_string(b64))
        return fail(err, 400, "invalid_field",
                    "mime_base64 must be a string");
    p->mime_owned = api_base64_decode(json_string_value(b64),
                                      json_string_length(b64), &p->mime_len);
    if (p->mime_owned == NULL)
        return fail(err, 400, "invalid_base64",
                    "mime_base64 is not valid base64");
    p->mime = p->mime_owned;
    return 0;
}

static int parse_json_body(const api_request *req, json_t **out,
                           api_error *err)
{
    json_error_t jerr;
    json_t *root;

    /* NUL is legal inside a JSON string and may be part of a binary entity */
    root = json_loadb((const char *)req->body, req->body_len,
                      JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (root == NULL)
        return fail(err, 400, "invalid_json", "line %d column %d: %s",
                    jerr.line, jerr.column, jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return fail(err, 400, "invalid_json",
                    "the request body must be a JSON object");
    }
    *out = root;
    return 0;
}

static int sign_params_json(json_t *root, sign_params *p, api_error *err)
{
    static const char *const known[] = {"key",  "mime",   "mime_base64",
                                        "mode", "digest", NULL};
    const char *mode = NULL, *digest = NULL;

    if (reject_unknown_fields(root, known, err) != 0)
        return -1;
    if (json_object_get(root, "key") == NULL)
        return fail(err, 400, "missing_field", "key is required");
    if (json_opt_string(root, "key", &p->key, err) != 0 ||
        json_opt_string(root, "mode", &mode, err) != 0 ||
        json_opt_string(root, "digest", &digest, err) != 0 ||
        json_mime(root, p, err) != 0)
        return -1;
    return params_options(p, mode, digest, err);
}

typedef struct query_check {
    const char *const *known;
    const char *unknown;
} query_check;

static int query_check_name(void *arg, const char *name)
{
    query_check *qc = arg;
    size_t i;

    for (i = 0; qc->known[i] != NULL; i++)
        if (strcmp(name, qc->known[i]) == 0)
            return 0;
    qc->unknown = name;
    return 1;
}

static int sign_params_raw(const api_request *req, sign_params *p,
                           api_error *err)
{
    static const char *const known[] = {"key", "mode", "digest", NULL};
    query_check qc = {known, NULL};

    req->query_each(req->query_ctx, query_check_name, &qc);
    if (qc.unknown != NULL)
        return fail(err, 400, "invalid_field",
                    "unknown query parameter \"%s\"", qc.unknown);
    p->key = req->query(req->query_ctx, "key");
    if (p->key == NULL)
        return fail(err, 400, "missing_field",
                    "the key query parameter is required");
    p->mime = req->body;
    p->mime_len = req->body_len;
    return params_options(p, req->query(req->query_ctx, "mode"),
                          req->query(req->query_ctx, "digest"), err);
}

static token_key *find_usable_key(api *a, const char *name, api_error *err)
{
    token_key *key = token_set_find_key(a->tokens, name);
    const char *reason = NULL;
    size_t i;

    if (key == NULL) {
        /* a token that is down may hold it: discovery cannot list its keys,
         * and "unknown" would send the caller looking in the wrong place */
        for (i = 0; i < token_set_count_tokens(a->tokens); i++) {
            if (!token_set_token_ready(a->tokens, i, &reason)) {
                fail(err, 503, "token_unavailable",
                     "no key named \"%s\" is available; token %s is down: "
                     "%s",
                     name, token_set_token_name(a->tokens, i),
                     reason != NULL ? reason : "unknown reason");
                err->retry_after = 5;
                return NULL;
            }
        }
        fail(err, 404, "unknown_key", "no key named \"%s\"", name);
        return NULL;
    }
    if (!token_key_usable(key, &reason)) {
        fail(err, 503, "key_unavailable", "key \"%s\" cannot be used: %s",
             name, reason != NULL ? reason : "unknown reason");
        /* an unfit certificate needs an operator, not a quick retry */
        err->retry_after = 300;
        return NULL;
    }
    return key;
}

static int token_fail(api_error *err, const token_error *terr)
{
    if (terr->status == TOKEN_ERR_BUSY) {
        fail(err, 503, "token_busy", "%s", terr->message);
        err->retry_after = 1;
    } else {
        fail(err, 503, "token_unavailable", "%s", terr->message);
        err->retry_after = 5;
    }
    return -1;
}

static int cms_fail(api_error *err, const cms_error *cerr)
{
    switch (cerr->status) {
    case CMS_ERR_INPUT:
        return fail(err, 422, "invalid_mime", "%s", cerr->message);
    case CMS_ERR_KEY:
        fail(err, 503, "token_unavailable", "signing failed: %s",
             cerr->message);
        err->retry_after = 5;
        return -1;
    default:
        return fail(err, 500, "internal_error", "%s", cerr->message);
    }
}

/* HTTP has no empty header value that every client keeps, so an entity
 * that needed no re-encoding says "none". */
static char *reencoded_header(const cms_result *r)
{
    size_t i, n = cms_result_count_reencoded(r), len = 1;
    char *s;

    if (n == 0)
        return strdup("none");
    for (i = 0; i < n; i++)
        len += strlen(cms_result_reencoded_at(r, i)) + 2;
    s = malloc(len);
    if (s == NULL)
        return NULL;
    s[0] = '\0';
    for (i = 0; i < n; i++) {
        if (i > 0)
            strcat(s, ", ");
        strcat(s, cms_result_reencoded_at(r, i));
    }
    return s;
}

static int sign_respond_raw(const cms_result *r, const sign_params *p,
                            api_response *res)
{
    const unsigned char *data;
    char *reenc = NULL;
    size_t len;
    int ret = -1;

    data = cms_result_data(r, &len);
    res->body = malloc(len ? len : 1);
    if (res->body == NULL)
        goto out;
    memcpy(res->body, data, len);
    res->body_len = len;
    res->status = 200;
    res->content_type = "message/rfc822";
    reenc = reencoded_header(r);
    if (reenc == NULL ||
        response_add_header(res, "X-Smimed-Key", p->key) != 0 ||
        response_add_header(res, "X-Smimed-Digest",
                            cms_digest_name(p->digest)) != 0 ||
        response_add_header(res, "X-Smimed-Mode", cms_mode_name(p->mode)) ||
        response_add_header(res, "X-Smimed-Reencoded", reenc) != 0)
        goto out;
    ret = 0;
out:
    free(reenc);
    return ret;
}

/* Sets "mime" when the bytes are UTF-8 (so clients can use them as a JSON
 * string as they are), "mime_base64" otherwise. */
static int set_mime_field(json_t *obj, const unsigned char *data, size_t len)
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

static int sign_respond_json(const cms_result *r, const sign_params *p,
                             api_response *res)
{
    json_t *body = json_object(), *reenc = json_array();
    const unsigned char *data;
    size_t i, len;
    int failed = body == NULL || reenc == NULL;

    for (i = 0; !failed && i < cms_result_count_reencoded(r); i++)
        failed = json_array_append_new(
            reenc, json_string(cms_result_reencoded_at(r, i)));
    data = cms_result_data(r, &len);
    failed = failed || set_mime_field(body, data, len) ||
             json_object_set_new(body, "key", json_string(p->key)) ||
             json_object_set_new(body, "digest",
                                 json_string(cms_digest_name(p->digest))) ||
             json_object_set_new(body, "mode",
                                 json_string(cms_mode_name(p->mode))) ||
             json_object_set(body, "reencoded", reenc);
    json_decref(reenc);
    if (failed) {
        json_decref(body);
        return -1;
    }
    return response_set_json(res, 200, body);
}

static int handle_sign(api *a, const api_request *req, api_response *res,
                       api_error *err)
{
    sign_params p = {0};
    json_t *root = NULL;
    token_key *key;
    token_error terr = {0};
    cms_error cerr = {0};
    cms_result *result = NULL;
    EVP_PKEY *pkey = NULL;
    int ret = -1, acquired = 0;

    if (req->kind == API_BODY_JSON) {
        if (parse_json_body(req, &root, err) != 0 ||
            sign_params_json(root, &p, err) != 0)
            goto out;
    } else if (sign_params_raw(req, &p, err) != 0) {
        goto out;
    }
    snprintf(res->key, sizeof(res->key), "%s", p.key);
    key = find_usable_key(a, p.key, err);
    if (key == NULL)
        goto out;
    if (token_key_acquire(key, &pkey, &terr) != 0) {
        token_fail(err, &terr);
        goto out;
    }
    acquired = 1;
    if (cms_sign_entity(p.mime, p.mime_len, pkey, token_key_cert0(key),
                        token_key_chain0(key), p.mode, p.digest, &result,
                        &cerr) != 0) {
        cms_fail(err, &cerr);
        goto out;
    }
    token_key_release(key);
    acquired = 0;
    if ((req->kind == API_BODY_RAW ? sign_respond_raw(result, &p, res)
                                   : sign_respond_json(result, &p, res)) != 0) {
        fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    if (acquired)
        token_key_release(key);
    cms_result_free(result);
    free(p.mime_owned);
    json_decref(root);
    return ret;
}

static json_t *key_json(token_key *key)
{
    const char *reason = NULL;
    int usable = token_key_usable(key, &reason);
    X509 *cert = token_key_cert0(key);
    json_t *obj;

    obj = json_pack("{s:s,s:s,s:s,s:b}", "name", token_key_name(key), "token",
                    token_key_token_name(key), "algorithm",
                    token_key_algorithm(key), "usable", usable);
    if (obj == NULL)
        return NULL;
    if ((!usable && reason != NULL &&
         json_object_set_new(obj, "reason", json_string(reason)) != 0) ||
        (cert != NULL &&
         json_object_set_new(obj, "certificate", api_cert_json(cert)) != 0)) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}

static int handle_keys(api *a, const api_request *req, api_response *res,
                       api_error *err)
{
    json_t *keys = json_array();
    size_t i, n = token_set_count_keys(a->tokens);

    for (i = 0; keys != NULL && i < n; i++) {
        if (json_array_append_new(
                keys, key_json(token_set_key_at(a->tokens, i))) != 0) {
            json_decref(keys);
            keys = NULL;
        }
    }
    if (keys == NULL ||
        response_set_json(res, 200, json_pack("{s:o}", "keys", keys)) != 0)
        return fail(err, 500, "internal_error", "out of memory");
    return 0;
}

static int handle_healthz(api *a, const api_request *req, api_response *res,
                          api_error *err)
{
    if (response_set_json(res, 200, json_pack("{s:s}", "status", "ok")) != 0)
        return fail(err, 500, "internal_error", "out of memory");
    return 0;
}

static int handle_readyz(api *a, const api_request *req, api_response *res,
                         api_error *err)
{
    json_t *list = json_array(), *item;
    size_t i, n = token_set_count_tokens(a->tokens);
    int ready = 1;

    for (i = 0; list != NULL && i < n; i++) {
        const char *reason = NULL;
        int up = token_set_token_ready(a->tokens, i, &reason);
        int optional = token_set_token_optional(a->tokens, i);

        if (!up && !optional)
            ready = 0;
        item = json_pack("{s:s,s:s,s:b}", "name",
                         token_set_token_name(a->tokens, i), "state",
                         up ? "ready" : "down", "optional", optional);
        if (item != NULL && !up && reason != NULL &&
            json_object_set_new(item, "reason", json_string(reason)) != 0) {
            json_decref(item);
            item = NULL;
        }
        if (json_array_append_new(list, item) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    if (list == NULL ||
        response_set_json(res, ready ? 200 : 503,
                          json_pack("{s:s,s:o}", "status",
                                    ready ? "ready" : "not_ready", "tokens",
                                    list)) != 0)
        return fail(err, 500, "internal_error", "out of memory");
    return 0;
}

int api_handle(api *a, const api_request *req, api_response *res)
{
    api_error err = {0};

    if (req->route->handler(a, req, res, &err) == 0)
        return 0;
    /* a library error left on this thread's queue would be reported
     * against the next request served by it */
    ERR_clear_error();
    return api_response_set_error(res, &err);
}
