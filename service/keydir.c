/*
 * Pages of the key directory and of the token states. A key's entry
 * carries its certificate and chain (DER); one whose certificates cannot
 * travel (over PROTO_CERT_MAX each, PROTO_CHAIN_MAX in all, or a page on
 * their own) is listed without them, not usable, with the reason. A key
 * whose name the protocol cannot carry (not UTF-8) is left out of the
 * page but counted in its total.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "service/keydir.h"

void keydir_text(char *dst, size_t max, const char *src, const char *dflt)
{
    size_t i;

    if (src == NULL || src[0] == '\0')
        src = dflt;
    for (i = 0; i < max && src[i] != '\0'; i++)
        dst[i] = (unsigned char)src[i] >= 0x20 && (unsigned char)src[i] < 0x7f
                     ? src[i]
                     : '?';
    dst[i] = '\0';
}

void keydir_page_clear(keydir_page *page)
{
    while (page->nders > 0)
        OPENSSL_free(page->ders[--page->nders]);
    free(page->ders);
    free(page->keys);
    page->ders = NULL;
    page->keys = NULL;
}

/* The DER of x into the page: 0, or -1 when it cannot travel. */
static int add_der(keydir_page *page, X509 *x, const unsigned char **der,
                   size_t *len)
{
    unsigned char *p = NULL;
    int n = i2d_X509(x, &p);

    if (n <= 0 || n > PROTO_CERT_MAX) {
        OPENSSL_free(p);
        return -1;
    }
    page->ders[page->nders++] = p;
    *der = p;
    *len = (size_t)n;
    return 0;
}

static void key_entry(token_key *key, proto_key_entry *e, keydir_page *page)
{
    static const char too_big[] =
        "its certificate or chain does not fit the key protocol";
    STACK_OF(X509) *chain = token_key_chain0(key);
    const char *reason, *alg = token_key_algorithm(key);
    size_t i;

    memset(e, 0, sizeof(*e));
    snprintf(e->name, sizeof(e->name), "%s", token_key_name(key));
    keydir_text(e->token, PROTO_TOKEN_MAX, token_key_token_name(key), "?");
    for (i = 0; alg != NULL && alg[i] != '\0' && i < PROTO_ALGORITHM_MAX; i++)
        if (!((alg[i] >= 'a' && alg[i] <= 'z') ||
              (alg[i] >= '0' && alg[i] <= '9') || alg[i] == '-'))
            break;
    if (alg != NULL && alg[i] == '\0')
        snprintf(e->algorithm, sizeof(e->algorithm), "%s", alg);
    if (token_key_supports(key, TOKEN_USE_SIGN))
        e->flags |= PROTO_KEY_SIGN_SUPPORTED;
    if (token_key_supports(key, TOKEN_USE_DECRYPT))
        e->flags |= PROTO_KEY_DECRYPT_SUPPORTED;
    reason = NULL;
    if (token_key_usable(key, TOKEN_USE_SIGN, &reason))
        e->flags |= PROTO_KEY_SIGN_USABLE;
    else
        keydir_text(e->reason_sign, PROTO_REASON_MAX, reason, "not usable");
    reason = NULL;
    if (token_key_usable(key, TOKEN_USE_DECRYPT, &reason))
        e->flags |= PROTO_KEY_DECRYPT_USABLE;
    else
        keydir_text(e->reason_decrypt, PROTO_REASON_MAX, reason, "not usable");
    if (token_key_cert0(key) != NULL &&
        add_der(page, token_key_cert0(key), &e->cert, &e->cert_len) != 0)
        goto too_large;
    if (chain != NULL && sk_X509_num(chain) > PROTO_CHAIN_MAX)
        goto too_large;
    for (i = 0; chain != NULL && i < (size_t)sk_X509_num(chain); i++) {
        if (add_der(page, sk_X509_value(chain, (int)i), &e->chain[i],
                    &e->chain_len[i]) != 0)
            goto too_large;
        e->nchain++;
    }
    if (proto_key_entry_size(e) + proto_keys_reply_overhead() <= PROTO_MSG_MAX)
        return;
too_large:
    /* the DERs made stay with the page, freed with it */
    e->cert = NULL;
    e->cert_len = 0;
    e->nchain = 0;
    e->flags &= ~(PROTO_KEY_SIGN_USABLE | PROTO_KEY_DECRYPT_USABLE);
    snprintf(e->reason_sign, sizeof(e->reason_sign), "%s", too_big);
    snprintf(e->reason_decrypt, sizeof(e->reason_decrypt), "%s", too_big);
}

proto_status keydir_keys(token_set *tokens, uint32_t start, keydir_page *page,
                         proto_reply *rep, const char **why)
{
    size_t i, n = tokens != NULL ? token_set_count_keys(tokens) : 0;
    size_t room = PROTO_MSG_MAX - proto_keys_reply_overhead(), size, mark;
    proto_key_entry *e;

    memset(page, 0, sizeof(*page));
    if (start > n) {
        *why = "start is past the last key";
        return PROTO_BAD_REQUEST;
    }
    page->keys = calloc(PROTO_PAGE_KEYS_MAX, sizeof(*page->keys));
    page->ders = calloc(PROTO_PAGE_KEYS_MAX * (PROTO_CHAIN_MAX + 1),
                        sizeof(*page->ders));
    if (page->keys == NULL || page->ders == NULL) {
        keydir_page_clear(page);
        *why = "out of memory";
        return PROTO_INTERNAL;
    }
    rep->u.keys.nkeys = 0;
    for (i = start; i < n && rep->u.keys.nkeys < PROTO_PAGE_KEYS_MAX; i++) {
        token_key *key = token_set_key_at(tokens, i);

        if (!proto_name_is_valid(token_key_name(key), PROTO_NAME_MAX))
            continue;
        mark = page->nders;
        e = &page->keys[rep->u.keys.nkeys];
        key_entry(key, e, page);
        size = proto_key_entry_size(e);
        if (size > room) {
            /* the next page's first */
            while (page->nders > mark)
                OPENSSL_free(page->ders[--page->nders]);
            break;
        }
        room -= size;
        rep->u.keys.nkeys++;
    }
    rep->u.keys.total = (uint32_t)n;
    rep->u.keys.next = (uint32_t)i;
    rep->u.keys.keys = page->keys;
    return PROTO_OK;
}

static uint8_t state_of(token_state st)
{
    switch (st) {
    case TOKEN_STATE_READY:
        return PROTO_TOKEN_READY;
    case TOKEN_STATE_BUSY:
        return PROTO_TOKEN_BUSY;
    case TOKEN_STATE_PIN_REJECTED:
        return PROTO_TOKEN_PIN_REJECTED;
    case TOKEN_STATE_RECOVERING:
        return PROTO_TOKEN_RECOVERING;
    default:
        return PROTO_TOKEN_DOWN;
    }
}

static void token_entry(token_set *tokens, size_t i, proto_token_entry *t)
{
    const char *reason = NULL;
    time_t since = 0;
    token_stats st;

    memset(t, 0, sizeof(*t));
    keydir_text(t->name, PROTO_TOKEN_MAX, token_set_token_name(tokens, i), "?");
    t->state = state_of(token_set_token_state(tokens, i, &since, &reason));
    if (t->state != PROTO_TOKEN_READY && t->state != PROTO_TOKEN_BUSY)
        keydir_text(t->reason, PROTO_REASON_MAX, reason, "unknown reason");
    t->since = since > 0 ? (uint64_t)since : 0;
    if (token_set_token_optional(tokens, i))
        t->flags |= PROTO_TOKEN_OPTIONAL;
    if (token_set_token_discovery(tokens, i))
        t->flags |= PROTO_TOKEN_DISCOVERY;
    token_set_token_stats(tokens, i, &st);
    t->ops_sign = st.operations[TOKEN_USE_SIGN];
    t->ops_decrypt = st.operations[TOKEN_USE_DECRYPT];
    t->busy = st.busy;
    t->unavailable = st.unavailable;
    t->faults = st.faults;
    t->retries = st.retries;
    t->recoveries = st.recoveries;
    t->in_flight = st.in_flight;
    t->waiting = st.waiting;
    t->max_sessions = st.max_sessions;
}

proto_status keydir_state(token_set *tokens, uint32_t start, keydir_page *page,
                          proto_reply *rep, const char **why)
{
    size_t i, n = tokens != NULL ? token_set_count_tokens(tokens) : 0;

    memset(page, 0, sizeof(*page));
    if (start > n) {
        *why = "start is past the last token";
        return PROTO_BAD_REQUEST;
    }
    rep->u.state.ntokens = 0;
    for (i = start; i < n && rep->u.state.ntokens < PROTO_PAGE_TOKENS_MAX; i++)
        token_entry(tokens, i, &page->tokens[rep->u.state.ntokens++]);
    rep->u.state.total = (uint32_t)n;
    rep->u.state.next = (uint32_t)i;
    rep->u.state.tokens = page->tokens;
    return PROTO_OK;
}
