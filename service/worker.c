/*
 * The request worker. What it does so far is the part of its life that
 * does not need the OpenSSL provider: it connects to the key process,
 * reads the key directory, tells the supervisor it is ready, takes a new
 * key-protocol socket when the key process is replaced, and stops when
 * told. The HTTP front end (service/http.c with api/ on rkey_dir) moves in
 * here once the provider gives cms/ an EVP_PKEY whose private operations
 * go to the key process.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "rkey/client.h"
#include "service/config.h"
#include "service/confine.h"
#include "service/log.h"
#include "service/proc.h"
#include "service/worker.h"

/* A call waits this long past the longest wait for a token session. */
#define CALL_MARGIN_MS 30000

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

int worker_main(const char *config_path)
{
    config_problems problems = {0};
    rkey_client *client = NULL;
    confine_error cerr = {0};
    char confinement[512];
    config *cfg;
    proc_ctl m;
    size_t i;
    int fd, r, ret = 1;

    prctl(PR_SET_NAME, PROC_NAME_WORKER, 0, 0, 0);
    signal(SIGPIPE, SIG_IGN);
    cfg = config_load_without_pins(config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    config_problems_clear(&problems);
    if (cfg == NULL)
        return 1;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        log_error("cannot open log file %s; logging to stderr", cfg->log_file);
    /* before the client's reader thread: Landlock holds only the threads
     * started after it */
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
    if (client == NULL) {
        log_error("out of memory");
        goto out;
    }
    log_directory(client);
    proc_ctl_send(PROC_FD_CONTROL, PROC_CTL_READY, 0, NULL, 0, -1);
    for (;;) {
        r = proc_ctl_recv(PROC_FD_CONTROL, &m, &fd);
        if (r < 0 && (errno == EINTR || errno == EPROTO))
            continue;
        if (r <= 0 || m.type == PROC_CTL_STOP)
            break;
        if (m.type == PROC_CTL_REOPEN && log_reopen() != 0)
            log_error("cannot reopen the log file");
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
    ret = 0;
out:
    rkey_client_free(client);
    config_free(cfg);
    return ret;
}
