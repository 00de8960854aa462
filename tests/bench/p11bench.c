/*
 * p11bench: the token's own signing rate through libp11, the ceiling that
 * script/bench compares the daemon against. It opens the token exactly as
 * the daemon does (same config, same token/ code) and signs SHA-256 digests
 * from several threads for a fixed time, so the only difference left to the
 * daemon's figure is HTTP, JSON and CMS.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>

#include "service/config.h"
#include "token/token.h"

typedef struct worker {
    token_key *key;
    double seconds;
    unsigned long count;
    int failed;
} worker;

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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

static void *run(void *arg)
{
    worker *w = arg;
    unsigned char md[32];
    token_error err = {0};
    EVP_PKEY *pkey;
    double end = now_s() + w->seconds;

    memset(md, 0x5a, sizeof(md));
    while (now_s() < end) {
        if (token_key_acquire(w->key, TOKEN_USE_SIGN, &pkey, &err) != 0) {
            w->failed = 1;
            break;
        }
        if (sign_once(pkey, md) != 0)
            w->failed = 1;
        token_key_release(w->key);
        if (w->failed)
            break;
        w->count++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    config_problems problems = {0};
    config *cfg = NULL;
    token_set *tokens = NULL;
    token_error err = {0};
    token_key *key;
    const char *reason = NULL;
    worker *workers = NULL;
    pthread_t *tids = NULL;
    unsigned long total = 0;
    int i, nthreads, ret = 1;
    double seconds;
    size_t t;

    if (argc != 5) {
        fprintf(stderr, "usage: p11bench CONFIG KEY THREADS SECONDS\n");
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
    if (key == NULL || !token_key_usable(key, TOKEN_USE_SIGN, &reason)) {
        fprintf(stderr, "p11bench: key %s is not usable: %s\n", argv[2],
                reason != NULL ? reason : "no such key");
        goto out;
    }
    workers = calloc((size_t)nthreads, sizeof(*workers));
    tids = calloc((size_t)nthreads, sizeof(*tids));
    if (workers == NULL || tids == NULL)
        goto out;
    for (i = 0; i < nthreads; i++) {
        workers[i].key = key;
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
    printf("%s %s threads=%d signatures=%lu rate=%.1f/s\n", argv[2],
           token_key_algorithm(key), nthreads, total, (double)total / seconds);
out:
    free(workers);
    free(tids);
    token_set_free(tokens);
    config_free(cfg);
    config_problems_clear(&problems);
    return ret;
}
