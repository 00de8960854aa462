/*
 * What the harnesses of tests/fuzz/ share: a check that aborts (so
 * libFuzzer keeps the input as a crash), a UTF-8 check for messages meant
 * for people, and the TEST-ONLY keys of tests/fuzz/keys/ (FUZZ_KEYS_DIR,
 * set by tests/fuzz/meson.build). Everything is static so each harness
 * takes what it uses.
 */
#ifndef SMIMED_FUZZ_H
#define SMIMED_FUZZ_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "cms/cms.h"
#include "tests/utf8check.h"

/* An invariant of the code under test does not hold: abort, which
 * libFuzzer reports as a crash and keeps the input for. */
#define FUZZ_CHECK(cond, ...)                                                  \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__,      \
                    __LINE__, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* The harness itself cannot go on (a key file missing): exit, not a
 * finding. */
static inline void fuzz_die(const char *what)
{
    fprintf(stderr, "fuzz harness: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

/* A cms/ refusal of the input: a status saying what was wrong with it.
 * Not CMS_ERR_INTERNAL, which is out of memory or a bug; any other status,
 * so that new, more precise ones (an unsupported algorithm) need no change
 * here. */
static inline int fuzz_refusal(cms_status status)
{
    return status != CMS_OK && status != CMS_ERR_INTERNAL;
}

/* Whether s is valid UTF-8 (tests/utf8check.h). */
static inline int fuzz_text_valid(const char *s)
{
    return test_utf8_valid((const unsigned char *)s, strlen(s));
}

static inline BIO *fuzz_key_file(const char *name)
{
    char path[4096];
    BIO *bio;

    snprintf(path, sizeof(path), "%s/%s", FUZZ_KEYS_DIR, name);
    bio = BIO_new_file(path, "r");
    if (bio == NULL)
        fuzz_die(path);
    return bio;
}

/* tests/fuzz/keys/NAME.pem */
static inline X509 *fuzz_cert(const char *name)
{
    char file[256];
    BIO *bio;
    X509 *cert;

    snprintf(file, sizeof(file), "%s.pem", name);
    bio = fuzz_key_file(file);
    cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (cert == NULL)
        fuzz_die(file);
    return cert;
}

/* tests/fuzz/keys/NAME.key */
static inline EVP_PKEY *fuzz_key(const char *name)
{
    char file[256];
    BIO *bio;
    EVP_PKEY *pkey;

    snprintf(file, sizeof(file), "%s.key", name);
    bio = fuzz_key_file(file);
    pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (pkey == NULL)
        fuzz_die(file);
    return pkey;
}

/* tests/fuzz/keys/crl.pem */
static inline X509_CRL *fuzz_crl(void)
{
    BIO *bio = fuzz_key_file("crl.pem");
    X509_CRL *crl = PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL);

    BIO_free(bio);
    if (crl == NULL)
        fuzz_die("crl.pem");
    return crl;
}

#endif
