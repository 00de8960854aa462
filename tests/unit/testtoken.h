/*
 * SoftHSMv2 helpers for the token unit tests (test_uri, test_probe): the
 * shell, the tool check, the softhsm2.conf under a test directory, a set
 * with one token, its reason, and a signature checked against the key's
 * certificate. Everything is static inline so each test takes what it uses.
 */
#ifndef SMIMED_TESTTOKEN_H
#define SMIMED_TESTTOKEN_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "token/token.h"

/* The real module, also the one pkcs11-tool is given. */
#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define PIN "31415926"

__attribute__((format(printf, 1, 2))) static inline int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd) == 0;
}

/* The module and the command-line tools the setup scripts use. */
static inline int have_softhsm_tools(void)
{
    return access(MODULE, R_OK) == 0 &&
           sh("{ command -v softhsm2-util && command -v pkcs11-tool && "
              "command -v openssl; } >/dev/null 2>&1") != 0;
}

/* Writes a softhsm2.conf at conf keeping its tokens in tokens, creates that
 * directory, and points SOFTHSM2_CONF at the file. 0 when it cannot. */
static inline int write_softhsm_conf(const char *conf, const char *tokens)
{
    FILE *f = fopen(conf, "w");

    if (f == NULL)
        return 0;
    fprintf(f,
            "directories.tokendir = %s\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n",
            tokens);
    fclose(f);
    mkdir(tokens, 0700);
    setenv("SOFTHSM2_CONF", conf, 1);
    return 1;
}

static inline long elapsed_ms(const struct timespec *since)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000 +
           (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* A set with the token of spec; NULL when token_set_add failed, with *err
 * as it said when err is not NULL. */
static inline token_set *set_with(const token_spec *spec, token_error *err)
{
    token_set *set = token_set_new();
    token_error ignored = {0};

    if (err == NULL)
        err = &ignored;
    if (set != NULL && token_set_add(set, spec, err) < 0) {
        token_set_free(set);
        set = NULL;
    }
    return set;
}

/* The first token's reason; "" when it is ready, "(no set)" without a
 * set. */
static inline const char *reason_of(token_set *set)
{
    const char *reason = NULL;

    if (set == NULL)
        return "(no set)";
    if (token_set_token_ready(set, 0, &reason))
        return "";
    return reason != NULL ? reason : "(none)";
}

/* Acquires key for signing, signs, and checks the signature against the
 * key's certificate. *status, when status is not NULL, is what the acquire
 * returned. */
static inline int sign_and_verify(token_key *key, token_status *status)
{
    static const unsigned char msg[] = "Content-Type: text/plain\r\n\r\nhi";
    unsigned char sig[1024];
    size_t siglen = sizeof(sig);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY *pkey = NULL;
    token_error err = {0};
    token_status ignored;
    int ok;

    if (status == NULL)
        status = &ignored;
    *status = TOKEN_ERR_INTERNAL;
    if (md == NULL || key == NULL) {
        EVP_MD_CTX_free(md);
        return 0;
    }
    if (token_key_acquire(key, TOKEN_USE_SIGN, &pkey, &err) < 0) {
        *status = err.status;
        EVP_MD_CTX_free(md);
        return 0;
    }
    *status = TOKEN_OK;
    ok = EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, pkey) == 1 &&
         EVP_DigestSign(md, sig, &siglen, msg, sizeof(msg)) == 1;
    token_key_release(key);
    EVP_MD_CTX_reset(md);
    ok = ok &&
         EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL,
                              X509_get0_pubkey(token_key_cert0(key))) == 1 &&
         EVP_DigestVerify(md, sig, siglen, msg, sizeof(msg)) == 1;
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return ok;
}

#endif
