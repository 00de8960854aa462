/*
 * Opening a token set: selecting each token, probing it, logging in and
 * resolving its keys and certificates; the set's and the keys' getters.
 *
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
 * What this does not cover: a token that vanishes in the moment between
 * the probe and libp11's first C_OpenSession; and fork, after which libp11
 * re-initialises the module and opens sessions without a probe (and,
 * since libp11 did not do the login, without logging in). Token sets are
 * therefore created after any fork and never used across one.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* timegm */
#endif
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "certs/certs.h"
#include "token/internal.h"

/* libp11 0.4.12's fixed per-slot session limit (see above). */
#define TK_LIBP11_SESSIONS 16

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
    if (!certs_extensions_valid(k->cert)) {
        snprintf(k->problem, sizeof(k->problem),
                 "certificate has invalid extensions");
        goto out;
    }
    if (!certs_key_usage_allows(k->cert, CERTS_USE_SIGN))
        snprintf(k->sign_problem, sizeof(k->sign_problem),
                 "certificate key usage does not allow %s",
                 certs_key_usage_name(k->cert, CERTS_USE_SIGN));
    if (!certs_key_usage_allows(k->cert, CERTS_USE_DECRYPT))
        snprintf(k->decrypt_problem, sizeof(k->decrypt_problem),
                 "certificate key usage does not allow %s",
                 certs_key_usage_name(k->cert, CERTS_USE_DECRYPT));
    if (!certs_email_allowed(k->cert)) {
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
        tk_libp11_failure(why, sizeof(why));
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
    token_uri_clear(&t->uri);
    free(t->pin_file);
    free(t->pin_env);
    free(t->keys);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t->name);
    free(t);
}

void tk_token_discard(struct tk_token *t)
{
    size_t i;

    /* Keys first: their EVP_PKEYs hold libp11 objects that refer to the
     * slots the last module reference releases. */
    for (i = 0; i < t->nkeys; i++)
        key_free(t->keys[i]);
    tk_module_forget(t->module, t);
    token_free(t);
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
        tk_libp11_failure(why, sizeof(why));
        tk_token_down(t, TK_DOWN, "cannot list private keys: %s", why);
        return 0;
    }
    if (PKCS11_enumerate_certs(t->slot->token, &certs, &ncerts) < 0) {
        tk_libp11_failure(why, sizeof(why));
        tk_token_down(t, TK_DOWN, "cannot list certificates: %s", why);
        return 0;
    }
    for (j = 0; j < nconfigured; j++) {
        token_key *k = b->keys[j];
        const token_uri *u = &b->key_uris[j];

        if (!tk_slot_matches(u, t->slot)) {
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
                                         CKM_ECDH1_DERIVE);
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
 * and internal errors. Called with the module's lock held. */
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
        if (tk_slot_matches(&b->uri, &m->slots[i])) {
            slot = &m->slots[i];
            matches++;
        }
    }
    if (matches == 0) {
        tk_token_down(t, TK_DOWN, "no initialised token matches the URI");
        t->absent = 1;
        return 0;
    }
    if (matches > 1) {
        tk_token_down(t, TK_DOWN,
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
        tk_token_down(t, TK_DOWN, "cannot open a session: %s", why);
        t->absent = 1;
        return 0;
    }
    if (st.max_sessions > 0 && st.max_sessions < t->max_sessions)
        t->max_sessions = (unsigned)st.max_sessions;
    rc = tk_token_login(t, pin, &st, &session, &holding, err);
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

/* The token joins the set and its module (at once when locked holds the
 * module's lock, else by the lock's next holder). */
static int build_publish(struct tk_build *b, int locked, token_error *err)
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
    if (tkeys == NULL ||
        (locked && tk_module_remember(b->tok->module, b->tok) < 0)) {
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
        tk_schedule_recovery(b->tok);
    b->tok->changed = time(NULL);
    b->tok->published = 1;
    set->tokens[set->ntokens++] = b->tok;
    if (!locked)
        tk_module_join_later(b->tok->module, b->tok);
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
    struct tk_module *m = NULL;
    struct tk_build b = {0};
    char *pin = NULL;
    int locked = 0, rc;
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
        if (tk_pin_digest(pin, b.tok->pin_digest) < 0) {
            tk_error(err, TOKEN_ERR_INTERNAL, "cannot compute a PIN digest");
            goto out;
        }
        b.tok->has_pin = 1;
    }

    rc = tk_module_get(spec->module, &m, err);
    if (rc < 0)
        goto out;
    locked = rc == 0;
    b.tok->module = m;
    if (locked) {
        if (token_open(&b, &pin, err) < 0)
            goto out;
    } else {
        /* Waiting could be for ever. The token is left down as if absent:
         * once the module answers again, a rebuild finds it and the
         * service is asked for the reload that opens it. */
        tk_token_down(b.tok, TK_DOWN,
                      "the module has been inside a call for over %d ms; the "
                      "token is opened once it answers",
                      TK_HUNG_MS);
        b.tok->absent = 1;
    }
    if (build_name(&b, err) < 0)
        goto out;
    if (build_publish(&b, locked, err) < 0)
        goto out;
    r = 0;
out:
    token_pin_free(pin);
    if (r < 0)
        error_context(err, "token", label);
    /* Its keys' libp11 objects are freed under the module's lock. */
    build_clear(&b);
    if (locked)
        tk_module_unlock(m);
    /* A token that did not join leaves its module reference behind. */
    if (r < 0)
        tk_module_put(m);
    return r;
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
    /* Each key goes with its token, under the token's module's lock; a
     * module hung inside a call frees its tokens when it is back
     * (tk_module_retire), so this never waits for one. */
    for (i = 0; i < set->ntokens; i++)
        tk_module_retire(set->tokens[i]->module, set->tokens[i]);
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
    return tk_token_ready(set->tokens[i], 0, reason);
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

    if (!tk_token_ready(key->token, 1, &why))
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
