/*
 * The CMS side of signing, the public API every part shares (names,
 * errors, results) and small helpers for the other parts. The key is only
 * an EVP_PKEY: in the daemon a libp11 key whose RSA_METHOD / EC_KEY_METHOD
 * calls the token, so everything goes through the ordinary CMS API, which
 * reaches the key through EVP and works with such keys.
 */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "cms/internal.h"

struct cms_result {
    unsigned char *data;
    size_t len;
    char **reencoded;
    size_t n_reencoded;
};

void cms_set_error(cms_error *err, cms_status status, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

void cms_set_ssl_error(cms_error *err, cms_status status, const char *what)
{
    /* The first error is usually the cause (a token or provider fault), the
     * last one what the CMS layer made of it. */
    unsigned long first = ERR_peek_error(), last = ERR_peek_last_error();
    char cause[120], effect[120];

    if (first == 0) {
        cms_set_error(err, status, "%s", what);
        return;
    }
    ERR_error_string_n(first, cause, sizeof(cause));
    if (last == first) {
        cms_set_error(err, status, "%s: %s", what, cause);
        return;
    }
    ERR_error_string_n(last, effect, sizeof(effect));
    cms_set_error(err, status, "%s: %s (%s)", what, effect, cause);
}

void cms_cert_label(X509 *cert, char *buf, size_t size)
{
    STACK_OF(OPENSSL_STRING) *emails = X509_get1_email(cert);
    X509_NAME *subject = X509_get_subject_name(cert);
    int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    ASN1_STRING *cn;
    unsigned char *utf8 = NULL;
    int n;

    if (sk_OPENSSL_STRING_num(emails) > 0) {
        snprintf(buf, size, "%s", sk_OPENSSL_STRING_value(emails, 0));
    } else if (i >= 0 &&
               (cn = X509_NAME_ENTRY_get_data(
                    X509_NAME_get_entry(subject, i))) != NULL &&
               (n = ASN1_STRING_to_UTF8(&utf8, cn)) >= 0) {
        snprintf(buf, size, "%.*s", n, (const char *)utf8);
    } else if (X509_NAME_oneline(subject, buf, (int)size) == NULL) {
        snprintf(buf, size, "an unnamed subject");
    }
    OPENSSL_free(utf8);
    X509_email_free(emails);
    ERR_clear_error();
}

int cms_time_format(const ASN1_TIME *t, char *buf, size_t size)
{
    struct tm tm;

    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1 ||
        strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
        ERR_clear_error();
        return -1;
    }
    return 0;
}

void cms_result_free(cms_result *res)
{
    size_t i;

    if (res == NULL)
        return;
    free(res->data);
    for (i = 0; i < res->n_reencoded; i++)
        free(res->reencoded[i]);
    free(res->reencoded);
    free(res);
}

int cms_result_new(cms_buf *data, cms_entity *ent, cms_result **out,
                   cms_error *err)
{
    cms_result *res = calloc(1, sizeof(*res));

    if (res == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    res->data = data->data;
    res->len = data->len;
    memset(data, 0, sizeof(*data));
    if (ent != NULL) {
        res->reencoded = ent->reencoded;
        res->n_reencoded = ent->n_reencoded;
        ent->reencoded = NULL;
        ent->n_reencoded = 0;
    }
    *out = res;
    return 0;
}

const unsigned char *cms_result_data(const cms_result *res, size_t *len)
{
    if (len != NULL)
        *len = res != NULL ? res->len : 0;
    return res != NULL ? res->data : NULL;
}

size_t cms_result_count_reencoded(const cms_result *res)
{
    return res != NULL ? res->n_reencoded : 0;
}

const char *cms_result_reencoded_at(const cms_result *res, size_t i)
{
    return res != NULL && i < res->n_reencoded ? res->reencoded[i] : NULL;
}

static const EVP_MD *digest_md(cms_digest digest)
{
    switch (digest) {
    case CMS_DIGEST_SHA256:
        return EVP_sha256();
    case CMS_DIGEST_SHA384:
        return EVP_sha384();
    case CMS_DIGEST_SHA512:
        return EVP_sha512();
    }
    return NULL;
}

/* Adds the chain certificates that are neither the signer's nor repeats;
 * OpenSSL refuses a certificate the structure already holds. */
static int add_chain(CMS_ContentInfo *cms, X509 *cert, STACK_OF(X509) *chain,
                     cms_error *err)
{
    X509 *c;
    int i, j, dup;

    for (i = 0; i < sk_X509_num(chain); i++) {
        c = sk_X509_value(chain, i);
        dup = X509_cmp(c, cert) == 0;
        for (j = 0; j < i && !dup; j++)
            dup = X509_cmp(c, sk_X509_value(chain, j)) == 0;
        if (!dup && CMS_add1_cert(cms, c) != 1) {
            cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                              "cannot add a chain certificate");
            return -1;
        }
    }
    return 0;
}

int cms_sign_entity(const unsigned char *mime, size_t len, EVP_PKEY *pkey,
                    X509 *cert, STACK_OF(X509) *chain, cms_mode mode,
                    cms_digest digest, cms_result **out, cms_error *err)
{
    cms_entity ent = {0};
    cms_buf wire = {0};
    CMS_ContentInfo *cms = NULL;
    BIO *content = NULL;
    unsigned char *der = NULL;
    const EVP_MD *md = digest_md(digest);
    unsigned int flags = CMS_PARTIAL | CMS_BINARY;
    int der_len, r = -1;

    cms_init();
    if (pkey == NULL || cert == NULL || out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no key, certificate or result");
        goto out;
    }
    if (md == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown digest %d", digest);
        goto out;
    }
    if (mode == CMS_MODE_DETACHED) {
        flags |= CMS_DETACHED;
    } else if (mode != CMS_MODE_OPAQUE) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown mode %d", mode);
        goto out;
    }
    /* An RSA-PSS key can only make PSS signatures, which gpgsm cannot
     * verify; S/MIME here means PKCS#1 v1.5 or ECDSA. */
    if (EVP_PKEY_is_a(pkey, "RSA-PSS")) {
        cms_set_error(err, CMS_ERR_KEY, "RSA-PSS keys are not supported");
        goto out;
    }
    if (cms_entity_parse(mime, len, &ent, err))
        goto out;
    if (ent.content.len > INT_MAX) {
        cms_set_error(err, CMS_ERR_INPUT, "the entity is too large");
        goto out;
    }

    cms = CMS_sign(NULL, NULL, NULL, NULL, flags);
    if (cms == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot create SignedData");
        goto out;
    }
    /* CMS_CADES adds ESS signingCertificateV2 to the default contentType,
     * messageDigest, signingTime and SMIMECapabilities attributes. */
    if (CMS_add1_signer(cms, cert, pkey, md, CMS_BINARY | CMS_CADES) == NULL) {
        cms_set_ssl_error(err, CMS_ERR_KEY, "cannot add the signer");
        goto out;
    }
    if (chain != NULL && add_chain(cms, cert, chain, err))
        goto out;
    content = BIO_new_mem_buf(ent.content.data, (int)ent.content.len);
    if (content == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot read the content to sign");
        goto out;
    }
    /* The content is canonical already; CMS_BINARY keeps OpenSSL from
     * touching its line ends. */
    if (CMS_final(cms, content, NULL, flags) != 1) {
        cms_set_ssl_error(err, CMS_ERR_KEY, "signing failed");
        goto out;
    }
    der_len = i2d_CMS_ContentInfo(cms, &der);
    if (der_len <= 0) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot encode SignedData");
        goto out;
    }
    if (cms_entity_wrap(&ent, mode, digest, der, (size_t)der_len, &wire, err))
        goto out;

    if (cms_result_new(&wire, &ent, out, err))
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
