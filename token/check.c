/*
 * A known-answer test of a token key through libp11: one private-key
 * operation on input of our own, checked with the certificate's public key.
 *
 * After a failed operation the api asks token_key_check_fault whether the
 * token is to blame. The probe (probe.c) answers for the token: does it
 * open a session, is the process still logged in. It cannot answer for
 * libp11's own handles: a token whose sessions died while the process
 * stayed logged in (a reset whose middleware restores the login, an HSM
 * that fails over to its twin) passes the probe, and every operation
 * through libp11's pooled sessions fails. A signature says why (libp11
 * leaves the CKR code on OpenSSL's error queue), but a decryption does
 * not: OpenSSL's CMS clears the queue and goes on with a random key when
 * the RSA decryption fails, so that a client cannot tell bad padding from
 * a good key that decrypts garbage (the Bleichenbacher defence).
 *
 * So the same kind of operation is run once more, through the same libp11
 * key and session pool, on input the client has no part in: a random key
 * encrypted to the certificate (RSA), an ECDH agreement with a fresh
 * ephemeral key (EC), a signature over a random digest. Its outcome, and
 * the CKR code libp11 queues when it fails, depend on the token alone, so
 * telling the client "503" rather than "422" from it reveals nothing about
 * the ciphertext.
 */
#include <string.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include "token/internal.h"

/* The module's code for the last failed libp11 call on this thread's
 * queue, 0 when none came from the module; empties the queue. */
static unsigned long queued_ckr(void)
{
    unsigned long e, rv = 0;

    while ((e = ERR_get_error()) != 0) {
        if ((int)ERR_GET_LIB(e) == ERR_get_CKR_code())
            rv = (unsigned long)ERR_GET_REASON(e);
    }
    return rv;
}

/* RSA: a 32-byte random key, PKCS#1 v1.5 encrypted to pub, must come back
 * from the token's decryption (libp11: C_DecryptInit, C_Decrypt). 1 when
 * it does, 0 when the token failed, -1 when the check could not be made. */
static int check_rsa_decrypt(EVP_PKEY *pkey, EVP_PKEY *pub)
{
    unsigned char secret[32], ct[1024], pt[1024];
    size_t ctlen = sizeof(ct), ptlen = sizeof(pt);
    EVP_PKEY_CTX *enc = NULL, *dec = NULL;
    int r = -1;

    if (EVP_PKEY_get_size(pub) > (int)sizeof(ct) ||
        RAND_bytes(secret, sizeof(secret)) != 1)
        goto out;
    enc = EVP_PKEY_CTX_new(pub, NULL);
    if (enc == NULL || EVP_PKEY_encrypt_init(enc) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(enc, RSA_PKCS1_PADDING) <= 0 ||
        EVP_PKEY_encrypt(enc, ct, &ctlen, secret, sizeof(secret)) <= 0)
        goto out;
    dec = EVP_PKEY_CTX_new(pkey, NULL);
    if (dec == NULL || EVP_PKEY_decrypt_init(dec) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(dec, RSA_PKCS1_PADDING) <= 0)
        goto out;
    ERR_clear_error();
    r = EVP_PKEY_decrypt(dec, pt, &ptlen, ct, ctlen) > 0 &&
        ptlen == sizeof(secret) && CRYPTO_memcmp(pt, secret, ptlen) == 0;
out:
    OPENSSL_cleanse(secret, sizeof(secret));
    OPENSSL_cleanse(pt, sizeof(pt));
    EVP_PKEY_CTX_free(enc);
    EVP_PKEY_CTX_free(dec);
    return r;
}

/* The ECDH shared secret of key and peer into out (*len: its size in,
 * the secret's length out). */
static int derive(EVP_PKEY *key, EVP_PKEY *peer, unsigned char *out,
                  size_t *len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(key, NULL);
    int ok;

    ok = ctx != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
         EVP_PKEY_derive_set_peer(ctx, peer) > 0 &&
         EVP_PKEY_derive(ctx, out, len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

/* EC: the token's agreement with a fresh key on the curve of pub (libp11:
 * C_DeriveKey) must equal that key's agreement with pub. */
static int check_ec_derive(EVP_PKEY *pkey, EVP_PKEY *pub)
{
    unsigned char want[256], got[256];
    size_t wantlen = sizeof(want), gotlen = sizeof(got);
    EVP_PKEY_CTX *gen = NULL;
    EVP_PKEY *eph = NULL;
    int r = -1;

    gen = EVP_PKEY_CTX_new(pub, NULL);
    if (gen == NULL || EVP_PKEY_keygen_init(gen) <= 0 ||
        EVP_PKEY_keygen(gen, &eph) <= 0 || !derive(eph, pub, want, &wantlen))
        goto out;
    ERR_clear_error();
    r = derive(pkey, eph, got, &gotlen) && gotlen == wantlen &&
        CRYPTO_memcmp(got, want, gotlen) == 0;
out:
    OPENSSL_cleanse(want, sizeof(want));
    OPENSSL_cleanse(got, sizeof(got));
    EVP_PKEY_free(eph);
    EVP_PKEY_CTX_free(gen);
    return r;
}

/* Either key type: a signature over a random SHA-256 digest (libp11:
 * C_SignInit, C_Sign) must verify with pub. */
static int check_sign(EVP_PKEY *pkey, EVP_PKEY *pub)
{
    unsigned char digest[32], sig[1024];
    size_t siglen = sizeof(sig);
    EVP_PKEY_CTX *sign = NULL, *verify = NULL;
    int r = -1;

    if (EVP_PKEY_get_size(pkey) > (int)sizeof(sig) ||
        RAND_bytes(digest, sizeof(digest)) != 1)
        goto out;
    sign = EVP_PKEY_CTX_new(pkey, NULL);
    verify = EVP_PKEY_CTX_new(pub, NULL);
    if (sign == NULL || verify == NULL || EVP_PKEY_sign_init(sign) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(sign, EVP_sha256()) <= 0 ||
        EVP_PKEY_verify_init(verify) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(verify, EVP_sha256()) <= 0)
        goto out;
    ERR_clear_error();
    r = EVP_PKEY_sign(sign, sig, &siglen, digest, sizeof(digest)) > 0 &&
        EVP_PKEY_verify(verify, sig, siglen, digest, sizeof(digest)) == 1;
out:
    EVP_PKEY_CTX_free(sign);
    EVP_PKEY_CTX_free(verify);
    return r;
}

int tk_key_known_answer(EVP_PKEY *pkey, EVP_PKEY *pub, token_use use,
                        unsigned long *ckr)
{
    int r;

    *ckr = 0;
    if (pub == NULL)
        r = -1;
    else if (use == TOKEN_USE_SIGN)
        r = check_sign(pkey, pub);
    else if (EVP_PKEY_get_base_id(pub) == EVP_PKEY_EC)
        r = check_ec_derive(pkey, pub);
    else
        r = check_rsa_decrypt(pkey, pub);
    /* Only an operation that reached the token and failed leaves its code;
     * a check that could not be set up left OpenSSL's reasons alone. */
    if (r == 0)
        *ckr = queued_ckr();
    ERR_clear_error();
    return r;
}
