/*
 * Signatures with a remote key: RSA PKCS#1 v1.5, RSA-PSS and ECDSA.
 *
 * The digest runs here (EVP_DigestSign* digests in the worker); only the
 * digest goes to the backend, for PKCS#1 v1.5 wrapped in the DER
 * DigestInfo that CKM_RSA_PKCS signs. ECDSA signatures come back raw
 * (r || s, as PKCS#11 makes them) and leave here DER-encoded, as OpenSSL
 * and CMS want them.
 *
 * DUPCTX matters: EVP_DigestSignFinal finalises a duplicate of the
 * context, so that the caller may go on updating, and fails without a
 * word when the signature cannot be duplicated.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "rkey/internal.h"

typedef struct sig_ctx {
    rkey_kind kind;
    rkey_key *key;
    int pad;           /* RSA: RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
    EVP_MD *md;        /* NULL until set */
    EVP_MD *mgf1;      /* PSS; NULL: md */
    int saltlen;       /* PSS: RSA_PSS_SALTLEN_* or octets */
    EVP_MD_CTX *mdctx; /* between digest_sign_init and _final */
} sig_ctx;

static const rkey_named_int pad_names[] = {
    {RSA_PKCS1_PADDING, OSSL_PKEY_RSA_PAD_MODE_PKCSV15},
    {RSA_PKCS1_PSS_PADDING, OSSL_PKEY_RSA_PAD_MODE_PSS},
    {0, NULL},
};

static const rkey_named_int saltlen_names[] = {
    {RSA_PSS_SALTLEN_DIGEST, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST},
    {RSA_PSS_SALTLEN_MAX, OSSL_PKEY_RSA_PSS_SALT_LEN_MAX},
    {RSA_PSS_SALTLEN_AUTO, OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO},
    {0, NULL},
};

static OSSL_FUNC_signature_newctx_fn rsa_newctx, ecdsa_newctx;
static OSSL_FUNC_signature_freectx_fn sig_freectx;
static OSSL_FUNC_signature_dupctx_fn sig_dupctx;
static OSSL_FUNC_signature_sign_init_fn sig_sign_init;
static OSSL_FUNC_signature_sign_fn sig_sign;
static OSSL_FUNC_signature_digest_sign_init_fn sig_digest_init;
static OSSL_FUNC_signature_digest_sign_update_fn sig_digest_update;
static OSSL_FUNC_signature_digest_sign_final_fn sig_digest_final;
static OSSL_FUNC_signature_get_ctx_params_fn sig_get_params;
static OSSL_FUNC_signature_gettable_ctx_params_fn rsa_gettable, ecdsa_gettable;
static OSSL_FUNC_signature_set_ctx_params_fn sig_set_params;
static OSSL_FUNC_signature_settable_ctx_params_fn rsa_settable, ecdsa_settable;

static void *sig_newctx(rkey_kind kind)
{
    sig_ctx *c = calloc(1, sizeof(*c));

    if (c == NULL)
        return NULL;
    c->kind = kind;
    c->pad = RSA_PKCS1_PADDING;
    c->saltlen = RSA_PSS_SALTLEN_AUTO;
    return c;
}

static void *rsa_newctx(void *provctx, const char *propq)
{
    return sig_newctx(RKEY_KIND_RSA);
}

static void *ecdsa_newctx(void *provctx, const char *propq)
{
    return sig_newctx(RKEY_KIND_EC);
}

static void sig_freectx(void *vctx)
{
    sig_ctx *c = vctx;

    if (c == NULL)
        return;
    rkey_key_down(c->key);
    EVP_MD_free(c->md);
    EVP_MD_free(c->mgf1);
    EVP_MD_CTX_free(c->mdctx);
    free(c);
}

static void *sig_dupctx(void *vctx)
{
    const sig_ctx *c = vctx;
    sig_ctx *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    *d = *c;
    d->mdctx = NULL;
    rkey_key_up(d->key);
    if (d->md != NULL)
        EVP_MD_up_ref(d->md);
    if (d->mgf1 != NULL)
        EVP_MD_up_ref(d->mgf1);
    if (c->mdctx != NULL && ((d->mdctx = EVP_MD_CTX_new()) == NULL ||
                             !EVP_MD_CTX_copy_ex(d->mdctx, c->mdctx))) {
        sig_freectx(d);
        return NULL;
    }
    return d;
}

/* provkey NULL: a re-initialisation, with the key the context has. */
static int sig_init(sig_ctx *c, void *provkey, const OSSL_PARAM params[])
{
    rkey_key *key = provkey;

    if (key != NULL) {
        if (key->kind != c->kind || key->ref == NULL || !key->has_public) {
            rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                       "not a remote private key of the right type");
            return 0;
        }
        rkey_key_down(c->key);
        c->key = rkey_key_up(key);
    } else if (c->key == NULL) {
        rkey_raise(ERR_R_PASSED_NULL_PARAMETER, "no key");
        return 0;
    }
    c->pad = RSA_PKCS1_PADDING;
    c->saltlen = RSA_PSS_SALTLEN_AUTO;
    EVP_MD_free(c->md);
    EVP_MD_free(c->mgf1);
    EVP_MD_CTX_free(c->mdctx);
    c->md = c->mgf1 = NULL;
    c->mdctx = NULL;
    return sig_set_params(c, params);
}

static int sig_sign_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    return sig_init(vctx, provkey, params);
}

/* The salt length PSS signs with: RFC 8017's emLen - hLen - 2 at most. */
static int pss_salt(const sig_ctx *c, int *salt)
{
    int hlen = EVP_MD_get_size(c->md);
    int emlen = (EVP_PKEY_get_bits(c->key->pub) - 1 + 7) / 8;
    int max = emlen - hlen - 2;

    switch (c->saltlen) {
    case RSA_PSS_SALTLEN_DIGEST:
        *salt = hlen;
        break;
    case RSA_PSS_SALTLEN_AUTO:
    case RSA_PSS_SALTLEN_MAX:
        *salt = max;
        break;
    default:
        *salt = c->saltlen;
    }
    if (*salt < 0 || *salt > max) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "a PSS salt of %d octets does not fit the key", *salt);
        return 0;
    }
    return 1;
}

/* The DER DigestInfo (RFC 8017, 9.2) of a digest: what CKM_RSA_PKCS signs. */
static int digest_info(int md_nid, const unsigned char *d, size_t d_len,
                       unsigned char **der, int *der_len)
{
    X509_SIG *xs = X509_SIG_new();
    X509_ALGOR *alg;
    ASN1_OCTET_STRING *os;
    int ok = 0;

    *der = NULL;
    if (xs == NULL)
        return 0;
    X509_SIG_getm(xs, &alg, &os);
    if (X509_ALGOR_set0(alg, OBJ_nid2obj(md_nid), V_ASN1_NULL, NULL) &&
        ASN1_OCTET_STRING_set(os, d, (int)d_len) &&
        (*der_len = i2d_X509_SIG(xs, der)) > 0)
        ok = 1;
    X509_SIG_free(xs);
    return ok;
}

static int sign_rsa(sig_ctx *c, rkey_sign_params *p, unsigned char *sig,
                    size_t *sig_len, size_t k, const unsigned char *tbs,
                    size_t tbs_len)
{
    unsigned char *info = NULL;
    int info_len, ok = 0;
    size_t n = k;

    if (c->pad == RSA_PKCS1_PSS_PADDING) {
        if (c->md == NULL) {
            rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT, "PSS needs a digest");
            return 0;
        }
        p->mech = RKEY_SIGN_RSA_PSS;
        p->mgf1_nid = EVP_MD_get_type(c->mgf1 != NULL ? c->mgf1 : c->md);
        if (!pss_salt(c, &p->salt_len))
            return 0;
    } else {
        p->mech = RKEY_SIGN_RSA_PKCS1;
        /* Without a digest the input is signed as it is (it is the
         * DigestInfo already, or whatever the caller means). */
        if (c->md != NULL) {
            if (!digest_info(p->md_nid, tbs, tbs_len, &info, &info_len)) {
                rkey_raise(ERR_R_INTERNAL_ERROR, "cannot encode a DigestInfo");
                return 0;
            }
            tbs = info;
            tbs_len = (size_t)info_len;
        }
        if (tbs_len + RSA_PKCS1_PADDING_SIZE > k) {
            rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                       "%zu octets are too many for the key", tbs_len);
            goto out;
        }
    }
    if (rkey_call_sign(c->key, p, tbs, tbs_len, sig, &n) != 0)
        goto out;
    if (n != k) {
        rkey_fail_answer("an RSA signature of %zu octets for a %zu-octet key",
                         n, k);
        goto out;
    }
    *sig_len = n;
    ok = 1;
out:
    OPENSSL_free(info);
    return ok;
}

/* ECDSA: r || s from the backend, each as long as the group order, into
 * the DER ECDSA-Sig-Value at sig (room for sig_size octets). */
static int sign_ecdsa(sig_ctx *c, rkey_sign_params *p, unsigned char *sig,
                      size_t *sig_len, size_t sig_size,
                      const unsigned char *tbs, size_t tbs_len)
{
    size_t half = ((size_t)EVP_PKEY_get_bits(c->key->pub) + 7) / 8;
    unsigned char raw[2 * 66 + 2];
    size_t n = sizeof(raw);
    ECDSA_SIG *es = NULL;
    BIGNUM *r = NULL, *s = NULL;
    unsigned char *q = sig;
    int der_len, ok = 0;

    p->mech = RKEY_SIGN_ECDSA;
    if (2 * half > sizeof(raw)) {
        rkey_raise(ERR_R_UNSUPPORTED, "the curve is too large");
        return 0;
    }
    if (rkey_call_sign(c->key, p, tbs, tbs_len, raw, &n) != 0)
        return 0;
    if (n != 2 * half) {
        rkey_fail_answer("an ECDSA signature of %zu octets, not r || s of "
                         "%zu each",
                         n, half);
        goto out;
    }
    es = ECDSA_SIG_new();
    r = BN_bin2bn(raw, (int)half, NULL);
    s = BN_bin2bn(raw + half, (int)half, NULL);
    if (es == NULL || r == NULL || s == NULL || !ECDSA_SIG_set0(es, r, s)) {
        BN_free(r);
        BN_free(s);
        rkey_raise(ERR_R_INTERNAL_ERROR, "out of memory");
        goto out;
    }
    der_len = i2d_ECDSA_SIG(es, NULL);
    if (der_len <= 0 || (size_t)der_len > sig_size ||
        i2d_ECDSA_SIG(es, &q) != der_len) {
        rkey_raise(ERR_R_INTERNAL_ERROR, "cannot encode the signature");
        goto out;
    }
    *sig_len = (size_t)der_len;
    ok = 1;
out:
    ECDSA_SIG_free(es);
    OPENSSL_cleanse(raw, sizeof(raw));
    return ok;
}

/* sig NULL: the largest signature, as OpenSSL asks before signing. */
static int do_sign(sig_ctx *c, unsigned char *sig, size_t *sig_len,
                   size_t sig_size, const unsigned char *tbs, size_t tbs_len)
{
    rkey_sign_params p = {0};
    size_t max;

    if (c->key == NULL) {
        rkey_raise(ERR_R_PASSED_NULL_PARAMETER, "no key");
        return 0;
    }
    max = (size_t)EVP_PKEY_get_size(c->key->pub);
    if (sig == NULL) {
        *sig_len = max;
        return 1;
    }
    if (sig_size < max) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "room for %zu octets, the signature may take %zu", sig_size,
                   max);
        return 0;
    }
    if (c->md != NULL && tbs_len != (size_t)EVP_MD_get_size(c->md)) {
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "%zu octets are not a %s digest", tbs_len,
                   EVP_MD_get0_name(c->md));
        return 0;
    }
    p.md_nid = c->md != NULL ? EVP_MD_get_type(c->md) : NID_undef;
    if (c->kind == RKEY_KIND_EC)
        return sign_ecdsa(c, &p, sig, sig_len, sig_size, tbs, tbs_len);
    return sign_rsa(c, &p, sig, sig_len, max, tbs, tbs_len);
}

static int sig_sign(void *vctx, unsigned char *sig, size_t *sig_len,
                    size_t sig_size, const unsigned char *tbs, size_t tbs_len)
{
    return do_sign(vctx, sig, sig_len, sig_size, tbs, tbs_len);
}

static int set_md(sig_ctx *c, EVP_MD **slot, const char *name)
{
    EVP_MD *md = rkey_md_fetch(name);

    if (md == NULL)
        return 0;
    /* the digest of a digest-sign in progress is the one it started with */
    if (slot == &c->md && c->mdctx != NULL && c->md != NULL &&
        EVP_MD_get_type(md) != EVP_MD_get_type(c->md)) {
        EVP_MD_free(md);
        rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT,
                   "the digest cannot change while digesting");
        return 0;
    }
    EVP_MD_free(*slot);
    *slot = md;
    return 1;
}

static int sig_digest_init(void *vctx, const char *mdname, void *provkey,
                           const OSSL_PARAM params[])
{
    sig_ctx *c = vctx;

    if (!sig_init(c, provkey, NULL))
        return 0;
    /* EVP_DigestSignInit without a digest asks the key manager for the
     * default one first; this is for callers that pass "" */
    if (!set_md(c, &c->md, mdname != NULL && mdname[0] ? mdname : "SHA256"))
        return 0;
    c->mdctx = EVP_MD_CTX_new();
    if (c->mdctx == NULL || !EVP_DigestInit_ex2(c->mdctx, c->md, NULL))
        return 0;
    return sig_set_params(c, params);
}

static int sig_digest_update(void *vctx, const unsigned char *data, size_t len)
{
    sig_ctx *c = vctx;

    return c->mdctx != NULL && EVP_DigestUpdate(c->mdctx, data, len);
}

static int sig_digest_final(void *vctx, unsigned char *sig, size_t *sig_len,
                            size_t sig_size)
{
    sig_ctx *c = vctx;
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int d_len = 0;

    if (c->mdctx == NULL)
        return 0;
    if (sig == NULL)
        return do_sign(c, NULL, sig_len, 0, NULL, 0);
    if (!EVP_DigestFinal_ex(c->mdctx, d, &d_len))
        return 0;
    return do_sign(c, sig, sig_len, sig_size, d, d_len);
}

/* RSASSA-PSS-params (RFC 4055): fields at their default (SHA-1, MGF1
 * with SHA-1, a salt of 20, trailer 1) left out, as DER wants. */
static int pss_algorithm(const sig_ctx *c, X509_ALGOR *alg)
{
    const EVP_MD *mgf1 = c->mgf1 != NULL ? c->mgf1 : c->md;
    RSA_PSS_PARAMS *pss = RSA_PSS_PARAMS_new();
    X509_ALGOR *mgf1_md = NULL;
    ASN1_STRING *os = NULL;
    int salt, ok = 0;

    if (pss == NULL || !pss_salt(c, &salt))
        goto out;
    if (EVP_MD_get_type(c->md) != NID_sha1) {
        if ((pss->hashAlgorithm = X509_ALGOR_new()) == NULL)
            goto out;
        X509_ALGOR_set_md(pss->hashAlgorithm, c->md);
    }
    if (EVP_MD_get_type(mgf1) != NID_sha1) {
        if ((mgf1_md = X509_ALGOR_new()) == NULL ||
            (pss->maskGenAlgorithm = X509_ALGOR_new()) == NULL)
            goto out;
        X509_ALGOR_set_md(mgf1_md, mgf1);
        os = ASN1_item_pack(mgf1_md, ASN1_ITEM_rptr(X509_ALGOR), NULL);
        if (os == NULL ||
            !X509_ALGOR_set0(pss->maskGenAlgorithm, OBJ_nid2obj(NID_mgf1),
                             V_ASN1_SEQUENCE, os))
            goto out;
        os = NULL;
    }
    if (salt != 20) {
        if ((pss->saltLength = ASN1_INTEGER_new()) == NULL ||
            !ASN1_INTEGER_set(pss->saltLength, salt))
            goto out;
    }
    os = ASN1_item_pack(pss, ASN1_ITEM_rptr(RSA_PSS_PARAMS), NULL);
    if (os == NULL ||
        !X509_ALGOR_set0(alg, OBJ_nid2obj(NID_rsassaPss), V_ASN1_SEQUENCE, os))
        goto out;
    os = NULL;
    ok = 1;
out:
    ASN1_STRING_free(os);
    X509_ALGOR_free(mgf1_md);
    RSA_PSS_PARAMS_free(pss);
    return ok;
}

/* The signature's AlgorithmIdentifier, DER, as X.509 and CMS write it
 * (CMS asks for it with PSS, whose parameters only the signer knows). */
static int algorithm_id(const sig_ctx *c, OSSL_PARAM *p)
{
    X509_ALGOR *alg = X509_ALGOR_new();
    unsigned char *der = NULL;
    int snid, der_len, ok = 0;

    if (alg == NULL)
        return 0;
    if (c->kind == RKEY_KIND_RSA && c->pad == RSA_PKCS1_PSS_PADDING) {
        if (!pss_algorithm(c, alg))
            goto out;
    } else if (!OBJ_find_sigid_by_algs(&snid, EVP_MD_get_type(c->md),
                                       c->kind == RKEY_KIND_RSA
                                           ? NID_rsaEncryption
                                           : NID_X9_62_id_ecPublicKey) ||
               !X509_ALGOR_set0(alg, OBJ_nid2obj(snid),
                                c->kind == RKEY_KIND_RSA ? V_ASN1_NULL
                                                         : V_ASN1_UNDEF,
                                NULL)) {
        goto out;
    }
    der_len = i2d_X509_ALGOR(alg, &der);
    ok = der_len > 0 && OSSL_PARAM_set_octet_string(p, der, (size_t)der_len);
out:
    OPENSSL_free(der);
    X509_ALGOR_free(alg);
    return ok;
}

static int sig_get_params(void *vctx, OSSL_PARAM params[])
{
    sig_ctx *c = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
    if (p != NULL && c->md != NULL && c->key != NULL && !algorithm_id(c, p))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != NULL && !rkey_param_set_md(p, c->md))
        return 0;
    if (c->kind != RKEY_KIND_RSA)
        return 1;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != NULL && !rkey_param_set_named_int(p, pad_names, c->pad))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != NULL && !rkey_param_set_named_int(p, saltlen_names, c->saltlen))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != NULL && !rkey_param_set_md(p, c->mgf1 != NULL ? c->mgf1 : c->md))
        return 0;
    return 1;
}

static const OSSL_PARAM rsa_gettable_params[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsa_gettable(void *vctx, void *provctx)
{
    return rsa_gettable_params;
}

static const OSSL_PARAM ecdsa_gettable_params[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ecdsa_gettable(void *vctx, void *provctx)
{
    return ecdsa_gettable_params;
}

static int sig_set_params(void *vctx, const OSSL_PARAM params[])
{
    sig_ctx *c = vctx;
    const OSSL_PARAM *p;
    const char *name;
    int v;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != NULL &&
        (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !set_md(c, &c->md, name)))
        return 0;
    if (c->kind != RKEY_KIND_RSA)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != NULL) {
        if (!rkey_param_get_named_int(p, pad_names, &v) ||
            (v != RSA_PKCS1_PADDING && v != RSA_PKCS1_PSS_PADDING)) {
            rkey_raise(ERR_R_UNSUPPORTED,
                       "RSA signatures are PKCS#1 v1.5 or PSS");
            return 0;
        }
        c->pad = v;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != NULL) {
        if (!rkey_param_get_named_int(p, saltlen_names, &v) ||
            v < RSA_PSS_SALTLEN_MAX) {
            rkey_raise(ERR_R_PASSED_INVALID_ARGUMENT, "bad PSS salt length");
            return 0;
        }
        c->saltlen = v;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != NULL && (!OSSL_PARAM_get_utf8_string_ptr(p, &name) ||
                      !set_md(c, &c->mgf1, name)))
        return 0;
    return 1;
}

static const OSSL_PARAM rsa_settable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsa_settable(void *vctx, void *provctx)
{
    return rsa_settable_params;
}

static const OSSL_PARAM ecdsa_settable_params[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ecdsa_settable(void *vctx, void *provctx)
{
    return ecdsa_settable_params;
}

#define SIG_COMMON                                                             \
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx},                \
        {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx},              \
        {OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init},        \
        {OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign},                  \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT,                                 \
         (void (*)(void))sig_digest_init},                                     \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE,                               \
         (void (*)(void))sig_digest_update},                                   \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL,                                \
         (void (*)(void))sig_digest_final},                                    \
        {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_params},  \
    {                                                                          \
        OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_params     \
    }

const OSSL_DISPATCH rkey_rsa_signature_functions[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))rsa_newctx},
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))rsa_gettable},
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))rsa_settable},
    SIG_COMMON,
    {0, NULL},
};

const OSSL_DISPATCH rkey_ecdsa_signature_functions[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))ecdsa_newctx},
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))ecdsa_gettable},
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))ecdsa_settable},
    SIG_COMMON,
    {0, NULL},
};
