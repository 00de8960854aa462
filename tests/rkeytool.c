/*
 * rkeytool: the worker's key-protocol client (rkey/client.c) on the
 * command line, for tests/integration/test_keyproc.py, which starts a key
 * process, hands this tool one end of a worker socket as descriptor FD
 * and checks what comes back with openssl.
 *
 *   rkeytool FD keys                    one line per key: name token
 *                                       algorithm flags sha256(cert)
 *   rkeytool FD state                   one line per token
 *   rkeytool FD sign KEY MECH MD HEX    MECH pkcs1|pss|ecdsa, MD sha256|
 *                                       none; prints the signature in hex
 *   rkeytool FD decrypt KEY PAD HEX     PAD pkcs1|oaep (SHA-256 both)
 *   rkeytool FD derive KEY HEXPOINT
 *   rkeytool FD pkey-sign KEY MECH HEX  the directory key's EVP_PKEY (the
 *                                       rkey provider over this client):
 *                                       EVP_PKEY_sign of a SHA-256 digest,
 *                                       MECH pkcs1|pss (salt: the digest's
 *                                       length)|ecdsa
 *   rkeytool FD pkey-decrypt KEY HEX    EVP_PKEY_decrypt, OAEP SHA-256
 *   rkeytool FD finish RID STATUS
 *   rkeytool FD parallel KEY N THREADS  N ECDSA signatures (each with its
 *                                       FINISH) on THREADS threads;
 *                                       prints "ok A unavailable
 *                                       B other C slowest_unavailable_ms D":
 *                                       D is the longest a call took that
 *                                       ended unavailable
 *
 * Exit status 0 when every call succeeded, 1 otherwise (the failure on
 * stderr as "status: message").
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "rkey/client.h"
#include "rkey/rkey.h"

static rkey_client *client;

static int hex_decode(const char *hex, unsigned char *out, size_t max,
                      size_t *len)
{
    size_t n = strlen(hex), i;
    unsigned v;

    if (n % 2 != 0 || n / 2 > max)
        return -1;
    for (i = 0; i < n / 2; i++) {
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (unsigned char)v;
    }
    *len = n / 2;
    return 0;
}

static void hex_print(const unsigned char *p, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\n");
}

static int failed(const rkey_failure *f)
{
    fprintf(stderr, "%s: %s\n", proto_status_name(f->status), f->message);
    return 1;
}

static void claims(const char *rid)
{
    proto_claims c;

    memset(&c, 0, sizeof(c));
    snprintf(c.request_id, sizeof(c.request_id), "%s", rid);
    snprintf(c.client, sizeof(c.client), "rkeytool");
    snprintf(c.remote, sizeof(c.remote), "127.0.0.1");
    rkey_claims_set(&c);
}

static int cmd_keys(void)
{
    rkey_failure f = {0};
    rkey_dir *d = rkey_dir_get1(client, &f);
    unsigned char md[32], *der;
    unsigned int mdlen;
    size_t i;
    int n;

    if (d == NULL)
        return failed(&f);
    for (i = 0; i < rkey_dir_count_keys(d); i++) {
        rkey_key *k = rkey_dir_key_at(d, i);

        printf("%s %s %s %d%d%d%d ", rkey_key_name(k), rkey_key_token_name(k),
               rkey_key_algorithm(k), rkey_key_supports(k, RKEY_USE_SIGN),
               rkey_key_supports(k, RKEY_USE_DECRYPT),
               rkey_key_usable(k, RKEY_USE_SIGN, NULL),
               rkey_key_usable(k, RKEY_USE_DECRYPT, NULL));
        der = NULL;
        n = rkey_key_cert0(k) != NULL ? i2d_X509(rkey_key_cert0(k), &der) : 0;
        if (n > 0 &&
            EVP_Digest(der, (size_t)n, md, &mdlen, EVP_sha256(), NULL) == 1)
            hex_print(md, mdlen);
        else
            printf("-\n");
        OPENSSL_free(der);
    }
    printf("epoch %llu\n", (unsigned long long)rkey_dir_epoch(d));
    rkey_dir_free(d);
    return 0;
}

static int cmd_state(void)
{
    proto_token_entry *t;
    rkey_failure f = {0};
    size_t n, i;

    if (rkey_state(client, &t, &n, &f) != 0)
        return failed(&f);
    for (i = 0; i < n; i++)
        printf("%s %u %s ops_sign=%llu\n", t[i].name, t[i].state,
               t[i].reason[0] ? t[i].reason : "-",
               (unsigned long long)t[i].ops_sign);
    free(t);
    return 0;
}

static int cmd_sign(char **argv)
{
    unsigned char tbs[PROTO_DIGEST_MAX], sig[PROTO_RSA_MAX];
    size_t tbs_len, sig_len = sizeof(sig);
    rkey_sign_args a = {0};
    rkey_failure f = {0};

    if (hex_decode(argv[3], tbs, sizeof(tbs), &tbs_len) != 0)
        return 2;
    a.mech = strcmp(argv[1], "pss") == 0     ? PROTO_SIGN_RSA_PSS
             : strcmp(argv[1], "ecdsa") == 0 ? PROTO_SIGN_ECDSA
                                             : PROTO_SIGN_RSA_PKCS1;
    a.md = strcmp(argv[2], "none") == 0 ? PROTO_MD_NONE : PROTO_MD_SHA256;
    if (a.mech == PROTO_SIGN_RSA_PSS) {
        a.mgf1_md = PROTO_MD_SHA256;
        a.salt_len = 32;
    }
    claims("rkeytool-sign");
    if (rkey_sign(client, argv[0], &a, tbs, tbs_len, sig, &sig_len, &f) != 0)
        return failed(&f);
    hex_print(sig, sig_len);
    return 0;
}

static int cmd_decrypt(char **argv)
{
    unsigned char in[PROTO_RSA_MAX], out[PROTO_RSA_MAX];
    size_t in_len, out_len = sizeof(out);
    rkey_decrypt_args a = {0};
    rkey_failure f = {0};

    if (hex_decode(argv[2], in, sizeof(in), &in_len) != 0)
        return 2;
    a.padding = strcmp(argv[1], "oaep") == 0 ? PROTO_PAD_OAEP : PROTO_PAD_PKCS1;
    if (a.padding == PROTO_PAD_OAEP)
        a.oaep_md = a.mgf1_md = PROTO_MD_SHA256;
    claims("rkeytool-decrypt");
    if (rkey_decrypt(client, argv[0], &a, in, in_len, out, &out_len, &f) != 0)
        return failed(&f);
    hex_print(out, out_len);
    return 0;
}

static int cmd_derive(char **argv)
{
    unsigned char point[PROTO_POINT_MAX], z[PROTO_SECRET_MAX];
    size_t point_len, z_len = sizeof(z);
    rkey_failure f = {0};

    if (hex_decode(argv[1], point, sizeof(point), &point_len) != 0)
        return 2;
    claims("rkeytool-derive");
    if (rkey_derive(client, argv[0], point, point_len, z, &z_len, &f) != 0)
        return failed(&f);
    hex_print(z, z_len);
    return 0;
}

/* The EVP_PKEY of key in the directory, up-referenced, and a context on
 * it; NULL with the failure printed. */
static EVP_PKEY_CTX *pkey_ctx(const char *key, rkey_dir **dir)
{
    rkey_failure f = {0};
    rkey_key *k;
    EVP_PKEY_CTX *ctx;

    *dir = rkey_dir_get1(client, &f);
    if (*dir == NULL) {
        failed(&f);
        return NULL;
    }
    k = rkey_dir_find_key(*dir, key);
    if (k == NULL || rkey_key_pkey0(k) == NULL) {
        fprintf(stderr, "no EVP_PKEY for %s\n", key);
        return NULL;
    }
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, rkey_key_pkey0(k), NULL);
    if (ctx == NULL)
        fprintf(stderr, "EVP_PKEY_CTX_new_from_pkey failed\n");
    return ctx;
}

static int pkey_failed(const char *what)
{
    const rkey_error *e = rkey_last_error();

    fprintf(stderr, "%s: %s: %s\n", what, rkey_status_name(e->status),
            e->message);
    return 1;
}

static int cmd_pkey_sign(char **argv)
{
    unsigned char tbs[64], sig[1024];
    size_t tbs_len, sig_len = sizeof(sig);
    rkey_dir *dir = NULL;
    EVP_PKEY_CTX *ctx;
    int r = 1, pss = strcmp(argv[1], "pss") == 0;

    ctx = pkey_ctx(argv[0], &dir);
    if (ctx == NULL || hex_decode(argv[2], tbs, sizeof(tbs), &tbs_len) != 0)
        goto out;
    claims("rkeytool-pkey-sign");
    if (EVP_PKEY_sign_init(ctx) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) <= 0 ||
        (strcmp(argv[1], "ecdsa") != 0 &&
         EVP_PKEY_CTX_set_rsa_padding(ctx, pss ? RSA_PKCS1_PSS_PADDING
                                               : RSA_PKCS1_PADDING) <= 0) ||
        (pss &&
         (EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, RSA_PSS_SALTLEN_DIGEST) <= 0 ||
          EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) <= 0))) {
        fprintf(stderr, "cannot set the signature up\n");
        goto out;
    }
    if (EVP_PKEY_sign(ctx, sig, &sig_len, tbs, tbs_len) <= 0) {
        pkey_failed("EVP_PKEY_sign");
        goto out;
    }
    hex_print(sig, sig_len);
    r = 0;
out:
    EVP_PKEY_CTX_free(ctx);
    rkey_dir_free(dir);
    return r;
}

static int cmd_pkey_decrypt(char **argv)
{
    unsigned char in[1024], out[1024];
    size_t in_len, out_len = sizeof(out);
    rkey_dir *dir = NULL;
    EVP_PKEY_CTX *ctx;
    int r = 1;

    ctx = pkey_ctx(argv[0], &dir);
    if (ctx == NULL || hex_decode(argv[1], in, sizeof(in), &in_len) != 0)
        goto out;
    claims("rkeytool-pkey-decrypt");
    if (EVP_PKEY_decrypt_init(ctx) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) <= 0 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) <= 0) {
        fprintf(stderr, "cannot set the decryption up\n");
        goto out;
    }
    if (EVP_PKEY_decrypt(ctx, out, &out_len, in, in_len) <= 0) {
        pkey_failed("EVP_PKEY_decrypt");
        goto out;
    }
    hex_print(out, out_len);
    r = 0;
out:
    EVP_PKEY_CTX_free(ctx);
    rkey_dir_free(dir);
    return r;
}

static int cmd_finish(char **argv)
{
    rkey_failure f = {0};

    if (rkey_finish(client, argv[0], (unsigned)atoi(argv[1]), NULL, 1000, &f) !=
        0)
        return failed(&f);
    return 0;
}

/* ---- parallel: many threads, one client ---- */

static const char *par_key;
static int par_left;
static int par_ok, par_unavailable, par_other;
static long par_slowest_ms;
static pthread_mutex_t par_lock = PTHREAD_MUTEX_INITIALIZER;

static void *par_main(void *arg)
{
    unsigned char digest[32] = {1}, sig[PROTO_RSA_MAX];
    rkey_sign_args a = {PROTO_SIGN_ECDSA, PROTO_MD_SHA256, 0, 0};
    rkey_failure f;
    struct timespec t0, t1;
    size_t sig_len;
    char rid[32];
    long ms;
    int r, n;

    for (;;) {
        pthread_mutex_lock(&par_lock);
        n = par_left--;
        pthread_mutex_unlock(&par_lock);
        if (n <= 0)
            return NULL;
        snprintf(rid, sizeof(rid), "par-%d", n);
        claims(rid);
        sig_len = sizeof(sig);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        r = rkey_sign(client, par_key, &a, digest, sizeof(digest), sig,
                      &sig_len, &f);
        if (r == 0)
            r = rkey_finish(client, rid, 200, NULL, 100, &f);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ms = (t1.tv_sec - t0.tv_sec) * 1000L +
             (t1.tv_nsec - t0.tv_nsec) / 1000000L;
        pthread_mutex_lock(&par_lock);
        if (r == 0) {
            par_ok++;
        } else if (f.status == PROTO_UNAVAILABLE) {
            par_unavailable++;
            if (ms > par_slowest_ms)
                par_slowest_ms = ms;
        } else {
            par_other++;
        }
        pthread_mutex_unlock(&par_lock);
    }
}

static int cmd_parallel(char **argv)
{
    int n = atoi(argv[1]), nthreads = atoi(argv[2]), i;
    pthread_t *t = calloc((size_t)nthreads, sizeof(*t));

    if (t == NULL || n <= 0 || nthreads <= 0)
        return 2;
    par_key = argv[0];
    par_left = n;
    for (i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, par_main, NULL);
    for (i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    free(t);
    printf("ok %d unavailable %d other %d slowest_unavailable_ms %ld\n", par_ok,
           par_unavailable, par_other, par_slowest_ms);
    return par_ok == n ? 0 : 1;
}

int main(int argc, char **argv)
{
    int r = 2;

    rkey_error err = {0};

    if (argc < 3)
        return 2;
    /* the EVP_PKEYs of the directory need the provider, loaded before any
     * other thread starts */
    if (strncmp(argv[2], "pkey-", 5) == 0 && rkey_provider_init(&err) != 0) {
        fprintf(stderr, "rkey_provider_init: %s\n", err.message);
        return 1;
    }
    client = rkey_client_new(atoi(argv[1]), 10000);
    if (client == NULL)
        return 1;
    if (strcmp(argv[2], "keys") == 0)
        r = cmd_keys();
    else if (strcmp(argv[2], "state") == 0)
        r = cmd_state();
    else if (strcmp(argv[2], "sign") == 0 && argc == 7)
        r = cmd_sign(argv + 3);
    else if (strcmp(argv[2], "decrypt") == 0 && argc == 6)
        r = cmd_decrypt(argv + 3);
    else if (strcmp(argv[2], "derive") == 0 && argc == 5)
        r = cmd_derive(argv + 3);
    else if (strcmp(argv[2], "pkey-sign") == 0 && argc == 6)
        r = cmd_pkey_sign(argv + 3);
    else if (strcmp(argv[2], "pkey-decrypt") == 0 && argc == 5)
        r = cmd_pkey_decrypt(argv + 3);
    else if (strcmp(argv[2], "finish") == 0 && argc == 5)
        r = cmd_finish(argv + 3);
    else if (strcmp(argv[2], "parallel") == 0 && argc == 6)
        r = cmd_parallel(argv + 3);
    rkey_client_free(client);
    return r;
}
