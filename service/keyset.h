/*
 * keyset: the token set a configuration names, opened and judged as the
 * process that holds the tokens does it (the single-process daemon today,
 * the key process with the process wall): open every token, log what
 * serves, and tell whether a reload would take a working token away.
 */
#ifndef SMIMED_KEYSET_H
#define SMIMED_KEYSET_H

#include "service/config.h"
#include "token/token.h"

/* Opens every token of cfg and logs the state of each token and key. NULL
 * (logged) on a configuration error or out of memory; a token that cannot
 * be reached is not an error (token_set_add). */
token_set *keyset_open(const config *cfg);

/* 1 (logged) when a token that serves in now would be down in next: a
 * reload must not take away what works (a PIN typo, a token busy
 * elsewhere). */
int keyset_loses_token(token_set *now, token_set *next);

/* The recovery loop's word on a token changing state (a token_event_fn):
 * the operator's record of when a token went down, why, and when it came
 * back. */
void keyset_log_event(const char *token, const char *state, const char *reason);

#endif
