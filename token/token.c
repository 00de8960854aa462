/*
 * Keeping libp11 off every path that can hang
 *
 * libp11 0.4.12 gives each operation a session from a per-slot pool of at
 * most 16 (src/p11_slot.c: slot->max_sessions = 16, pkcs11_get_session).
 * When the pool is empty it calls C_OpenSession; if that fails with
 * anything but CKR_SESSION_COUNT (or with CKR_SESSION_COUNT while libp11
 * holds no session at all) it waits on a condition variable, without a
 * timeout, for a session that an operation in flight will give back. With
 * nothing in flight nothing ever does, and the thread hangs. The pool is
 * empty with nothing in flight exactly when libp11 has not used the slot
 * yet (or has reset the pool, which it does after a fork), so the
 * dangerous call is the first one that needs a session on a fresh
 * context: the first key or certificate enumeration.
 *
 * So before that first call, probe.c opens and closes one session through
 * the module's own function list (dlopen of the module path returns the
 * module libp11 already initialised). If the module cannot open a session
 * for the token, the token is marked down with the CKR code and libp11 is
 * never asked for a session on that slot. Once libp11 has used the slot,
 * its pool holds a session or the session is out with an operation that
 * will return it (libp11 closes sessions only when the slot is released),
 * so a later failing C_OpenSession is always woken; operations on a dead
 * token then fail with the module's error instead of blocking.
 *
 * The login goes through the function list as well (probe.c says why
 * libp11 0.4.12 allows it), so libp11 never holds the PIN, on a session of
 * our own that stays open until libp11's first enumeration has a session
 * in the pool: a PKCS#11 login ends with the process's last session on the
 * token. That needs two sessions at once, so a token that allows only one
 * cannot be logged in to. The module registry keeps, per slot, the SHA-256
 * of the PIN the process logged in with and of every PIN the token
 * refused (never a PIN): a refused PIN is never sent again, and neither is
 * any PIN while the process is logged in (the token would not check it).
 *
 * The pool's own wait is also kept out of the request path: a counting
 * semaphore per token (a mutex, a count and a queue of waiters) admits at
 * most max_sessions operations, never more than libp11's 16 and never more
 * than the token's ulMaxSessionCount, so libp11 always finds or can open a
 * session, and the requests beyond that wait in the queue with a deadline
 * (CLOCK_MONOTONIC) and fail with TOKEN_ERR_BUSY. There is no lock around
 * the operations themselves.
 *
 * The queue is first come, first served: only its head may take a free
 * slot, and a newcomer queues behind anyone waiting even when a slot is
 * free. With every waiter on one condition variable, whichever thread got
 * the mutex first after a release took the slot, and under load some
 * requests waited many times longer than the rest (script/bench: p99 six
 * times p50 at 32 connections). Each waiter sleeps on a condition variable
 * of its own (on its stack), so a release wakes the head alone: a ticket
 * counter on the shared one would be as fair, but every release would wake
 * every waiter (over a hundred threads at 128 connections) to find the one
 * whose turn it is, and a waiter that timed out would leave a hole in the
 * tickets. A change of state wakes every waiter (wake_all): a fault fails
 * them, a rebuild's outcome lets them go or fail, and while the token is
 * TK_RECOVERING they keep their places. The shared condition variable
 * t->cond is left to module_drain, which waits on it for in_flight to
 * reach 0; a release broadcasts it while the token is not ready.
 *
 * There is one PKCS11_CTX per loaded module in the whole process, kept in a
 * reference-counted registry and shared by every token_set: a configuration
 * reload builds a new set while the old one still serves, and a second
 * context on the same module would C_Finalize it, or C_CloseAllSessions on
 * its slots, under the first one's feet, leaving libp11 with dead session
 * handles. Modules are matched by dlopen handle, so two paths to one file
 * share a context too. (While two sets overlap they may together ask for
 * more than 16 sessions on one slot; the excess waits in libp11 for
 * operations in flight, which is bounded.)
 *
 * Faults at run time. A failed key operation does not say whether the
 * token broke (OpenSSL's CMS even hides decryption errors), so the caller
 * asks token_key_check_fault, which probes the token through the function
 * list: a session must open, and a token we logged in to must still show
 * the process logged in. A token that does not answer goes down (TK_FAULT)
 * and waiters in token_key_acquire fail at once; the recovery thread then
 * rebuilds its module's context with back-off (1 s, doubling to 30 s). A
 * token that answers but logged us out was reset: libp11's pooled
 * sessions are dead, so the caller rebuilds the module at once and
 * retries its operation. A token that passes the probe may still have
 * dead libp11 handles (sessions gone while the login stayed): check.c
 * runs the same kind of operation once more, on input of our own, through
 * libp11's key; a CKR code of dead handles gets the same rebuild and
 * retry, any other failure makes the operation the token's fault (a 503,
 * the token stays up), and only a check that works leaves the failure to
 * the operation itself. A rebuild (module_rebuild) stops and drains every
 * token of the module, of every token set, then PKCS11_CTX_unload,
 * PKCS11_CTX_load, and re-opens each token in the order above: probe, log
 * in through the function list, and only then let libp11 list the keys.
 * Tokens that were down from the start (TK_DOWN) are not re-opened in
 * place: if they were absent, a rebuild looks for them and the service is
 * asked to reload once they answer (token_look_again). A refused or locked
 * PIN (TK_PIN_REFUSED) is never tried again with the same PIN.
 *
 * What this does not cover: a token that vanishes in the moment between
 * the probe and libp11's first C_OpenSession; and fork, after which libp11
 * re-initialises the module and opens sessions without a probe (and,
 * since libp11 did not do the login, without logging in). Token sets are
 * therefore created after any fork and never used across one.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* timegm */
#endif
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ui.h>
#include <openssl/x509v3.h>

#include "token/internal.h"

/* libp11 0.4.12's fixed per-slot session limit (see above). */
#define TK_LIBP11_SESSIONS 16

/* SHA-256, the digest PINs are remembered by. */
#define TK_PIN_DIGEST 32
/* Distinct refused PINs remembered per token; past that, no new PIN is
 * tried at all (a smartcard has locked long before). */
#define TK_REFUSED_MAX 8

/* Re-probing a token that went down at run time: first after 1 s, then
 * after twice the last wait, at most 30 s. */
#define TK_BACKOFF_FIRST_S 1
#define TK_BACKOFF_MAX_S 30

/* How long a rebuild waits for the operations in flight on the module's
 * tokens to finish before it gives up and tries again later. */
#define TK_DRAIN_MS 5000

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

struct tk_module {
    struct tk_module *next;
    unsigned refs;
    char *path;
    tk_probe *probe;
    PKCS11_CTX *ctx;
    int loaded; /* PKCS11_CTX_load succeeded and no unload since */
    /* Listed when the module is loaded, and again only by a rebuild:
     * PKCS11_update_slots would free the PKCS11_SLOT and PKCS11_TOKEN
     * structures the tokens of every set point into. */
    PKCS11_SLOT *slots;
    unsigned int nslots;
    struct tk_pins *pins; /* per token, by label and serial */
    /* Every published token on the module, of every token set: a rebuild
     * stops and re-opens them all. */
    struct tk_token **tokens;
    size_t ntokens;
    /* Counts rebuilds; read by any thread, written under registry_lock
     * with every token of the module drained. */
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
    TK_FAULT,       /* failed at run time; re-probed (see token_ready) */
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

/* Guards the module list and every libp11 call that is not a key
 * operation: libp11 0.4.12 does not lock its per-slot key and certificate
 * caches, and token sets may be built and freed from different threads. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tk_module *registry;

/* Told of every state change of a published token, and of a token absent
 * at load that answers now (token_recovery_start). */
static token_event_fn event_fn;
static token_present_fn present_fn;

static void schedule_recovery(struct tk_token *t);

static int module_remember(struct tk_module *m, struct tk_token *t);
static void module_forget(struct tk_module *m, const struct tk_token *t);
static void token_set_fault_reason(struct tk_token *t, const char *text);

/* The state as the outside sees it. Under t->lock. */
static token_state state_public(const struct tk_token *t)
{
    switch (t->state) {
    case TK_READY:
        return t->in_flight >= t->max_sessions ? TOKEN_STATE_BUSY
                                               : TOKEN_STATE_READY;
    case TK_PIN_REFUSED:
        return TOKEN_STATE_PIN_REJECTED;
    case TK_RECOVERING:
        return TOKEN_STATE_RECOVERING;
    case TK_DOWN:
    case TK_FAULT:
        break;
    }
    return TOKEN_STATE_DOWN;
}

const char *token_state_name(token_state state)
{
    static const char *const names[] = {
        [TOKEN_STATE_READY] = "ready",
        [TOKEN_STATE_DOWN] = "down",
        [TOKEN_STATE_BUSY] = "busy",
        [TOKEN_STATE_PIN_REJECTED] = "pin_rejected",
        [TOKEN_STATE_RECOVERING] = "recovering",
    };

    return (unsigned)state < sizeof(names) / sizeof(names[0]) ? names[state]
                                                              : "down";
}

void tk_error(token_error *err, token_status status, const char *fmt, ...)
{
    va_list ap;

    ERR_clear_error();
    if (err == NULL)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

/* Prefixes err->message with the thing it concerns ("token hsm: ..."),
 * cutting the end of the message when the whole does not fit. */
static void error_context(token_error *err, const char *what, const char *name)
{
    char msg[sizeof(err->message)];
    size_t len, room;
    int n;

    if (err == NULL)
        return;
    n = snprintf(msg, sizeof(msg), "%s %s: ", what, name);
    if (n < 0 || (size_t)n >= sizeof(msg))
        return;
    room = sizeof(msg) - 1 - (size_t)n;
    len = strnlen(err->message, sizeof(err->message));
    if (len > room)
        len = room;
    memcpy(msg + n, err->message, len);
    msg[(size_t)n + len] = '\0';
    memcpy(err->message, msg, sizeof(msg));
}

/* Describes why the last libp11 call failed and empties the error queue.
 * Returns the CKR code, 0 when the failure did not come from the module. */
static unsigned long libp11_failure(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    unsigned long rv = 0;

    if (e != 0 && (int)ERR_GET_LIB(e) == ERR_get_CKR_code()) {
        rv = (unsigned long)ERR_GET_REASON(e);
        tk_ckr_describe(rv, buf, len);
    } else if (e != 0 && ERR_reason_error_string(e) != NULL) {
        snprintf(buf, len, "%s", ERR_reason_error_string(e));
    } else {
        snprintf(buf, len, "unknown error");
    }
    ERR_clear_error();
    return rv;
}

/* ---- modules (registry_lock held) ---- */

static void module_put(struct tk_module *m)
{
    struct tk_module **p;

    if (m == NULL || --m->refs > 0)
        return;
    for (p = &registry; *p != m; p = &(*p)->next)
        ;
    *p = m->next;
    while (m->pins != NULL) {
        struct tk_pins *next = m->pins->next;

        OPENSSL_cleanse(m->pins, sizeof(*m->pins));
        free(m->pins);
        m->pins = next;
    }
    if (m->slots != NULL)
        PKCS11_release_all_slots(m->ctx, m->slots, m->nslots);
    if (m->loaded)
        PKCS11_CTX_unload(m->ctx);
    if (m->ctx != NULL)
        PKCS11_CTX_free(m->ctx);
    tk_probe_close(m->probe);
    if (m->calls_ready)
        pthread_rwlock_destroy(&m->calls);
    free(m->tokens);
    free(m->path);
    free(m);
}

/* What the process knows of the PIN of the token in slot, created on
 * first use; NULL without memory. Kept by label and serial, not by slot,
 * so that it survives a rebuild that lists the slots in another order. */
static struct tk_pins *pins_for(struct tk_module *m, const PKCS11_SLOT *slot)
{
    const char *label = slot->token->label ? slot->token->label : "";
    const char *serial = slot->token->serialnr ? slot->token->serialnr : "";
    struct tk_pins *p;

    for (p = m->pins; p != NULL; p = p->next) {
        if (strncmp(p->label, label, sizeof(p->label) - 1) == 0 &&
            strncmp(p->serial, serial, sizeof(p->serial) - 1) == 0)
            return p;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    snprintf(p->label, sizeof(p->label), "%s", label);
    snprintf(p->serial, sizeof(p->serial), "%s", serial);
    p->next = m->pins;
    m->pins = p;
    return p;
}

static pthread_once_t ui_once = PTHREAD_ONCE_INIT;
static void ui_method_init(void);
static UI_METHOD *ui_method;

/* The CK_FUNCTION_LIST libp11 calls through. libp11 0.4.12 has no accessor
 * for it; its private context (src/libp11-int.h, PKCS11_CTX_private)
 * starts with that pointer, "CK_FUNCTION_LIST_PTR method". Used only for a
 * module that hands each C_GetFunctionList caller an instance of its own
 * (p11-kit-client.so), where the probe and the login must go through
 * libp11's instance to see libp11's sessions; tk_probe_initialised checks
 * the result before it is trusted. */
static void *libp11_function_list(PKCS11_CTX *ctx)
{
    return ctx->_private != NULL ? *(void **)ctx->_private : NULL;
}

/* Writers first: probes come from every failed request, and a rebuild
 * must not wait behind a stream of them. */
static int module_init_lock(struct tk_module *m)
{
    pthread_rwlockattr_t attr;
    int ok;

    if (pthread_rwlockattr_init(&attr) != 0)
        return -1;
    ok = pthread_rwlockattr_setkind_np(
             &attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP) == 0 &&
         pthread_rwlock_init(&m->calls, &attr) == 0;
    pthread_rwlockattr_destroy(&attr);
    m->calls_ready = ok;
    return ok ? 0 : -1;
}

/* Loads the module into m->ctx and lists its slots. */
static int module_load(struct tk_module *m, token_error *err)
{
    char why[96];

    /* libp11 0.4.12's load sets these two without freeing what an earlier
     * load of the same context set: a rebuild would leak them. */
    OPENSSL_free(m->ctx->manufacturer);
    OPENSSL_free(m->ctx->description);
    m->ctx->manufacturer = NULL;
    m->ctx->description = NULL;
    if (PKCS11_CTX_load(m->ctx, m->path) < 0) {
        libp11_failure(why, sizeof(why));
        tk_error(err, TOKEN_ERR_CONFIG,
                 "cannot initialise PKCS#11 module %s: %s", m->path, why);
        return -1;
    }
    m->loaded = 1;
    if (!tk_probe_initialised(m->probe)) {
        tk_probe_adopt(m->probe, libp11_function_list(m->ctx));
        if (!tk_probe_initialised(m->probe)) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 module %s: its function list cannot be "
                     "reached beside libp11",
                     m->path);
            return -1;
        }
    }
    if (PKCS11_enumerate_slots(m->ctx, &m->slots, &m->nslots) < 0) {
        libp11_failure(why, sizeof(why));
        m->slots = NULL;
        m->nslots = 0;
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 module %s: cannot list slots: %s", m->path, why);
        return -1;
    }
    return 0;
}

/* A counted reference to the module at path, loaded and its slots listed
 * on first use. */
static int module_get(const char *path, struct tk_module **out,
                      token_error *err)
{
    struct tk_module *m = NULL;
    tk_probe *probe;
    int r = -1;

    probe = tk_probe_open(path, err);
    if (probe == NULL)
        goto out;
    for (m = registry; m != NULL; m = m->next) {
        if (tk_probe_same_module(m->probe, probe))
            break;
    }
    if (m != NULL) {
        m->refs++;
        *out = m;
        m = NULL;
        r = 0;
        goto out;
    }
    m = calloc(1, sizeof(*m));
    if (m == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    m->probe = probe;
    probe = NULL;
    m->refs = 1;
    m->next = registry;
    registry = m;
    if (module_init_lock(m) < 0) {
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot create a lock");
        goto out;
    }
    m->path = strdup(path);
    m->ctx = PKCS11_CTX_new();
    if (m->path == NULL || m->ctx == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    /* libp11 asks this UI for the PIN of a CKA_ALWAYS_AUTHENTICATE key
     * at each operation (see tk_ui_read). */
    pthread_once(&ui_once, ui_method_init);
    if (ui_method != NULL)
        PKCS11_set_ui_method(m->ctx, ui_method, NULL);
    if (module_load(m, err) < 0)
        goto out;
    *out = m;
    m = NULL;
    r = 0;
out:
    module_put(m);
    tk_probe_close(probe);
    return r;
}

/* ---- certificates ---- */

static void chain_free(STACK_OF(X509) *chain)
{
    sk_X509_pop_free(chain, X509_free);
}

static int load_cert(const char *path, X509 **out, token_error *err)
{
    X509 *cert = NULL;
    BIO *bio;

    bio = BIO_new_file(path, "r");
    if (bio == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "cannot open certificate file %s",
                 path);
        return -1;
    }
    cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (cert == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "%s does not hold a PEM certificate",
                 path);
        return -1;
    }
    *out = cert;
    return 0;
}

static int load_chain(const char *path, STACK_OF(X509) **out, token_error *err)
{
    STACK_OF(X509) *chain = NULL;
    X509 *cert;
    BIO *bio;
    int r = -1;

    bio = BIO_new_file(path, "r");
    if (bio == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "cannot open chain file %s", path);
        goto out;
    }
    chain = sk_X509_new_null();
    if (chain == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    while ((cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (!sk_X509_push(chain, cert)) {
            X509_free(cert);
            tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
            goto out;
        }
    }
    /* The loop ends on end of input or on a damaged block; only the
     * first is fine. */
    if (ERR_GET_REASON(ERR_peek_last_error()) != PEM_R_NO_START_LINE ||
        sk_X509_num(chain) == 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "%s is not a bundle of PEM certificates", path);
        goto out;
    }
    ERR_clear_error();
    *out = chain;
    chain = NULL;
    r = 0;
out:
    chain_free(chain);
    BIO_free(bio);
    return r;
}

static int asn1_to_time(const ASN1_TIME *t, time_t *out)
{
    struct tm tm;

    if (t == NULL || !ASN1_TIME_to_tm(t, &tm))
        return -1;
    *out = timegm(&tm);
    return 0;
}

static void format_time(time_t t, char *buf, size_t len)
{
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Validity is judged at each use, not at load: a daemon runs past its
 * certificates' expiry. The messages are prepared here so token_key_usable
 * can hand out stable strings without allocating. */
static void key_set_dates(token_key *k)
{
    char when[32];

    if (asn1_to_time(X509_get0_notBefore(k->cert), &k->not_before) < 0 ||
        asn1_to_time(X509_get0_notAfter(k->cert), &k->not_after) < 0) {
        ERR_clear_error();
        if (k->problem[0] == '\0')
            snprintf(k->problem, sizeof(k->problem),
                     "certificate has an unreadable validity period");
        return;
    }
    format_time(k->not_before, when, sizeof(when));
    snprintf(k->not_yet_valid, sizeof(k->not_yet_valid),
             "certificate is not valid before %s", when);
    format_time(k->not_after, when, sizeof(when));
    snprintf(k->expired, sizeof(k->expired), "certificate expired on %s", when);
}

/* The curve of an EC key as "ec-p256"; "ec" when it cannot be told. */
static void ec_algorithm(EVP_PKEY *pk, char *buf, size_t len)
{
    unsigned char *der = NULL;
    const unsigned char *p;
    EVP_PKEY *pub = NULL;
    char group[64];
    int n;

    /* libp11's keys are legacy EC_KEYs, on which OpenSSL 3.0's
     * EVP_PKEY_get_group_name fails; a copy of the public key decoded from
     * DER is a provider key that answers. */
    n = i2d_PUBKEY(pk, &der);
    if (n > 0) {
        p = der;
        pub = d2i_PUBKEY(NULL, &p, n);
    }
    if (pub == NULL ||
        !EVP_PKEY_get_group_name(pub, group, sizeof(group), NULL))
        snprintf(buf, len, "ec");
    else if (strcmp(group, "prime256v1") == 0)
        snprintf(buf, len, "ec-p256");
    else if (strcmp(group, "secp384r1") == 0)
        snprintf(buf, len, "ec-p384");
    else if (strcmp(group, "secp521r1") == 0)
        snprintf(buf, len, "ec-p521");
    else
        snprintf(buf, len, "ec-%s", group);
    EVP_PKEY_free(pub);
    OPENSSL_free(der);
}

static void key_set_algorithm(token_key *k)
{
    EVP_PKEY *pk = k->pkey != NULL ? k->pkey : X509_get0_pubkey(k->cert);

    if (pk != NULL && EVP_PKEY_get_base_id(pk) == EVP_PKEY_RSA)
        snprintf(k->algorithm, sizeof(k->algorithm), "rsa-%d",
                 EVP_PKEY_get_bits(pk));
    else if (pk != NULL && EVP_PKEY_get_base_id(pk) == EVP_PKEY_EC)
        ec_algorithm(pk, k->algorithm, sizeof(k->algorithm));
    else
        snprintf(k->algorithm, sizeof(k->algorithm), "unknown");
    ERR_clear_error();
}

/* The faults that do not go away by themselves. The first one found is
 * the reason given. */
static void key_check_cert(token_key *k)
{
    EVP_PKEY *pub = X509_get0_pubkey(k->cert);
    uint32_t flags;

    /* For RSA the private key's public half is read from the private key
     * object itself (CKA_MODULUS, CKA_PUBLIC_EXPONENT). For EC libp11 takes
     * the point from the same-ID public key object, or failing that from
     * the same-ID certificate on the token: with neither a public key
     * object nor CKA_EC_POINT on the private key, a certificate from the
     * token is compared with itself. */
    if (pub == NULL || EVP_PKEY_eq(pub, k->pkey) != 1) {
        snprintf(k->problem, sizeof(k->problem),
                 "certificate does not match the private key");
        goto out;
    }
    /* Computes the cached extension flags read below. */
    X509_check_purpose(k->cert, -1, 0);
    flags = X509_get_extension_flags(k->cert);
    if (flags & EXFLAG_INVALID) {
        snprintf(k->problem, sizeof(k->problem),
                 "certificate has invalid extensions");
        goto out;
    }
    if ((flags & EXFLAG_KUSAGE) &&
        !(X509_get_key_usage(k->cert) &
          (KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION)))
        snprintf(k->sign_problem, sizeof(k->sign_problem),
                 "certificate key usage does not allow digitalSignature");
    /* RSA decrypts a transported key, EC agrees on one (ECDH) */
    if ((flags & EXFLAG_KUSAGE) && EVP_PKEY_get_base_id(pub) == EVP_PKEY_EC &&
        !(X509_get_key_usage(k->cert) & KU_KEY_AGREEMENT))
        snprintf(k->decrypt_problem, sizeof(k->decrypt_problem),
                 "certificate key usage does not allow keyAgreement");
    else if ((flags & EXFLAG_KUSAGE) &&
             EVP_PKEY_get_base_id(pub) != EVP_PKEY_EC &&
             !(X509_get_key_usage(k->cert) & KU_KEY_ENCIPHERMENT))
        snprintf(k->decrypt_problem, sizeof(k->decrypt_problem),
                 "certificate key usage does not allow keyEncipherment");
    if ((flags & EXFLAG_XKUSAGE) &&
        !(X509_get_extended_key_usage(k->cert) & (XKU_SMIME | XKU_ANYEKU))) {
        snprintf(k->problem, sizeof(k->problem),
                 "certificate extended key usage does not include "
                 "emailProtection");
        goto out;
    }
out:
    ERR_clear_error();
}

/* ---- keys ---- */

static void key_free(token_key *k)
{
    if (k == NULL)
        return;
    EVP_PKEY_free(k->pkey);
    X509_free(k->cert);
    chain_free(k->chain);
    free(k->label);
    free(k->id);
    free(k->name);
    free(k);
}

static token_key *key_new(const char *name, struct tk_token *t,
                          STACK_OF(X509) *chain, token_error *err)
{
    token_key *k = calloc(1, sizeof(*k));

    if (k == NULL || (k->name = strdup(name)) == NULL ||
        (chain != NULL && (k->chain = X509_chain_up_ref(chain)) == NULL)) {
        key_free(k);
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    k->token = t;
    snprintf(k->algorithm, sizeof(k->algorithm), "unknown");
    return k;
}

static int key_matches(const token_uri *u, const PKCS11_KEY *pk)
{
    if (u->object != NULL &&
        (pk->label == NULL || strcmp(u->object, pk->label) != 0))
        return 0;
    if (u->id != NULL &&
        (pk->id_len != u->id_len || memcmp(pk->id, u->id, u->id_len) != 0))
        return 0;
    return 1;
}

/* The token's certificate for a key: same CKA_ID; of several (a renewal
 * next to the old one), the one that expires last. */
static X509 *token_cert_for(const PKCS11_KEY *pk, const PKCS11_CERT *certs,
                            unsigned ncerts)
{
    X509 *best = NULL;
    unsigned i;

    if (pk->id_len == 0)
        return NULL;
    for (i = 0; i < ncerts; i++) {
        X509 *x = certs[i].x509;

        if (x == NULL || certs[i].id_len != pk->id_len ||
            memcmp(certs[i].id, pk->id, pk->id_len) != 0)
            continue;
        if (best == NULL || ASN1_TIME_compare(X509_get0_notAfter(x),
                                              X509_get0_notAfter(best)) > 0)
            best = x;
    }
    return best;
}

/* Attaches a private key found on the token, and its certificate when none
 * was configured, then checks the pair. Faults land in k->problem. */
static void key_bind(token_key *k, PKCS11_KEY *pk, const PKCS11_CERT *certs,
                     unsigned ncerts)
{
    char why[96];
    X509 *cert;

    k->pkey = PKCS11_get_private_key(pk);
    if (k->pkey == NULL) {
        libp11_failure(why, sizeof(why));
        snprintf(k->problem, sizeof(k->problem),
                 "cannot read the private key: %s", why);
        return;
    }
    /* Without them a rebuild cannot find the key again and leaves it
     * unusable (token_key_acquire checks pkey). */
    free(k->label);
    free(k->id);
    k->label = pk->label != NULL ? strdup(pk->label) : NULL;
    k->id = pk->id_len > 0 ? malloc(pk->id_len) : NULL;
    k->id_len = k->id != NULL ? pk->id_len : 0;
    if (k->id != NULL)
        memcpy(k->id, pk->id, pk->id_len);
    if (k->cert == NULL) {
        cert = token_cert_for(pk, certs, ncerts);
        if (cert == NULL) {
            snprintf(k->problem, sizeof(k->problem),
                     "no certificate with the key's CKA_ID on the token");
            return;
        }
        X509_up_ref(cert);
        k->cert = cert;
        key_set_dates(k);
    }
    key_set_algorithm(k);
    key_check_cert(k);
}

/* ---- tokens ---- */

static void token_free(struct tk_token *t)
{
    struct tk_reason *r;

    if (t == NULL)
        return;
    while ((r = t->fault_reasons) != NULL) {
        t->fault_reasons = r->next;
        free(r);
    }
    module_forget(t->module, t);
    module_put(t->module);
    token_uri_clear(&t->uri);
    free(t->pin_file);
    free(t->pin_env);
    free(t->keys);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t->name);
    free(t);
}

static struct tk_token *token_new(const token_spec *spec, token_error *err)
{
    struct tk_token *t = calloc(1, sizeof(*t));
    pthread_condattr_t attr;
    int ok;

    if (t == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    ok = pthread_condattr_init(&attr) == 0;
    if (ok) {
        ok = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) == 0 &&
             pthread_cond_init(&t->cond, &attr) == 0;
        pthread_condattr_destroy(&attr);
    }
    if (ok && pthread_mutex_init(&t->lock, NULL) != 0) {
        pthread_cond_destroy(&t->cond);
        ok = 0;
    }
    if (!ok) {
        free(t);
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot create a condition variable");
        return NULL;
    }
    if ((spec->pin_file != NULL &&
         (t->pin_file = strdup(spec->pin_file)) == NULL) ||
        (spec->pin_env != NULL &&
         (t->pin_env = strdup(spec->pin_env)) == NULL)) {
        token_free(t);
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    t->queue_tail = &t->queue;
    t->optional = spec->optional;
    t->discovery = spec->discovery;
    t->max_sessions =
        spec->max_sessions == 0 || spec->max_sessions > TK_LIBP11_SESSIONS
            ? TK_LIBP11_SESSIONS
            : (unsigned)spec->max_sessions;
    /* Taken as given, 0 included (fail at once when every session is in
     * use): the configuration layer supplies the 5000 ms default. */
    t->wait_ms = spec->wait_ms;
    t->state = TK_DOWN;
    t->changed = time(NULL);
    snprintf(t->open_reason, sizeof(t->open_reason), "not opened");
    t->reason = t->open_reason;
    return t;
}

/* Under t->lock: after a change of state, every waiter looks again (see
 * the top of this file), and so does a rebuild's drain. */
static void wake_all(struct tk_token *t)
{
    struct tk_waiter *w;

    for (w = t->queue; w != NULL; w = w->next)
        pthread_cond_signal(&w->cond);
    pthread_cond_broadcast(&t->cond);
}

/* Under t->lock once published: the state, its time, and word to the
 * event hook. */
static void token_set_state(struct tk_token *t, enum tk_state state)
{
    token_event_fn fn;

    if (t->state == state)
        return;
    t->state = state;
    t->changed = time(NULL);
    fn = __atomic_load_n(&event_fn, __ATOMIC_ACQUIRE);
    if (t->published && fn != NULL)
        fn(t->name, token_state_name(state_public(t)),
           state == TK_READY ? NULL : t->reason);
}

/* Marks the token down with a reason: while token_set_add opens it, in
 * open_reason; once other threads see it (a rebuild re-opening it), under
 * its lock in a kept reason. */
__attribute__((format(printf, 3, 4))) static void
token_down(struct tk_token *t, enum tk_state state, const char *fmt, ...)
{
    char why[TK_REASON_LEN];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    ERR_clear_error();
    if (!t->published) {
        t->state = state;
        snprintf(t->open_reason, sizeof(t->open_reason), "%s", why);
        t->reason = t->open_reason;
        return;
    }
    pthread_mutex_lock(&t->lock);
    token_set_fault_reason(t, why);
    token_set_state(t, state);
    wake_all(t);
    pthread_mutex_unlock(&t->lock);
}

/* An attribute the URI does not give matches anything. libp11 has already
 * cut the blank padding off the token's fixed-width fields. */
static int field_matches(const char *want, const char *have)
{
    return want == NULL || (have != NULL && strcmp(want, have) == 0);
}

static int slot_matches(const token_uri *u, PKCS11_SLOT *slot)
{
    const PKCS11_TOKEN *tok = slot->token;

    if (tok == NULL || !tok->initialized)
        return 0;
    if (u->has_slot_id && u->slot_id != PKCS11_get_slotid_from_slot(slot))
        return 0;
    return field_matches(u->token, tok->label) &&
           field_matches(u->manufacturer, tok->manufacturer) &&
           field_matches(u->serial, tok->serialnr) &&
           field_matches(u->model, tok->model);
}

/* Everything token_set_add gathers before the token joins the set. */
struct tk_build {
    token_set *set;
    const token_spec *spec;
    token_uri uri;
    struct tk_token *tok;
    STACK_OF(X509) *chain; /* the token's default chain */
    token_uri *key_uris;   /* one per spec->keys entry */
    token_key **keys;      /* configured keys first, then discovered ones */
    size_t nkeys;
    size_t cap;
};

static void build_clear(struct tk_build *b)
{
    size_t i;

    for (i = 0; i < b->nkeys; i++)
        key_free(b->keys[i]);
    free(b->keys);
    if (b->key_uris != NULL) {
        for (i = 0; i < b->spec->nkeys; i++)
            token_uri_clear(&b->key_uris[i]);
        free(b->key_uris);
    }
    chain_free(b->chain);
    token_free(b->tok);
    token_uri_clear(&b->uri);
}

static int build_push_key(struct tk_build *b, token_key *k, token_error *err)
{
    if (b->nkeys == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 8;
        token_key **keys = realloc(b->keys, cap * sizeof(*keys));

        if (keys == NULL) {
            key_free(k);
            tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
            return -1;
        }
        b->keys = keys;
        b->cap = cap;
    }
    b->keys[b->nkeys++] = k;
    return 0;
}

static int build_name_taken(const struct tk_build *b, const char *name)
{
    size_t i;

    for (i = 0; i < b->nkeys; i++) {
        if (strcmp(b->keys[i]->name, name) == 0)
            return 1;
    }
    return token_set_find_key(b->set, name) != NULL;
}

static int check_spec(const token_spec *spec, token_error *err)
{
    size_t i;

    if (spec->module == NULL || spec->module[0] == '\0') {
        tk_error(err, TOKEN_ERR_CONFIG, "no PKCS#11 module path");
        return -1;
    }
    if (spec->uri == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "no token URI");
        return -1;
    }
    if (spec->pin_file != NULL && spec->pin_env != NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "give pin_file or pin_env, not both");
        return -1;
    }
    if (spec->max_sessions < 0 || spec->wait_ms < 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "max_sessions and wait_ms must not be negative");
        return -1;
    }
    for (i = 0; i < spec->nkeys; i++) {
        if (spec->keys[i].name == NULL ||
            !token_name_is_valid(spec->keys[i].name)) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "key names are 1 to %d bytes without control "
                     "characters",
                     TOKEN_KEY_NAME_MAX);
            return -1;
        }
    }
    return 0;
}

/* The configured keys, with everything that comes from files. */
static int build_config_keys(struct tk_build *b, token_error *err)
{
    const token_spec *spec = b->spec;
    size_t i;

    if (spec->nkeys == 0)
        return 0;
    b->key_uris = calloc(spec->nkeys, sizeof(*b->key_uris));
    if (b->key_uris == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return -1;
    }
    for (i = 0; i < spec->nkeys; i++) {
        const token_key_spec *ks = &spec->keys[i];
        token_uri *u = &b->key_uris[i];
        STACK_OF(X509) *chain = NULL;
        token_key *k;

        if (ks->name == NULL || ks->name[0] == '\0' || ks->uri == NULL) {
            tk_error(err, TOKEN_ERR_CONFIG, "key %zu needs a name and a URI",
                     i + 1);
            return -1;
        }
        if (build_name_taken(b, ks->name)) {
            tk_error(err, TOKEN_ERR_CONFIG, "key name %s is used twice",
                     ks->name);
            return -1;
        }
        if (token_uri_parse(ks->uri, u, err) < 0) {
            error_context(err, "key", ks->name);
            return -1;
        }
        if (u->object == NULL && u->id == NULL) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "key %s: the URI must give object= or id=", ks->name);
            return -1;
        }
        if (ks->chain_file != NULL &&
            load_chain(ks->chain_file, &chain, err) < 0) {
            error_context(err, "key", ks->name);
            return -1;
        }
        k = key_new(ks->name, b->tok, chain != NULL ? chain : b->chain, err);
        chain_free(chain);
        if (k == NULL || build_push_key(b, k, err) < 0)
            return -1;
        if (ks->cert_file != NULL) {
            if (load_cert(ks->cert_file, &k->cert, err) < 0) {
                error_context(err, "key", ks->name);
                return -1;
            }
            key_set_dates(k);
            key_set_algorithm(k);
        }
    }
    return 0;
}

static int pin_digest(const char *pin, unsigned char d[TK_PIN_DIGEST])
{
    unsigned int len = 0;

    if (!EVP_Digest(pin, strlen(pin), d, &len, EVP_sha256(), NULL) ||
        len != TK_PIN_DIGEST) {
        ERR_clear_error();
        return -1;
    }
    return 0;
}

static int pin_was_refused(const struct tk_pins *p,
                           const unsigned char d[TK_PIN_DIGEST])
{
    unsigned i;

    for (i = 0; i < p->nrefused; i++) {
        if (CRYPTO_memcmp(p->refused[i], d, TK_PIN_DIGEST) == 0)
            return 1;
    }
    return 0;
}

/* Only called while there is room: token_login tries no PIN otherwise. */
static void pin_refused(struct tk_pins *p, const unsigned char d[TK_PIN_DIGEST])
{
    memcpy(p->refused[p->nrefused++], d, TK_PIN_DIGEST);
}

/* Logs the process in through the module's function list, so that libp11
 * never holds the PIN (PKCS11_login would keep a copy for the slot's life).
 * A PIN is sent to the token at most once per module load: one it refused
 * before is not sent again, nor, while the process is logged in, any
 * other than the one it logged in with (the token would not check it, and
 * logging out to check it would break the token set still serving). A card
 * locks after a few wrong PINs, and a reload would otherwise send the same
 * one each time.
 *
 * 1 when logged in (or no login is needed), 0 when the token went down, -1
 * on an internal error. When this call logged in, *holding is 1 and
 * *session holds the login until libp11 has a session of its own. The PIN
 * is wiped and freed on every path. Called with registry_lock held. */
static int token_login(struct tk_token *t, char **pin, const tk_token_state *st,
                       unsigned long *session, int *holding, token_error *err)
{
    struct tk_pins *p = pins_for(t->module, t->slot);
    unsigned char d[TK_PIN_DIGEST];
    char why[96];
    unsigned long rv;
    int r = 0;

    if (p == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        r = -1;
        goto out;
    }
    if (*pin == NULL) {
        if (t->slot->token->loginRequired)
            token_down(t, TK_DOWN,
                       "the token needs a login and no PIN is configured");
        else
            r = 1;
        goto out;
    }
    if (pin_digest(*pin, d) < 0) {
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot compute a PIN digest");
        r = -1;
        goto out;
    }
    /* A token that was reset since has forgotten the login. */
    if (p->logged_in && !st->logged_in)
        p->logged_in = 0;
    if (p->logged_in) {
        if (CRYPTO_memcmp(d, p->good, TK_PIN_DIGEST) == 0) {
            t->logs_in = 1;
            r = 1;
        } else if (pin_was_refused(p, d)) {
            token_down(t, TK_PIN_REFUSED,
                       "login failed: this PIN was refused before; not "
                       "retried (fix the PIN and reload)");
        } else {
            token_down(t, TK_DOWN,
                       "the PIN changed while the token is logged in; "
                       "restart to log in with the new PIN");
        }
        goto out;
    }
    /* A locked PIN cannot succeed; trying would only count a failure. */
    if (p->locked || st->pin_locked) {
        p->locked = 1;
        token_down(t, TK_PIN_REFUSED, "login failed: PIN locked");
        goto out;
    }
    if (pin_was_refused(p, d)) {
        token_down(t, TK_PIN_REFUSED,
                   "login failed: this PIN was refused before; not retried "
                   "(fix the PIN and reload)");
        goto out;
    }
    if (p->nrefused == TK_REFUSED_MAX) {
        token_down(t, TK_PIN_REFUSED,
                   "login failed: %d PINs were refused before; no other is "
                   "tried (fix the PIN and reload)",
                   TK_REFUSED_MAX);
        goto out;
    }
    /* The login's own session stays open until libp11 opens one, and
     * libp11 waits forever when it cannot (see the top of this file). */
    if (st->max_sessions == 1) {
        token_down(t, TK_DOWN,
                   "the token allows one session at a time; logging in "
                   "needs two");
        goto out;
    }
    rv = tk_probe_login(t->module->probe, t->slot_id, *pin, session);
    if (rv == 0) {
        memcpy(p->good, d, TK_PIN_DIGEST);
        p->logged_in = 1;
        t->logs_in = 1;
        *holding = 1;
        r = 1;
        goto out;
    }
    tk_ckr_describe(rv, why, sizeof(why));
    if (rv == TK_CKR_PIN_LOCKED) {
        p->locked = 1;
        token_down(t, TK_PIN_REFUSED, "login failed: PIN locked");
    } else if (rv == TK_CKR_PIN_INCORRECT) {
        pin_refused(p, d);
        token_down(t, TK_PIN_REFUSED, "login failed: incorrect PIN");
    } else if (rv == TK_CKR_PIN_INVALID || rv == TK_CKR_PIN_LEN_RANGE ||
               rv == TK_CKR_PIN_EXPIRED) {
        pin_refused(p, d);
        token_down(t, TK_PIN_REFUSED, "login failed: PIN refused, %s", why);
    } else {
        token_down(t, TK_DOWN, "login failed: %s", why);
    }
out:
    OPENSSL_cleanse(d, sizeof(d));
    token_pin_free(*pin);
    *pin = NULL;
    return r;
}

int token_name_is_valid(const char *name)
{
    size_t n;

    for (n = 0; name[n] != '\0'; n++)
        if ((unsigned char)name[n] < 0x20 || name[n] == 0x7f)
            return 0;
    return n > 0 && n <= TOKEN_KEY_NAME_MAX;
}

/* A discovered label that cannot be served: counted, and the first one
 * kept (cut, control characters as '?') for the service's warning. */
static void token_note_skipped(struct tk_token *t, const char *label)
{
    size_t n, cut = sizeof(t->skipped_first) - 4;
    char *p;

    if (t->nskipped++ > 0)
        return;
    n = strlen(label);
    snprintf(t->skipped_first, sizeof(t->skipped_first), "%.*s%s",
             (int)(n > cut ? cut : n), label, n > cut ? "..." : "");
    for (p = t->skipped_first; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
}

/* Finds the configured keys on the token, then, in discovery mode, every
 * other labelled private key with a same-ID certificate, under its label
 * unless that name is already served (configured here, or by a token
 * added earlier): the first holder keeps a name. 1 when done, 0
 * when listing the objects failed and the token went down, -1 on an
 * internal error. */
static int token_resolve_keys(struct tk_build *b, token_error *err)
{
    struct tk_token *t = b->tok;
    size_t nconfigured = b->nkeys;
    PKCS11_CERT *certs = NULL;
    PKCS11_KEY *keys = NULL;
    unsigned nkeys = 0, ncerts = 0, i, found, matches;
    char why[96];
    size_t j;

    if (PKCS11_enumerate_keys(t->slot->token, &keys, &nkeys) < 0) {
        libp11_failure(why, sizeof(why));
        token_down(t, TK_DOWN, "cannot list private keys: %s", why);
        return 0;
    }
    if (PKCS11_enumerate_certs(t->slot->token, &certs, &ncerts) < 0) {
        libp11_failure(why, sizeof(why));
        token_down(t, TK_DOWN, "cannot list certificates: %s", why);
        return 0;
    }
    for (j = 0; j < nconfigured; j++) {
        token_key *k = b->keys[j];
        const token_uri *u = &b->key_uris[j];

        if (!slot_matches(u, t->slot)) {
            snprintf(k->problem, sizeof(k->problem),
                     "the key URI names a different token");
            continue;
        }
        found = 0;
        matches = 0;
        for (i = 0; i < nkeys; i++) {
            if (key_matches(u, &keys[i])) {
                found = i;
                matches++;
            }
        }
        if (matches == 1)
            key_bind(k, &keys[found], certs, ncerts);
        else if (matches == 0)
            snprintf(k->problem, sizeof(k->problem),
                     "no private key on the token matches the key URI");
        else
            snprintf(k->problem, sizeof(k->problem),
                     "the key URI matches %u private keys", matches);
    }
    if (!b->spec->discovery)
        return 1;
    for (i = 0; i < nkeys; i++) {
        token_key *k;

        if (keys[i].label == NULL || keys[i].label[0] == '\0' ||
            build_name_taken(b, keys[i].label) ||
            token_cert_for(&keys[i], certs, ncerts) == NULL)
            continue;
        if (!token_name_is_valid(keys[i].label)) {
            token_note_skipped(t, keys[i].label);
            continue;
        }
        k = key_new(keys[i].label, t, b->chain, err);
        if (k == NULL || build_push_key(b, k, err) < 0)
            return -1;
        key_bind(k, &keys[i], certs, ncerts);
    }
    return 1;
}

/* EC keys decrypt by ECDH on the token (libp11 runs C_DeriveKey). A token
 * that does not list CKM_ECDH1_DERIVE, such as one reached through
 * p11-kit's remoting, would fail every such decryption with
 * CKR_MECHANISM_INVALID: say so up front instead. */
static void check_ecdh(struct tk_build *b)
{
    int has = -2;
    size_t i;

    for (i = 0; i < b->nkeys; i++) {
        token_key *k = b->keys[i];

        if (k->pkey == NULL || EVP_PKEY_get_base_id(k->pkey) != EVP_PKEY_EC)
            continue;
        if (has == -2)
            has = tk_probe_has_mechanism(b->tok->module->probe, b->tok->slot_id,
                                         TK_CKM_ECDH1_DERIVE);
        if (has != 0)
            continue;
        k->cannot_decrypt = 1;
        snprintf(k->decrypt_problem, sizeof(k->decrypt_problem),
                 "the token does not offer ECDH (CKM_ECDH1_DERIVE), so this "
                 "key cannot decrypt through it");
    }
}

static const struct tk_token *set_token_on_slot(const token_set *set,
                                                const PKCS11_SLOT *slot)
{
    size_t i;

    for (i = 0; i < set->ntokens; i++) {
        if (set->tokens[i]->slot == slot)
            return set->tokens[i];
    }
    return NULL;
}

/* Selects the token, probes it, logs in and finds the keys. Whatever the
 * token does wrong leaves it down with a reason; -1 only for configuration
 * and internal errors. Called with registry_lock held. */
static int token_open(struct tk_build *b, char **pin, token_error *err)
{
    struct tk_token *t = b->tok;
    struct tk_module *m = t->module;
    const struct tk_token *other;
    PKCS11_SLOT *slot = NULL;
    tk_token_state st;
    unsigned long rv, session = 0;
    unsigned i, matches = 0;
    char why[96];
    int rc, holding = 0;

    for (i = 0; i < m->nslots; i++) {
        if (slot_matches(&b->uri, &m->slots[i])) {
            slot = &m->slots[i];
            matches++;
        }
    }
    if (matches == 0) {
        token_down(t, TK_DOWN, "no initialised token matches the URI");
        t->absent = 1;
        return 0;
    }
    if (matches > 1) {
        token_down(t, TK_DOWN,
                   "the URI matches %u tokens; add serial= to choose one",
                   matches);
        return 0;
    }
    other = set_token_on_slot(b->set, slot);
    if (other != NULL) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "the URI selects the token already configured as %s",
                 other->name);
        return -1;
    }
    t->slot = slot;
    t->slot_id = PKCS11_get_slotid_from_slot(slot);
    rv = tk_probe_session(m->probe, t->slot_id, &st);
    if (rv != 0) {
        tk_ckr_describe(rv, why, sizeof(why));
        token_down(t, TK_DOWN, "cannot open a session: %s", why);
        t->absent = 1;
        return 0;
    }
    if (st.max_sessions > 0 && st.max_sessions < t->max_sessions)
        t->max_sessions = (unsigned)st.max_sessions;
    rc = token_login(t, pin, &st, &session, &holding, err);
    if (rc <= 0)
        return rc;
    rc = token_resolve_keys(b, err);
    /* Listing the keys made libp11 get a session, which it keeps in its
     * pool until the module is unloaded: the login no longer needs ours. */
    if (holding)
        tk_probe_end_session(m->probe, session);
    if (rc <= 0)
        return rc;
    check_ecdh(b);
    t->state = TK_READY;
    t->open_reason[0] = '\0';
    return 0;
}

static int build_name(struct tk_build *b, token_error *err)
{
    const char *name = b->spec->name;
    size_t i;

    if (name == NULL && b->tok->slot != NULL &&
        b->tok->slot->token->label != NULL)
        name = b->tok->slot->token->label;
    if (name == NULL)
        name = b->uri.token != NULL ? b->uri.token : b->spec->uri;
    for (i = 0; i < b->set->ntokens; i++) {
        if (strcmp(b->set->tokens[i]->name, name) == 0) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "two tokens are named %s; give each a name", name);
            return -1;
        }
    }
    b->tok->name = strdup(name);
    if (b->tok->name == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

static int build_publish(struct tk_build *b, token_error *err)
{
    token_set *set = b->set;
    struct tk_token **tokens;
    token_key **keys, **tkeys;

    tokens = realloc(set->tokens, (set->ntokens + 1) * sizeof(*tokens));
    if (tokens == NULL)
        goto oom;
    set->tokens = tokens;
    /* + 1: a token without keys must not turn this into realloc(p, 0). */
    keys = realloc(set->keys, (set->nkeys + b->nkeys + 1) * sizeof(*keys));
    if (keys == NULL)
        goto oom;
    set->keys = keys;
    /* + 1 as above */
    tkeys = malloc((b->nkeys + 1) * sizeof(*tkeys));
    if (tkeys == NULL || module_remember(b->tok->module, b->tok) < 0) {
        free(tkeys);
        goto oom;
    }
    if (b->nkeys > 0)
        memcpy(tkeys, b->keys, b->nkeys * sizeof(*tkeys));
    b->tok->keys = tkeys;
    b->tok->nkeys = b->nkeys;
    if (b->nkeys > 0)
        memcpy(set->keys + set->nkeys, b->keys, b->nkeys * sizeof(*keys));
    set->nkeys += b->nkeys;
    b->nkeys = 0;
    b->tok->opened = b->tok->state == TK_READY;
    if (b->tok->absent)
        schedule_recovery(b->tok);
    b->tok->changed = time(NULL);
    b->tok->published = 1;
    set->tokens[set->ntokens++] = b->tok;
    b->tok = NULL;
    return 0;
oom:
    tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
    return -1;
}

int token_set_add(token_set *set, const token_spec *spec, token_error *err)
{
    /* Names the token in messages before it has its final name. */
    const char *label = spec->name != NULL  ? spec->name
                        : spec->uri != NULL ? spec->uri
                                            : "(unnamed)";
    struct tk_build b = {0};
    char *pin = NULL;
    int locked = 0;
    int r = -1;

    b.set = set;
    b.spec = spec;
    if (check_spec(spec, err) < 0)
        goto out;
    if (token_uri_parse(spec->uri, &b.uri, err) < 0)
        goto out;
    if (b.uri.object != NULL || b.uri.id != NULL) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "the token URI must not select an object "
                 "(object=, id=): keys are configured under keys");
        goto out;
    }
    b.tok = token_new(spec, err);
    if (b.tok == NULL || token_uri_parse(spec->uri, &b.tok->uri, err) < 0)
        goto out;
    if (spec->chain_file != NULL &&
        load_chain(spec->chain_file, &b.chain, err) < 0)
        goto out;
    if (build_config_keys(&b, err) < 0)
        goto out;
    if (spec->pin_file != NULL)
        pin = token_pin_read_file(spec->pin_file, err);
    else if (spec->pin_env != NULL)
        pin = token_pin_read_env(spec->pin_env, err);
    if ((spec->pin_file != NULL || spec->pin_env != NULL) && pin == NULL)
        goto out;
    if (pin != NULL) {
        if (pin_digest(pin, b.tok->pin_digest) < 0) {
            tk_error(err, TOKEN_ERR_INTERNAL, "cannot compute a PIN digest");
            goto out;
        }
        b.tok->has_pin = 1;
    }

    pthread_mutex_lock(&registry_lock);
    locked = 1;
    if (module_get(spec->module, &b.tok->module, err) < 0)
        goto out;
    if (token_open(&b, &pin, err) < 0)
        goto out;
    if (build_name(&b, err) < 0)
        goto out;
    if (build_publish(&b, err) < 0)
        goto out;
    r = 0;
out:
    token_pin_free(pin);
    if (r < 0)
        error_context(err, "token", label);
    /* Dropping the module reference needs the lock; the build is freed
     * before it is released. */
    build_clear(&b);
    if (locked)
        pthread_mutex_unlock(&registry_lock);
    return r;
}

/* ---- faults found at run time ---- */

/* Asks the token, through the module's function list (libp11 could wait
 * forever for a session), whether it still works for us. TK_ANSWERS when
 * it does, TK_LOGGED_OUT when it answers but has forgotten our login (a
 * reset: libp11's sessions are dead too), TK_SILENT when it does not
 * answer; why says what is wrong. Needs no lock: the probe and the slot id
 * change only in a rebuild, with every operation drained. */
enum tk_answer { TK_ANSWERS, TK_LOGGED_OUT, TK_SILENT };

static enum tk_answer token_answers(const struct tk_token *t, char *why,
                                    size_t len)
{
    tk_token_state st;
    unsigned long rv;
    char ckr[64];

    pthread_rwlock_rdlock(&t->module->calls);
    rv = tk_probe_session(t->module->probe, t->slot_id, &st);
    pthread_rwlock_unlock(&t->module->calls);
    /* Every session in use is an answer too: the token works, and is
     * busy with our own operations. */
    if (rv == TK_CKR_SESSION_COUNT)
        return TK_ANSWERS;
    if (rv != 0) {
        tk_ckr_describe(rv, ckr, sizeof(ckr));
        snprintf(why, len, "the token does not answer: %s", ckr);
        return TK_SILENT;
    }
    if (t->logs_in && !st.logged_in) {
        snprintf(why, len, "the token logged this process out (was it reset?)");
        return TK_LOGGED_OUT;
    }
    return TK_ANSWERS;
}

/* Points t->reason at a kept copy of text. Past TK_FAULT_REASONS_MAX
 * distinct texts, or without memory, a fixed one stands in. Under t->lock. */
static void token_set_fault_reason(struct tk_token *t, const char *text)
{
    struct tk_reason *r;

    for (r = t->fault_reasons; r != NULL; r = r->next) {
        if (strcmp(r->text, text) == 0) {
            t->reason = r->text;
            return;
        }
    }
    r = t->nfault_reasons < TK_FAULT_REASONS_MAX ? malloc(sizeof(*r)) : NULL;
    if (r == NULL) {
        t->reason = "the token does not answer";
        return;
    }
    snprintf(r->text, sizeof(r->text), "%s", text);
    r->next = t->fault_reasons;
    t->fault_reasons = r;
    t->nfault_reasons++;
    t->reason = r->text;
}

/* Under t->lock: the next recovery attempt, after the back-off that
 * follows the last one (1 s after a first fault, doubling to 30 s). */
static void schedule_recovery(struct tk_token *t)
{
    unsigned s = t->backoff_s == 0 ? TK_BACKOFF_FIRST_S : 2 * t->backoff_s;

    if (s > TK_BACKOFF_MAX_S)
        s = TK_BACKOFF_MAX_S;
    clock_gettime(CLOCK_MONOTONIC, &t->next_probe);
    t->next_probe.tv_sec += s;
    t->backoff_s = s;
}

/* Under t->lock. Waiters in token_key_acquire wake up and fail; the
 * recovery loop takes it from here. */
static void token_fault(struct tk_token *t, const char *why)
{
    token_set_fault_reason(t, why);
    token_set_state(t, TK_FAULT);
    wake_all(t);
}

static int recovery_due(const struct tk_token *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > t->next_probe.tv_sec ||
           (now.tv_sec == t->next_probe.tv_sec &&
            now.tv_nsec >= t->next_probe.tv_nsec);
}

/* 1 when the token is ready (or, with recovering_too, being re-opened: an
 * operation then waits for the outcome in token_key_acquire); otherwise 0
 * and *reason (when not NULL) says why, in a string that stays valid as
 * long as the token. */
static int token_ready(struct tk_token *t, int recovering_too,
                       const char **reason)
{
    int ready;

    pthread_mutex_lock(&t->lock);
    ready =
        t->state == TK_READY || (recovering_too && t->state == TK_RECOVERING);
    if (!ready && reason != NULL)
        *reason = t->state == TK_RECOVERING ? "the token is being re-opened"
                                            : t->reason;
    pthread_mutex_unlock(&t->lock);
    return ready;
}

/* ---- rebuilding a module's libp11 context ---- */

static int module_remember(struct tk_module *m, struct tk_token *t)
{
    struct tk_token **tokens;

    tokens = realloc(m->tokens, (m->ntokens + 1) * sizeof(*tokens));
    if (tokens == NULL)
        return -1;
    m->tokens = tokens;
    m->tokens[m->ntokens++] = t;
    return 0;
}

static void module_forget(struct tk_module *m, const struct tk_token *t)
{
    size_t i;

    if (m == NULL)
        return;
    for (i = 0; i < m->ntokens; i++) {
        if (m->tokens[i] == t) {
            m->tokens[i] = m->tokens[--m->ntokens];
            return;
        }
    }
}

/* Waits until no operation is in flight on any token of m; the tokens
 * are already out of TK_READY, so none starts. 0 when drained, -1 when the
 * deadline passed first. */
static int module_drain(struct tk_module *m)
{
    struct timespec deadline;
    size_t i;
    int rc = 0;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += TK_DRAIN_MS / 1000;
    deadline.tv_nsec += (TK_DRAIN_MS % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    for (i = 0; i < m->ntokens && rc == 0; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        while (t->in_flight > 0 && rc == 0)
            rc = pthread_cond_timedwait(&t->cond, &t->lock, &deadline);
        if (t->in_flight == 0)
            rc = 0;
        pthread_mutex_unlock(&t->lock);
    }
    return rc == 0 ? 0 : -1;
}

/* The one slot whose token the URI selects, or NULL. */
static PKCS11_SLOT *module_find_slot(struct tk_module *m, const token_uri *u)
{
    PKCS11_SLOT *slot = NULL;
    unsigned i, matches = 0;

    for (i = 0; i < m->nslots; i++) {
        if (slot_matches(u, &m->slots[i])) {
            slot = &m->slots[i];
            matches++;
        }
    }
    return matches == 1 ? slot : NULL;
}

/* The PIN from the token's configured source, only when it is the one the
 * configuration was loaded with: a changed PIN waits for a reload, which
 * is what allows a new attempt. NULL (and why) otherwise. */
static char *token_pin_again(const struct tk_token *t, char *why, size_t len)
{
    unsigned char d[TK_PIN_DIGEST];
    token_error perr = {0};
    char *pin;

    pin = t->pin_file != NULL ? token_pin_read_file(t->pin_file, &perr)
                              : token_pin_read_env(t->pin_env, &perr);
    if (pin == NULL) {
        /* cut to fit the reason */
        snprintf(why, len, "cannot read the PIN: %.150s", perr.message);
        return NULL;
    }
    if (pin_digest(pin, d) < 0 ||
        CRYPTO_memcmp(d, t->pin_digest, TK_PIN_DIGEST) != 0) {
        snprintf(why, len,
                 "the PIN changed since the configuration was loaded; "
                 "reload to use it");
        token_pin_free(pin);
        pin = NULL;
    }
    OPENSSL_cleanse(d, sizeof(d));
    return pin;
}

/* Finds each of the token's keys again on the fresh context, by the label
 * and ID of the object bound before. 0 when listed, -1 (and why) when the
 * token could not list its keys. A key that is gone stays without pkey,
 * which token_key_acquire refuses. */
static int token_rebind_keys(struct tk_token *t, char *why, size_t len)
{
    PKCS11_KEY *keys = NULL;
    unsigned nkeys = 0, i;
    char ckr[96];
    size_t j;

    if (PKCS11_enumerate_keys(t->slot->token, &keys, &nkeys) < 0) {
        libp11_failure(ckr, sizeof(ckr));
        snprintf(why, len, "cannot list private keys: %s", ckr);
        return -1;
    }
    for (j = 0; j < t->nkeys; j++) {
        token_key *k = t->keys[j];

        if (k->label == NULL && k->id == NULL)
            continue;
        for (i = 0; i < nkeys; i++) {
            const PKCS11_KEY *pk = &keys[i];

            if ((k->label == NULL) != (pk->label == NULL) ||
                (k->label != NULL && strcmp(k->label, pk->label) != 0) ||
                k->id_len != pk->id_len ||
                (k->id_len > 0 && memcmp(k->id, pk->id, k->id_len) != 0))
                continue;
            k->pkey = PKCS11_get_private_key(&keys[i]);
            /* the same name must stand for the same key pair */
            if (k->pkey != NULL && k->cert != NULL &&
                EVP_PKEY_eq(X509_get0_pubkey(k->cert), k->pkey) != 1) {
                EVP_PKEY_free(k->pkey);
                k->pkey = NULL;
            }
            break;
        }
    }
    ERR_clear_error();
    return 0;
}

/* Opens a token again on its module's fresh context, in the order the top
 * of this file gives: find its slot, probe it through the function list,
 * log in through the function list, and only then let libp11 list its
 * keys. The token ends ready, or down with the reason (TK_PIN_REFUSED when
 * the PIN was refused). Under registry_lock, the module drained. */
static void token_reopen(struct tk_token *t)
{
    struct tk_module *m = t->module;
    unsigned long rv, session = 0;
    char why[TK_REASON_LEN], ckr[64];
    token_error err = {0};
    tk_token_state st;
    char *pin = NULL;
    int rc, holding = 0;

    t->slot = module_find_slot(m, &t->uri);
    if (t->slot == NULL) {
        token_down(t, TK_FAULT, "no initialised token matches the URI now");
        return;
    }
    t->slot_id = PKCS11_get_slotid_from_slot(t->slot);
    rv = tk_probe_session(m->probe, t->slot_id, &st);
    if (rv != 0) {
        tk_ckr_describe(rv, ckr, sizeof(ckr));
        token_down(t, TK_FAULT, "cannot open a session: %s", ckr);
        return;
    }
    if (t->has_pin) {
        pin = token_pin_again(t, why, sizeof(why));
        if (pin == NULL) {
            token_down(t, TK_FAULT, "%s", why);
            return;
        }
    }
    rc = token_login(t, &pin, &st, &session, &holding, &err);
    if (rc < 0)
        token_down(t, TK_FAULT, "%s", err.message);
    if (rc <= 0)
        return;
    rc = token_rebind_keys(t, why, sizeof(why));
    if (holding)
        tk_probe_end_session(m->probe, session);
    if (rc < 0) {
        token_down(t, TK_FAULT, "%s", why);
        return;
    }
    pthread_mutex_lock(&t->lock);
    t->backoff_s = 0;
    t->stats.recoveries++;
    token_set_state(t, TK_READY);
    wake_all(t);
    pthread_mutex_unlock(&t->lock);
}

/* A token that was absent when its set was built: renews its slot and,
 * when it answers now, asks the service for the reload that opens it
 * (once per token object; the reload replaces it). Under registry_lock,
 * in a rebuild. */
static void token_look_again(struct tk_token *t)
{
    token_present_fn fn;
    tk_token_state st;
    int absent;

    t->slot = module_find_slot(t->module, &t->uri);
    pthread_mutex_lock(&t->lock);
    absent = t->state == TK_DOWN && t->absent && !t->answers_now;
    pthread_mutex_unlock(&t->lock);
    if (!absent || t->slot == NULL)
        return;
    t->slot_id = PKCS11_get_slotid_from_slot(t->slot);
    if (tk_probe_session(t->module->probe, t->slot_id, &st) != 0)
        return;
    t->answers_now = 1;
    fn = __atomic_load_n(&present_fn, __ATOMIC_ACQUIRE);
    if (fn != NULL)
        fn(t->name);
}

/* Rebuilds m's libp11 context: stops and drains every token of the module
 * (of every token set), frees every libp11 object, PKCS11_CTX_unload
 * (C_Finalize), PKCS11_CTX_load (C_Initialize), lists the slots, and opens
 * each token that was ready once again (token_reopen). Tokens down since
 * they were configured keep their state; their slot pointers are renewed.
 * Tokens whose PIN was refused are not touched beyond that. 0 when the
 * context was rebuilt (whatever each token made of it), -1 when the
 * operations in flight did not drain or the module did not load. Under
 * registry_lock. */
static int module_rebuild(struct tk_module *m)
{
    token_error err = {0};
    struct timespec deadline;
    size_t i, j;
    int locked = 0;

    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        if (t->opened && t->state != TK_PIN_REFUSED) {
            token_set_state(t, TK_RECOVERING);
            wake_all(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    if (module_drain(m) < 0) {
        snprintf(err.message, sizeof(err.message),
                 "operations in flight did not finish within %d ms; the "
                 "token is re-opened later",
                 TK_DRAIN_MS);
        goto failed;
    }
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += TK_DRAIN_MS / 1000;
    if (pthread_rwlock_timedwrlock(&m->calls, &deadline) != 0) {
        snprintf(err.message, sizeof(err.message),
                 "probes of the token did not finish within %d ms; the "
                 "token is re-opened later",
                 TK_DRAIN_MS);
        goto failed;
    }
    locked = 1;
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        for (j = 0; j < t->nkeys; j++) {
            EVP_PKEY_free(t->keys[j]->pkey);
            t->keys[j]->pkey = NULL;
        }
        t->slot = NULL;
    }
    if (m->slots != NULL)
        PKCS11_release_all_slots(m->ctx, m->slots, m->nslots);
    m->slots = NULL;
    m->nslots = 0;
    if (m->loaded)
        PKCS11_CTX_unload(m->ctx);
    m->loaded = 0;
    __atomic_add_fetch(&m->generation, 1, __ATOMIC_RELEASE);
    /* C_Finalize ended every login of the process. */
    for (struct tk_pins *p = m->pins; p != NULL; p = p->next)
        p->logged_in = 0;
    if (module_load(m, &err) < 0)
        goto failed;
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];
        int reopen;

        pthread_mutex_lock(&t->lock);
        reopen = t->state == TK_RECOVERING;
        pthread_mutex_unlock(&t->lock);
        if (reopen)
            token_reopen(t);
        else
            token_look_again(t);
    }
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        /* A token that was serving until now starts its back-off; the
         * others had theirs advanced by the caller. */
        pthread_mutex_lock(&t->lock);
        if (t->state == TK_FAULT && t->backoff_s == 0)
            schedule_recovery(t);
        pthread_mutex_unlock(&t->lock);
    }
    pthread_rwlock_unlock(&m->calls);
    return 0;
failed:
    if (locked)
        pthread_rwlock_unlock(&m->calls);
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        if (t->state == TK_RECOVERING || t->state == TK_FAULT) {
            token_fault(t, err.message);
            if (t->backoff_s == 0)
                schedule_recovery(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    return -1;
}

/* The recovery loop: one thread for the process, which rebuilds every
 * module with a token down since a run-time fault once that token's
 * back-off has passed. When other tokens of the module still serve, the
 * faulty one must first answer a probe on the old context, so a token that
 * stays absent does not pause its neighbours at every attempt. */
static pthread_t recovery_thread;
static int recovery_running;
static int recovery_stop;
static pthread_cond_t recovery_cond = PTHREAD_COND_INITIALIZER;

static int module_wants_rebuild(struct tk_module *m)
{
    char why[TK_REASON_LEN];
    int fault_due = 0, absent_due = 0, serving = 0, answers = 0;
    size_t i;

    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];
        int absent;

        pthread_mutex_lock(&t->lock);
        absent = t->state == TK_DOWN && t->absent && !t->answers_now;
        if (t->state == TK_READY)
            serving = 1;
        if ((t->state == TK_FAULT || absent) && recovery_due(t)) {
            if (absent)
                absent_due = 1;
            else
                fault_due = 1;
            schedule_recovery(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    /* A token absent since the load is looked for only by a rebuild that
     * pauses nobody: with tokens of the module serving, a reload finds it. */
    if (!serving)
        return fault_due || absent_due;
    if (!fault_due)
        return 0;
    for (i = 0; i < m->ntokens && !answers; i++) {
        struct tk_token *t = m->tokens[i];
        int fault;

        pthread_mutex_lock(&t->lock);
        fault = t->state == TK_FAULT;
        pthread_mutex_unlock(&t->lock);
        if (fault && m->loaded && t->slot != NULL &&
            token_answers(t, why, sizeof(why)) != TK_SILENT)
            answers = 1;
    }
    return answers;
}

static void *recovery_main(void *arg)
{
    struct timespec wake;
    struct tk_module *m;

    (void)arg;
    pthread_mutex_lock(&registry_lock);
    while (!recovery_stop) {
        for (m = registry; m != NULL && !recovery_stop; m = m->next) {
            if (module_wants_rebuild(m))
                module_rebuild(m);
        }
        /* Back-offs are whole seconds; a quarter second is their grain. */
        clock_gettime(CLOCK_REALTIME, &wake);
        wake.tv_nsec += 250000000L;
        if (wake.tv_nsec >= 1000000000L) {
            wake.tv_sec++;
            wake.tv_nsec -= 1000000000L;
        }
        if (!recovery_stop)
            pthread_cond_timedwait(&recovery_cond, &registry_lock, &wake);
    }
    pthread_mutex_unlock(&registry_lock);
    return NULL;
}

int token_recovery_start(token_event_fn fn, token_present_fn present,
                         token_error *err)
{
    __atomic_store_n(&event_fn, fn, __ATOMIC_RELEASE);
    __atomic_store_n(&present_fn, present, __ATOMIC_RELEASE);
    pthread_mutex_lock(&registry_lock);
    if (recovery_running) {
        pthread_mutex_unlock(&registry_lock);
        return 0;
    }
    recovery_stop = 0;
    if (pthread_create(&recovery_thread, NULL, recovery_main, NULL) != 0) {
        pthread_mutex_unlock(&registry_lock);
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot start the recovery thread");
        return -1;
    }
    recovery_running = 1;
    pthread_mutex_unlock(&registry_lock);
    return 0;
}

void token_recovery_stop(void)
{
    pthread_mutex_lock(&registry_lock);
    if (!recovery_running) {
        pthread_mutex_unlock(&registry_lock);
        return;
    }
    recovery_stop = 1;
    pthread_cond_signal(&recovery_cond);
    pthread_mutex_unlock(&registry_lock);
    pthread_join(recovery_thread, NULL);
    pthread_mutex_lock(&registry_lock);
    recovery_running = 0;
    pthread_mutex_unlock(&registry_lock);
    __atomic_store_n(&event_fn, NULL, __ATOMIC_RELEASE);
    __atomic_store_n(&present_fn, NULL, __ATOMIC_RELEASE);
}

/* The calling thread's operations. op_token: the token of the operation
 * in progress, between token_key_acquire and token_key_release, for
 * tk_ui_read (whose PIN does libp11 ask for?). op_last, op_generation and
 * op_use: the token, module generation and use of the last operation
 * acquired, kept past the release for token_key_check_fault (was the
 * context rebuilt since that operation began? what kind of operation is
 * to be checked?); op_last is only compared, never followed. */
static __thread struct tk_token *op_token;
static __thread const struct tk_token *op_last;
static __thread unsigned long op_generation;
static __thread token_use op_use;

static int acquire_slot(token_key *key, token_use use, EVP_PKEY **pkey,
                        int check, token_error *err);

/* CKR codes of a check operation that mean libp11's handles (its pooled
 * sessions, its key object, its login on them) are dead while the token
 * itself answers the probe: a rebuilt context serves again. */
static int ckr_stale(unsigned long rv)
{
    switch (rv) {
    case 0x32UL:  /* CKR_DEVICE_REMOVED: gone, and back by the probe */
    case 0x60UL:  /* CKR_KEY_HANDLE_INVALID */
    case 0x82UL:  /* CKR_OBJECT_HANDLE_INVALID */
    case 0xb0UL:  /* CKR_SESSION_CLOSED */
    case 0xb3UL:  /* CKR_SESSION_HANDLE_INVALID */
    case 0xe0UL:  /* CKR_TOKEN_NOT_PRESENT: as CKR_DEVICE_REMOVED */
    case 0x101UL: /* CKR_USER_NOT_LOGGED_IN */
    case 0x190UL: /* CKR_CRYPTOKI_NOT_INITIALIZED */
        return 1;
    default:
        return 0;
    }
}

/* What a known-answer test (check.c) made of a key whose operation failed
 * on a token that answers the probe. */
enum tk_verdict {
    TK_KEY_WORKS,     /* the failure was the operation's own */
    TK_KEY_STALE,     /* libp11's handles are dead: rebuild, retry */
    TK_KEY_FAILS,     /* the token fails the key's operations */
    TK_KEY_UNCHECKED, /* no slot for the check: err says why */
};

/* Runs the check on an operation slot of its own, queued like any
 * operation (libp11 must never wait for a session). why gets the reason
 * of TK_KEY_STALE and TK_KEY_FAILS. */
static enum tk_verdict key_answers(token_key *key, token_use use, char *why,
                                   size_t len, token_error *err)
{
    char ckr_text[64];
    unsigned long ckr;
    EVP_PKEY *pkey;
    int r;

    if (acquire_slot(key, use, &pkey, 1, err) != 0)
        return TK_KEY_UNCHECKED;
    r = tk_key_known_answer(pkey, X509_get0_pubkey(key->cert), use, &ckr);
    token_key_release(key);
    /* A check that cannot be made leaves the verdict as it was before
     * there were checks: the operation's own failure. */
    if (r != 0)
        return TK_KEY_WORKS;
    if (ckr != 0)
        tk_ckr_describe(ckr, ckr_text, sizeof(ckr_text));
    else
        snprintf(ckr_text, sizeof(ckr_text), "a wrong result");
    if (ckr_stale(ckr)) {
        snprintf(why, len,
                 "the token's sessions are stale (a check operation got %s)",
                 ckr_text);
        return TK_KEY_STALE;
    }
    snprintf(why, len, "the token fails the key's %s operations too (%s)",
             use == TOKEN_USE_SIGN ? "signature" : "decryption", ckr_text);
    return TK_KEY_FAILS;
}

int token_key_check_fault(token_key *key, token_error *err)
{
    struct tk_token *t = key->token;
    struct tk_module *m = t->module;
    unsigned long gen = op_last == t
                            ? op_generation
                            : __atomic_load_n(&m->generation, __ATOMIC_ACQUIRE);
    char why[TK_REASON_LEN];
    enum tk_answer answer = TK_ANSWERS;
    enum tk_verdict verdict = TK_KEY_WORKS;
    int ready, rebuilt, down = 0;

    pthread_mutex_lock(&t->lock);
    ready = t->state == TK_READY;
    pthread_mutex_unlock(&t->lock);
    /* Another request's rebuild may be under way (it holds the registry
     * lock until it is done, and marks the token down just before it
     * starts): wait for its outcome before judging the token. */
    if (!ready) {
        pthread_mutex_lock(&registry_lock);
        pthread_mutex_unlock(&registry_lock);
        pthread_mutex_lock(&t->lock);
        ready = t->state == TK_READY;
        pthread_mutex_unlock(&t->lock);
    }
    /* The context the operation used is gone: its failure says nothing
     * about the token, and the new context may serve it. */
    if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen && ready)
        goto retry;
    /* A token already down explains the failure without another probe. */
    if (ready) {
        answer = token_answers(t, why, sizeof(why));
        /* a rebuild ran while the probe waited for it */
        if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen)
            goto retry;
        if (answer == TK_ANSWERS) {
            /* The token answers; do libp11's handles? (check.c says why
             * a decryption cannot tell.) */
            verdict = key_answers(key, op_use, why, sizeof(why), err);
            if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen)
                goto retry;
            if (verdict == TK_KEY_WORKS)
                return 0;
            if (verdict == TK_KEY_UNCHECKED)
                return -1;
            if (verdict == TK_KEY_FAILS) {
                pthread_mutex_lock(&t->lock);
                t->stats.faults++;
                pthread_mutex_unlock(&t->lock);
                tk_error(err, TOKEN_ERR_UNAVAILABLE, "key %s: %s", key->name,
                         why);
                return -1;
            }
        }
    }
    if (answer == TK_LOGGED_OUT || verdict == TK_KEY_STALE) {
        /* A reset: libp11's sessions are dead, the token is not. Rebuild
         * now, in this thread, so the operation can be retried. */
        pthread_mutex_lock(&registry_lock);
        rebuilt = __atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) == gen;
        if (rebuilt) {
            pthread_mutex_lock(&t->lock);
            if (t->state == TK_READY)
                token_fault(t, why);
            pthread_mutex_unlock(&t->lock);
            module_rebuild(m);
        }
        pthread_mutex_unlock(&registry_lock);
        pthread_mutex_lock(&t->lock);
        ready = t->state == TK_READY;
        pthread_mutex_unlock(&t->lock);
        /* Handles that are stale on the context just rebuilt for that
         * reason would have every request rebuild it again: such a token
         * is left to the recovery loop's back-off. */
        if (ready && rebuilt && verdict == TK_KEY_STALE) {
            verdict = key_answers(key, op_use, why, sizeof(why), err);
            down = verdict == TK_KEY_STALE || verdict == TK_KEY_FAILS;
        }
        if (ready && !down)
            goto retry;
    }
    pthread_mutex_lock(&t->lock);
    /* Another caller may have marked it down meanwhile; its reason
     * stands. */
    if ((answer == TK_SILENT || down) && t->state == TK_READY) {
        token_fault(t, why);
        t->backoff_s = 0;
        schedule_recovery(t);
    }
    t->stats.faults++;
    tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name,
             t->state == TK_RECOVERING ? "the token is being re-opened"
                                       : t->reason);
    pthread_mutex_unlock(&t->lock);
    return -1;
retry:
    pthread_mutex_lock(&t->lock);
    t->stats.retries++;
    pthread_mutex_unlock(&t->lock);
    /* For a caller that has retried once already and gives up. */
    tk_error(err, TOKEN_ERR_UNAVAILABLE,
             "token %s: re-opened under this request, and the operation "
             "failed again",
             t->name);
    return 1;
}

/* ---- context-specific login (CKA_ALWAYS_AUTHENTICATE) ---- */

/* libp11 0.4.12 (pkcs11_authenticate) asks its context's UI_METHOD for the
 * PIN of a CKA_ALWAYS_AUTHENTICATE key after each C_SignInit or
 * C_DecryptInit, then sends it with C_Login(CKU_CONTEXT_SPECIFIC) and
 * wipes its copy. It keeps no PIN of its own (PKCS11_login's copy is never
 * made: token/ logs in around libp11), so this reader fetches the PIN of
 * the token the calling thread operates on from its configured source,
 * only when it is the PIN the configuration was loaded with and the token
 * never refused it, hands it over and wipes it. */
static int tk_ui_read(UI *ui, UI_STRING *uis)
{
    const struct tk_token *t = op_token;
    char why[TK_REASON_LEN];
    char *pin;
    int ok;

    if (UI_get_string_type(uis) != UIT_PROMPT &&
        UI_get_string_type(uis) != UIT_VERIFY)
        return 1;
    if (t == NULL || !t->has_pin)
        return 0;
    pin = token_pin_again(t, why, sizeof(why));
    if (pin == NULL)
        return 0;
    ok = UI_set_result(ui, uis, pin) == 0;
    token_pin_free(pin);
    return ok ? 1 : 0;
}

static void ui_method_init(void)
{
    ui_method = UI_create_method("smimed PIN source");
    if (ui_method != NULL && UI_method_set_reader(ui_method, tk_ui_read) != 0) {
        UI_destroy_method(ui_method);
        ui_method = NULL;
    }
}

/* ---- token sets and keys ---- */

token_set *token_set_new(void)
{
    return calloc(1, sizeof(token_set));
}

void token_set_free(token_set *set)
{
    size_t i;

    if (set == NULL)
        return;
    /* Keys first: their EVP_PKEYs hold libp11 objects that refer to the
     * slots the last module reference releases. */
    pthread_mutex_lock(&registry_lock);
    for (i = 0; i < set->nkeys; i++)
        key_free(set->keys[i]);
    for (i = 0; i < set->ntokens; i++)
        token_free(set->tokens[i]);
    pthread_mutex_unlock(&registry_lock);
    free(set->keys);
    free(set->tokens);
    free(set);
}

size_t token_set_count_tokens(const token_set *set)
{
    return set->ntokens;
}

const char *token_set_token_name(const token_set *set, size_t i)
{
    return i < set->ntokens ? set->tokens[i]->name : NULL;
}

int token_set_token_ready(const token_set *set, size_t i, const char **reason)
{
    if (i >= set->ntokens) {
        if (reason != NULL)
            *reason = "no such token";
        return 0;
    }
    return token_ready(set->tokens[i], 0, reason);
}

int token_set_token_optional(const token_set *set, size_t i)
{
    return i < set->ntokens ? set->tokens[i]->optional : 0;
}

int token_set_token_discovery(const token_set *set, size_t i)
{
    return i < set->ntokens ? set->tokens[i]->discovery : 0;
}

size_t token_set_token_skipped(const token_set *set, size_t i,
                               const char **first)
{
    if (i >= set->ntokens)
        return 0;
    *first = set->tokens[i]->skipped_first;
    return set->tokens[i]->nskipped;
}

size_t token_set_count_keys(const token_set *set)
{
    return set->nkeys;
}

token_key *token_set_key_at(token_set *set, size_t i)
{
    return i < set->nkeys ? set->keys[i] : NULL;
}

token_key *token_set_find_key(token_set *set, const char *name)
{
    size_t i;

    for (i = 0; i < set->nkeys; i++) {
        if (strcmp(set->keys[i]->name, name) == 0)
            return set->keys[i];
    }
    return NULL;
}

const char *token_key_name(const token_key *key)
{
    return key->name;
}

const char *token_key_token_name(const token_key *key)
{
    return key->token->name;
}

const char *token_key_algorithm(const token_key *key)
{
    return key->algorithm;
}

int token_key_usable(const token_key *key, token_use use, const char **reason)
{
    const char *why = NULL;
    time_t now;

    if (!token_ready(key->token, 1, &why))
        goto out;
    if (key->problem[0] != '\0') {
        why = key->problem;
    } else if (use == TOKEN_USE_DECRYPT) {
        if (key->decrypt_problem[0] != '\0')
            why = key->decrypt_problem;
    } else if (key->sign_problem[0] != '\0') {
        why = key->sign_problem;
    } else {
        now = time(NULL);
        if (now < key->not_before)
            why = key->not_yet_valid;
        else if (now > key->not_after)
            why = key->expired;
    }
out:
    if (why == NULL)
        return 1;
    if (reason != NULL)
        *reason = why;
    return 0;
}

int token_key_supports(const token_key *key, token_use use)
{
    return !(use == TOKEN_USE_DECRYPT && key->cannot_decrypt);
}

X509 *token_key_cert0(const token_key *key)
{
    return key->cert;
}

STACK_OF(X509) *token_key_chain0(const token_key *key)
{
    return key->chain;
}

/* Under t->lock: a slot is free and the queue does not hold it back. */
static int slot_free(const struct tk_token *t, const struct tk_waiter *w)
{
    return t->state == TK_READY && t->in_flight < t->max_sessions &&
           t->queue == w;
}

/* Under t->lock: the caller joins the queue, sleeps until it is the head
 * and a slot is free, the token fails (anything but ready or recovering)
 * or the deadline passes, and leaves the queue; then whether a slot is
 * free for it. */
static int wait_in_queue(struct tk_token *t, const struct timespec *deadline)
{
    struct tk_waiter w = {.next = NULL}, **pp;
    pthread_condattr_t attr;
    int rc = 0, free_now;

    if (pthread_condattr_init(&attr) != 0)
        return 0;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
         pthread_cond_init(&w.cond, &attr) != 0;
    pthread_condattr_destroy(&attr);
    if (rc != 0)
        return 0;
    *t->queue_tail = &w;
    t->queue_tail = &w.next;
    /* A rebuild usually takes well under a second: wait for its outcome
     * as for a session, within the same bound. */
    while (!slot_free(t, &w) &&
           (t->state == TK_READY || t->state == TK_RECOVERING) &&
           rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&w.cond, &t->lock, deadline);
    free_now = slot_free(t, &w);
    for (pp = &t->queue; *pp != &w; pp = &(*pp)->next)
        ;
    *pp = w.next;
    if (t->queue_tail == &w.next)
        t->queue_tail = pp;
    pthread_cond_destroy(&w.cond);
    return free_now;
}

/* token_key_acquire, and the slot of a check operation (check): that one
 * is not counted as an operation and leaves the record of the last
 * operation (op_last, op_generation, op_use) alone. */
static int acquire_slot(token_key *key, token_use use, EVP_PKEY **pkey,
                        int check, token_error *err)
{
    struct tk_token *t = key->token;
    struct timespec deadline;
    const char *reason;
    int free_now;
    int r = -1;

    if (!token_key_usable(key, use, &reason)) {
        pthread_mutex_lock(&t->lock);
        t->stats.unavailable++;
        pthread_mutex_unlock(&t->lock);
        tk_error(err, TOKEN_ERR_UNAVAILABLE, "key %s: %s", key->name, reason);
        return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += t->wait_ms / 1000;
    deadline.tv_nsec += (t->wait_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&t->lock);
    free_now = slot_free(t, NULL) || wait_in_queue(t, &deadline);
    if (t->state != TK_READY) {
        t->stats.unavailable++;
        tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name,
                 t->state == TK_RECOVERING ? "the token is being re-opened"
                                           : t->reason);
    } else if (!free_now) {
        t->stats.busy++;
        tk_error(err, TOKEN_ERR_BUSY,
                 "token %s: no session came free within %ld ms (%u in use)",
                 t->name, t->wait_ms, t->in_flight);
    } else if (key->pkey == NULL) {
        t->stats.unavailable++;
        tk_error(err, TOKEN_ERR_UNAVAILABLE,
                 "key %s: not found again after the token was re-opened",
                 key->name);
    } else {
        t->in_flight++;
        *pkey = key->pkey;
        op_token = t;
        if (!check) {
            t->stats.operations[use == TOKEN_USE_DECRYPT]++;
            op_last = t;
            op_use = use;
            op_generation =
                __atomic_load_n(&t->module->generation, __ATOMIC_ACQUIRE);
        }
        r = 0;
    }
    /* the queue's new head may find a slot free too */
    if (t->queue != NULL && slot_free(t, t->queue))
        pthread_cond_signal(&t->queue->cond);
    pthread_mutex_unlock(&t->lock);
    return r;
}

int token_key_acquire(token_key *key, token_use use, EVP_PKEY **pkey,
                      token_error *err)
{
    return acquire_slot(key, use, pkey, 0, err);
}

void token_key_release(token_key *key)
{
    struct tk_token *t = key->token;

    pthread_mutex_lock(&t->lock);
    /* An unpaired release must not wrap the count and shut the token. */
    if (t->in_flight > 0)
        t->in_flight--;
    if (t->state != TK_READY)
        pthread_cond_broadcast(&t->cond); /* a rebuild may be draining */
    else if (t->queue != NULL)
        pthread_cond_signal(&t->queue->cond);
    pthread_mutex_unlock(&t->lock);
    op_token = NULL;
}

token_state token_set_token_state(const token_set *set, size_t i, time_t *since,
                                  const char **reason)
{
    struct tk_token *t;
    token_state state;

    if (i >= set->ntokens)
        return TOKEN_STATE_DOWN;
    t = set->tokens[i];
    pthread_mutex_lock(&t->lock);
    state = state_public(t);
    if (since != NULL)
        *since = t->changed;
    if (reason != NULL)
        *reason = t->state == TK_READY        ? NULL
                  : t->state == TK_RECOVERING ? "the token is being re-opened"
                                              : t->reason;
    pthread_mutex_unlock(&t->lock);
    return state;
}

void token_set_token_stats(const token_set *set, size_t i, token_stats *out)
{
    const struct tk_waiter *w;
    struct tk_token *t;

    memset(out, 0, sizeof(*out));
    if (i >= set->ntokens)
        return;
    t = set->tokens[i];
    pthread_mutex_lock(&t->lock);
    *out = t->stats;
    out->in_flight = t->in_flight;
    for (w = t->queue; w != NULL; w = w->next)
        out->waiting++;
    out->max_sessions = t->max_sessions;
    pthread_mutex_unlock(&t->lock);
}
