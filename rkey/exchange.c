/*
 * ECDH with a remote key: the key agreement of CMS
 * (KeyAgreeRecipientInfo). The backend returns the raw shared secret Z
 * (CKM_ECDH1_DERIVE with CKD_NULL); the X9.63 KDF that OpenSSL's CMS asks
 * for (kdf type, digest, output length and the ECC-CMS-SharedInfo as ukm)
 * runs here, with the default provider's X963KDF.
 *
 * The peer is a key of our key manager: CMS copies the group of our key
 * into a new key and sets the originator's point on it; a peer of the
 * default provider is exported to ours by OpenSSL. Its point is checked
 * to lie on our curve before the backend sees it (an invalid-curve point
 * would leak bits of the token's key).
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "rkey/internal.h"

/* An uncompressed point of P-521, the largest curve OpenSSL names. */
#define MAX_POINT (1 + 2 * 66)

typedef struct exch_ctx {
    rkey_key *key;
    rkey_key *peer;
    int cofactor_mode; /* -1: the key's own (cofactor 1: the same) */
    int x963;          /* the X9.63 KDF, else Z as it is */
    EVP_MD *kdf_md;
    size_t kdf_outlen;
    unsigned char *ukm;
    size_t ukm_len;
} exch_ctx;

static OSSL_FUNC_keyexch_newctx_fn exch_newctx;
static OSSL_FUNC_keyexch_freectx_fn exch_freectx;
static OSSL_FUNC_keyexch_dupctx_fn exch_dupctx;
static OSSL_FUNC_keyexch_init_fn exch_init;
static OSSL_FUNC_keyexch_set_peer_fn exch_set_peer;
static OSSL_FUNC_keyexch_derive_fn exch_derive;
static OSSL_FUNC_keyexch_get_ctx_params_fn exch_get_params;
static OSSL_FUNC_keyexch_gettable_ctx_params_fn exch_gettable;
static OSSL_FUNC_keyexch_set_ctx_params_fn exch_set_params;
static OSSL_FUNC_keyexch_settable_ctx_params_fn exch_settable;

static void *exch_newctx(void *provctx)
{
    exch_ctx *c = calloc(1, sizeof(*c));

    if (c != NULL)
        c->cofactor_mode = -1;
    return c;
}

static void exch_freectx(void *vctx)
{
    exch_ctx *c = vctx;

    if (c == NULL)
        return;
    rkey_key_down(c->key);
    rkey_key_down(c->peer);
    EVP_MD_free(c->kdf_md);
    OPENSSL_clear_free(c->ukm, c->ukm_len);
    free(c);
}

static void *exch_dupctx(void *vctx)
{
    const exch_ctx *c = vctx;
    exch_ctx *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    *d = *c;
    d->ukm = NULL;
    if (c->ukm != NULL &&
        (d->ukm = OPENSSL_memdup(c->ukm, c->ukm_len)) == NULL) {
        free(d);
        return NULL;
    }
    rkey_key_up(d->key);
    rkey_key_up(d->peer);
    if (d->kdf_md != NULL)
        EVP_MD_up_ref(d->kdf_md);
    return d;
}

static int exch_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    exch_ctx *c = vctx;
    rkey_key *key = provkey;

    if (key == NULL || key->kind != RKEY_KIND_EC || key->ref == NULL ||
        !key->has_public) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "not a remote EC private key");
        return 0;
    }
    rkey_key_down(c->key);
    c->key = rkey_key_up(key);
    c->cofactor_mode = -1;
    c->x963 = 0;
    EVP_MD_free(c->kdf_md);
    c->kdf_md = NULL;
    c->kdf_outlen = 0;
    OPENSSL_clear_free(c->ukm, c->ukm_len);
    c->ukm = NULL;
    c->ukm_len = 0;
    return exch_set_params(c, params);
}

static int exch_set_peer(void *vctx, void *provkey)
{
    exch_ctx *c = vctx;
    rkey_key *peer = provkey;
    EVP_PKEY_CTX *check;
    int ok;

    if (c->key == NULL || peer == NULL || peer->kind != RKEY_KIND_EC ||
        !peer->has_public ||
        EVP_PKEY_parameters_eq(c->key->pub, peer->pub) != 1) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "the peer's key is not a point on the key's curve");
        return 0;
    }
    /* on the curve: what the quick check checks, and all a group of
     * cofactor 1 needs */
    check = EVP_PKEY_CTX_new_from_pkey(NULL, peer->pub, RKEY_DEFAULT_PROPQ);
    ok = check != NULL && EVP_PKEY_public_check_quick(check) == 1;
    EVP_PKEY_CTX_free(check);
    if (!ok) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "the peer's point is not on the curve");
        return 0;
    }
    rkey_key_down(c->peer);
    c->peer = rkey_key_up(peer);
    return 1;
}

/* The peer's point, uncompressed, into pt (MAX_POINT octets); its field
 * length (the length of Z) in *field. */
static int peer_point(const exch_ctx *c, unsigned char *pt, size_t *pt_len,
                      size_t *field)
{
    BIGNUM *x = NULL, *y = NULL;
    size_t len;
    int ok = 0;

    if (!EVP_PKEY_get_octet_string_param(c->peer->pub,
                                         OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, pt,
                                         MAX_POINT, &len) ||
        len < 3)
        goto out;
    if (pt[0] == 0x04 && len % 2 == 1) {
        *field = (len - 1) / 2;
        *pt_len = len;
        ok = 1;
        goto out;
    }
    /* a compressed point (the form it was given in): x and y */
    if ((pt[0] != 0x02 && pt[0] != 0x03) || 1 + 2 * (len - 1) > MAX_POINT ||
        !EVP_PKEY_get_bn_param(c->peer->pub, OSSL_PKEY_PARAM_EC_PUB_X, &x) ||
        !EVP_PKEY_get_bn_param(c->peer->pub, OSSL_PKEY_PARAM_EC_PUB_Y, &y))
        goto out;
    *field = len - 1;
    pt[0] = 0x04;
    if (BN_bn2binpad(x, pt + 1, (int)*field) < 0 ||
        BN_bn2binpad(y, pt + 1 + *field, (int)*field) < 0)
        goto out;
    *pt_len = 1 + 2 * *field;
    ok = 1;
out:
    BN_free(x);
    BN_free(y);
    if (!ok)
        rkey_raise(ERR_R_INTERNAL_ERROR, "cannot read the peer's point");
    return ok;
}

/* Cofactor ECDH is plain ECDH on a group of cofactor 1 (every curve CMS
 * recipients here use); on another it is not what the backend does. */
static int cofactor_fits(const exch_ctx *c)
{
    BIGNUM *h = NULL;
    int ok;

    if (c->cofactor_mode != 1)
        return 1;
    ok = EVP_PKEY_get_bn_param(c->key->pub, OSSL_PKEY_PARAM_EC_COFACTOR, &h) &&
         BN_is_one(h);
    BN_free(h);
    if (!ok)
        rkey_raise(ERR_R_UNSUPPORTED,
                   "cofactor ECDH on a curve whose cofactor is not 1");
    return ok;
}

static int x963_kdf(const exch_ctx *c, const unsigned char *z, size_t z_len,
                    unsigned char *out)
{
    EVP_KDF *kdf =
        EVP_KDF_fetch(NULL, OSSL_KDF_NAME_X963KDF, RKEY_DEFAULT_PROPQ);
    EVP_KDF_CTX *kctx = kdf != NULL ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM params[4], *p = params;
    int ok;

    *p++ = OSSL_PARAM_construct_utf8_string(
        OSSL_KDF_PARAM_DIGEST, (char *)EVP_MD_get0_name(c->kdf_md), 0);
    *p++ =
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)z, z_len);
    if (c->ukm != NULL)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, c->ukm,
                                                 c->ukm_len);
    *p = OSSL_PARAM_construct_end();
    ok = kctx != NULL && EVP_KDF_derive(kctx, out, c->kdf_outlen, params) == 1;
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return ok;
}

/* secret NULL: how long the secret will be, as OpenSSL asks first. */
static int exch_derive(void *vctx, unsigned char *secret, size_t *secret_len,
                       size_t out_len)
{
    exch_ctx *c = vctx;
    unsigned char pt[MAX_POINT], z[MAX_POINT];
    size_t pt_len, field, n = sizeof(z);
    int ok = 0;

    if (c->key == NULL || c->peer == NULL) {
        rkey_raise(ERR_R_PASSED_NULL_PARAMETER, "no key or no peer");
        return 0;
    }
    if (!peer_point(c, pt, &pt_len, &field))
        return 0;
    if (secret == NULL) {
        *secret_len = c->x963 ? c->kdf_outlen : field;
        return 1;
    }
    if (c->x963 &&
        (c->kdf_md == NULL || c->kdf_outlen == 0 || out_len < c->kdf_outlen)) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "the X9.63 KDF needs a digest and an output length that "
                   "fits");
        return 0;
    }
    if (!cofactor_fits(c) || rkey_call_derive(c->key, pt, pt_len, z, &n) != 0)
        goto out;
    if (n != field) {
        rkey_fail_answer("a shared secret of %zu octets on a %zu-octet field",
                         n, field);
        goto out;
    }
    if (c->x963) {
        if (!x963_kdf(c, z, n, secret)) {
            rkey_raise(ERR_R_INTERNAL_ERROR, "the X9.63 KDF failed");
            goto out;
        }
        *secret_len = c->kdf_outlen;
    } else {
        /* as the default provider does: a shorter buffer takes Z's first
         * octets */
        *secret_len = out_len < n ? out_len : n;
        memcpy(secret, z, *secret_len);
    }
    ok = 1;
out:
    OPENSSL_cleanse(z, sizeof(z));
    return ok;
}

static int exch_get_params(void *vctx, OSSL_PARAM params[])
{
    exch_ctx *c = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (p != NULL && !OSSL_PARAM_set_int(p, c->cofactor_mode))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_TYPE);
    if (p != NULL &&
        !OSSL_PARAM_set_utf8_string(p, c->x963 ? OSSL_KDF_NAME_X963KDF : ""))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST);
    if (p != NULL && !rkey_param_set_md(p, c->kdf_md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN);
    if (p != NULL && !OSSL_PARAM_set_size_t(p, c->kdf_outlen))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_UKM);
    if (p != NULL && !OSSL_PARAM_set_octet_ptr(p, c->ukm, c->ukm_len))
        return 0;
    return 1;
}

static const OSSL_PARAM gettable_params[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_ptr(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *exch_gettable(void *vctx, void *provctx)
{
    return gettable_params;
}

static int exch_set_params(void *vctx, const OSSL_PARAM params[])
{
    exch_ctx *c = vctx;
    const OSSL_PARAM *p;
    const char *name;
    const void *ukm;
    EVP_MD *md;
    size_t len;
    int mode;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params,
                                OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (p != NULL) {
        if (!OSSL_PARAM_get_int(p, &mode) || mode < -1 || mode > 1)
            return 0;
        c->cofactor_mode = mode;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_TYPE);
    if (p != NULL) {
        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
            return 0;
        if (name[0] == '\0') {
            c->x963 = 0;
        } else if (OPENSSL_strcasecmp(name, OSSL_KDF_NAME_X963KDF) == 0) {
            c->x963 = 1;
        } else {
            rkey_raise(ERR_R_UNSUPPORTED, "the KDF %.32s is not supported",
                       name);
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST);
    if (p != NULL) {
        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) ||
            (md = rkey_md_fetch(name)) == NULL)
            return 0;
        EVP_MD_free(c->kdf_md);
        c->kdf_md = md;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN);
    if (p != NULL && !OSSL_PARAM_get_size_t(p, &c->kdf_outlen))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_UKM);
    if (p != NULL) {
        if (!OSSL_PARAM_get_octet_string_ptr(p, &ukm, &len))
            return 0;
        OPENSSL_clear_free(c->ukm, c->ukm_len);
        c->ukm = NULL;
        c->ukm_len = 0;
        if (len > 0) {
            if ((c->ukm = OPENSSL_memdup(ukm, len)) == NULL)
                return 0;
            c->ukm_len = len;
        }
    }
    return 1;
}

static const OSSL_PARAM settable_params[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *exch_settable(void *vctx, void *provctx)
{
    return settable_params;
}

const OSSL_DISPATCH rkey_ecdh_exchange_functions[] = {
    {OSSL_FUNC_KEYEXCH_NEWCTX, (void (*)(void))exch_newctx},
    {OSSL_FUNC_KEYEXCH_FREECTX, (void (*)(void))exch_freectx},
    {OSSL_FUNC_KEYEXCH_DUPCTX, (void (*)(void))exch_dupctx},
    {OSSL_FUNC_KEYEXCH_INIT, (void (*)(void))exch_init},
    {OSSL_FUNC_KEYEXCH_SET_PEER, (void (*)(void))exch_set_peer},
    {OSSL_FUNC_KEYEXCH_DERIVE, (void (*)(void))exch_derive},
    {OSSL_FUNC_KEYEXCH_GET_CTX_PARAMS, (void (*)(void))exch_get_params},
    {OSSL_FUNC_KEYEXCH_GETTABLE_CTX_PARAMS, (void (*)(void))exch_gettable},
    {OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, (void (*)(void))exch_set_params},
    {OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, (void (*)(void))exch_settable},
    {0, NULL},
};
