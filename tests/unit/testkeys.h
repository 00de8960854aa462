/*
 * Keys and certificates for the unit tests, made in-process: a CA and end
 * entities with the key usage, extended key usage and validity a test asks
 * for; a UTF-8 check for the messages the module makes of their names; and
 * the sample message test_cms signs and test_envelope encrypts.
 * Everything is static inline so each test takes what it uses.
 */
#ifndef SMIMED_TESTKEYS_H
#define SMIMED_TESTKEYS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "tests/utf8check.h"

static inline void die(const char *what)
{
    fprintf(stderr, "fatal: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (p == NULL)
        die("out of memory");
    return p;
}

static inline void add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509_EXTENSION *ext;

    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    if (ext == NULL || !X509_add_ext(cert, ext, -1))
        die("extension");
    X509_EXTENSION_free(ext);
}

/* What an end-entity certificate says; a NULL usage leaves the extension
 * out. Validity is in seconds from now. The common name is UTF-8; a NULL
 * e-mail address leaves the subjectAltName out. */
struct cert_spec {
    const char *key_usage;
    const char *ext_key_usage;
    long not_before;
    long not_after;
};

/* The usual S/MIME signing certificate, valid from yesterday for a year. */
static const struct cert_spec cert_spec_signing = {
    "critical,digitalSignature,nonRepudiation", "emailProtection", -86400,
    86400L * 365};

static inline X509 *make_cert_spec(EVP_PKEY *key, const char *cn,
                                   const char *email, X509 *issuer,
                                   EVP_PKEY *issuer_key, int ca,
                                   const struct cert_spec *spec)
{
    static long serial = 1;
    X509 *cert = X509_new();
    X509_NAME *name = X509_NAME_new();
    char san[128];

    if (cert == NULL || name == NULL)
        die("X509_new");
    X509_set_version(cert, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), serial++);
    X509_gmtime_adj(X509_getm_notBefore(cert), spec->not_before);
    X509_gmtime_adj(X509_getm_notAfter(cert), spec->not_after);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                               (const unsigned char *)cn, -1, -1, 0);
    X509_set_subject_name(cert, name);
    X509_set_issuer_name(cert, issuer ? X509_get_subject_name(issuer) : name);
    X509_set_pubkey(cert, key);
    if (issuer == NULL)
        issuer = cert;
    add_ext(cert, issuer, NID_subject_key_identifier, "hash");
    add_ext(cert, issuer, NID_authority_key_identifier, "keyid:always");
    if (ca) {
        add_ext(cert, issuer, NID_basic_constraints, "critical,CA:TRUE");
        add_ext(cert, issuer, NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
        add_ext(cert, issuer, NID_basic_constraints, "critical,CA:FALSE");
        if (spec->key_usage != NULL)
            add_ext(cert, issuer, NID_key_usage, spec->key_usage);
        if (spec->ext_key_usage != NULL)
            add_ext(cert, issuer, NID_ext_key_usage, spec->ext_key_usage);
        if (email != NULL) {
            snprintf(san, sizeof(san), "email:%s", email);
            add_ext(cert, issuer, NID_subject_alt_name, san);
        }
    }
    if (!X509_sign(cert, issuer_key ? issuer_key : key, EVP_sha256()))
        die("X509_sign");
    X509_NAME_free(name);
    return cert;
}

static inline X509 *make_cert(EVP_PKEY *key, const char *cn, const char *email,
                              X509 *issuer, EVP_PKEY *issuer_key, int ca)
{
    return make_cert_spec(key, cn, email, issuer, issuer_key, ca,
                          &cert_spec_signing);
}

/* Whether the message str is valid UTF-8 (tests/utf8check.h). */
static inline int utf8_valid(const char *str)
{
    return test_utf8_valid((const unsigned char *)str, strlen(str));
}

/* A message with outer headers, as the tests submit it. */
static const char sample[] = "From: Alice <alice@example.org>\n"
                             "To: Bob <bob@example.org>\n"
                             "Subject: Quarterly report\n"
                             "Date: Mon, 1 Jan 2024 10:00:00 +0000\n"
                             "Message-ID: <1@example.org>\n"
                             "MIME-Version: 1.0\n"
                             "Content-Type: text/plain; charset=us-ascii\n"
                             "Content-Transfer-Encoding: 7bit\n"
                             "\n"
                             "Hello Bob,\n"
                             "\n"
                             "the numbers are in.\n"
                             "Regards\n";

/* What gets encrypted or signed of sample. */
static const char sample_inner[] =
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "Hello Bob,\r\n"
    "\r\n"
    "the numbers are in.\r\n"
    "Regards\r\n";

#endif
