/*
 * smimed: process life. Signals are blocked in every thread and taken
 * synchronously here with sigwait, so no handler ever runs inside a token
 * module or the allocator.
 */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <openssl/crypto.h>

#include <config.h> /* generated: version */
#include "api/api.h"
#include "cms/cms.h"
#include "service/audit.h"
#include "service/budget.h"
#include "service/config.h"
#include "service/harden.h"
#include "service/http.h"
#include "service/keyset.h"
#include "service/keyd.h"
#include "service/log.h"
#include "service/metrics.h"
#include "service/proc.h"
#include "service/shared.h"
#include "service/worker.h"
#include "token/token.h"

/* How long SIGTERM waits for requests in flight before giving up on them. */
#define SHUTDOWN_TIMEOUT_MS 30000

static void usage(FILE *f)
{
    fprintf(f, "usage: smimed --config FILE [--listen HOST:PORT] "
               "[--check-config]\n"
               "       smimed --hash-token < TOKEN\n"
               "       smimed --help | --version\n"
               "\n"
               "  -c, --config FILE     JSON configuration (see README.md)\n"
               "  -l, --listen H:P      override the listen address "
               "(port 0: any free port)\n"
               "      --check-config    check FILE, print every problem, exit\n"
               "      --hash-token      read a client token on stdin, print "
               "its config line\n"
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

/* A client token: random, at least this long (a guessable token is a
 * password, and these are checked without any rate limit). */
#define TOKEN_MIN_LEN 16
#define TOKEN_MAX_LEN 4096

/* smimed --hash-token: the token on stdin (one line), its config line on
 * stdout; the token never appears in argv or in the config. */
static int hash_token(void)
{
    char buf[TOKEN_MAX_LEN + 2];
    unsigned char d[API_TOKEN_SHA256_LEN];
    size_t len = fread(buf, 1, sizeof(buf), stdin), i;
    int ret = 1;

    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    if (len > TOKEN_MAX_LEN || memchr(buf, '\n', len) != NULL) {
        fprintf(stderr,
                "smimed: the token must be one line of at most %d bytes\n",
                TOKEN_MAX_LEN);
    } else if (len < TOKEN_MIN_LEN) {
        fprintf(stderr,
                "smimed: the token is shorter than %d bytes; use a random "
                "one (openssl rand -hex 32)\n",
                TOKEN_MIN_LEN);
    } else if (api_hash_token(buf, len, d) != 0) {
        fprintf(stderr, "smimed: cannot compute SHA-256\n");
    } else {
        printf("\"token_sha256\": \"");
        for (i = 0; i < sizeof(d); i++)
            printf("%02x", d[i]);
        printf("\"\n");
        ret = 0;
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    return ret;
}

/* Nobody but the host may reach an unauthenticated daemon, unless the
 * operator wrote a setting that says it is insecure. */
static int check_exposure(const config *cfg, const char *listen)
{
    if (cfg->nclients > 0 || http_listen_is_loopback(listen))
        return 0;
    if (cfg->allow_insecure_unauthenticated_listen) {
        log_warn("listening on %s without client authentication "
                 "(allow_insecure_unauthenticated_listen): anyone who reaches "
                 "it can use every key",
                 listen);
        return 0;
    }
    log_error("refusing to listen on %s, which is not a loopback address, "
              "without client authentication: configure \"clients\" (or set "
              "\"allow_insecure_unauthenticated_listen\": true)",
              listen);
    return -1;
}

/* The audit trail follows the config; failing to open it is fatal at
 * start and keeps the old trail on reload. stage: open it aside, for
 * audit_swap once the new configuration is accepted. */
static int open_audit(const config *cfg, int stage)
{
    if ((stage ? audit_stage(cfg->audit_log) : audit_open(cfg->audit_log)) == 0)
        return 0;
    log_error("cannot open the audit log %s: %s", cfg->audit_log,
              strerror(errno));
    return -1;
}

static api *api_for(const config *cfg, token_set *tokens)
{
    api *a = api_new(tokens, cfg->trust, cfg->trust_dir, cfg->crls);

    if (a != NULL)
        api_set_clients(a, cfg->clients, cfg->nclients);
    return a;
}

/* What a reload replaces; the listening socket and its limits stay. */
typedef struct running {
    const char *listen;
    const char *config_path;
    config *cfg;
    token_set *tokens;
    api *api;
} running;

/* Checks the new config completely and opens its tokens before swapping it
 * in; on any problem the running one stays (OpenDKIM's reload habit). */
static void reload(running *run, http_server *srv)
{
    config_problems problems = {0};
    config *cfg = NULL;
    token_set *tokens = NULL;
    api *a = NULL, *old;
    int new_audit;
    size_t i;

    cfg = config_load(run->config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    if (cfg == NULL || check_exposure(cfg, run->listen) != 0)
        goto fail;
    new_audit = (cfg->audit_log == NULL) != (run->cfg->audit_log == NULL) ||
                (cfg->audit_log != NULL &&
                 strcmp(cfg->audit_log, run->cfg->audit_log) != 0);
    if (new_audit && open_audit(cfg, 1) != 0)
        goto fail;
    tokens = keyset_open(cfg);
    if (tokens == NULL || keyset_loses_token(run->tokens, tokens))
        goto fail;
    a = api_for(cfg, tokens);
    if (a == NULL)
        goto fail;
    if (strcmp(cfg->listen, run->cfg->listen) != 0 ||
        cfg->max_body_bytes != run->cfg->max_body_bytes ||
        cfg->max_connections != run->cfg->max_connections ||
        cfg->max_connections_per_ip != run->cfg->max_connections_per_ip ||
        cfg->request_timeout_s != run->cfg->request_timeout_s ||
        cfg->header_timeout_s != run->cfg->header_timeout_s ||
        cfg->max_inflight_body_bytes != run->cfg->max_inflight_body_bytes ||
        (cfg->tls_certificate != NULL) != (run->cfg->tls_certificate != NULL))
        log_warn("listen, tls, max_body_bytes, max_inflight_body_bytes, "
                 "max_connections, max_connections_per_ip, request_timeout_s "
                 "and header_timeout_s take effect on restart only");
    /* accepted: requests on the new configuration write the new trail */
    if (new_audit)
        audit_swap();
    switch (http_set_api(srv, a, SHUTDOWN_TIMEOUT_MS, &old)) {
    case -1:
        if (new_audit)
            audit_swap();
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
    audit_discard();
    run->cfg = cfg;
    run->tokens = tokens;
    run->api = a;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        log_error("cannot open log file %s", cfg->log_file);
    log_info("configuration %s in service", run->config_path);
    config_problems_clear(&problems);
    return;
fail:
    audit_discard();
    log_error("keeping the running configuration");
    api_free(a);
    token_set_free(tokens);
    config_free(cfg);
    config_problems_clear(&problems);
}

/* A token that was absent at the last load answers now: a reload opens it
 * with its keys. SIGHUP reaches the thread in sigwait, which reloads as
 * for an operator's signal. */
static void on_token_present(const char *token)
{
    log_info("token %s answers now: reloading the configuration to open it",
             token);
    kill(getpid(), SIGHUP);
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
            if (audit_reopen() != 0)
                log_error("cannot reopen the audit log: %s; still writing "
                          "the old file",
                          strerror(errno));
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

/* The process tree of the process wall (service/proc.h): the supervisor
 * (which checks the configuration as the daemon does, then starts the
 * children), or one of its children. */
static int run_role(const char *role, const char *config_path,
                    const char *listen)
{
    config_problems problems = {0};
    config *cfg;

    if (strcmp(role, PROC_ROLE_KEY + strlen("--role=")) == 0)
        return keyd_main(config_path);
    if (strcmp(role, PROC_ROLE_WORKER + strlen("--role=")) == 0)
        return worker_main(config_path);
    if (strcmp(role, PROC_ROLE_SUPERVISOR + strlen("--role=")) != 0) {
        usage(stderr);
        return 2;
    }
    cfg = config_load(config_path, &problems);
    if (print_problems(&problems) || cfg == NULL) {
        config_problems_clear(&problems);
        config_free(cfg);
        return 1;
    }
    config_problems_clear(&problems);
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        fprintf(stderr, "cannot open log file %s; logging to stderr\n",
                cfg->log_file);
    if (check_exposure(cfg, listen != NULL ? listen : cfg->listen) != 0) {
        config_free(cfg);
        return 1;
    }
    return proc_supervise(config_path, listen, cfg);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"check-config", no_argument, NULL, 'k'},
        {"hash-token", no_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        /* hidden: what the supervisor starts its children with */
        {"role", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *listen = NULL, *role = NULL;
    config_problems problems = {0};
    running run = {0};
    http_server *srv = NULL;
    budget *body_budget = NULL;
    shared *region = NULL, *self = NULL;
    shared_options sopts;
    http_options hopts;
    token_error terr = {0};
    sigset_t sigs;
    char errbuf[256];
    int opt, check_only = 0, hash_only = 0, ret = 1;

    if (harden_process(errbuf, sizeof(errbuf)) != 0) {
        fprintf(stderr, "smimed: %s\n", errbuf);
        return 1;
    }

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
        case 't':
            hash_only = 1;
            break;
        case 'r':
            role = optarg;
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
    if (hash_only && config_path == NULL && optind == argc)
        return hash_token();
    if (config_path == NULL || optind != argc || hash_only ||
        (role != NULL && check_only)) {
        usage(stderr);
        return 2;
    }
    if (role != NULL)
        return run_role(role, config_path, listen);
    run.config_path = config_path;
    run.cfg = config_load(config_path, &problems);
    if (run.cfg != NULL)
        run.listen = listen != NULL ? listen : run.cfg->listen;
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

    if (check_exposure(run.cfg, run.listen) != 0 || open_audit(run.cfg, 0) != 0)
        goto out;
    if (harden_raise_nofile(run.cfg->max_connections + 256) <
        run.cfg->max_connections + 16)
        log_warn("the open-file limit is below max_connections (%u)",
                 run.cfg->max_connections);
    keep_large_buffers();
    cms_init();
    run.tokens = keyset_open(run.cfg);
    if (run.tokens == NULL)
        goto out;
    if (token_recovery_start(keyset_log_event, on_token_present, &terr) != 0) {
        log_error("%s", terr.message);
        goto out;
    }
    run.api = api_for(run.cfg, run.tokens);
    if (run.api == NULL) {
        log_error("out of memory");
        goto out;
    }
    /* one process: a region of its own, written as its only slot */
    sopts.slots = 1;
    sopts.max_connections = run.cfg->max_connections;
    sopts.body_limit = run.cfg->max_inflight_body_bytes;
    sopts.area_bytes = metrics_area_size();
    region = shared_create(&sopts, errbuf, sizeof(errbuf));
    if (region != NULL)
        self =
            shared_attach(shared_fd(region), (unsigned)shared_slot_take(region),
                          errbuf, sizeof(errbuf));
    if (self == NULL) {
        log_error("%s", errbuf);
        goto out;
    }
    body_budget = budget_new(self);
    if (body_budget == NULL) {
        log_error("out of memory");
        goto out;
    }
    memset(&hopts, 0, sizeof(hopts));
    hopts.listen = run.listen;
    hopts.max_body_bytes = run.cfg->max_body_bytes;
    hopts.max_connections = run.cfg->max_connections;
    hopts.max_connections_per_ip = run.cfg->max_connections_per_ip;
    hopts.timeout_s = run.cfg->request_timeout_s;
    hopts.header_timeout_s = run.cfg->header_timeout_s;
    hopts.budget = body_budget;
    hopts.region = self;
    hopts.tls_certificate = run.cfg->tls_certificate;
    hopts.tls_key = run.cfg->tls_key;
    hopts.tls_client_ca = run.cfg->tls_client_ca;
    if (run.cfg->nclients > 0 && run.cfg->tls_certificate == NULL &&
        !http_listen_is_loopback(run.listen))
        log_warn("bearer tokens travel in clear on %s: configure \"tls\"",
                 run.listen);
    srv = http_start(&hopts, run.api, errbuf, sizeof(errbuf));
    if (srv == NULL) {
        log_error("%s", errbuf);
        goto out;
    }
    log_info("%s %s listening on %s (port %u)%s%s", SMIMED_NAME, SMIMED_VERSION,
             hopts.listen, http_port(srv),
             hopts.tls_certificate != NULL ? " with TLS" : "",
             run.cfg->nclients > 0 ? ", client authentication on" : "");
    ret = serve(srv, &run, &sigs);
out:
    token_recovery_stop();
    budget_free(body_budget);
    shared_free(self);
    shared_free(region);
    api_free(run.api);
    token_set_free(run.tokens);
    config_free(run.cfg);
    config_problems_clear(&problems);
    audit_close();
    log_close();
    return ret;
}
