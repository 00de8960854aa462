/*
 * The CMS side of signing, the public API every part shares (names,
 * errors, results) and small helpers for the other parts. The key is only
 * an EVP_PKEY: in the daemon a libp11 key whose RSA_METHOD / EC_KEY_METHOD
 * calls the token, so everything goes through the ordinary CMS API, which
 * reaches the key through EVP and works with such keys.
 *
 * Signing comes in steps so that a caller holding a key others wait for
 * (a token session) holds it for the private-key operation alone:
 * cms_prepare_entity parses and re-encodes (and refuses bad input);
 * cms_signing_new digests the content and builds the whole SignedData but
 * its signature; cms_signing_sign makes the one signature over the signed
 * attributes; cms_signing_finish writes the S/MIME entity.
 *
 * OpenSSL 3.0 digests the content only inside CMS_final, under the key
 * (CMS_final_digest came in 3.2), so the steps do by hand what CMS_final
 * does for a SignerInfo (crypto/cms/cms_sd.c, cms_SignerInfo_content_sign
 * and CMS_SignerInfo_sign): the messageDigest, contentType and signingTime
 * attributes, then a signature over the DER of the signed attributes
 * with the signer's digest. CMS_add1_signer is given the certificate's
 * public key, which it checks against the certificate and uses to set the
 * signature algorithm, and which makes no signature; the private key signs
 * the digest of the attributes with EVP_PKEY_sign, which is where
 * EVP_DigestSignFinal ends for RSA PKCS#1 v1.5 and ECDSA too. The output is
 * the octets CMS_final gives (tests/unit/test_cms.c compares them).
 */
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

struct cms_signing {
    const cms_prepared *prep; /* borrowed */
    cms_mode mode;
    cms_digest digest;
    X509 *cert;
    /* The SignedData without its eContent (put back as the entity is
     * written), with every signed attribute; si is cms's. */
    CMS_ContentInfo *cms;
    CMS_SignerInfo *si;
    /* The digest of the signed attributes: what the key signs. */
    unsigned char tbs[EVP_MAX_MD_SIZE];
    unsigned int tbs_len;
    int have_signature;
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
                         cms_digest digest, void *out, cms_error *err)
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
    /* OpenSSL's ASN.1 lengths are ints: readers of an opaque SignedData
     * could not take more. */
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

/* One encoded attribute, for sorting. */
typedef struct der_item {
    unsigned char *der;
    int len;
} der_item;

/* DER's order of a SET OF: the encodings compared as octet strings, a
 * shorter one first when it is the other's prefix (as OpenSSL sorts). */
static int der_item_cmp(const void *a, const void *b)
{
    const der_item *x = a, *y = b;
    int n = x->len < y->len ? x->len : y->len, c = memcmp(x->der, y->der, n);

    return c != 0 ? c : x->len - y->len;
}

/* A DER tag and length into out (room for 10 octets); its length. */
static size_t der_header(unsigned char *out, unsigned char tag, size_t len)
{
    size_t n = 0, k = 0, i;

    out[n++] = tag;
    if (len < 0x80) {
        out[n++] = (unsigned char)len;
        return n;
    }
    while (k < sizeof(len) && len >> (8 * k) != 0)
        k++;
    out[n++] = (unsigned char)(0x80 | k);
    for (i = k; i > 0; i--)
        out[n++] = (unsigned char)(len >> (8 * (i - 1)));
    return n;
}

/* The length of a whole element with len octets of content. */
static size_t der_size(size_t len)
{
    unsigned char hdr[10];

    return der_header(hdr, 0, len) + len;
}

/* The digest md of the signed attributes of si as the SET OF that RFC
 * 5652 §5.4 has signed (what CMS_SignerInfo_sign encodes) into out. */
static int digest_attributes(CMS_SignerInfo *si, const EVP_MD *md,
                             unsigned char *out, unsigned int *out_len,
                             cms_error *err)
{
    int i, n = CMS_signed_get_attr_count(si), r = -1;
    der_item *items = NULL;
    unsigned char hdr[10];
    size_t total = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();

    if (n <= 0 || ctx == NULL ||
        (items = calloc((size_t)n, sizeof(*items))) == NULL)
        goto fail;
    for (i = 0; i < n; i++) {
        items[i].len =
            i2d_X509_ATTRIBUTE(CMS_signed_get_attr(si, i), &items[i].der);
        if (items[i].len <= 0)
            goto fail;
        total += (size_t)items[i].len;
    }
    qsort(items, (size_t)n, sizeof(*items), der_item_cmp);
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
        EVP_DigestUpdate(ctx, hdr, der_header(hdr, 0x31, total)) != 1)
        goto fail;
    for (i = 0; i < n; i++)
        if (EVP_DigestUpdate(ctx, items[i].der, (size_t)items[i].len) != 1)
            goto fail;
    if (EVP_DigestFinal_ex(ctx, out, out_len) != 1)
        goto fail;
    r = 0;
    goto out;
fail:
    cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                      "cannot encode the signed attributes");
out:
    for (i = 0; items != NULL && i < n; i++)
        OPENSSL_free(items[i].der);
    free(items);
    EVP_MD_CTX_free(ctx);
    return r;
}

/* What CMS_final adds to a SignerInfo before it signs: the content's
 * digest, its type and the time. */
static int add_final_attributes(CMS_ContentInfo *cms, CMS_SignerInfo *si,
                                const cms_bytes *content, const EVP_MD *md,
                                cms_error *err)
{
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int d_len = 0;
    ASN1_TIME *now = X509_gmtime_adj(NULL, 0);
    int r = -1;

    if (EVP_Digest(content->data, content->len, d, &d_len, md, NULL) != 1) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot digest the content");
        goto out;
    }
    if (now == NULL ||
        CMS_signed_add1_attr_by_NID(si, NID_pkcs9_messageDigest,
                                    V_ASN1_OCTET_STRING, d, (int)d_len) != 1 ||
        CMS_signed_add1_attr_by_NID(si, NID_pkcs9_contentType, V_ASN1_OBJECT,
                                    CMS_get0_eContentType(cms), -1) != 1 ||
        CMS_signed_add1_attr_by_NID(si, NID_pkcs9_signingTime, now->type, now,
                                    -1) != 1) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot add the signed attributes");
        goto out;
    }
    r = 0;
out:
    ASN1_TIME_free(now);
    return r;
}

int cms_signing_new(const cms_prepared *prep, X509 *cert, STACK_OF(X509) *chain,
                    cms_mode mode, cms_digest digest, cms_signing **out,
                    cms_error *err)
{
    cms_signing *s = NULL;
    EVP_PKEY *pub;
    int r = -1;

    cms_init();
    if (prep == NULL || cert == NULL || out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL,
                      "no prepared entity, certificate or result");
        goto out;
    }
    pub = X509_get0_pubkey(cert);
    if (pub == NULL) {
        cms_set_ssl_error(err, CMS_ERR_KEY,
                          "cannot read the certificate's public key");
        goto out;
    }
    if (check_signing(pub, cert, mode, digest, out, err))
        goto out;
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    s->prep = prep;
    s->mode = mode;
    s->digest = digest;
    X509_up_ref(cert);
    s->cert = cert;
    /* Detached either way: an opaque one's content goes in as the entity
     * is written (cms_signing_finish). */
    s->cms = CMS_sign(NULL, NULL, NULL, NULL,
                      CMS_PARTIAL | CMS_BINARY | CMS_DETACHED);
    if (s->cms == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot create SignedData");
        goto out;
    }
    /* ESS signingCertificateV2 (what CMS_CADES adds) and SMIMECapabilities
     * come encoded already. */
    s->si = CMS_add1_signer(s->cms, cert, pub, digest_md(digest),
                            CMS_BINARY | CMS_NOSMIMECAP);
    if (s->si == NULL) {
        cms_set_ssl_error(err, CMS_ERR_KEY, "cannot add the signer");
        goto out;
    }
    if (add_signing_cert(s->si, cert, digest, err) ||
        add_smimecap(s->si, err) ||
        (chain != NULL && add_chain(s->cms, cert, chain, err)) ||
        add_final_attributes(s->cms, s->si, &prep->ent.content,
                             digest_md(digest), err) ||
        digest_attributes(s->si, digest_md(digest), s->tbs, &s->tbs_len, err))
        goto out;
    *out = s;
    s = NULL;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    cms_signing_free(s);
    return r;
}

int cms_signing_sign(cms_signing *s, EVP_PKEY *pkey, cms_error *err)
{
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    int r = -1;

    if (s == NULL || check_signing(pkey, s->cert, s->mode, s->digest, s, err))
        goto out;
    /* What CMS_add1_signer checked when it was given the private key. */
    if (X509_check_private_key(s->cert, pkey) != 1) {
        cms_set_ssl_error(err, CMS_ERR_KEY,
                          "the key does not belong to the certificate");
        goto out;
    }
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (ctx == NULL || EVP_PKEY_sign_init(ctx) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(ctx, digest_md(s->digest)) <= 0 ||
        EVP_PKEY_sign(ctx, NULL, &sig_len, s->tbs, s->tbs_len) <= 0 ||
        sig_len > INT_MAX || (sig = OPENSSL_malloc(sig_len)) == NULL ||
        EVP_PKEY_sign(ctx, sig, &sig_len, s->tbs, s->tbs_len) <= 0) {
        cms_set_ssl_error(err, CMS_ERR_KEY, "signing failed");
        goto out;
    }
    /* replaces (and frees) a signature an earlier try left */
    ASN1_STRING_set0(CMS_SignerInfo_get0_signature(s->si), sig, (int)sig_len);
    sig = NULL;
    s->have_signature = 1;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    OPENSSL_free(sig);
    EVP_PKEY_CTX_free(ctx);
    return r;
}

/* Reads the DER header at der[*pos..end) (one-octet tags, definite
 * lengths), moves *pos past it; -1 unless its tag is want and its content
 * fits. */
static int der_enter(const unsigned char *der, size_t end, size_t *pos,
                     unsigned char want, size_t *len)
{
    size_t p = *pos, n, k;

    if (end - p < 2 || der[p++] != want)
        return -1;
    n = der[p++];
    if (n & 0x80) {
        k = n & 0x7f;
        if (k == 0 || k > sizeof(n) || end - p < k)
            return -1;
        for (n = 0; k > 0; k--)
            n = n << 8 | der[p++];
    }
    if (n > end - p)
        return -1;
    *pos = p;
    *len = n;
    return 0;
}

/* Like der_enter, then past the content too. */
static int der_skip(const unsigned char *der, size_t end, size_t *pos,
                    unsigned char want)
{
    size_t len;

    if (der_enter(der, end, pos, want, &len))
        return -1;
    *pos += len;
    return 0;
}

static int add_header(cms_buf *out, unsigned char tag, size_t len)
{
    unsigned char hdr[10];

    return cms_buf_add(out, hdr, der_header(hdr, tag, len));
}

/*
 * The ContentInfo der[0..der_len) of a SignedData without eContent, with
 * content_len octets of eContent put in, as three pieces: head (built
 * here, every length from encapContentInfo out grown to match), then the
 * content, then der from *tail on. Together they are what i2d gives for
 * the same structure with the content embedded:
 *   ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT SignedData }
 *   SignedData ::= SEQUENCE { version, digestAlgorithms,
 *       encapContentInfo, [0] certificates OPTIONAL, signerInfos }
 *   EncapsulatedContentInfo ::= SEQUENCE { eContentType,
 *       eContent [0] EXPLICIT OCTET STRING OPTIONAL }
 */
static int splice_content(const unsigned char *der, size_t der_len,
                          size_t content_len, cms_buf *head, size_t *tail)
{
    size_t pos = 0, len0, len1, len2, len3, start1, start3, encap, econtent;
    size_t sd_body, enc_body, n0, n1, n2, n3;

    /* ContentInfo, its contentType, [0], SignedData: each fills the rest */
    if (der_enter(der, der_len, &pos, 0x30, &len0) || pos + len0 != der_len ||
        der_skip(der, der_len, &pos, 0x06))
        return -1;
    start1 = pos;
    if (der_enter(der, der_len, &pos, 0xa0, &len1) || pos + len1 != der_len ||
        der_enter(der, der_len, &pos, 0x30, &len2) || pos + len2 != der_len)
        return -1;
    sd_body = pos;
    /* version, digestAlgorithms, then encapContentInfo with only its type */
    if (der_skip(der, der_len, &pos, 0x02) ||
        der_skip(der, der_len, &pos, 0x31))
        return -1;
    start3 = pos;
    if (der_enter(der, der_len, &pos, 0x30, &len3))
        return -1;
    enc_body = pos;
    if (der_skip(der, der_len, &pos, 0x06) || pos != enc_body + len3)
        return -1;
    encap = pos - start3;

    econtent = der_size(der_size(content_len)); /* [0] { OCTET STRING } */
    n3 = len3 + econtent;
    n2 = len2 - encap + der_size(n3);
    n1 = der_size(n2);
    n0 = len0 - (der_len - start1) + der_size(n1);
    if (add_header(head, 0x30, n0) ||
        cms_buf_add(head, der + (der_len - len0), start1 - (der_len - len0)) ||
        add_header(head, 0xa0, n1) || add_header(head, 0x30, n2) ||
        cms_buf_add(head, der + sd_body, start3 - sd_body) ||
        add_header(head, 0x30, n3) || cms_buf_add(head, der + enc_body, len3) ||
        add_header(head, 0xa0, der_size(content_len)) ||
        add_header(head, 0x04, content_len))
        return -1;
    *tail = pos;
    return 0;
}

int cms_signing_finish(cms_signing *s, cms_result **out, cms_error *err)
{
    const cms_entity *ent;
    cms_buf wire = {0}, head = {0};
    cms_bytes pieces[3];
    unsigned char *der = NULL;
    size_t tail, n = 0;
    int der_len, r = -1;

    if (s == NULL || out == NULL || !s->have_signature) {
        cms_set_error(err, CMS_ERR_INTERNAL, "nothing signed");
        goto out;
    }
    ent = &s->prep->ent;
    der_len = i2d_CMS_ContentInfo(s->cms, &der);
    if (der_len <= 0) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot encode SignedData");
        goto out;
    }
    if (s->mode == CMS_MODE_DETACHED) {
        pieces[n++] = (cms_bytes){der, (size_t)der_len};
    } else {
        if (splice_content(der, (size_t)der_len, ent->content.len, &head,
                           &tail)) {
            cms_set_error(err, CMS_ERR_INTERNAL,
                          "cannot put the content into the SignedData");
            goto out;
        }
        pieces[n++] = (cms_bytes){head.data, head.len};
        pieces[n++] = ent->content;
        pieces[n++] = (cms_bytes){der + tail, (size_t)der_len - tail};
    }
    if (cms_entity_wrap(ent, s->mode, s->digest, pieces, n, &wire, err) ||
        cms_result_new(&wire, ent, out, err))
        goto out;
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    OPENSSL_free(der);
    cms_buf_release(&head);
    cms_buf_release(&wire);
    return r;
}

void cms_signing_free(cms_signing *s)
{
    if (s == NULL)
        return;
    CMS_ContentInfo_free(s->cms);
    X509_free(s->cert);
    free(s);
}

int cms_sign_prepared(const cms_prepared *prep, EVP_PKEY *pkey, X509 *cert,
                      STACK_OF(X509) *chain, cms_mode mode, cms_digest digest,
                      cms_result **out, cms_error *err)
{
    cms_signing *s = NULL;
    int r = -1;

    /* the caller's mistakes first, whichever step would see them */
    if (check_signing(pkey, cert, mode, digest, out, err) ||
        cms_signing_new(prep, cert, chain, mode, digest, &s, err) ||
        cms_signing_sign(s, pkey, err) || cms_signing_finish(s, out, err))
        goto out;
    r = 0;
out:
    cms_signing_free(s);
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
