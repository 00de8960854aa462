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

/* 0 when the module instance behind the probe is not initialised: its
 * C_GetFunctionList handed the probe an instance of its own rather than
 * the one libp11 initialised (p11-kit-client.so opens one connection per
 * instance, and a login on one is not seen on another). Then the probe
 * must use libp11's function list instead (tk_probe_adopt). */
int tk_probe_initialised(const tk_probe *probe);
void tk_probe_adopt(tk_probe *probe, void *function_list);

/* What a probe saw of a token. */
typedef struct tk_token_state {
    unsigned long max_sessions; /* ulMaxSessionCount; 0 for no limit */
    int pin_locked;             /* CKF_USER_PIN_LOCKED */
    int logged_in;              /* this process is logged in to it */
} tk_token_state;

/* Reads the token's info and opens and closes one read-only session on
 * slot_id. Only meaningful once the module is initialised
 * (PKCS11_CTX_load). Returns 0 (CKR_OK), *state filled in, or the module's
 * CKR code. Never blocks beyond the module's own calls. */
unsigned long tk_probe_session(const tk_probe *probe, unsigned long slot_id,
                               tk_token_state *state);

/* Logs this process in as the token's user (CKR_USER_ALREADY_LOGGED_IN
 * counts as done). The login lasts while the process has any session on
 * the token, so on success the session it was made on is left open in
 * *session: close it with tk_probe_end_session once libp11 holds a session
 * of its own (any libp11 call that lists objects opens one). On failure no
 * session is left open. Returns 0 (CKR_OK) or the module's CKR code. */
unsigned long tk_probe_login(const tk_probe *probe, unsigned long slot_id,
                             const char *pin, unsigned long *session);
void tk_probe_end_session(const tk_probe *probe, unsigned long session);

/* 1 when the token in slot_id lists the mechanism, 0 when it does not, -1
 * when the list cannot be read. A remoting layer lists only what it can
 * carry: p11-kit 0.24's client leaves out CKM_ECDH1_DERIVE. */
int tk_probe_has_mechanism(const tk_probe *probe, unsigned long slot_id,
                           unsigned long mechanism);

#define TK_CKM_ECDH1_DERIVE 0x1050UL

/* "CKR_PIN_INCORRECT (0xa0)": the name when known, always the number. */
void tk_ckr_describe(unsigned long rv, char *buf, size_t len);

/*
 * check.c: a known-answer test of a key's operation through libp11.
 */

/* Runs one operation of kind use with pkey (libp11's key) on input of our
 * own and checks the result with pub, the certificate's key: a signature
 * over a random digest, or a decryption (RSA: a random key encrypted to
 * pub; EC: an agreement with a fresh ephemeral key). 1 when the token did
 * it right; 0 when it failed or answered wrong, *ckr then the module's
 * code (0 when it gave none); -1 when the check could not be made (no
 * public key, out of memory). The caller holds an operation slot. Leaves
 * this thread's OpenSSL error queue empty. */
int tk_key_known_answer(EVP_PKEY *pkey, EVP_PKEY *pub, token_use use,
                        unsigned long *ckr);

#define TK_CKR_PIN_INCORRECT 0xa0UL
#define TK_CKR_PIN_INVALID 0xa1UL
#define TK_CKR_PIN_LEN_RANGE 0xa2UL
#define TK_CKR_PIN_EXPIRED 0xa3UL
#define TK_CKR_PIN_LOCKED 0xa4UL
#define TK_CKR_SESSION_COUNT 0xb1UL

#endif
