/*
 * The supervisor and the control channel. The supervisor has no thread
 * but its main one: PR_SET_PDEATHSIG fires when the thread that forked a
 * child ends, and signals, child deaths and control messages all arrive
 * through one poll (a signalfd for the signals).
 *
 * A child is started with fork and exec of /proc/self/exe: between the
 * two only async-signal-safe calls (prctl, getppid, dup2, fcntl,
 * close_range, execve); its argument vector and environment are built
 * before the fork. The environment is the supervisor's without any
 * pin_env variable: those PINs were moved into the supervisor's locked
 * memory (token_pin_read_env; the page is MADV_DONTFORK) and reach the
 * key process over its control socket only.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "service/log.h"
#include "service/metrics.h"
#include "service/proc.h"
#include "service/shared.h"
#include "token/token.h"

extern char **environ;

/* ---- the control channel ---- */

#define CTL_HEADER 8

int proc_ctl_send(int fd, unsigned type, uint32_t arg, const void *data,
                  size_t len, int pass_fd)
{
    unsigned char buf[CTL_HEADER + PROC_CTL_DATA_MAX];
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof(int))];
    } cm;
    struct iovec iov;
    struct msghdr mh;
    ssize_t n;

    if (len > PROC_CTL_DATA_MAX) {
        errno = EMSGSIZE;
        return -1;
    }
    buf[0] = (unsigned char)(type >> 8);
    buf[1] = (unsigned char)type;
    buf[2] = (unsigned char)(len >> 8);
    buf[3] = (unsigned char)len;
    buf[4] = (unsigned char)(arg >> 24);
    buf[5] = (unsigned char)(arg >> 16);
    buf[6] = (unsigned char)(arg >> 8);
    buf[7] = (unsigned char)arg;
    if (len > 0)
        memcpy(buf + CTL_HEADER, data, len);
    iov.iov_base = buf;
    iov.iov_len = CTL_HEADER + len;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pass_fd >= 0) {
        memset(&cm, 0, sizeof(cm));
        mh.msg_control = cm.space;
        mh.msg_controllen = sizeof(cm.space);
        cm.h.cmsg_level = SOL_SOCKET;
        cm.h.cmsg_type = SCM_RIGHTS;
        cm.h.cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(&cm.h), &pass_fd, sizeof(int));
    }
    do
        n = sendmsg(fd, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    OPENSSL_cleanse(buf, sizeof(buf)); /* a PIN may have been in it */
    return n == (ssize_t)(CTL_HEADER + len) ? 0 : -1;
}

int proc_ctl_recv(int fd, proc_ctl *msg, int *got_fd)
{
    unsigned char buf[CTL_HEADER + PROC_CTL_DATA_MAX + 1];
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } cm;
    struct cmsghdr *h;
    struct iovec iov = {buf, sizeof(buf)};
    struct msghdr mh;
    size_t i, nfds;
    ssize_t n;
    int r = 1, one;

    *got_fd = -1;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cm.space;
    mh.msg_controllen = sizeof(cm.space);
    do
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return (int)n;
    for (h = CMSG_FIRSTHDR(&mh); h != NULL; h = CMSG_NXTHDR(&mh, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        nfds = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (i = 0; i < nfds; i++) {
            memcpy(&one, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
            if (*got_fd < 0)
                *got_fd = one;
            else
                close(one);
        }
    }
    memset(msg, 0, sizeof(*msg));
    if (n < CTL_HEADER || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        r = -1;
    } else {
        msg->type = (unsigned)buf[0] << 8 | buf[1];
        msg->len = (size_t)buf[2] << 8 | buf[3];
        msg->arg = (uint32_t)buf[4] << 24 | (uint32_t)buf[5] << 16 |
                   (uint32_t)buf[6] << 8 | buf[7];
        if (msg->len != (size_t)n - CTL_HEADER)
            r = -1;
        else
            memcpy(msg->data, buf + CTL_HEADER, msg->len);
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    if (r < 0) {
        if (*got_fd >= 0)
            close(*got_fd);
        *got_fd = -1;
        memset(msg, 0, sizeof(*msg));
        errno = EPROTO;
    }
    return r;
}

/* ---- children ---- */

/* 5 deaths in 60 s, and a child waits before it is started again: 1 s,
 * doubling to 30 s. */
#define DEATHS 5
#define DEATH_WINDOW_S 60
#define BACKOFF_MAX_S 30
/* SIGTERM: how long workers and then the key process get to finish. */
#define STOP_GRACE_S 35
/* Workers start once the key process has its tokens open, or after this
 * long whatever it is doing. */
#define KEY_READY_WAIT_S 60

typedef enum { ROLE_KEY, ROLE_WORKER } child_role;

typedef struct child {
    child_role role;
    unsigned slot;   /* a worker's number, 0 to workers - 1 */
    int region_slot; /* a worker's slot of the shared region, -1: none */
    pid_t pid;       /* 0 when not running */
    int control;     /* the supervisor's end, -1 when not running */
    int ready;       /* said PROC_CTL_READY */
    int retiring;    /* told to stop, not to be started again */
    int quiesced;    /* said PROC_CTL_QUIESCED: accepts no more */
    time_t deaths[DEATHS];
    unsigned ndeaths;
    struct timespec restart_at; /* when not running and not retiring */
} child;

typedef struct super {
    const char *config_path;
    const char *listen;
    int listen_fd; /* -1 once the workers were told to stop */
    config *cfg;
    char **envp;
    child key;
    /* the workers of the configuration in service, and those of an
     * earlier one still draining (retiring) */
    child *workers;
    unsigned nworkers, cap;
    unsigned next_slot;
    shared *region; /* what the workers share: limits and numbers */
    int stopping;
    struct timespec key_started, stop_deadline;
    int key_reload_pending;
    /* the configuration the key process is loading (the one checked here),
     * in service once it answers that its tokens serve */
    config *pending_cfg;
    int reload_again; /* a SIGHUP came while one was pending */
    /* reloads that took: "in service" is said for each once no old worker
     * accepts */
    unsigned announce_pending;
} super;

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void at_in(struct timespec *t, double s)
{
    double when = now_s() + s;

    t->tv_sec = (time_t)when;
    t->tv_nsec = (long)((when - (double)t->tv_sec) * 1e9);
}

static double left_s(const struct timespec *t)
{
    return (double)t->tv_sec + (double)t->tv_nsec / 1e9 - now_s();
}

static int is_pin_env(const config *cfg, const char *entry)
{
    size_t i, n;

    for (i = 0; i < cfg->ntokens; i++) {
        const char *name = cfg->tokens[i].pin_env;

        if (name == NULL)
            continue;
        n = strlen(name);
        if (strncmp(entry, name, n) == 0 && entry[n] == '=')
            return 1;
    }
    return 0;
}

/* The supervisor's environment without the pin_env variables. */
static char **child_environment(const config *cfg)
{
    size_t n = 0, i, j = 0;
    char **envp;

    while (environ[n] != NULL)
        n++;
    envp = calloc(n + 1, sizeof(*envp));
    if (envp == NULL)
        return NULL;
    for (i = 0; i < n; i++)
        if (!is_pin_env(cfg, environ[i]))
            envp[j++] = environ[i];
    return envp;
}

/* In the child, after fork: fds[i] becomes descriptor 3 + i (-1: that
 * number stays closed) and every other one above 2 is closed. */
static void child_descriptors(const int *fds, int n)
{
    int moved[5], i, null;

    null = open("/dev/null", O_RDONLY);
    if (null >= 0 && null != STDIN_FILENO) {
        dup2(null, STDIN_FILENO);
        close(null);
    }
    for (i = 0; i < n; i++)
        moved[i] = fds[i] < 0 ? -1 : fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + n);
    for (i = 0; i < n; i++)
        if (fds[i] >= 0 && (moved[i] < 0 || dup2(moved[i], 3 + i) < 0))
            _exit(126);
    close_range(3 + (unsigned)n, ~0U, 0);
}

static int child_start(super *s, child *c, const int *fds, int nfds)
{
    const char *argv[8];
    int ctl[2], all[5], i, argc = 0;
    pid_t parent = getpid(), pid;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl) != 0) {
        log_error("socketpair: %s", strerror(errno));
        return -1;
    }
    all[0] = ctl[1];
    for (i = 0; i < nfds && i < 4; i++)
        all[1 + i] = fds[i];
    argv[argc++] = "smimed";
    argv[argc++] = c->role == ROLE_KEY ? PROC_ROLE_KEY : PROC_ROLE_WORKER;
    argv[argc++] = "--config";
    argv[argc++] = s->config_path;
    if (c->role == ROLE_WORKER && s->listen != NULL) {
        argv[argc++] = "--listen";
        argv[argc++] = s->listen;
    }
    argv[argc] = NULL;
    /* from the environment of now: a reload's new pin_env variables are
     * gone from it too */
    free(s->envp);
    s->envp = child_environment(s->cfg);
    if (s->envp == NULL) {
        log_error("out of memory");
        close(ctl[0]);
        close(ctl[1]);
        return -1;
    }
    pid = fork();
    if (pid < 0) {
        log_error("fork: %s", strerror(errno));
        close(ctl[0]);
        close(ctl[1]);
        return -1;
    }
    if (pid == 0) {
        /* the supervisor gone, the child goes; it may have gone already */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 ||
            getppid() != parent)
            _exit(1);
        child_descriptors(all, 1 + (nfds < 4 ? nfds : 4));
        execve("/proc/self/exe", (char *const *)argv, s->envp);
        _exit(127);
    }
    close(ctl[1]);
    c->pid = pid;
    c->control = ctl[0];
    c->ready = 0;
    return 0;
}

static const char *child_name(const child *c, char *buf, size_t len)
{
    if (c->role == ROLE_KEY)
        snprintf(buf, len, "key process %d", (int)c->pid);
    else
        snprintf(buf, len, "worker %u (pid %d)", c->slot, (int)c->pid);
    return buf;
}

/* The PINs of cfg's pin_env tokens, then (open) the word to open the
 * tokens. */
static int key_send_pins(super *s, const config *cfg, int open)
{
    token_error err = {0};
    unsigned char msg[PROC_CTL_DATA_MAX];
    size_t i, nlen, plen;
    char *pin;
    int r = 0;

    for (i = 0; i < cfg->ntokens && r == 0; i++) {
        const char *name = cfg->tokens[i].pin_env;

        if (name == NULL)
            continue;
        pin = token_pin_read_env(name, &err);
        if (pin == NULL) {
            /* the key process reports it when it opens the token */
            log_warn("%s", err.message);
            continue;
        }
        nlen = strlen(name);
        plen = strlen(pin);
        if (nlen + plen + 2 <= sizeof(msg)) {
            memcpy(msg, name, nlen + 1);
            memcpy(msg + nlen + 1, pin, plen + 1);
            r = proc_ctl_send(s->key.control, PROC_CTL_PIN, 0, msg,
                              nlen + plen + 2, -1);
            OPENSSL_cleanse(msg, sizeof(msg));
        }
        token_pin_free(pin);
    }
    if (r == 0 && open)
        r = proc_ctl_send(s->key.control, PROC_CTL_OPEN, 0, NULL, 0, -1);
    return r;
}

/* A key-protocol socket pair for worker w: the key process gets one end;
 * *worker_end is the other. */
static int key_pair(super *s, const child *w, int *worker_end)
{
    int sv[2], r;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
        log_error("socketpair: %s", strerror(errno));
        return -1;
    }
    r = s->key.pid > 0 ? proc_ctl_send(s->key.control, PROC_CTL_KEY_SOCKET,
                                       w->slot, NULL, 0, sv[1])
                       : 0;
    close(sv[1]);
    if (r != 0) {
        log_error("cannot hand worker %u's socket to the key process: %s",
                  w->slot, strerror(errno));
        close(sv[0]);
        return -1;
    }
    *worker_end = sv[0];
    return 0;
}

static void worker_start(super *s, child *w)
{
    char name[64];
    int fds[3], slot;

    slot = shared_slot_take(s->region);
    if (slot < 0) {
        /* workers of an earlier configuration still draining hold them */
        log_warn("worker %u waits for a slot of the shared region", w->slot);
        at_in(&w->restart_at, 1);
        return;
    }
    if (key_pair(s, w, &fds[0]) != 0) {
        shared_slot_reclaim(s->region, (unsigned)slot);
        return;
    }
    fds[1] = s->listen_fd;
    fds[2] = shared_fd(s->region);
    /* the slot is the first message the worker reads */
    if (child_start(s, w, fds, 3) == 0 &&
        proc_ctl_send(w->control, PROC_CTL_SHARED_SLOT, (uint32_t)slot, NULL, 0,
                      -1) == 0) {
        w->region_slot = slot;
        log_info("%s started", child_name(w, name, sizeof(name)));
    } else {
        if (w->pid > 0)
            kill(w->pid, SIGKILL); /* reaped, and restarted, as a death */
        shared_slot_reclaim(s->region, (unsigned)slot);
    }
    close(fds[0]);
}

static void key_start(super *s)
{
    char name[64];
    int key_end;
    unsigned i;

    if (child_start(s, &s->key, NULL, 0) != 0)
        return;
    log_info("%s started", child_name(&s->key, name, sizeof(name)));
    clock_gettime(CLOCK_MONOTONIC, &s->key_started);
    if (key_send_pins(s, s->cfg, 1) != 0)
        log_error("cannot send the PINs to the key process: %s",
                  strerror(errno));
    /* a replaced key process: every running worker gets a new socket */
    for (i = 0; i < s->nworkers; i++) {
        child *w = &s->workers[i];

        if (w->pid <= 0 || key_pair(s, w, &key_end) != 0)
            continue;
        if (proc_ctl_send(w->control, PROC_CTL_KEY_SOCKET, 0, NULL, 0,
                          key_end) != 0)
            log_error("cannot hand worker %u its new key socket: %s", w->slot,
                      strerror(errno));
        close(key_end);
    }
}

/* When a child that died is started again: at once, unless it died
 * DEATHS times within DEATH_WINDOW_S. */
static void schedule_restart(child *c)
{
    time_t now = time(NULL);
    unsigned recent = 0, i;
    double delay = 0;

    c->deaths[c->ndeaths++ % DEATHS] = now;
    for (i = 0; i < DEATHS && i < c->ndeaths; i++)
        if (now - c->deaths[i] < DEATH_WINDOW_S)
            recent++;
    if (recent >= DEATHS) {
        delay = 1;
        for (i = DEATHS; i < c->ndeaths && delay < BACKOFF_MAX_S; i++)
            delay *= 2;
        if (delay > BACKOFF_MAX_S)
            delay = BACKOFF_MAX_S;
    } else {
        c->ndeaths = recent == 1 ? 1 : c->ndeaths;
    }
    at_in(&c->restart_at, delay);
}

static void child_gone(super *s, child *c, int status)
{
    char name[64];

    child_name(c, name, sizeof(name));
    if (WIFSIGNALED(status))
        log_error("%s killed by signal %d (%s)", name, WTERMSIG(status),
                  strsignal(WTERMSIG(status)));
    else if (WEXITSTATUS(status) != 0 || (!c->retiring && !s->stopping))
        log_warn("%s exited with status %d", name, WEXITSTATUS(status));
    else
        log_info("%s exited", name);
    close(c->control);
    c->control = -1;
    c->pid = 0;
    /* everything it held in the region, given back before a replacement
     * can start */
    if (c->role == ROLE_WORKER && c->region_slot >= 0) {
        switch (shared_slot_reclaim(s->region, (unsigned)c->region_slot)) {
        case 1:
            log_warn("%s died holding the shared region's lock; taken over",
                     name);
            break;
        case 2:
            log_error("a live process held the shared region's lock for a "
                      "second; taken from it to reclaim %s",
                      name);
            break;
        default:
            break;
        }
        c->region_slot = -1;
    }
    if (!c->retiring && !s->stopping) {
        schedule_restart(c);
        if (c->role == ROLE_WORKER)
            shared_count(s->region, SHARED_WORKER_RESTARTS, 1);
    }
}

static void reap(super *s)
{
    int status;
    unsigned i;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == s->key.pid) {
            child_gone(s, &s->key, status);
            /* its answer will not come: the next key process loads the
             * file itself, and a reload once it is ready brings the
             * workers along */
            if (s->key_reload_pending) {
                s->key_reload_pending = 0;
                config_free(s->pending_cfg);
                s->pending_cfg = NULL;
                s->reload_again = 1;
            }
            continue;
        }
        for (i = 0; i < s->nworkers; i++) {
            if (s->workers[i].pid != pid)
                continue;
            child_gone(s, &s->workers[i], status);
            /* a worker of an earlier configuration is done */
            if (s->workers[i].retiring && !s->stopping) {
                memmove(&s->workers[i], &s->workers[i + 1],
                        (s->nworkers - i - 1) * sizeof(*s->workers));
                s->nworkers--;
            }
            break;
        }
    }
}

/* n more workers, started by the next tick. */
static int add_workers(super *s, unsigned n)
{
    child *grown;
    unsigned i;

    if (s->nworkers + n > s->cap) {
        grown = realloc(s->workers, (s->nworkers + n) * sizeof(*grown));
        if (grown == NULL)
            return -1;
        s->workers = grown;
        s->cap = s->nworkers + n;
    }
    for (i = 0; i < n; i++) {
        child *w = &s->workers[s->nworkers++];

        memset(w, 0, sizeof(*w));
        w->role = ROLE_WORKER;
        w->slot = s->next_slot++;
        w->region_slot = -1;
        w->control = -1;
    }
    return 0;
}

/* A reload the key process took: new workers start on the new
 * configuration, the old ones finish what they have and go. A worker
 * never loads its configuration again, so every request is served by one
 * configuration from start to end. */
static void replace_workers(super *s)
{
    unsigned i, old = s->nworkers;

    for (i = 0; i < old; i++) {
        if (s->workers[i].retiring)
            continue;
        s->workers[i].retiring = 1;
        if (s->workers[i].pid > 0)
            proc_ctl_send(s->workers[i].control, PROC_CTL_STOP, 0, NULL, 0, -1);
    }
    /* those waiting for a restart are simply dropped */
    for (i = 0; i < s->nworkers;) {
        if (s->workers[i].retiring && s->workers[i].pid == 0) {
            memmove(&s->workers[i], &s->workers[i + 1],
                    (s->nworkers - i - 1) * sizeof(*s->workers));
            s->nworkers--;
        } else {
            i++;
        }
    }
    if (add_workers(s, s->cfg->workers) != 0)
        log_error("out of memory for the new workers");
    else
        log_info("replacing the workers: %u start on the new configuration",
                 s->cfg->workers);
}

/* ---- signals and control messages ---- */

static void broadcast(super *s, unsigned type)
{
    unsigned i;
    /* a confined worker cannot open the log file again: it gets ours */
    int fd = type == PROC_CTL_REOPEN ? log_file_fd() : -1;

    if (s->key.pid > 0)
        proc_ctl_send(s->key.control, type, 0, NULL, 0, -1);
    for (i = 0; i < s->nworkers; i++)
        if (s->workers[i].pid > 0)
            proc_ctl_send(s->workers[i].control, type, 0, NULL, 0, fd);
}

/* SIGHUP (or the key process asking): the new configuration is checked
 * here, then the key process opens its tokens; the answer comes back as
 * PROC_CTL_RELOAD. */
static void reload(super *s)
{
    config_problems problems = {0};
    config *cfg;
    size_t i;

    /* one at a time, so the answer is the pending one's */
    if (s->key_reload_pending) {
        s->reload_again = 1;
        return;
    }
    cfg = config_load(s->config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    config_problems_clear(&problems);
    if (cfg == NULL) {
        log_error("keeping the running configuration");
        return;
    }
    if (s->key.pid > 0 && key_send_pins(s, cfg, 0) == 0 &&
        proc_ctl_send(s->key.control, PROC_CTL_RELOAD, 0, NULL, 0, -1) == 0) {
        s->key_reload_pending = 1;
        s->pending_cfg = cfg;
        cfg = NULL;
    }
    config_free(cfg);
}

static void on_key_message(super *s, const proc_ctl *m)
{
    config *cfg;

    switch (m->type) {
    case PROC_CTL_READY:
        s->key.ready = 1;
        log_info("the key process has its tokens open");
        if (s->reload_again) {
            s->reload_again = 0;
            reload(s);
        }
        break;
    case PROC_CTL_RELOAD:
        s->key_reload_pending = 0;
        cfg = s->pending_cfg;
        s->pending_cfg = NULL;
        if (m->arg && cfg != NULL) {
            /* the supervisor's copy follows, for the children it starts */
            config_free(s->cfg);
            s->cfg = cfg;
            cfg = NULL;
            /* its log file is the one the workers take at SIGUSR1 */
            if (log_open(s->cfg->log_file, s->cfg->log_level) != 0)
                log_error("cannot open log file %s", s->cfg->log_file);
            replace_workers(s);
            s->announce_pending++;
        }
        config_free(cfg);
        if (s->reload_again) {
            s->reload_again = 0;
            reload(s);
        }
        break;
    case PROC_CTL_WANT_RELOAD:
        reload(s);
        break;
    default:
        break;
    }
}

/* Once every old worker said it accepts no more (or is gone), every
 * connection from now on is served by a worker of the new configuration:
 * a client removed by the reload is refused from here on, which is what
 * the line tells whoever waits for it. */
static void announce_if_done(super *s)
{
    unsigned i;

    if (!s->announce_pending)
        return;
    for (i = 0; i < s->nworkers; i++)
        if (s->workers[i].retiring && s->workers[i].pid > 0 &&
            !s->workers[i].quiesced)
            return;
    /* one line per reload: whoever waits for its own finds it */
    for (; s->announce_pending > 0; s->announce_pending--)
        log_info("configuration %s in service", s->config_path);
}

static void on_control(super *s, child *c)
{
    proc_ctl m;
    char name[64];
    int fd, r;

    r = proc_ctl_recv(c->control, &m, &fd);
    if (fd >= 0)
        close(fd); /* no child hands the supervisor a descriptor */
    if (r <= 0)
        return; /* a death, or garbage: SIGCHLD says which */
    if (c->role == ROLE_KEY) {
        on_key_message(s, &m);
    } else if (m.type == PROC_CTL_READY) {
        c->ready = 1;
        log_info("%s ready", child_name(c, name, sizeof(name)));
    } else if (m.type == PROC_CTL_QUIESCED) {
        c->quiesced = 1;
    }
}

static void begin_stop(super *s, int sig)
{
    unsigned i;

    log_info("signal %d: stopping the workers, then the key process", sig);
    s->stopping = 1;
    /* the workers stop accepting; no new one will need it */
    close(s->listen_fd);
    s->listen_fd = -1;
    at_in(&s->stop_deadline, STOP_GRACE_S);
    for (i = 0; i < s->nworkers; i++)
        if (s->workers[i].pid > 0)
            proc_ctl_send(s->workers[i].control, PROC_CTL_STOP, 0, NULL, 0, -1);
}

static void on_signal(super *s, int sigfd)
{
    struct signalfd_siginfo si;

    while (read(sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        switch (si.ssi_signo) {
        case SIGCHLD:
            reap(s);
            break;
        case SIGHUP:
            reload(s);
            break;
        case SIGUSR1:
            if (log_reopen() != 0)
                log_error("cannot reopen the log file");
            broadcast(s, PROC_CTL_REOPEN);
            break;
        default:
            if (!s->stopping)
                begin_stop(s, (int)si.ssi_signo);
        }
    }
}

/* What is due: children to start again, the stop's next step. The poll
 * timeout until the next thing due, in ms. */
static int tick(super *s)
{
    double soonest = 1.0, left;
    unsigned i, workers_left = 0;

    if (s->stopping) {
        for (i = 0; i < s->nworkers; i++)
            workers_left += s->workers[i].pid > 0;
        if (workers_left == 0 && s->key.pid > 0 && !s->key.retiring) {
            s->key.retiring = 1;
            at_in(&s->stop_deadline, STOP_GRACE_S);
            proc_ctl_send(s->key.control, PROC_CTL_STOP, 0, NULL, 0, -1);
        }
        if (left_s(&s->stop_deadline) <= 0) {
            for (i = 0; i < s->nworkers; i++)
                if (s->workers[i].pid > 0)
                    kill(s->workers[i].pid, SIGKILL);
            if (workers_left == 0 && s->key.pid > 0)
                kill(s->key.pid, SIGKILL);
        }
        return 200;
    }
    if (s->key.pid == 0 && !s->key.retiring) {
        left = left_s(&s->key.restart_at);
        if (left <= 0)
            key_start(s);
        else if (left < soonest)
            soonest = left;
    }
    /* workers wait for the key process's tokens, within a bound */
    if (s->key.pid > 0 && !s->key.ready &&
        now_s() - ((double)s->key_started.tv_sec +
                   (double)s->key_started.tv_nsec / 1e9) <
            KEY_READY_WAIT_S)
        return 200;
    for (i = 0; i < s->nworkers; i++) {
        child *w = &s->workers[i];

        if (w->pid > 0 || w->retiring)
            continue;
        left = left_s(&w->restart_at);
        if (left <= 0)
            worker_start(s, w);
        else if (left < soonest)
            soonest = left;
    }
    return (int)(soonest * 1000) + 1;
}

static int all_gone(const super *s)
{
    unsigned i;

    for (i = 0; i < s->nworkers; i++)
        if (s->workers[i].pid > 0)
            return 0;
    return s->key.pid == 0;
}

/* The region the workers share, sized from the configuration at start:
 * twice the workers, so a reload's new workers start while the old ones
 * drain. The limits in it stay what they were at start. */
static shared *region_new(const config *cfg)
{
    shared_options o;
    char errbuf[256];
    shared *r;

    o.slots = 2 * cfg->workers + 1;
    if (o.slots > SHARED_SLOTS_MAX)
        o.slots = SHARED_SLOTS_MAX;
    o.max_connections = cfg->max_connections;
    o.body_limit = cfg->max_inflight_body_bytes;
    o.area_bytes = metrics_area_size();
    r = shared_create(&o, errbuf, sizeof(errbuf));
    if (r == NULL)
        log_error("%s", errbuf);
    return r;
}

int proc_supervise(const char *config_path, const char *listen, int listen_fd,
                   config *cfg)
{
    struct pollfd *pfd = NULL, *grown;
    super s = {0};
    sigset_t sigs;
    unsigned i, n;
    int sigfd = -1, ret = 1, timeout;

    s.config_path = config_path;
    s.listen = listen;
    s.listen_fd = listen_fd;
    s.cfg = cfg;
    s.key.role = ROLE_KEY;
    s.key.control = -1;
    s.key.region_slot = -1;
    s.region = region_new(cfg);
    if (s.region == NULL)
        goto out;
    if (add_workers(&s, cfg->workers) != 0) {
        log_error("out of memory");
        goto out;
    }
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    sigaddset(&sigs, SIGCHLD);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sigfd < 0) {
        log_error("signalfd: %s", strerror(errno));
        goto out;
    }
    log_info("supervisor %d: one key process and %u workers", (int)getpid(),
             s.nworkers);
    for (;;) {
        timeout = tick(&s);
        if (s.stopping && all_gone(&s))
            break;
        grown = realloc(pfd, (s.nworkers + 2) * sizeof(*pfd));
        if (grown == NULL) {
            log_error("out of memory");
            goto out;
        }
        pfd = grown;
        n = 0;
        pfd[n].fd = sigfd;
        pfd[n++].events = POLLIN;
        pfd[n].fd = s.key.control;
        pfd[n++].events = POLLIN;
        for (i = 0; i < s.nworkers; i++) {
            pfd[n].fd = s.workers[i].control;
            pfd[n++].events = POLLIN;
        }
        if (poll(pfd, n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            log_error("poll: %s", strerror(errno));
            goto out;
        }
        /* workers first: what the key process and the signals do may
         * change the table (a reload replaces the workers, a reaped old
         * one leaves it), and pfd follows the table as it was */
        for (i = 0; i + 2 < n && i < s.nworkers; i++)
            if (s.workers[i].control >= 0 && (pfd[2 + i].revents & POLLIN))
                on_control(&s, &s.workers[i]);
        if (s.key.control >= 0 && (pfd[1].revents & POLLIN))
            on_control(&s, &s.key);
        if (pfd[0].revents & POLLIN)
            on_signal(&s, sigfd);
        announce_if_done(&s);
    }
    log_info("stopped");
    ret = 0;
out:
    if (sigfd >= 0)
        close(sigfd);
    free(pfd);
    free(s.envp);
    free(s.workers);
    shared_free(s.region);
    if (s.listen_fd >= 0)
        close(s.listen_fd);
    config_free(s.pending_cfg);
    config_free(s.cfg);
    return ret;
}
