/*
 * Encryption to recipient certificates: EnvelopedData with AES-CBC,
 * AuthEnvelopedData with AES-GCM (RFC 5083/5084), KeyTransRecipientInfo for
 * RSA and KeyAgreeRecipientInfo (ECDH, OpenSSL's default
 * dhSinglePass-stdDH-sha1kdf-scheme and AES key wrap) for EC.
 *
 * Decisions:
 * - The inner entity is prepared as for signing (mime.c). One addition: an
 *   entity without Content-Type gets "Content-Type: text/plain;
 *   charset=us-ascii" first, which is what RFC 2045 makes of it anyway.
 *   Nothing is signed here, so no client bytes are at stake, and a
 *   decrypting side needs a MIME field to tell a plaintext from the garbage
 *   a wrong key yields (decrypt.c).
 * - RSA-OAEP is RSAES-OAEP with SHA-256 for both the hash and MGF1 and an
 *   empty label (RFC 4055 parameters, RFC 8017's recommended hash). PKCS#1
 *   v1.5 stays the default: every client reads it, while gpgsm 2.2 cannot
 *   decrypt OAEP at all.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/rsa.h>
#include <openssl/x509v3.h>

#include "certs/certs.h"
#include "cms/internal.h"

/* NIST SP 800-131A: RSA under 2048 bits no longer protects anything, and
 * smaller keys cannot even carry an AES-256 key with OAEP-SHA-256. */
#define MIN_RSA_BITS 2048

static const EVP_CIPHER *cipher_evp(cms_cipher cipher)
{
    switch (cipher) {
    case CMS_CIPHER_AES128_CBC:
        return EVP_aes_128_cbc();
    case CMS_CIPHER_AES192_CBC:
        return EVP_aes_192_cbc();
    case CMS_CIPHER_AES256_CBC:
        return EVP_aes_256_cbc();
    case CMS_CIPHER_AES128_GCM:
        return EVP_aes_128_gcm();
    case CMS_CIPHER_AES256_GCM:
        return EVP_aes_256_gcm();
    }
    return NULL;
}

/* The NID of the named curve of an EC key; NID_undef for explicit
 * parameters or an unknown curve. */
static int curve_nid(EVP_PKEY *pub)
{
    char name[64];
    int nid;

    if (EVP_PKEY_get_group_name(pub, name, sizeof(name), NULL) != 1)
        return NID_undef;
    nid = OBJ_sn2nid(name);
    return nid != NID_undef ? nid : EC_curve_nist2nid(name);
}

int cms_recipient_check(X509 *cert, cms_error *err)
{
    char who[128], when[32];
    EVP_PKEY *pub;
    int nid, r = -1;

    if (cert == NULL) {
        cms_set_error(err, CMS_ERR_RECIPIENT, "no recipient certificate");
        goto out;
    }
    cms_cert_label(cert, who, sizeof(who));
    if (!certs_extensions_valid(cert)) {
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s has malformed extensions", who);
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notBefore(cert)) == 0 ||
        X509_cmp_current_time(X509_get0_notAfter(cert)) == 0) {
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s has unreadable validity dates", who);
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notBefore(cert)) > 0) {
        if (cms_time_format(X509_get0_notBefore(cert), when, sizeof(when)))
            snprintf(when, sizeof(when), "a later date");
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s is not valid before %s", who, when);
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(cert)) < 0) {
        if (cms_time_format(X509_get0_notAfter(cert), when, sizeof(when)))
            snprintf(when, sizeof(when), "an earlier date");
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s expired on %s", who, when);
        goto out;
    }
    pub = X509_get0_pubkey(cert);
    if (pub == NULL) {
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s has a public key OpenSSL cannot "
                      "read",
                      who);
        goto out;
    }
    switch (EVP_PKEY_get_base_id(pub)) {
    case EVP_PKEY_RSA:
        if (EVP_PKEY_get_bits(pub) < MIN_RSA_BITS) {
            cms_set_error(err, CMS_ERR_RECIPIENT,
                          "certificate for %s has a %d-bit RSA key; at least "
                          "%d bits are needed",
                          who, EVP_PKEY_get_bits(pub), MIN_RSA_BITS);
            goto out;
        }
        break;
    case EVP_PKEY_EC:
        nid = curve_nid(pub);
        if (nid != NID_X9_62_prime256v1 && nid != NID_secp384r1 &&
            nid != NID_secp521r1) {
            cms_set_error(err, CMS_ERR_RECIPIENT,
                          "certificate for %s has an EC key on curve %s; "
                          "only P-256, P-384 and P-521 can receive mail",
                          who,
                          nid != NID_undef ? OBJ_nid2sn(nid) : "(unnamed)");
            goto out;
        }
        break;
    default:
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s has a key of type %s; only RSA "
                      "and EC keys can receive mail",
                      who,
                      EVP_PKEY_get0_type_name(pub) != NULL
                          ? EVP_PKEY_get0_type_name(pub)
                          : "unknown");
        goto out;
    }
    if (!certs_key_usage_allows(cert, CERTS_USE_DECRYPT)) {
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s: its key usage does not allow %s",
                      who, certs_key_usage_name(cert, CERTS_USE_DECRYPT));
        goto out;
    }
    if (!certs_email_allowed(cert)) {
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "certificate for %s: its extended key usage does not "
                      "include emailProtection",
                      who);
        goto out;
    }
    r = 0;
out:
    ERR_clear_error();
    return r;
}

/* Spells out RFC 2045's default Content-Type when the inner entity has
 * none; see the decisions above. */
static int add_content_type(cms_entity *ent, cms_error *err)
{
    static const char field[] =
        "Content-Type: text/plain; charset=us-ascii\r\n";
    cms_header_block hb = {0};
    cms_buf content = {0};
    int r = -1;

    if (cms_header_block_read(ent->content.data, ent->content.len, &hb, err))
        goto out;
    if (hb.content_type != NULL) {
        r = 0;
        goto out;
    }
    if (cms_buf_add(&content, field, sizeof(field) - 1) ||
        cms_buf_add(&content, ent->content.data, ent->content.len)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    cms_entity_set_content(ent, &content);
    r = 0;
out:
    cms_buf_release(&content);
    cms_header_block_release(&hb);
    return r;
}

static int add_recipient(CMS_ContentInfo *cms, X509 *cert,
                         cms_rsa_padding padding, int index, cms_error *err)
{
    EVP_PKEY *pub = cert != NULL ? X509_get0_pubkey(cert) : NULL;
    int type = pub != NULL ? EVP_PKEY_get_base_id(pub) : EVP_PKEY_NONE;
    int oaep = padding == CMS_RSA_OAEP && type == EVP_PKEY_RSA;
    CMS_RecipientInfo *ri;
    EVP_PKEY_CTX *pctx;
    char who[128], what[200];

    /* OpenSSL would take any other key type for key transport and fail
     * only when encrypting to it. */
    if (type != EVP_PKEY_RSA && type != EVP_PKEY_EC) {
        if (cert != NULL)
            cms_cert_label(cert, who, sizeof(who));
        cms_set_error(err, CMS_ERR_RECIPIENT,
                      "recipient %d (%s) has no RSA or EC key and cannot "
                      "receive encrypted mail",
                      index + 1, cert != NULL ? who : "no certificate");
        return -1;
    }
    /* CMS_KEY_PARAM leaves the key context open for the OAEP settings,
     * which CMS_final then writes into the RecipientInfo. */
    ri = CMS_add1_recipient_cert(cms, cert, oaep ? CMS_KEY_PARAM : 0);
    if (ri == NULL) {
        cms_cert_label(cert, who, sizeof(who));
        snprintf(what, sizeof(what),
                 "recipient %d (%s) cannot receive encrypted mail", index + 1,
                 who);
        cms_set_ssl_error(err, CMS_ERR_RECIPIENT, what);
        return -1;
    }
    if (!oaep)
        return 0;
    pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);
    if (pctx == NULL ||
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(pctx, EVP_sha256()) <= 0 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) <= 0) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot set up RSA-OAEP");
        return -1;
    }
    return 0;
}

/*
 * After CMS_final failed: finds the recipient it failed for. OpenSSL
 * encrypts the content-encryption key to every recipient inside CMS_final
 * and does not say which one it could not (an RSA key too small for the
 * padding, an EC key the ECDH derivation refuses), so each recipient is
 * tried alone with empty content. When one fails, err names it with
 * CMS_ERR_RECIPIENT; otherwise err stays as it was.
 */
static void blame_recipient(STACK_OF(X509) *recipients, const EVP_CIPHER *evp,
                            cms_rsa_padding padding, cms_error *err)
{
    CMS_ContentInfo *cms;
    BIO *empty;
    X509 *cert;
    char who[128], what[200];
    int i, failed = 0;

    for (i = 0; !failed && i < sk_X509_num(recipients); i++) {
        cert = sk_X509_value(recipients, i);
        cms = CMS_encrypt(NULL, NULL, evp, CMS_PARTIAL | CMS_BINARY);
        empty = BIO_new_mem_buf("", 0);
        if (cms != NULL && empty != NULL &&
            add_recipient(cms, cert, padding, i, NULL) == 0 &&
            CMS_final(cms, empty, NULL, CMS_BINARY) != 1) {
            cms_cert_label(cert, who, sizeof(who));
            snprintf(what, sizeof(what),
                     "recipient %d (%s) cannot receive encrypted mail", i + 1,
                     who);
            cms_set_ssl_error(err, CMS_ERR_RECIPIENT, what);
            failed = 1;
        }
        ERR_clear_error();
        BIO_free(empty);
        CMS_ContentInfo_free(cms);
    }
}

int cms_encrypt_entity(const unsigned char *mime, size_t len,
                       STACK_OF(X509) *recipients, cms_cipher cipher,
                       cms_rsa_padding padding, cms_result **out,
                       cms_error *err)
{
    const EVP_CIPHER *evp = cipher_evp(cipher);
    cms_entity ent = {0};
    cms_buf wire = {0};
    CMS_ContentInfo *cms = NULL;
    BIO *content = NULL;
    unsigned char *der = NULL;
    int i, der_len, r = -1;

    cms_init();
    if (out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no result");
        goto out;
    }
    if (evp == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown cipher %d", cipher);
        goto out;
    }
    if (padding != CMS_RSA_PKCS1 && padding != CMS_RSA_OAEP) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown RSA padding %d", padding);
        goto out;
    }
    if (sk_X509_num(recipients) <= 0) {
        cms_set_error(err, CMS_ERR_RECIPIENT, "no recipients");
        goto out;
    }
    if (cms_entity_parse(mime, len, &ent, err) || add_content_type(&ent, err))
        goto out;
    if (ent.content.len > INT_MAX) {
        cms_set_error(err, CMS_ERR_INPUT, "the entity is too large");
        goto out;
    }

    /* A GCM cipher makes CMS_encrypt build AuthEnvelopedData. */
    cms = CMS_encrypt(NULL, NULL, evp, CMS_PARTIAL | CMS_BINARY);
    if (cms == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot create the enveloped data");
        goto out;
    }
    for (i = 0; i < sk_X509_num(recipients); i++) {
        if (add_recipient(cms, sk_X509_value(recipients, i), padding, i, err))
            goto out;
    }
    content = BIO_new_mem_buf(ent.content.data, (int)ent.content.len);
    if (content == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot read the content to encrypt");
        goto out;
    }
    /* The content is canonical already; CMS_BINARY keeps OpenSSL from
     * touching its line ends. */
    if (CMS_final(cms, content, NULL, CMS_BINARY) != 1) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "encryption failed");
        ERR_clear_error();
        blame_recipient(recipients, evp, padding, err);
        goto out;
    }
    der_len = i2d_CMS_ContentInfo(cms, &der);
    if (der_len <= 0) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot encode the enveloped data");
        goto out;
    }
    if (cms_entity_wrap_enveloped(&ent,
                                  OBJ_obj2nid(CMS_get0_type(cms)) ==
                                      NID_id_smime_ct_authEnvelopedData,
                                  der, (size_t)der_len, &wire, err) ||
        cms_result_new(&wire, &ent, out, err))
        goto out;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    OPENSSL_free(der);
    BIO_free(content);
    CMS_ContentInfo_free(cms);
    cms_buf_release(&wire);
    cms_entity_release(&ent);
    return r;
}
