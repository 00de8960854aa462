/*
 * keydir: the key process's answers to KEYS and STATE: a page of the key
 * directory (names, tokens, algorithms, usability, certificates) or of
 * the tokens' states and counters, read from a token set.
 */
#ifndef SMIMED_KEYDIR_H
#define SMIMED_KEYDIR_H

#include "proto/proto.h"
#include "token/token.h"

/* What a page's entries point to, until keydir_page_clear. */
typedef struct keydir_page {
    proto_key_entry *keys;
    unsigned char **ders;
    size_t nders;
    proto_token_entry tokens[PROTO_PAGE_TOKENS_MAX];
} keydir_page;

/* Fill rep's payload (its type, id and epoch are the caller's) with the
 * entries from start on that fit one message. PROTO_OK, or the status of
 * the refusal with *why. tokens may be NULL: no set is in service. */
proto_status keydir_keys(token_set *tokens, uint32_t start, keydir_page *page,
                         proto_reply *rep, const char **why);
proto_status keydir_state(token_set *tokens, uint32_t start, keydir_page *page,
                          proto_reply *rep, const char **why);
void keydir_page_clear(keydir_page *page);

/* src as protocol text of at most max bytes: printable ASCII stays, any
 * other byte becomes '?' (a token label or a module's message may hold
 * anything); NULL or "" becomes dflt. */
void keydir_text(char *dst, size_t max, const char *src, const char *dflt);

#endif
