/*
 * Keys and readiness: /v1/keys, /healthz, /readyz, and the key lookup every
 * private-key endpoint shares.
 */
#include <stdio.h>
#include <string.h>

#include "api/internal.h"

int api_fail_if_discovery_down(api *a, const char *missing, api_error *err)
{
    const char *reason = NULL;
    size_t i;

    for (i = 0; i < token_set_count_tokens(a->tokens); i++) {
        if (token_set_token_discovery(a->tokens, i) &&
            !token_set_token_ready(a->tokens, i, &reason)) {
            api_fail(err, 503, "token_unavailable",
                     "%s; token %s, which may hold it, is down: %s", missing,
                     token_set_token_name(a->tokens, i),
                     reason != NULL ? reason : "unknown reason");
            err->retry_after = 5;
            return -1;
        }
    }
    return 0;
}

token_key *api_lookup_key(api *a, const char *name, api_error *err)
{
    token_key *key = token_set_find_key(a->tokens, name);
    char missing[160];

    if (key != NULL)
        return key;
    snprintf(missing, sizeof(missing), "no key named \"%s\" is available",
             name);
    if (api_fail_if_discovery_down(a, missing, err) == 0)
        api_fail(err, 404, "unknown_key", "no key named \"%s\"", name);
    return NULL;
}

int api_check_key(api *a, token_key *key, token_use use, api_error *err)
{
    const char *reason = NULL, *why = NULL;
    size_t i;

    if (token_key_usable(key, use, &reason))
        return 0;
    /* no retry helps: the token cannot do this (p11-kit remoting and ECDH) */
    if (!token_key_supports(key, use))
        return api_fail(err, 422, "operation_unsupported", "key \"%s\": %s",
                        token_key_name(key), reason);
    for (i = 0; i < token_set_count_tokens(a->tokens); i++) {
        if (strcmp(token_set_token_name(a->tokens, i),
                   token_key_token_name(key)) == 0 &&
            !token_set_token_ready(a->tokens, i, &why)) {
            api_fail(err, 503, "token_unavailable", "token %s is down: %s",
                     token_key_token_name(key),
                     why != NULL ? why : "unknown reason");
            err->retry_after = 5;
            return -1;
        }
    }
    api_fail(err, 503, "key_unavailable", "key \"%s\" cannot be used: %s",
             token_key_name(key), reason != NULL ? reason : "unknown reason");
    /* an unfit certificate needs an operator, not a quick retry */
    err->retry_after = 300;
    return -1;
}

static json_t *key_json(token_key *key)
{
    const char *reason = NULL;
    int usable = token_key_usable(key, TOKEN_USE_SIGN, &reason);
    X509 *cert = token_key_cert0(key);
    json_t *obj, *uses;

    uses = json_array();
    if (uses != NULL && usable)
        json_array_append_new(uses, json_string("sign"));
    if (uses != NULL && token_key_usable(key, TOKEN_USE_DECRYPT, NULL))
        json_array_append_new(uses, json_string("decrypt"));
    obj = json_pack("{s:s,s:s,s:s,s:b,s:o*}", "name", token_key_name(key),
                    "token", token_key_token_name(key), "algorithm",
                    token_key_algorithm(key), "usable", usable, "usable_for",
                    uses);
    if (obj == NULL)
        return NULL;
    if ((!usable && reason != NULL &&
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
    json_t *list = json_array(), *item;
    size_t i, n = token_set_count_tokens(a->tokens);
    int ready = 1;

    for (i = 0; list != NULL && i < n; i++) {
        const char *reason = NULL;
        time_t since = 0;
        token_state state =
            token_set_token_state(a->tokens, i, &since, &reason);
        int up = state == TOKEN_STATE_READY || state == TOKEN_STATE_BUSY;
        int optional = token_set_token_optional(a->tokens, i);
        char when[32];
        struct tm tm;

        if (!up && !optional)
            ready = 0;
        gmtime_r(&since, &tm);
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
        item = json_pack("{s:s,s:s,s:b,s:s}", "name",
                         token_set_token_name(a->tokens, i), "state",
                         token_state_name(state), "optional", optional, "since",
                         when);
        if (item != NULL && !up && reason != NULL &&
            json_object_set_new(item, "reason",
                                api_json_text(reason, strlen(reason))) != 0) {
            json_decref(item);
            item = NULL;
        }
        if (json_array_append_new(list, item) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    if (list == NULL ||
        api_respond_json(res, ready ? 200 : 503,
                         json_pack("{s:s,s:o}", "status",
                                   ready ? "ready" : "not_ready", "tokens",
                                   list)) != 0)
        return api_fail(err, 500, "internal_error", "out of memory");
    return 0;
}
