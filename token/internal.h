/*
 * Private to token/: the pieces token.c shares with uri.c, pin.c and
 * probe.c. Prefix tk_.
 */
#ifndef SMIMED_TOKEN_INTERNAL_H
#define SMIMED_TOKEN_INTERNAL_H

#include <stddef.h>

#include "token/token.h"

/* Fills err (when given) and empties this thread's OpenSSL error queue, so
 * a failure never leaves stale entries for the next, unrelated caller. */
__attribute__((format(printf, 3, 4))) void
tk_error(token_error *err, token_status status, const char *fmt, ...);

/*
 * probe.c: a second, libp11-free view of a PKCS#11 module, through the
 * module's own function list.
 */
typedef struct tk_probe tk_probe;

/* dlopens the module before libp11 does, so an unloadable path is reported
 * with dlerror's reason (libp11 would print it to stderr). TOKEN_ERR_CONFIG
 * when the file cannot be loaded or is not a PKCS#11 module. */
tk_probe *tk_probe_open(const char *path, token_error *err);
void tk_probe_close(tk_probe *probe);

/* 1 when both name the same loaded module (whatever path reached it). */
int tk_probe_same_module(const tk_probe *a, const tk_probe *b);

/* Opens and closes one read-only session on slot_id. Only meaningful once
 * the module is initialised (PKCS11_CTX_load). Returns 0 (CKR_OK) or the
 * module's CKR code; on success *max_sessions is the token's
 * ulMaxSessionCount, 0 when the token reports no limit. */
unsigned long tk_probe_session(const tk_probe *probe, unsigned long slot_id,
                               unsigned long *max_sessions);

/* "CKR_PIN_INCORRECT (0xa0)": the name when known, always the number. */
void tk_ckr_describe(unsigned long rv, char *buf, size_t len);

#define TK_CKR_PIN_INCORRECT 0xa0UL
#define TK_CKR_PIN_INVALID 0xa1UL
#define TK_CKR_PIN_LEN_RANGE 0xa2UL
#define TK_CKR_PIN_EXPIRED 0xa3UL
#define TK_CKR_PIN_LOCKED 0xa4UL

#endif
