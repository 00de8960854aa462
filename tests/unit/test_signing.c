/*
 * The signing steps (cms_signing_new, _sign, _finish) against OpenSSL's own
 * CMS_sign + CMS_final: with RSA PKCS#1 v1.5, which is deterministic, the
 * DER is the same octet for octet once the signing time is the same
 * second; with ECDSA everything but the signature value is. Opaque
 * SignedData, whose eContent the steps put in around OpenSSL's encoding,
 * is DER at every length where a length field grows by an octet (d2i and
 * i2d give back the same octets). And the steps' own rules: no entity
 * before a signature, a failed signature can be retried.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "cms/cms.h"
#include "tap.h"
#include "testkeys.h"

typedef struct {
    unsigned char *data;
    size_t len;
} bytes;

static EVP_PKEY *ca_key;
static X509 *ca_cert;
static X509_STORE *store;

struct signer {
    const char *label;
    EVP_PKEY *key;
    X509 *cert;
    int deterministic;
};

static struct signer signers[2];

static void make_pki(void)
{
    ca_key = EVP_EC_gen("P-256");
    if (ca_key == NULL)
        die("CA key");
    ca_cert = make_cert(ca_key, "smimed signing test CA", NULL, NULL, NULL, 1);
    signers[0] = (struct signer){"RSA-2048", EVP_RSA_gen(2048), NULL, 1};
    signers[1] = (struct signer){"P-256", EVP_EC_gen("P-256"), NULL, 0};
    for (int i = 0; i < 2; i++) {
        if (signers[i].key == NULL)
            die("signer key");
        signers[i].cert = make_cert(signers[i].key, signers[i].label,
                                    "alice@example.org", ca_cert, ca_key, 0);
    }
    store = X509_STORE_new();
    if (store == NULL || !X509_STORE_add_cert(store, ca_cert))
        die("store");
}

static const EVP_MD *md_of(cms_digest d)
{
    return d == CMS_DIGEST_SHA256   ? EVP_sha256()
           : d == CMS_DIGEST_SHA384 ? EVP_sha384()
                                    : EVP_sha512();
}

/* The DER inside a signed result: the base64 of the signature part
 * (detached) or of the body (opaque), decoded. */
static bytes der_of(const unsigned char *res, size_t len, cms_mode mode)
{
    static const char p7s[] = "filename=smime.p7s\r\n\r\n";
    const unsigned char *b64, *end;
    EVP_ENCODE_CTX *ctx = EVP_ENCODE_CTX_new();
    bytes out = {xmalloc(len), 0};
    int n = 0, m = 0;

    if (mode == CMS_MODE_DETACHED) {
        b64 = memmem(res, len, p7s, sizeof(p7s) - 1);
        b64 = b64 != NULL ? b64 + sizeof(p7s) - 1 : res + len;
        end = memmem(b64, len - (size_t)(b64 - res), "--", 2);
        if (end == NULL)
            end = res + len;
    } else {
        b64 = memmem(res, len, "\r\n\r\n", 4);
        b64 = b64 != NULL ? b64 + 4 : res + len;
        end = res + len;
    }
    EVP_DecodeInit(ctx);
    if (EVP_DecodeUpdate(ctx, out.data, &n, b64, (int)(end - b64)) < 0 ||
        EVP_DecodeFinal(ctx, out.data + n, &m) != 1)
        n = m = 0;
    out.len = (size_t)(n + m);
    EVP_ENCODE_CTX_free(ctx);
    return out;
}

static CMS_SignerInfo *signer_info(CMS_ContentInfo *cms)
{
    return sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(cms), 0);
}

/* The signing time of the first signer, as its DER. */
static int signing_time(CMS_ContentInfo *cms, unsigned char *buf, int size)
{
    int i =
        CMS_signed_get_attr_by_NID(signer_info(cms), NID_pkcs9_signingTime, -1);
    X509_ATTRIBUTE *a =
        i >= 0 ? CMS_signed_get_attr(signer_info(cms), i) : NULL;
    unsigned char *p = buf;

    if (a == NULL || i2d_X509_ATTRIBUTE(a, NULL) > size)
        return -1;
    return i2d_X509_ATTRIBUTE(a, &p);
}

/* What OpenSSL makes of the same content with the same signer: CADES for
 * ESS signingCertificateV2, the standard S/MIME capabilities. */
static CMS_ContentInfo *reference(const unsigned char *content, size_t len,
                                  const struct signer *s, cms_mode mode,
                                  cms_digest digest)
{
    unsigned int flags = CMS_PARTIAL | CMS_BINARY;
    CMS_ContentInfo *cms;
    BIO *in = BIO_new_mem_buf(content, (int)len);

    if (mode == CMS_MODE_DETACHED)
        flags |= CMS_DETACHED;
    cms = CMS_sign(NULL, NULL, NULL, NULL, flags);
    if (cms == NULL ||
        CMS_add1_signer(cms, s->cert, s->key, md_of(digest),
                        CMS_BINARY | CMS_CADES) == NULL ||
        CMS_final(cms, in, NULL, flags) != 1)
        die("reference signature");
    BIO_free(in);
    return cms;
}

/* DER of cms with the signature value emptied (ECDSA's is random). */
static bytes der_without_signature(CMS_ContentInfo *cms)
{
    bytes b = {0};
    unsigned char *der = NULL;
    int n;

    ASN1_OCTET_STRING_set(CMS_SignerInfo_get0_signature(signer_info(cms)),
                          (const unsigned char *)"", 0);
    n = i2d_CMS_ContentInfo(cms, &der);
    if (n <= 0)
        die("i2d");
    b.data = xmalloc((size_t)n);
    memcpy(b.data, der, (size_t)n);
    b.len = (size_t)n;
    OPENSSL_free(der);
    return b;
}

static int same(const bytes *a, const unsigned char *b, size_t blen)
{
    return a->len == blen && memcmp(a->data, b, blen) == 0;
}

/* Signs entity with the steps and OpenSSL the same second; 1 when the two
 * DERs agree (exactly, or but for the signature), 0 when they do not, -1
 * when the second changed in between. */
static int compare_once(const char *entity, const char *inner,
                        const struct signer *s, cms_mode mode,
                        cms_digest digest, char *why, size_t whylen)
{
    cms_prepared *prep = NULL;
    cms_signing *sg = NULL;
    cms_result *r = NULL;
    cms_error err = {0};
    CMS_ContentInfo *ref = NULL, *ours = NULL;
    unsigned char *ref_der = NULL, t1[64], t2[64];
    const unsigned char *data, *p;
    bytes der = {0}, a = {0}, b = {0};
    size_t len;
    int ref_len, n1, n2, rc = 0;

    if (cms_prepare_entity((const unsigned char *)entity, strlen(entity), &prep,
                           &err) ||
        cms_signing_new(prep, s->cert, NULL, mode, digest, &sg, &err) ||
        cms_signing_sign(sg, s->key, &err) ||
        cms_signing_finish(sg, &r, &err)) {
        snprintf(why, whylen, "signing: %.100s", err.message);
        goto out;
    }
    ref =
        reference((const unsigned char *)inner, strlen(inner), s, mode, digest);
    data = cms_result_data(r, &len);
    der = der_of(data, len, mode);
    p = der.data;
    ours = d2i_CMS_ContentInfo(NULL, &p, (long)der.len);
    if (ours == NULL || p != der.data + der.len) {
        snprintf(why, whylen, "our DER does not parse");
        goto out;
    }
    n1 = signing_time(ours, t1, sizeof(t1));
    n2 = signing_time(ref, t2, sizeof(t2));
    if (n1 <= 0 || n1 != n2 || memcmp(t1, t2, (size_t)n1) != 0) {
        rc = -1;
        goto out;
    }
    ref_len = i2d_CMS_ContentInfo(ref, &ref_der);
    if (s->deterministic) {
        rc = same(&der, ref_der, (size_t)ref_len);
        snprintf(why, whylen, "%zu octets, OpenSSL's %d", der.len, ref_len);
    } else {
        a = der_without_signature(ours);
        b = der_without_signature(ref);
        rc = same(&a, b.data, b.len);
        snprintf(why, whylen, "%zu octets, OpenSSL's %zu, signatures aside",
                 a.len, b.len);
    }
out:
    ERR_clear_error();
    OPENSSL_free(ref_der);
    free(der.data);
    free(a.data);
    free(b.data);
    CMS_ContentInfo_free(ours);
    CMS_ContentInfo_free(ref);
    cms_result_free(r);
    cms_signing_free(sg);
    cms_prepared_free(prep);
    return rc;
}

static void test_same_as_openssl(void)
{
    static const char inner[] = "Content-Type: text/plain; charset=us-ascii\r\n"
                                "\r\n"
                                "the same octets as CMS_final\r\n";
    char entity[512], why[128];
    int m, d, i, k, rc;

    snprintf(entity, sizeof(entity), "From: a@example.org\r\nSubject: x\r\n%s",
             inner);
    for (i = 0; i < 2; i++) {
        for (m = 0; m < 2; m++) {
            for (d = 0; d < 3; d++) {
                /* another try when the clock's second turned between */
                for (k = 0, rc = -1; k < 5 && rc == -1; k++)
                    rc = compare_once(entity, inner, &signers[i], (cms_mode)m,
                                      (cms_digest)d, why, sizeof(why));
                tap_ok(rc == 1, "%s %s %s: the DER CMS_final makes (%s)",
                       signers[i].label, cms_mode_name((cms_mode)m),
                       cms_digest_name((cms_digest)d), why);
            }
        }
    }
}

/* An entity whose inner entity (Content-Type field, blank line, body) is
 * exactly n >= 30 octets, 7-bit safe and canonical. */
static char *entity_of(size_t n, size_t *len)
{
    static const char head[] = "Subject: size\r\nContent-Type: text/plain\r\n"
                               "\r\n";
    size_t h = sizeof(head) - 1, inner_head = h - 15, i;
    char *s = xmalloc(h + n + 1);

    memcpy(s, head, h);
    for (i = 0; i + inner_head < n; i++)
        s[h + i] = i % 64 == 62 ? '\r' : i % 64 == 63 ? '\n' : 'a';
    /* no bare CR, which canonicalisation would lengthen */
    if (n > inner_head && s[h + n - inner_head - 1] == '\r')
        s[h + n - inner_head - 1] = 'a';
    *len = h + n - inner_head;
    s[*len] = '\0';
    return s;
}

/* Opaque with n octets of content: DER (d2i and i2d give the same
 * octets), verifies, and carries exactly the inner entity. */
static int opaque_is_der(size_t n, char *why, size_t whylen)
{
    size_t len, rlen;
    char *entity = entity_of(n, &len);
    cms_result *r = NULL;
    cms_error err = {0};
    CMS_ContentInfo *cms = NULL;
    const unsigned char *data, *p;
    unsigned char *again = NULL;
    char *content;
    bytes der = {0};
    BIO *out = BIO_new(BIO_s_mem());
    long clen;
    int again_len, ok = 0;

    if (cms_sign_entity((const unsigned char *)entity, len, signers[1].key,
                        signers[1].cert, NULL, CMS_MODE_OPAQUE,
                        CMS_DIGEST_SHA256, &r, &err) != 0) {
        snprintf(why, whylen, "%.150s", err.message);
        goto out;
    }
    data = cms_result_data(r, &rlen);
    der = der_of(data, rlen, CMS_MODE_OPAQUE);
    p = der.data;
    cms = d2i_CMS_ContentInfo(NULL, &p, (long)der.len);
    if (cms == NULL || p != der.data + der.len) {
        snprintf(why, whylen, "does not parse");
        goto out;
    }
    again_len = i2d_CMS_ContentInfo(cms, &again);
    if (again_len <= 0 || (size_t)again_len != der.len ||
        memcmp(again, der.data, der.len) != 0) {
        snprintf(why, whylen, "not DER: OpenSSL re-encodes it differently");
        goto out;
    }
    if (CMS_verify(cms, NULL, store, NULL, out, CMS_BINARY) != 1) {
        snprintf(why, whylen, "does not verify");
        goto out;
    }
    clen = BIO_get_mem_data(out, &content);
    if (clen < 0 || (size_t)clen != n ||
        memcmp(content, entity + len - n, n) != 0) {
        snprintf(why, whylen, "content of %ld octets, want %zu", clen, n);
        goto out;
    }
    ok = 1;
out:
    ERR_clear_error();
    BIO_free(out);
    OPENSSL_free(again);
    CMS_ContentInfo_free(cms);
    free(der.data);
    cms_result_free(r);
    free(entity);
    return ok;
}

static void test_opaque_lengths(void)
{
    /* The content's OCTET STRING and the four elements around it (each a
     * few hundred to about 1,500 octets more: certificate, signer info)
     * each move to a longer length field somewhere in the first two
     * ranges; in the third the OCTET STRING's takes a fourth octet. */
    static const struct {
        size_t from, to, step;
    } ranges[] = {
        {30, 300, 1},
        {65536 - 1700, 65536 + 40, 3},
        {(1 << 24) - 1, 1 << 24, 1},
    };
    size_t i, n, bad = 0, tried = 0, first_bad = 0;
    char why[160] = "", first_why[160] = "";

    for (i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
        for (n = ranges[i].from; n <= ranges[i].to; n += ranges[i].step) {
            tried++;
            if (!opaque_is_der(n, why, sizeof(why)) && bad++ == 0) {
                first_bad = n;
                snprintf(first_why, sizeof(first_why), "%s", why);
            }
        }
    }
    tap_ok(bad == 0,
           "opaque SignedData is DER and verifies at %zu content lengths "
           "across every length-field size (%zu bad, first %zu: %s)",
           tried, bad, first_bad, first_why);
}

static void test_steps(void)
{
    static const char entity[] = "Subject: steps\r\n"
                                 "Content-Type: text/plain\r\n\r\nsteps\r\n";
    cms_prepared *prep = NULL;
    cms_signing *s = NULL;
    cms_result *r = NULL, *untouched = (cms_result *)&r;
    cms_error err = {0};
    BIO *content = NULL;
    CMS_ContentInfo *cms = NULL;
    const unsigned char *data, *p;
    bytes der = {0};
    size_t len;
    int ok;

    if (cms_prepare_entity((const unsigned char *)entity, strlen(entity), &prep,
                           &err) ||
        cms_signing_new(prep, signers[1].cert, NULL, CMS_MODE_DETACHED,
                        CMS_DIGEST_SHA256, &s, &err))
        die("signing_new");
    tap_ok(cms_signing_finish(s, &untouched, &err) == -1 &&
               err.status == CMS_ERR_INTERNAL && untouched == (cms_result *)&r,
           "no entity before a signature: CMS_ERR_INTERNAL, result untouched");
    tap_ok(cms_signing_sign(s, signers[0].key, &err) == -1 &&
               err.status == CMS_ERR_KEY && ERR_peek_error() == 0,
           "another certificate's key: CMS_ERR_KEY, error queue empty (%s)",
           err.message);
    memset(&err, 0, sizeof(err));
    tap_ok(cms_signing_sign(s, signers[1].key, &err) == 0 &&
               cms_signing_sign(s, signers[1].key, &err) == 0 &&
               cms_signing_finish(s, &r, &err) == 0,
           "then the right key, twice (a retry replaces the signature): "
           "signed (%s)",
           err.message);
    data = cms_result_data(r, &len);
    der = der_of(data, len, CMS_MODE_DETACHED);
    p = der.data;
    cms = d2i_CMS_ContentInfo(NULL, &p, (long)der.len);
    content = BIO_new_mem_buf(entity + 16, (int)strlen(entity + 16));
    ok = cms != NULL &&
         CMS_verify(cms, NULL, store, content, NULL, CMS_BINARY) == 1;
    tap_ok(ok, "... and verifies over the inner entity");
    ERR_clear_error();
    BIO_free(content);
    CMS_ContentInfo_free(cms);
    free(der.data);
    cms_result_free(r);
    cms_signing_free(s);
    s = NULL;
    tap_ok(cms_signing_new(NULL, signers[1].cert, NULL, CMS_MODE_DETACHED,
                           CMS_DIGEST_SHA256, &s, &err) == -1 &&
               err.status == CMS_ERR_INTERNAL && s == NULL &&
               cms_signing_new(prep, signers[1].cert, NULL, CMS_MODE_DETACHED,
                               (cms_digest)7, &s, &err) == -1 &&
               err.status == CMS_ERR_INTERNAL && s == NULL &&
               cms_signing_sign(NULL, signers[1].key, &err) == -1 &&
               cms_signing_finish(NULL, &r, &err) == -1,
           "no entity, an unknown digest, no signing: CMS_ERR_INTERNAL");
    cms_signing_free(NULL);
    cms_prepared_free(prep);
}

int main(void)
{
    cms_init();
    make_pki();
    test_same_as_openssl();
    test_opaque_lengths();
    test_steps();
    for (int i = 0; i < 2; i++) {
        EVP_PKEY_free(signers[i].key);
        X509_free(signers[i].cert);
    }
    X509_STORE_free(store);
    X509_free(ca_cert);
    EVP_PKEY_free(ca_key);
    return tap_done();
}
