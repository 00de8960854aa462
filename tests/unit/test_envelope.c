/*
 * Encryption, decryption and verification with real keys made here
 * (RSA-2048, P-256, P-384 under a self-made CA): round trips through the
 * module for every cipher and key type, interoperability both ways with the
 * openssl command line, the padding-oracle guarantee over many corrupted
 * keys, recipient checks, every verification reason, and hostile input.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
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

/* The mail headers of sample, which decrypt and verify put back on the
 * entity they return, and that whole message. */
#define SAMPLE_OUTER                                                           \
    "From: Alice <alice@example.org>\r\n"                                      \
    "To: Bob <bob@example.org>\r\n"                                            \
    "Subject: Quarterly report\r\n"                                            \
    "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"                                 \
    "Message-ID: <1@example.org>\r\n"
static const char sample_message[] = SAMPLE_OUTER "MIME-Version: 1.0\r\n"
                                                  "Content-Type: text/plain; "
                                                  "charset=us-ascii\r\n"
                                                  "Content-Transfer-Encoding: "
                                                  "7bit\r\n"
                                                  "\r\n"
                                                  "Hello Bob,\r\n"
                                                  "\r\n"
                                                  "the numbers are in.\r\n"
                                                  "Regards\r\n";

typedef struct {
    unsigned char *data;
    size_t len;
} bytes;

static bytes bytes_of(const void *p, size_t n)
{
    bytes b = {xmalloc(n + 1), n};

    memcpy(b.data, p, n);
    b.data[n] = '\0';
    return b;
}

static bytes str_bytes(const char *s)
{
    return bytes_of(s, strlen(s));
}

static void bytes_free(bytes *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
}

static int bytes_is(const bytes *b, const void *p, size_t n)
{
    return b->len == n && memcmp(b->data, p, n) == 0;
}

static int has(const bytes *b, const char *needle)
{
    return memmem(b->data, b->len, needle, strlen(needle)) != NULL;
}

static int starts(const bytes *b, const char *prefix)
{
    return b->len >= strlen(prefix) &&
           memcmp(b->data, prefix, strlen(prefix)) == 0;
}

/* b with the first occurrence of from replaced by to. */
static bytes replaced(const bytes *b, const char *from, const char *to)
{
    const unsigned char *p = memmem(b->data, b->len, from, strlen(from));
    size_t at, n;
    bytes out;

    if (p == NULL)
        die("replaced: text not found");
    at = (size_t)(p - b->data);
    n = b->len - strlen(from) + strlen(to);
    out.data = xmalloc(n + 1);
    out.len = n;
    memcpy(out.data, b->data, at);
    memcpy(out.data + at, to, strlen(to));
    memcpy(out.data + at + strlen(to), p + strlen(from),
           b->len - at - strlen(from));
    out.data[n] = '\0';
    return out;
}

/* CRLF to LF everywhere. */
static bytes to_lf(const bytes *b)
{
    bytes out = {xmalloc(b->len + 1), 0};
    size_t i;

    for (i = 0; i < b->len; i++) {
        if (b->data[i] == '\r' && i + 1 < b->len && b->data[i + 1] == '\n')
            continue;
        out.data[out.len++] = b->data[i];
    }
    return out;
}

/* ---- base64 and the pkcs7-mime wrapping, done with OpenSSL's coder ---- */

static bytes b64_decode(const unsigned char *in, size_t len)
{
    EVP_ENCODE_CTX *ctx = EVP_ENCODE_CTX_new();
    bytes out = {xmalloc(len + 1), 0};
    int n = 0, total = 0, ok;

    EVP_DecodeInit(ctx);
    ok = EVP_DecodeUpdate(ctx, out.data, &n, in, (int)len) >= 0;
    total = n;
    ok = ok && EVP_DecodeFinal(ctx, out.data + total, &n) == 1;
    EVP_ENCODE_CTX_free(ctx);
    if (!ok)
        die("b64_decode");
    out.len = (size_t)(total + n);
    return out;
}

/* line 0: one line without breaks; otherwise line-long lines, CRLF. */
static bytes b64_encode(const bytes *der, size_t line)
{
    size_t cap = der->len * 2 + 16, off, n;
    size_t per = line == 0 ? der->len : line / 4 * 3; /* octets a line */
    bytes out = {xmalloc(cap), 0};

    for (off = 0; off < der->len; off += n) {
        n = der->len - off < per ? der->len - off : per;
        out.len += (size_t)EVP_EncodeBlock(out.data + out.len, der->data + off,
                                           (int)n);
        out.data[out.len++] = '\r';
        out.data[out.len++] = '\n';
    }
    return out;
}

/* The DER inside an application/pkcs7-mime result. */
static bytes p7m_der(const bytes *res)
{
    const unsigned char *crlf = memmem(res->data, res->len, "\r\n\r\n", 4);
    const unsigned char *lf = memmem(res->data, res->len, "\n\n", 2);
    const unsigned char *body;

    if (lf == NULL && crlf == NULL)
        die("p7m_der: no body");
    body = crlf != NULL && (lf == NULL || crlf < lf) ? crlf + 4 : lf + 2;
    return b64_decode(body, res->len - (size_t)(body - res->data));
}

/* headers (each ending in CRLF), a blank line, der as base64 in lines of
 * line characters (0: one line) or, with line (size_t)-1, binary. */
static bytes p7m_wrap(const char *headers, const bytes *der, size_t line)
{
    bytes body = line == (size_t)-1 ? bytes_of(der->data, der->len)
                                    : b64_encode(der, line);
    size_t hl = strlen(headers);
    bytes out = {xmalloc(hl + 2 + body.len + 1), 0};

    memcpy(out.data, headers, hl);
    memcpy(out.data + hl, "\r\n", 2);
    memcpy(out.data + hl + 2, body.data, body.len);
    out.len = hl + 2 + body.len;
    bytes_free(&body);
    return out;
}

#define ENVELOPED_HEADERS                                                      \
    "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; "        \
    "name=smime.p7m\r\n"                                                       \
    "Content-Transfer-Encoding: base64\r\n"
#define SIGNED_HEADERS                                                         \
    "Content-Type: application/pkcs7-mime; smime-type=signed-data; "           \
    "name=smime.p7m\r\n"                                                       \
    "Content-Transfer-Encoding: base64\r\n"

static bytes cms_der(CMS_ContentInfo *cms)
{
    unsigned char *der = NULL;
    int n = i2d_CMS_ContentInfo(cms, &der);
    bytes b;

    if (n <= 0)
        die("i2d_CMS_ContentInfo");
    b = bytes_of(der, (size_t)n);
    OPENSSL_free(der);
    return b;
}

static CMS_ContentInfo *der_cms(const bytes *der)
{
    const unsigned char *p = der->data;
    CMS_ContentInfo *cms = d2i_CMS_ContentInfo(NULL, &p, (long)der->len);

    if (cms == NULL)
        die("d2i_CMS_ContentInfo");
    return cms;
}

/* How many times the DER encoding of nid's OID occurs in der. */
static int count_oid(const bytes *der, int nid)
{
    unsigned char *enc = NULL;
    const unsigned char *p = der->data;
    int n = i2d_ASN1_OBJECT(OBJ_nid2obj(nid), &enc), count = 0;

    while (n > 0 && (p = memmem(p, der->len - (size_t)(p - der->data), enc,
                                (size_t)n)) != NULL) {
        count++;
        p++;
    }
    OPENSSL_free(enc);
    return count;
}

/* ---- keys and certificates ------------------------------------------ */

struct party {
    const char *label;
    const char *file; /* PEM files FILE.pem and FILE.key for the CLI */
    EVP_PKEY *key;
    X509 *cert;
};

static const struct cert_spec spec_rsa = {
    "critical,digitalSignature,keyEncipherment", "emailProtection", -86400,
    86400L * 365};
static const struct cert_spec spec_ec = {
    "critical,digitalSignature,keyAgreement", "emailProtection", -86400,
    86400L * 365};

static EVP_PKEY *ca_key, *other_ca_key, *inter_key;
static X509 *ca_cert, *other_ca_cert, *inter_cert;
static struct party rsa_a = {"RSA-2048", "rsa_a", NULL, NULL};
static struct party rsa_b = {"RSA-2048 (other)", "rsa_b", NULL, NULL};
static struct party ec256 = {"P-256", "ec256", NULL, NULL};
static struct party ec384 = {"P-384", "ec384", NULL, NULL};
static struct party ec256_b = {"P-256 (other)", "ec256_b", NULL, NULL};
static struct party *parties[] = {&rsa_a, &rsa_b, &ec256, &ec384, &ec256_b};
#define N_PARTIES (sizeof(parties) / sizeof(parties[0]))

static void make_party(struct party *p, EVP_PKEY *key, const char *email)
{
    if (key == NULL)
        die("party key");
    p->key = key;
    p->cert = make_cert_spec(key, p->label, email, ca_cert, ca_key, 0,
                             EVP_PKEY_is_a(key, "RSA") ? &spec_rsa : &spec_ec);
}

static void make_pki(void)
{
    ca_key = EVP_EC_gen("P-256");
    other_ca_key = EVP_EC_gen("P-256");
    inter_key = EVP_EC_gen("P-256");
    if (ca_key == NULL || other_ca_key == NULL || inter_key == NULL)
        die("CA keys");
    ca_cert = make_cert(ca_key, "smimed envelope CA", NULL, NULL, NULL, 1);
    other_ca_cert =
        make_cert(other_ca_key, "smimed other CA", NULL, NULL, NULL, 1);
    inter_cert =
        make_cert(inter_key, "smimed intermediate", NULL, ca_cert, ca_key, 1);
    make_party(&rsa_a, EVP_RSA_gen(2048), "rsa@example.org");
    make_party(&rsa_b, EVP_RSA_gen(2048), "rsa-b@example.org");
    make_party(&ec256, EVP_EC_gen("P-256"), "ec256@example.org");
    make_party(&ec384, EVP_EC_gen("P-384"), "ec384@example.org");
    make_party(&ec256_b, EVP_EC_gen("P-256"), "ec256-b@example.org");
}

static void free_pki(void)
{
    size_t i;

    for (i = 0; i < N_PARTIES; i++) {
        X509_free(parties[i]->cert);
        EVP_PKEY_free(parties[i]->key);
    }
    X509_free(ca_cert);
    X509_free(other_ca_cert);
    X509_free(inter_cert);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(other_ca_key);
    EVP_PKEY_free(inter_key);
}

/* A copy of cert with other validity dates (YYYYMMDDHHMMSSZ), signed again
 * by the CA. */
static X509 *with_dates(X509 *cert, const char *not_before,
                        const char *not_after)
{
    X509 *c = X509_dup(cert);

    if (c == NULL ||
        !ASN1_TIME_set_string(X509_getm_notBefore(c), not_before) ||
        !ASN1_TIME_set_string(X509_getm_notAfter(c), not_after) ||
        !X509_sign(c, ca_key, EVP_sha256()))
        die("with_dates");
    return c;
}

static STACK_OF(X509) *certs_of(int n, ...)
{
    STACK_OF(X509) *sk = sk_X509_new_null();
    va_list ap;
    int i;

    va_start(ap, n);
    for (i = 0; i < n; i++)
        sk_X509_push(sk, va_arg(ap, X509 *));
    va_end(ap);
    return sk;
}

/* ---- the openssl command line ---------------------------------------- */

static char tmp[64];
static char test_dir[4096]; /* the working directory, tests/ */
static int have_cli;

static void write_file(const char *name, const void *data, size_t len)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0)
        die("write_file");
}

static bytes read_file(const char *name)
{
    char path[256];
    FILE *f;
    bytes b = {NULL, 0};
    long n;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "rb");
    if (f == NULL)
        return bytes_of("", 0);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b.data = xmalloc((size_t)n + 1);
    b.len = fread(b.data, 1, (size_t)n, f);
    b.data[b.len] = '\0';
    fclose(f);
    return b;
}

static void write_pem(const char *name, X509 *cert, EVP_PKEY *key)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "w");
    if (f == NULL || (cert != NULL ? !PEM_write_X509(f, cert)
                                   : !PEM_write_PrivateKey(f, key, NULL, NULL,
                                                           0, NULL, NULL)))
        die("write_pem");
    fclose(f);
}

/* Runs an openssl command in the temporary directory; 1 when it exits 0. */
__attribute__((format(printf, 1, 2))) static int sh(const char *fmt, ...)
{
    char cmd[2048];
    size_t n;
    va_list ap;

    n = (size_t)snprintf(cmd, sizeof(cmd), "cd %s && ", tmp);
    va_start(ap, fmt);
    vsnprintf(cmd + n, sizeof(cmd) - n, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>/dev/null", sizeof(cmd) - strlen(cmd) - 1);
    return system(cmd) == 0;
}

static void setup_cli(void)
{
    char name[64];
    size_t i;

    snprintf(tmp, sizeof(tmp), "/tmp/smimed-env-XXXXXX");
    if (mkdtemp(tmp) == NULL || getcwd(test_dir, sizeof(test_dir)) == NULL)
        die("mkdtemp");
    have_cli = system("openssl version >/dev/null 2>&1") == 0;
    write_pem("ca.pem", ca_cert, NULL);
    for (i = 0; i < N_PARTIES; i++) {
        snprintf(name, sizeof(name), "%s.pem", parties[i]->file);
        write_pem(name, parties[i]->cert, NULL);
        snprintf(name, sizeof(name), "%s.key", parties[i]->file);
        write_pem(name, NULL, parties[i]->key);
    }
}

static void unlink_tmp(const char *name)
{
    char path[256];

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    unlink(path);
}

static void cleanup_cli(void)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmp);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", tmp);
}

/* ---- the module, wrapped ----------------------------------------------- */

static int encrypt_to(const char *mime, STACK_OF(X509) *rcpts,
                      cms_cipher cipher, cms_rsa_padding padding, bytes *out,
                      cms_error *err)
{
    cms_result *r = NULL;
    const unsigned char *d;
    size_t n;

    memset(err, 0, sizeof(*err));
    if (cms_encrypt_entity((const unsigned char *)mime, strlen(mime), rcpts,
                           cipher, padding, &r, err) != 0)
        return -1;
    d = cms_result_data(r, &n);
    *out = bytes_of(d, n);
    cms_result_free(r);
    return 0;
}

static int encrypt1(const char *mime, const struct party *p, cms_cipher cipher,
                    cms_rsa_padding padding, bytes *out, cms_error *err)
{
    STACK_OF(X509) *sk = certs_of(1, p->cert);
    int rc = encrypt_to(mime, sk, cipher, padding, out, err);

    sk_X509_free(sk);
    return rc;
}

enum { DEC_OK, DEC_PARSE, DEC_DECRYPT };

/* Parses and decrypts in with key and cert; which step failed, if any. */
static int decrypt_with(const bytes *in, EVP_PKEY *key, X509 *cert,
                        bytes *plain, int *is_signed, cms_error *err)
{
    cms_envelope *env = NULL;
    cms_result *r = NULL;
    const unsigned char *d;
    size_t n;
    int sig = -1, rc;

    memset(err, 0, sizeof(*err));
    if (cms_envelope_parse(in->data, in->len, &env, err) != 0)
        return env == NULL ? DEC_PARSE : -1;
    rc = cms_envelope_decrypt(env, key, cert, &r, &sig, err);
    cms_envelope_free(env);
    if (rc != 0)
        return r == NULL && sig == -1 ? DEC_DECRYPT : -1;
    d = cms_result_data(r, &n);
    if (plain != NULL)
        *plain = bytes_of(d, n);
    if (is_signed != NULL)
        *is_signed = sig;
    cms_result_free(r);
    return DEC_OK;
}

static int decrypt_as(const bytes *in, const struct party *p, bytes *plain,
                      int *is_signed, cms_error *err)
{
    return decrypt_with(in, p->key, p->cert, plain, is_signed, err);
}

/* Whether env names cert, from the entity in. */
static int names(const bytes *in, X509 *cert)
{
    cms_envelope *env = NULL;
    cms_error err;
    int r;

    if (cms_envelope_parse(in->data, in->len, &env, &err) != 0)
        return -1;
    r = cms_envelope_names(env, cert);
    cms_envelope_free(env);
    return r;
}

/* The message every decryption failure carries, learnt from a wrong key. */
static char decrypt_failed[256];

static int is_decrypt_failure(int rc, const cms_error *err)
{
    return rc == DEC_DECRYPT && err->status == CMS_ERR_DECRYPT &&
           strcmp(err->message, decrypt_failed) == 0 && ERR_peek_error() == 0;
}

/* A refusal by the allow-lists (damage that lands on an algorithm
 * identifier or the originator); test_algs checks the messages. */
static int is_algorithm_refusal(const cms_error *err)
{
    return err->status == CMS_ERR_ALGORITHM &&
           strstr(err->message, " is not supported") != NULL;
}

/* ---- names ------------------------------------------------------------ */

static const struct {
    cms_cipher cipher;
    const char *name;
    int nid;
    int auth;
} ciphers[] = {
    {CMS_CIPHER_AES128_CBC, "aes-128-cbc", NID_aes_128_cbc, 0},
    {CMS_CIPHER_AES192_CBC, "aes-192-cbc", NID_aes_192_cbc, 0},
    {CMS_CIPHER_AES256_CBC, "aes-256-cbc", NID_aes_256_cbc, 0},
    {CMS_CIPHER_AES128_GCM, "aes-128-gcm", NID_aes_128_gcm, 1},
    {CMS_CIPHER_AES256_GCM, "aes-256-gcm", NID_aes_256_gcm, 1},
};
#define N_CIPHERS (sizeof(ciphers) / sizeof(ciphers[0]))

static void test_names(void)
{
    cms_cipher c = CMS_CIPHER_AES128_CBC;
    cms_rsa_padding p = CMS_RSA_PKCS1;
    size_t i;
    int ok = 1;

    for (i = 0; i < N_CIPHERS; i++)
        ok &= cms_cipher_from_name(ciphers[i].name, &c) == 0 &&
              c == ciphers[i].cipher &&
              strcmp(cms_cipher_name(c), ciphers[i].name) == 0;
    tap_ok(ok, "cipher names both ways");
    tap_ok(cms_cipher_from_name("des-ede3-cbc", &c) == -1 &&
               cms_cipher_from_name(NULL, &c) == -1 &&
               c == CMS_CIPHER_AES256_GCM &&
               cms_cipher_name((cms_cipher)99) == NULL,
           "unknown cipher names are refused");
    tap_ok(cms_rsa_padding_from_name("oaep", &p) == 0 && p == CMS_RSA_OAEP &&
               cms_rsa_padding_from_name("pkcs1", &p) == 0 &&
               p == CMS_RSA_PKCS1 &&
               cms_rsa_padding_from_name("pss", &p) == -1 &&
               cms_rsa_padding_from_name(NULL, &p) == -1,
           "padding names");
}

/* ---- round trips ------------------------------------------------------ */

/* Whether the result's header block is what cms.h promises. */
static int envelope_headers_ok(const bytes *res, int auth, char *why,
                               size_t size)
{
    const unsigned char *end = memmem(res->data, res->len, "\r\n\r\n", 4);
    bytes hdr;
    int ok;

    if (end == NULL) {
        snprintf(why, size, "no blank line");
        return 0;
    }
    hdr = bytes_of(res->data, (size_t)(end - res->data) + 2);
    ok = starts(&hdr, "From: Alice <alice@example.org>\r\n") &&
         has(&hdr, "\r\nSubject: Quarterly report\r\n") &&
         has(&hdr, "\r\nMIME-Version: 1.0\r\n") &&
         has(&hdr, auth ? "\r\nContent-Type: application/pkcs7-mime; "
                          "smime-type=authEnveloped-data;\r\n\tname=smime.p7m"
                          "\r\n"
                        : "\r\nContent-Type: application/pkcs7-mime; "
                          "smime-type=enveloped-data;\r\n\tname=smime.p7m"
                          "\r\n") &&
         has(&hdr, "\r\nContent-Transfer-Encoding: base64\r\n") &&
         has(&hdr, "\r\nContent-Disposition: attachment; "
                   "filename=smime.p7m\r\n") &&
         !has(&hdr, "charset=us-ascii") && !has(&hdr, "7bit");
    if (!ok)
        snprintf(why, size, "headers: %.*s", (int)hdr.len, hdr.data);
    bytes_free(&hdr);
    return ok;
}

/* Whether der uses the expected algorithms for recipient p. */
static int algorithms_ok(const bytes *der, const struct party *p,
                         cms_rsa_padding padding, int cipher_nid, int auth)
{
    CMS_ContentInfo *cms = der_cms(der);
    CMS_RecipientInfo *ri =
        sk_CMS_RecipientInfo_value(CMS_get0_RecipientInfos(cms), 0);
    X509_ALGOR *alg = NULL;
    int ok =
        OBJ_obj2nid(CMS_get0_type(cms)) ==
            (auth ? NID_id_smime_ct_authEnvelopedData : NID_pkcs7_enveloped) &&
        count_oid(der, cipher_nid) == 1;

    if (EVP_PKEY_is_a(p->key, "RSA")) {
        ok = ok && CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_TRANS &&
             CMS_RecipientInfo_ktri_get0_algs(ri, NULL, NULL, &alg) == 1;
        if (ok && padding == CMS_RSA_OAEP)
            /* hash and MGF1 hash: SHA-256 twice, no SHA-1 */
            ok = OBJ_obj2nid(alg->algorithm) == NID_rsaesOaep &&
                 count_oid(der, NID_sha256) == 2 &&
                 count_oid(der, NID_mgf1) == 1 && count_oid(der, NID_sha1) == 0;
        else if (ok)
            ok = OBJ_obj2nid(alg->algorithm) == NID_rsaEncryption;
    } else {
        ok = ok && CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_AGREE;
    }
    CMS_ContentInfo_free(cms);
    return ok;
}

/* A recipient the round trips and openssl encrypt to, and how. */
struct recipient_case {
    struct party *p;
    cms_rsa_padding padding;
    const char *label;
};

static void test_round_trips(void)
{
    static const struct recipient_case rcpts[] = {
        {&rsa_a, CMS_RSA_PKCS1, "RSA PKCS#1 v1.5"},
        {&rsa_a, CMS_RSA_OAEP, "RSA-OAEP"},
        {&ec256, CMS_RSA_PKCS1, "ECDH P-256"},
        {&ec384, CMS_RSA_OAEP, "ECDH P-384"},
    };
    bytes want = bytes_of(sample_message, strlen(sample_message));
    size_t c, k;

    for (c = 0; c < N_CIPHERS; c++) {
        for (k = 0; k < sizeof(rcpts) / sizeof(rcpts[0]); k++) {
            const struct party *p = rcpts[k].p;
            const struct party *other = p == &rsa_a ? &rsa_b : &ec256_b;
            bytes res = {0}, der, plain = {0};
            cms_error err;
            char why[512] = "";
            int sig = -1, rc;

            if (!tap_ok(encrypt1(sample, p, ciphers[c].cipher, rcpts[k].padding,
                                 &res, &err) == 0,
                        "%s, %s: encrypts (%s)", ciphers[c].name,
                        rcpts[k].label, err.message))
                continue;
            tap_ok(envelope_headers_ok(&res, ciphers[c].auth, why, sizeof(why)),
                   "%s, %s: outer headers kept, S/MIME headers right %s",
                   ciphers[c].name, rcpts[k].label, why);
            der = p7m_der(&res);
            tap_ok(algorithms_ok(&der, p, rcpts[k].padding, ciphers[c].nid,
                                 ciphers[c].auth),
                   "%s, %s: content type, cipher and key transport as asked",
                   ciphers[c].name, rcpts[k].label);
            tap_ok(names(&res, p->cert) == 1 && names(&res, other->cert) == 0,
                   "%s, %s: names the recipient and no other", ciphers[c].name,
                   rcpts[k].label);
            rc = decrypt_as(&res, p, &plain, &sig, &err);
            tap_ok(rc == DEC_OK && bytes_is(&plain, want.data, want.len) &&
                       sig == 0 && ERR_peek_error() == 0,
                   "%s, %s: decrypts to the inner entity (%s)", ciphers[c].name,
                   rcpts[k].label, err.message);
            bytes_free(&plain);
            bytes_free(&der);
            bytes_free(&res);
        }
    }
    bytes_free(&want);
}

static void test_multi_recipient(void)
{
    STACK_OF(X509) *sk = certs_of(3, rsa_a.cert, ec256.cert, ec384.cert);
    bytes res = {0}, plain = {0};
    cms_error err;
    int ok = 1;
    size_t i;
    struct party *each[] = {&rsa_a, &ec256, &ec384};

    tap_ok(encrypt_to(sample, sk, CMS_CIPHER_AES256_GCM, CMS_RSA_OAEP, &res,
                      &err) == 0,
           "encrypts to RSA, P-256 and P-384 at once (%s)", err.message);
    for (i = 0; i < 3; i++) {
        ok &= names(&res, each[i]->cert) == 1 &&
              decrypt_as(&res, each[i], &plain, NULL, &err) == DEC_OK &&
              bytes_is(&plain, sample_message, strlen(sample_message));
        bytes_free(&plain);
    }
    tap_ok(ok, "... and each of them decrypts it");
    tap_ok(names(&res, rsa_b.cert) == 0 && names(&res, ec256_b.cert) == 0,
           "... and no one else is named");
    bytes_free(&res);
    sk_X509_free(sk);
}

static void test_inner_entity(void)
{
    static const char eight_bit[] = "Subject: caf\xc3\xa9\n"
                                    "Content-Type: text/plain; charset=utf-8\n"
                                    "\n"
                                    "caf\xc3\xa9\n";
    static const char bare[] = "Subject: no MIME fields\n"
                               "\n"
                               "Hello\n";
    cms_result *r = NULL;
    bytes res = {0}, plain = {0};
    cms_error err;
    STACK_OF(X509) *sk = certs_of(1, ec256.cert);

    tap_ok(cms_encrypt_entity((const unsigned char *)eight_bit,
                              strlen(eight_bit), sk, CMS_CIPHER_AES128_GCM,
                              CMS_RSA_PKCS1, &r, &err) == 0 &&
               cms_result_count_reencoded(r) == 1 &&
               strcmp(cms_result_reencoded_at(r, 0), "1 quoted-printable") == 0,
           "8-bit text is reported re-encoded as for signing");
    if (r != NULL) {
        const unsigned char *d;
        size_t n;

        d = cms_result_data(r, &n);
        res = bytes_of(d, n);
        cms_result_free(r);
    }
    tap_ok(decrypt_as(&res, &ec256, &plain, NULL, &err) == DEC_OK &&
               bytes_is(&plain,
                        "Subject: caf\xc3\xa9\r\n"
                        "Content-Type: text/plain; charset=utf-8\r\n"
                        "Content-Transfer-Encoding: quoted-printable\r\n"
                        "\r\n"
                        "caf=C3=A9\r\n",
                        strlen("Subject: caf\xc3\xa9\r\n"
                               "Content-Type: text/plain; charset=utf-8\r\n"
                               "Content-Transfer-Encoding: "
                               "quoted-printable\r\n"
                               "\r\n"
                               "caf=C3=A9\r\n")) &&
               starts(&res, "Subject: caf\xc3\xa9\r\n"),
           "... and decrypts as quoted-printable, the subject back outside");
    bytes_free(&plain);
    bytes_free(&res);

    tap_ok(encrypt_to(bare, sk, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &res,
                      &err) == 0 &&
               decrypt_as(&res, &ec256, &plain, NULL, &err) == DEC_OK &&
               bytes_is(&plain,
                        "Subject: no MIME fields\r\n"
                        "Content-Type: text/plain; charset=us-ascii\r\n"
                        "\r\n"
                        "Hello\r\n",
                        strlen("Subject: no MIME fields\r\n"
                               "Content-Type: text/plain; "
                               "charset=us-ascii\r\n\r\nHello\r\n")),
           "an entity without MIME fields gets RFC 2045's default "
           "Content-Type and decrypts (%s)",
           err.message);
    bytes_free(&plain);
    bytes_free(&res);

    tap_ok(encrypt_to("Content-Type: multipart/mixed; boundary=b\n\n"
                      "caf\xc3\xa9\n--b\n\nx\n--b--\n",
                      sk, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &res,
                      &err) == -1 &&
               err.status == CMS_ERR_INPUT && res.data == NULL &&
               strstr(err.message, "the multipart preamble has 8-bit octets, "
                                   "which cannot be made 7-bit safe") != NULL,
           "an inner entity that cannot be made 7-bit safe is refused (%s)",
           err.message);
    bytes_free(&res);

    /* refused while splitting (tests/fuzz/fuzz_entity.c), so the line is
     * the submitted entity's, not the inner header block's */
    tap_ok(encrypt_to("Subject: s\nContent-Type: text/plain\n"
                      "Content-Type: text/html\n\nx\n",
                      sk, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &res,
                      &err) == -1 &&
               err.status == CMS_ERR_INPUT && res.data == NULL &&
               strstr(err.message,
                      "header line 3 repeats the Content-Type field") != NULL,
           "an entity with two Content-Type fields is refused, naming its "
           "line (%s)",
           err.message);
    bytes_free(&res);
    sk_X509_free(sk);
}

static void test_encrypt_errors(void)
{
    STACK_OF(X509) *none = sk_X509_new_null(), *sk = certs_of(1, rsa_a.cert);
    STACK_OF(X509) *ed = NULL, *weak = NULL;
    EVP_PKEY *edkey = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    EVP_PKEY *weakkey = EVP_RSA_gen(512);
    X509 *edcert, *weakcert;
    cms_result *r = NULL;
    cms_error err;

    if (edkey == NULL || weakkey == NULL)
        die("ED25519 or RSA-512");
    edcert = make_cert_spec(edkey, "ed", "ed@example.org", ca_cert, ca_key, 0,
                            &cert_spec_signing);
    weakcert = make_cert_spec(weakkey, "weak", "weak@example.org", ca_cert,
                              ca_key, 0, &spec_rsa);
    ed = certs_of(2, rsa_a.cert, edcert);
    memset(&err, 0, sizeof(err));
    tap_ok(cms_encrypt_entity((const unsigned char *)sample, strlen(sample),
                              none, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &r,
                              &err) == -1 &&
               err.status == CMS_ERR_RECIPIENT && r == NULL &&
               cms_encrypt_entity((const unsigned char *)sample, strlen(sample),
                                  NULL, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1,
                                  &r, &err) == -1 &&
               r == NULL,
           "no recipients: CMS_ERR_RECIPIENT (%s)", err.message);
    tap_ok(cms_encrypt_entity((const unsigned char *)sample, strlen(sample), ed,
                              CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &r,
                              &err) == -1 &&
               err.status == CMS_ERR_RECIPIENT && r == NULL &&
               strstr(err.message, "recipient 2 (ed@example.org)") != NULL &&
               ERR_peek_error() == 0,
           "an Ed25519 recipient: CMS_ERR_RECIPIENT naming it (%s)",
           err.message);
    weak = certs_of(2, rsa_a.cert, weakcert);
    tap_ok(cms_encrypt_entity((const unsigned char *)sample, strlen(sample),
                              weak, CMS_CIPHER_AES128_GCM, CMS_RSA_OAEP, &r,
                              &err) == -1 &&
               err.status == CMS_ERR_RECIPIENT && r == NULL &&
               strstr(err.message, "recipient 2 (weak@example.org) cannot "
                                   "receive encrypted mail") != NULL &&
               ERR_peek_error() == 0,
           "an RSA-512 recipient with OAEP (key too small for the padding): "
           "CMS_ERR_RECIPIENT naming it (%s)",
           err.message);
    tap_ok(cms_encrypt_entity((const unsigned char *)sample, strlen(sample), sk,
                              (cms_cipher)99, CMS_RSA_PKCS1, &r, &err) == -1 &&
               err.status == CMS_ERR_INTERNAL &&
               cms_encrypt_entity((const unsigned char *)sample, strlen(sample),
                                  sk, CMS_CIPHER_AES128_CBC, (cms_rsa_padding)7,
                                  &r, &err) == -1 &&
               r == NULL,
           "unknown cipher or padding: CMS_ERR_INTERNAL");
    tap_ok(cms_encrypt_entity((const unsigned char *)"bad line\n\nx", 11, sk,
                              CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &r,
                              &err) == -1 &&
               err.status == CMS_ERR_INPUT && r == NULL &&
               cms_encrypt_entity(NULL, 0, sk, CMS_CIPHER_AES128_CBC,
                                  CMS_RSA_PKCS1, &r, &err) == -1 &&
               err.status == CMS_ERR_INPUT,
           "bad MIME: CMS_ERR_INPUT (%s)", err.message);
    sk_X509_free(ed);
    sk_X509_free(weak);
    sk_X509_free(sk);
    sk_X509_free(none);
    X509_free(edcert);
    X509_free(weakcert);
    EVP_PKEY_free(edkey);
    EVP_PKEY_free(weakkey);
}

/* ---- interoperability with the openssl command line ------------------- */

/* Whether der names its recipients by subject key identifier. */
static int uses_keyid(const bytes *der)
{
    CMS_ContentInfo *cms = der_cms(der);
    STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(cms);
    CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, 0);
    ASN1_OCTET_STRING *keyid = NULL;
    int ok = 0;

    if (CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_TRANS)
        ok = CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, NULL, NULL) ==
                 1 &&
             keyid != NULL;
    else if (CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_AGREE)
        ok = CMS_RecipientEncryptedKey_get0_id(
                 sk_CMS_RecipientEncryptedKey_value(
                     CMS_RecipientInfo_kari_get0_reks(ri), 0),
                 &keyid, NULL, NULL, NULL, NULL) == 1 &&
             keyid != NULL;
    CMS_ContentInfo_free(cms);
    return ok;
}

enum { FORM_SMIME, FORM_DER_BINARY, FORM_DER_BASE64_ONE_LINE };

static void test_openssl_encrypts(void)
{
    static const struct {
        const char *label;
        const char *pre; /* before -recip */
        struct party *p;
        const char *post; /* after it: key options, more recipients */
        int form;
        struct party *also; /* a second recipient */
    } cases[] = {
        {"RSA aes-128-cbc", "-aes128", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA aes-192-cbc", "-aes192", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA aes-256-cbc", "-aes256", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA aes-128-gcm", "-aes-128-gcm", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA aes-256-gcm", "-aes-256-gcm", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA des-ede3-cbc", "-des3", &rsa_a, "", FORM_SMIME, NULL},
        {"RSA-OAEP SHA-1 aes-256-cbc", "-aes256", &rsa_a,
         "-keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha1", FORM_SMIME,
         NULL},
        {"RSA-OAEP SHA-256 aes-128-gcm", "-aes-128-gcm", &rsa_a,
         "-keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 "
         "-keyopt rsa_mgf1_md:sha256",
         FORM_SMIME, NULL},
        {"RSA-OAEP SHA-256 des-ede3-cbc", "-des3", &rsa_a,
         "-keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256", FORM_SMIME,
         NULL},
        {"P-256 aes-128-cbc, SHA-1 KDF", "-aes128", &ec256, "", FORM_SMIME,
         NULL},
        {"P-256 aes-256-gcm, SHA-256 KDF", "-aes-256-gcm", &ec256,
         "-keyopt ecdh_kdf_md:sha256", FORM_SMIME, NULL},
        {"P-256 aes-192-cbc, SHA-512 KDF", "-aes192", &ec256,
         "-keyopt ecdh_kdf_md:sha512", FORM_SMIME, NULL},
        {"P-384 aes-256-cbc, SHA-384 KDF", "-aes256", &ec384,
         "-keyopt ecdh_kdf_md:sha384", FORM_SMIME, NULL},
        {"P-384 aes-128-gcm, SHA-1 KDF", "-aes-128-gcm", &ec384, "", FORM_SMIME,
         NULL},
        {"RSA BER (-stream -indef), base64", "-aes256 -stream -indef", &rsa_a,
         "", FORM_SMIME, NULL},
        {"P-384 BER (-stream -indef), binary",
         "-aes-256-gcm -stream -indef "
         "-outform DER",
         &ec384, "", FORM_DER_BINARY, NULL},
        {"RSA DER, base64 without line breaks", "-aes128 -outform DER", &rsa_a,
         "", FORM_DER_BASE64_ONE_LINE, NULL},
        {"RSA, subject key identifier (-keyid)", "-aes128 -keyid", &rsa_a, "",
         FORM_SMIME, NULL},
        {"P-256, subject key identifier (-keyid)", "-aes-128-gcm -keyid",
         &ec256, "", FORM_SMIME, NULL},
        {"RSA-OAEP + P-384 recipients", "-aes256", &rsa_a,
         "-keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 "
         "-recip ec384.pem",
         FORM_SMIME, &ec384},
    };
    bytes inner = bytes_of(sample_inner, strlen(sample_inner));
    size_t i;

    if (!have_cli) {
        tap_ok(1, "# SKIP no openssl command");
        return;
    }
    write_file("inner.eml", inner.data, inner.len);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bytes out, der, in, plain = {0};
        cms_error err;
        int sig = -1, ok;

        if (!tap_ok(sh("openssl cms -encrypt -binary -in inner.eml %s "
                       "-recip %s.pem %s -out enc",
                       cases[i].pre, cases[i].p->file, cases[i].post),
                    "openssl cms -encrypt %s", cases[i].label))
            continue;
        out = read_file("enc");
        switch (cases[i].form) {
        case FORM_DER_BINARY:
            in = p7m_wrap("Content-Type: application/pkcs7-mime; "
                          "smime-type=enveloped-data\r\n"
                          "Content-Transfer-Encoding: binary\r\n",
                          &out, (size_t)-1);
            break;
        case FORM_DER_BASE64_ONE_LINE:
            in = p7m_wrap(ENVELOPED_HEADERS, &out, 0);
            break;
        default:
            in = bytes_of(out.data, out.len);
            break;
        }
        ok = names(&in, cases[i].p->cert) == 1 && names(&in, rsa_b.cert) == 0 &&
             names(&in, ec256_b.cert) == 0;
        if (strstr(cases[i].pre, "-keyid") != NULL) {
            der = p7m_der(&in);
            ok = ok && uses_keyid(&der);
            bytes_free(&der);
        }
        tap_ok(ok, "%s: names the recipient and no other", cases[i].label);
        tap_ok(decrypt_as(&in, cases[i].p, &plain, &sig, &err) == DEC_OK &&
                   bytes_is(&plain, inner.data, inner.len) && sig == 0,
               "%s: decrypts (%s)", cases[i].label, err.message);
        bytes_free(&plain);
        if (cases[i].also != NULL) {
            tap_ok(decrypt_as(&in, cases[i].also, &plain, NULL, &err) ==
                           DEC_OK &&
                       bytes_is(&plain, inner.data, inner.len),
                   "%s: the second recipient decrypts too", cases[i].label);
            bytes_free(&plain);
        }
        bytes_free(&in);
        bytes_free(&out);
    }
    bytes_free(&inner);
}

/* gpgsm writes BER with indefinite lengths. It cannot encrypt to EC keys
 * (2.2.40: "Invalid S-expression"), so RSA only. */
static void test_gpgsm_encrypts(void)
{
    static const char *const algos[] = {"AES", "AES256", "3DES"};
    char home[] = "/tmp/gpgsm.XXXXXX", fpr[3 * EVP_MAX_MD_SIZE + 8];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len, k;
    size_t i;
    FILE *f;

    if (system("gpgsm --version >/dev/null 2>&1") != 0 || !have_cli ||
        mkdtemp(home) == NULL) {
        tap_ok(1, "# SKIP no gpgsm");
        return;
    }
    if (!X509_digest(ca_cert, EVP_sha1(), md, &md_len))
        die("fingerprint");
    for (k = 0; k < md_len; k++)
        snprintf(fpr + 3 * k, 4, "%02X:", md[k]);
    fpr[3 * md_len - 1] = '\0';
    if (chdir(home) != 0 || (f = fopen("gpgsm.conf", "w")) == NULL ||
        fputs("disable-crl-checks\n", f) < 0 || fclose(f) != 0 ||
        (f = fopen("trustlist.txt", "w")) == NULL ||
        fprintf(f, "%s S relax\n", fpr) < 0 || fclose(f) != 0 ||
        chdir(test_dir) != 0)
        die("gpgsm home");
    write_file("inner.eml", sample_inner, strlen(sample_inner));
    tap_ok(sh("GNUPGHOME=%s gpgsm --batch --import ca.pem rsa_a.pem", home),
           "gpgsm imports the CA and the RSA recipient");
    for (i = 0; i < sizeof(algos) / sizeof(algos[0]); i++) {
        bytes der = {0}, in, plain = {0};
        cms_error err;
        int made;

        unlink_tmp("g.p7m");
        made = sh("GNUPGHOME=%s gpgsm --batch --cipher-algo %s "
                  "-r rsa@example.org --encrypt -o g.p7m inner.eml",
                  home, algos[i]);
        der = read_file("g.p7m");
        in = p7m_wrap("Content-Type: application/pkcs7-mime; "
                      "smime-type=enveloped-data; name=smime.p7m\r\n"
                      "Content-Transfer-Encoding: binary\r\n",
                      &der, (size_t)-1);
        tap_ok(made && der.len > 2 && der.data[1] == 0x80 &&
                   decrypt_as(&in, &rsa_a, &plain, NULL, &err) == DEC_OK &&
                   bytes_is(&plain, sample_inner, strlen(sample_inner)),
               "gpgsm --encrypt --cipher-algo %s (BER): decrypts (%s)",
               algos[i], err.message);
        bytes_free(&plain);
        bytes_free(&in);
        bytes_free(&der);
    }
    sh("GNUPGHOME=%s gpgconf --kill all", home);
    sh("rm -rf %s", home);
}

static void test_openssl_decrypts(void)
{
    static const struct recipient_case rcpts[] = {
        {&rsa_a, CMS_RSA_PKCS1, "RSA PKCS#1 v1.5"},
        {&rsa_a, CMS_RSA_OAEP, "RSA-OAEP"},
        {&ec256, CMS_RSA_PKCS1, "ECDH P-256"},
        {&ec384, CMS_RSA_PKCS1, "ECDH P-384"},
    };
    size_t c, k;

    if (!have_cli) {
        tap_ok(1, "# SKIP no openssl command");
        return;
    }
    for (c = 0; c < N_CIPHERS; c++) {
        for (k = 0; k < sizeof(rcpts) / sizeof(rcpts[0]); k++) {
            bytes res = {0}, plain;
            cms_error err;
            int ok;

            if (encrypt1(sample, rcpts[k].p, ciphers[c].cipher,
                         rcpts[k].padding, &res, &err) != 0)
                die(err.message);
            write_file("ours.eml", res.data, res.len);
            write_file("plain", "", 0);
            ok = sh("openssl cms -decrypt -in ours.eml -recip %s.pem "
                    "-inkey %s.key -out plain",
                    rcpts[k].p->file, rcpts[k].p->file);
            plain = read_file("plain");
            tap_ok(ok && bytes_is(&plain, sample_inner, strlen(sample_inner)),
                   "openssl cms -decrypt reads %s, %s", ciphers[c].name,
                   rcpts[k].label);
            bytes_free(&plain);
            bytes_free(&res);
        }
    }
}

/* ---- wrong keys and the padding oracle ---------------------------------- */

static void test_wrong_key(void)
{
    bytes rsa_env = {0}, ec_env = {0}, gcm_env = {0};
    cms_error err;
    int rc;

    if (encrypt1(sample, &rsa_a, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &rsa_env,
                 &err) ||
        encrypt1(sample, &ec256, CMS_CIPHER_AES256_CBC, CMS_RSA_PKCS1, &ec_env,
                 &err) ||
        encrypt1(sample, &rsa_a, CMS_CIPHER_AES256_GCM, CMS_RSA_OAEP, &gcm_env,
                 &err))
        die(err.message);
    rc = decrypt_as(&rsa_env, &rsa_b, NULL, NULL, &err);
    snprintf(decrypt_failed, sizeof(decrypt_failed), "%s", err.message);
    tap_ok(rc == DEC_DECRYPT && err.status == CMS_ERR_DECRYPT &&
               decrypt_failed[0] != '\0' && ERR_peek_error() == 0,
           "another RSA recipient's key: CMS_ERR_DECRYPT (%s)", decrypt_failed);
    rc = decrypt_with(&rsa_env, rsa_b.key, rsa_a.cert, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "another key with the recipient's certificate: the same failure");
    rc = decrypt_with(&rsa_env, rsa_a.key, NULL, NULL, NULL, &err);
    tap_ok(rc == DEC_OK, "the right key without a certificate decrypts");
    rc = decrypt_with(&rsa_env, rsa_b.key, NULL, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "a wrong key without a certificate: the same failure");
    rc = decrypt_as(&rsa_env, &ec256, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "an EC key on an RSA envelope: the same failure");
    rc = decrypt_as(&ec_env, &ec256_b, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err), "another P-256 key: the same failure");
    rc = decrypt_with(&ec_env, ec256_b.key, ec256.cert, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "another P-256 key with the recipient's certificate: the same "
           "failure");
    rc = decrypt_with(&ec_env, ec384.key, ec256.cert, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "a P-384 key with the P-256 recipient's certificate: the same "
           "failure");
    rc = decrypt_as(&gcm_env, &rsa_b, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "another key on AuthEnvelopedData: the same failure");
    rc = decrypt_with(&gcm_env, rsa_b.key, rsa_a.cert, NULL, NULL, &err);
    tap_ok(is_decrypt_failure(rc, &err),
           "another key with the recipient's certificate on "
           "AuthEnvelopedData: the same failure");

    /* A failed attempt leaves nothing behind for the next one, and a
     * successful one nothing that lets a wrong key through afterwards. */
    {
        cms_envelope *env = NULL;
        cms_result *r = NULL;
        int sig;

        cms_envelope_parse(rsa_env.data, rsa_env.len, &env, &err);
        rc = cms_envelope_decrypt(env, rsa_b.key, rsa_a.cert, &r, &sig, &err) ==
             -1;
        rc = rc && cms_envelope_decrypt(env, rsa_a.key, rsa_a.cert, &r, &sig,
                                        &err) == 0;
        cms_result_free(r);
        r = NULL;
        rc = rc &&
             cms_envelope_decrypt(env, rsa_b.key, rsa_a.cert, &r, &sig, &err) ==
                 -1 &&
             r == NULL && strcmp(err.message, decrypt_failed) == 0;
        tap_ok(rc, "one envelope: wrong key, right key, wrong key again");
        cms_envelope_free(env);
    }
    bytes_free(&rsa_env);
    bytes_free(&ec_env);
    bytes_free(&gcm_env);
}

/* OpenSSL's own CMS_decrypt on der: 1 when it hands back plaintext. */
static int openssl_decrypts(const bytes *der, const struct party *p)
{
    CMS_ContentInfo *cms = der_cms(der);
    BIO *out = BIO_new(BIO_s_mem());
    int r = CMS_decrypt(cms, p->key, p->cert, NULL, out, 0) == 1;

    BIO_free(out);
    CMS_ContentInfo_free(cms);
    ERR_clear_error();
    return r;
}

/*
 * Corrupts the encrypted key of an envelope for rsa_a in many ways and
 * decrypts with rsa_a's own key: always the wrong-key failure. OpenSSL
 * itself lets about one in 256 CBC attempts through with garbage; the
 * count is printed to show that path was taken.
 */
static void padding_oracle(cms_cipher cipher, cms_rsa_padding padding,
                           int trials, const char *label)
{
    static const unsigned char ek_tag[] = {0x04, 0x82, 0x01, 0x00};
    unsigned int seed = 4242;
    bytes res = {0}, der;
    const unsigned char *ek;
    cms_error err;
    size_t off;
    int t, same = 1, garbage = 0, parsed = 1;

    if (encrypt1(sample, &rsa_a, cipher, padding, &res, &err) != 0)
        die(err.message);
    der = p7m_der(&res);
    /* The only 256-octet OCTET STRING of an EnvelopedData for one
     * RSA-2048 recipient is its encryptedKey. */
    ek = memmem(der.data, der.len, ek_tag, sizeof(ek_tag));
    if (ek == NULL || memmem(ek + 1, der.len - (size_t)(ek + 1 - der.data),
                             ek_tag, sizeof(ek_tag)) != NULL)
        die("no single encryptedKey");
    off = (size_t)(ek - der.data) + sizeof(ek_tag);
    for (t = 0; t < trials; t++) {
        bytes bad = bytes_of(der.data, der.len), in;
        int k, flips = 1 + rand_r(&seed) % 3, rc;

        for (k = 0; k < flips; k++)
            bad.data[off + (size_t)(rand_r(&seed) % 256)] ^=
                (unsigned char)(1 + rand_r(&seed) % 255);
        in = p7m_wrap(ENVELOPED_HEADERS, &bad, 76);
        rc = decrypt_as(&in, &rsa_a, NULL, NULL, &err);
        parsed &= rc != DEC_PARSE;
        if (!is_decrypt_failure(rc, &err)) {
            same = 0;
            printf("# trial %d: rc %d, \"%s\"\n", t, rc, err.message);
        }
        garbage += openssl_decrypts(&bad, &rsa_a);
        bytes_free(&in);
        bytes_free(&bad);
    }
    tap_ok(parsed && same,
           "%s: %d corrupted encrypted keys, each the wrong-key failure "
           "(OpenSSL alone returned plaintext %d times)",
           label, trials, garbage);
    bytes_free(&der);
    bytes_free(&res);
}

static void test_padding_oracle(void)
{
    padding_oracle(CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, 1024,
                   "PKCS#1 v1.5, aes-128-cbc");
    padding_oracle(CMS_CIPHER_AES256_CBC, CMS_RSA_OAEP, 300,
                   "OAEP, aes-256-cbc");
    padding_oracle(CMS_CIPHER_AES128_GCM, CMS_RSA_PKCS1, 300,
                   "PKCS#1 v1.5, aes-128-gcm");
}

/* An envelope for rsa_a holding content, made with OpenSSL directly. */
static bytes raw_envelope(const void *content, size_t len,
                          const EVP_CIPHER *cipher)
{
    STACK_OF(X509) *sk = certs_of(1, rsa_a.cert);
    BIO *in = BIO_new_mem_buf(content, (int)len);
    CMS_ContentInfo *cms = CMS_encrypt(sk, in, cipher, CMS_BINARY);
    bytes der, res;

    if (cms == NULL)
        die("CMS_encrypt");
    der = cms_der(cms);
    res = p7m_wrap(ENVELOPED_HEADERS, &der, 76);
    bytes_free(&der);
    CMS_ContentInfo_free(cms);
    BIO_free(in);
    sk_X509_free(sk);
    return res;
}

/* What decrypts but is not a MIME entity is the same failure: the case a
 * random CBC key passing the padding check produces. */
static void test_plaintext_rule(void)
{
    static const struct {
        const char *label;
        const char *content;
        size_t len;
        int ok;
    } cases[] = {
#define C(label, s, ok) {label, s, sizeof(s) - 1, ok}
        C("a MIME entity", "Content-Type: text/plain\r\n\r\nhi\r\n", 1),
        C("LF line ends", "Content-Type: text/plain\n\nhi\n", 1),
        C("only MIME-Version", "MIME-Version: 1.0\r\n\r\nhi\r\n", 1),
        C("a folded Content-Type",
          "Content-Type: text/plain;\r\n"
          "\tcharset=utf-8\r\n\r\nhi\r\n",
          1),
        C("headers and no body", "Content-Type: text/plain\r\n", 1),
        C("8-bit header value",
          "Content-Type: text/plain; "
          "name=\"caf\xc3\xa9\"\r\n\r\n",
          1),
        C("text without headers", "hello world\r\n", 0),
        C("a body only", "\r\nhello\r\n", 0),
        C("no MIME field", "Subject: hi\r\n\r\nbody\r\n", 0),
        C("binary",
          "\x8f\x01\xff\x00\x10"
          "Content-Type: x\r\n\r\n",
          0),
        C("NUL in a header", "Content-Type: te\0xt\r\n\r\n", 0),
        C("a bare CR in a header", "Content-Type: te\rxt\r\n\r\n", 0),
        C("an unterminated header", "Content-Type: text/plain", 0),
        C("a blank in the field name", "Content Type: text/plain\r\n\r\n", 0),
        C("a continuation first", " Content-Type: text/plain\r\n\r\n", 0),
        C("two Content-Types",
          "Content-Type: text/plain\r\n"
          "Content-Type: text/html\r\n\r\n",
          0),
#undef C
    };
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bytes in =
            raw_envelope(cases[i].content, cases[i].len, EVP_aes_128_cbc());
        bytes plain = {0};
        cms_error err;
        int rc = decrypt_as(&in, &rsa_a, &plain, NULL, &err);

        if (cases[i].ok)
            tap_ok(rc == DEC_OK &&
                       bytes_is(&plain, cases[i].content, cases[i].len),
                   "plaintext %s: returned as it is (%s)", cases[i].label,
                   err.message);
        else
            tap_ok(is_decrypt_failure(rc, &err),
                   "plaintext %s: the wrong-key failure", cases[i].label);
        bytes_free(&plain);
        bytes_free(&in);
    }
}

/* ---- what parses and what does not -------------------------------------- */

static void test_input_forms(void)
{
    bytes res = {0}, der, in, plain = {0};
    cms_error err;

    if (encrypt1(sample, &ec256, CMS_CIPHER_AES256_GCM, CMS_RSA_PKCS1, &res,
                 &err) != 0)
        die(err.message);
    der = p7m_der(&res);

    in = replaced(&res, "application/pkcs7-mime", "application/x-pkcs7-mime");
    tap_ok(decrypt_as(&in, &ec256, &plain, NULL, &err) == DEC_OK &&
               bytes_is(&plain, sample_message, strlen(sample_message)),
           "application/x-pkcs7-mime is accepted (%s)", err.message);
    bytes_free(&plain);
    bytes_free(&in);

    in = p7m_wrap(ENVELOPED_HEADERS, &der, 0);
    tap_ok(decrypt_as(&in, &ec256, &plain, NULL, &err) == DEC_OK &&
               bytes_is(&plain, sample_inner, strlen(sample_inner)),
           "base64 without line breaks is accepted (%s)", err.message);
    bytes_free(&plain);
    bytes_free(&in);

    in = to_lf(&res);
    tap_ok(decrypt_as(&in, &ec256, &plain, NULL, &err) == DEC_OK &&
               bytes_is(&plain, sample_message, strlen(sample_message)),
           "LF line ends are accepted (%s)", err.message);
    bytes_free(&plain);
    bytes_free(&in);

    in = p7m_wrap("content-type: Application/PKCS7-MIME\r\n"
                  "content-transfer-encoding: BASE64\r\n",
                  &der, 64);
    tap_ok(decrypt_as(&in, &ec256, &plain, NULL, &err) == DEC_OK,
           "no smime-type, names in any case (%s)", err.message);
    bytes_free(&plain);
    bytes_free(&in);

    in = p7m_wrap("Content-Type: application/pkcs7-mime;\r\n"
                  " smime-type=\"enveloped-data\"\r\n",
                  &der, (size_t)-1);
    tap_ok(decrypt_as(&in, &ec256, &plain, NULL, &err) == DEC_OK,
           "binary DER without Content-Transfer-Encoding, a folded "
           "Content-Type, a quoted smime-type (%s)",
           err.message);
    bytes_free(&plain);
    bytes_free(&in);

    {
        bytes b64 = b64_encode(&der, 76), body;
        size_t hl = strlen(ENVELOPED_HEADERS "\r\n");

        body.len = hl + b64.len + 6;
        body.data = xmalloc(body.len);
        memcpy(body.data, ENVELOPED_HEADERS "\r\n", hl);
        memcpy(body.data + hl, b64.data, b64.len);
        memcpy(body.data + hl + b64.len, " \r\n\r\n\t", 6);
        tap_ok(decrypt_as(&body, &ec256, &plain, NULL, &err) == DEC_OK,
               "blanks and empty lines after the base64 (%s)", err.message);
        bytes_free(&plain);
        bytes_free(&body);
        bytes_free(&b64);
    }
    bytes_free(&der);
    bytes_free(&res);
}

static int parse_refused(const bytes *in, const char *part)
{
    cms_envelope *env = NULL;
    cms_error err;
    int rc;

    memset(&err, 0, sizeof(err));
    rc = cms_envelope_parse(in->data, in->len, &env, &err);
    if (rc == 0)
        cms_envelope_free(env);
    else if (strstr(err.message, part) == NULL)
        printf("# got: %s\n", err.message);
    return rc == -1 && env == NULL && err.status == CMS_ERR_INPUT &&
           strstr(err.message, part) != NULL && ERR_peek_error() == 0;
}

static void test_input_errors(void)
{
    bytes res = {0}, der, in, signed_res = {0}, sder;
    cms_result *r = NULL;
    cms_envelope *env = NULL;
    cms_error err;
    const unsigned char *d;
    size_t n;

    if (encrypt1(sample, &rsa_a, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &res,
                 &err) != 0 ||
        cms_sign_entity((const unsigned char *)sample, strlen(sample),
                        rsa_a.key, rsa_a.cert, NULL, CMS_MODE_OPAQUE,
                        CMS_DIGEST_SHA256, &r, &err) != 0)
        die(err.message);
    d = cms_result_data(r, &n);
    signed_res = bytes_of(d, n);
    cms_result_free(r);
    der = p7m_der(&res);
    sder = p7m_der(&signed_res);

    in = bytes_of("", 0);
    tap_ok(parse_refused(&in, "empty"), "empty input");
    bytes_free(&in);
    tap_ok(cms_envelope_parse(NULL, 5, &env, &err) == -1 && env == NULL &&
               err.status == CMS_ERR_INPUT,
           "NULL input");
    in = b64_encode(&der, 76);
    tap_ok(parse_refused(&in, "not a header field"),
           "bare base64 without MIME headers");
    bytes_free(&in);
    in = str_bytes("Content-Type: text/plain\r\n\r\nhello\r\n");
    tap_ok(parse_refused(&in, "text/plain is not application/pkcs7-mime"),
           "a text/plain entity");
    bytes_free(&in);
    in = replaced(&res, "enveloped-data", "signed-data");
    tap_ok(parse_refused(&in, "smime-type signed-data"),
           "smime-type signed-data");
    bytes_free(&in);
    in = replaced(&signed_res, "signed-data", "enveloped-data");
    tap_ok(parse_refused(&in, "is pkcs7-signedData, not enveloped"),
           "SignedData labelled enveloped-data");
    bytes_free(&in);
    in = p7m_wrap("Content-Type: application/pkcs7-mime\r\n"
                  "Content-Transfer-Encoding: base64\r\n",
                  &sder, 76);
    tap_ok(parse_refused(&in, "not enveloped"),
           "SignedData without smime-type");
    bytes_free(&in);
    if (have_cli) {
        bytes certs;

        sh("openssl crl2pkcs7 -nocrl -certfile rsa_a.pem -outform DER "
           "-out certs.p7c");
        certs = read_file("certs.p7c");
        in = p7m_wrap("Content-Type: application/pkcs7-mime; "
                      "smime-type=enveloped-data\r\n"
                      "Content-Transfer-Encoding: base64\r\n",
                      &certs, 76);
        tap_ok(certs.len > 0 && parse_refused(&in, "not enveloped"),
               "a certificate-only structure");
        bytes_free(&in);
        in = p7m_wrap("Content-Type: application/pkcs7-mime; "
                      "smime-type=certs-only\r\n"
                      "Content-Transfer-Encoding: base64\r\n",
                      &certs, 76);
        tap_ok(parse_refused(&in, "smime-type certs-only"),
               "smime-type certs-only");
        bytes_free(&in);
        bytes_free(&certs);
    }
    {
        bytes half = bytes_of(der.data, der.len / 2);

        in = p7m_wrap(ENVELOPED_HEADERS, &half, 76);
        tap_ok(parse_refused(&in, "not a CMS structure"), "truncated DER");
        bytes_free(&in);
        bytes_free(&half);
    }
    {
        bytes longer = bytes_of(der.data, der.len + 3);

        memcpy(longer.data + der.len, "abc", 3);
        in = p7m_wrap(ENVELOPED_HEADERS, &longer, 76);
        tap_ok(parse_refused(&in, "3 octets follow the CMS structure"),
               "trailing data after the DER");
        bytes_free(&in);
        bytes_free(&longer);
    }
    in = replaced(&res, "\r\n\r\nMII", "\r\n\r\nMI*I");
    tap_ok(parse_refused(&in, "octet 0x2a"), "a stray octet in the base64");
    bytes_free(&in);
    in = p7m_wrap(ENVELOPED_HEADERS, &der, 76);
    {
        bytes cut = bytes_of(in.data, in.len - 5);

        tap_ok(parse_refused(&cut, "base64 body is truncated") ||
                   parse_refused(&cut, "not a CMS structure"),
               "base64 cut mid-group");
        bytes_free(&cut);
    }
    bytes_free(&in);
    in = replaced(&res, "Content-Transfer-Encoding: base64",
                  "Content-Transfer-Encoding: quoted-printable");
    tap_ok(parse_refused(&in, "cannot carry CMS data"),
           "a quoted-printable body");
    bytes_free(&in);
    in = replaced(&res, "MIME-Version: 1.0\r\n",
                  "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n");
    tap_ok(parse_refused(&in, "repeats the Content-Type field"),
           "two Content-Type fields");
    bytes_free(&in);
    in = str_bytes("Content-Type: application/pkcs7-mime\r\n\r\n");
    tap_ok(parse_refused(&in, "holds no CMS structure"), "an empty body");
    bytes_free(&in);
    {
        /* 100,000 nested indefinite-length SEQUENCEs */
        bytes deep = {xmalloc(200000), 200000};
        size_t i;

        for (i = 0; i < deep.len; i += 2) {
            deep.data[i] = 0x30;
            deep.data[i + 1] = 0x80;
        }
        in = p7m_wrap(ENVELOPED_HEADERS, &deep, 76);
        tap_ok(parse_refused(&in, "not a CMS structure"),
               "100,000 nested SEQUENCEs");
        bytes_free(&in);
        bytes_free(&deep);
    }
    {
        unsigned char rnd[600];
        bytes g = {rnd, sizeof(rnd)};
        size_t i;

        for (i = 0; i < sizeof(rnd); i++)
            rnd[i] = (unsigned char)(i * 7919 + 13);
        in = p7m_wrap(ENVELOPED_HEADERS, &g, 76);
        tap_ok(parse_refused(&in, "not a CMS structure"), "base64 of garbage");
        bytes_free(&in);
    }
    bytes_free(&sder);
    bytes_free(&der);
    bytes_free(&signed_res);
    bytes_free(&res);
}

/* Random octets, and valid envelopes with random octets changed: any
 * outcome but a crash, a leak or a stray status. */
static void test_fuzz_envelope(void)
{
    unsigned int seed = 777;
    bytes res = {0};
    cms_error err;
    int i, ok_status = 1, ok_queue = 1, parsed = 0, decrypted = 0;

    if (encrypt1(sample, &ec256, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &res,
                 &err) != 0)
        die(err.message);
    for (i = 0; i < 600; i++) {
        bytes in;
        int rc, k;

        if (i < 150) {
            in.len = (size_t)(rand_r(&seed) % 2048) + 1;
            in.data = xmalloc(in.len);
            for (k = 0; k < (int)in.len; k++)
                in.data[k] = (unsigned char)rand_r(&seed);
        } else {
            in = bytes_of(res.data, res.len);
            for (k = rand_r(&seed) % 4; k >= 0; k--)
                in.data[(size_t)rand_r(&seed) % in.len] =
                    (unsigned char)rand_r(&seed);
            if (i % 5 == 0)
                in.len = (size_t)rand_r(&seed) % in.len;
        }
        rc = decrypt_as(&in, &ec256, NULL, NULL, &err);
        if (rc == DEC_PARSE)
            ok_status &=
                (err.status == CMS_ERR_INPUT || is_algorithm_refusal(&err)) &&
                utf8_valid(err.message);
        else if (rc == DEC_DECRYPT)
            ok_status &= is_decrypt_failure(rc, &err);
        else if (rc != DEC_OK)
            ok_status = 0;
        parsed += rc != DEC_PARSE;
        decrypted += rc == DEC_OK;
        ok_queue &= ERR_peek_error() == 0;
        bytes_free(&in);
    }
    tap_ok(ok_status && ok_queue,
           "600 random and damaged envelopes: only CMS_ERR_INPUT or "
           "CMS_ERR_ALGORITHM (UTF-8 messages) or the wrong-key failure, "
           "error queue empty (%d parsed, %d decrypted)",
           parsed, decrypted);
    bytes_free(&res);
}

/* Damage below the base64, in the DER itself, so that OpenSSL's ASN.1
 * decoder and CMS code see it: envelopes for RSA (CBC) and P-256 (GCM). */
static void test_fuzz_envelope_der(void)
{
    unsigned int seed = 4711;
    bytes res[2] = {{0}, {0}}, der[2];
    const struct party *who[2] = {&rsa_a, &ec256};
    cms_error err;
    int i, ok = 1, parsed = 0, decrypted = 0;

    if (encrypt1(sample, &rsa_a, CMS_CIPHER_AES256_CBC, CMS_RSA_OAEP, &res[0],
                 &err) != 0 ||
        encrypt1(sample, &ec256, CMS_CIPHER_AES128_GCM, CMS_RSA_PKCS1, &res[1],
                 &err) != 0)
        die(err.message);
    der[0] = p7m_der(&res[0]);
    der[1] = p7m_der(&res[1]);
    for (i = 0; i < 800; i++) {
        bytes bad = bytes_of(der[i % 2].data, der[i % 2].len), in;
        int k, rc;

        for (k = rand_r(&seed) % 3; k >= 0; k--)
            bad.data[(size_t)rand_r(&seed) % bad.len] ^=
                (unsigned char)(1 + rand_r(&seed) % 255);
        if (i % 9 == 0)
            bad.len = (size_t)rand_r(&seed) % bad.len;
        in = p7m_wrap(ENVELOPED_HEADERS, &bad, 76);
        rc = decrypt_as(&in, who[i % 2], NULL, NULL, &err);
        ok &= (rc == DEC_PARSE &&
               (err.status == CMS_ERR_INPUT || is_algorithm_refusal(&err))) ||
              (rc == DEC_DECRYPT && is_decrypt_failure(rc, &err)) ||
              rc == DEC_OK;
        ok &= ERR_peek_error() == 0;
        parsed += rc != DEC_PARSE;
        decrypted += rc == DEC_OK;
        bytes_free(&in);
        bytes_free(&bad);
    }
    tap_ok(ok,
           "800 envelopes damaged in their DER: only CMS_ERR_INPUT, "
           "CMS_ERR_ALGORITHM or the wrong-key failure, error queue empty "
           "(%d parsed, %d decrypted)",
           parsed, decrypted);
    for (i = 0; i < 2; i++) {
        bytes_free(&der[i]);
        bytes_free(&res[i]);
    }
}

/* ---- sign, then encrypt ---------------------------------------------------
 */

static int content_is(const cms_verification *v, const void *p, size_t n)
{
    size_t len;
    const unsigned char *c = cms_verification_content(v, &len);

    return len == n && (n == 0 || memcmp(c, p, n) == 0);
}

static void test_sign_then_encrypt(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    int m;

    for (m = 0; m < 2; m++) {
        cms_mode mode = m ? CMS_MODE_OPAQUE : CMS_MODE_DETACHED;
        cms_result *r = NULL;
        cms_verification *v = NULL;
        const unsigned char *d;
        bytes signed_res, enc = {0}, plain = {0};
        cms_error err;
        size_t n;
        int sig = -1;

        if (cms_sign_entity((const unsigned char *)sample, strlen(sample),
                            rsa_a.key, rsa_a.cert, NULL, mode,
                            CMS_DIGEST_SHA256, &r, &err) != 0)
            die(err.message);
        d = cms_result_data(r, &n);
        signed_res = bytes_of(d, n);
        cms_result_free(r);
        tap_ok(encrypt1((const char *)signed_res.data, &ec384,
                        CMS_CIPHER_AES256_GCM, CMS_RSA_PKCS1, &enc,
                        &err) == 0 &&
                   starts(&enc, "From: Alice <alice@example.org>\r\n"),
               "%s: the signed entity encrypts, mail headers outside",
               cms_mode_name(mode));
        tap_ok(decrypt_as(&enc, &ec384, &plain, &sig, &err) == DEC_OK &&
                   sig == 1 &&
                   starts(&plain, m ? SAMPLE_OUTER
                                      "MIME-Version: 1.0\r\n"
                                      "Content-Type: application/pkcs7-mime; "
                                      "smime-type=signed-data;"
                                    : SAMPLE_OUTER
                                      "MIME-Version: 1.0\r\n"
                                      "Content-Type: multipart/signed;"),
               "%s: decrypts to the signed entity, is_signed 1",
               cms_mode_name(mode));
        tap_ok(cms_verify_entity(plain.data, plain.len, anchors, NULL, NULL, &v,
                                 &err) == 0 &&
                   cms_verification_valid(v) &&
                   content_is(v, sample_message, strlen(sample_message)),
               "%s: ... whose signature verifies", cms_mode_name(mode));
        cms_verification_free(v);
        bytes_free(&plain);
        bytes_free(&enc);
        bytes_free(&signed_res);
    }
    sk_X509_free(anchors);
}

/* ---- recipient checks -----------------------------------------------------
 */

static int check_refused(X509 *cert, const char *part)
{
    cms_error err;
    int rc;

    memset(&err, 0, sizeof(err));
    rc = cms_recipient_check(cert, &err);
    if (rc == 0 || strstr(err.message, part) == NULL)
        printf("# got: %d %s\n", rc, err.message);
    return rc == -1 && err.status == CMS_ERR_RECIPIENT &&
           strstr(err.message, part) != NULL && ERR_peek_error() == 0;
}

static X509 *cert_with(EVP_PKEY *key, const char *ku, const char *eku)
{
    struct cert_spec spec = {ku, eku, -86400, 86400L * 30};

    return make_cert_spec(key, "check", "check@example.org", ca_cert, ca_key, 0,
                          &spec);
}

static void test_recipient_check(void)
{
    cms_error err;
    X509 *c;
    EVP_PKEY *k;

    tap_ok(cms_recipient_check(rsa_a.cert, &err) == 0 &&
               cms_recipient_check(ec256.cert, &err) == 0 &&
               cms_recipient_check(ec384.cert, &err) == 0,
           "RSA, P-256 and P-384 recipients pass");
    k = EVP_EC_gen("P-521");
    c = cert_with(k, "keyAgreement", NULL);
    tap_ok(cms_recipient_check(c, &err) == 0, "P-521 passes (%s)", err.message);
    X509_free(c);
    EVP_PKEY_free(k);

    c = with_dates(rsa_a.cert, "20240101000000Z", "20250101000000Z");
    tap_ok(check_refused(c, "certificate for rsa@example.org expired on "
                            "2025-01-01T00:00:00Z"),
           "an expired certificate, named and dated");
    X509_free(c);
    c = with_dates(rsa_a.cert, "20990101000000Z", "21000101000000Z");
    tap_ok(check_refused(c, "certificate for rsa@example.org is not valid "
                            "before 2099-01-01T00:00:00Z"),
           "a certificate not valid yet");
    X509_free(c);
    c = cert_with(rsa_a.key, "critical,digitalSignature", "emailProtection");
    tap_ok(check_refused(c, "key usage does not allow keyEncipherment"),
           "RSA without keyEncipherment");
    X509_free(c);
    c = cert_with(ec256.key, "critical,digitalSignature,keyEncipherment",
                  "emailProtection");
    tap_ok(check_refused(c, "key usage does not allow keyAgreement"),
           "EC without keyAgreement");
    X509_free(c);
    c = cert_with(rsa_a.key, "keyEncipherment", "serverAuth,clientAuth");
    tap_ok(check_refused(c, "does not include emailProtection"),
           "an extended key usage without emailProtection");
    X509_free(c);
    c = cert_with(rsa_a.key, NULL, "anyExtendedKeyUsage");
    tap_ok(cms_recipient_check(c, &err) == 0,
           "no key usage, anyExtendedKeyUsage: passes (%s)", err.message);
    X509_free(c);
    c = cert_with(ec256.key, NULL, NULL);
    tap_ok(cms_recipient_check(c, &err) == 0,
           "no usage extensions at all: passes (%s)", err.message);
    X509_free(c);

    k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    c = cert_with(k, "keyAgreement", NULL);
    tap_ok(check_refused(c, "has a key of type ED25519"), "an Ed25519 key");
    X509_free(c);
    EVP_PKEY_free(k);
    k = EVP_EC_gen("secp256k1");
    c = cert_with(k, "keyAgreement", NULL);
    tap_ok(check_refused(c, "curve secp256k1"), "curve secp256k1");
    X509_free(c);
    EVP_PKEY_free(k);
    k = EVP_RSA_gen(1024);
    c = cert_with(k, "keyEncipherment", "emailProtection");
    tap_ok(check_refused(c, "certificate for check@example.org has a 1024-bit "
                            "RSA key; at least 2048 bits are needed"),
           "RSA-1024");
    X509_free(c);
    EVP_PKEY_free(k);
    tap_ok(check_refused(NULL, "no recipient certificate"), "NULL");
}

/* ---- verification ----------------------------------------------------------
 */

static bytes sign_with(EVP_PKEY *key, X509 *cert, STACK_OF(X509) *chain,
                       cms_mode mode, cms_digest digest)
{
    cms_result *r = NULL;
    const unsigned char *d;
    cms_error err;
    size_t n;
    bytes b;

    if (cms_sign_entity((const unsigned char *)sample, strlen(sample), key,
                        cert, chain, mode, digest, &r, &err) != 0)
        die(err.message);
    d = cms_result_data(r, &n);
    b = bytes_of(d, n);
    cms_result_free(r);
    return b;
}

/* Verifies in; NULL when it did not parse (err says why). */
static cms_verification *verify(const bytes *in, STACK_OF(X509) *anchors,
                                const char *dir, STACK_OF(X509_CRL) *crls,
                                cms_error *err)
{
    cms_verification *v = NULL;

    memset(err, 0, sizeof(*err));
    if (cms_verify_entity(in->data, in->len, anchors, dir, crls, &v, err) !=
        0) {
        if (v != NULL)
            die("verify: result set on failure");
        return NULL;
    }
    return v;
}

/* Whether in verifies as valid, or fails with reason, detail holding
 * detail_part. */
static int verifies(const bytes *in, STACK_OF(X509) *anchors, const char *dir,
                    STACK_OF(X509_CRL) *crls, const char *reason,
                    const char *detail_part)
{
    cms_error err;
    cms_verification *v = verify(in, anchors, dir, crls, &err);
    int ok;

    if (v == NULL) {
        printf("# did not parse: %s\n", err.message);
        return 0;
    }
    ok = reason == NULL
             ? cms_verification_valid(v) && cms_verification_reason(v) == NULL
             : !cms_verification_valid(v) &&
                   cms_verification_reason(v) != NULL &&
                   strcmp(cms_verification_reason(v), reason) == 0;
    ok = ok && cms_verification_detail(v) != NULL &&
         (detail_part == NULL ||
          strstr(cms_verification_detail(v), detail_part) != NULL) &&
         ERR_peek_error() == 0;
    if (!ok)
        printf("# valid %d, reason %s, detail %s\n", cms_verification_valid(v),
               cms_verification_reason(v) ? cms_verification_reason(v)
                                          : "(none)",
               cms_verification_detail(v));
    cms_verification_free(v);
    return ok;
}

/* RFC 3339 UTC and within five minutes of now. */
static int time_ok(const char *s)
{
    struct tm tm;
    time_t t;
    const char *end;

    memset(&tm, 0, sizeof(tm));
    end = strptime(s, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (end == NULL || *end != '\0' || strlen(s) != 20)
        return 0;
    t = timegm(&tm);
    return t > time(NULL) - 300 && t < time(NULL) + 300;
}

static int signer_is(const cms_verification *v, size_t i, X509 *cert,
                     const char *digest, int with_time)
{
    const cms_signer *s = cms_verification_signer_at(v, i);

    return s != NULL &&
           (cert == NULL ? s->cert == NULL
                         : s->cert != NULL && X509_cmp(s->cert, cert) == 0) &&
           strcmp(s->digest, digest) == 0 &&
           (with_time ? time_ok(s->signing_time) : s->signing_time[0] == '\0');
}

static void test_verify_valid(void)
{
    static const struct {
        struct party *p;
        cms_mode mode;
        cms_digest digest;
        const char *name;
    } cases[] = {
        {&rsa_a, CMS_MODE_DETACHED, CMS_DIGEST_SHA256, "sha256"},
        {&ec256, CMS_MODE_OPAQUE, CMS_DIGEST_SHA512, "sha512"},
        {&ec384, CMS_MODE_DETACHED, CMS_DIGEST_SHA384, "sha384"},
        {&rsa_a, CMS_MODE_OPAQUE, CMS_DIGEST_SHA384, "sha384"},
    };
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bytes res = sign_with(cases[i].p->key, cases[i].p->cert, NULL,
                              cases[i].mode, cases[i].digest);
        cms_error err;
        cms_verification *v = verify(&res, anchors, NULL, NULL, &err);

        tap_ok(v != NULL && cms_verification_valid(v) &&
                   cms_verification_reason(v) == NULL &&
                   cms_verification_count_signers(v) == 1 &&
                   cms_verification_signer_at(v, 1) == NULL &&
                   ERR_peek_error() == 0,
               "%s %s %s: valid (%s)", cases[i].p->label,
               cms_mode_name(cases[i].mode), cases[i].name, err.message);
        tap_ok(v != NULL && signer_is(v, 0, cases[i].p->cert, cases[i].name, 1),
               "%s %s %s: signer certificate, digest name, signing time",
               cases[i].p->label, cms_mode_name(cases[i].mode), cases[i].name);
        tap_ok(v != NULL &&
                   content_is(v, sample_message, strlen(sample_message)),
               "%s %s %s: the content is the signed entity", cases[i].p->label,
               cms_mode_name(cases[i].mode), cases[i].name);
        cms_verification_free(v);
        bytes_free(&res);
    }

    {
        bytes res = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                              CMS_DIGEST_SHA256);
        bytes lf = to_lf(&res);

        tap_ok(verifies(&lf, anchors, NULL, NULL, NULL, NULL),
               "a detached entity with LF line ends verifies");
        bytes_free(&lf);
        bytes_free(&res);
    }
    {
        bytes res = sign_with(ec256.key, ec256.cert, NULL, CMS_MODE_OPAQUE,
                              CMS_DIGEST_SHA256);
        bytes x = replaced(&res, "application/pkcs7-mime",
                           "application/x-pkcs7-mime");
        bytes der = p7m_der(&res);
        bytes bin = p7m_wrap("Content-Type: application/pkcs7-mime\r\n"
                             "Content-Transfer-Encoding: binary\r\n",
                             &der, (size_t)-1);
        bytes one = p7m_wrap(SIGNED_HEADERS, &der, 0);

        tap_ok(verifies(&x, anchors, NULL, NULL, NULL, NULL),
               "opaque application/x-pkcs7-mime verifies");
        tap_ok(verifies(&bin, anchors, NULL, NULL, NULL, NULL),
               "opaque binary DER without smime-type verifies");
        tap_ok(verifies(&one, anchors, NULL, NULL, NULL, NULL),
               "opaque base64 without line breaks verifies");
        bytes_free(&one);
        bytes_free(&bin);
        bytes_free(&der);
        bytes_free(&x);
        bytes_free(&res);
    }
    sk_X509_free(anchors);
}

static void test_verify_openssl(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    bytes inner = bytes_of(sample_inner, strlen(sample_inner)), res, mod, der;
    cms_verification *v;
    cms_error err;

    if (!have_cli) {
        tap_ok(1, "# SKIP no openssl command");
        bytes_free(&inner);
        sk_X509_free(anchors);
        return;
    }
    write_file("inner.eml", inner.data, inner.len);

    tap_ok(sh("openssl cms -sign -binary -in inner.eml -signer rsa_a.pem "
              "-inkey rsa_a.key -md sha384 -out s.eml"),
           "openssl cms -sign, detached, SHA-384");
    res = read_file("s.eml");
    v = verify(&res, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && cms_verification_valid(v) &&
               signer_is(v, 0, rsa_a.cert, "sha384", 1) &&
               content_is(v, inner.data, inner.len),
           "... verifies, with its signer, digest, time and content (%s)",
           err.message);
    cms_verification_free(v);
    mod = replaced(&res, "Regards", "Regardz");
    tap_ok(verifies(&mod, anchors, NULL, NULL, "content_modified",
                    "messageDigest"),
           "... and a changed content octet is content_modified");
    bytes_free(&mod);
    bytes_free(&res);

    tap_ok(sh("openssl cms -sign -binary -nodetach -in inner.eml "
              "-signer ec256.pem -inkey ec256.key -out s.eml"),
           "openssl cms -sign -nodetach (opaque), P-256");
    res = read_file("s.eml");
    tap_ok(verifies(&res, anchors, NULL, NULL, NULL, NULL), "... verifies");
    bytes_free(&res);

    tap_ok(sh("openssl cms -sign -binary -nodetach -stream -indef "
              "-in inner.eml -signer ec384.pem -inkey ec384.key -md sha512 "
              "-out s.eml"),
           "openssl cms -sign -nodetach -stream -indef (BER), P-384");
    res = read_file("s.eml");
    tap_ok(verifies(&res, anchors, NULL, NULL, NULL, NULL), "... verifies");
    bytes_free(&res);

    tap_ok(sh("openssl cms -sign -binary -nodetach -outform DER "
              "-in inner.eml -signer rsa_a.pem -inkey rsa_a.key -out s.der"),
           "openssl cms -sign -nodetach -outform DER");
    der = read_file("s.der");
    res = p7m_wrap(SIGNED_HEADERS, &der, 64);
    tap_ok(verifies(&res, anchors, NULL, NULL, NULL, NULL), "... verifies");
    bytes_free(&res);
    bytes_free(&der);

    tap_ok(sh("openssl cms -sign -binary -noattr -in inner.eml "
              "-signer rsa_a.pem -inkey rsa_a.key -out s.eml"),
           "openssl cms -sign -noattr (no signed attributes)");
    res = read_file("s.eml");
    v = verify(&res, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && cms_verification_valid(v) &&
               signer_is(v, 0, rsa_a.cert, "sha256", 0),
           "... verifies, without a signing time (%s)",
           v ? cms_verification_detail(v) : err.message);
    cms_verification_free(v);
    mod = replaced(&res, "Regards", "Regardz");
    tap_ok(verifies(&mod, anchors, NULL, NULL, "bad_signature", NULL),
           "... and a changed content octet is bad_signature (no "
           "messageDigest to tell)");
    bytes_free(&mod);
    bytes_free(&res);

    tap_ok(sh("openssl cms -sign -binary -nocerts -in inner.eml "
              "-signer rsa_a.pem -inkey rsa_a.key -out s.eml"),
           "openssl cms -sign -nocerts");
    res = read_file("s.eml");
    v = verify(&res, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && !cms_verification_valid(v) &&
               strcmp(cms_verification_reason(v),
                      "signer_certificate_missing") == 0 &&
               signer_is(v, 0, NULL, "sha256", 1),
           "... is signer_certificate_missing, the signer listed without a "
           "certificate");
    cms_verification_free(v);
    {
        STACK_OF(X509) *pinned = certs_of(1, rsa_a.cert);

        tap_ok(verifies(&res, pinned, NULL, NULL, NULL, NULL),
               "... and valid when the anchors hold the signer's certificate");
        sk_X509_free(pinned);
    }
    bytes_free(&res);

    tap_ok(sh("openssl cms -sign -binary -in inner.eml -signer rsa_a.pem "
              "-inkey rsa_a.key -signer ec256.pem -inkey ec256.key "
              "-keyid -out s.eml"),
           "openssl cms -sign with two signers, by key identifier");
    res = read_file("s.eml");
    v = verify(&res, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && cms_verification_valid(v) &&
               cms_verification_count_signers(v) == 2 &&
               /* SignerInfos is a SET: DER sorts it */
               ((signer_is(v, 0, rsa_a.cert, "sha256", 1) &&
                 signer_is(v, 1, ec256.cert, "sha256", 1)) ||
                (signer_is(v, 0, ec256.cert, "sha256", 1) &&
                 signer_is(v, 1, rsa_a.cert, "sha256", 1))),
           "... verifies, both signers listed (%s)", err.message);
    cms_verification_free(v);
    bytes_free(&res);
    bytes_free(&inner);
    sk_X509_free(anchors);
}

static X509_CRL *make_crl(X509 *issuer, EVP_PKEY *key, X509 *revoked,
                          long last_update, long next_update)
{
    X509_CRL *crl = X509_CRL_new();
    ASN1_TIME *t = ASN1_TIME_new();

    if (crl == NULL || t == NULL || !X509_CRL_set_version(crl, 1) ||
        !X509_CRL_set_issuer_name(crl, X509_get_subject_name(issuer)) ||
        !X509_gmtime_adj(t, last_update) || !X509_CRL_set1_lastUpdate(crl, t) ||
        !X509_gmtime_adj(t, next_update) || !X509_CRL_set1_nextUpdate(crl, t))
        die("CRL");
    if (revoked != NULL) {
        X509_REVOKED *r = X509_REVOKED_new();

        if (r == NULL || !X509_gmtime_adj(t, -600) ||
            !X509_REVOKED_set_serialNumber(r, X509_get_serialNumber(revoked)) ||
            !X509_REVOKED_set_revocationDate(r, t) ||
            !X509_CRL_add0_revoked(crl, r))
            die("revoked");
    }
    if (!X509_CRL_sort(crl) || !X509_CRL_sign(crl, key, EVP_sha256()))
        die("CRL sign");
    ASN1_TIME_free(t);
    return crl;
}

static STACK_OF(X509_CRL) *crls_of(int n, ...)
{
    STACK_OF(X509_CRL) *sk = sk_X509_CRL_new_null();
    va_list ap;
    int i;

    va_start(ap, n);
    for (i = 0; i < n; i++)
        sk_X509_CRL_push(sk, va_arg(ap, X509_CRL *));
    va_end(ap);
    return sk;
}

/* The signed result of sample with the DER of its SignedData changed by
 * edit. */
static bytes edited_opaque(void (*edit)(CMS_ContentInfo *))
{
    bytes res = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_OPAQUE,
                          CMS_DIGEST_SHA256);
    bytes der = p7m_der(&res), der2, out;
    CMS_ContentInfo *cms = der_cms(&der);

    edit(cms);
    der2 = cms_der(cms);
    out = p7m_wrap(SIGNED_HEADERS, &der2, 76);
    CMS_ContentInfo_free(cms);
    bytes_free(&der2);
    bytes_free(&der);
    bytes_free(&res);
    return out;
}

static void flip_content(CMS_ContentInfo *cms)
{
    ASN1_OCTET_STRING **pos = CMS_get0_content(cms);

    (*pos)->data[(*pos)->length - 4] ^= 0x01;
}

static void flip_signature(CMS_ContentInfo *cms)
{
    CMS_SignerInfo *si = sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(cms), 0);

    CMS_SignerInfo_get0_signature(si)->data[17] ^= 0x40;
}

/* SignedData holding sample_inner and no SignerInfo. */
static bytes unsigned_opaque(void)
{
    CMS_ContentInfo *cms = CMS_sign(NULL, NULL, NULL, NULL, CMS_PARTIAL);
    ASN1_OCTET_STRING **pos = cms != NULL ? CMS_get0_content(cms) : NULL;
    bytes der, out;

    /* CMS_final refuses SignedData without signers; fill it by hand. */
    if (pos == NULL || *pos == NULL ||
        !ASN1_OCTET_STRING_set(*pos, (const unsigned char *)sample_inner,
                               (int)strlen(sample_inner)))
        die("SignedData without signers");
    der = cms_der(cms);
    out = p7m_wrap(SIGNED_HEADERS, &der, 76);
    bytes_free(&der);
    CMS_ContentInfo_free(cms);
    return out;
}

/* A detached result whose signingTime attribute says another second. */
static bytes retimed_detached(void)
{
    bytes res = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                          CMS_DIGEST_SHA256);
    const unsigned char *sig =
        memmem(res.data, res.len, "filename=smime.p7s\r\n\r\n", 22);
    const unsigned char *end = memmem(res.data, res.len, "\r\n--", 4);
    unsigned char *oid = NULL, *p;
    bytes der, b64, out;
    int n = i2d_ASN1_OBJECT(OBJ_nid2obj(NID_pkcs9_signingTime), &oid);
    size_t at, sig_len;

    sig += 22;
    end = memmem(sig, res.len - (size_t)(sig - res.data), "--", 2);
    (void)end;
    /* the base64 runs to the closing delimiter */
    end = memmem(sig, res.len - (size_t)(sig - res.data), "------=_", 8);
    sig_len = (size_t)(end - sig);
    der = b64_decode(sig, sig_len);
    p = memmem(der.data, der.len, oid, (size_t)n);
    /* SET { UTCTime (13) } follows the OID: 31 0f 17 0d YYMMDDhhmmssZ */
    if (p == NULL || p[n] != 0x31 || p[n + 2] != 0x17 || p[n + 3] != 0x0d)
        die("no signingTime");
    p += n + 4 + 11;
    *p = *p == '9' ? '0' : (unsigned char)(*p + 1);
    b64 = b64_encode(&der, 76);
    at = (size_t)(sig - res.data);
    out.len = at + b64.len + (res.len - at - sig_len);
    out.data = xmalloc(out.len);
    memcpy(out.data, res.data, at);
    memcpy(out.data + at, b64.data, b64.len);
    memcpy(out.data + at + b64.len, res.data + at + sig_len,
           res.len - at - sig_len);
    OPENSSL_free(oid);
    bytes_free(&b64);
    bytes_free(&der);
    bytes_free(&res);
    return out;
}

static void test_verify_failures(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    STACK_OF(X509) *other = certs_of(1, other_ca_cert);
    bytes res = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                          CMS_DIGEST_SHA256);
    bytes in;
    cms_verification *v;
    cms_error err;
    X509 *c;

    in = replaced(&res, "Regards", "Regardz");
    v = verify(&in, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && !cms_verification_valid(v) &&
               strcmp(cms_verification_reason(v), "content_modified") == 0 &&
               has(&in, "Regardz") && cms_verification_count_signers(v) == 1,
           "detached, a content octet changed: content_modified, signer "
           "still listed");
    {
        size_t n;
        const unsigned char *cont = cms_verification_content(v, &n);
        bytes cb = {(unsigned char *)cont, n};

        tap_ok(v != NULL && has(&cb, "Regardz\r\n") && !has(&cb, "Regards"),
               "... and the content returned is what arrived");
    }
    cms_verification_free(v);
    bytes_free(&in);

    in = edited_opaque(flip_content);
    tap_ok(verifies(&in, anchors, NULL, NULL, "content_modified", NULL),
           "opaque, a content octet changed: content_modified");
    bytes_free(&in);
    in = edited_opaque(flip_signature);
    tap_ok(verifies(&in, anchors, NULL, NULL, "bad_signature",
                    "signed attributes"),
           "a signature octet changed: bad_signature");
    bytes_free(&in);
    in = retimed_detached();
    tap_ok(verifies(&in, anchors, NULL, NULL, "bad_signature", NULL),
           "the signingTime attribute changed: bad_signature");
    bytes_free(&in);
    in = unsigned_opaque();
    v = verify(&in, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && !cms_verification_valid(v) &&
               strcmp(cms_verification_reason(v), "no_signers") == 0 &&
               cms_verification_count_signers(v) == 0 &&
               content_is(v, sample_inner, strlen(sample_inner)),
           "SignedData without SignerInfos: no_signers, content returned");
    cms_verification_free(v);
    bytes_free(&in);

    tap_ok(verifies(&res, NULL, NULL, NULL, "untrusted_signer",
                    "unable to get local issuer certificate"),
           "no trust anchors: untrusted_signer");
    tap_ok(verifies(&res, other, NULL, NULL, "untrusted_signer", NULL),
           "another CA as anchor: untrusted_signer");
    {
        STACK_OF(X509) *pinned = certs_of(1, rsa_a.cert);

        tap_ok(verifies(&res, pinned, NULL, NULL, NULL, NULL),
               "the signer's own certificate as anchor: valid");
        sk_X509_free(pinned);
    }

    c = with_dates(rsa_a.cert, "20200101000000Z", "20210101000000Z");
    in = sign_with(rsa_a.key, c, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256);
    tap_ok(verifies(&in, anchors, NULL, NULL, "certificate_expired",
                    "certificate has expired"),
           "an expired signer: certificate_expired");
    bytes_free(&in);
    X509_free(c);
    c = with_dates(rsa_a.cert, "20990101000000Z", "21000101000000Z");
    in = sign_with(rsa_a.key, c, NULL, CMS_MODE_OPAQUE, CMS_DIGEST_SHA256);
    tap_ok(
        verifies(&in, anchors, NULL, NULL, "certificate_not_yet_valid", NULL),
        "a signer not valid yet: certificate_not_yet_valid");
    bytes_free(&in);
    X509_free(c);
    c = cert_with(rsa_a.key, "critical,keyEncipherment", "emailProtection");
    in = sign_with(rsa_a.key, c, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256);
    tap_ok(verifies(&in, anchors, NULL, NULL, "unfit_certificate", NULL),
           "a signer without digitalSignature: unfit_certificate");
    bytes_free(&in);
    X509_free(c);
    c = cert_with(ec256.key, "digitalSignature", "serverAuth");
    in = sign_with(ec256.key, c, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256);
    tap_ok(verifies(&in, anchors, NULL, NULL, "unfit_certificate", NULL),
           "a signer for serverAuth only: unfit_certificate");
    bytes_free(&in);
    X509_free(c);

    bytes_free(&res);
    sk_X509_free(other);
    sk_X509_free(anchors);
}

static void test_verify_crls(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    STACK_OF(X509) *chain = certs_of(1, inter_cert);
    X509_CRL *revoking = make_crl(ca_cert, ca_key, rsa_a.cert, -3600, 86400);
    X509_CRL *clean = make_crl(ca_cert, ca_key, NULL, -3600, 86400);
    X509_CRL *stale = make_crl(ca_cert, ca_key, NULL, -864000, -86400);
    X509_CRL *foreign =
        make_crl(other_ca_cert, other_ca_key, NULL, -3600, 86400);
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *leaf = make_cert_spec(key, "chained", "chained@example.org",
                                inter_cert, inter_key, 0, &spec_ec);
    X509_CRL *inter_clean = make_crl(inter_cert, inter_key, NULL, -3600, 86400);
    X509_CRL *inter_revoking =
        make_crl(inter_cert, inter_key, leaf, -3600, 86400);
    bytes res = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                          CMS_DIGEST_SHA256);
    bytes chained =
        sign_with(key, leaf, chain, CMS_MODE_OPAQUE, CMS_DIGEST_SHA256);
    bytes unchained =
        sign_with(key, leaf, NULL, CMS_MODE_OPAQUE, CMS_DIGEST_SHA256);
    STACK_OF(X509_CRL) *sk;

    sk = crls_of(2, foreign, revoking);
    tap_ok(verifies(&res, anchors, NULL, sk, "certificate_revoked",
                    "certificate revoked"),
           "a revoked signer: certificate_revoked");
    sk_X509_CRL_free(sk);
    sk = crls_of(1, clean);
    tap_ok(verifies(&res, anchors, NULL, sk, NULL, NULL),
           "a CRL that does not list the signer: valid");
    sk_X509_CRL_free(sk);
    sk = crls_of(0);
    tap_ok(verifies(&res, anchors, NULL, sk, "crl_missing",
                    "unable to get certificate CRL"),
           "CRL checks without a CRL: crl_missing");
    sk_X509_CRL_free(sk);
    sk = crls_of(1, stale);
    tap_ok(verifies(&res, anchors, NULL, sk, "crl_missing", "CRL has expired"),
           "only an expired CRL: crl_missing");
    sk_X509_CRL_free(sk);
    sk = crls_of(1, foreign);
    tap_ok(verifies(&res, anchors, NULL, sk, "crl_missing", NULL),
           "only another CA's CRL: crl_missing");
    sk_X509_CRL_free(sk);

    tap_ok(verifies(&chained, anchors, NULL, NULL, NULL, NULL),
           "a signer under an intermediate carried in the message: valid");
    tap_ok(verifies(&unchained, anchors, NULL, NULL, "untrusted_signer", NULL),
           "... without the intermediate: untrusted_signer");
    tap_ok(verifies(&unchained, chain, NULL, NULL, NULL, NULL),
           "... with the intermediate as anchor: valid");
    sk = crls_of(1, clean);
    tap_ok(verifies(&chained, anchors, NULL, sk, "crl_missing", NULL),
           "every certificate of the path is checked: the intermediate's "
           "CRL is missing");
    sk_X509_CRL_free(sk);
    sk = crls_of(2, clean, inter_clean);
    tap_ok(verifies(&chained, anchors, NULL, sk, NULL, NULL),
           "... and with both CRLs it is valid");
    sk_X509_CRL_free(sk);
    sk = crls_of(2, clean, inter_revoking);
    tap_ok(verifies(&chained, anchors, NULL, sk, "certificate_revoked", NULL),
           "... and revoked by the intermediate: certificate_revoked");
    sk_X509_CRL_free(sk);
    {
        /* the intermediate revoked by the root */
        X509_CRL *root_revoking =
            make_crl(ca_cert, ca_key, inter_cert, -3600, 86400);

        sk = crls_of(2, root_revoking, inter_clean);
        tap_ok(verifies(&chained, anchors, NULL, sk, "certificate_revoked",
                        "depth 1"),
               "... and with the intermediate revoked: certificate_revoked "
               "at depth 1");
        sk_X509_CRL_free(sk);
        X509_CRL_free(root_revoking);
    }

    bytes_free(&unchained);
    bytes_free(&chained);
    bytes_free(&res);
    X509_CRL_free(inter_revoking);
    X509_CRL_free(inter_clean);
    X509_free(leaf);
    EVP_PKEY_free(key);
    X509_CRL_free(foreign);
    X509_CRL_free(stale);
    X509_CRL_free(clean);
    X509_CRL_free(revoking);
    sk_X509_free(chain);
    sk_X509_free(anchors);
}

static void test_verify_anchor_dir(void)
{
    bytes res = sign_with(ec256.key, ec256.cert, NULL, CMS_MODE_OPAQUE,
                          CMS_DIGEST_SHA256);
    char dir[128], name[64];
    STACK_OF(X509) *other = certs_of(1, other_ca_cert);

    snprintf(dir, sizeof(dir), "%s/anchors", tmp);
    if (mkdir(dir, 0700) != 0)
        die("mkdir");
    snprintf(name, sizeof(name), "anchors/%08lx.0",
             X509_subject_name_hash(ca_cert));
    write_pem(name, ca_cert, NULL);
    tap_ok(verifies(&res, NULL, dir, NULL, NULL, NULL),
           "a hashed directory of anchors: valid");
    tap_ok(verifies(&res, other, dir, NULL, NULL, NULL),
           "a stack and a directory together: valid");
    snprintf(dir, sizeof(dir), "%s/nowhere", tmp);
    tap_ok(verifies(&res, NULL, dir, NULL, "untrusted_signer", NULL),
           "a directory that does not exist: untrusted_signer");
    sk_X509_free(other);
    bytes_free(&res);
}

static int verify_refused(const bytes *in, const char *part)
{
    cms_verification *v = NULL;
    cms_error err;
    int rc;

    memset(&err, 0, sizeof(err));
    rc = cms_verify_entity(in->data, in->len, NULL, NULL, NULL, &v, &err);
    if (rc == 0)
        cms_verification_free(v);
    else if (strstr(err.message, part) == NULL)
        printf("# got: %s\n", err.message);
    return rc == -1 && v == NULL && err.status == CMS_ERR_INPUT &&
           strstr(err.message, part) != NULL && ERR_peek_error() == 0;
}

static void test_verify_input_errors(void)
{
    bytes det = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                          CMS_DIGEST_SHA256);
    bytes opq = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_OPAQUE,
                          CMS_DIGEST_SHA256);
    bytes env = {0}, in, der = p7m_der(&opq);
    cms_verification *v = NULL;
    cms_error err;

    if (encrypt1(sample, &rsa_a, CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &env,
                 &err) != 0)
        die(err.message);
    in = bytes_of("", 0);
    tap_ok(verify_refused(&in, "empty"), "verify: empty input");
    bytes_free(&in);
    tap_ok(cms_verify_entity(NULL, 3, NULL, NULL, NULL, &v, &err) == -1 &&
               v == NULL && err.status == CMS_ERR_INPUT,
           "verify: NULL input");
    in = str_bytes("\x01\x02garbage\xff");
    tap_ok(verify_refused(&in, "does not end in a line break"),
           "verify: garbage");
    bytes_free(&in);
    in = str_bytes("Subject: hi\r\nContent-Type: text/plain\r\n\r\nhi\r\n");
    tap_ok(verify_refused(&in, "text/plain is not a signed"),
           "verify: a text/plain entity");
    bytes_free(&in);
    tap_ok(verify_refused(&env, "smime-type enveloped-data is not a signed"),
           "verify: EnvelopedData");
    in = replaced(&env, "enveloped-data", "signed-data");
    tap_ok(verify_refused(&in, "is pkcs7-envelopedData, not signed data"),
           "verify: EnvelopedData labelled signed-data");
    bytes_free(&in);
    in = replaced(&opq, "smime-type=signed-data", "smime-type=certs-only");
    tap_ok(verify_refused(&in, "smime-type certs-only"),
           "verify: smime-type certs-only");
    bytes_free(&in);
    {
        bytes half = bytes_of(der.data, der.len - 40);

        in = p7m_wrap(SIGNED_HEADERS, &half, 76);
        tap_ok(verify_refused(&in, "not a CMS structure"),
               "verify: truncated SignedData");
        bytes_free(&in);
        bytes_free(&half);
    }
    in = replaced(&det, "boundary=\"", "xboundary=\"");
    tap_ok(verify_refused(&in, "has no boundary"),
           "verify: multipart/signed without a boundary");
    bytes_free(&in);
    {
        bytes cut = bytes_of(det.data, det.len - 10);

        tap_ok(verify_refused(&cut, "no closing delimiter"),
               "verify: multipart/signed without its closing delimiter");
        bytes_free(&cut);
    }
    in = str_bytes("Content-Type: multipart/signed; boundary=b\r\n\r\n"
                   "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n");
    tap_ok(verify_refused(&in, "has 1 parts, not two"), "verify: one part");
    bytes_free(&in);
    in = str_bytes("Content-Type: multipart/signed; boundary=b\r\n\r\n"
                   "--b\r\n\r\nx\r\n--b\r\n\r\ny\r\n--b\r\n\r\nz\r\n--b--\r\n");
    tap_ok(verify_refused(&in, "more than two parts"), "verify: three parts");
    bytes_free(&in);
    in = str_bytes("Content-Type: multipart/signed; boundary=b\r\n\r\n"
                   "--b \t\r\n\r\nx\r\n--bb\r\n--b\r\n\r\ny\r\n--b--x\r\n"
                   "--b-- \r\n");
    tap_ok(verify_refused(&in, "not application/pkcs7-signature"),
           "verify: transport padding after delimiters, look-alike lines "
           "(\"--bb\", \"--b--x\") are content");
    bytes_free(&in);
    in = str_bytes("Content-Type: multipart/signed; boundary=b\r\n\r\n"
                   "--b\r\n\r\nx\r\n--b\r\n\r\ny\r\n--b--x\r\n");
    tap_ok(verify_refused(&in, "no closing delimiter"),
           "verify: a look-alike of the closing delimiter does not close");
    bytes_free(&in);
    in = replaced(&det, "application/pkcs7-signature; name", "text/plain; n");
    tap_ok(verify_refused(&in, "not application/pkcs7-signature"),
           "verify: the second part is not a signature");
    bytes_free(&in);
    in = replaced(&det, "smime.p7s\r\n\r\nMII", "smime.p7s\r\n\r\nMIIx!");
    tap_ok(verify_refused(&in, "octet 0x21"),
           "verify: damaged base64 in the signature part");
    bytes_free(&in);
    {
        /* an opaque SignedData where the detached signature belongs */
        bytes b64 = b64_encode(&der, 76);
        char *text = xmalloc(b64.len + 512);

        snprintf(text, b64.len + 512,
                 "Content-Type: multipart/signed; boundary=b\r\n\r\n"
                 "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
                 "Content-Type: application/pkcs7-signature\r\n"
                 "Content-Transfer-Encoding: base64\r\n\r\n%.*s--b--\r\n",
                 (int)b64.len, b64.data);
        in = str_bytes(text);
        tap_ok(verify_refused(&in, "carries content of its own"),
               "verify: an opaque SignedData as the signature part");
        bytes_free(&in);
        free(text);
        bytes_free(&b64);
    }
    if (have_cli) {
        bytes certs;

        sh("openssl crl2pkcs7 -nocrl -certfile rsa_a.pem -outform DER "
           "-out certs.p7c");
        certs = read_file("certs.p7c");
        in = p7m_wrap("Content-Type: application/pkcs7-mime\r\n"
                      "Content-Transfer-Encoding: base64\r\n",
                      &certs, 76);
        tap_ok(verify_refused(&in, "has no content"),
               "verify: a certificate-only structure");
        bytes_free(&in);
        bytes_free(&certs);
    }
    bytes_free(&der);
    bytes_free(&env);
    bytes_free(&opq);
    bytes_free(&det);
}

/* ---- messages from hostile names and values ----------------------------
 */

/* A certificate from the CA whose validity ended yesterday. */
static X509 *expired_cert(EVP_PKEY *key, const char *cn, const char *email)
{
    struct cert_spec spec = {"keyEncipherment", NULL, -2 * 86400, -86400};

    return make_cert_spec(key, cn, email, ca_cert, ca_key, 0, &spec);
}

static void test_utf8_messages(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    char text[512], cn[256] = "", *p;
    cms_envelope *env = NULL;
    cms_verification *v = NULL;
    cms_error err;
    X509 *c;
    bytes res;
    int i;

    /* 59 octets, then "é" across the 60 an old "%.60s" kept. */
    p = text + snprintf(text, sizeof(text),
                        "Content-Type: application/pkcs7-mime; smime-type=");
    memset(p, 'a', 59);
    snprintf(p + 59, sizeof(text) - (size_t)(p + 59 - text),
             "\xc3\xa9\xc3\xa9\r\n\r\nAAAA\r\n");
    memset(&err, 0, sizeof(err));
    tap_ok(cms_envelope_parse((unsigned char *)text, strlen(text), &env,
                              &err) == -1 &&
               err.status == CMS_ERR_INPUT && utf8_valid(err.message) &&
               strstr(err.message, "aaa\xc3\xa9") != NULL,
           "a long smime-type: the message is UTF-8, not cut inside "
           "a character");

    snprintf(text, sizeof(text),
             "Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
             "Content-Transfer-Encoding: x\xe9\xff\x1b\r\n\r\nAAAA\r\n");
    tap_ok(cms_verify_entity((unsigned char *)text, strlen(text), NULL, NULL,
                             NULL, &v, &err) == -1 &&
               err.status == CMS_ERR_INPUT && utf8_valid(err.message) &&
               strstr(err.message, "\"x\\xe9\\xff\\x1b\"") != NULL,
           "a Latin-1 transfer encoding with a control character is escaped "
           "(%s)",
           err.message);

    /* 64 characters, what a common name may have, in 128 octets. */
    for (i = 0; i < 64; i++)
        strcat(cn, "\xc3\xa9");
    c = expired_cert(rsa_a.key, cn, NULL);
    tap_ok(cms_recipient_check(c, &err) == -1 &&
               err.status == CMS_ERR_RECIPIENT && utf8_valid(err.message) &&
               strstr(err.message, "certificate for \xc3\xa9\xc3\xa9") != NULL,
           "a 64-character common name is cut between characters (%s)",
           err.message);
    X509_free(c);
    c = expired_cert(rsa_a.key, "latin", "caf\xe9\x1b@example.org");
    tap_ok(cms_recipient_check(c, &err) == -1 && utf8_valid(err.message) &&
               strstr(err.message,
                      "certificate for caf\\xe9\\x1b@example.org expired") !=
                   NULL,
           "an 8-bit address with a control character is escaped (%s)",
           err.message);
    X509_free(c);

    c = make_cert_spec(ec256.key, "latin", "caf\xe9@example.org", other_ca_cert,
                       other_ca_key, 0, &cert_spec_signing);
    res = sign_with(ec256.key, c, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256);
    v = verify(&res, anchors, NULL, NULL, &err);
    tap_ok(v != NULL && !cms_verification_valid(v) &&
               utf8_valid(cms_verification_detail(v)) &&
               strstr(cms_verification_detail(v), "caf\\xe9@example.org") !=
                   NULL,
           "a verification detail naming it is UTF-8 (%s)",
           v != NULL ? cms_verification_detail(v) : err.message);
    cms_verification_free(v);
    bytes_free(&res);
    X509_free(c);
    sk_X509_free(anchors);
}

/* ---- limits on the work one signed entity can cause -------------------
 */

/* The header of the definite-length DER TLV at p: its length, *len that
 * of its content. */
static size_t tlv_header(const unsigned char *p, size_t *len)
{
    size_t i, n;

    if (p[1] == 0x80)
        die("tlv_header: indefinite length");
    if (p[1] < 0x80) {
        *len = p[1];
        return 2;
    }
    n = p[1] & 0x7f;
    for (*len = 0, i = 0; i < n; i++)
        *len = *len << 8 | p[2 + i];
    return 2 + n;
}

static void bytes_add(bytes *b, const void *p, size_t n)
{
    unsigned char *d = realloc(b->data, b->len + n + 1);

    if (d == NULL)
        die("out of memory");
    b->data = d;
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

/* Appends tag, the DER length of len, and content[0..len). */
static void tlv_add(bytes *b, unsigned char tag, const void *content,
                    size_t len)
{
    unsigned char h[6];
    size_t n = 0, k;

    h[n++] = tag;
    if (len < 0x80) {
        h[n++] = (unsigned char)len;
    } else {
        for (k = 4; k > 1 && (len >> (8 * (k - 1))) == 0; k--)
            ;
        h[n++] = (unsigned char)(0x80 | k);
        while (k-- > 0)
            h[n++] = (unsigned char)(len >> (8 * k));
    }
    bytes_add(b, h, n);
    bytes_add(b, content, len);
}

/* The ContentInfo der (SignedData) with its digestAlgorithms set holding
 * the original entries times copies, then extra. The set is not signed,
 * so the signatures still hold. */
static bytes with_digest_algs(const bytes *der, int copies, const bytes *extra)
{
    const unsigned char *p = der->data, *oid, *sd, *set;
    size_t len, h, oid_len, sd_len, ver_len, set_len, set_h;
    bytes algs = {0}, sdc = {0}, seq = {0}, ctx = {0}, ci = {0}, out = {0};
    int i;

    p += tlv_header(p, &len); /* ContentInfo */
    oid = p;
    h = tlv_header(p, &len);
    oid_len = h + len;
    p += oid_len;
    p += tlv_header(p, &len); /* [0] */
    p += tlv_header(p, &sd_len);
    sd = p;
    h = tlv_header(sd, &len);
    ver_len = h + len;
    set_h = tlv_header(sd + ver_len, &set_len);
    set = sd + ver_len + set_h;
    for (i = 0; i < copies; i++)
        bytes_add(&algs, set, set_len);
    if (extra != NULL)
        bytes_add(&algs, extra->data, extra->len);
    bytes_add(&sdc, sd, ver_len);
    tlv_add(&sdc, 0x31, algs.data, algs.len);
    bytes_add(&sdc, set + set_len, sd_len - ver_len - set_h - set_len);
    tlv_add(&seq, 0x30, sdc.data, sdc.len);
    tlv_add(&ctx, 0xa0, seq.data, seq.len);
    bytes_add(&ci, oid, oid_len);
    bytes_add(&ci, ctx.data, ctx.len);
    tlv_add(&out, 0x30, ci.data, ci.len);
    bytes_free(&algs);
    bytes_free(&sdc);
    bytes_free(&seq);
    bytes_free(&ctx);
    bytes_free(&ci);
    return out;
}

/* Opaque SignedData over content by ec256, n_signers times (SHA-256,
 * SHA-384, SHA-512 in turn), carrying n_extra more certificates. */
static bytes signed_by_many(int n_signers, int n_extra, const bytes *content)
{
    static const struct cert_spec spec = {NULL, NULL, -86400, 86400};
    const EVP_MD *mds[3] = {EVP_sha256(), EVP_sha384(), EVP_sha512()};
    CMS_ContentInfo *cms =
        CMS_sign(NULL, NULL, NULL, NULL, CMS_PARTIAL | CMS_BINARY);
    BIO *in = BIO_new_mem_buf(content->data, (int)content->len);
    bytes der;
    X509 *c;
    int i;

    if (cms == NULL || in == NULL)
        die("signed_by_many");
    for (i = 0; i < n_signers; i++)
        if (CMS_add1_signer(cms, ec256.cert, ec256.key, mds[i % 3],
                            CMS_BINARY | (i > 0 ? CMS_NOCERTS : 0)) == NULL)
            die("CMS_add1_signer");
    for (i = 0; i < n_extra; i++) {
        c = make_cert_spec(ec256_b.key, "extra", NULL, ca_cert, ca_key, 0,
                           &spec);
        if (!CMS_add1_cert(cms, c))
            die("CMS_add1_cert");
        X509_free(c);
    }
    if (CMS_final(cms, in, NULL, CMS_BINARY) != 1)
        die("CMS_final");
    der = cms_der(cms);
    BIO_free(in);
    CMS_ContentInfo_free(cms);
    return der;
}

static void test_verify_limits(void)
{
    static const unsigned char unknown_alg[] = {0x30, 0x05, 0x06, 0x03,
                                                0x2a, 0x03, 0x04};
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    bytes content = str_bytes(sample_inner), big = {0}, der, der2, in;
    bytes extra = bytes_of(unknown_alg, sizeof(unknown_alg));
    clock_t t0;
    double secs;
    int i, ok;

    der = signed_by_many(16, 255, &content);
    in = p7m_wrap(SIGNED_HEADERS, &der, 76);
    tap_ok(verifies(&in, anchors, NULL, NULL, NULL, NULL),
           "16 signers (three digests) and 256 certificates verify");
    bytes_free(&in);
    bytes_free(&der);
    der = signed_by_many(17, 0, &content);
    in = p7m_wrap(SIGNED_HEADERS, &der, 76);
    tap_ok(verify_refused(&in, "the signed data has more than 16 signers"),
           "17 signers are refused before any check");
    bytes_free(&in);
    bytes_free(&der);
    der = signed_by_many(1, 256, &content);
    in = p7m_wrap(SIGNED_HEADERS, &der, 76);
    tap_ok(verify_refused(&in, "the signed data has more than 256 "
                               "certificates"),
           "257 certificates are refused");
    bytes_free(&in);
    bytes_free(&der);

    der = signed_by_many(1, 0, &content);
    der2 = with_digest_algs(&der, 1, &extra);
    in = p7m_wrap(SIGNED_HEADERS, &der2, 76);
    {
        cms_verification *v = NULL;
        cms_error err = {0};

        tap_ok(
            cms_verify_entity(in.data, in.len, anchors, NULL, NULL, &v, &err) ==
                    -1 &&
                v == NULL && err.status == CMS_ERR_ALGORITHM &&
                strstr(err.message, "digest 1.2.3.4 is not supported") != NULL,
            "an unknown algorithm in digestAlgorithms, even one no signer "
            "uses, is refused (%s)",
            err.message);
    }
    bytes_free(&in);
    bytes_free(&der2);
    bytes_free(&der);

    /* 16 entries over 1 MiB: one digest pass, not one per entry; a 17th,
     * or 3000, refused before OpenSSL builds them. */
    big.len = 65536 * 16;
    big.data = xmalloc(big.len);
    for (i = 0; i < 65536; i++)
        memcpy(big.data + 16 * i, "0123456789abcde\n", 16);
    der = signed_by_many(1, 0, &big);
    der2 = with_digest_algs(&der, 16, NULL);
    in = p7m_wrap(SIGNED_HEADERS, &der2, 76);
    t0 = clock();
    ok = verifies(&in, anchors, NULL, NULL, NULL, NULL);
    secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    tap_ok(ok, "16 digestAlgorithms entries over 1 MiB verify (%.2f s)", secs);
    bytes_free(&in);
    bytes_free(&der2);
    for (i = 17; i <= 3000; i += 2983) {
        der2 = with_digest_algs(&der, i, NULL);
        in = p7m_wrap(SIGNED_HEADERS, &der2, 76);
        tap_ok(verify_refused(&in, "the signed data has more than 16 digest "
                                   "algorithms"),
               "%d digestAlgorithms entries are refused", i);
        bytes_free(&in);
        bytes_free(&der2);
    }
    bytes_free(&der);
    bytes_free(&big);
    bytes_free(&extra);
    bytes_free(&content);
    sk_X509_free(anchors);
}

/* Whether a damaged entity gave a result whose reason agrees with its
 * validity, or CMS_ERR_INPUT or an algorithm refusal, and left the error queue
 * empty; with utf8, also that the detail or message is UTF-8. Counts the
 * results in *parsed and the valid ones in *valid, and frees v. */
static int fuzz_outcome_ok(int rc, cms_verification *v, const cms_error *err,
                           int utf8, int *parsed, int *valid)
{
    int ok;

    if (rc == 0) {
        (*parsed)++;
        *valid += cms_verification_valid(v);
        ok = cms_verification_valid(v) ? cms_verification_reason(v) == NULL
                                       : cms_verification_reason(v) != NULL;
        ok &= !utf8 || utf8_valid(cms_verification_detail(v));
        cms_verification_free(v);
    } else {
        ok = rc == -1 && v == NULL &&
             (err->status == CMS_ERR_INPUT || is_algorithm_refusal(err)) &&
             (!utf8 || utf8_valid(err->message));
    }
    return ok & (ERR_peek_error() == 0);
}

static void test_fuzz_verify(void)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    bytes src[2];
    unsigned int seed = 31337;
    int i, ok = 1, valid = 0, parsed = 0;

    src[0] = sign_with(ec256.key, ec256.cert, NULL, CMS_MODE_DETACHED,
                       CMS_DIGEST_SHA256);
    src[1] = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_OPAQUE,
                       CMS_DIGEST_SHA384);
    for (i = 0; i < 600; i++) {
        bytes in = bytes_of(src[i % 2].data, src[i % 2].len);
        cms_verification *v = NULL;
        cms_error err;
        int k, rc;

        for (k = rand_r(&seed) % 3; k >= 0; k--)
            in.data[(size_t)rand_r(&seed) % in.len] =
                (unsigned char)rand_r(&seed);
        if (i % 7 == 0)
            in.len = (size_t)rand_r(&seed) % in.len;
        rc = cms_verify_entity(in.data, in.len, anchors, NULL, NULL, &v, &err);
        ok &= fuzz_outcome_ok(rc, v, &err, 1, &parsed, &valid);
        bytes_free(&in);
    }
    tap_ok(ok,
           "600 damaged signed entities: a result, CMS_ERR_INPUT or "
           "CMS_ERR_ALGORITHM, UTF-8 messages, error queue empty (%d "
           "parsed, %d still valid)",
           parsed, valid);

    /* the same below the base64, in the SignedData's DER */
    {
        bytes der = p7m_der(&src[1]);

        ok = 1;
        parsed = 0;
        valid = 0;
        for (i = 0; i < 800; i++) {
            bytes bad = bytes_of(der.data, der.len), in;
            cms_verification *v = NULL;
            cms_error err;
            int k, rc;

            for (k = rand_r(&seed) % 3; k >= 0; k--)
                bad.data[(size_t)rand_r(&seed) % bad.len] ^=
                    (unsigned char)(1 + rand_r(&seed) % 255);
            in = p7m_wrap(SIGNED_HEADERS, &bad, 76);
            rc = cms_verify_entity(in.data, in.len, anchors, NULL, NULL, &v,
                                   &err);
            ok &= fuzz_outcome_ok(rc, v, &err, 0, &parsed, &valid);
            bytes_free(&in);
            bytes_free(&bad);
        }
        tap_ok(ok,
               "800 SignedData damaged in their DER: a result, "
               "CMS_ERR_INPUT or CMS_ERR_ALGORITHM, error queue empty (%d "
               "parsed, %d still valid)",
               parsed, valid);
        bytes_free(&der);
    }
    bytes_free(&src[0]);
    bytes_free(&src[1]);
    sk_X509_free(anchors);
}

/* ---- threads ------------------------------------------------------------ */

static bytes thread_signed;

static void *worker(void *arg)
{
    STACK_OF(X509) *anchors = certs_of(1, ca_cert);
    long failures = 0, id = (long)arg;
    int i;

    for (i = 0; i < 12; i++) {
        struct party *p = (i + id) % 3 == 0   ? &rsa_a
                          : (i + id) % 3 == 1 ? &ec256
                                              : &ec384;
        bytes res = {0}, plain = {0};
        cms_verification *v = NULL;
        cms_error err;

        if (encrypt1(sample, p, ciphers[(size_t)(i + id) % N_CIPHERS].cipher,
                     (cms_rsa_padding)(i % 2), &res, &err) != 0 ||
            decrypt_as(&res, p, &plain, NULL, &err) != DEC_OK ||
            !bytes_is(&plain, sample_message, strlen(sample_message)) ||
            decrypt_as(&res, p == &rsa_a ? &rsa_b : &ec256_b, NULL, NULL,
                       &err) != DEC_DECRYPT ||
            cms_verify_entity(thread_signed.data, thread_signed.len, anchors,
                              NULL, NULL, &v, &err) != 0 ||
            !cms_verification_valid(v))
            failures++;
        cms_verification_free(v);
        bytes_free(&plain);
        bytes_free(&res);
    }
    sk_X509_free(anchors);
    return (void *)failures;
}

static void test_threads(void)
{
    pthread_t t[8];
    void *ret;
    long failures = 0, i;

    thread_signed = sign_with(rsa_a.key, rsa_a.cert, NULL, CMS_MODE_DETACHED,
                              CMS_DIGEST_SHA256);
    for (i = 0; i < 8; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0)
            die("pthread_create");
    for (i = 0; i < 8; i++) {
        pthread_join(t[i], &ret);
        failures += (long)ret;
    }
    tap_ok(failures == 0,
           "8 threads encrypting, decrypting and verifying at once: %ld "
           "failures",
           failures);
    bytes_free(&thread_signed);
}

int main(void)
{
    cms_init();
    make_pki();
    setup_cli();

    test_names();
    test_round_trips();
    test_multi_recipient();
    test_inner_entity();
    test_encrypt_errors();
    test_openssl_encrypts();
    test_gpgsm_encrypts();
    test_openssl_decrypts();
    test_wrong_key();
    test_padding_oracle();
    test_plaintext_rule();
    test_input_forms();
    test_input_errors();
    test_fuzz_envelope();
    test_fuzz_envelope_der();
    test_sign_then_encrypt();
    test_recipient_check();
    test_verify_valid();
    test_verify_openssl();
    test_verify_failures();
    test_verify_crls();
    test_verify_anchor_dir();
    test_verify_input_errors();
    test_utf8_messages();
    test_verify_limits();
    test_fuzz_verify();
    test_threads();

    cleanup_cli();
    free_pki();
    return tap_done();
}
