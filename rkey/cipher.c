/*
 * RSA decryption with a remote key: RSAES-PKCS1-v1_5 and RSAES-OAEP, the
 * key transports of CMS (KeyTransRecipientInfo).
 *
 * A failed decryption is a failed call and nothing more: OpenSSL's CMS
 * then carries on with a random content-encryption key (its defence
 * against the million-message attack) and cms/ reports one failure
 * whatever the cause, so no padding oracle appears here. The backend's
 * error (a busy token, say) is kept for the thread all the same
 * (rkey_last_error), which tells a token fault from a bad message but not
 * one bad message from another.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "rkey/internal.h"

typedef struct ciph_ctx {
    rkey_key *key;
    int pad;      /* RSA_PKCS1_PADDING or RSA_PKCS1_OAEP_PADDING */
    EVP_MD *md;   /* OAEP; NULL: SHA-1, RFC 8017's default */
    EVP_MD *mgf1; /* OAEP; NULL: md */
    unsigned char *label;
    size_t label_len;
} ciph_ctx;

static const rkey_named_int pad_names[] = {
    {RSA_PKCS1_PADDING, OSSL_PKEY_RSA_PAD_MODE_PKCSV15},
    {RSA_PKCS1_OAEP_PADDING, OSSL_PKEY_RSA_PAD_MODE_OAEP},
    {0, NULL},
};

static OSSL_FUNC_asym_cipher_newctx_fn ciph_newctx;
static OSSL_FUNC_asym_cipher_freectx_fn ciph_freectx;
static OSSL_FUNC_asym_cipher_dupctx_fn ciph_dupctx;
static OSSL_FUNC_asym_cipher_decrypt_init_fn ciph_decrypt_init;
static OSSL_FUNC_asym_cipher_decrypt_fn ciph_decrypt;
static OSSL_FUNC_asym_cipher_get_ctx_params_fn ciph_get_params;
static OSSL_FUNC_asym_cipher_gettable_ctx_params_fn ciph_gettable;
static OSSL_FUNC_asym_cipher_set_ctx_params_fn ciph_set_params;
static OSSL_FUNC_asym_cipher_settable_ctx_params_fn ciph_settable;

static void *ciph_newctx(void *provctx)
{
    ciph_ctx *c = calloc(1, sizeof(*c));

    if (c != NULL)
        c->pad = RSA_PKCS1_PADDING;
    return c;
}

static void ciph_freectx(void *vctx)
{
    ciph_ctx *c = vctx;

    if (c == NULL)
        return;
    rkey_key_down(c->key);
    EVP_MD_free(c->md);
    EVP_MD_free(c->mgf1);
    OPENSSL_free(c->label);
    free(c);
}

static void *ciph_dupctx(void *vctx)
{
    const ciph_ctx *c = vctx;
    ciph_ctx *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    *d = *c;
    d->label = NULL;
    if (c->label != NULL &&
        (d->label = OPENSSL_memdup(c->label, c->label_len)) == NULL) {
        free(d);
        return NULL;
    }
    rkey_key_up(d->key);
    if (d->md != NULL)
        EVP_MD_up_ref(d->md);
    if (d->mgf1 != NULL)
        EVP_MD_up_ref(d->mgf1);
    return d;
}

static int ciph_decrypt_init(void *vctx, void *provkey,
                             const OSSL_PARAM params[])
{
    ciph_ctx *c = vctx;
    rkey_key *key = provkey;

    if (key == NULL || key->kind != RKEY_KIND_RSA || key->ref == NULL ||
        !key->has_public) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "not a remote RSA private key");
        return 0;
    }
    rkey_key_down(c->key);
    c->key = rkey_key_up(key);
    c->pad = RSA_PKCS1_PADDING;
    EVP_MD_free(c->md);
    EVP_MD_free(c->mgf1);
    OPENSSL_free(c->label);
    c->md = c->mgf1 = NULL;
    c->label = NULL;
    c->label_len = 0;
    return ciph_set_params(c, params);
}

/* out NULL: the largest plaintext, as OpenSSL asks before decrypting. */
static int ciph_decrypt(void *vctx, unsigned char *out, size_t *out_len,
                        size_t out_size, const unsigned char *in, size_t in_len)
{
    ciph_ctx *c = vctx;
    rkey_rsa_params p = {0};
    unsigned char *buf = NULL;
    size_t k, n;
    int ok = 0;

    if (c->key == NULL) {
        rkey_raise(ERR_R_PASSED_NULL_PARAMETER, "no key");
        return 0;
    }
    k = (size_t)EVP_PKEY_get_size(c->key->pub);
    if (out == NULL) {
        *out_len = k;
        return 1;
    }
    /* RFC 8017: the ciphertext is exactly as long as the modulus */
    if (in_len != k) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "a ciphertext of %zu octets for a %zu-octet key", in_len, k);
        return 0;
    }
    if (c->pad == RSA_PKCS1_OAEP_PADDING) {
        p.padding = RKEY_RSA_OAEP;
        p.md_nid = c->md != NULL ? EVP_MD_get_type(c->md) : NID_sha1;
        p.mgf1_nid = c->mgf1 != NULL ? EVP_MD_get_type(c->mgf1) : p.md_nid;
        p.label = c->label;
        p.label_len = c->label_len;
    } else {
        p.padding = RKEY_RSA_PKCS1;
    }
    buf = OPENSSL_malloc(k);
    if (buf == NULL)
        return 0;
    n = k;
    if (rkey_call_decrypt(c->key, &p, in, in_len, buf, &n) != 0)
        goto out;
    if (n > k) {
        rkey_fail_answer("a plaintext of %zu octets from a %zu-octet key", n,
                         k);
        goto out;
    }
    if (n > out_size) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "room for %zu octets, the plaintext has %zu", out_size, n);
        goto out;
    }
    memcpy(out, buf, n);
    *out_len = n;
    ok = 1;
out:
    OPENSSL_clear_free(buf, k);
    return ok;
}

static int ciph_get_params(void *vctx, OSSL_PARAM params[])
{
    ciph_ctx *c = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != NULL && !rkey_param_set_named_int(p, pad_names, c->pad))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != NULL && !rkey_param_set_md(p, c->md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST);
    if (p != NULL && !rkey_param_set_md(p, c->mgf1 != NULL ? c->mgf1 : c->md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL);
    if (p != NULL && !OSSL_PARAM_set_octet_ptr(p, c->label, c->label_len))
        return 0;
    return 1;
}

static const OSSL_PARAM gettable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_octet_ptr(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ciph_gettable(void *vctx, void *provctx)
{
    return gettable_params;
}

static int set_md(EVP_MD **slot, const OSSL_PARAM *p)
{
    const char *name;
    EVP_MD *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) ||
        (md = rkey_md_fetch(name)) == NULL)
        return 0;
    EVP_MD_free(*slot);
    *slot = md;
    return 1;
}

static int ciph_set_params(void *vctx, const OSSL_PARAM params[])
{
    ciph_ctx *c = vctx;
    const OSSL_PARAM *p;
    const void *label;
    size_t label_len;
    int v;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != NULL) {
        if (!rkey_param_get_named_int(p, pad_names, &v) ||
            (v != RSA_PKCS1_PADDING && v != RSA_PKCS1_OAEP_PADDING)) {
            rkey_raise(ERR_R_UNSUPPORTED,
                       "RSA decryption is PKCS#1 v1.5 or OAEP");
            return 0;
        }
        c->pad = v;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != NULL && !set_md(&c->md, p))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST);
    if (p != NULL && !set_md(&c->mgf1, p))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL);
    if (p != NULL) {
        if (!OSSL_PARAM_get_octet_string_ptr(p, &label, &label_len))
            return 0;
        OPENSSL_free(c->label);
        c->label = NULL;
        c->label_len = 0;
        if (label_len > 0) {
            if ((c->label = OPENSSL_memdup(label, label_len)) == NULL)
                return 0;
            c->label_len = label_len;
        }
    }
    return 1;
}

static const OSSL_PARAM settable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ciph_settable(void *vctx, void *provctx)
{
    return settable_params;
}

const OSSL_DISPATCH rkey_rsa_cipher_functions[] = {
    {OSSL_FUNC_ASYM_CIPHER_NEWCTX, (void (*)(void))ciph_newctx},
    {OSSL_FUNC_ASYM_CIPHER_FREECTX, (void (*)(void))ciph_freectx},
    {OSSL_FUNC_ASYM_CIPHER_DUPCTX, (void (*)(void))ciph_dupctx},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, (void (*)(void))ciph_decrypt_init},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT, (void (*)(void))ciph_decrypt},
    {OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, (void (*)(void))ciph_get_params},
    {OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, (void (*)(void))ciph_gettable},
    {OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, (void (*)(void))ciph_set_params},
    {OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, (void (*)(void))ciph_settable},
    {0, NULL},
};
