/*
 * The provider: registration, the errors kept for a thread, and the key
 * manager. Why a provider rather than RSA_METHOD / EC_KEY_METHOD hooks is
 * in docs/DESIGN.md ("Keys in another process: the rkey provider").
 *
 * A key of ours holds no key material of its own. What OpenSSL may know of
 * it (the public parts, the group, the sizes, the default digest) lives in
 * a key of the default provider made from the certificate's public key,
 * and the key manager answers from that key: get_params, export of the
 * public parts, match and validate are the default provider's own code on
 * public data. The private half is a reference to the backend's handle,
 * which nothing exports.
 *
 * OpenSSL 3.0 tries an operation on the provider its property query
 * prefers first ("?provider=default"), exporting our key there with every
 * part selected; that export fails (there is a private half it cannot
 * have), and OpenSSL then takes the operation from our provider, the key's
 * own. The default provider thus never holds one of our keys without its
 * private half and mistakes it for a public key.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "rkey/internal.h"

#define PROVIDER_NAME "rkey"
/* The octet pointer to an rkey_ref that rkey_pkey_new gives the import;
 * a name no part of OpenSSL uses. */
#define PARAM_REF "smimed-rkey-ref"

/* ---- errors ---------------------------------------------------------- */

static __thread rkey_error last_error;

const char *rkey_status_name(rkey_status status)
{
    switch (status) {
    case RKEY_OK:
        return "ok";
    case RKEY_BUSY:
        return "busy";
    case RKEY_UNAVAILABLE:
        return "unavailable";
    case RKEY_NOT_FOUND:
        return "not_found";
    case RKEY_UNSUPPORTED:
        return "unsupported";
    case RKEY_FAILED:
        return "failed";
    case RKEY_AUDIT_FAILED:
        return "audit_failed";
    case RKEY_BAD_REQUEST:
        return "bad_request";
    case RKEY_INTERNAL:
        return "internal";
    }
    return "unknown";
}

void rkey_error_clear(void)
{
    memset(&last_error, 0, sizeof(last_error));
}

const rkey_error *rkey_last_error(void)
{
    return &last_error;
}

void rkey_raise(int reason, const char *fmt, ...)
{
    va_list ap;

    ERR_new();
    ERR_set_debug(OPENSSL_FILE, OPENSSL_LINE, "rkey");
    va_start(ap, fmt);
    ERR_vset_error(ERR_LIB_USER, reason, fmt, ap);
    va_end(ap);
}

static void set_error(rkey_error *err, rkey_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_error(rkey_error *err, rkey_status status, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL)
        return;
    memset(err, 0, sizeof(*err));
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

/* RKEY_INTERNAL: what failed, with OpenSSL's last reason. */
static void set_ssl_error(rkey_error *err, const char *what)
{
    char ssl[160];

    ERR_error_string_n(ERR_peek_last_error(), ssl, sizeof(ssl));
    set_error(err, RKEY_INTERNAL, "%s: %s", what, ssl);
}

/* Keeps e (a failed backend call) for the thread and raises it. */
static void keep(rkey_error *e)
{
    if (e->status == RKEY_OK)
        e->status = RKEY_INTERNAL;
    e->message[sizeof(e->message) - 1] = '\0';
    if (e->message[0] == '\0')
        snprintf(e->message, sizeof(e->message),
                 "the private-key operation failed without saying why");
    last_error = *e;
    rkey_raise(ERR_R_OPERATION_FAIL, "%s: %s", rkey_status_name(e->status),
               e->message);
}

void rkey_fail_answer(const char *fmt, ...)
{
    rkey_error e = {RKEY_INTERNAL, 0, ""};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(e.message, sizeof(e.message), fmt, ap);
    va_end(ap);
    keep(&e);
}

/* The backend of a key with a remote half; NULL (raised) for others. */
static const rkey_backend *backend_of(const rkey_key *key)
{
    if (key == NULL || key->ref == NULL) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT, "not a private key");
        return NULL;
    }
    return key->ref->be;
}

/* Kept as unsupported: a backend without the operation. */
static void unsupported(const char *what)
{
    rkey_error e = {RKEY_UNSUPPORTED, 0, ""};

    snprintf(e.message, sizeof(e.message), "the key cannot %s", what);
    keep(&e);
}

int rkey_call_sign(const rkey_key *key, const rkey_sign_params *p,
                   const unsigned char *tbs, size_t tbs_len, unsigned char *sig,
                   size_t *sig_len)
{
    const rkey_backend *be = backend_of(key);
    rkey_error e = {0};

    if (be == NULL)
        return -1;
    if (be->sign == NULL) {
        unsupported("sign");
        return -1;
    }
    if (be->sign(key->ref->handle, p, tbs, tbs_len, sig, sig_len, &e) == 0)
        return 0;
    keep(&e);
    return -1;
}

int rkey_call_decrypt(const rkey_key *key, const rkey_rsa_params *p,
                      const unsigned char *in, size_t in_len,
                      unsigned char *out, size_t *out_len)
{
    const rkey_backend *be = backend_of(key);
    rkey_error e = {0};

    if (be == NULL)
        return -1;
    if (be->decrypt == NULL) {
        unsupported("decrypt");
        return -1;
    }
    if (be->decrypt(key->ref->handle, p, in, in_len, out, out_len, &e) == 0)
        return 0;
    keep(&e);
    return -1;
}

int rkey_call_derive(const rkey_key *key, const unsigned char *peer,
                     size_t peer_len, unsigned char *z, size_t *z_len)
{
    const rkey_backend *be = backend_of(key);
    rkey_error e = {0};

    if (be == NULL)
        return -1;
    if (be->derive == NULL) {
        unsupported("derive a shared secret");
        return -1;
    }
    if (be->derive(key->ref->handle, peer, peer_len, z, z_len, &e) == 0)
        return 0;
    keep(&e);
    return -1;
}

/* ---- helpers for the operations ---------------------------------------- */

EVP_MD *rkey_md_fetch(const char *name)
{
    EVP_MD *md;

    if (name == NULL || name[0] == '\0') {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT, "no digest named");
        return NULL;
    }
    md = EVP_MD_fetch(NULL, name, RKEY_DEFAULT_PROPQ);
    if (md == NULL)
        rkey_raise(ERR_R_UNSUPPORTED, "unknown digest %.64s", name);
    return md;
}

int rkey_param_get_named_int(const OSSL_PARAM *p, const rkey_named_int *names,
                             int *value)
{
    const char *s;
    char *end;
    long v;
    size_t i;

    if (p->data_type != OSSL_PARAM_UTF8_STRING)
        return OSSL_PARAM_get_int(p, value);
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &s))
        return 0;
    for (i = 0; names != NULL && names[i].name != NULL; i++) {
        if (strcmp(s, names[i].name) == 0) {
            *value = names[i].value;
            return 1;
        }
    }
    v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < -1000 || v > 100000)
        return 0;
    *value = (int)v;
    return 1;
}

int rkey_param_set_named_int(OSSL_PARAM *p, const rkey_named_int *names,
                             int value)
{
    char num[16];
    size_t i;

    if (p->data_type != OSSL_PARAM_UTF8_STRING)
        return OSSL_PARAM_set_int(p, value);
    for (i = 0; names != NULL && names[i].name != NULL; i++)
        if (names[i].value == value)
            return OSSL_PARAM_set_utf8_string(p, names[i].name);
    snprintf(num, sizeof(num), "%d", value);
    return OSSL_PARAM_set_utf8_string(p, num);
}

int rkey_param_set_md(OSSL_PARAM *p, const EVP_MD *md)
{
    const char *name = "";

    if (md != NULL) {
        /* the short name (SHA256), which EVP_get_digestbyname knows */
        name = OBJ_nid2sn(EVP_MD_get_type(md));
        if (name == NULL)
            name = EVP_MD_get0_name(md);
    }
    return OSSL_PARAM_set_utf8_string(p, name);
}

/* ---- key data ------------------------------------------------------------ */

static rkey_ref *ref_up(rkey_ref *ref)
{
    if (ref != NULL)
        atomic_fetch_add(&ref->refs, 1);
    return ref;
}

static void ref_down(rkey_ref *ref)
{
    if (ref == NULL || atomic_fetch_sub(&ref->refs, 1) != 1)
        return;
    if (ref->armed && ref->be->release != NULL)
        ref->be->release(ref->handle);
    free(ref);
}

static rkey_key *key_new(rkey_kind kind)
{
    rkey_key *key = calloc(1, sizeof(*key));

    if (key == NULL)
        return NULL;
    atomic_init(&key->refs, 1);
    key->kind = kind;
    return key;
}

rkey_key *rkey_key_up(rkey_key *key)
{
    if (key != NULL)
        atomic_fetch_add(&key->refs, 1);
    return key;
}

void rkey_key_down(rkey_key *key)
{
    if (key == NULL || atomic_fetch_sub(&key->refs, 1) != 1)
        return;
    EVP_PKEY_free(key->pub);
    ref_down(key->ref);
    free(key);
}

static const char *kind_name(rkey_kind kind)
{
    return kind == RKEY_KIND_RSA ? "RSA" : "EC";
}

/* A name of a private value in OpenSSL's RSA and EC key parameters. */
static int is_private_param(const char *name)
{
    return strcmp(name, OSSL_PKEY_PARAM_RSA_D) == 0 ||
           strcmp(name, OSSL_PKEY_PARAM_PRIV_KEY) == 0 ||
           strncmp(name, OSSL_PKEY_PARAM_RSA_FACTOR,
                   strlen(OSSL_PKEY_PARAM_RSA_FACTOR)) == 0 ||
           strncmp(name, OSSL_PKEY_PARAM_RSA_EXPONENT,
                   strlen(OSSL_PKEY_PARAM_RSA_EXPONENT)) == 0 ||
           strncmp(name, OSSL_PKEY_PARAM_RSA_COEFFICIENT,
                   strlen(OSSL_PKEY_PARAM_RSA_COEFFICIENT)) == 0;
}

/* A key of the default provider from params (selection: what of them to
 * take), private values left out. *out NULL when params hold nothing
 * selected. */
static int pub_from_params(rkey_kind kind, int selection,
                           const OSSL_PARAM *params, EVP_PKEY **out,
                           int *has_public)
{
    const char *pub_name =
        kind == RKEY_KIND_RSA ? OSSL_PKEY_PARAM_RSA_N : OSSL_PKEY_PARAM_PUB_KEY;
    EVP_PKEY_CTX *ctx = NULL;
    OSSL_PARAM *kept = NULL;
    size_t n = 0, i, j = 0;
    int want_pub, r = -1;

    *out = NULL;
    *has_public = 0;
    while (params != NULL && params[n].key != NULL)
        n++;
    kept = OPENSSL_malloc((n + 1) * sizeof(*kept));
    if (kept == NULL)
        goto out;
    for (i = 0; i < n; i++)
        if (!is_private_param(params[i].key) &&
            strcmp(params[i].key, PARAM_REF) != 0)
            kept[j++] = params[i];
    kept[j] = OSSL_PARAM_construct_end();
    want_pub = (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) &&
               OSSL_PARAM_locate_const(kept, pub_name) != NULL;
    /* an RSA key has no domain parameters; an EC key's is its group */
    if (!want_pub &&
        (kind == RKEY_KIND_RSA ||
         !(selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) || j == 0)) {
        r = 0;
        goto out;
    }
    ctx = EVP_PKEY_CTX_new_from_name(NULL, kind_name(kind), RKEY_DEFAULT_PROPQ);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(
            ctx, out, want_pub ? EVP_PKEY_PUBLIC_KEY : EVP_PKEY_KEY_PARAMETERS,
            kept) <= 0)
        goto out;
    *has_public = want_pub;
    r = 0;
out:
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(kept);
    return r;
}

/* The group of an EC key alone, as a key of the default provider. */
static EVP_PKEY *group_only(EVP_PKEY *pub)
{
    OSSL_PARAM *params = NULL;
    EVP_PKEY *out = NULL;
    int has_public;

    if (EVP_PKEY_todata(pub, EVP_PKEY_KEY_PARAMETERS, &params) <= 0 ||
        pub_from_params(RKEY_KIND_EC, OSSL_KEYMGMT_SELECT_ALL_PARAMETERS,
                        params, &out, &has_public) != 0) {
        EVP_PKEY_free(out);
        out = NULL;
    }
    OSSL_PARAM_free(params);
    return out;
}

/* ---- the key manager -------------------------------------------------- */

static OSSL_FUNC_keymgmt_new_fn rsa_km_new, ec_km_new;
static OSSL_FUNC_keymgmt_free_fn km_free;
static OSSL_FUNC_keymgmt_has_fn km_has;
static OSSL_FUNC_keymgmt_match_fn km_match;
static OSSL_FUNC_keymgmt_validate_fn km_validate;
static OSSL_FUNC_keymgmt_import_fn km_import;
static OSSL_FUNC_keymgmt_import_types_fn rsa_km_types, ec_km_types;
static OSSL_FUNC_keymgmt_export_fn km_export;
static OSSL_FUNC_keymgmt_get_params_fn km_get_params;
static OSSL_FUNC_keymgmt_gettable_params_fn rsa_km_gettable, ec_km_gettable;
static OSSL_FUNC_keymgmt_set_params_fn km_set_params;
static OSSL_FUNC_keymgmt_settable_params_fn rsa_km_settable, ec_km_settable;
static OSSL_FUNC_keymgmt_dup_fn km_dup;
static OSSL_FUNC_keymgmt_query_operation_name_fn rsa_km_query, ec_km_query;

static void *rsa_km_new(void *provctx)
{
    return key_new(RKEY_KIND_RSA);
}

static void *ec_km_new(void *provctx)
{
    return key_new(RKEY_KIND_EC);
}

static void km_free(void *keydata)
{
    rkey_key_down(keydata);
}

static int km_has(const void *keydata, int selection)
{
    const rkey_key *key = keydata;
    int ok = 1;

    if (key == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = ok && key->has_public;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        ok = ok && key->ref != NULL;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) &&
        key->kind == RKEY_KIND_EC)
        ok = ok && key->pub != NULL;
    return ok;
}

static int km_match(const void *a, const void *b, int selection)
{
    const rkey_key *ka = a, *kb = b;

    if (ka == NULL || kb == NULL || ka->kind != kb->kind)
        return 0;
    /* Two halves of a pair match when their public parts do: a private
     * half is only ever paired with its certificate's public key. */
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return ka->has_public && kb->has_public &&
               EVP_PKEY_eq(ka->pub, kb->pub) == 1;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) &&
        ka->kind == RKEY_KIND_EC)
        return ka->pub != NULL && kb->pub != NULL &&
               EVP_PKEY_parameters_eq(ka->pub, kb->pub) == 1;
    return 1;
}

static int km_validate(const void *keydata, int selection, int checktype)
{
    const rkey_key *key = keydata;
    EVP_PKEY_CTX *ctx;
    int ok = 1;

    if (key == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && key->ref == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) {
        if (!key->has_public)
            return 0;
    } else if (!(selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) ||
               key->kind != RKEY_KIND_EC) {
        return 1;
    }
    if (key->pub == NULL)
        return 0;
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key->pub, RKEY_DEFAULT_PROPQ);
    if (ctx == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) &&
        checktype == OSSL_KEYMGMT_VALIDATE_QUICK_CHECK)
        ok = EVP_PKEY_public_check_quick(ctx) == 1;
    else if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = EVP_PKEY_public_check(ctx) == 1;
    else
        ok = EVP_PKEY_param_check(ctx) == 1;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* Public parts (and for EC the group) as the default provider takes them;
 * private values are dropped, so a key pair of the default provider
 * compared with one of ours (EVP_PKEY_eq exports one to the other's key
 * manager) is compared by its public parts. The remote half comes only
 * from rkey_pkey_new. */
static int km_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    rkey_key *key = keydata;
    const OSSL_PARAM *p;
    rkey_ref *ref = NULL;
    const void *ptr;
    size_t len;

    if (key == NULL || key->pub != NULL || key->ref != NULL)
        return 0;
    p = OSSL_PARAM_locate_const(params, PARAM_REF);
    if (p != NULL) {
        if (!(selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ||
            !OSSL_PARAM_get_octet_ptr(p, &ptr, &len) || len != sizeof(*ref))
            return 0;
        ref = (rkey_ref *)ptr;
    }
    if (pub_from_params(key->kind, selection, params, &key->pub,
                        &key->has_public) != 0)
        return 0;
    if (ref != NULL) {
        if (!key->has_public) {
            rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                       "a remote key needs its public key");
            return 0;
        }
        key->ref = ref_up(ref);
    }
    return 1;
}

static int km_export(void *keydata, int selection, OSSL_CALLBACK *cb,
                     void *cbarg)
{
    rkey_key *key = keydata;
    OSSL_PARAM none[] = {OSSL_PARAM_END};
    int sel;

    if (key == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && key->ref != NULL) {
        rkey_raise(ERR_R_UNSUPPORTED,
                   "the private key is in the key process and cannot be "
                   "exported");
        return 0;
    }
    sel = selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS;
    if (key->has_public && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
        sel |= OSSL_KEYMGMT_SELECT_PUBLIC_KEY;
    if (key->pub == NULL || sel == 0)
        return cb(none, cbarg);
    return EVP_PKEY_export(key->pub, sel, cb, cbarg);
}

static const OSSL_PARAM rsa_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM ec_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsa_km_types(int selection)
{
    return rsa_types;
}

static const OSSL_PARAM *ec_km_types(int selection)
{
    return ec_types;
}

static int km_get_params(void *keydata, OSSL_PARAM params[])
{
    rkey_key *key = keydata;
    OSSL_PARAM *p;

    if (key == NULL)
        return 0;
    for (p = params; p != NULL && p->key != NULL; p++) {
        if (is_private_param(p->key)) {
            rkey_raise(ERR_R_UNSUPPORTED,
                       "%s is a private value, which stays in the key "
                       "process",
                       p->key);
            return 0;
        }
    }
    return key->pub == NULL || EVP_PKEY_get_params(key->pub, params);
}

static const OSSL_PARAM rsa_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM ec_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_X, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_Y, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsa_km_gettable(void *provctx)
{
    return rsa_gettable;
}

static const OSSL_PARAM *ec_km_gettable(void *provctx)
{
    return ec_gettable;
}

/* The peer of an ECDH (OpenSSL's CMS copies the group of our key into a
 * new key, then sets the originator's point on it) takes a point; a key
 * with a remote half keeps its certificate's. */
static int km_set_params(void *keydata, const OSSL_PARAM params[])
{
    rkey_key *key = keydata;
    const OSSL_PARAM *p;
    OSSL_PARAM build[3];
    EVP_PKEY *pub = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    char group[64];
    const void *point;
    size_t point_len;
    int ok = 0;

    if (key == NULL)
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    if (p == NULL)
        return 1;
    if (key->kind != RKEY_KIND_EC || key->ref != NULL || key->pub == NULL ||
        !OSSL_PARAM_get_octet_string_ptr(p, &point, &point_len) ||
        !EVP_PKEY_get_utf8_string_param(key->pub, OSSL_PKEY_PARAM_GROUP_NAME,
                                        group, sizeof(group), NULL)) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "only the point of an EC key without a private half on a "
                   "named curve can be set");
        return 0;
    }
    build[0] =
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    build[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                 (void *)point, point_len);
    build[2] = OSSL_PARAM_construct_end();
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", RKEY_DEFAULT_PROPQ);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pub, EVP_PKEY_PUBLIC_KEY, build) <= 0)
        goto out;
    EVP_PKEY_free(key->pub);
    key->pub = pub;
    key->has_public = 1;
    ok = 1;
out:
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

static const OSSL_PARAM ec_settable[] = {
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM no_params[] = {OSSL_PARAM_END};

static const OSSL_PARAM *rsa_km_settable(void *provctx)
{
    return no_params;
}

static const OSSL_PARAM *ec_km_settable(void *provctx)
{
    return ec_settable;
}

static void *km_dup(const void *from, int selection)
{
    const rkey_key *src = from;
    rkey_key *key;

    if (src == NULL || (key = key_new(src->kind)) == NULL)
        return NULL;
    if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) && src->has_public) {
        EVP_PKEY_up_ref(src->pub);
        key->pub = src->pub;
        key->has_public = 1;
        if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && src->ref != NULL)
            key->ref = ref_up(src->ref);
    } else if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) &&
               src->kind == RKEY_KIND_EC && src->pub != NULL) {
        if (src->has_public) {
            key->pub = group_only(src->pub);
            if (key->pub == NULL) {
                rkey_key_down(key);
                return NULL;
            }
        } else {
            EVP_PKEY_up_ref(src->pub);
            key->pub = src->pub;
        }
    }
    return key;
}

static const char *rsa_km_query(int operation_id)
{
    return "RSA";
}

static const char *ec_km_query(int operation_id)
{
    switch (operation_id) {
    case OSSL_OP_SIGNATURE:
        return "ECDSA";
    case OSSL_OP_KEYEXCH:
        return "ECDH";
    default:
        return NULL;
    }
}

#define KM_COMMON                                                              \
    {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))km_free},                         \
        {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))km_has},                       \
        {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))km_match},                   \
        {OSSL_FUNC_KEYMGMT_VALIDATE, (void (*)(void))km_validate},             \
        {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))km_import},                 \
        {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))km_export},                 \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))km_get_params},         \
        {OSSL_FUNC_KEYMGMT_SET_PARAMS, (void (*)(void))km_set_params},         \
    {                                                                          \
        OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))km_dup                          \
    }

static const OSSL_DISPATCH rsa_keymgmt_functions[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))rsa_km_new},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))rsa_km_types},
    {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))rsa_km_types},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))rsa_km_gettable},
    {OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))rsa_km_settable},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))rsa_km_query},
    KM_COMMON,
    {0, NULL},
};

static const OSSL_DISPATCH ec_keymgmt_functions[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))ec_km_new},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))ec_km_types},
    {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))ec_km_types},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))ec_km_gettable},
    {OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))ec_km_settable},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))ec_km_query},
    KM_COMMON,
    {0, NULL},
};

/* ---- the provider ------------------------------------------------------ */

/* The default provider's names: an algorithm's names must be the same in
 * every provider of a library context. */
#define RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"
#define EC_NAMES "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define PROPS "provider=" PROVIDER_NAME

static const OSSL_ALGORITHM keymgmt_algs[] = {
    {RSA_NAMES, PROPS, rsa_keymgmt_functions, "RSA key in the key process"},
    {EC_NAMES, PROPS, ec_keymgmt_functions, "EC key in the key process"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM signature_algs[] = {
    {RSA_NAMES, PROPS, rkey_rsa_signature_functions, NULL},
    {"ECDSA", PROPS, rkey_ecdsa_signature_functions, NULL},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM cipher_algs[] = {
    {RSA_NAMES, PROPS, rkey_rsa_cipher_functions, NULL},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM exchange_algs[] = {
    {"ECDH", PROPS, rkey_ecdh_exchange_functions, NULL},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *prov_query(void *provctx, int operation_id,
                                        int *no_cache)
{
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT:
        return keymgmt_algs;
    case OSSL_OP_SIGNATURE:
        return signature_algs;
    case OSSL_OP_ASYM_CIPHER:
        return cipher_algs;
    case OSSL_OP_KEYEXCH:
        return exchange_algs;
    default:
        return NULL;
    }
}

static const OSSL_PARAM prov_gettable[] = {
    OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, NULL, 0),
    OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *prov_gettable_params(void *provctx)
{
    return prov_gettable;
}

static int prov_get_params(void *provctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
    if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, "smimed remote keys"))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
    if (p != NULL && !OSSL_PARAM_set_int(p, 1))
        return 0;
    return 1;
}

static const OSSL_DISPATCH prov_functions[] = {
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))prov_query},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))prov_gettable_params},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))prov_get_params},
    {0, NULL},
};

static int prov_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                     const OSSL_DISPATCH **out, void **provctx)
{
    *out = prov_functions;
    *provctx = (void *)handle;
    return 1;
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static rkey_error init_error;
static atomic_int initialised;
static OSSL_PROVIDER *default_provider, *rkey_provider;

static void init_failed(const char *what)
{
    set_ssl_error(&init_error, what);
    ERR_clear_error();
}

/* Run by OPENSSL_cleanup (at exit), before it frees the library context:
 * what is left of a provider once the context is gone is reachable from
 * nothing (an optimising compiler keeps no store to these two pointers,
 * never read), and the leak checker reports it. */
static void unload_providers(void)
{
    if (rkey_provider != NULL)
        OSSL_PROVIDER_unload(rkey_provider);
    if (default_provider != NULL)
        OSSL_PROVIDER_unload(default_provider);
}

static void init_run(void)
{
    /* Loading a provider explicitly switches off the implicit loading of
     * the default one, so that is loaded too. The providers stay loaded
     * until the process exits. */
    if (OPENSSL_atexit(unload_providers) != 1) {
        init_failed("cannot register the providers' unloading");
        return;
    }
    if (OSSL_PROVIDER_add_builtin(NULL, PROVIDER_NAME, prov_init) != 1) {
        init_failed("cannot register the rkey provider");
        return;
    }
    default_provider = OSSL_PROVIDER_load(NULL, "default");
    if (default_provider == NULL) {
        init_failed("cannot load the default provider");
        return;
    }
    rkey_provider = OSSL_PROVIDER_load(NULL, PROVIDER_NAME);
    if (rkey_provider == NULL) {
        init_failed("cannot load the rkey provider");
        return;
    }
    if (EVP_set_default_properties(NULL, "?provider=default") != 1) {
        init_failed("cannot prefer the default provider");
        return;
    }
    initialised = 1;
}

int rkey_provider_init(rkey_error *err)
{
    pthread_once(&init_once, init_run);
    if (initialised)
        return 0;
    if (err != NULL)
        *err = init_error;
    return -1;
}

EVP_PKEY *rkey_pkey_new(const rkey_backend *be, void *handle, X509 *cert,
                        rkey_error *err)
{
    EVP_PKEY *pub, *pkey = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    OSSL_PARAM *data = NULL, *params = NULL, extra[2];
    rkey_ref *ref = NULL;
    rkey_kind kind;
    char group[64];

    if (!initialised) {
        set_error(err, RKEY_INTERNAL, "rkey_provider_init was not called");
        goto out;
    }
    if (be == NULL || cert == NULL) {
        set_error(err, RKEY_INTERNAL, "no backend or certificate");
        goto out;
    }
    pub = X509_get0_pubkey(cert);
    if (pub == NULL) {
        set_error(err, RKEY_UNSUPPORTED,
                  "the certificate's public key cannot be read");
        goto out;
    }
    if (EVP_PKEY_is_a(pub, "RSA")) {
        kind = RKEY_KIND_RSA;
    } else if (EVP_PKEY_is_a(pub, "EC") &&
               EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_GROUP_NAME,
                                              group, sizeof(group), NULL)) {
        kind = RKEY_KIND_EC;
    } else {
        set_error(err, RKEY_UNSUPPORTED,
                  "keys of type %s are not supported (RSA, or EC on a named "
                  "curve)",
                  EVP_PKEY_get0_type_name(pub) ? EVP_PKEY_get0_type_name(pub)
                                               : "unknown");
        goto out;
    }
    ref = calloc(1, sizeof(*ref));
    if (ref == NULL) {
        set_error(err, RKEY_INTERNAL, "out of memory");
        goto out;
    }
    atomic_init(&ref->refs, 1);
    ref->be = be;
    ref->handle = handle;
    extra[0] =
        OSSL_PARAM_construct_octet_ptr(PARAM_REF, (void **)&ref, sizeof(*ref));
    extra[1] = OSSL_PARAM_construct_end();
    if (EVP_PKEY_todata(pub, EVP_PKEY_PUBLIC_KEY, &data) <= 0 ||
        (params = OSSL_PARAM_merge(data, extra)) == NULL) {
        set_ssl_error(err, "cannot read the certificate's public key");
        goto out;
    }
    ctx = EVP_PKEY_CTX_new_from_name(NULL, kind_name(kind), PROPS);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params) <= 0) {
        set_ssl_error(err, "cannot make the remote key");
        pkey = NULL;
        goto out;
    }
    /* from here on the key's life releases the handle */
    ref->armed = 1;
out:
    if (pkey == NULL)
        ERR_clear_error();
    ref_down(ref);
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(params);
    OSSL_PARAM_free(data);
    return pkey;
}
