/*
 * Private to token/: what its files share. Prefix tk_.
 *
 *   module.c    the module registry: one libp11 context per module
 *   login.c     logging in, the PINs the process knows of, the PIN of a
 *               CKA_ALWAYS_AUTHENTICATE key
 *   set.c       opening a token set: tokens, keys, certificates; getters
 *   gate.c      token states and the session gate (acquire, release, the
 *               queue, wait_ms)
 *   recovery.c  fault checks, rebuilding a module, the recovery thread
 *   probe.c     a libp11-free view of a module, through its function list
 *   check.c     a known-answer test of a key
 *   uri.c, pin.c  RFC 7512 URIs, PIN sources
 *
 * The lock order. A thread that holds one of these takes only those below
 * it, never one above:
 *
 *   1. a module's lock (struct tk_module, module.c): every libp11 call on
 *      that module that is not a key operation, its list of tokens and its
 *      PINs: opening a token (token_set_add), freeing a token's keys, a
 *      rebuild, a recovery probe. Never held by one thread for two modules.
 *      A thread that may not wait for a hung module takes it with a bound
 *      (tk_module_lock: it gives up once the holder has been inside longer
 *      than the bound) or only tries (tk_module_trylock).
 *   2. a module's calls (a read-write lock): shared by the probes of
 *      request threads (token_answers), exclusive from a rebuild's
 *      C_Finalize to its last re-open.
 *   3. a token's lock (struct tk_token): its state, counters and queue;
 *      never held across a call into a module, nor across any call out
 *      of token/.
 *   4. tk_registry_lock (module.c): the module list, module references,
 *      the tokens waiting to join or leave a module (tk_module_join_later,
 *      tk_module_retire) and the recovery workers' bookkeeping. Held for a
 *      few loads and stores only; nothing is taken under it.
 *   5. events_lock (gate.c): the state changes not yet told; nothing is
 *      taken under it either.
 *
 * No hook of the service (token_event_fn, token_present_fn) runs under
 * any of them: changes are queued under 3 and told by tk_events_flush
 * once the thread holds none. Key operations hold no lock of token/: the
 * gate admits them (gate.c) and lets go. So a module hung inside a call
 * holds at most its own lock 1 (and its calls shared): what waits for it
 * is its own tokens; docs/DESIGN.md ("The lock order") says how a reload
 * and the recovery of other modules go on.
 */
#ifndef SMIMED_TOKEN_INTERNAL_H
#define SMIMED_TOKEN_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <time.h>

#include <libp11.h>
#include <openssl/ui.h>
/* The PKCS#11 names (CKR_, CKM_, CK_ types): libp11-dev ships no
 * pkcs11.h, p11-kit's is the one Debian installs. */
#include <p11-kit/pkcs11.h>

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

/*
 * The objects token/ is made of.
 */

/* SHA-256, the digest PINs are remembered by. */
#define TK_PIN_DIGEST 32
/* Distinct refused PINs remembered per token; past that, no new PIN is
 * tried at all (a smartcard has locked long before). */
#define TK_REFUSED_MAX 8

/* How many distinct fault reasons a token keeps (see struct tk_reason). */
#define TK_FAULT_REASONS_MAX 16
#define TK_REASON_LEN 200

/* What the process knows of the PIN of one slot's token. A PKCS#11 login
 * belongs to the process, not to a token set, so this lives with the
 * module and outlives the sets of a reload. Digests only, never a PIN. */
struct tk_pins {
    struct tk_pins *next;
    char label[33]; /* the token it is for, as libp11 lists it */
    char serial[17];
    int logged_in; /* we logged in, with the PIN whose digest is good */
    unsigned char good[TK_PIN_DIGEST];
    int locked; /* the token said its PIN is locked */
    unsigned nrefused;
    unsigned char refused[TK_REFUSED_MAX][TK_PIN_DIGEST];
};

/* What a module's recovery worker (recovery.c) is doing; under
 * tk_registry_lock. */
enum tk_worker {
    TK_WORKER_NONE,
    TK_WORKER_RUNNING,
    TK_WORKER_DONE,      /* ended, to be joined */
    TK_WORKER_ABANDONED, /* still inside the module at stop: detached */
};

struct tk_module {
    struct tk_module *next; /* under tk_registry_lock */
    unsigned refs;          /* under tk_registry_lock */
    /* Lock 1 (see the top): the module's libp11 calls. held_since
     * (CLOCK_MONOTONIC ms, atomic) is when its holder took it, so a
     * waiter can tell a holder that is hung from one that is busy. */
    pthread_mutex_t lock;
    long long held_since;
    int initialised; /* its context was made and loaded once */
    /* Tokens that could not take the lock when they joined or left the
     * module (linked by pending_next; under tk_registry_lock): the next
     * holder of the lock adds them to tokens, or frees them. */
    struct tk_token *pending;
    pthread_t worker; /* under tk_registry_lock, as worker_state */
    enum tk_worker worker_state;
    int worker_probe_first;
    char *path;
    tk_probe *probe;
    PKCS11_CTX *ctx;
    int loaded; /* PKCS11_CTX_load succeeded and no unload since */
    /* Listed when the module is loaded, and again only by a rebuild:
     * PKCS11_update_slots would free the PKCS11_SLOT and PKCS11_TOKEN
     * structures the tokens of every set point into. */
    PKCS11_SLOT *slots;
    unsigned int nslots;
    struct tk_pins *pins; /* per token, by label and serial; under lock */
    /* Every published token on the module, of every token set: a rebuild
     * stops and re-opens them all. Under lock. */
    struct tk_token **tokens;
    size_t ntokens;
    /* Counts rebuilds; read by any thread, written under lock with every
     * token of the module drained. */
    unsigned long generation;
    /* Probes from request threads (token_answers) hold it shared; a
     * rebuild holds it exclusively from C_Finalize to the last re-open, so
     * no probe is inside the module while it is finalised (a SoftHSM
     * C_GetTokenInfo racing C_Finalize locks a freed mutex for ever). */
    pthread_rwlock_t calls;
    int calls_ready;
};

enum tk_state {
    TK_READY,
    TK_DOWN,        /* since it was opened; a reload opens it again */
    TK_FAULT,       /* failed at run time; re-probed (see tk_token_ready) */
    TK_PIN_REFUSED, /* never retried: a card locks after a few wrong PINs */
    TK_RECOVERING,  /* its module is being rebuilt */
};

/* A fault reason, kept until the token is freed: token_set_token_ready and
 * token_key_usable hand out the pointer, and a caller may still be reading
 * it when the token changes state again. Each distinct text is kept once. */
struct tk_reason {
    struct tk_reason *next;
    char text[TK_REASON_LEN];
};

/* A request waiting for a session, on its own stack, in its token's queue. */
struct tk_waiter {
    struct tk_waiter *next;
    pthread_cond_t cond; /* CLOCK_MONOTONIC */
};

struct tk_token {
    char *name;
    struct tk_module *module; /* counted reference */
    PKCS11_SLOT *slot;        /* NULL until one token matched the URI */
    unsigned long slot_id;
    token_uri uri; /* selects the token again after a rebuild */
    int optional;
    int discovery;
    int logs_in; /* its keys need our login; probes check it still holds */
    int opened;  /* was ready once: a rebuild re-opens it */
    /* Never opened because it was absent (no token matched, no session
     * opened): a rebuild looks for it, and once it answers the service is
     * asked to reload (opened_fn), which opens it with its keys. */
    int absent;
    int answers_now;
    int published; /* other threads see it: state changes take the lock */
    /* On its module's pending list (under tk_registry_lock): to join the
     * module's tokens, or (pending_dead) to be freed. */
    struct tk_token *pending_next;
    int on_pending;
    int pending_dead;
    /* Where the PIN comes from, read again for a rebuild and for each
     * context-specific login, and the digest of the PIN the configuration
     * was loaded with: only that PIN is ever sent without a reload. */
    char *pin_file;
    char *pin_env;
    int has_pin;
    unsigned char pin_digest[TK_PIN_DIGEST];
    token_key **keys; /* its keys, borrowed from the set */
    size_t nkeys;
    unsigned max_sessions;
    long wait_ms;
    char open_reason[TK_REASON_LEN]; /* why token_set_add left it down */
    size_t nskipped;        /* discovered labels that cannot be names */
    char skipped_first[48]; /* the first of them, cut, for the log */
    pthread_mutex_t lock;
    pthread_cond_t cond;     /* CLOCK_MONOTONIC; module_drain waits on it */
    unsigned in_flight;      /* under lock */
    struct tk_waiter *queue; /* under lock: oldest first */
    struct tk_waiter **queue_tail; /* under lock: where the next one goes */
    enum tk_state state;           /* under lock */
    const char *reason; /* under lock: open_reason or a fault reason */
    struct tk_reason *fault_reasons; /* under lock */
    unsigned nfault_reasons;         /* under lock */
    struct timespec next_probe;      /* under lock, TK_FAULT only */
    unsigned backoff_s;              /* under lock, TK_FAULT only */
    time_t changed;                  /* under lock: last state change */
    token_stats stats;               /* under lock */
};

struct token_key {
    char *name;
    struct tk_token *token;
    /* NULL when the token is down or the key was not found. Replaced by a
     * rebuild only while no operation holds it. */
    EVP_PKEY *pkey;
    char *label;       /* CKA_LABEL and CKA_ID of the object bound: a rebuild */
    unsigned char *id; /* finds the same object again */
    size_t id_len;
    X509 *cert;
    STACK_OF(X509) *chain;
    char algorithm[80];
    char problem[200];     /* a fault found at load that stays; "" for none */
    char sign_problem[80]; /* key usage forbids signing; "" for none */
    char decrypt_problem[120]; /* key usage forbids decryption, or the
                                * token cannot do it */
    int cannot_decrypt; /* the token lacks the mechanism (token_key_supports) */
    time_t not_before;
    time_t not_after;
    char not_yet_valid[80];
    char expired[80];
};

struct token_set {
    struct tk_token **tokens;
    size_t ntokens;
    token_key **keys;
    size_t nkeys;
};

/*
 * module.c: the module registry.
 */

/* Lock 4 (see the top): the module list and what module.c says. */
extern pthread_mutex_t tk_registry_lock;
extern struct tk_module *tk_registry;

/* How long a call may stay inside a module before whoever must not wait
 * for a hung module (a reload opening a token, a request that would
 * rebuild) stops waiting for the module's lock. A rebuild that drains
 * operations holds the lock for up to 5 s; a reload meeting it leaves
 * the token to be opened later rather than wait. */
#define TK_HUNG_MS 2000

/* Describes why the last libp11 call failed and empties the error queue.
 * Returns the CKR code, 0 when the failure did not come from the module. */
unsigned long tk_libp11_failure(char *buf, size_t len);

/* A counted reference to the module at path, made, loaded and its slots
 * listed on first use. 0: *out holds the module's lock too; 1: the module
 * has been inside a call for over TK_HUNG_MS, *out is referenced but not
 * locked; -1: err says why, no reference. Takes no lock on entry. */
int tk_module_get(const char *path, struct tk_module **out, token_error *err);
/* Drops a reference; the last one unloads the module. Holding no lock of
 * token/ for this module. */
void tk_module_put(struct tk_module *m);
/* Lock 1. bound_ms < 0 waits as long as it takes; otherwise -1 once the
 * holder has been inside the module for more than bound_ms. */
int tk_module_lock(struct tk_module *m, long bound_ms);
int tk_module_trylock(struct tk_module *m);
/* Adds the tokens waiting to join, frees those waiting to leave, then
 * lets go of lock 1; the references of the tokens freed are dropped last,
 * so m may be gone when it returns unless the caller holds one of its own. */
void tk_module_unlock(struct tk_module *m);
/* A published token joins m's tokens, now or by the lock's next holder;
 * its module reference is already counted. */
void tk_module_join_later(struct tk_module *m, struct tk_token *t);
/* A published token leaves: it and its keys are freed, and its module
 * reference dropped, now or by the lock's next holder. Never waits. */
void tk_module_retire(struct tk_module *m, struct tk_token *t);
/* Under the module's lock. */
int tk_module_load(struct tk_module *m, token_error *err);
int tk_module_remember(struct tk_module *m, struct tk_token *t);
void tk_module_forget(struct tk_module *m, const struct tk_token *t);
PKCS11_SLOT *tk_module_find_slot(struct tk_module *m, const token_uri *u);
int tk_slot_matches(const token_uri *u, PKCS11_SLOT *slot);

/* set.c: frees a published token and its keys, not its module reference.
 * Under the module's lock. */
void tk_token_discard(struct tk_token *t);

/*
 * login.c: logging in and PINs.
 */

int tk_pin_digest(const char *pin, unsigned char d[TK_PIN_DIGEST]);
int tk_token_login(struct tk_token *t, char **pin, const tk_token_state *st,
                   unsigned long *session, int *holding, token_error *err);
char *tk_token_pin_again(const struct tk_token *t, char *why, size_t len);
/* The UI libp11 asks for the PIN of a CKA_ALWAYS_AUTHENTICATE key; NULL
 * when it could not be made. */
UI_METHOD *tk_login_ui_method(void);

/*
 * gate.c: token states and the session gate.
 */

extern token_event_fn tk_event_fn;
extern token_present_fn tk_present_fn;
extern __thread struct tk_token *tk_op_token;
extern __thread const struct tk_token *tk_op_last;
extern __thread unsigned long tk_op_generation;
extern __thread token_use tk_op_use;

/* Queues the word to tk_present_fn that token answers now. */
void tk_event_present(const char *token);
/* Tells the hooks what was queued. Called with no lock of token/ held:
 * by every public function that may have changed a published token's
 * state, before it returns, and by the recovery thread. */
void tk_events_flush(void);

void tk_wake_all(struct tk_token *t);
void tk_token_set_state(struct tk_token *t, enum tk_state state);
__attribute__((format(printf, 3, 4))) void
tk_token_down(struct tk_token *t, enum tk_state state, const char *fmt, ...);
void tk_token_set_fault_reason(struct tk_token *t, const char *text);
int tk_token_ready(struct tk_token *t, int recovering_too, const char **reason);
int tk_acquire_slot(token_key *key, token_use use, EVP_PKEY **pkey, int check,
                    token_error *err);

/*
 * recovery.c
 */

void tk_schedule_recovery(struct tk_token *t);

/* Now plus ms on clock (CLOCK_REALTIME for pthread_cond_timedwait). */
static inline struct timespec tk_deadline_after(clockid_t clock, long ms)
{
    struct timespec t;

    clock_gettime(clock, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

#endif
