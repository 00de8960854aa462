/*
 * The CMS side of signing, the public API every part shares (names,
 * errors, results) and small helpers for the other parts. The key is only
 * an EVP_PKEY: in the daemon a libp11 key whose RSA_METHOD / EC_KEY_METHOD
 * calls the token, so everything goes through the ordinary CMS API, which
 * reaches the key through EVP and works with such keys.
 *
 * Signing comes in two steps so that a caller can do all that depends on
 * the input alone before it takes a key others wait for:
 * cms_prepare_entity parses and re-encodes (and refuses bad input),
 * cms_sign_prepared digests and signs.
 */
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/ess.h>
#include <openssl/x509v3.h>

#include "cms/internal.h"

struct cms_result {
    unsigned char *data;
    size_t len;
    char **reencoded;
    size_t n_reencoded;
};

struct cms_prepared {
    cms_entity ent;
};

/* Length of the UTF-8 sequence starting s[0..len) (RFC 3629: no overlong
 * forms, surrogates or code points past U+10FFFF); 0 when there is none. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    unsigned char lo = 0x80, hi = 0xbf;
    size_t n, i;

    if (len == 0)
        return 0;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        n = 2;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        n = 3;
        if (s[0] == 0xe0)
            lo = 0xa0;
        else if (s[0] == 0xed)
            hi = 0x9f;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        n = 4;
        if (s[0] == 0xf0)
            lo = 0x90;
        else if (s[0] == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (i = 2; i < n; i++) {
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    }
    return n;
}

void cms_text_escape(char *buf, size_t size, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i, n, o = 0;

    for (i = 0; i < len; i += n) {
        n = utf8_seq(p + i, len - i);
        if (n == 0 || (n == 1 && (p[i] < 0x20 || p[i] == 0x7f))) {
            if (size - o <= 4)
                break;
            snprintf(buf + o, 5, "\\x%02x", p[i]);
            o += 4;
            n = 1;
        } else {
            if (size - o <= n)
                break;
            memcpy(buf + o, p + i, n);
            o += n;
        }
    }
    buf[o] = '\0';
}

/* Makes the NUL-terminated buf valid UTF-8 in place; see cms_format_text. */
static void utf8_mend(char *buf)
{
    unsigned char *p = (unsigned char *)buf;
    size_t len = strlen(buf), i, n, k;

    for (i = 0; i < len; i += n) {
        n = utf8_seq(p + i, len - i);
        if (n > 0)
            continue;
        /* A lead octet whose continuation octets run to the end: the
         * character the buffer size cut. */
        for (k = i + 1; k < len && (p[k] & 0xc0) == 0x80; k++)
            ;
        if (k == len && p[i] >= 0xc2 && p[i] <= 0xf4 && len - i < 4) {
            p[i] = '\0';
            return;
        }
        p[i] = '?';
        n = 1;
    }
}

void cms_format_text(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    utf8_mend(buf);
}

void cms_set_error(cms_error *err, cms_status status, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    utf8_mend(err->message);
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
    STACK_OF(OPENSSL_STRING) *emails;
    X509_NAME *subject = X509_get_subject_name(cert);
    int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    ASN1_STRING *cn;
    unsigned char *utf8 = NULL;
    const char *email;
    char oneline[256];
    int n;

    /* Callers label the certificate an OpenSSL failure was about, with
     * that failure still queued for the message. (On an empty queue
     * ERR_set_mark sets no mark, and popping to it empties the queue,
     * which is as it was.) */
    ERR_set_mark();
    emails = X509_get1_email(cert);

    /* An IA5String address may hold any octet, a common name any
     * character (controls included), so each is escaped. */
    if (sk_OPENSSL_STRING_num(emails) > 0) {
        email = sk_OPENSSL_STRING_value(emails, 0);
        cms_text_escape(buf, size, email, strlen(email));
    } else if (i >= 0 &&
               (cn = X509_NAME_ENTRY_get_data(
                    X509_NAME_get_entry(subject, i))) != NULL &&
               (n = ASN1_STRING_to_UTF8(&utf8, cn)) >= 0) {
        cms_text_escape(buf, size, (const char *)utf8, (size_t)n);
    } else if (X509_NAME_oneline(subject, oneline, (int)sizeof(oneline)) !=
                   NULL &&
               oneline[0] != '\0') {
        cms_text_escape(buf, size, oneline, strlen(oneline));
    } else {
        snprintf(buf, size, "an unnamed subject");
    }
    OPENSSL_free(utf8);
    X509_email_free(emails);
    ERR_pop_to_mark();
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

int cms_result_new(cms_buf *data, const cms_entity *ent, cms_result **out,
                   cms_error *err)
{
    cms_result *res = calloc(1, sizeof(*res));
    size_t i;
    int r = -1;

    if (res == NULL)
        goto oom;
    /* A copy: a prepared entity is signed again, and frees its own. */
    if (ent != NULL && ent->n_reencoded > 0) {
        res->reencoded = calloc(ent->n_reencoded, sizeof(*res->reencoded));
        if (res->reencoded == NULL)
            goto oom;
        for (i = 0; i < ent->n_reencoded; i++) {
            res->reencoded[i] = strdup(ent->reencoded[i]);
            if (res->reencoded[i] == NULL)
                goto oom;
            res->n_reencoded++;
        }
    }
    res->data = data->data;
    res->len = data->len;
    memset(data, 0, sizeof(*data));
    *out = res;
    res = NULL;
    r = 0;
    goto out;
oom:
    cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
out:
    cms_result_free(res);
    return r;
}

const unsigned char *cms_result_data(const cms_result *res, size_t *len)
{
    if (len != NULL)
        *len = res != NULL ? res->len : 0;
    return res != NULL ? res->data : NULL;
}

unsigned char *cms_result_take_data(cms_result *res, size_t *len)
{
    unsigned char *data = res->data;

    *len = res->len;
    res->data = NULL;
    res->len = 0;
    return data;
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

/* The SMIMECapabilities attribute OpenSSL would add (CMS_add_standard_smimecap
 * looks up a dozen algorithms by name for it, per signature), encoded once. */
static unsigned char *smimecap_der;
static int smimecap_len;
static pthread_once_t smimecap_once = PTHREAD_ONCE_INIT;

static void smimecap_encode(void)
{
    STACK_OF(X509_ALGOR) *caps = sk_X509_ALGOR_new_null();

    if (caps != NULL && CMS_add_standard_smimecap(&caps) == 1)
        smimecap_len = i2d_X509_ALGORS(caps, &smimecap_der);
    sk_X509_ALGOR_pop_free(caps, X509_ALGOR_free);
    ERR_clear_error();
}

static int add_smimecap(CMS_SignerInfo *si, cms_error *err)
{
    pthread_once(&smimecap_once, smimecap_encode);
    if (smimecap_der == NULL || smimecap_len <= 0 ||
        CMS_signed_add1_attr_by_NID(si, NID_SMIMECapabilities, V_ASN1_SEQUENCE,
                                    smimecap_der, smimecap_len) != 1) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot add the S/MIME capabilities");
        return -1;
    }
    return 0;
}

/* The ESS signingCertificateV2 attribute (RFC 5035) that CMS_CADES would
 * build for every signature (the certificate encoded and hashed, its
 * issuer and serial copied: about 4% of a P-256 request), encoded once per
 * certificate and digest and kept with the certificate in its ex_data, so
 * it lives and dies with the certificate. The same function makes it
 * (OSSL_ESS_signing_cert_v2_new_init, issuer and serial included), so the
 * octets are OpenSSL's own. */
struct ess_cache {
    unsigned char *der[CMS_DIGEST_SHA512 + 1]; /* by cms_digest */
    int len[CMS_DIGEST_SHA512 + 1];
};

static int ess_index = -1;
static pthread_once_t ess_once = PTHREAD_ONCE_INIT;
/* Guards the ex_data of every certificate signed with (set once each). */
static pthread_mutex_t ess_lock = PTHREAD_MUTEX_INITIALIZER;

static void ess_cache_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx,
                           long argl, void *argp)
{
    struct ess_cache *c = ptr;
    size_t i;

    if (c == NULL)
        return;
    for (i = 0; i < sizeof(c->der) / sizeof(c->der[0]); i++)
        OPENSSL_free(c->der[i]);
    free(c);
}

static void ess_index_new(void)
{
    ess_index = X509_get_ex_new_index(0, NULL, NULL, NULL, ess_cache_free);
}

/* Under ess_lock: cert's encoded attribute for digest, made on first use;
 * NULL when OpenSSL fails. */
static const unsigned char *ess_der(X509 *cert, cms_digest digest, int *len)
{
    struct ess_cache *c = X509_get_ex_data(cert, ess_index);
    ESS_SIGNING_CERT_V2 *sc;

    if (c == NULL) {
        c = calloc(1, sizeof(*c));
        if (c == NULL)
            return NULL;
        if (!X509_set_ex_data(cert, ess_index, c)) {
            free(c);
            return NULL;
        }
    }
    if (c->der[digest] == NULL) {
        sc =
            OSSL_ESS_signing_cert_v2_new_init(digest_md(digest), cert, NULL, 1);
        c->len[digest] =
            sc != NULL ? i2d_ESS_SIGNING_CERT_V2(sc, &c->der[digest]) : 0;
        ESS_SIGNING_CERT_V2_free(sc);
        if (c->len[digest] <= 0) {
            OPENSSL_free(c->der[digest]);
            c->der[digest] = NULL;
            return NULL;
        }
    }
    *len = c->len[digest];
    return c->der[digest];
}

static int add_signing_cert(CMS_SignerInfo *si, X509 *cert, cms_digest digest,
                            cms_error *err)
{
    const unsigned char *der = NULL;
    int len = 0;

    pthread_once(&ess_once, ess_index_new);
    if (ess_index >= 0) {
        pthread_mutex_lock(&ess_lock);
        der = ess_der(cert, digest, &len);
        pthread_mutex_unlock(&ess_lock);
    }
    /* der stays as it is until cert is freed, after the signature */
    if (der == NULL ||
        CMS_signed_add1_attr_by_NID(si, NID_id_smime_aa_signingCertificateV2,
                                    V_ASN1_SEQUENCE, der, len) != 1) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot add the signing certificate attribute");
        return -1;
    }
    return 0;
}

/* The checks on what the caller passes for signing, before anything is
 * parsed or signed. */
static int check_signing(EVP_PKEY *pkey, X509 *cert, cms_mode mode,
                         cms_digest digest, cms_result **out, cms_error *err)
{
    if (pkey == NULL || cert == NULL || out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no key, certificate or result");
        return -1;
    }
    if (digest_md(digest) == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown digest %d", digest);
        return -1;
    }
    if (mode != CMS_MODE_DETACHED && mode != CMS_MODE_OPAQUE) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown mode %d", mode);
        return -1;
    }
    /* An RSA-PSS key can only make PSS signatures, which gpgsm cannot
     * verify; S/MIME here means PKCS#1 v1.5 or ECDSA. */
    if (EVP_PKEY_is_a(pkey, "RSA-PSS")) {
        cms_set_error(err, CMS_ERR_KEY, "RSA-PSS keys are not supported");
        return -1;
    }
    return 0;
}

int cms_prepare_entity(const unsigned char *mime, size_t len,
                       cms_prepared **out, cms_error *err)
{
    cms_prepared *prep = NULL;
    int r = -1;

    cms_init();
    if (out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no result");
        goto out;
    }
    prep = calloc(1, sizeof(*prep));
    if (prep == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (cms_entity_parse(mime, len, &prep->ent, err))
        goto out;
    /* OpenSSL's memory BIO takes an int length. */
    if (prep->ent.content.len > INT_MAX) {
        cms_set_error(err, CMS_ERR_INPUT, "the entity is too large");
        goto out;
    }
    *out = prep;
    prep = NULL;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    cms_prepared_free(prep);
    return r;
}

void cms_prepared_free(cms_prepared *prep)
{
    if (prep == NULL)
        return;
    cms_entity_release(&prep->ent);
    free(prep);
}

int cms_sign_prepared(const cms_prepared *prep, EVP_PKEY *pkey, X509 *cert,
                      STACK_OF(X509) *chain, cms_mode mode, cms_digest digest,
                      cms_result **out, cms_error *err)
{
    cms_buf wire = {0};
    CMS_SignerInfo *si;
    CMS_ContentInfo *cms = NULL;
    BIO *content = NULL;
    unsigned char *der = NULL;
    unsigned int flags = CMS_PARTIAL | CMS_BINARY;
    int der_len, r = -1;

    cms_init();
    if (check_signing(pkey, cert, mode, digest, out, err))
        goto out;
    if (prep == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no prepared entity");
        goto out;
    }
    if (mode == CMS_MODE_DETACHED)
        flags |= CMS_DETACHED;

    cms = CMS_sign(NULL, NULL, NULL, NULL, flags);
    if (cms == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot create SignedData");
        goto out;
    }
    /* The default contentType, messageDigest and signingTime attributes;
     * ESS signingCertificateV2 (what CMS_CADES adds) and SMIMECapabilities
     * come encoded already. */
    if ((si = CMS_add1_signer(cms, cert, pkey, digest_md(digest),
                              CMS_BINARY | CMS_NOSMIMECAP)) == NULL) {
        cms_set_ssl_error(err, CMS_ERR_KEY, "cannot add the signer");
        goto out;
    }
    if (add_signing_cert(si, cert, digest, err) || add_smimecap(si, err))
        goto out;
    if (chain != NULL && add_chain(cms, cert, chain, err))
        goto out;
    content =
        BIO_new_mem_buf(prep->ent.content.data, (int)prep->ent.content.len);
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
    if (cms_entity_wrap(&prep->ent, mode, digest, der, (size_t)der_len, &wire,
                        err) ||
        cms_result_new(&wire, &prep->ent, out, err))
        goto out;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    OPENSSL_free(der);
    BIO_free(content);
    CMS_ContentInfo_free(cms);
    cms_buf_release(&wire);
    return r;
}

int cms_sign_entity(const unsigned char *mime, size_t len, EVP_PKEY *pkey,
                    X509 *cert, STACK_OF(X509) *chain, cms_mode mode,
                    cms_digest digest, cms_result **out, cms_error *err)
{
    cms_prepared *prep = NULL;
    int r = -1;

    /* The caller's mistakes first, as before there was a prepare step. */
    if (check_signing(pkey, cert, mode, digest, out, err) ||
        cms_prepare_entity(mime, len, &prep, err) ||
        cms_sign_prepared(prep, pkey, cert, chain, mode, digest, out, err))
        goto out;
    r = 0;
out:
    cms_prepared_free(prep);
    return r;
}
