/*
 * Keys and readiness: /v1/keys, /healthz, /readyz, and the key lookup every
 * private-key endpoint shares.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"

/* The token's entry in the directory; NULL when it lists none by that
 * name. */
static const proto_token_entry *find_token(const rkey_dir *d, const char *name)
{
    const proto_token_entry *t;
    size_t i;

    for (i = 0; i < rkey_dir_count_tokens(d); i++) {
        t = rkey_dir_token_at(d, i);
        if (strcmp(t->name, name) == 0)
            return t;
    }
    return NULL;
}

/* As token_set_token_ready: a busy token serves, after a wait. */
static int token_up(const proto_token_entry *t)
{
    return t->state == PROTO_TOKEN_READY || t->state == PROTO_TOKEN_BUSY;
}

rkey_dir *api_dir_get1(api *a, api_error *err)
{
    rkey_failure f = {0};
    rkey_dir *d = rkey_dir_get1(a->keys, &f);

    if (d != NULL)
        return d;
    api_fail(err, 503, "token_unavailable",
             "the key process cannot be reached: %s", f.message);
    err->retry_after = f.retry_after > 0 ? (int)f.retry_after : 5;
    return NULL;
}

int api_fail_if_discovery_down(const rkey_dir *d, const char *missing,
                               api_error *err)
{
    const proto_token_entry *t;
    size_t i;

    for (i = 0; i < rkey_dir_count_tokens(d); i++) {
        t = rkey_dir_token_at(d, i);
        if ((t->flags & PROTO_TOKEN_DISCOVERY) && !token_up(t)) {
            api_fail(err, 503, "token_unavailable",
                     "%s; token %s, which may hold it, is down: %s", missing,
                     t->name, t->reason[0] ? t->reason : "unknown reason");
            err->retry_after = 5;
            return -1;
        }
    }
    return 0;
}

rkey_key *api_lookup_key(rkey_dir *d, const char *name, api_error *err)
{
    rkey_key *key = rkey_dir_find_key(d, name);
    char missing[160];

    if (key != NULL)
        return key;
    snprintf(missing, sizeof(missing), "no key named \"%s\" is available",
             name);
    if (api_fail_if_discovery_down(d, missing, err) == 0)
        api_fail(err, 404, "unknown_key", "no key named \"%s\"", name);
    return NULL;
}

int api_check_key(const rkey_dir *d, const rkey_key *key, rkey_use use,
                  api_error *err)
{
    const char *reason = NULL;
    const proto_token_entry *t;

    if (rkey_key_usable(key, use, &reason) && rkey_key_pkey0(key) != NULL)
        return 0;
    if (reason == NULL)
        reason = "its certificate's key is of a type smimed does not carry";
    /* no retry helps: the token cannot do this (p11-kit remoting and ECDH) */
    if (!rkey_key_supports(key, use))
        return api_fail(err, 422, "operation_unsupported", "key \"%s\": %s",
                        rkey_key_name(key), reason);
    t = find_token(d, rkey_key_token_name(key));
    if (t != NULL && !token_up(t)) {
        api_fail(err, 503, "token_unavailable", "token %s is down: %s", t->name,
                 t->reason[0] ? t->reason : "unknown reason");
        err->retry_after = 5;
        return -1;
    }
    api_fail(err, 503, "key_unavailable", "key \"%s\" cannot be used: %s",
             rkey_key_name(key), reason[0] ? reason : "unknown reason");
    /* an unfit certificate needs an operator, not a quick retry */
    err->retry_after = 300;
    return -1;
}

static json_t *key_json(const rkey_key *key)
{
    const char *reason = NULL;
    int usable = rkey_key_usable(key, RKEY_USE_SIGN, &reason);
    X509 *cert = rkey_key_cert0(key);
    json_t *obj, *uses;

    uses = json_array();
    if (uses != NULL && usable)
        json_array_append_new(uses, json_string("sign"));
    if (uses != NULL && rkey_key_usable(key, RKEY_USE_DECRYPT, NULL))
        json_array_append_new(uses, json_string("decrypt"));
    obj = json_pack("{s:s,s:s,s:s,s:b,s:o*}", "name", rkey_key_name(key),
                    "token", rkey_key_token_name(key), "algorithm",
                    rkey_key_algorithm(key), "usable", usable, "usable_for",
                    uses);
    if (obj == NULL)
        return NULL;
    if ((!usable && reason != NULL && reason[0] != '\0' &&
         json_object_set_new(obj, "reason",
                             api_json_text(reason, strlen(reason))) != 0) ||
        (cert != NULL && json_object_set_new(obj, "certificate",
                                             api_cert_json(cert, 1)) != 0)) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}

int api_handle_keys(api *a, const api_request *req, api_response *res,
                    api_error *err)
{
    rkey_dir *d = api_dir_get1(a, err);
    json_t *keys;
    size_t i, n;

    if (d == NULL)
        return -1;
    keys = json_array();
    n = rkey_dir_count_keys(d);
    for (i = 0; keys != NULL && i < n; i++) {
        if (json_array_append_new(keys, key_json(rkey_dir_key_at(d, i))) != 0) {
            json_decref(keys);
            keys = NULL;
        }
    }
    rkey_dir_free(d);
    if (keys == NULL ||
        api_respond_json(res, 200, json_pack("{s:o}", "keys", keys)) != 0)
        return api_fail(err, 500, "internal_error", "out of memory");
    return 0;
}

int api_handle_healthz(api *a, const api_request *req, api_response *res,
                       api_error *err)
{
    if (api_respond_json(res, 200, json_pack("{s:s}", "status", "ok")) != 0)
        return api_fail(err, 500, "internal_error", "out of memory");
    return 0;
}

int api_handle_readyz(api *a, const api_request *req, api_response *res,
                      api_error *err)
{
    proto_token_entry *tokens = NULL;
    rkey_failure f = {0};
    json_t *list, *item;
    size_t i, n = 0;
    int ready = 1;

    /* asked now rather than from the directory: a probe wants this
     * moment's states */
    if (rkey_state(a->keys, &tokens, &n, &f) != 0) {
        api_fail(err, 503, "token_unavailable",
                 "the key process cannot be reached: %s", f.message);
        err->retry_after = 5;
        return -1;
    }
    list = json_array();
    for (i = 0; list != NULL && i < n; i++) {
        const proto_token_entry *t = &tokens[i];
        int optional = (t->flags & PROTO_TOKEN_OPTIONAL) != 0;
        time_t since = (time_t)t->since;
        char when[32];
        struct tm tm;

        if (!token_up(t) && !optional)
            ready = 0;
        gmtime_r(&since, &tm);
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
        item = json_pack("{s:s,s:s,s:b,s:s}", "name", t->name, "state",
                         proto_token_state_name(t->state), "optional", optional,
                         "since", when);
        if (item != NULL && !token_up(t) && t->reason[0] != '\0' &&
            json_object_set_new(item, "reason",
                                api_json_text(t->reason, strlen(t->reason))) !=
                0) {
            json_decref(item);
            item = NULL;
        }
        if (json_array_append_new(list, item) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    free(tokens);
    if (list == NULL ||
        api_respond_json(res, ready ? 200 : 503,
                         json_pack("{s:s,s:o}", "status",
                                   ready ? "ready" : "not_ready", "tokens",
                                   list)) != 0)
        return api_fail(err, 500, "internal_error", "out of memory");
    return 0;
}
