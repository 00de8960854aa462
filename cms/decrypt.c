/*
 * Decryption of application/pkcs7-mime EnvelopedData and AuthEnvelopedData.
 * The key is an EVP_PKEY reached through OpenSSL's CMS API, so an RSA
 * decryption or an ECDH derivation runs wherever the key lives (a token in
 * the daemon).
 *
 * No padding oracle: when the RSA decryption of the content-encryption key
 * fails, OpenSSL's CMS carries on with a random key (the MMA defence) rather
 * than saying so. With GCM the tag then never matches; with CBC the padding
 * check fails, except about once in 256 tries, when the random key yields
 * garbage. Every failure after parsing, garbage included, is therefore one
 * status and one message, whatever the cause.
 *
 * What counts as a MIME entity after decryption: a header block that
 * cms_header_block_read accepts (every line a well-formed field or a
 * continuation, no NUL or bare CR, line breaks throughout) holding at least
 * one Content-* or MIME-Version field. Random octets form a well-formed
 * block about 3 times in a million (a "name:" line, then one ending the
 * block), one with such a field name practically never, and only one random
 * key in 256 gets that far; the body is not judged. An inner entity without
 * any MIME field (RFC 2045's text/plain default) is refused too: encryption
 * here always writes a Content-Type (encrypt.c), as mail clients do.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>

#include "cms/internal.h"

/* The one message for every failure after parsing. */
#define DECRYPT_FAILED                                                         \
    "the message cannot be decrypted with this key: the key does not fit, "    \
    "the message is damaged, or what it holds is not a MIME entity"

struct cms_envelope {
    CMS_ContentInfo *cms; /* for cms_envelope_names */
    /* Each decryption starts from a fresh parse: OpenSSL keeps the
     * content-encryption key in the structure, and a key left there by an
     * earlier attempt must not make a later one succeed. */
    unsigned char *der;
    size_t der_len;
    cms_buf outer; /* the mail headers, which go back on the result */
};

int cms_envelope_parse(const unsigned char *mime, size_t len,
                       cms_envelope **out, cms_error *err)
{
    cms_header_block hb = {0};
    GMimeContentType *ct = NULL;
    CMS_ContentInfo *cms = NULL;
    ASN1_OCTET_STRING **content;
    cms_envelope *env = NULL;
    cms_buf der = {0};
    const char *smime_type;
    char shown[128];
    int r = -1;

    if (out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no result");
        goto out;
    }
    if (cms_smime_header_read(mime, len, &hb, &ct, err) != 0)
        goto out;
    if (!cms_is_pkcs7_mime(ct)) {
        cms_content_type_text(ct, shown, sizeof(shown));
        cms_set_error(err, CMS_ERR_INPUT,
                      "Content-Type %s is not application/pkcs7-mime", shown);
        goto out;
    }
    smime_type = g_mime_content_type_get_parameter(ct, "smime-type");
    if (smime_type != NULL &&
        g_ascii_strcasecmp(smime_type, "enveloped-data") != 0 &&
        g_ascii_strcasecmp(smime_type, "authEnveloped-data") != 0) {
        cms_text_escape(shown, sizeof(shown), smime_type, strlen(smime_type));
        cms_set_error(err, CMS_ERR_INPUT,
                      "smime-type %s is not an encrypted entity", shown);
        goto out;
    }
    if (cms_body_decode(mime + hb.body, len - hb.body, hb.transfer_encoding,
                        &der, err))
        goto out;
    /* the allow-lists and the type, before OpenSSL reads any of it */
    if (cms_algs_check_enveloped(der.data, der.len, err))
        goto out;
    cms = cms_der_read(der.data, der.len, err);
    if (cms == NULL)
        goto out;
    content = CMS_get0_content(cms);
    if (content == NULL || *content == NULL) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the enveloped data carries no encrypted content");
        goto out;
    }
    if (sk_CMS_RecipientInfo_num(CMS_get0_RecipientInfos(cms)) <= 0) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the enveloped data names no recipient");
        goto out;
    }
    env = calloc(1, sizeof(*env));
    if (env == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (cms_outer_read(mime, len, &env->outer, err))
        goto out;
    env->cms = cms;
    env->der = der.data;
    env->der_len = der.len;
    cms = NULL;
    memset(&der, 0, sizeof(der));
    *out = env;
    r = 0;
out:
    if (r != 0) {
        ERR_clear_error();
        cms_envelope_free(env);
    }
    CMS_ContentInfo_free(cms);
    if (ct != NULL)
        g_object_unref(ct);
    cms_buf_release(&der);
    cms_header_block_release(&hb);
    return r;
}

void cms_envelope_free(cms_envelope *env)
{
    if (env == NULL)
        return;
    CMS_ContentInfo_free(env->cms);
    free(env->der);
    cms_buf_release(&env->outer);
    free(env);
}

int cms_envelope_names(const cms_envelope *env, X509 *cert)
{
    STACK_OF(CMS_RecipientInfo) *ris;
    STACK_OF(CMS_RecipientEncryptedKey) *reks;
    CMS_RecipientInfo *ri;
    int i, j, found = 0;

    if (env == NULL || cert == NULL)
        return 0;
    ris = CMS_get0_RecipientInfos(env->cms);
    for (i = 0; !found && i < sk_CMS_RecipientInfo_num(ris); i++) {
        ri = sk_CMS_RecipientInfo_value(ris, i);
        switch (CMS_RecipientInfo_type(ri)) {
        case CMS_RECIPINFO_TRANS:
            found = CMS_RecipientInfo_ktri_cert_cmp(ri, cert) == 0;
            break;
        case CMS_RECIPINFO_AGREE:
            reks = CMS_RecipientInfo_kari_get0_reks(ri);
            for (j = 0; !found && j < sk_CMS_RecipientEncryptedKey_num(reks);
                 j++)
                found =
                    CMS_RecipientEncryptedKey_cert_cmp(
                        sk_CMS_RecipientEncryptedKey_value(reks, j), cert) == 0;
            break;
        default:
            break;
        }
    }
    ERR_clear_error();
    return found;
}

int cms_envelope_decrypt(cms_envelope *env, EVP_PKEY *pkey, X509 *cert,
                         cms_result **out, int *is_signed, cms_error *err)
{
    cms_header_block hb = {0};
    cms_signed sd = {0};
    cms_error serr = {0};
    CMS_ContentInfo *cms = NULL;
    BIO *plain = NULL;
    cms_buf data = {0};
    const unsigned char *p;
    char *mem;
    long n;
    int signed_entity, r = -1;

    cms_init();
    if (env == NULL || pkey == NULL || out == NULL || is_signed == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no envelope, key or result");
        goto out;
    }
    p = env->der;
    cms = d2i_CMS_ContentInfo(NULL, &p, (long)env->der_len);
    plain = BIO_new(BIO_s_mem());
    if (cms == NULL || plain == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL,
                      "cannot prepare the decryption: out of memory");
        goto out;
    }
    /* With cert, OpenSSL picks the KeyTransRecipientInfo or
     * RecipientEncryptedKey naming it; without, it tries each in turn. */
    if (CMS_decrypt(cms, pkey, cert, NULL, plain, 0) != 1) {
        cms_set_error(err, CMS_ERR_DECRYPT, DECRYPT_FAILED);
        goto out;
    }
    n = BIO_get_mem_data(plain, &mem);
    if (n <= 0 ||
        cms_header_block_read((const unsigned char *)mem, (size_t)n, &hb,
                              NULL) ||
        hb.n_mime_fields == 0) {
        cms_set_error(err, CMS_ERR_DECRYPT, DECRYPT_FAILED);
        goto out;
    }
    if (cms_buf_add(&data, mem, (size_t)n)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (cms_outer_restore(&env->outer, &data, err))
        goto out;
    /* Signed means what cms_verify_entity would take as a signed entity,
     * or one it refuses for its algorithms only: that is still signed,
     * with a signature smimed does not check. */
    signed_entity = cms_signed_read(data.data, data.len, &sd, &serr) == 0 ||
                    serr.status == CMS_ERR_ALGORITHM;
    if (cms_result_new(&data, NULL, out, err))
        goto out;
    *is_signed = signed_entity;
    r = 0;
out:
    /* The MMA defence leaves errors queued even when decryption works. */
    ERR_clear_error();
    cms_signed_release(&sd);
    cms_buf_release(&data);
    cms_header_block_release(&hb);
    BIO_free(plain);
    CMS_ContentInfo_free(cms);
    return r;
}
