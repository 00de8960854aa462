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

/* RFC 3629 UTF-8: no overlong forms, surrogates or code points past
 * U+10FFFF. Written here rather than taken from the code under test, so
 * that a bug there cannot hide itself. */
static inline int fuzz_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0, n, k;
    unsigned char lo, hi;

    while (i < len) {
        unsigned char c = s[i];

        lo = 0x80;
        hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            return 0;
        }
        if (len - i - 1 < n)
            return 0;
        for (k = 1; k <= n; k++) {
            if (s[i + k] < (k == 1 ? lo : 0x80) ||
                s[i + k] > (k == 1 ? hi : 0xbf))
                return 0;
        }
        i += n + 1;
    }
    return 1;
}

static inline int fuzz_text_valid(const char *s)
{
    return fuzz_utf8_valid((const unsigned char *)s, strlen(s));
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
