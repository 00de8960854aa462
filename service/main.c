/*
 * smimed: process life. Signals are blocked in every thread and taken
 * synchronously here with sigwait, so no handler ever runs inside a token
 * module or the allocator.
 */
#include <getopt.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <config.h> /* generated: version */
#include "api/api.h"
#include "cms/cms.h"
#include "service/config.h"
#include "service/http.h"
#include "service/log.h"
#include "token/token.h"

/* How long SIGTERM waits for requests in flight before giving up on them. */
#define SHUTDOWN_TIMEOUT_MS 30000

static void usage(FILE *f)
{
    fprintf(f, "usage: smimed --config FILE [--listen HOST:PORT] "
               "[--check-config]\n"
               "       smimed --help | --version\n"
               "\n"
               "  -c, --config FILE     JSON configuration (see README.md)\n"
               "  -l, --listen H:P      override the listen address "
               "(port 0: any free port)\n"
               "      --check-config    check FILE, print every problem, exit\n"
               "  -h, --help            this text\n"
               "  -V, --version         print the version\n");
}

static int print_problems(const config_problems *p)
{
    size_t i;

    for (i = 0; i < p->count; i++)
        fprintf(stderr, "%s\n", p->lines[i]);
    return p->count > 0;
}

static void log_keys(token_set *tokens)
{
    size_t i;

    for (i = 0; i < token_set_count_tokens(tokens); i++) {
        const char *reason = NULL;

        if (token_set_token_ready(tokens, i, &reason))
            log_info("token %s ready", token_set_token_name(tokens, i));
        else
            log_warn("token %s down: %s", token_set_token_name(tokens, i),
                     reason != NULL ? reason : "unknown");
    }
    for (i = 0; i < token_set_count_keys(tokens); i++) {
        token_key *key = token_set_key_at(tokens, i);
        const char *reason = NULL;

        if (token_key_usable(key, TOKEN_USE_SIGN, &reason))
            log_info("key %s (%s) on %s usable", token_key_name(key),
                     token_key_algorithm(key), token_key_token_name(key));
        else
            log_warn("key %s on %s not usable: %s", token_key_name(key),
                     token_key_token_name(key),
                     reason != NULL ? reason : "unknown");
    }
}

static token_set *open_tokens(const config *cfg)
{
    token_set *tokens = token_set_new();
    token_error err = {0};
    size_t i;

    if (tokens == NULL) {
        log_error("out of memory");
        return NULL;
    }
    for (i = 0; i < cfg->ntokens; i++) {
        if (token_set_add(tokens, &cfg->tokens[i], &err) != 0) {
            log_error("tokens[%zu]: %s", i, err.message);
            token_set_free(tokens);
            return NULL;
        }
    }
    log_keys(tokens);
    return tokens;
}

/* What a reload replaces; the listening socket and its limits stay. */
typedef struct running {
    const char *config_path;
    config *cfg;
    token_set *tokens;
    api *api;
} running;

/* 1 when a token that serves now would be down after the swap: a reload
 * must not take away what works (a PIN typo, a token busy elsewhere). */
static int loses_token(token_set *now, token_set *next)
{
    const char *reason = NULL;
    size_t i, j;

    for (i = 0; i < token_set_count_tokens(next); i++) {
        if (token_set_token_ready(next, i, &reason))
            continue;
        for (j = 0; j < token_set_count_tokens(now); j++) {
            if (strcmp(token_set_token_name(now, j),
                       token_set_token_name(next, i)) == 0 &&
                token_set_token_ready(now, j, NULL)) {
                log_error("token %s would go down: %s",
                          token_set_token_name(next, i),
                          reason != NULL ? reason : "unknown reason");
                return 1;
            }
        }
    }
    return 0;
}

/* Checks the new config completely and opens its tokens before swapping it
 * in; on any problem the running one stays (OpenDKIM's reload habit). */
static void reload(running *run, http_server *srv)
{
    config_problems problems = {0};
    config *cfg = NULL;
    token_set *tokens = NULL;
    api *a = NULL, *old;
    size_t i;

    cfg = config_load(run->config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    if (cfg == NULL)
        goto fail;
    tokens = open_tokens(cfg);
    if (tokens == NULL || loses_token(run->tokens, tokens))
        goto fail;
    a = api_new(tokens, cfg->trust, cfg->trust_dir, cfg->crls);
    if (a == NULL)
        goto fail;
    if (strcmp(cfg->listen, run->cfg->listen) != 0 ||
        cfg->max_body_bytes != run->cfg->max_body_bytes ||
        cfg->max_connections != run->cfg->max_connections ||
        cfg->request_timeout_s != run->cfg->request_timeout_s)
        log_warn("listen, max_body_bytes, max_connections and "
                 "request_timeout_s take effect on restart only");
    switch (http_set_api(srv, a, SHUTDOWN_TIMEOUT_MS, &old)) {
    case -1:
        goto fail;
    case 1:
        /* freeing tokens under a request stuck in a module would crash */
        log_error("requests still use the previous configuration after %d "
                  "ms; it stays allocated",
                  SHUTDOWN_TIMEOUT_MS);
        break;
    default:
        api_free(old);
        token_set_free(run->tokens);
        config_free(run->cfg);
    }
    run->cfg = cfg;
    run->tokens = tokens;
    run->api = a;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        log_error("cannot open log file %s", cfg->log_file);
    log_info("configuration %s in service", run->config_path);
    config_problems_clear(&problems);
    return;
fail:
    log_error("keeping the running configuration");
    api_free(a);
    token_set_free(tokens);
    config_free(cfg);
    config_problems_clear(&problems);
}

/* Serves until SIGTERM or SIGINT; returns the exit status. */
static int serve(http_server *srv, running *run, const sigset_t *sigs)
{
    unsigned left;
    int sig;

    for (;;) {
        if (sigwait(sigs, &sig) != 0)
            continue;
        if (sig == SIGUSR1) {
            if (log_reopen() != 0)
                log_error("cannot reopen the log file");
            else
                log_info("log file reopened");
            continue;
        }
        if (sig == SIGHUP) {
            reload(run, srv);
            continue;
        }
        break;
    }
    log_info("signal %d: finishing requests in flight", sig);
    left = http_shutdown(srv, SHUTDOWN_TIMEOUT_MS);
    if (left > 0) {
        log_error("%u requests still running after %d ms", left,
                  SHUTDOWN_TIMEOUT_MS);
        return 1;
    }
    log_info("stopped");
    return 0;
}

/*
 * A large request (a 10 MiB message) allocates a few buffers its size.
 * glibc would map each afresh and unmap (or trim) it when freed, so the
 * next such request page-faults all of it again: that was more than half
 * of a 10 MiB signature's CPU (script/bench). Buffers up to 32 MiB (the
 * most glibc allows) come from the heap instead, and up to 32 MiB of freed
 * memory stays with each malloc arena for the next request: resident
 * memory after large requests stays near their peak rather than dropping
 * back to idle.
 */
static void keep_large_buffers(void)
{
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 32 << 20);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"check-config", no_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *listen = NULL;
    config_problems problems = {0};
    running run = {0};
    http_server *srv = NULL;
    http_options hopts;
    sigset_t sigs;
    char errbuf[256];
    int opt, check_only = 0, ret = 1;

    while ((opt = getopt_long(argc, argv, "c:l:hV", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'l':
            listen = optarg;
            break;
        case 'k':
            check_only = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("%s %s\n", SMIMED_NAME, SMIMED_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (config_path == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }
    run.config_path = config_path;
    run.cfg = config_load(config_path, &problems);
    if (print_problems(&problems) || run.cfg == NULL)
        goto out;
    if (check_only) {
        printf("%s: OK\n", config_path);
        ret = 0;
        goto out;
    }
    if (log_open(run.cfg->log_file, run.cfg->log_level) != 0)
        fprintf(stderr, "cannot open log file %s; logging to stderr\n",
                run.cfg->log_file);

    /* before any thread exists, so every thread inherits the mask */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    /* a client hanging up mid-response must not kill the daemon */
    signal(SIGPIPE, SIG_IGN);

    keep_large_buffers();
    cms_init();
    run.tokens = open_tokens(run.cfg);
    if (run.tokens == NULL)
        goto out;
    run.api =
        api_new(run.tokens, run.cfg->trust, run.cfg->trust_dir, run.cfg->crls);
    if (run.api == NULL) {
        log_error("out of memory");
        goto out;
    }
    hopts.listen = listen != NULL ? listen : run.cfg->listen;
    hopts.max_body_bytes = run.cfg->max_body_bytes;
    hopts.max_connections = run.cfg->max_connections;
    hopts.timeout_s = run.cfg->request_timeout_s;
    srv = http_start(&hopts, run.api, errbuf, sizeof(errbuf));
    if (srv == NULL) {
        log_error("%s", errbuf);
        goto out;
    }
    log_info("%s %s listening on %s (port %u)", SMIMED_NAME, SMIMED_VERSION,
             hopts.listen, http_port(srv));
    ret = serve(srv, &run, &sigs);
out:
    api_free(run.api);
    token_set_free(run.tokens);
    config_free(run.cfg);
    config_problems_clear(&problems);
    log_close();
    return ret;
}
