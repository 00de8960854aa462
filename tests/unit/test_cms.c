/*
 * Signing with real keys and certificates made here (RSA-2048, P-256,
 * P-384 under a self-made CA), checked with OpenSSL's own parser and
 * CMS_verify, byte for byte against the canonical input; plus the MIME
 * rules (headers outside, 7-bit re-encoding, CRLF) and hostile input.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cms/cms.h"
#include "tap.h"
#include "testkeys.h"

typedef struct {
    unsigned char *data;
    size_t len;
} bytes;

static const unsigned char *find(const unsigned char *hay, size_t hay_len,
                                 const char *needle)
{
    return memmem(hay, hay_len, needle, strlen(needle));
}

static int contains(const bytes *b, const char *needle)
{
    return find(b->data, b->len, needle) != NULL;
}

static int equals(const bytes *b, const char *s)
{
    return b->len == strlen(s) && memcmp(b->data, s, b->len) == 0;
}

/* The test's own CRLF canonicalisation, independent of the module's. */
static bytes canon(const void *in, size_t len)
{
    const unsigned char *s = in;
    bytes out = {xmalloc(2 * len + 1), 0};
    size_t i;

    for (i = 0; i < len; i++) {
        if (s[i] == '\r' || s[i] == '\n') {
            out.data[out.len++] = '\r';
            out.data[out.len++] = '\n';
            if (s[i] == '\r' && i + 1 < len && s[i + 1] == '\n')
                i++;
        } else {
            out.data[out.len++] = s[i];
        }
    }
    return out;
}

static int all_crlf(const unsigned char *s, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r'))
            return 0;
        if (s[i] == '\r' && (i + 1 == len || s[i + 1] != '\n'))
            return 0;
    }
    return 1;
}

static int is_7bit_text(const bytes *b)
{
    size_t i, line = 0;

    for (i = 0; i < b->len; i++) {
        if (b->data[i] == 0 || b->data[i] >= 0x80)
            return 0;
        if (b->data[i] == '\n')
            line = 0;
        else if (b->data[i] != '\r' && ++line > 998)
            return 0;
    }
    return 1;
}

/* is_7bit_text, and no line starts "From " (mbox-style transports make it
 * ">From "). */
static int is_7bit_safe(const bytes *b)
{
    size_t i;

    for (i = 0; i + 5 <= b->len; i++) {
        if ((i == 0 || b->data[i - 1] == '\n') &&
            memcmp(b->data + i, "From ", 5) == 0)
            return 0;
    }
    return is_7bit_text(b);
}

/* ---- keys and certificates ---------------------------------------- */

struct signer {
    const char *label;
    EVP_PKEY *key;
    X509 *cert;
    int sig_nid[3]; /* signature algorithm per digest */
};

static EVP_PKEY *ca_key, *inter_key;
static X509 *ca_cert, *inter_cert;
static X509_STORE *store;
static struct signer signers[3];

static void make_pki(void)
{
    ca_key = EVP_EC_gen("P-256");
    inter_key = EVP_EC_gen("P-256");
    if (ca_key == NULL || inter_key == NULL)
        die("CA keys");
    ca_cert = make_cert(ca_key, "smimed test CA", NULL, NULL, NULL, 1);
    inter_cert = make_cert(inter_key, "smimed test intermediate", NULL, ca_cert,
                           ca_key, 1);

    signers[0] = (struct signer){"RSA-2048",
                                 EVP_RSA_gen(2048),
                                 NULL,
                                 {NID_sha256WithRSAEncryption,
                                  NID_sha384WithRSAEncryption,
                                  NID_sha512WithRSAEncryption}};
    signers[1] = (struct signer){
        "P-256",
        EVP_EC_gen("P-256"),
        NULL,
        {NID_ecdsa_with_SHA256, NID_ecdsa_with_SHA384, NID_ecdsa_with_SHA512}};
    signers[2] = (struct signer){
        "P-384",
        EVP_EC_gen("P-384"),
        NULL,
        {NID_ecdsa_with_SHA256, NID_ecdsa_with_SHA384, NID_ecdsa_with_SHA512}};
    for (int i = 0; i < 3; i++) {
        if (signers[i].key == NULL)
            die("signer key");
        signers[i].cert = make_cert(signers[i].key, signers[i].label,
                                    "alice@example.org", ca_cert, ca_key, 0);
    }
    store = X509_STORE_new();
    if (store == NULL || !X509_STORE_add_cert(store, ca_cert))
        die("store");
}

/* ---- reading the output back ---------------------------------------- */

static bytes b64_decode(const unsigned char *in, size_t len)
{
    EVP_ENCODE_CTX *ctx = EVP_ENCODE_CTX_new();
    bytes out = {xmalloc(len), 0};
    int n = 0, total = 0;

    EVP_DecodeInit(ctx);
    if (EVP_DecodeUpdate(ctx, out.data, &n, in, (int)len) < 0)
        n = -1;
    if (n >= 0) {
        total = n;
        if (EVP_DecodeFinal(ctx, out.data + total, &n) != 1)
            n = -1;
        total += n;
    }
    EVP_ENCODE_CTX_free(ctx);
    out.len = n < 0 ? 0 : (size_t)total;
    return out;
}

/* Whether base64 text has 76-character CRLF lines (the last may be
 * shorter). */
static int b64_lines_ok(const unsigned char *s, size_t len)
{
    size_t pos = 0, n;
    const unsigned char *crlf;

    while (pos < len) {
        crlf = memmem(s + pos, len - pos, "\r\n", 2);
        n = crlf ? (size_t)(crlf - (s + pos)) : len - pos;
        if (n > 76 || (crlf && pos + n + 2 < len && n != 76))
            return 0;
        pos += n + 2;
    }
    return 1;
}

/* What a detached or opaque result says once verified. */
struct verified {
    int ok;               /* every check passed */
    char why[160];        /* the first that did not */
    bytes content;        /* the signed entity as CMS_verify gives it */
    bytes outer;          /* the result's header block */
    CMS_ContentInfo *cms; /* from the signature part / the body */
};

static void verified_free(struct verified *v)
{
    free(v->content.data);
    free(v->outer.data);
    CMS_ContentInfo_free(v->cms);
    memset(v, 0, sizeof(*v));
}

#define FAIL(v, ...)                                                           \
    do {                                                                       \
        snprintf((v)->why, sizeof((v)->why), __VA_ARGS__);                     \
        goto out;                                                              \
    } while (0)

static bytes bio_bytes(BIO *bio)
{
    char *p;
    long n = BIO_get_mem_data(bio, &p);
    bytes b = {xmalloc((size_t)n), (size_t)n};

    memcpy(b.data, p, (size_t)n);
    return b;
}

/* Splits a detached result by hand (to see the exact signed bytes) and
 * verifies it; then again through OpenSSL's SMIME_read_CMS. */
static void verify_detached(const bytes *res, const char *micalg,
                            struct verified *v)
{
    const unsigned char *hdr_end, *p, *q, *part1, *part2, *sig, *sig_end;
    char boundary[128], delim[160];
    bytes der = {0}, again = {0};
    BIO *in = NULL, *outb = NULL, *bcont = NULL;
    CMS_ContentInfo *cms2 = NULL;
    size_t n;

    memset(v, 0, sizeof(*v));
    if (!all_crlf(res->data, res->len))
        FAIL(v, "a line does not end in CRLF");
    hdr_end = find(res->data, res->len, "\r\n\r\n");
    if (hdr_end == NULL)
        FAIL(v, "no blank line after the headers");
    v->outer.len = (size_t)(hdr_end - res->data) + 2;
    v->outer.data = xmalloc(v->outer.len);
    memcpy(v->outer.data, res->data, v->outer.len);
    if (!contains(&v->outer, "\r\nMIME-Version: 1.0\r\n") &&
        memcmp(res->data, "MIME-Version: 1.0\r\n", 19) != 0)
        FAIL(v, "no MIME-Version");
    if (!contains(&v->outer, "Content-Type: multipart/signed;"))
        FAIL(v, "not multipart/signed");
    if (!contains(&v->outer, "protocol=\"application/pkcs7-signature\""))
        FAIL(v, "wrong protocol");
    snprintf(delim, sizeof(delim), "micalg=%s;", micalg);
    if (!contains(&v->outer, delim))
        FAIL(v, "no micalg=%s", micalg);
    p = find(v->outer.data, v->outer.len, "boundary=\"");
    if (p == NULL)
        FAIL(v, "no boundary");
    p += 10;
    q = memchr(p, '"', v->outer.len - (size_t)(p - v->outer.data));
    if (q == NULL || q - p < 20 || (size_t)(q - p) >= sizeof(boundary))
        FAIL(v, "bad boundary");
    memcpy(boundary, p, (size_t)(q - p));
    boundary[q - p] = '\0';

    snprintf(delim, sizeof(delim), "\r\n--%s\r\n", boundary);
    part1 = find(hdr_end, res->len - (size_t)(hdr_end - res->data), delim);
    if (part1 == NULL)
        FAIL(v, "no first delimiter");
    part1 += strlen(delim);
    part2 = find(part1, res->len - (size_t)(part1 - res->data), delim);
    if (part2 == NULL)
        FAIL(v, "no second delimiter");
    n = (size_t)(part2 - part1);
    if (memmem(part1, n, boundary, strlen(boundary)) != NULL)
        FAIL(v, "boundary occurs in the content");
    sig = part2 + strlen(delim);
    p = find(sig, res->len - (size_t)(sig - res->data), "\r\n\r\n");
    if (p == NULL)
        FAIL(v, "signature part has no body");
    {
        bytes sh = {(unsigned char *)sig, (size_t)(p - sig) + 2};
        if (!equals(&sh, "Content-Type: application/pkcs7-signature; "
                         "name=smime.p7s\r\n"
                         "Content-Transfer-Encoding: base64\r\n"
                         "Content-Disposition: attachment; "
                         "filename=smime.p7s\r\n"))
            FAIL(v, "signature part headers");
    }
    sig = p + 4;
    snprintf(delim, sizeof(delim), "\r\n--%s--\r\n", boundary);
    sig_end = find(sig, res->len - (size_t)(sig - res->data), delim);
    if (sig_end == NULL || sig_end + strlen(delim) != res->data + res->len)
        FAIL(v, "no closing delimiter at the end");
    if (!b64_lines_ok(sig, (size_t)(sig_end - sig)))
        FAIL(v, "base64 lines are not 76 characters");
    der = b64_decode(sig, (size_t)(sig_end - sig));
    {
        const unsigned char *dp = der.data;
        v->cms = d2i_CMS_ContentInfo(NULL, &dp, (long)der.len);
    }
    if (v->cms == NULL || CMS_is_detached(v->cms) != 1)
        FAIL(v, "signature is not a detached SignedData");
    in = BIO_new_mem_buf(part1, (int)n);
    outb = BIO_new(BIO_s_mem());
    if (CMS_verify(v->cms, NULL, store, in, outb, CMS_BINARY) != 1)
        FAIL(v, "CMS_verify failed");
    v->content = bio_bytes(outb);
    if (v->content.len != n || memcmp(v->content.data, part1, n) != 0)
        FAIL(v, "verified content differs from the first part");

    /* OpenSSL's own MIME parser must agree. */
    BIO_free(in);
    BIO_free(outb);
    in = BIO_new_mem_buf(res->data, (int)res->len);
    outb = BIO_new(BIO_s_mem());
    cms2 = SMIME_read_CMS(in, &bcont);
    if (cms2 == NULL || bcont == NULL)
        FAIL(v, "SMIME_read_CMS failed");
    if (CMS_verify(cms2, NULL, store, bcont, outb, CMS_BINARY) != 1)
        FAIL(v, "CMS_verify after SMIME_read_CMS failed");
    again = bio_bytes(outb);
    if (again.len != v->content.len ||
        memcmp(again.data, v->content.data, again.len) != 0)
        FAIL(v, "SMIME_read_CMS sees other content");
    v->ok = 1;
out:
    if (!v->ok)
        ERR_clear_error();
    free(der.data);
    free(again.data);
    BIO_free(in);
    BIO_free(outb);
    BIO_free(bcont);
    CMS_ContentInfo_free(cms2);
}

static void verify_opaque(const bytes *res, struct verified *v)
{
    const unsigned char *hdr_end;
    BIO *in = NULL, *outb = NULL;

    memset(v, 0, sizeof(*v));
    hdr_end = find(res->data, res->len, "\r\n\r\n");
    if (hdr_end == NULL)
        FAIL(v, "no blank line after the headers");
    v->outer.len = (size_t)(hdr_end - res->data) + 2;
    v->outer.data = xmalloc(v->outer.len);
    memcpy(v->outer.data, res->data, v->outer.len);
    if (!contains(&v->outer, "MIME-Version: 1.0\r\n") ||
        !contains(&v->outer, "Content-Type: application/pkcs7-mime; "
                             "smime-type=signed-data;") ||
        !contains(&v->outer, "name=smime.p7m\r\n") ||
        !contains(&v->outer, "\r\nContent-Transfer-Encoding: base64\r\n") ||
        !contains(&v->outer, "\r\nContent-Disposition: attachment; "
                             "filename=smime.p7m\r\n"))
        FAIL(v, "pkcs7-mime headers");
    if (!b64_lines_ok(hdr_end + 4,
                      res->len - (size_t)(hdr_end + 4 - res->data)))
        FAIL(v, "base64 lines are not 76 characters");
    in = BIO_new_mem_buf(res->data, (int)res->len);
    outb = BIO_new(BIO_s_mem());
    v->cms = SMIME_read_CMS(in, NULL);
    if (v->cms == NULL || CMS_is_detached(v->cms) != 0)
        FAIL(v, "SMIME_read_CMS failed or detached");
    if (CMS_verify(v->cms, NULL, store, NULL, outb, CMS_BINARY) != 1)
        FAIL(v, "CMS_verify failed");
    v->content = bio_bytes(outb);
    v->ok = 1;
out:
    if (!v->ok)
        ERR_clear_error();
    BIO_free(in);
    BIO_free(outb);
}

static int has_signed_attrs(CMS_ContentInfo *cms)
{
    static const int nids[] = {
        NID_pkcs9_contentType,
        NID_pkcs9_messageDigest,
        NID_pkcs9_signingTime,
        NID_SMIMECapabilities,
        NID_id_smime_aa_signingCertificateV2,
    };
    CMS_SignerInfo *si = sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(cms), 0);
    size_t i;

    if (si == NULL || CMS_signed_get_attr_count(si) != 5)
        return 0;
    for (i = 0; i < sizeof(nids) / sizeof(nids[0]); i++) {
        if (CMS_signed_get_attr_by_NID(si, nids[i], -1) < 0)
            return 0;
    }
    return 1;
}

static int algs_are(CMS_ContentInfo *cms, int digest_nid, int sig_nid)
{
    CMS_SignerInfo *si = sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(cms), 0);
    X509_ALGOR *dig, *sig;
    int nid;

    if (si == NULL)
        return 0;
    CMS_SignerInfo_get0_algs(si, NULL, NULL, &dig, &sig);
    if (OBJ_obj2nid(dig->algorithm) != digest_nid)
        return 0;
    nid = OBJ_obj2nid(sig->algorithm);
    /* OpenSSL writes rsaEncryption for PKCS#1 v1.5 in CMS. */
    return nid == sig_nid ||
           (nid == NID_rsaEncryption && sig_nid != NID_ecdsa_with_SHA256 &&
            sig_nid != NID_ecdsa_with_SHA384 &&
            sig_nid != NID_ecdsa_with_SHA512);
}

static int cert_count(CMS_ContentInfo *cms)
{
    STACK_OF(X509) *certs = CMS_get1_certs(cms);
    int n = certs ? sk_X509_num(certs) : 0;

    sk_X509_pop_free(certs, X509_free);
    return n;
}

/* ---- signing helpers ------------------------------------------------ */

static int sign(const char *mime, size_t len, const struct signer *s,
                STACK_OF(X509) *chain, cms_mode mode, cms_digest digest,
                bytes *res, cms_result **out, cms_error *err)
{
    cms_result *r = NULL;
    const unsigned char *data;
    size_t n;

    memset(err, 0, sizeof(*err));
    if (cms_sign_entity((const unsigned char *)mime, len, s->key, s->cert,
                        chain, mode, digest, &r, err) != 0)
        return -1;
    data = cms_result_data(r, &n);
    res->data = xmalloc(n);
    res->len = n;
    memcpy(res->data, data, n);
    if (out != NULL)
        *out = r;
    else
        cms_result_free(r);
    return 0;
}

/* Signs detached with P-256 and verifies; content holds the signed
 * entity. */
static int sign_verify(const char *mime, size_t len, cms_result **out,
                       struct verified *v, cms_error *err)
{
    bytes res = {0};
    int rc;

    memset(v, 0, sizeof(*v));
    rc = sign(mime, len, &signers[1], NULL, CMS_MODE_DETACHED,
              CMS_DIGEST_SHA256, &res, out, err);
    if (rc == 0)
        verify_detached(&res, "sha-256", v);
    free(res.data);
    return rc;
}

static int reencoded_is(const cms_result *r, size_t n, ...)
{
    va_list ap;
    size_t i;
    int ok = cms_result_count_reencoded(r) == n;

    va_start(ap, n);
    for (i = 0; ok && i < n; i++)
        ok = strcmp(cms_result_reencoded_at(r, i), va_arg(ap, char *)) == 0;
    va_end(ap);
    return ok;
}

/* ---- the tests ------------------------------------------------------ */

static void test_names(void)
{
    cms_digest d = CMS_DIGEST_SHA256;
    cms_mode m = CMS_MODE_DETACHED;

    tap_ok(cms_digest_from_name("sha384", &d) == 0 && d == CMS_DIGEST_SHA384,
           "digest name sha384");
    tap_ok(cms_digest_from_name("md5", &d) == -1 && d == CMS_DIGEST_SHA384 &&
               cms_digest_from_name(NULL, &d) == -1,
           "unknown digest names are refused");
    tap_ok(strcmp(cms_digest_name(CMS_DIGEST_SHA512), "sha512") == 0,
           "sha512 has its name");
    tap_ok(cms_mode_from_name("opaque", &m) == 0 && m == CMS_MODE_OPAQUE &&
               cms_mode_from_name("clear", &m) == -1 &&
               strcmp(cms_mode_name(CMS_MODE_DETACHED), "detached") == 0,
           "mode names");
}

static void test_matrix(void)
{
    static const struct {
        cms_digest digest;
        const char *micalg;
        int nid;
    } digests[] = {
        {CMS_DIGEST_SHA256, "sha-256", NID_sha256},
        {CMS_DIGEST_SHA384, "sha-384", NID_sha384},
        {CMS_DIGEST_SHA512, "sha-512", NID_sha512},
    };
    bytes want = canon(sample_inner, strlen(sample_inner));
    int k, m, d;

    for (k = 0; k < 3; k++) {
        for (m = 0; m < 2; m++) {
            for (d = 0; d < 3; d++) {
                const struct signer *s = &signers[k];
                const char *mode = m ? "opaque" : "detached";
                cms_result *r = NULL;
                struct verified v;
                cms_error err;
                bytes res = {0};

                if (!tap_ok(sign(sample, strlen(sample), s, NULL,
                                 m ? CMS_MODE_OPAQUE : CMS_MODE_DETACHED,
                                 digests[d].digest, &res, &r, &err) == 0,
                            "%s %s %s: signs (%s)", s->label, mode,
                            digests[d].micalg, err.message))
                    continue;
                if (m)
                    verify_opaque(&res, &v);
                else
                    verify_detached(&res, digests[d].micalg, &v);
                tap_ok(v.ok, "%s %s %s: verifies against the CA (%s)", s->label,
                       mode, digests[d].micalg, v.why);
                tap_ok(all_crlf(res.data, res.len) && res.len >= 2 &&
                           memcmp(res.data + res.len - 2, "\r\n", 2) == 0,
                       "%s %s %s: every line ends in CRLF", s->label, mode,
                       digests[d].micalg);
                tap_ok(v.ok && v.content.len == want.len &&
                           memcmp(v.content.data, want.data, want.len) == 0,
                       "%s %s %s: signed content is the canonical entity",
                       s->label, mode, digests[d].micalg);
                tap_ok(v.ok && has_signed_attrs(v.cms),
                       "%s %s %s: the 5 signed attributes", s->label, mode,
                       digests[d].micalg);
                tap_ok(v.ok && algs_are(v.cms, digests[d].nid, s->sig_nid[d]),
                       "%s %s %s: digest and signature algorithm", s->label,
                       mode, digests[d].micalg);
                tap_ok(v.ok && cert_count(v.cms) == 1,
                       "%s %s %s: carries the signer certificate", s->label,
                       mode, digests[d].micalg);
                tap_ok(v.ok &&
                           contains(&v.outer, "From: Alice <alice@example."
                                              "org>\r\n") &&
                           contains(&v.outer, "Subject: Quarterly report\r\n"),
                       "%s %s %s: mail headers are on the result", s->label,
                       mode, digests[d].micalg);
                tap_ok(cms_result_count_reencoded(r) == 0 &&
                           cms_result_reencoded_at(r, 0) == NULL,
                       "%s %s %s: nothing re-encoded", s->label, mode,
                       digests[d].micalg);
                cms_result_free(r);
                verified_free(&v);
                free(res.data);
            }
        }
    }
    free(want.data);
}

static void test_headers_outside(void)
{
    struct verified v;
    cms_error err;
    cms_result *r = NULL;
    const char *mime = "From: a@example.org\r\n"
                       "Subject: folded\r\n"
                       " subject line\r\n"
                       "Content-Type: text/plain;\r\n"
                       "\tcharset=us-ascii\r\n"
                       "X-Mailer: test\r\n"
                       "content-disposition: inline\r\n"
                       "\r\n"
                       "body\r\n";
    const char *outer = "From: a@example.org\r\n"
                        "Subject: folded\r\n"
                        " subject line\r\n"
                        "X-Mailer: test\r\n"
                        "MIME-Version: 1.0\r\n"
                        "Content-Type: multipart/signed;";

    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok,
           "headers entity signs and verifies (%s%s)", err.message, v.why);
    tap_ok(equals(&v.content, "Content-Type: text/plain;\r\n"
                              "\tcharset=us-ascii\r\n"
                              "content-disposition: inline\r\n"
                              "\r\n"
                              "body\r\n"),
           "only Content-* fields are signed, folding kept");
    tap_ok(v.outer.len > strlen(outer) &&
               memcmp(v.outer.data, outer, strlen(outer)) == 0,
           "other fields head the result, then MIME-Version and Content-Type");
    cms_result_free(r);
    verified_free(&v);
}

/* Signs mime (a C string) and checks the signed entity is want. */
static void signs_as(const char *mime, const char *want, const char *name)
{
    struct verified v;
    cms_error err;

    tap_ok(sign_verify(mime, strlen(mime), NULL, &v, &err) == 0 && v.ok &&
               equals(&v.content, want),
           "%s", name);
    verified_free(&v);
}

static void test_no_content_type(void)
{
    signs_as("Subject: plain\n\nhello\n", "\r\nhello\r\n",
             "an entity without Content-Type is signed as given");
    signs_as("Content-Type: text/plain\n", "Content-Type: text/plain\r\n\r\n",
             "headers without a body get the blank line");
    signs_as("\nhello", "\r\nhello",
             "a body without headers (and no final newline)");
}

static void test_line_ends(void)
{
    signs_as("Content-Type: text/plain\n\nline one\nline two\n",
             "Content-Type: text/plain\r\n\r\nline one\r\nline two\r\n",
             "LF-only input is signed with CRLF");
    signs_as("Content-Type: text/plain\r\n\rone\rtwo\r\n\nthree",
             "Content-Type: text/plain\r\n\r\none\r\ntwo\r\n\r\nthree",
             "bare CR and bare LF become CRLF");
}

static void test_reencode_text(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    const char *mime = "Subject: x\n"
                       "Content-Type: text/plain; charset=utf-8\n"
                       "Content-Transfer-Encoding: 8bit\n"
                       "\n"
                       "Gr\xc3\xbc\xc3\x9f"
                       "e\n"
                       "From the team \n";

    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok,
           "8-bit text signs and verifies (%s%s)", err.message, v.why);
    tap_ok(reencoded_is(r, 1, "1 quoted-printable"),
           "reported as \"1 quoted-printable\"");
    tap_ok(equals(&v.content, "Content-Type: text/plain; charset=utf-8\r\n"
                              "Content-Transfer-Encoding: quoted-printable\r\n"
                              "\r\n"
                              "Gr=C3=BC=C3=9Fe\r\n"
                              "=46rom the team=20\r\n"),
           "QP body, From armoured, new Content-Transfer-Encoding");
    cms_result_free(r);
    verified_free(&v);
}

/* A 7-bit body with a "From " line is re-encoded too: mbox-style transports
 * would make it ">From " and break the signature. */
static void test_from_lines(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    size_t i;
    int from_line = 0;
    const char *mime = "Content-Type: text/plain; charset=us-ascii\r\n"
                       "\r\n"
                       "From here on\r\n"
                       "trailing space \r\n"
                       "-- \r\n"
                       "sig\r\n";
    const char *other = "Content-Type: application/mbox\r\n"
                        "\r\n"
                        "From alice@example.org Thu Nov 26 10:00:00 2026\r\n";

    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok &&
               reencoded_is(r, 1, "1 quoted-printable"),
           "7-bit text with a From line is re-encoded (%s%s)", err.message,
           v.why);
    tap_ok(equals(&v.content, "Content-Type: text/plain; charset=us-ascii\r\n"
                              "Content-Transfer-Encoding: quoted-printable\r\n"
                              "\r\n"
                              "=46rom here on\r\n"
                              "trailing space=20\r\n"
                              "=2D-=20\r\n"
                              "sig\r\n"),
           "... with From and -- armoured and the trailing space kept");
    for (i = 0; v.ok && i + 5 <= v.content.len; i++)
        if ((i == 0 || v.content.data[i - 1] == '\n') &&
            memcmp(v.content.data + i, "From ", 5) == 0)
            from_line = 1;
    tap_ok(v.ok && !from_line, "... and no line starts with \"From \"");
    cms_result_free(r);
    verified_free(&v);

    r = NULL;
    tap_ok(sign_verify(other, strlen(other), &r, &v, &err) == 0 && v.ok &&
               reencoded_is(r, 1, "1 base64"),
           "a non-text From line is re-encoded as base64 (%s%s)", err.message,
           v.why);
    cms_result_free(r);
    verified_free(&v);
}

/* A soft line break can start a line with a delimiter of the enclosing
 * multipart; QP armours a leading "--" so the part does not end early. */
static void test_soft_break_delimiter(void)
{
    struct verified v, v2 = {0};
    cms_result *r = NULL, *r2 = NULL;
    cms_error err;
    char mime[512], line[76];

    memset(line, 'a', 75);
    line[75] = '\0';
    snprintf(mime, sizeof(mime),
             "Content-Type: multipart/mixed; boundary=xyz\r\n\r\n"
             "--xyz\r\n"
             "Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
             "%s--xyz\xe9\r\n"
             "--xyz--\r\n",
             line);
    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok &&
               reencoded_is(r, 1, "1 quoted-printable") &&
               contains(&v.content, "aaa=\r\n=2D-xyz=E9\r\n--xyz--"),
           "a soft break before \"--xyz\" is armoured (%s%s)", err.message,
           v.why);
    tap_ok(v.ok &&
               sign_verify((const char *)v.content.data, v.content.len, &r2,
                           &v2, &err) == 0 &&
               v2.ok && cms_result_count_reencoded(r2) == 0 &&
               v2.content.len == v.content.len &&
               memcmp(v2.content.data, v.content.data, v.content.len) == 0,
           "... so signing the result again changes nothing");
    cms_result_free(r);
    cms_result_free(r2);
    verified_free(&v);
    verified_free(&v2);
}

/* Base64 text with one 1368-character line keeps base64, so its octets
 * (a bare LF included) survive. */
static void test_rewrap_base64_text(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    unsigned char text[1026], b64[1400];
    char *mime = xmalloc(2048);
    bytes decoded = {0};
    const unsigned char *body;
    int n;

    memset(text, 'x', sizeof(text));
    text[500] = '\n';
    EVP_EncodeBlock(b64, text, (int)sizeof(text));
    n = snprintf(mime, 2048,
                 "Content-Type: text/plain\n"
                 "Content-Transfer-Encoding: base64\n\n%s\n",
                 (char *)b64);
    tap_ok(sign_verify(mime, (size_t)n, &r, &v, &err) == 0 && v.ok &&
               reencoded_is(r, 1, "1 base64"),
           "over-long base64 text is reported as \"1 base64\" (%s%s)",
           err.message, v.why);
    body = find(v.content.data, v.content.len, "\r\n\r\n");
    if (body != NULL)
        decoded = b64_decode(body + 4, v.content.len -
                                           (size_t)(body + 4 - v.content.data));
    tap_ok(decoded.len == sizeof(text) &&
               memcmp(decoded.data, text, sizeof(text)) == 0 &&
               b64_lines_ok(body + 4, v.content.len -
                                          (size_t)(body + 4 - v.content.data)),
           "... re-wrapped at 76 with the same octets");
    free(decoded.data);
    free(mime);
    cms_result_free(r);
    verified_free(&v);
}

static void test_reencode_multipart(void)
{
    static const unsigned char bin[] = {'P',  'N', 'G',  '\r', '\n', 0x1a,
                                        '\n', 0,   0xff, '\r', 'x',  '\n'};
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    char mime[2048];
    bytes want = {0}, decoded = {0};
    const unsigned char *p, *q;
    int n;
    const char *head = "From: a@example.org\n"
                       "MIME-Version: 1.0\n"
                       "Content-Type: multipart/mixed; boundary=\"xyz\"\n"
                       "\n"
                       "preamble\n"
                       "--xyz\n"
                       "Content-Type: text/plain\n"
                       "\n"
                       "plain ascii part\n"
                       "--xyz  \n"
                       "Content-Type: text/plain; charset=iso-8859-1\n"
                       "Content-Transfer-Encoding: 8bit\n"
                       "Content-Description: latin-1\n"
                       "\n"
                       "caf\xe9\n"
                       "--xyz\n"
                       "Content-Type: application/octet-stream\n"
                       "content-transfer-encoding:  binary\n"
                       "\n";
    const char *want_head = "MIME-Version: 1.0\n"
                            "Content-Type: multipart/mixed; boundary=\"xyz\"\n"
                            "\n"
                            "preamble\n"
                            "--xyz\n"
                            "Content-Type: text/plain\n"
                            "\n"
                            "plain ascii part\n"
                            "--xyz\n"
                            "Content-Type: text/plain; charset=iso-8859-1\n"
                            "Content-Description: latin-1\n"
                            "Content-Transfer-Encoding: quoted-printable\n"
                            "\n"
                            "caf=E9\n"
                            "--xyz\n"
                            "Content-Type: application/octet-stream\n"
                            "Content-Transfer-Encoding: base64\n"
                            "\n";

    n = snprintf(mime, sizeof(mime), "%s", head);
    memcpy(mime + n, bin, sizeof(bin));
    n += (int)sizeof(bin);
    n += snprintf(mime + n, sizeof(mime) - (size_t)n, "\n--xyz--\nepilogue\n");

    tap_ok(sign_verify(mime, (size_t)n, &r, &v, &err) == 0 && v.ok,
           "multipart with 8-bit parts signs and verifies (%s%s)", err.message,
           v.why);
    tap_ok(reencoded_is(r, 2, "2 quoted-printable", "3 base64"),
           "reported as \"2 quoted-printable\" and \"3 base64\"");
    want = canon(want_head, strlen(want_head));
    tap_ok(v.content.len > want.len &&
               memcmp(v.content.data, want.data, want.len) == 0,
           "unchanged parts keep their bytes, changed ones are rewritten");
    p = v.content.data + want.len;
    q = find(p, v.content.len - want.len, "\r\n--xyz--\r\nepilogue\r\n");
    if (q != NULL)
        decoded = b64_decode(p, (size_t)(q - p));
    tap_ok(q != NULL && decoded.len == sizeof(bin) &&
               memcmp(decoded.data, bin, sizeof(bin)) == 0 &&
               q + 21 == v.content.data + v.content.len,
           "the binary part is base64 of the submitted octets");
    tap_ok(is_7bit_text(&v.content), "the signed entity is 7-bit");
    free(want.data);
    free(decoded.data);
    cms_result_free(r);
    verified_free(&v);
}

static void test_reencode_nested(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    unsigned char bin[1200], line[80], *b64 = xmalloc(2 * sizeof(bin));
    char *mime = xmalloc(8192), want[200];
    size_t i;
    int n;
    const char *head = "Content-Type: multipart/mixed; boundary=outer\n"
                       "\n"
                       "--outer\n"
                       "Content-Type: text/plain\n"
                       "\n"
                       "first\n"
                       "--outer\n"
                       "Content-Type: multipart/alternative; boundary=inner\n"
                       "\n"
                       "--inner\n"
                       "Content-Type: text/plain\n"
                       "\n"
                       "ascii\n"
                       "--inner\n"
                       "Content-Type: text/html; charset=utf-8\n"
                       "\n"
                       "<p>\xe2\x82\xac</p>\n"
                       "--inner--\n"
                       "--outer\n"
                       "Content-Type: message/rfc822\n"
                       "\n"
                       "From: c@example.org\n"
                       "Subject: inner\n"
                       "Content-Type: text/plain; charset=utf-8\n"
                       "Content-Transfer-Encoding: 8bit\n"
                       "\n"
                       "na\xc3\xafve\n"
                       "--outer\n"
                       "Content-Type: multipart/signed; boundary=sig;\n"
                       " protocol=\"application/pkcs7-signature\"\n"
                       "\n"
                       "--sig\n"
                       "Content-Type: text/plain; charset=utf-8\n"
                       "Content-Transfer-Encoding: 8bit\n"
                       "\n"
                       "signed e\n"
                       "--sig--\n"
                       "--outer\n"
                       "Content-Type: application/octet-stream\n"
                       "Content-Transfer-Encoding: base64\n"
                       "\n";
    const char *deep_qp = "Content-Type: text/html; charset=utf-8\r\n"
                          "Content-Transfer-Encoding: quoted-printable\r\n"
                          "\r\n"
                          "<p>=E2=82=AC</p>\r\n"
                          "--inner--";

    /* Base64 in one 1600-character line, too long for SMTP. */
    for (i = 0; i < sizeof(bin); i++)
        bin[i] = (unsigned char)i;
    EVP_EncodeBlock(b64, bin, (int)sizeof(bin));
    n = snprintf(mime, 8192, "%s%s\n--outer--\n", head, (char *)b64);
    EVP_EncodeBlock(line, bin, 57);
    snprintf(want, sizeof(want),
             "Content-Transfer-Encoding: base64\r\n\r\n%s\r\n", line);

    tap_ok(sign_verify(mime, (size_t)n, &r, &v, &err) == 0 && v.ok,
           "nested multipart signs and verifies (%s%s)", err.message, v.why);
    tap_ok(reencoded_is(r, 3, "2.2 quoted-printable", "3.1 quoted-printable",
                        "5 base64"),
           "nested parts numbered 2.2, 3.1 (message/rfc822 body), 5");
    tap_ok(contains(&v.content, deep_qp), "the nested HTML part is QP");
    tap_ok(contains(&v.content, "From: c@example.org\r\nSubject: inner\r\n"
                                "Content-Type: text/plain; charset=utf-8\r\n"
                                "Content-Transfer-Encoding: quoted-printable"
                                "\r\n\r\nna=C3=AFve\r\n--outer"),
           "the encapsulated message keeps its headers, body is QP");
    tap_ok(contains(&v.content, "Content-Transfer-Encoding: 8bit\r\n\r\n"
                                "signed e\r\n"),
           "parts inside multipart/signed are left alone");
    tap_ok(contains(&v.content, want),
           "an over-long base64 line is re-wrapped at 76");
    cms_result_free(r);
    verified_free(&v);
    free(mime);
    free(b64);
}

/* Parts that need nothing keep every byte, odd layout included. */
static void test_unchanged_exact(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    const char *mime = "Content-Type: multipart/alternative;\n"
                       "   boundary=\"=_b\"\n"
                       "Content-Transfer-Encoding: 7bit\n"
                       "\n"
                       "preamble   \n"
                       "--=_b\t\n"
                       "Content-Type: text/plain;charset=\"us-ascii\"\n"
                       "Content-Transfer-Encoding: quoted-printable\n"
                       "\n"
                       "trailing =20\n"
                       "soft=\n"
                       "break\n"
                       "\n"
                       "--=_b\n"
                       "\n"
                       "no headers at all\n"
                       "--=_b--   \n"
                       "\n"
                       "epilogue\n";
    /* Transport padding and blanks ending preamble lines go: gateways
     * strip them. */
    const char *stripped = "Content-Type: multipart/alternative;\n"
                           "   boundary=\"=_b\"\n"
                           "Content-Transfer-Encoding: 7bit\n"
                           "\n"
                           "preamble\n"
                           "--=_b\n"
                           "Content-Type: text/plain;charset=\"us-ascii\"\n"
                           "Content-Transfer-Encoding: quoted-printable\n"
                           "\n"
                           "trailing =20\n"
                           "soft=\n"
                           "break\n"
                           "\n"
                           "--=_b\n"
                           "\n"
                           "no headers at all\n"
                           "--=_b--\n"
                           "\n"
                           "epilogue\n";
    bytes want = canon(stripped, strlen(stripped));

    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok &&
               cms_result_count_reencoded(r) == 0 &&
               v.content.len == want.len &&
               memcmp(v.content.data, want.data, want.len) == 0,
           "a 7-bit multipart is signed byte for byte, less the blanks ending "
           "lines of its framing (%s%s)",
           err.message, v.why);
    free(want.data);
    cms_result_free(r);
    verified_free(&v);
}

static void test_long_lines(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    size_t n = 100 * 1024, hl = strlen("Content-Type: text/plain\n\n"), i;
    char *mime = xmalloc(hl + n + 1);
    int lines_ok = 1;
    size_t line = 0;

    memcpy(mime, "Content-Type: text/plain\n\n", hl);
    memset(mime + hl, 'a', n);
    tap_ok(sign_verify(mime, hl + n, &r, &v, &err) == 0 && v.ok,
           "a 100 KB line signs (%s%s)", err.message, v.why);
    tap_ok(reencoded_is(r, 1, "1 quoted-printable"),
           "... re-encoded as quoted-printable");
    for (i = 0; i < v.content.len; i++) {
        if (v.content.data[i] == '\n')
            line = 0;
        else if (++line > 77)
            lines_ok = 0;
    }
    tap_ok(v.ok && lines_ok, "... into short lines");
    cms_result_free(r);
    verified_free(&v);

    memset(&err, 0, sizeof(err));
    r = NULL;
    tap_ok(cms_sign_entity((unsigned char *)mime + hl, n, signers[1].key,
                           signers[1].cert, NULL, CMS_MODE_DETACHED,
                           CMS_DIGEST_SHA256, &r, &err) == -1 &&
               err.status == CMS_ERR_INPUT && r == NULL,
           "a 100 KB line without headers is refused (%s)", err.message);
    free(mime);
}

static void test_chain(void)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = make_cert(key, "chained", "carol@example.org", inter_cert,
                           inter_key, 0);
    STACK_OF(X509) *chain = sk_X509_new_null();
    struct signer s = {"chained", key, cert, {0}};
    struct verified v;
    cms_error err;
    bytes res = {0};

    sk_X509_push(chain, inter_cert);
    sk_X509_push(chain, cert);
    sk_X509_push(chain, inter_cert);
    tap_ok(sign(sample, strlen(sample), &s, chain, CMS_MODE_DETACHED,
                CMS_DIGEST_SHA256, &res, NULL, &err) == 0,
           "signs with a chain (%s)", err.message);
    verify_detached(&res, "sha-256", &v);
    tap_ok(v.ok, "verifies through the intermediate (%s)", v.why);
    tap_ok(v.ok && cert_count(v.cms) == 2,
           "signer + intermediate, duplicates skipped");
    verified_free(&v);
    free(res.data);

    tap_ok(sign(sample, strlen(sample), &s, NULL, CMS_MODE_DETACHED,
                CMS_DIGEST_SHA256, &res, NULL, &err) == 0,
           "signs without the chain");
    verify_detached(&res, "sha-256", &v);
    tap_ok(!v.ok, "... which does not verify against the root alone");
    verified_free(&v);
    free(res.data);
    sk_X509_free(chain);
    X509_free(cert);
    EVP_PKEY_free(key);
}

static void test_key_errors(void)
{
    struct signer wrong = {"wrong", signers[0].key, signers[1].cert, {0}};
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA-PSS", NULL);
    EVP_PKEY *pss = NULL;
    struct signer s_pss = {"pss", NULL, NULL, {0}};
    cms_error err;
    bytes res = {0};

    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) != 1 ||
        EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 2048) != 1 ||
        EVP_PKEY_generate(ctx, &pss) != 1)
        die("RSA-PSS key");
    EVP_PKEY_CTX_free(ctx);
    s_pss.key = pss;

    tap_ok(sign(sample, strlen(sample), &wrong, NULL, CMS_MODE_DETACHED,
                CMS_DIGEST_SHA256, &res, NULL, &err) == -1 &&
               err.status == CMS_ERR_KEY && err.message[0] != '\0',
           "a key that does not match the certificate: CMS_ERR_KEY (%s)",
           err.message);
    tap_ok(ERR_peek_error() == 0, "... and the OpenSSL error queue is empty");
    s_pss.cert = make_cert(pss, "pss", "pss@example.org", ca_cert, ca_key, 0);
    tap_ok(sign(sample, strlen(sample), &s_pss, NULL, CMS_MODE_DETACHED,
                CMS_DIGEST_SHA256, &res, NULL, &err) == -1 &&
               err.status == CMS_ERR_KEY,
           "an RSA-PSS key is refused (%s)", err.message);
    X509_free(s_pss.cert);
    EVP_PKEY_free(pss);
}

static int refused_n(const char *mime, size_t len, const char *part)
{
    cms_result *r = NULL;
    cms_error err;

    int rc;

    memset(&err, 0, sizeof(err));
    rc = cms_sign_entity((const unsigned char *)mime, len, signers[1].key,
                         signers[1].cert, NULL, CMS_MODE_OPAQUE,
                         CMS_DIGEST_SHA256, &r, &err);
    if (rc == 0)
        cms_result_free(r);
    else if (strstr(err.message, part) == NULL)
        printf("# got: %s\n", err.message);
    return rc == -1 && r == NULL && err.status == CMS_ERR_INPUT &&
           strstr(err.message, part) != NULL && utf8_valid(err.message) &&
           ERR_peek_error() == 0;
}

static int refused(const char *mime, const char *part)
{
    return refused_n(mime, strlen(mime), part);
}

static void test_malformed(void)
{
    static const char nul_header[] = "Subject: a\0b\n\nbody";

    tap_ok(refused("", "empty"), "empty input");
    tap_ok(refused_n(NULL, 10, "empty"), "NULL input");
    tap_ok(refused("garbage line\n\nbody\n", "line 1 has no colon"),
           "a first line without a colon");
    tap_ok(refused("Subject: hi\nHello, this is the body\n",
                   "line 2 has no colon"),
           "no blank line between headers and body");
    tap_ok(refused(" folded: x\n\nbody", "line 1 continues"),
           "a continuation line first");
    tap_ok(refused(": x\n\nbody", "empty field name"), "an empty field name");
    tap_ok(refused("Sub ject: x\n\nbody", "octet 0x20"),
           "a blank inside a field name");
    tap_ok(refused_n(nul_header, sizeof(nul_header) - 1, "NUL"),
           "a NUL in a header");
    tap_ok(refused("Content-Type: multipart/mixed\n\nno boundary\n",
                   "without a boundary"),
           "a multipart without a boundary");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=\"\"\n\n--\n"
                   "\nx\n----\n",
                   "without a boundary"),
           "a multipart with an empty boundary");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=z\n\n--z\n"
                   "\ncut off here\n",
                   "close delimiter \"--z--\""),
           "a multipart without its close delimiter");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=o\n\n--o\n"
                   "Content-Type: multipart/mixed; boundary=i\n\n--i\n"
                   "\nx\n--o--\n",
                   "part 1 is a multipart without its close delimiter"),
           "a nested multipart without its close delimiter");
    /* found by tests/fuzz/fuzz_entity.c: a "--b--" in a later part's body
     * (which re-encoding hides) passed for the close delimiter of part 1,
     * which GMime ends at the next "--a" */
    tap_ok(refused("Content-Type: multipart/mixed; boundary=a\n\n"
                   "--a\nContent-Type: multipart/alternative; boundary=b\n\n"
                   "--b\n\nx\n"
                   "--a\nContent-Type: application/octet-stream\n"
                   "Content-Transfer-Encoding: 8bit\n\n\xff\n--b--\n"
                   "--a--\n",
                   "part 1 is a multipart without its close delimiter "
                   "\"--b--\""),
           "a nested multipart ended by its parent's delimiter");
    /* found by tests/fuzz/fuzz_entity.c: readers would disagree on which
     * field counts, and verifying such a signature did not put the mail
     * headers back (the inner header block is read strictly there) */
    tap_ok(refused("Subject: s\nContent-Type: text/plain\n"
                   "Content-Type: text/html\n\nx\n",
                   "header line 3 repeats the Content-Type field"),
           "two Content-Type fields");
    tap_ok(refused("Content-Transfer-Encoding: 7bit\n"
                   "content-transfer-encoding : base64\n\neA==\n",
                   "header line 2 repeats the content-transfer-encoding "
                   "field"),
           "two Content-Transfer-Encoding fields");
}

/* White space ending a line is stripped by gateways: in a body it makes
 * the part QP ("=20"), in the framing it goes. */
static void test_trailing_blanks(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    const char *mime = "Content-Type: multipart/mixed; \n"
                       "  \n"
                       "\tboundary=b\n"
                       "\n"
                       "preamble \n"
                       "--b \t\n"
                       "Content-Type: text/plain; format=flowed\n"
                       "\n"
                       "soft \n"
                       "break\n"
                       "--b\n"
                       "Content-Type: application/octet-stream\n"
                       "\n"
                       "tab\t\n"
                       "--b-- \n";

    tap_ok(sign_verify(mime, strlen(mime), &r, &v, &err) == 0 && v.ok &&
               reencoded_is(r, 2, "1 quoted-printable", "2 base64"),
           "7-bit parts with blanks ending lines are re-encoded (%s%s)",
           err.message, v.why);
    tap_ok(equals(&v.content, "Content-Type: multipart/mixed;\r\n"
                              "\tboundary=b\r\n"
                              "\r\n"
                              "preamble\r\n"
                              "--b\r\n"
                              "Content-Type: text/plain; format=flowed\r\n"
                              "Content-Transfer-Encoding: quoted-printable\r\n"
                              "\r\n"
                              "soft=20\r\n"
                              "break\r\n"
                              "--b\r\n"
                              "Content-Type: application/octet-stream\r\n"
                              "Content-Transfer-Encoding: base64\r\n"
                              "\r\n"
                              "dGFiCQ==\r\n"
                              "\r\n"
                              "--b--\r\n"),
           "... and the framing loses its blanks");
    cms_result_free(r);
    verified_free(&v);
}

/* What re-encoding cannot reach is refused, naming the part: signing it
 * would give a signature that 7-bit transport breaks. */
static void test_not_7bit_safe(void)
{
    static const char no_blank_line[] =
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\xe9\xff\x01\r\n"
        "more\r\n"
        "--b--\r\n";
    char *long_preamble = xmalloc(2048);
    const char *fix = "which cannot be made 7-bit safe";
    char want[160];
    cms_prepared *prep = NULL;
    cms_error err;

    tap_ok(refused(no_blank_line,
                   "part 1: header line 3 has no colon (missing blank line "
                   "between headers and body?)"),
           "a part without a blank line after its headers, 8-bit body");
    /* A part's header block is checked from its delimiter on: GMime keeps
     * no field of the second part below, and the check started at the
     * first field it kept (found by tests/fuzz/fuzz_entity.c). */
    tap_ok(refused("Content-Type: multipart/mixed; boundary=m\n\n"
                   "--m\nnot a field\nContent-Type: text/plain\n\n"
                   "caf\xc3\xa9\n--m--\n",
                   "part 1: header line 1 has no colon"),
           "a part whose first header line is no field, 8-bit body");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=m\n\n"
                   "--m\n\nx\n--m\nno field at all\n\ncaf\xc3\xa9\n--m--\n",
                   "part 2: header line 1 has no colon"),
           "a part with no field but a line that is none, 8-bit body");
    memset(&err, 0, sizeof(err));
    tap_ok(cms_prepare_entity((const unsigned char *)no_blank_line,
                              strlen(no_blank_line), &prep, &err) == -1 &&
               prep == NULL && err.status == CMS_ERR_INPUT &&
               ERR_peek_error() == 0,
           "... refused by cms_prepare_entity, no key needed");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "This is caf\xc3\xa9\n"
                   "--b\n\nx\n--b--\n",
                   "the entity: the multipart preamble has 8-bit octets, "
                   "which cannot be made 7-bit safe"),
           "8-bit octets in the preamble");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\n\nx\n--b\n"
                   "Content-Type: multipart/alternative; boundary=c\n\n"
                   "--c\n\ny\n--c--\n\xff\n"
                   "--b--\n",
                   "part 2: the multipart epilogue has 8-bit octets"),
           "8-bit octets in a nested epilogue");
    snprintf(long_preamble, 2048,
             "Content-Type: multipart/mixed; boundary=b\n\n%01200d\n"
             "--b\n\nx\n--b--\n",
             0);
    tap_ok(refused(long_preamble, "the multipart preamble has a line over "
                                  "998 octets"),
           "a 1200-octet line in the preamble");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "From here\n--b\n\nx\n--b--\n",
                   "the multipart preamble has a line starting \"From \""),
           "a \"From \" line in the preamble");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\n\nx\n--b\n"
                   "Content-Type: text/plain\n"
                   "Content-Description: caf\xc3\xa9\n\n"
                   "y\n--b--\n",
                   "part 2: a header field has 8-bit octets, which cannot "
                   "be made 7-bit safe (header fields are not re-encoded)"),
           "8-bit octets in a part's header field");
    tap_ok(refused("Subject: caf\xc3\xa9 outside\n"
                   "Content-Type: text/plain\n"
                   "Content-Disposition: attachment; filename=caf\xc3\xa9\n\n"
                   "y\n",
                   "the entity: a header field has 8-bit octets"),
           "8-bit octets in a signed top-level Content-* field (the Subject "
           "outside may have them)");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\n\nx\n--b\n"
                   "Content-Type: message/rfc822\n\n"
                   "Subject: caf\xc3\xa9\n"
                   "Content-Type: text/plain\n\n"
                   "y\n--b--\n",
                   "part 2: a header field has 8-bit octets"),
           "8-bit octets in the header of an encapsulated message");
    snprintf(want, sizeof(want),
             "part 2.1: its body has 8-bit octets, %s inside a "
             "multipart/signed (re-encoding would break it)",
             fix);
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\n\nx\n--b\n"
                   "Content-Type: multipart/signed; boundary=s;\n"
                   " protocol=\"application/pkcs7-signature\"\n\n"
                   "--s\n"
                   "Content-Type: text/plain; charset=utf-8\n\n"
                   "sign\xc3\xa9\n"
                   "--s\n"
                   "Content-Type: application/pkcs7-signature\n\n"
                   "AAAA\n"
                   "--s--\n"
                   "--b--\n",
                   want),
           "8-bit octets inside a nested multipart/signed");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\ntext caf\xc3\xa9\n--b--\n",
                   "part 1: its header block does not end in a blank line"),
           "a part that starts with 8-bit text and no header block");
    tap_ok(refused("Content-Type: multipart/mixed; boundary=b\n\n"
                   "--b\n\nx\n--b\n\n\xe9\n--b--\n\xe9\n",
                   "the entity: the multipart epilogue has 8-bit octets"),
           "the 8-bit body before it is re-encoded, the epilogue is not");
    free(long_preamble);
}

/* Preparing needs no key; one prepared entity signs with several digests
 * and modes, from several threads at once. */
static cms_prepared *shared_prep;

static void *sign_prepared_loop(void *arg)
{
    long failures = 0;
    int i;

    for (i = 0; i < 10; i++) {
        cms_result *r = NULL;
        cms_error err;

        if (cms_sign_prepared(shared_prep, signers[1 + i % 2].key,
                              signers[1 + i % 2].cert, NULL, (cms_mode)(i % 2),
                              (cms_digest)(i % 3), &r, &err) != 0 ||
            !reencoded_is(r, 1, "1 quoted-printable"))
            failures++;
        cms_result_free(r);
    }
    (void)arg;
    return (void *)failures;
}

static void test_prepare(void)
{
    static const char mime[] = "Subject: prepared\n"
                               "Content-Type: text/plain; charset=utf-8\n"
                               "\n"
                               "caf\xc3\xa9\n";
    static const char want[] = "Content-Type: text/plain; charset=utf-8\r\n"
                               "Content-Transfer-Encoding: quoted-printable\r\n"
                               "\r\n"
                               "caf=C3=A9\r\n";
    cms_prepared *prep = NULL, *none = (cms_prepared *)&none;
    cms_result *r = NULL, *r2 = NULL;
    struct verified v = {0}, v2 = {0};
    const unsigned char *d;
    pthread_t t[4];
    cms_error err;
    bytes res;
    long failures = 0;
    void *ret;
    size_t n;
    int i;

    memset(&err, 0, sizeof(err));
    tap_ok(cms_prepare_entity((const unsigned char *)mime, strlen(mime), &prep,
                              &err) == 0 &&
               prep != NULL,
           "prepares without a key (%s)", err.message);
    tap_ok(cms_sign_prepared(prep, signers[0].key, signers[0].cert, NULL,
                             CMS_MODE_DETACHED, CMS_DIGEST_SHA256, &r,
                             &err) == 0 &&
               cms_sign_prepared(prep, signers[2].key, signers[2].cert, NULL,
                                 CMS_MODE_OPAQUE, CMS_DIGEST_SHA512, &r2,
                                 &err) == 0,
           "signs it twice: RSA detached SHA-256, P-384 opaque SHA-512 (%s)",
           err.message);
    d = cms_result_data(r, &n);
    res = (bytes){(unsigned char *)d, n};
    if (r != NULL)
        verify_detached(&res, "sha-256", &v);
    d = cms_result_data(r2, &n);
    res = (bytes){(unsigned char *)d, n};
    if (r2 != NULL)
        verify_opaque(&res, &v2);
    tap_ok(v.ok && v2.ok && equals(&v.content, want) &&
               equals(&v2.content, want),
           "both verify over the same re-encoded entity (%s%s)", v.why, v2.why);
    tap_ok(reencoded_is(r, 1, "1 quoted-printable") &&
               reencoded_is(r2, 1, "1 quoted-printable") &&
               contains(&v.outer, "Subject: prepared\r\n") &&
               contains(&v2.outer, "Subject: prepared\r\n"),
           "... each reports the re-encoded part and carries the headers");
    verified_free(&v);
    verified_free(&v2);
    cms_result_free(r);
    cms_result_free(r2);

    shared_prep = prep;
    for (i = 0; i < 4; i++)
        if (pthread_create(&t[i], NULL, sign_prepared_loop, NULL) != 0)
            die("pthread_create");
    for (i = 0; i < 4; i++) {
        pthread_join(t[i], &ret);
        failures += (long)ret;
    }
    tap_ok(failures == 0, "4 threads signing one prepared entity: %ld failures",
           failures);

    r = (cms_result *)&r;
    tap_ok(cms_sign_prepared(NULL, signers[1].key, signers[1].cert, NULL,
                             CMS_MODE_DETACHED, CMS_DIGEST_SHA256, &r,
                             &err) == -1 &&
               err.status == CMS_ERR_INTERNAL &&
               cms_sign_prepared(prep, NULL, signers[1].cert, NULL,
                                 CMS_MODE_DETACHED, CMS_DIGEST_SHA256, &r,
                                 &err) == -1 &&
               err.status == CMS_ERR_INTERNAL &&
               cms_sign_prepared(prep, signers[1].key, signers[1].cert, NULL,
                                 CMS_MODE_DETACHED, (cms_digest)9, &r,
                                 &err) == -1 &&
               err.status == CMS_ERR_INTERNAL && r == (cms_result *)&r,
           "no prepared entity, no key, an unknown digest: CMS_ERR_INTERNAL, "
           "result untouched");
    tap_ok(cms_sign_prepared(prep, signers[0].key, signers[1].cert, NULL,
                             CMS_MODE_OPAQUE, CMS_DIGEST_SHA256, &r,
                             &err) == -1 &&
               err.status == CMS_ERR_KEY && r == (cms_result *)&r &&
               ERR_peek_error() == 0,
           "a key that does not fit: CMS_ERR_KEY, error queue empty (%s)",
           err.message);
    cms_prepared_free(prep);
    cms_prepared_free(NULL);

    tap_ok(cms_prepare_entity((const unsigned char *)"bad line\n\nx", 11, &none,
                              &err) == -1 &&
               none == (cms_prepared *)&none && err.status == CMS_ERR_INPUT &&
               ERR_peek_error() == 0 &&
               cms_prepare_entity((const unsigned char *)mime, strlen(mime),
                                  NULL, &err) == -1 &&
               err.status == CMS_ERR_INTERNAL,
           "bad MIME: CMS_ERR_INPUT, result untouched; no result pointer: "
           "CMS_ERR_INTERNAL");
}

/* Random octets and random MIME-ish line soup: any outcome but a crash;
 * on success the signature verifies, the signed entity is 7-bit safe, and
 * signing it again changes nothing (it is 7-bit safe by the module's own
 * judgement too). Many are refused: the soup puts 8-bit octets and "From "
 * lines in preambles and after header blocks, where no re-encoding
 * reaches. */
static void test_fuzz(void)
{
#define TOKEN(s)                                                               \
    {                                                                          \
        s, sizeof(s) - 1                                                       \
    }
    static const struct {
        const char *s;
        size_t n;
    } tokens[] = {
        TOKEN("--b"),
        TOKEN("--b--"),
        TOKEN("--c"),
        TOKEN("--c--"),
        TOKEN(""),
        TOKEN(""),
        TOKEN("text"),
        TOKEN("From me"),
        TOKEN("Content-Type: text/plain"),
        TOKEN("Content-Type: multipart/mixed; boundary=c"),
        TOKEN("Content-Type: message/rfc822"),
        TOKEN("Content-Type: image/png"),
        TOKEN("Content-Transfer-Encoding: 8bit"),
        TOKEN("Content-Transfer-Encoding: binary"),
        TOKEN("Content-Transfer-Encoding: base64"),
        TOKEN("Content-Transfer-Encoding: quoted-printable"),
        TOKEN(" folded"),
        TOKEN("=E9="),
        TOKEN("caf\xe9"),
        TOKEN("\x00\x01\xff"),
        TOKEN("Subject: x"),
        TOKEN("AAAA////"),
        TOKEN("--b  "),
        TOKEN("--c--\t"),
    };
#undef TOKEN
    size_t n_tokens = sizeof(tokens) / sizeof(tokens[0]);
    static const char *eols[] = {"\n", "\r\n", "\r", ""};
    static const char *heads[] = {
        "Content-Type: multipart/mixed; boundary=b\n",
        "Content-Type: multipart/mixed; boundary=b\n",
        "Content-Type: message/rfc822\n",
        "Content-Transfer-Encoding: 8bit\n",
    };
    int i, j, ok_crash = 1, ok_verify = 1, ok_idem = 1, ok_status = 1,
              ok_7bit = 1, successes = 0;
    unsigned int seed = 12345;
    char *buf = xmalloc(65536);

    for (i = 0; i < 400; i++) {
        size_t len = 0;
        cms_result *r = NULL;
        cms_error err;
        struct verified v;
        int rc;

        if (i < 100) {
            len = (size_t)(rand_r(&seed) % 4096) + 1;
            for (j = 0; j < (int)len; j++)
                buf[j] = (char)rand_r(&seed);
        } else {
            len = (size_t)snprintf(buf, 256, "Subject: fuzz\n%s\n",
                                   heads[rand_r(&seed) % 4]);
            for (j = rand_r(&seed) % 60; j > 0; j--) {
                size_t t = (size_t)rand_r(&seed) % n_tokens;
                const char *e =
                    eols[rand_r(&seed) % 8 < 6 ? 0 : rand_r(&seed) % 4];

                if (len + tokens[t].n + 2 >= 65536)
                    break;
                memcpy(buf + len, tokens[t].s, tokens[t].n);
                len += tokens[t].n;
                memcpy(buf + len, e, strlen(e));
                len += strlen(e);
            }
        }
        rc = sign_verify(buf, len, &r, &v, &err);
        if (rc != 0) {
            ok_status &= err.status == CMS_ERR_INPUT &&
                         utf8_valid(err.message) && ERR_peek_error() == 0;
            if (err.status != CMS_ERR_INPUT)
                printf("# case %d: %s\n", i, err.message);
            continue;
        }
        successes++;
        if (v.ok && !is_7bit_safe(&v.content)) {
            ok_7bit = 0;
            printf("# case %d: the signed entity is not 7-bit safe\n", i);
        }
        if (!v.ok) {
            ok_verify = 0;
            printf("# case %d: %s\n", i, v.why);
        } else {
            cms_result *r2 = NULL;
            struct verified v2;

            if (sign_verify((const char *)v.content.data, v.content.len, &r2,
                            &v2, &err) != 0 ||
                !v2.ok || cms_result_count_reencoded(r2) != 0 ||
                v2.content.len != v.content.len ||
                memcmp(v2.content.data, v.content.data, v.content.len)) {
                ok_idem = 0;
                printf("# case %d: not idempotent (%s)\n", i,
                       cms_result_reencoded_at(r2, 0));
            }
            cms_result_free(r2);
            verified_free(&v2);
        }
        cms_result_free(r);
        verified_free(&v);
    }
    tap_ok(ok_crash, "400 random entities: no crash");
    tap_ok(ok_status, "failures are all CMS_ERR_INPUT, messages UTF-8");
    tap_ok(ok_verify && successes > 100, "%d successes, all verify", successes);
    tap_ok(ok_7bit, "signed entities are 7-bit safe");
    tap_ok(ok_idem, "signed entities need no further re-encoding");
    free(buf);
}

/* levels multiparts, one inside the other, around a header-less 8-bit
 * leaf; the multiparts are never closed. */
static int sign_nested(int levels, cms_result **r, cms_error *err,
                       struct verified *v)
{
    size_t cap = 128 * (size_t)levels + 64, len = 0;
    char *buf = xmalloc(cap);
    int i, rc;

    for (i = 0; i < levels; i++)
        len += (size_t)snprintf(buf + len, cap - len,
                                "Content-Type: multipart/mixed; boundary=b%d"
                                "\n\n--b%d\n",
                                i, i);
    len += (size_t)snprintf(buf + len, cap - len, "\n\xff\n");
    for (i = levels - 1; i >= 0; i--)
        len += (size_t)snprintf(buf + len, cap - len, "--b%d--\n", i);
    rc = sign_verify(buf, len, r, v, err);
    free(buf);
    return rc;
}

static void test_deep_nesting(void)
{
    struct verified v;
    cms_result *r = NULL;
    cms_error err;
    char want[128] = "1";
    int i;

    for (i = 1; i < 30; i++)
        strcat(want, ".1");
    strcat(want, " quoted-printable");
    tap_ok(sign_nested(30, &r, &err, &v) == 0 && v.ok &&
               reencoded_is(r, 1, want) &&
               contains(&v.content, "--b29\r\nContent-Transfer-Encoding: "
                                    "quoted-printable\r\n\r\n=FF\r\n"),
           "30 levels: the header-less leaf 1.1...1 is re-encoded (%s%s)",
           err.message, v.why);
    cms_result_free(r);
    verified_free(&v);

    r = NULL;
    tap_ok(sign_nested(900, &r, &err, &v) == -1 &&
               err.status == CMS_ERR_INPUT &&
               strstr(err.message, "nested deeper") != NULL && r == NULL,
           "900 levels are refused (%s)", err.message);
}

static void *sign_loop(void *arg)
{
    long failures = 0;
    int i;

    for (i = 0; i < 20; i++) {
        cms_result *r = NULL;
        cms_error err;
        const char *mime =
            (i % 2) ? sample : "Content-Type: text/plain\n\n\xe9t\xe9\n";

        if (cms_sign_entity((const unsigned char *)mime, strlen(mime),
                            signers[1 + (i % 2)].key, signers[1 + (i % 2)].cert,
                            NULL, (cms_mode)(i % 2), CMS_DIGEST_SHA384, &r,
                            &err) != 0 ||
            cms_result_count_reencoded(r) != (size_t)(i % 2 ? 0 : 1))
            failures++;
        cms_result_free(r);
    }
    (void)arg;
    return (void *)failures;
}

static void test_threads(void)
{
    pthread_t t[8];
    void *ret;
    long failures = 0;
    int i;

    for (i = 0; i < 8; i++)
        if (pthread_create(&t[i], NULL, sign_loop, NULL) != 0)
            die("pthread_create");
    for (i = 0; i < 8; i++) {
        pthread_join(t[i], &ret);
        failures += (long)ret;
    }
    tap_ok(failures == 0, "8 threads signing at once: %ld failures", failures);
}

static int write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    int ok = f != NULL && fwrite(data, 1, len, f) == len;

    if (f != NULL && fclose(f) != 0)
        ok = 0;
    return ok;
}

static bytes read_file(const char *path)
{
    bytes b = {xmalloc(65536), 0};
    FILE *f = fopen(path, "rb");

    if (f != NULL) {
        b.len = fread(b.data, 1, 65536, f);
        fclose(f);
    }
    return b;
}

/* The openssl command line must read both forms and hand back the exact
 * canonical entity. */
static void test_openssl_cli(void)
{
    char dir[] = "/tmp/smimed-cms-XXXXXX", cmd[1024], path[256];
    bytes want = canon(sample_inner, strlen(sample_inner)), res, got;
    cms_error err;
    FILE *f;
    int m;

    if (system("openssl version >/dev/null 2>&1") != 0 ||
        mkdtemp(dir) == NULL) {
        tap_ok(1, "# SKIP no openssl command");
        return;
    }
    snprintf(path, sizeof(path), "%s/ca.pem", dir);
    f = fopen(path, "w");
    if (f == NULL || !PEM_write_X509(f, ca_cert))
        die("ca.pem");
    fclose(f);
    for (m = 0; m < 2; m++) {
        if (sign(sample, strlen(sample), &signers[m], NULL, (cms_mode)m,
                 CMS_DIGEST_SHA512, &res, NULL, &err) != 0)
            die("sign for the CLI");
        snprintf(path, sizeof(path), "%s/out.eml", dir);
        write_file(path, res.data, res.len);
        snprintf(cmd, sizeof(cmd),
                 "openssl cms -verify -CAfile %s/ca.pem -in %s/out.eml "
                 "-out %s/content 2>/dev/null",
                 dir, dir, dir);
        snprintf(path, sizeof(path), "%s/content", dir);
        unlink(path);
        got.data = NULL;
        tap_ok(system(cmd) == 0 && (got = read_file(path)).len == want.len &&
                   memcmp(got.data, want.data, want.len) == 0,
               "openssl cms -verify (%s) extracts the canonical entity",
               m ? "opaque" : "detached");
        free(got.data);
        free(res.data);
    }
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", dir);
    free(want.data);
}

int main(void)
{
    int i;

    cms_init();
    cms_init();
    make_pki();

    test_names();
    test_matrix();
    test_headers_outside();
    test_no_content_type();
    test_line_ends();
    test_reencode_text();
    test_rewrap_base64_text();
    test_from_lines();
    test_soft_break_delimiter();
    test_reencode_multipart();
    test_reencode_nested();
    test_unchanged_exact();
    test_long_lines();
    test_not_7bit_safe();
    test_prepare();
    test_chain();
    test_key_errors();
    test_malformed();
    test_trailing_blanks();
    test_fuzz();
    test_deep_nesting();
    test_threads();
    test_openssl_cli();

    for (i = 0; i < 3; i++) {
        X509_free(signers[i].cert);
        EVP_PKEY_free(signers[i].key);
    }
    X509_STORE_free(store);
    X509_free(inter_cert);
    X509_free(ca_cert);
    EVP_PKEY_free(inter_key);
    EVP_PKEY_free(ca_key);
    return tap_done();
}
