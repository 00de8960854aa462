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
 * (CLOCK_MONOTONIC) and fail with TOKEN_ERR_BUSY. The queue is first come,
 * first served: a release hands its slot to the oldest waiter, and a new
 * request never overtakes one that waits. With one condition variable for
 * all, a newcomer could take the slot before the woken waiter ran, and
 * under load some requests waited many times longer than the rest
 * (script/bench: p99 several times p50 at 32 connections). Each waiter
 * sleeps on its own condition variable, so a release wakes one thread, not
 * every waiter. There is no lock around the operations themselves.
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
 * the process logged in. When it does not, the token goes down (TK_FAULT)
 * and waiters in token_key_acquire fail at once. A TK_FAULT token is probed
 * again from token_key_usable, token_set_token_ready and token_key_acquire,
 * at most once per back-off (1 s, doubling to 30 s, no thread of its own),
 * and is ready again as soon as a probe passes. That recovery re-opens
 * nothing: libp11 keeps its sessions, object handles and key caches, which
 * is right when the fault was passing (a reader that hiccuped, a store
 * briefly unavailable) and wrong after a real device reset, whose cure,
 * PKCS11_CTX_unload, PKCS11_CTX_load, a login and fetching the keys again,
 * would pull the context from under every token set sharing it. A reset
 * token mostly shows itself by having logged the process out, which keeps
 * it down until a restart (a reload does not log in again either); if a
 * probe passes and the next operation still fails, the token simply goes
 * down again. Tokens that were down from the start (TK_DOWN) wait for a
 * reload, and a refused or locked PIN (TK_PIN_REFUSED) is never tried
 * again.
 *
 * What this does not cover: a token that vanishes in the moment between
 * the probe and libp11's first C_OpenSession; and fork, after which libp11
 * re-initialises the module and opens sessions without a probe (and,
 * since libp11 did not do the login, without logging in). Token sets are
 * therefore created after any fork and never used across one. A future
 * recovery that re-opens the module must keep the same order:
 * PKCS11_CTX_unload and PKCS11_CTX_load empty the pool again, so probe
 * before listing keys again.
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

/* How many distinct fault reasons a token keeps (see struct tk_reason). */
#define TK_FAULT_REASONS_MAX 16
#define TK_REASON_LEN 200

/* What the process knows of the PIN of one slot's token. A PKCS#11 login
 * belongs to the process, not to a token set, so this lives with the
 * module and outlives the sets of a reload. Digests only, never a PIN. */
struct tk_pins {
    int logged_in; /* we logged in, with the PIN whose digest is good */
    unsigned char good[TK_PIN_DIGEST];
    int locked; /* the token said its PIN is locked */
    unsigned nrefused;
    unsigned char refused[TK_REFUSED_MAX][TK_PIN_DIGEST];
};

struct tk_module {
    struct tk_module *next;
    unsigned refs;
    tk_probe *probe;
    PKCS11_CTX *ctx;
    /* Listed once, when the module is loaded: PKCS11_update_slots would
     * free the PKCS11_SLOT and PKCS11_TOKEN structures other token sets
     * point into. */
    PKCS11_SLOT *slots;
    unsigned int nslots;
    struct tk_pins *pins; /* one per slot */
};

enum tk_state {
    TK_READY,
    TK_DOWN,        /* since it was opened; a reload opens it again */
    TK_FAULT,       /* failed at run time; re-probed (see token_ready) */
    TK_PIN_REFUSED, /* never retried: a card locks after a few wrong PINs */
};

/* A fault reason, kept until the token is freed: token_set_token_ready and
 * token_key_usable hand out the pointer, and a caller may still be reading
 * it when the token changes state again. Each distinct text is kept once. */
struct tk_reason {
    struct tk_reason *next;
    char text[TK_REASON_LEN];
};

/* A request waiting for a session slot, on its own stack. */
struct tk_waiter {
    pthread_cond_t cond; /* CLOCK_MONOTONIC */
    struct tk_waiter *next;
    int granted; /* the releasing thread handed its slot over */
};

struct tk_token {
    char *name;
    struct tk_module *module; /* counted reference */
    PKCS11_SLOT *slot;        /* NULL until one token matched the URI */
    unsigned long slot_id;
    int optional;
    int discovery;
    int logs_in; /* its keys need our login; probes check it still holds */
    unsigned max_sessions;
    long wait_ms;
    char open_reason[TK_REASON_LEN]; /* why token_set_add left it down */
    pthread_mutex_t lock;
    unsigned in_flight;        /* under lock */
    struct tk_waiter *waiters; /* under lock: oldest first */
    struct tk_waiter **tail;   /* under lock: where the next one goes */
    enum tk_state state;       /* under lock */
    const char *reason;        /* under lock: open_reason or a fault reason */
    struct tk_reason *fault_reasons; /* under lock */
    unsigned nfault_reasons;         /* under lock */
    struct timespec next_probe;      /* under lock, TK_FAULT only */
    unsigned backoff_s;              /* under lock, TK_FAULT only */
    int probing;                     /* under lock: a re-probe is running */
};

struct token_key {
    char *name;
    struct tk_token *token;
    EVP_PKEY *pkey; /* NULL when the token is down or the key was not found */
    X509 *cert;
    STACK_OF(X509) *chain;
    char algorithm[80];
    char problem[200];     /* a fault found at load that stays; "" for none */
    char sign_problem[80]; /* key usage forbids signing; "" for none */
    char decrypt_problem[80]; /* key usage forbids decryption */
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
    if (m->pins != NULL) {
        OPENSSL_cleanse(m->pins, (m->nslots + 1) * sizeof(*m->pins));
        free(m->pins);
    }
    if (m->slots != NULL)
        PKCS11_release_all_slots(m->ctx, m->slots, m->nslots);
    if (m->ctx != NULL) {
        PKCS11_CTX_unload(m->ctx);
        PKCS11_CTX_free(m->ctx);
    }
    tk_probe_close(m->probe);
    free(m);
}

/* A counted reference to the module at path, loaded and its slots listed
 * on first use. */
static int module_get(const char *path, struct tk_module **out,
                      token_error *err)
{
    struct tk_module *m = NULL;
    tk_probe *probe;
    char why[96];
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
    m->ctx = PKCS11_CTX_new();
    if (m->ctx == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (PKCS11_CTX_load(m->ctx, path) < 0) {
        libp11_failure(why, sizeof(why));
        /* module_put must not unload a context whose load failed. */
        PKCS11_CTX_free(m->ctx);
        m->ctx = NULL;
        tk_error(err, TOKEN_ERR_CONFIG,
                 "cannot initialise PKCS#11 module %s: %s", path, why);
        goto out;
    }
    if (PKCS11_enumerate_slots(m->ctx, &m->slots, &m->nslots) < 0) {
        libp11_failure(why, sizeof(why));
        m->slots = NULL;
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 module %s: cannot list slots: %s", path, why);
        goto out;
    }
    /* + 1: a module without slots must not turn this into calloc(0). */
    m->pins = calloc(m->nslots + 1, sizeof(*m->pins));
    if (m->pins == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
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
    module_put(t->module);
    pthread_mutex_destroy(&t->lock);
    free(t->name);
    free(t);
}

static struct tk_token *token_new(const token_spec *spec, token_error *err)
{
    struct tk_token *t = calloc(1, sizeof(*t));

    if (t == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    if (pthread_mutex_init(&t->lock, NULL) != 0) {
        free(t);
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot create a mutex");
        return NULL;
    }
    t->tail = &t->waiters;
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
    snprintf(t->open_reason, sizeof(t->open_reason), "not opened");
    t->reason = t->open_reason;
    return t;
}

/* While token_set_add opens the token, before any other thread sees it. */
__attribute__((format(printf, 3, 4))) static void
token_down(struct tk_token *t, enum tk_state state, const char *fmt, ...)
{
    va_list ap;

    t->state = state;
    va_start(ap, fmt);
    vsnprintf(t->open_reason, sizeof(t->open_reason), fmt, ap);
    va_end(ap);
    t->reason = t->open_reason;
    ERR_clear_error();
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
    struct tk_pins *p = &t->module->pins[t->slot - t->module->slots];
    unsigned char d[TK_PIN_DIGEST];
    char why[96];
    unsigned long rv;
    int r = 0;

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
    if (p->logged_in) {
        if (!st->logged_in) {
            token_down(t, TK_DOWN,
                       "the token logged this process out (was it reset?); "
                       "restart to log in again");
        } else if (CRYPTO_memcmp(d, p->good, TK_PIN_DIGEST) == 0) {
            t->logs_in = 1;
            r = 1;
        } else if (pin_was_refused(p, d)) {
            token_down(t, TK_PIN_REFUSED,
                       "login failed: this PIN was refused before; not "
                       "retried (fix the PIN and restart)");
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
                   "(fix the PIN and restart)");
        goto out;
    }
    if (p->nrefused == TK_REFUSED_MAX) {
        token_down(t, TK_PIN_REFUSED,
                   "login failed: %d PINs were refused before; no other is "
                   "tried (fix the PIN and restart)",
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
        k = key_new(keys[i].label, t, b->chain, err);
        if (k == NULL || build_push_key(b, k, err) < 0)
            return -1;
        key_bind(k, &keys[i], certs, ncerts);
    }
    return 1;
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
    token_key **keys;

    tokens = realloc(set->tokens, (set->ntokens + 1) * sizeof(*tokens));
    if (tokens == NULL)
        goto oom;
    set->tokens = tokens;
    /* + 1: a token without keys must not turn this into realloc(p, 0). */
    keys = realloc(set->keys, (set->nkeys + b->nkeys + 1) * sizeof(*keys));
    if (keys == NULL)
        goto oom;
    set->keys = keys;
    if (b->nkeys > 0)
        memcpy(set->keys + set->nkeys, b->keys, b->nkeys * sizeof(*keys));
    set->nkeys += b->nkeys;
    b->nkeys = 0;
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
    if (b.tok == NULL)
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
 * forever for a session), whether it still works for us. 1 when it does;
 * otherwise 0 and why says what is wrong. Needs no lock: the module and
 * the slot id are fixed once the token is published. */
static int token_answers(const struct tk_token *t, char *why, size_t len)
{
    tk_token_state st;
    unsigned long rv;
    char ckr[64];

    rv = tk_probe_session(t->module->probe, t->slot_id, &st);
    /* Every session in use is an answer too: the token works, and is
     * busy with our own operations. */
    if (rv == TK_CKR_SESSION_COUNT)
        return 1;
    if (rv != 0) {
        tk_ckr_describe(rv, ckr, sizeof(ckr));
        snprintf(why, len, "the token does not answer: %s", ckr);
        return 0;
    }
    /* A token that was reset answers again, but logged out: its keys
     * would fail every operation. Only a restart logs in again. */
    if (t->logs_in && !st.logged_in) {
        snprintf(why, len,
                 "the token logged this process out (was it reset?); "
                 "restart to log in again");
        return 0;
    }
    return 1;
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

static void probe_after(struct tk_token *t, unsigned seconds)
{
    clock_gettime(CLOCK_MONOTONIC, &t->next_probe);
    t->next_probe.tv_sec += seconds;
    t->backoff_s = seconds;
}

/* Under t->lock. Waiters in token_key_acquire wake up and fail. */
static void token_fault(struct tk_token *t, const char *why)
{
    struct tk_waiter *w;

    t->state = TK_FAULT;
    token_set_fault_reason(t, why);
    probe_after(t, TK_BACKOFF_FIRST_S);
    for (w = t->waiters; w != NULL; w = w->next)
        pthread_cond_signal(&w->cond);
}

static int probe_due(const struct tk_token *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > t->next_probe.tv_sec ||
           (now.tv_sec == t->next_probe.tv_sec &&
            now.tv_nsec >= t->next_probe.tv_nsec);
}

/* 1 when the token is ready; otherwise 0 and *reason (when not NULL) says
 * why, in a string that stays valid as long as the token. A token down
 * with a run-time fault is probed again first, by one caller at a time,
 * when its back-off has passed; the lock is not held during the probe, so
 * operations and other callers are not held up by a slow token. */
static int token_ready(struct tk_token *t, const char **reason)
{
    char why[TK_REASON_LEN];
    int ready, ok;

    pthread_mutex_lock(&t->lock);
    if (t->state == TK_FAULT && !t->probing && probe_due(t)) {
        t->probing = 1;
        pthread_mutex_unlock(&t->lock);
        ok = token_answers(t, why, sizeof(why));
        pthread_mutex_lock(&t->lock);
        t->probing = 0;
        if (ok) {
            t->state = TK_READY;
        } else {
            token_set_fault_reason(t, why);
            probe_after(t, t->backoff_s * 2 > TK_BACKOFF_MAX_S
                               ? TK_BACKOFF_MAX_S
                               : t->backoff_s * 2);
        }
    }
    ready = t->state == TK_READY;
    if (!ready && reason != NULL)
        *reason = t->reason;
    pthread_mutex_unlock(&t->lock);
    return ready;
}

int token_key_check_fault(token_key *key, token_error *err)
{
    struct tk_token *t = key->token;
    char why[TK_REASON_LEN];
    int ready;

    pthread_mutex_lock(&t->lock);
    ready = t->state == TK_READY;
    pthread_mutex_unlock(&t->lock);
    /* A token already down explains the failure without another probe. */
    if (ready && token_answers(t, why, sizeof(why)))
        return 0;
    pthread_mutex_lock(&t->lock);
    /* Another caller may have marked it down meanwhile; its reason
     * stands. */
    if (ready && t->state == TK_READY)
        token_fault(t, why);
    tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name, t->reason);
    pthread_mutex_unlock(&t->lock);
    return -1;
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
    return token_ready(set->tokens[i], reason);
}

int token_set_token_optional(const token_set *set, size_t i)
{
    return i < set->ntokens ? set->tokens[i]->optional : 0;
}

int token_set_token_discovery(const token_set *set, size_t i)
{
    return i < set->ntokens ? set->tokens[i]->discovery : 0;
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

    if (!token_ready(key->token, &why))
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

X509 *token_key_cert0(const token_key *key)
{
    return key->cert;
}

STACK_OF(X509) *token_key_chain0(const token_key *key)
{
    return key->chain;
}

/* Under t->lock: queues the caller until a release hands it a slot (1),
 * the deadline passes or the token fails (0). */
static int wait_in_queue(struct tk_token *t, const struct timespec *deadline)
{
    struct tk_waiter w = {.next = NULL, .granted = 0}, **pp;
    pthread_condattr_t attr;
    int rc = 0;

    if (pthread_condattr_init(&attr) != 0)
        return 0;
    if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&w.cond, &attr) != 0) {
        pthread_condattr_destroy(&attr);
        return 0;
    }
    pthread_condattr_destroy(&attr);
    *t->tail = &w;
    t->tail = &w.next;
    while (!w.granted && t->state == TK_READY && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&w.cond, &t->lock, deadline);
    if (!w.granted) {
        for (pp = &t->waiters; *pp != &w; pp = &(*pp)->next)
            ;
        *pp = w.next;
        if (t->tail == &w.next)
            t->tail = pp;
    }
    pthread_cond_destroy(&w.cond);
    return w.granted;
}

int token_key_acquire(token_key *key, token_use use, EVP_PKEY **pkey,
                      token_error *err)
{
    struct tk_token *t = key->token;
    struct timespec deadline;
    const char *reason;
    int granted = 0;
    int r = -1;

    if (!token_key_usable(key, use, &reason)) {
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
    if (t->state == TK_READY && t->in_flight < t->max_sessions &&
        t->waiters == NULL) {
        t->in_flight++;
        granted = 1;
    } else if (t->state == TK_READY) {
        granted = wait_in_queue(t, &deadline);
    }
    if (granted) {
        /* a slot handed over is ours even if the token failed since: the
         * operation fails then, and its release gives the slot back */
        *pkey = key->pkey;
        r = 0;
    } else if (t->state != TK_READY) {
        tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name,
                 t->reason);
    } else {
        tk_error(err, TOKEN_ERR_BUSY,
                 "token %s: no session came free within %ld ms (%u in use)",
                 t->name, t->wait_ms, t->in_flight);
    }
    pthread_mutex_unlock(&t->lock);
    return r;
}

void token_key_release(token_key *key)
{
    struct tk_token *t = key->token;
    struct tk_waiter *w;

    pthread_mutex_lock(&t->lock);
    w = t->waiters;
    if (w != NULL && t->state == TK_READY && t->in_flight <= t->max_sessions) {
        /* the slot goes to the oldest waiter: in_flight stays */
        t->waiters = w->next;
        if (t->waiters == NULL)
            t->tail = &t->waiters;
        w->granted = 1;
        pthread_cond_signal(&w->cond);
    } else if (t->in_flight > 0) {
        /* an unpaired release must not wrap the count and shut the token */
        t->in_flight--;
    }
    pthread_mutex_unlock(&t->lock);
}
