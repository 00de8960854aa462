/*
 * p11bench: the token's own rate through libp11, the ceiling that
 * script/bench compares the daemon against. It opens the token exactly as
 * the daemon does (same config, same token/ code) and repeats one private
 * key operation from several threads for a fixed time, so the only
 * difference left to the daemon's figure is HTTP, JSON and CMS:
 *   sign     EVP_PKEY_sign of a SHA-256 digest (RSA PKCS#1 v1.5 or ECDSA)
 *   decrypt  EVP_PKEY_decrypt of a 32-byte key wrapped with RSA PKCS#1 v1.5,
 *            what an RSA KeyTransRecipientInfo costs the token
 *   derive   EVP_PKEY_derive (ECDH) with a fixed ephemeral P-256 key, what
 *            an ECDH KeyAgreeRecipientInfo costs the token
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "service/config.h"
#include "token/token.h"

typedef enum op { OP_SIGN, OP_DECRYPT, OP_DERIVE } op;

/* What every thread needs for one operation, made once before they start. */
typedef struct op_input {
    op op;
    unsigned char wrapped[512]; /* OP_DECRYPT: the RSA ciphertext */
    size_t wrapped_len;
    EVP_PKEY *peer; /* OP_DERIVE: the ephemeral public key */
} op_input;

typedef struct worker {
    token_key *key;
    const op_input *in;
    double seconds;
    unsigned long count;
    int failed;
} worker;

static double clock_s(clockid_t clock)
{
    struct timespec ts;

    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double now_s(void)
{
    return clock_s(CLOCK_MONOTONIC);
}

static int sign_once(EVP_PKEY *pkey, const unsigned char *md)
{
    unsigned char sig[1024];
    size_t siglen = sizeof(sig);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok;

    ok = ctx != NULL && EVP_PKEY_sign_init(ctx) > 0 &&
         EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) > 0 &&
         EVP_PKEY_sign(ctx, sig, &siglen, md, 32) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

static int decrypt_once(EVP_PKEY *pkey, const op_input *in)
{
    unsigned char out[512];
    size_t outlen = sizeof(out);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok;

    ok =
        ctx != NULL && EVP_PKEY_decrypt_init(ctx) > 0 &&
        EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) > 0 &&
        EVP_PKEY_decrypt(ctx, out, &outlen, in->wrapped, in->wrapped_len) > 0 &&
        outlen == 32;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

static int derive_once(EVP_PKEY *pkey, const op_input *in)
{
    unsigned char secret[66];
    size_t len = sizeof(secret);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok;

    ok = ctx != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
         EVP_PKEY_derive_set_peer(ctx, in->peer) > 0 &&
         EVP_PKEY_derive(ctx, secret, &len) > 0;
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

static int run_once(EVP_PKEY *pkey, const op_input *in, const unsigned char *md)
{
    switch (in->op) {
    case OP_SIGN:
        return sign_once(pkey, md);
    case OP_DECRYPT:
        return decrypt_once(pkey, in);
    case OP_DERIVE:
        return derive_once(pkey, in);
    }
    return -1;
}

static void *run(void *arg)
{
    worker *w = arg;
    unsigned char md[32];
    token_error err = {0};
    EVP_PKEY *pkey;
    token_use use = w->in->op == OP_SIGN ? TOKEN_USE_SIGN : TOKEN_USE_DECRYPT;
    double end = now_s() + w->seconds;

    memset(md, 0x5a, sizeof(md));
    while (now_s() < end) {
        if (token_key_acquire(w->key, use, &pkey, &err) != 0) {
            w->failed = 1;
            break;
        }
        if (run_once(pkey, w->in, md) != 0)
            w->failed = 1;
        token_key_release(w->key);
        if (w->failed)
            break;
        w->count++;
    }
    return NULL;
}

static int parse_op(const char *name, op *out)
{
    if (strcmp(name, "sign") == 0)
        *out = OP_SIGN;
    else if (strcmp(name, "decrypt") == 0)
        *out = OP_DECRYPT;
    else if (strcmp(name, "derive") == 0)
        *out = OP_DERIVE;
    else
        return -1;
    return 0;
}

/* The public half of the work, done in software once: the RSA ciphertext
 * to decrypt or the ephemeral EC key to derive with. */
static int prepare_input(token_key *key, op_input *in)
{
    EVP_PKEY *pub = X509_get0_pubkey(token_key_cert0(key));
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char secret[32];
    char group[64];
    int ok = 0;

    switch (in->op) {
    case OP_SIGN:
        return 0;
    case OP_DECRYPT:
        memset(secret, 0xa5, sizeof(secret));
        in->wrapped_len = sizeof(in->wrapped);
        ctx = pub != NULL ? EVP_PKEY_CTX_new(pub, NULL) : NULL;
        ok = ctx != NULL && EVP_PKEY_encrypt_init(ctx) > 0 &&
             EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) > 0 &&
             EVP_PKEY_encrypt(ctx, in->wrapped, &in->wrapped_len, secret,
                              sizeof(secret)) > 0;
        break;
    case OP_DERIVE:
        ok = pub != NULL &&
             EVP_PKEY_get_group_name(pub, group, sizeof(group), NULL) > 0 &&
             (in->peer = EVP_PKEY_Q_keygen(NULL, NULL, "EC", group)) != NULL;
        break;
    }
    EVP_PKEY_CTX_free(ctx);
    return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
    config_problems problems = {0};
    config *cfg = NULL;
    token_set *tokens = NULL;
    token_error err = {0};
    token_key *key;
    const char *reason = NULL;
    op_input in = {0};
    worker *workers = NULL;
    pthread_t *tids = NULL;
    unsigned long total = 0;
    int i, nthreads, ret = 1;
    double seconds, cpu0;
    size_t t;

    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: p11bench CONFIG KEY THREADS SECONDS "
                        "[sign|decrypt|derive]\n");
        return 2;
    }
    if (parse_op(argc == 6 ? argv[5] : "sign", &in.op) != 0) {
        fprintf(stderr, "p11bench: unknown operation %s\n", argv[5]);
        return 2;
    }
    nthreads = atoi(argv[3]);
    seconds = atof(argv[4]);
    if (nthreads < 1 || nthreads > 64 || seconds <= 0) {
        fprintf(stderr, "p11bench: bad THREADS or SECONDS\n");
        return 2;
    }
    cfg = config_load(argv[1], &problems);
    if (cfg == NULL) {
        for (t = 0; t < problems.count; t++)
            fprintf(stderr, "%s\n", problems.lines[t]);
        goto out;
    }
    tokens = token_set_new();
    for (t = 0; tokens != NULL && t < cfg->ntokens; t++) {
        if (token_set_add(tokens, &cfg->tokens[t], &err) != 0) {
            fprintf(stderr, "p11bench: %s\n", err.message);
            goto out;
        }
    }
    key = tokens != NULL ? token_set_find_key(tokens, argv[2]) : NULL;
    if (key == NULL ||
        !token_key_usable(key,
                          in.op == OP_SIGN ? TOKEN_USE_SIGN : TOKEN_USE_DECRYPT,
                          &reason)) {
        fprintf(stderr, "p11bench: key %s is not usable: %s\n", argv[2],
                reason != NULL ? reason : "no such key");
        goto out;
    }
    if (prepare_input(key, &in) != 0) {
        fprintf(stderr, "p11bench: cannot prepare a %s input for %s\n",
                argc == 6 ? argv[5] : "sign", argv[2]);
        goto out;
    }
    workers = calloc((size_t)nthreads, sizeof(*workers));
    tids = calloc((size_t)nthreads, sizeof(*tids));
    if (workers == NULL || tids == NULL)
        goto out;
    /* CPU time per operation does not depend on what else runs on the
     * machine, as the rate does */
    cpu0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
    for (i = 0; i < nthreads; i++) {
        workers[i].key = key;
        workers[i].in = &in;
        workers[i].seconds = seconds;
        pthread_create(&tids[i], NULL, run, &workers[i]);
    }
    ret = 0;
    for (i = 0; i < nthreads; i++) {
        pthread_join(tids[i], NULL);
        total += workers[i].count;
        if (workers[i].failed)
            ret = 1;
    }
    printf("%s %s op=%s threads=%d operations=%lu rate=%.1f/s "
           "cpu_us_per_op=%.1f\n",
           argv[2], token_key_algorithm(key), argc == 6 ? argv[5] : "sign",
           nthreads, total, (double)total / seconds,
           total > 0 ? (clock_s(CLOCK_PROCESS_CPUTIME_ID) - cpu0) * 1e6 /
                           (double)total
                     : 0.0);
out:
    EVP_PKEY_free(in.peer);
    free(workers);
    free(tids);
    token_set_free(tokens);
    config_free(cfg);
    config_problems_clear(&problems);
    return ret;
}
