/*
 * The request worker: HTTP (service/http.c), authentication, JSON, MIME
 * and CMS (api/ on the key process's directory). It has no PKCS#11 module
 * and no PIN: every private-key operation goes to the key process through
 * the rkey provider's EVP_PKEYs (rkey/client.h). It serves on the
 * listening socket the supervisor opened, takes a new key-protocol socket
 * when the key process is replaced, and on STOP stops accepting, finishes
 * the requests in flight and exits.
 */
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "api/api.h"
#include "cms/cms.h"
#include "rkey/client.h"
#include "rkey/rkey.h"
#include "service/budget.h"
#include "service/config.h"
#include "service/confine.h"
#include "service/harden.h"
#include "service/http.h"
#include "service/log.h"
#include "service/proc.h"
#include "service/shared.h"
#include "service/worker.h"

/* A call waits this long past the longest wait for a token session. */
#define CALL_MARGIN_MS 30000
/* How long STOP waits for requests in flight before giving up on them
 * (the supervisor's own grace is a little longer). */
#define SHUTDOWN_TIMEOUT_MS 30000

static unsigned call_timeout(const config *cfg)
{
    unsigned longest = 5000;
    size_t i;

    for (i = 0; i < cfg->ntokens; i++)
        if (cfg->tokens[i].wait_ms > 0 &&
            (unsigned)cfg->tokens[i].wait_ms > longest)
            longest = (unsigned)cfg->tokens[i].wait_ms;
    return longest + CALL_MARGIN_MS;
}

static void log_directory(rkey_client *c)
{
    rkey_failure f = {0};
    rkey_dir *d = rkey_dir_get1(c, &f);

    if (d == NULL) {
        log_warn("worker %d: no key directory: %s (%s)", (int)getpid(),
                 f.message, proto_status_name(f.status));
        return;
    }
    log_info("worker %d: %zu keys on %zu tokens from the key process",
             (int)getpid(), rkey_dir_count_keys(d), rkey_dir_count_tokens(d));
    rkey_dir_free(d);
}

/* The shared region at PROC_FD_SHARED, as the slot the supervisor's
 * first message names; the descriptor is closed either way (the mapping
 * is all a worker needs). */
static shared *attach_region(void)
{
    char errbuf[256];
    shared *region = NULL;
    proc_ctl m;
    int fd, r;

    do
        r = proc_ctl_recv(PROC_FD_CONTROL, &m, &fd);
    while (r < 0 && errno == EINTR);
    if (fd >= 0)
        close(fd);
    if (r <= 0 || m.type != PROC_CTL_SHARED_SLOT)
        snprintf(errbuf, sizeof(errbuf),
                 "the supervisor did not name a slot of the shared region");
    else
        region = shared_attach(PROC_FD_SHARED, m.arg, errbuf, sizeof(errbuf));
    close(PROC_FD_SHARED);
    if (region == NULL)
        log_error("worker %d: %s", (int)getpid(), errbuf);
    return region;
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

static http_server *serve(const config *cfg, const char *listen, api *a,
                          rkey_client *keys, budget *body_budget,
                          shared *region, const http_tls *tls)
{
    http_options hopts;
    http_server *srv;
    char errbuf[256];

    memset(&hopts, 0, sizeof(hopts));
    hopts.listen = listen;
    hopts.listen_fd = PROC_FD_LISTEN;
    hopts.max_body_bytes = cfg->max_body_bytes;
    hopts.max_connections = cfg->max_connections;
    hopts.max_connections_per_ip = cfg->max_connections_per_ip;
    hopts.timeout_s = cfg->request_timeout_s;
    hopts.header_timeout_s = cfg->header_timeout_s;
    hopts.budget = body_budget;
    hopts.region = region;
    hopts.tls = cfg->tls_certificate != NULL ? tls : NULL;
    srv = http_start(&hopts, a, keys, errbuf, sizeof(errbuf));
    if (srv == NULL)
        log_error("%s", errbuf);
    return srv;
}

int worker_main(const char *config_path, const char *listen)
{
    config_problems problems = {0};
    rkey_client *client = NULL;
    confine_error cerr = {0};
    char confinement[512], errbuf[256];
    http_tls tls = {0};
    budget *body_budget = NULL;
    shared *region = NULL;
    http_server *srv = NULL;
    rkey_error rerr = {0};
    api *a = NULL;
    config *cfg;
    proc_ctl m;
    size_t i;
    unsigned left;
    int fd, r, ret = 1;

    prctl(PR_SET_NAME, PROC_NAME_WORKER, 0, 0, 0);
    /* a client hanging up mid-response must not kill the worker */
    signal(SIGPIPE, SIG_IGN);
    cfg = config_load_without_pins(config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    config_problems_clear(&problems);
    if (cfg == NULL)
        return 1;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        log_error("cannot open log file %s; logging to stderr", cfg->log_file);
    region = attach_region();
    if (region == NULL)
        goto out;
    if (listen == NULL)
        listen = cfg->listen;
    if (harden_raise_nofile(cfg->max_connections + 256) <
        cfg->max_connections + 16)
        log_warn("the open-file limit is below max_connections (%u)",
                 cfg->max_connections);
    keep_large_buffers();
    cms_init();
    /* before any thread of ours uses OpenSSL */
    if (rkey_provider_init(&rerr) != 0) {
        log_error("the key provider: %s", rerr.message);
        goto out;
    }
    if (cfg->tls_certificate != NULL &&
        http_tls_read(&tls, cfg->tls_certificate, cfg->tls_key,
                      cfg->tls_client_ca, errbuf, sizeof(errbuf)) != 0) {
        log_error("%s", errbuf);
        goto out;
    }
    /* before the client's reader thread (Landlock holds only the threads
     * started after it), after the files only root may read */
    r = confine_process(cfg, confinement, sizeof(confinement), &cerr);
    if (r < 0) {
        log_error("worker %d: %s", (int)getpid(), cerr.message);
        goto out;
    }
    if (r > 0)
        log_warn("worker %d confined: %s", (int)getpid(), confinement);
    else
        log_info("worker %d confined: %s", (int)getpid(), confinement);
    client = rkey_client_new(PROC_FD_KEY, call_timeout(cfg));
    a = client != NULL ? api_new(client, cfg->trust, cfg->trust_dir, cfg->crls)
                       : NULL;
    if (a == NULL) {
        log_error("out of memory");
        goto out;
    }
    api_set_clients(a, cfg->clients, cfg->nclients);
    /* the daemon's budget, in the shared region */
    body_budget = budget_new(region);
    if (body_budget == NULL) {
        log_error("out of memory");
        goto out;
    }
    log_directory(client);
    srv = serve(cfg, listen, a, client, body_budget, region, &tls);
    http_tls_clear(&tls);
    if (srv == NULL)
        goto out;
    log_info("worker %d serving %s", (int)getpid(), listen);
    proc_ctl_send(PROC_FD_CONTROL, PROC_CTL_READY, 0, NULL, 0, -1);
    for (;;) {
        r = proc_ctl_recv(PROC_FD_CONTROL, &m, &fd);
        if (r < 0 && (errno == EINTR || errno == EPROTO))
            continue;
        if (r <= 0 || m.type == PROC_CTL_STOP)
            break;
        if (m.type == PROC_CTL_REOPEN && fd >= 0) {
            log_take_fd(fd);
            fd = -1;
        }
        if (m.type == PROC_CTL_KEY_SOCKET && fd >= 0) {
            rkey_client_set_socket(client, fd);
            fd = -1;
            log_directory(client);
        }
        if (fd >= 0)
            close(fd);
    }
    if (fd >= 0)
        close(fd);
    left = http_shutdown(srv, SHUTDOWN_TIMEOUT_MS);
    srv = NULL;
    if (left > 0) {
        log_error("worker %d: %u requests still running after %d ms",
                  (int)getpid(), left, SHUTDOWN_TIMEOUT_MS);
        goto out;
    }
    ret = 0;
out:
    http_tls_clear(&tls);
    budget_free(body_budget);
    api_free(a);
    rkey_client_free(client);
    shared_free(region);
    config_free(cfg);
    log_close();
    return ret;
}
