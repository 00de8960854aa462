/*
 * The allow-lists in front of OpenSSL (cms/algs.c): every accepted
 * algorithm passes the walker and then really decrypts or verifies, every
 * refused one is CMS_ERR_ALGORITHM naming its OID, and BER that cannot be
 * read (truncated, malformed, nested too deeply) is CMS_ERR_INPUT without
 * a read past the input (each input sits in a buffer of its exact size,
 * for AddressSanitizer). Envelopes and signatures are made here with
 * OpenSSL's CMS API and file keys, then edited where OpenSSL would not
 * write what a test needs: through its accessors and a new encoding, or
 * by replacing the octets of an object identifier of the same length.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "cms/cms.h"
#include "cms/internal.h"
#include "tap.h"
#include "testkeys.h"

static const char plain[] = "Content-Type: text/plain; charset=us-ascii\r\n"
                            "\r\n"
                            "allow-lists\r\n";

typedef struct {
    unsigned char *data;
    size_t len;
} buf;

static EVP_PKEY *ca_key, *rsa_key, *p256_key, *p384_key, *p521_key;
static X509 *ca_cert, *rsa_cert, *p256_cert, *p384_cert, *p521_cert;

/* ---- buffers and DER by hand ------------------------------------------ */

/* A copy in a buffer of exactly n octets. */
static buf buf_of(const void *p, size_t n)
{
    buf b = {xmalloc(n), n};

    memcpy(b.data, p, n);
    return b;
}

static void buf_free(buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
}

static buf hex(const char *h)
{
    buf b = {xmalloc(strlen(h) / 2 + 1), 0};
    unsigned v;

    for (; *h != '\0'; h++) {
        if (*h == ' ')
            continue;
        if (sscanf(h, "%2x", &v) != 1)
            die("bad hex");
        b.data[b.len++] = (unsigned char)v;
        h++;
    }
    return b;
}

/* tag around the n parts (taken), with a definite length, or indefinite
 * (0x80 ... 00 00) when indef. */
static buf wrap_parts(int indef, unsigned char tag, int n, va_list ap)
{
    buf parts[16], out;
    size_t len = 0, i, k;
    int j;

    if (n > 16)
        die("too many parts");
    for (j = 0; j < n; j++) {
        parts[j] = va_arg(ap, buf);
        len += parts[j].len;
    }
    out.data = xmalloc(len + 8);
    out.len = 0;
    out.data[out.len++] = tag;
    if (indef) {
        out.data[out.len++] = 0x80;
    } else if (len < 0x80) {
        out.data[out.len++] = (unsigned char)len;
    } else {
        for (k = 4; k > 1 && (len >> (8 * (k - 1))) == 0; k--)
            ;
        out.data[out.len++] = (unsigned char)(0x80 | k);
        for (i = k; i-- > 0;)
            out.data[out.len++] = (unsigned char)(len >> (8 * i));
    }
    for (j = 0; j < n; j++) {
        memcpy(out.data + out.len, parts[j].data, parts[j].len);
        out.len += parts[j].len;
        buf_free(&parts[j]);
    }
    if (indef) {
        out.data[out.len++] = 0;
        out.data[out.len++] = 0;
    }
    return out;
}

static buf T(unsigned char tag, int n, ...)
{
    va_list ap;
    buf b;

    va_start(ap, n);
    b = wrap_parts(0, tag, n, ap);
    va_end(ap);
    return b;
}

static buf I(unsigned char tag, int n, ...)
{
    va_list ap;
    buf b;

    va_start(ap, n);
    b = wrap_parts(1, tag, n, ap);
    va_end(ap);
    return b;
}

/* Replaces every occurrence of from (hex) by to (hex, the same length);
 * the number replaced. */
static int replace_hex(buf *b, const char *from, const char *to)
{
    buf f = hex(from), t = hex(to);
    size_t i;
    int n = 0;

    if (f.len != t.len || f.len == 0)
        die("replace_hex lengths");
    for (i = 0; i + f.len <= b->len; i++) {
        if (memcmp(b->data + i, f.data, f.len) == 0) {
            memcpy(b->data + i, t.data, t.len);
            n++;
            i += f.len - 1;
        }
    }
    buf_free(&f);
    buf_free(&t);
    return n;
}

/* ---- OpenSSL objects to DER and back ------------------------------------ */

static buf der_of(CMS_ContentInfo *cms)
{
    unsigned char *p = NULL;
    int n = i2d_CMS_ContentInfo(cms, &p);
    buf b;

    if (n <= 0)
        die("i2d_CMS_ContentInfo");
    b = buf_of(p, (size_t)n);
    OPENSSL_free(p);
    return b;
}

static CMS_ContentInfo *cms_of(const buf *b)
{
    const unsigned char *p = b->data;
    CMS_ContentInfo *cms = d2i_CMS_ContentInfo(NULL, &p, (long)b->len);

    if (cms == NULL)
        die("d2i_CMS_ContentInfo");
    return cms;
}

/* Sets alg to oid with the parameters param (DER, hex; NULL: absent). */
static void set_alg(X509_ALGOR *alg, const char *oid, const char *param)
{
    ASN1_OBJECT *obj = OBJ_txt2obj(oid, 1);
    ASN1_TYPE *t = NULL;
    buf d;
    const unsigned char *p;

    if (obj == NULL)
        die("OBJ_txt2obj");
    if (param != NULL) {
        d = hex(param);
        p = d.data;
        t = d2i_ASN1_TYPE(NULL, &p, (long)d.len);
        buf_free(&d);
        if (t == NULL)
            die("d2i_ASN1_TYPE");
    }
    ASN1_OBJECT_free(alg->algorithm);
    ASN1_TYPE_free(alg->parameter);
    alg->algorithm = obj;
    alg->parameter = t;
}

/* Where edit_alg puts an AlgorithmIdentifier: the first RecipientInfo's
 * key transport or key agreement algorithm, or its originator key; the
 * first SignerInfo's signature or digest algorithm. */
typedef enum {
    AT_KTRI,
    AT_KARI,
    AT_ORIGINATOR,
    AT_SIGNATURE,
    AT_DIGEST,
} alg_site;

/* d (taken) with the AlgorithmIdentifier at site set to oid and param (as
 * for set_alg). */
static buf edit_alg(buf d, alg_site at, const char *oid, const char *param)
{
    CMS_ContentInfo *cms = cms_of(&d);
    CMS_RecipientInfo *ri = NULL;
    CMS_SignerInfo *si = NULL;
    X509_ALGOR *alg = NULL, *dig = NULL, *sig = NULL;
    int ok = 1;
    buf out;

    if (at == AT_SIGNATURE || at == AT_DIGEST)
        si = sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(cms), 0);
    else
        ri = sk_CMS_RecipientInfo_value(CMS_get0_RecipientInfos(cms), 0);
    switch (at) {
    case AT_KTRI:
        ok = CMS_RecipientInfo_ktri_get0_algs(ri, NULL, NULL, &alg);
        break;
    case AT_KARI:
        ok = CMS_RecipientInfo_kari_get0_alg(ri, &alg, NULL);
        break;
    case AT_ORIGINATOR:
        ok = CMS_RecipientInfo_kari_get0_orig_id(ri, &alg, NULL, NULL, NULL,
                                                 NULL);
        break;
    case AT_SIGNATURE:
    case AT_DIGEST:
        CMS_SignerInfo_get0_algs(si, NULL, NULL, &dig, &sig);
        alg = at == AT_DIGEST ? dig : sig;
        break;
    }
    if (!ok || alg == NULL)
        die("no AlgorithmIdentifier to edit there");
    set_alg(alg, oid, param);
    out = der_of(cms);
    CMS_ContentInfo_free(cms);
    buf_free(&d);
    return out;
}

/* ---- making envelopes and signatures ------------------------------------ */

/* Finishes cms (taken) over in (taken): DER, or with stream the BER that
 * OpenSSL streams, with indefinite lengths. */
static buf finish(CMS_ContentInfo *cms, BIO *in, int stream)
{
    BIO *out = NULL;
    char *mem;
    long n;
    buf b;

    if (stream) {
        out = BIO_new(BIO_s_mem());
        if (out == NULL ||
            !i2d_CMS_bio_stream(out, cms, in, CMS_STREAM | CMS_BINARY))
            die("i2d_CMS_bio_stream");
        n = BIO_get_mem_data(out, &mem);
        b = buf_of(mem, (size_t)n);
    } else {
        if (CMS_final(cms, in, NULL, CMS_BINARY) != 1)
            die("CMS_final");
        b = der_of(cms);
    }
    BIO_free(out);
    BIO_free(in);
    CMS_ContentInfo_free(cms);
    return b;
}

/* What a test changes on the recipient before the envelope is finished. */
typedef struct recipe {
    const EVP_MD *oaep_md, *mgf1_md; /* with oaep */
    int oaep;
    const char *label;    /* OAEP label, NULL: none */
    const EVP_MD *kdf_md; /* ECDH */
    int cofactor;
    const EVP_CIPHER *wrap; /* ECDH key wrap, NULL: OpenSSL's */
} recipe;

static buf envelope(const EVP_CIPHER *cipher, X509 *rcpt, const recipe *rc,
                    int stream)
{
    BIO *in = BIO_new_mem_buf(plain, -1);
    CMS_ContentInfo *cms =
        CMS_encrypt(NULL, NULL, cipher, CMS_PARTIAL | CMS_BINARY);
    CMS_RecipientInfo *ri;
    EVP_PKEY_CTX *pctx;

    if (in == NULL || cms == NULL)
        die("CMS_encrypt");
    ri = CMS_add1_recipient_cert(cms, rcpt, rc != NULL ? CMS_KEY_PARAM : 0);
    if (ri == NULL)
        die("CMS_add1_recipient_cert");
    if (rc != NULL) {
        pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);
        if (pctx == NULL)
            die("no key context");
        if (rc->oaep &&
            (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0 ||
             (rc->oaep_md != NULL &&
              EVP_PKEY_CTX_set_rsa_oaep_md(pctx, rc->oaep_md) <= 0) ||
             (rc->mgf1_md != NULL &&
              EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, rc->mgf1_md) <= 0)))
            die("OAEP settings");
        if (rc->label != NULL &&
            EVP_PKEY_CTX_set0_rsa_oaep_label(
                pctx, (unsigned char *)OPENSSL_strdup(rc->label),
                (int)strlen(rc->label)) <= 0)
            die("OAEP label");
        if ((rc->kdf_md != NULL &&
             EVP_PKEY_CTX_set_ecdh_kdf_md(pctx, rc->kdf_md) <= 0) ||
            (rc->cofactor && EVP_PKEY_CTX_set_ecdh_cofactor_mode(pctx, 1) <= 0))
            die("ECDH settings");
        if (rc->wrap != NULL &&
            !EVP_EncryptInit_ex(CMS_RecipientInfo_kari_get0_ctx(ri), rc->wrap,
                                NULL, NULL, NULL))
            die("key wrap");
    }
    return finish(cms, in, stream);
}

/* An opaque SignedData over plain; pss: RSASSA-PSS with the salt length
 * and MGF1 hash given (NULL: the signature's). */
static buf signature(EVP_PKEY *key, X509 *cert, const EVP_MD *md, int pss,
                     int saltlen, const EVP_MD *mgf1, int stream)
{
    BIO *in = BIO_new_mem_buf(plain, -1);
    CMS_ContentInfo *cms =
        CMS_sign(NULL, NULL, NULL, NULL, CMS_PARTIAL | CMS_BINARY);
    CMS_SignerInfo *si;
    EVP_PKEY_CTX *pctx;

    if (in == NULL || cms == NULL)
        die("CMS_sign");
    si = CMS_add1_signer(cms, cert, key, md,
                         CMS_BINARY | (pss ? CMS_KEY_PARAM : 0));
    if (si == NULL)
        die("CMS_add1_signer");
    if (pss) {
        pctx = CMS_SignerInfo_get0_pkey_ctx(si);
        if (pctx == NULL ||
            EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
            EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, saltlen) <= 0 ||
            (mgf1 != NULL && EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, mgf1) <= 0))
            die("PSS settings");
    }
    return finish(cms, in, stream);
}

/* ---- through the module ------------------------------------------------- */

/* An application/pkcs7-mime entity around der. */
static buf smime_of(const buf *der, const char *smime_type)
{
    size_t cap = 4 * (der->len / 3 + 2) + 256;
    buf b = {xmalloc(cap), 0};
    int n = snprintf((char *)b.data, cap,
                     "Content-Type: application/pkcs7-mime; smime-type=%s\r\n"
                     "Content-Transfer-Encoding: base64\r\n\r\n",
                     smime_type);

    b.len = (size_t)n;
    b.len += (size_t)EVP_EncodeBlock(b.data + b.len, der->data, (int)der->len);
    memcpy(b.data + b.len, "\r\n", 2);
    b.len += 2;
    return b;
}

/* The walker passes der and the module decrypts it with key to plain. */
static int decrypts(const buf *der, EVP_PKEY *key, X509 *cert, cms_error *err)
{
    buf mime = smime_of(der, "enveloped-data");
    cms_envelope *env = NULL;
    cms_result *r = NULL;
    const unsigned char *d;
    size_t n;
    int sig = -1, ok;

    memset(err, 0, sizeof(*err));
    ok = cms_algs_check_enveloped(der->data, der->len, err) == 0 &&
         cms_envelope_parse(mime.data, mime.len, &env, err) == 0 &&
         cms_envelope_decrypt(env, key, cert, &r, &sig, err) == 0;
    if (ok) {
        d = cms_result_data(r, &n);
        ok = n == strlen(plain) && memcmp(d, plain, n) == 0 && sig == 0;
    }
    cms_result_free(r);
    cms_envelope_free(env);
    buf_free(&mime);
    return ok && ERR_peek_error() == 0;
}

/* The walker passes der and the module finds its signature valid. */
static int verifies(const buf *der, cms_error *err)
{
    buf mime = smime_of(der, "signed-data");
    STACK_OF(X509) *anchors = sk_X509_new_null();
    cms_verification *v = NULL;
    int ok;

    memset(err, 0, sizeof(*err));
    if (anchors == NULL || !sk_X509_push(anchors, ca_cert))
        die("anchors");
    ok = cms_algs_check_signed(der->data, der->len, err) == 0 &&
         cms_verify_entity(mime.data, mime.len, anchors, NULL, NULL, &v, err) ==
             0 &&
         cms_verification_valid(v);
    if (!ok && v != NULL)
        snprintf(err->message, sizeof(err->message), "%s: %s",
                 cms_verification_reason(v), cms_verification_detail(v));
    cms_verification_free(v);
    sk_X509_free(anchors);
    buf_free(&mime);
    return ok && ERR_peek_error() == 0;
}

/* The walker refuses der with status, part in a UTF-8 message; the
 * module's parse (envelope or verify) says the same. */
static int refused(const buf *der, int is_signed, cms_status status,
                   const char *part, char *got, size_t got_size)
{
    buf mime = smime_of(der, is_signed ? "signed-data" : "enveloped-data");
    cms_envelope *env = NULL;
    cms_verification *v = NULL;
    cms_error err = {0}, err2 = {0};
    int rc, rc2;

    rc = is_signed ? cms_algs_check_signed(der->data, der->len, &err)
                   : cms_algs_check_enveloped(der->data, der->len, &err);
    rc2 = is_signed ? cms_verify_entity(mime.data, mime.len, NULL, NULL, NULL,
                                        &v, &err2)
                    : cms_envelope_parse(mime.data, mime.len, &env, &err2);
    snprintf(got, got_size, "%s", err.message);
    cms_verification_free(v);
    cms_envelope_free(env);
    buf_free(&mime);
    return rc == -1 && err.status == status &&
           strstr(err.message, part) != NULL && utf8_valid(err.message) &&
           rc2 == -1 && err2.status == status &&
           strcmp(err.message, err2.message) == 0 && ERR_peek_error() == 0;
}

static void refuse_case(buf *der, int is_signed, cms_status status,
                        const char *part, const char *what)
{
    char got[256];

    tap_ok(refused(der, is_signed, status, part, got, sizeof(got)),
           "%s: refused (%s)", what, got);
    buf_free(der);
}

static void accept_case(buf *der, int is_signed, const char *what)
{
    cms_error err = {0};
    int rc = is_signed ? cms_algs_check_signed(der->data, der->len, &err)
                       : cms_algs_check_enveloped(der->data, der->len, &err);

    tap_ok(rc == 0, "%s: accepted (%s)", what,
           rc == 0 ? "passed" : err.message);
    buf_free(der);
}

/* A structure made for a case, and the walker's verdict on it. */
typedef struct verdict {
    buf der;           /* taken by check_verdicts */
    cms_status status; /* CMS_OK: accepted */
    const char *part;  /* of the message of a refusal */
    const char *what;
} verdict;

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Each of v[0..n), enveloped or (is_signed) signed data, is accepted by
 * the walker or refused as refuse_case checks. */
static void check_verdicts(verdict *v, size_t n, int is_signed)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (v[i].status == CMS_OK)
            accept_case(&v[i].der, is_signed, v[i].what);
        else
            refuse_case(&v[i].der, is_signed, v[i].status, v[i].part,
                        v[i].what);
    }
}

/* d (taken) with the octets from (hex) replaced by to, where they stand
 * exactly once. */
static buf replaced(buf d, const char *from, const char *to)
{
    if (replace_hex(&d, from, to) != 1) {
        fprintf(stderr, "%s: not there exactly once\n", from);
        die("replaced");
    }
    return d;
}

/* ---- keys ---------------------------------------------------------------- */

static void make_keys(void)
{
    ca_key = EVP_EC_gen("P-256");
    rsa_key = EVP_RSA_gen(2048);
    p256_key = EVP_EC_gen("P-256");
    p384_key = EVP_EC_gen("P-384");
    p521_key = EVP_EC_gen("P-521");
    if (ca_key == NULL || rsa_key == NULL || p256_key == NULL ||
        p384_key == NULL || p521_key == NULL)
        die("keygen");
    ca_cert = make_cert(ca_key, "algs CA", NULL, NULL, NULL, 1);
    rsa_cert = make_cert(rsa_key, "rsa", "rsa@algs.test", ca_cert, ca_key, 0);
    p256_cert =
        make_cert(p256_key, "p256", "p256@algs.test", ca_cert, ca_key, 0);
    p384_cert =
        make_cert(p384_key, "p384", "p384@algs.test", ca_cert, ca_key, 0);
    p521_cert =
        make_cert(p521_key, "p521", "p521@algs.test", ca_cert, ca_key, 0);
}

static void free_keys(void)
{
    X509 *certs[] = {ca_cert, rsa_cert, p256_cert, p384_cert, p521_cert};
    EVP_PKEY *keys[] = {ca_key, rsa_key, p256_key, p384_key, p521_key};
    size_t i;

    for (i = 0; i < 5; i++) {
        X509_free(certs[i]);
        EVP_PKEY_free(keys[i]);
    }
}

/* The digests on the list. */
static const struct {
    const char *name;
    const EVP_MD *(*md)(void);
} mds[] = {{"sha1", EVP_sha1},
           {"sha224", EVP_sha224},
           {"sha256", EVP_sha256},
           {"sha384", EVP_sha384},
           {"sha512", EVP_sha512}};

/* ---- accepted ------------------------------------------------------------ */

static void test_content_accepted(void)
{
    static const struct {
        const char *name;
        const EVP_CIPHER *(*cipher)(void);
    } ciphers[] = {
        {"aes-128-cbc", EVP_aes_128_cbc}, {"aes-192-cbc", EVP_aes_192_cbc},
        {"aes-256-cbc", EVP_aes_256_cbc}, {"des-ede3-cbc", EVP_des_ede3_cbc},
        {"aes-128-gcm", EVP_aes_128_gcm}, {"aes-192-gcm", EVP_aes_192_gcm},
        {"aes-256-gcm", EVP_aes_256_gcm},
    };
    cms_error err;
    size_t i;
    int stream;

    for (i = 0; i < sizeof(ciphers) / sizeof(ciphers[0]); i++) {
        for (stream = 0; stream < 2; stream++) {
            buf d = envelope(ciphers[i].cipher(), rsa_cert, NULL, stream);

            tap_ok(decrypts(&d, rsa_key, rsa_cert, &err),
                   "%s, RSA PKCS#1 v1.5%s: accepted and decrypted (%s)",
                   ciphers[i].name, stream ? ", BER streamed" : "",
                   err.message);
            buf_free(&d);
        }
    }
}

static void test_oaep_accepted(void)
{
    cms_error err;
    size_t i, k;

    for (i = 0; i < 5; i++) {
        for (k = 0; k < 5; k += 4) {
            recipe rc = {0};
            buf d;

            rc.oaep = 1;
            rc.oaep_md = mds[i].md();
            rc.mgf1_md = mds[(i + k) % 5].md();
            d = envelope(EVP_aes_256_cbc(), rsa_cert, &rc, 0);
            tap_ok(decrypts(&d, rsa_key, rsa_cert, &err),
                   "RSA-OAEP %s, MGF1 %s: accepted and decrypted (%s)",
                   mds[i].name, mds[(i + k) % 5].name, err.message);
            buf_free(&d);
        }
    }
    {
        /* what openssl cms -keyopt rsa_padding_mode:oaep writes: the
         * default hashes, all parameters absent from the SEQUENCE */
        recipe rc = {0};
        buf d;

        rc.oaep = 1;
        d = envelope(EVP_aes_128_gcm(), rsa_cert, &rc, 0);
        tap_ok(decrypts(&d, rsa_key, rsa_cert, &err),
               "RSA-OAEP with default (SHA-1) parameters: accepted and "
               "decrypted (%s)",
               err.message);
        buf_free(&d);
    }
}

static void test_ecdh_accepted(void)
{
    static const struct {
        const char *name;
        const EVP_CIPHER *(*wrap)(void);
    } wraps[] = {{"id-aes128-wrap", EVP_aes_128_wrap},
                 {"id-aes192-wrap", EVP_aes_192_wrap},
                 {"id-aes256-wrap", EVP_aes_256_wrap}};
    struct {
        const char *name;
        EVP_PKEY *key;
        X509 *cert;
    } curves[] = {{"P-256", p256_key, p256_cert},
                  {"P-384", p384_key, p384_cert},
                  {"P-521", p521_key, p521_cert}};
    cms_error err;
    size_t i, c;
    int cof;

    for (c = 0; c < 3; c++) {
        for (i = 0; i < 5; i++) {
            for (cof = 0; cof < 2; cof++) {
                recipe rc = {0};
                buf d;

                rc.kdf_md = mds[i].md();
                rc.cofactor = cof;
                rc.wrap = wraps[(i + c) % 3].wrap();
                d = envelope(c == 1 ? EVP_aes_128_gcm() : EVP_aes_256_cbc(),
                             curves[c].cert, &rc, 0);
                tap_ok(decrypts(&d, curves[c].key, curves[c].cert, &err),
                       "ECDH %s %s %s KDF, %s: accepted and decrypted (%s)",
                       curves[c].name, cof ? "cofactorDH" : "stdDH",
                       mds[i].name, wraps[(i + c) % 3].name, err.message);
                buf_free(&d);
            }
        }
    }
}

/* An envelope for P-256 whose originator key AlgorithmIdentifier gets
 * these parameters. */
static buf with_originator_params(const char *param)
{
    return edit_alg(envelope(EVP_aes_128_cbc(), p256_cert, NULL, 0),
                    AT_ORIGINATOR, "1.2.840.10045.2.1", param);
}

static void test_originator_accepted(void)
{
    struct {
        buf der;
        const char *what;
    } c[] = {
        {with_originator_params("0500"),
         "originator id-ecPublicKey with NULL parameters"},
        {with_originator_params("06082a8648ce3d030107"),
         "originator id-ecPublicKey namedCurve prime256v1"},
    };
    cms_error err;
    size_t i;

    for (i = 0; i < COUNT(c); i++) {
        tap_ok(decrypts(&c[i].der, p256_key, p256_cert, &err),
               "%s: accepted and decrypted (%s)", c[i].what, err.message);
        buf_free(&c[i].der);
    }
}

static void test_own_encrypt_accepted(void)
{
    static const cms_cipher ciphers[] = {
        CMS_CIPHER_AES128_CBC, CMS_CIPHER_AES192_CBC, CMS_CIPHER_AES256_CBC,
        CMS_CIPHER_AES128_GCM, CMS_CIPHER_AES256_GCM};
    STACK_OF(X509) *rcpts = sk_X509_new_null();
    cms_result *r = NULL;
    cms_error err = {0};
    size_t i, k, n;
    int pad, ok;

    if (rcpts == NULL || !sk_X509_push(rcpts, rsa_cert) ||
        !sk_X509_push(rcpts, p384_cert))
        die("recipients");
    for (i = 0; i < 5; i++) {
        for (pad = 0; pad < 2; pad++) {
            cms_envelope *env = NULL;
            cms_result *plain_r = NULL;
            int sig;

            ok = cms_encrypt_entity((const unsigned char *)plain, strlen(plain),
                                    rcpts, ciphers[i],
                                    pad ? CMS_RSA_OAEP : CMS_RSA_PKCS1, &r,
                                    &err) == 0;
            for (k = 0; ok && k < 2; k++) {
                const unsigned char *d = cms_result_data(r, &n);

                ok = cms_envelope_parse(d, n, &env, &err) == 0 &&
                     cms_envelope_decrypt(env, k ? p384_key : rsa_key,
                                          k ? p384_cert : rsa_cert, &plain_r,
                                          &sig, &err) == 0;
                cms_result_free(plain_r);
                plain_r = NULL;
                cms_envelope_free(env);
                env = NULL;
            }
            tap_ok(ok,
                   "cms_encrypt_entity %s %s to RSA and P-384: accepted, "
                   "both decrypt (%s)",
                   cms_cipher_name(ciphers[i]), pad ? "oaep" : "pkcs1",
                   err.message);
            cms_result_free(r);
            r = NULL;
        }
    }
    sk_X509_free(rcpts);
}

static void test_signatures_accepted(void)
{
    cms_error err;
    size_t i;
    buf d;

    for (i = 0; i < 5; i++) {
        d = signature(rsa_key, rsa_cert, mds[i].md(), 0, 0, NULL, i == 2);
        tap_ok(verifies(&d, &err),
               "RSA PKCS#1 v1.5 %s%s: accepted and valid (%s)", mds[i].name,
               i == 2 ? ", BER streamed" : "", err.message);
        buf_free(&d);
        d = signature(p256_key, p256_cert, mds[i].md(), 0, 0, NULL, 0);
        tap_ok(verifies(&d, &err), "ECDSA P-256 %s: accepted and valid (%s)",
               mds[i].name, err.message);
        buf_free(&d);
        d = signature(rsa_key, rsa_cert, mds[i].md(), 1,
                      i == 0 ? RSA_PSS_SALTLEN_MAX : RSA_PSS_SALTLEN_DIGEST,
                      NULL, 0);
        tap_ok(verifies(&d, &err), "RSASSA-PSS %s: accepted and valid (%s)",
               mds[i].name, err.message);
        buf_free(&d);
    }
}

/* A signature by key whose SignerInfo's signatureAlgorithm becomes oid
 * with param, or whose digestAlgorithm does (digest). */
static buf with_signer_alg(EVP_PKEY *key, X509 *cert, const EVP_MD *md,
                           int digest, const char *oid, const char *param)
{
    return edit_alg(signature(key, cert, md, 0, 0, NULL, 0),
                    digest ? AT_DIGEST : AT_SIGNATURE, oid, param);
}

static void test_signature_forms_accepted(void)
{
    struct {
        buf der;
        const char *what;
    } c[] = {
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0,
                         "1.2.840.113549.1.1.11", "0500"),
         "signatureAlgorithm sha256WithRSAEncryption, NULL"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha384(), 0,
                         "1.2.840.113549.1.1.1", NULL),
         "signatureAlgorithm rsaEncryption, parameters absent"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha256(), 0,
                         "1.2.840.10045.2.1", NULL),
         "signatureAlgorithm id-ecPublicKey"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha512(), 0,
                         "1.2.840.10045.4.3.4", "0500"),
         "signatureAlgorithm ecdsa-with-SHA512, NULL"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha256(), 1,
                         "2.16.840.1.101.3.4.2.1", "0500"),
         "digestAlgorithm sha256 with NULL parameters"},
    };
    cms_error err;
    size_t i;

    for (i = 0; i < COUNT(c); i++) {
        tap_ok(verifies(&c[i].der, &err), "%s: accepted and valid (%s)",
               c[i].what, err.message);
        buf_free(&c[i].der);
    }
}

/* ---- refused ------------------------------------------------------------- */

static void test_content_refused(void)
{
    /* the OID octets after 06 09 60 86 48 01 65 03 04 01 */
    verdict v[] = {
        {replaced(envelope(EVP_aes_128_cbc(), rsa_cert, NULL, 0),
                  "0609608648016503040102", "0609608648016503040106"),
         CMS_ERR_ALGORITHM,
         "content encryption of EnvelopedData 2.16.840.1.101.3.4.1.6 "
         "(id-aes128-GCM) is not supported (accepted: aes-128-cbc, "
         "aes-192-cbc, aes-256-cbc, des-ede3-cbc)",
         "GCM inside EnvelopedData"},
        {replaced(envelope(EVP_aes_256_gcm(), rsa_cert, NULL, 0),
                  "060960864801650304012e", "060960864801650304012a"),
         CMS_ERR_ALGORITHM,
         "content encryption of AuthEnvelopedData "
         "2.16.840.1.101.3.4.1.42 (AES-256-CBC) is not supported",
         "CBC inside AuthEnvelopedData"},
        {replaced(envelope(EVP_aes_128_cbc(), rsa_cert, NULL, 0),
                  "0609608648016503040102", "0609608648016503040103"),
         CMS_ERR_ALGORITHM,
         "2.16.840.1.101.3.4.1.3 (AES-128-OFB) is not supported",
         "aes-128-ofb"},
        {replaced(envelope(EVP_des_ede3_cbc(), rsa_cert, NULL, 0),
                  "06082a864886f70d0307", "06082a864886f70d0302"),
         CMS_ERR_ALGORITHM, "1.2.840.113549.3.2 (RC2-CBC) is not supported",
         "RC2-CBC"},
        {replaced(envelope(EVP_aes_128_cbc(), rsa_cert, NULL, 0),
                  "06096086480165030401020410", "06096086480165030401020210"),
         CMS_ERR_ALGORITHM,
         "(AES-128-CBC) is not supported with these parameters: the IV "
         "must be an OCTET STRING of 16 octets",
         "an AES-CBC IV that is an INTEGER"},
        {replaced(envelope(EVP_aes_128_gcm(), rsa_cert, NULL, 0), "020110",
                  "020111"),
         CMS_ERR_ALGORITHM,
         "(id-aes128-GCM) is not supported with these parameters: the "
         "ICV length must be 12 to 16 octets",
         "an ICV length of 17"},
        {replaced(envelope(EVP_aes_128_gcm(), rsa_cert, NULL, 0), "020110",
                  "020108"),
         CMS_ERR_ALGORITHM, "ICV length must be 12 to 16",
         "an ICV length of 8"},
        {replaced(envelope(EVP_aes_192_gcm(), rsa_cert, NULL, 0), "3011040c",
                  "30110204"),
         CMS_ERR_ALGORITHM,
         "(id-aes192-GCM) is not supported with these parameters: the "
         "nonce must be an OCTET STRING of 12 octets",
         "a GCM nonce that is not an OCTET STRING"},
    };

    check_verdicts(v, COUNT(v), 0);
}

/* An envelope for RSA whose keyEncryptionAlgorithm becomes oid, param. */
static buf with_ktri_alg(const char *oid, const char *param)
{
    return edit_alg(envelope(EVP_aes_128_cbc(), rsa_cert, NULL, 0), AT_KTRI,
                    oid, param);
}

#define OAEP "1.2.840.113549.1.1.7"

static void test_transport_refused(void)
{
    recipe md5 = {0}, mgf1_md5 = {0}, label = {0}, dflt = {0};
    cms_error err;
    buf d;

    md5.oaep = 1;
    md5.oaep_md = EVP_md5();
    mgf1_md5.oaep = 1;
    mgf1_md5.oaep_md = EVP_sha256();
    mgf1_md5.mgf1_md = EVP_md5();
    label.oaep = 1;
    label.oaep_md = EVP_sha256();
    label.label = "label";
    {
        verdict v[] = {
            {envelope(EVP_aes_128_cbc(), rsa_cert, &md5, 0), CMS_ERR_ALGORITHM,
             "OAEP hash 1.2.840.113549.2.5 (MD5) is not supported "
             "(accepted: sha1, sha224, sha256, sha384, sha512)",
             "RSA-OAEP with MD5"},
            {envelope(EVP_aes_128_cbc(), rsa_cert, &mgf1_md5, 0),
             CMS_ERR_ALGORITHM,
             "MGF1 hash 1.2.840.113549.2.5 (MD5) is not supported",
             "RSA-OAEP SHA-256 with MGF1 MD5"},
            {envelope(EVP_aes_128_cbc(), rsa_cert, &label, 0),
             CMS_ERR_ALGORITHM,
             "OAEP label source 1.2.840.113549.1.1.9 (PSPECIFIED) is not "
             "supported with these parameters: the label must be an empty "
             "OCTET STRING",
             "RSA-OAEP with a label"},
            {with_ktri_alg(OAEP, "3011a20f300d06092a864886f70d0101090400"),
             CMS_OK, NULL, "RSA-OAEP with an explicit empty pSpecified label"},
            {with_ktri_alg(OAEP, "300fa00d300b0609608648016503040201"), CMS_OK,
             NULL, "RSA-OAEP with SHA-256 and MGF1 left at SHA-1"},
            {with_ktri_alg(OAEP, "300fa20d300b06092a864886f70d010109"),
             CMS_ERR_ALGORITHM, "the label must be an empty",
             "RSA-OAEP with pSpecified but no parameters"},
            {with_ktri_alg(OAEP, "3004a1023005"), CMS_ERR_INPUT,
             "not a CMS structure",
             "RSA-OAEP parameters that are not BER inside"},
            {with_ktri_alg(OAEP, "300aa1083006060400010203"), CMS_ERR_ALGORITHM,
             "mask generation function 0.0.1.2.3 is not supported "
             "(accepted: MGF1)",
             "RSA-OAEP with an unknown mask generation function"},
            {with_ktri_alg(OAEP, "0500"), CMS_ERR_ALGORITHM,
             "key transport 1.2.840.113549.1.1.7 (RSAES-OAEP) is not "
             "supported with these parameters",
             "RSA-OAEP with NULL parameters"},
            {with_ktri_alg(OAEP, "3011a30f300d06092a864886f70d0101090400"),
             CMS_ERR_ALGORITHM, "a field is unknown or out of order",
             "RSA-OAEP with a field [3]"},
            {with_ktri_alg("1.2.840.113549.1.1.1", "0403010203"),
             CMS_ERR_ALGORITHM,
             "key transport 1.2.840.113549.1.1.1 (rsaEncryption) is not "
             "supported with these parameters: they must be absent or NULL",
             "rsaEncryption with parameters"},
            {with_ktri_alg("1.2.840.113549.1.1.10", NULL), CMS_ERR_ALGORITHM,
             "key transport 1.2.840.113549.1.1.10 (RSASSA-PSS) is not "
             "supported (accepted: rsaEncryption, id-RSAES-OAEP)",
             "RSASSA-PSS as key transport"},
            {with_ktri_alg("1.2.3.4.5", NULL), CMS_ERR_ALGORITHM,
             "key transport 1.2.3.4.5 is not supported",
             "an OID OpenSSL has no name for"},
        };

        check_verdicts(v, COUNT(v), 0);
    }
    /* RFC 8017's defaults with the parameters absent: on the list, but
     * OpenSSL 3.0 wants the SEQUENCE (docs/DESIGN.md) */
    dflt.oaep = 1;
    d = edit_alg(envelope(EVP_aes_128_cbc(), rsa_cert, &dflt, 0), AT_KTRI, OAEP,
                 NULL);
    tap_ok(cms_algs_check_enveloped(d.data, d.len, NULL) == 0 &&
               !decrypts(&d, rsa_key, rsa_cert, &err) &&
               err.status == CMS_ERR_DECRYPT,
           "RSA-OAEP with its parameters absent: accepted, and OpenSSL "
           "fails it as a decryption (%s)",
           err.message);
    buf_free(&d);
}

/* An envelope for P-256 whose keyEncryptionAlgorithm becomes oid, param. */
static buf with_kari_alg(const char *oid, const char *param)
{
    return edit_alg(envelope(EVP_aes_128_cbc(), p256_cert, NULL, 0), AT_KARI,
                    oid, param);
}

#define STD_SHA1KDF "1.3.133.16.840.63.0.2"

static void test_agreement_refused(void)
{
    static const struct {
        const char *name, *oid;
        const EVP_CIPHER *(*wrap)(void);
    } pads[] = {
        {"id-aes128-wrap-pad", "2.16.840.1.101.3.4.1.8", EVP_aes_128_wrap_pad},
        {"id-aes192-wrap-pad", "2.16.840.1.101.3.4.1.28", EVP_aes_192_wrap_pad},
        {"id-aes256-wrap-pad", "2.16.840.1.101.3.4.1.48", EVP_aes_256_wrap_pad},
    };
    verdict v[] = {
        /* the daemon killer: what the reproducer sends */
        {replaced(envelope(EVP_aes_192_cbc(), p256_cert, NULL, 0),
                  "0609608648016503040119", "060960864801650304011c"),
         CMS_ERR_ALGORITHM,
         "key wrap 2.16.840.1.101.3.4.1.28 (id-aes192-wrap-pad) is not "
         "supported (accepted: id-aes128-wrap, id-aes192-wrap, "
         "id-aes256-wrap)",
         "id-aes192-wrap replaced by id-aes192-wrap-pad"},
        /* what OpenSSL picks for a 3DES envelope to an EC key */
        {envelope(EVP_des_ede3_cbc(), p256_cert, NULL, 0), CMS_ERR_ALGORITHM,
         "key wrap 1.2.840.113549.1.9.16.3.6 (id-smime-alg-CMS3DESwrap) "
         "is not supported",
         "des-ede3-cbc to an EC key (CMS3DESwrap)"},
        {with_kari_alg(STD_SHA1KDF, "300f060960864801650304010504020000"),
         CMS_ERR_ALGORITHM,
         "key wrap 2.16.840.1.101.3.4.1.5 (id-aes128-wrap) is not "
         "supported with these parameters: they must be absent or NULL",
         "id-aes128-wrap with parameters"},
        {with_kari_alg(STD_SHA1KDF, "300d060960864801650304010505 00"), CMS_OK,
         NULL, "id-aes128-wrap with NULL parameters"},
        {with_kari_alg(STD_SHA1KDF, NULL), CMS_ERR_ALGORITHM,
         "key agreement 1.3.133.16.840.63.0.2 "
         "(dhSinglePass-stdDH-sha1kdf-scheme) is not supported with "
         "these parameters: they must name the key wrap",
         "a KDF scheme without its key wrap"},
        {with_kari_alg("1.3.133.16.840.63.0.16", "300b060960864801650304012d"),
         CMS_ERR_ALGORITHM,
         "key agreement 1.3.133.16.840.63.0.16 is not supported",
         "mqvSinglePass-sha1kdf-scheme (ECMQV)"},
        {with_kari_alg("1.3.132.1.11.1", "300b060960864801650304012d"), CMS_OK,
         NULL, "dhSinglePass-stdDH-sha256kdf-scheme written by hand"},
        {with_kari_alg("1.3.132.1.15.1", "300b060960864801650304012d"),
         CMS_ERR_ALGORITHM, "key agreement 1.3.132.1.15.1 is not supported",
         "mqvSinglePass-sha256kdf-scheme"},
        {with_originator_params("06052b8104000a"), CMS_ERR_ALGORITHM,
         "curve 1.3.132.0.10 (secp256k1) is not supported (accepted: "
         "prime256v1, secp384r1, secp521r1)",
         "an originator key on secp256k1"},
        {with_originator_params("3003020101"), CMS_ERR_ALGORITHM,
         "originator key 1.2.840.10045.2.1 (id-ecPublicKey) is not "
         "supported with these parameters: only a named curve",
         "explicit curve parameters"},
        {edit_alg(envelope(EVP_aes_128_cbc(), p256_cert, NULL, 0),
                  AT_ORIGINATOR, "1.2.840.113549.1.1.1", "0500"),
         CMS_ERR_ALGORITHM,
         "originator key 1.2.840.113549.1.1.1 (rsaEncryption) is not "
         "supported (accepted: id-ecPublicKey)",
         "an RSA originator key"},
        /* originator [0] { originatorKey [1] ... } becomes an
         * issuerAndSerialNumber: static-static agreement */
        {replaced(envelope(EVP_aes_128_cbc(), p256_cert, NULL, 0),
                  "a051a14f3009", "a051304f3009"),
         CMS_ERR_ALGORITHM,
         "an originator named by its certificate (static-static) is "
         "not supported",
         "a static-static originator"},
    };
    char want[160];
    size_t i;
    buf d;

    for (i = 0; i < COUNT(pads); i++) {
        recipe rc = {0};

        rc.wrap = pads[i].wrap();
        d = envelope(EVP_aes_256_cbc(), p384_cert, &rc, 0);
        snprintf(want, sizeof(want), "key wrap %s (%s) is not supported",
                 pads[i].oid, pads[i].name);
        refuse_case(&d, 0, CMS_ERR_ALGORITHM, want, pads[i].name);
    }
    check_verdicts(v, COUNT(v), 0);
}

#define PSS "1.2.840.113549.1.1.10"

static void test_signatures_refused(void)
{
    verdict v[] = {
        {signature(rsa_key, rsa_cert, EVP_md5(), 0, 0, NULL, 0),
         CMS_ERR_ALGORITHM,
         "digest 1.2.840.113549.2.5 (MD5) is not supported (accepted: "
         "sha1, sha224, sha256, sha384, sha512)",
         "an MD5 signature"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 1,
                         "1.2.840.113549.2.5", NULL),
         CMS_ERR_ALGORITHM, "digest 1.2.840.113549.2.5 (MD5) is not supported",
         "a SignerInfo digest MD5 under a SHA-256 digestAlgorithms"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 1,
                         "2.16.840.1.101.3.4.2.1", "040100"),
         CMS_ERR_ALGORITHM,
         "digest 2.16.840.1.101.3.4.2.1 (SHA256) is not supported with "
         "these parameters: they must be absent or NULL",
         "a digest with parameters"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0,
                         "1.2.840.113549.1.1.4", "0500"),
         CMS_ERR_ALGORITHM,
         "signature 1.2.840.113549.1.1.4 (RSA-MD5) is not supported",
         "md5WithRSAEncryption"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha256(), 0,
                         "2.16.840.1.101.3.4.3.2", NULL),
         CMS_ERR_ALGORITHM,
         "signature 2.16.840.1.101.3.4.3.2 (dsa_with_SHA256) is not "
         "supported",
         "dsa-with-sha256"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha256(), 0, "1.3.101.112",
                         NULL),
         CMS_ERR_ALGORITHM, "signature 1.3.101.112 (ED25519) is not supported",
         "Ed25519"},
        {with_signer_alg(p256_key, p256_cert, EVP_sha256(), 0,
                         "1.2.840.10045.4.3.2", "0401aa"),
         CMS_ERR_ALGORITHM,
         "(ecdsa-with-SHA256) is not supported with these parameters",
         "ecdsa-with-SHA256 with parameters"},
        {signature(rsa_key, rsa_cert, EVP_sha256(), 1, RSA_PSS_SALTLEN_DIGEST,
                   EVP_sha384(), 0),
         CMS_ERR_ALGORITHM,
         "signature 1.2.840.113549.1.1.10 (RSASSA-PSS) is not supported "
         "with these parameters: MGF1 uses another hash than the "
         "signature",
         "RSASSA-PSS SHA-256 with MGF1 SHA-384"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS, NULL),
         CMS_ERR_ALGORITHM,
         "(RSASSA-PSS) is not supported with these parameters: they "
         "are not a SEQUENCE of parameters",
         "RSASSA-PSS without parameters"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS, "3000"),
         CMS_OK, NULL, "RSASSA-PSS with all-default (SHA-1) parameters"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "300ea00c300a06082a864886f70d0205"),
         CMS_ERR_ALGORITHM,
         "PSS hash 1.2.840.113549.2.5 (MD5) is not supported",
         "RSASSA-PSS with MD5"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "3005a203020114"),
         CMS_OK, NULL, "RSASSA-PSS SHA-1 with salt length 20"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "3006a20402021388"),
         CMS_ERR_ALGORITHM, "the salt length is not 0 to 1024",
         "RSASSA-PSS with salt length 5000"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "3005a2030201ff"),
         CMS_ERR_ALGORITHM, "the salt length is not",
         "RSASSA-PSS with a negative salt length"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "3005a303020102"),
         CMS_ERR_ALGORITHM, "the trailer field is not 1",
         "RSASSA-PSS with trailer field 2"},
        {with_signer_alg(rsa_key, rsa_cert, EVP_sha256(), 0, PSS,
                         "300aa203020114a203020114"),
         CMS_ERR_ALGORITHM, "out of order", "RSASSA-PSS with a field twice"},
    };

    check_verdicts(v, COUNT(v), 1);
}

/* A signed entity with an MD5 signature, encrypted: decrypt says it is
 * signed, verify refuses it for its algorithm. */
static void test_signed_inside(void)
{
    buf d = signature(rsa_key, rsa_cert, EVP_md5(), 0, 0, NULL, 0);
    buf inner = smime_of(&d, "signed-data");
    STACK_OF(X509) *rcpts = sk_X509_new_null();
    cms_result *r = NULL, *plain_r = NULL;
    cms_envelope *env = NULL;
    cms_verification *v = NULL;
    cms_error err = {0}, verr = {0};
    const unsigned char *e;
    size_t n;
    int sig = -1, ok;

    if (rcpts == NULL || !sk_X509_push(rcpts, rsa_cert))
        die("recipients");
    ok = cms_encrypt_entity(inner.data, inner.len, rcpts, CMS_CIPHER_AES128_GCM,
                            CMS_RSA_PKCS1, &r, &err) == 0;
    e = ok ? cms_result_data(r, &n) : NULL;
    ok =
        ok && cms_envelope_parse(e, n, &env, &err) == 0 &&
        cms_envelope_decrypt(env, rsa_key, rsa_cert, &plain_r, &sig, &err) == 0;
    tap_ok(ok && sig == 1,
           "an MD5-signed entity, encrypted: decrypts, and counts as signed "
           "(%s)",
           err.message);
    e = ok ? cms_result_data(plain_r, &n) : NULL;
    tap_ok(ok && cms_verify_entity(e, n, NULL, NULL, NULL, &v, &verr) == -1 &&
               verr.status == CMS_ERR_ALGORITHM &&
               strstr(verr.message, "(MD5)") != NULL,
           "its verification is CMS_ERR_ALGORITHM (%s)", verr.message);
    cms_verification_free(v);
    cms_envelope_free(env);
    cms_result_free(plain_r);
    cms_result_free(r);
    sk_X509_free(rcpts);
    buf_free(&inner);
    buf_free(&d);
}

/* ---- BER: what can and cannot be read ------------------------------------ */

#define OID_ENV "06092a864886f70d010703"
#define OID_SIGNED "06092a864886f70d010702"
#define OID_DATA "06092a864886f70d010701"
#define OID_AES128CBC "0609608648016503040102"
#define IV16 "0410000102030405060708090a0b0c0d0e0f"
#define KTRI                                                                   \
    "301f020100800100300d06092a864886f70d01010105000408aabbccddeeff0011"

/* A hand-made EnvelopedData: originator info, recipient infos and the
 * content encryption AlgorithmIdentifier given; lengths definite or, with
 * indef, indefinite everywhere they can be. */
static buf handmade(int indef, buf orig, buf ris, buf alg)
{
    buf (*W)(unsigned char, int, ...) = indef ? I : T;
    buf eci = W(0x30, 3, hex(OID_DATA), alg, hex("800401020304"));

    if (orig.len > 0)
        return W(
            0x30, 2, hex(OID_ENV),
            W(0xa0, 1, W(0x30, 4, hex("020102"), orig, W(0x31, 1, ris), eci)));
    buf_free(&orig);
    return W(0x30, 2, hex(OID_ENV),
             W(0xa0, 1, W(0x30, 3, hex("020100"), W(0x31, 1, ris), eci)));
}

static buf aes_alg(int indef, buf params)
{
    return (indef ? I : T)(0x30, 2, hex(OID_AES128CBC), params);
}

static buf nested(int n, int indef)
{
    buf b = hex("0500");
    int i;

    for (i = 0; i < n; i++)
        b = indef ? I(0x30, 1, b) : T(0x30, 1, b);
    return b;
}

static void test_ber_forms(void)
{
    verdict v[] = {
        {handmade(0, hex(""), hex(KTRI), aes_alg(0, hex(IV16))), CMS_OK, NULL,
         "hand-made DER"},
        {handmade(1, hex(""), hex(KTRI), aes_alg(1, hex(IV16))), CMS_OK, NULL,
         "hand-made BER, indefinite lengths throughout"},
        {handmade(1, hex(""), hex(KTRI),
                  aes_alg(1, I(0x24, 2, hex("0408 0001020304050607"),
                               I(0x24, 1, hex("0408 08090a0b0c0d0e0f"))))),
         CMS_OK, NULL, "an IV as a constructed OCTET STRING, nested"},
        {handmade(1, hex(""), hex(KTRI),
                  aes_alg(1, I(0x24, 2, hex("0408 0001020304050607"),
                               hex("0407 08090a0b0c0d0e")))),
         CMS_ERR_ALGORITHM, "the IV must be an OCTET STRING of 16",
         "a constructed IV of 15 octets"},
        {handmade(1, hex(""), hex(KTRI),
                  aes_alg(1, I(0x24, 2, hex("0408 0001020304050607"),
                               hex("0208 08090a0b0c0d0e0f")))),
         CMS_ERR_INPUT, "a constructed OCTET STRING holds something else",
         "a constructed IV holding an INTEGER"},
        {T(0x30, 2, hex(OID_ENV), T(0xa0, 1, hex("3084800000000500"))),
         CMS_ERR_INPUT, "runs past the end", "a length of 2 GiB inside"},
        {handmade(0, hex(""), hex(KTRI), hex("30820fff" OID_AES128CBC IV16)),
         CMS_ERR_INPUT, "runs past the end",
         "a long-form length past the end of its SEQUENCE"},
        {handmade(0, hex(""), hex(KTRI),
                  hex("30840000001d" OID_AES128CBC IV16)),
         CMS_OK, NULL, "a non-minimal long-form length (BER)"},
        {handmade(0, hex(""), hex(KTRI), hex("30ff" OID_AES128CBC IV16)),
         CMS_ERR_INPUT, "a length is malformed",
         "the reserved length octet 0xff"},
        {handmade(0, hex(""), hex(KTRI), hex("3016 0680" IV16 "0000")),
         CMS_ERR_INPUT, "a primitive element has an indefinite length",
         "an indefinite-length OBJECT IDENTIFIER"},
        {handmade(0, hex(""), hex(KTRI),
                  hex("301e 060a80608648016503040102" IV16)),
         CMS_ERR_INPUT, "an object identifier is malformed",
         "an OID with a non-minimal subidentifier"},
        {handmade(0, hex(""), hex(KTRI),
                  hex("301d 0609608648016503040182" IV16)),
         CMS_ERR_INPUT, "an object identifier is malformed",
         "an OID whose last subidentifier does not end"},
        {handmade(0, hex(""), hex(KTRI), hex("301f" OID_AES128CBC IV16 "0500")),
         CMS_ERR_INPUT, "more than two fields",
         "an AlgorithmIdentifier with three fields"},
        {handmade(0, hex(""), hex(KTRI), hex("3002 0000")), CMS_ERR_INPUT,
         "an end-of-contents marker where an element belongs",
         "an end-of-contents marker in definite content"},
        {handmade(0, hex(""), hex("a5020500"), aes_alg(0, hex(IV16))),
         CMS_ERR_INPUT, "a RecipientInfo of no known kind",
         "a RecipientInfo [5]"},
        {handmade(0, hex(""),
                  hex("a20a0201040403aabbcc0400 a3020500 a4020500" KTRI),
                  aes_alg(0, hex(IV16))),
         CMS_OK, NULL,
         "KEK, password and other RecipientInfos beside a "
         "KeyTransRecipientInfo are not looked into"},
        {handmade(1, I(0xa0, 1, hex("bf8100 00 bf 81 80 00 02 0500")),
                  hex(KTRI), aes_alg(1, hex(IV16))),
         CMS_OK, NULL, "high tag numbers in the originator info"},
        {handmade(1, I(0xa0, 1, hex("bf8001 00")), hex(KTRI),
                  aes_alg(1, hex(IV16))),
         CMS_ERR_INPUT, "a tag is malformed",
         "a high tag number starting with 0x80"},
        {handmade(1, I(0xa0, 1, hex("bfffffffff7f00")), hex(KTRI),
                  aes_alg(1, hex(IV16))),
         CMS_ERR_INPUT, "a tag is malformed", "a tag number of five octets"},
        {handmade(1, I(0xa0, 1, nested(50, 1)), hex(KTRI),
                  aes_alg(1, hex(IV16))),
         CMS_OK, NULL, "50 nested indefinite SEQUENCEs in the originator info"},
        {handmade(1, I(0xa0, 1, nested(100, 1)), hex(KTRI),
                  aes_alg(1, hex(IV16))),
         CMS_ERR_INPUT, "nest more than 64 levels deep",
         "100 nested indefinite SEQUENCEs in the originator info"},
        {handmade(0, T(0xa0, 1, nested(10000, 0)), hex(KTRI),
                  aes_alg(0, hex(IV16))),
         CMS_OK, NULL,
         "10,000 nested definite SEQUENCEs in the originator info "
         "are stepped over by their length"},
        {handmade(1, I(0xa0, 1, hex("3080 0500")), hex(KTRI),
                  aes_alg(1, hex(IV16))),
         CMS_ERR_INPUT, "not a CMS structure",
         "an indefinite SEQUENCE without its end-of-contents"},
    };

    check_verdicts(v, COUNT(v), 0);
}

static void test_unreadable(void)
{
    static const unsigned char deep_pattern[2] = {0x30, 0x80};
    buf d, e;
    size_t i;

    d = buf_of("", 0);
    refuse_case(&d, 0, CMS_ERR_INPUT, "the body holds no CMS structure",
                "empty");
    tap_ok(cms_algs_check_enveloped(NULL, 0, NULL) == -1 &&
               cms_algs_check_signed(NULL, 0, NULL) == -1,
           "NULL input, NULL error");
    d.len = 200000;
    d.data = xmalloc(d.len);
    for (i = 0; i < d.len; i += 2)
        memcpy(d.data + i, deep_pattern, 2);
    refuse_case(&d, 0, CMS_ERR_INPUT, "not a CMS structure",
                "100,000 nested indefinite SEQUENCEs");
    {
        verdict env[] = {
            {signature(p256_key, p256_cert, EVP_sha256(), 0, 0, NULL, 0),
             CMS_ERR_INPUT,
             "the CMS structure is pkcs7-signedData, not enveloped data",
             "SignedData where an envelope belongs"},
        };
        verdict sig[] = {
            {envelope(EVP_aes_128_cbc(), rsa_cert, NULL, 0), CMS_ERR_INPUT,
             "the CMS structure is pkcs7-envelopedData, not signed data",
             "EnvelopedData where a signature belongs"},
            {T(0x30, 2, hex("06032a0304"), T(0xa0, 1, hex("3000"))),
             CMS_ERR_INPUT,
             "the CMS structure is of unknown type, not signed data",
             "a ContentInfo of unknown type"},
            {T(0x30, 2, hex(OID_SIGNED),
               T(0xa0, 1,
                 T(0x30, 4, hex("020101"), T(0x31, 1, hex("0500")),
                   T(0x30, 1, hex(OID_DATA)), hex("3100")))),
             CMS_ERR_INPUT, "an AlgorithmIdentifier expected",
             "digestAlgorithms holding a NULL"},
            {T(0x30, 2, hex(OID_SIGNED),
               T(0xa0, 1,
                 T(0x30, 4, hex("020101"), hex("3100"),
                   T(0x30, 1, hex(OID_DATA)), hex("3100")))),
             CMS_OK, NULL,
             "a SignedData without digests or signers (OpenSSL judges the "
             "rest)"},
        };

        check_verdicts(env, COUNT(env), 0);
        check_verdicts(sig, COUNT(sig), 1);
    }

    /* every prefix of a DER envelope, a BER envelope and a SignedData */
    {
        buf src[3];
        int k, bad = 0, passed = 0;

        src[0] = envelope(EVP_aes_128_gcm(), p256_cert, NULL, 0);
        src[1] = envelope(EVP_aes_256_cbc(), rsa_cert, NULL, 1);
        src[2] = signature(rsa_key, rsa_cert, EVP_sha256(), 0, 0, NULL, 1);
        for (k = 0; k < 3; k++) {
            for (i = 0; i < src[k].len; i++) {
                cms_error err = {0};
                int rc;

                e = buf_of(src[k].data, i);
                rc = k == 2 ? cms_algs_check_signed(e.data, e.len, &err)
                            : cms_algs_check_enveloped(e.data, e.len, &err);
                /* a BER structure may pass before its end: the walker
                 * reads up to the last algorithm only */
                if (rc == 0)
                    passed++;
                if ((rc == 0 && k == 0) ||
                    (rc != 0 &&
                     (err.status != CMS_ERR_INPUT || !utf8_valid(err.message))))
                    bad++;
                buf_free(&e);
            }
        }
        tap_ok(bad == 0,
               "every prefix of three structures (%zu, %zu, %zu octets): "
               "CMS_ERR_INPUT, or passed where the rest of a BER one is "
               "unread (%d passed, %d wrong)",
               src[0].len, src[1].len, src[2].len, passed, bad);
        for (k = 0; k < 3; k++)
            buf_free(&src[k]);
    }
}

/* Damaged copies of real structures: any verdict, never a read past the
 * end (AddressSanitizer), statuses and messages as promised. */
static void test_damage(void)
{
    buf src[4];
    unsigned int seed = 20260311;
    int i, k, bad = 0, counts[3] = {0, 0, 0};

    src[0] = envelope(EVP_aes_128_cbc(), p256_cert, NULL, 0);
    src[1] = envelope(EVP_aes_256_gcm(), rsa_cert, NULL, 1);
    {
        recipe rc = {0};

        rc.oaep = 1;
        rc.oaep_md = EVP_sha256();
        src[2] = envelope(EVP_aes_128_cbc(), rsa_cert, &rc, 0);
    }
    src[3] = signature(rsa_key, rsa_cert, EVP_sha256(), 1,
                       RSA_PSS_SALTLEN_DIGEST, NULL, 0);
    for (i = 0; i < 20000; i++) {
        buf d = buf_of(src[i % 4].data, src[i % 4].len);
        cms_error err = {0};
        int rc;

        for (k = rand_r(&seed) % 3; k >= 0; k--)
            d.data[(size_t)rand_r(&seed) % d.len] ^=
                (unsigned char)(1 + rand_r(&seed) % 255);
        if (i % 11 == 0)
            d.len = (size_t)rand_r(&seed) % d.len;
        rc = i % 4 == 3 ? cms_algs_check_signed(d.data, d.len, &err)
                        : cms_algs_check_enveloped(d.data, d.len, &err);
        if (rc == 0)
            counts[0]++;
        else if (err.status == CMS_ERR_INPUT)
            counts[1]++;
        else if (err.status == CMS_ERR_ALGORITHM &&
                 strstr(err.message, " is not supported") != NULL)
            counts[2]++;
        else
            bad++;
        if (rc != 0 && !utf8_valid(err.message))
            bad++;
        buf_free(&d);
    }
    tap_ok(bad == 0 && counts[1] > 0 && counts[2] > 0,
           "20,000 damaged structures: %d passed, %d CMS_ERR_INPUT, %d "
           "CMS_ERR_ALGORITHM, %d otherwise",
           counts[0], counts[1], counts[2], bad);
    for (k = 0; k < 4; k++)
        buf_free(&src[k]);
}

int main(void)
{
    cms_init();
    make_keys();

    test_content_accepted();
    test_oaep_accepted();
    test_ecdh_accepted();
    test_originator_accepted();
    test_own_encrypt_accepted();
    test_signatures_accepted();
    test_signature_forms_accepted();
    test_content_refused();
    test_transport_refused();
    test_agreement_refused();
    test_signatures_refused();
    test_signed_inside();
    test_ber_forms();
    test_unreadable();
    test_damage();

    free_keys();
    return tap_done();
}
