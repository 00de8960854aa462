/*
 * Private-key operations for the key protocol. A signature is made from
 * the digest the worker sent with the same EVP_PKEY_CTX settings CMS uses
 * (RSA: PKCS#1 v1.5 over a DigestInfo that OpenSSL builds from the md, or
 * PSS with its MGF1 digest and salt length; EC: ECDSA, DER encoded), so
 * the worker's provider gets the bytes CMS would have had from a key in
 * its own process. Everything a request says is checked against the key's
 * certificate first: the token sees only input that fits the key.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include "service/keyops.h"

static const EVP_MD *md_of(unsigned md)
{
    switch (md) {
    case PROTO_MD_SHA1:
        return EVP_sha1();
    case PROTO_MD_SHA224:
        return EVP_sha224();
    case PROTO_MD_SHA256:
        return EVP_sha256();
    case PROTO_MD_SHA384:
        return EVP_sha384();
    case PROTO_MD_SHA512:
        return EVP_sha512();
    default:
        return NULL;
    }
}

/* The DER of a DigestInfo up to its digest's octets (RFC 8017 9.2, note
 * 1), by proto_md. */
static const struct digest_info {
    unsigned md;
    unsigned char prefix[19];
    size_t len;
} digest_infos[] = {
    {PROTO_MD_SHA1,
     {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05,
      0x00, 0x04, 0x14},
     15},
    {PROTO_MD_SHA224,
     {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
      0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c},
     19},
    {PROTO_MD_SHA256,
     {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
      0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
     19},
    {PROTO_MD_SHA384,
     {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
      0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
     19},
    {PROTO_MD_SHA512,
     {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
      0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
     19},
};

/* A DigestInfo of an accepted digest becomes that digest: what is signed
 * is then built by OpenSSL again, byte for byte the same. */
static int split_digest_info(proto_sign_req *req)
{
    size_t i;

    for (i = 0; i < sizeof(digest_infos) / sizeof(digest_infos[0]); i++) {
        const struct digest_info *d = &digest_infos[i];

        if (req->digest_len == d->len + proto_md_size(d->md) &&
            memcmp(req->digest, d->prefix, d->len) == 0) {
            req->md = (uint8_t)d->md;
            req->digest += d->len;
            req->digest_len -= d->len;
            return 0;
        }
    }
    return -1;
}

static int is_rsa(EVP_PKEY *pub)
{
    return EVP_PKEY_get_base_id(pub) == EVP_PKEY_RSA;
}

static int is_ec(EVP_PKEY *pub)
{
    return EVP_PKEY_get_base_id(pub) == EVP_PKEY_EC;
}

proto_status keyops_check_sign(EVP_PKEY *pub, proto_sign_req *req, char *why,
                               size_t len)
{
    int hlen;

    if (req->mech == PROTO_SIGN_ECDSA) {
        if (!is_ec(pub)) {
            snprintf(why, len, "key %s is not an EC key", req->key);
            return PROTO_UNSUPPORTED;
        }
        return PROTO_OK;
    }
    if (!is_rsa(pub)) {
        snprintf(why, len, "key %s is not an RSA key", req->key);
        return PROTO_UNSUPPORTED;
    }
    if (req->md == PROTO_MD_NONE && split_digest_info(req) != 0) {
        snprintf(why, len, "the input is not a DigestInfo of SHA-1 or SHA-2");
        return PROTO_BAD_REQUEST;
    }
    /* EMSA-PSS: emLen >= hLen + sLen + 2, emLen the modulus' bytes (one
     * less when its bit length is 1 mod 8) */
    hlen = (int)proto_md_size(req->md);
    if (req->mech == PROTO_SIGN_RSA_PSS &&
        (long)req->salt_len + hlen + 2 > (EVP_PKEY_get_bits(pub) - 1 + 7) / 8) {
        snprintf(why, len, "a salt of %u bytes does not fit a %d-bit key",
                 req->salt_len, EVP_PKEY_get_bits(pub));
        return PROTO_BAD_REQUEST;
    }
    return PROTO_OK;
}

proto_status keyops_check_decrypt(EVP_PKEY *pub, const proto_decrypt_req *req,
                                  char *why, size_t len)
{
    if (!is_rsa(pub)) {
        snprintf(why, len, "key %s is not an RSA key", req->key);
        return PROTO_UNSUPPORTED;
    }
    if (req->ciphertext_len != (size_t)EVP_PKEY_get_size(pub)) {
        snprintf(why, len,
                 "a ciphertext of %zu bytes is not one for a %d-bit key",
                 req->ciphertext_len, EVP_PKEY_get_bits(pub));
        return PROTO_BAD_REQUEST;
    }
    return PROTO_OK;
}

EVP_PKEY *keyops_peer(EVP_PKEY *pub, const proto_derive_req *req,
                      proto_status *status, char *why, size_t len)
{
    char group[64];
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL, *check = NULL;
    EVP_PKEY *peer = NULL;
    size_t field;

    *status = PROTO_UNSUPPORTED;
    if (!is_ec(pub) ||
        !EVP_PKEY_get_group_name(pub, group, sizeof(group), NULL)) {
        snprintf(why, len, "key %s is not an EC key", req->key);
        goto out;
    }
    *status = PROTO_BAD_REQUEST;
    field = ((size_t)EVP_PKEY_get_bits(pub) + 7) / 8;
    if (req->point_len != 1 + 2 * field) {
        snprintf(why, len, "a point of %zu bytes is not on %s", req->point_len,
                 group);
        goto out;
    }
    bld = OSSL_PARAM_BLD_new();
    if (bld == NULL ||
        !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                         0) ||
        !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY,
                                          req->point, req->point_len) ||
        (params = OSSL_PARAM_BLD_to_param(bld)) == NULL)
        goto internal;
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0)
        goto internal;
    if (EVP_PKEY_fromdata(ctx, &peer, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        snprintf(why, len, "the point is not on %s", group);
        goto out;
    }
    /* the point at infinity and points off the curve or outside the
     * subgroup: what an invalid-curve attack sends */
    check = EVP_PKEY_CTX_new_from_pkey(NULL, peer, NULL);
    if (check == NULL || EVP_PKEY_public_check(check) != 1) {
        snprintf(why, len, "the point is not a valid public key on %s", group);
        EVP_PKEY_free(peer);
        peer = NULL;
        goto out;
    }
    *status = PROTO_OK;
    goto out;
internal:
    *status = PROTO_INTERNAL;
    snprintf(why, len, "out of memory");
out:
    ERR_clear_error();
    EVP_PKEY_CTX_free(check);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return peer;
}

int keyops_sign(EVP_PKEY *pkey, const proto_sign_req *req, unsigned char *out,
                size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    const EVP_MD *md = md_of(req->md);
    int ok;

    *outlen = PROTO_RSA_MAX;
    ok = ctx != NULL && md != NULL &&
         EVP_PKEY_get_size(pkey) <= PROTO_RSA_MAX &&
         EVP_PKEY_sign_init(ctx) > 0 &&
         EVP_PKEY_CTX_set_signature_md(ctx, md) > 0;
    if (ok && req->mech == PROTO_SIGN_RSA_PKCS1)
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) > 0;
    else if (ok && req->mech == PROTO_SIGN_RSA_PSS)
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) > 0 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md_of(req->mgf1_md)) > 0 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, (int)req->salt_len) > 0;
    ok =
        ok && EVP_PKEY_sign(ctx, out, outlen, req->digest, req->digest_len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

int keyops_decrypt(EVP_PKEY *pkey, const proto_decrypt_req *req,
                   unsigned char *out, size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    unsigned char *label = NULL;
    int ok;

    *outlen = PROTO_RSA_MAX;
    ok = ctx != NULL && EVP_PKEY_get_size(pkey) <= PROTO_RSA_MAX &&
         EVP_PKEY_decrypt_init(ctx) > 0;
    if (ok && req->padding == PROTO_PAD_PKCS1) {
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) > 0;
    } else if (ok) {
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
             EVP_PKEY_CTX_set_rsa_oaep_md(ctx, md_of(req->oaep_md)) > 0 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md_of(req->mgf1_md)) > 0;
        if (ok && req->label_len > 0) {
            /* the context takes the label */
            label = OPENSSL_memdup(req->label, req->label_len);
            ok = label != NULL && EVP_PKEY_CTX_set0_rsa_oaep_label(
                                      ctx, label, (int)req->label_len) > 0;
            if (!ok)
                OPENSSL_free(label);
        }
    }
    ok = ok && EVP_PKEY_decrypt(ctx, out, outlen, req->ciphertext,
                                req->ciphertext_len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

int keyops_derive(EVP_PKEY *pkey, EVP_PKEY *peer, unsigned char *out,
                  size_t *outlen)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    size_t need = 0;
    int ok;

    ok = ctx != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
         EVP_PKEY_derive_set_peer(ctx, peer) > 0 &&
         EVP_PKEY_derive(ctx, NULL, &need) > 0 && need <= PROTO_SECRET_MAX;
    *outlen = need;
    ok = ok && EVP_PKEY_derive(ctx, out, outlen) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}
