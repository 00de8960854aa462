/*
 * Opening a configuration's tokens, and the reload rule that keeps what
 * works. Moved out of main.c so that the single-process daemon and the key
 * process share one copy.
 */
#include <string.h>

#include "service/keyset.h"
#include "service/log.h"

static void log_keys(token_set *tokens)
{
    size_t i;

    for (i = 0; i < token_set_count_tokens(tokens); i++) {
        const char *reason = NULL, *first = NULL;
        size_t skipped;

        if (token_set_token_ready(tokens, i, &reason))
            log_info("token %s ready", token_set_token_name(tokens, i));
        else
            log_warn("token %s down: %s", token_set_token_name(tokens, i),
                     reason != NULL ? reason : "unknown");
        skipped = token_set_token_skipped(tokens, i, &first);
        if (skipped > 0)
            log_warn("token %s: %zu discovered key%s not served: a key name "
                     "is 1 to %d bytes without control characters (label "
                     "\"%s\")",
                     token_set_token_name(tokens, i), skipped,
                     skipped == 1 ? " is" : "s are", TOKEN_KEY_NAME_MAX, first);
    }
    for (i = 0; i < token_set_count_keys(tokens); i++) {
        token_key *key = token_set_key_at(tokens, i);
        const char *reason = NULL;

        if (token_key_usable(key, TOKEN_USE_SIGN, &reason))
            log_info("key %s (%s) on %s usable", token_key_name(key),
                     token_key_algorithm(key), token_key_token_name(key));
        else
            log_warn("key %s on %s not usable: %s", token_key_name(key),
                     token_key_token_name(key),
                     reason != NULL ? reason : "unknown");
    }
}

token_set *keyset_open(const config *cfg)
{
    token_set *tokens = token_set_new();
    token_error err = {0};
    size_t i;

    if (tokens == NULL) {
        log_error("out of memory");
        return NULL;
    }
    for (i = 0; i < cfg->ntokens; i++) {
        if (token_set_add(tokens, &cfg->tokens[i], &err) != 0) {
            log_error("tokens[%zu]: %s", i, err.message);
            token_set_free(tokens);
            return NULL;
        }
    }
    log_keys(tokens);
    return tokens;
}

int keyset_loses_token(token_set *now, token_set *next)
{
    const char *reason = NULL;
    size_t i, j;

    for (i = 0; i < token_set_count_tokens(next); i++) {
        if (token_set_token_ready(next, i, &reason))
            continue;
        for (j = 0; j < token_set_count_tokens(now); j++) {
            if (strcmp(token_set_token_name(now, j),
                       token_set_token_name(next, i)) == 0 &&
                token_set_token_ready(now, j, NULL)) {
                log_error("token %s would go down: %s",
                          token_set_token_name(next, i),
                          reason != NULL ? reason : "unknown reason");
                return 1;
            }
        }
    }
    return 0;
}

void keyset_log_event(const char *token, const char *state, const char *reason)
{
    if (reason == NULL)
        log_info("token %s %s", token, state);
    else
        log_warn("token %s %s: %s", token, state, reason);
}
