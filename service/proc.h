/*
 * proc: the processes of the daemon. The process started is the
 * supervisor; it starts one key process (smimed-key: the only one with
 * PKCS#11 modules, PINs, sessions and the audit trail) and `workers`
 * request workers (smimed-worker: HTTP, JSON, MIME, CMS), each with fork
 * and exec of /proc/self/exe and a hidden role argument, talks to each over
 * a control socket, and hands every worker a key-protocol socket whose
 * other end goes to the key process (proto/).
 */
#ifndef SMIMED_PROC_H
#define SMIMED_PROC_H

#include <stddef.h>
#include <stdint.h>

#include "service/config.h"

/* What a child finds open after exec, at fixed numbers (stdin is
 * /dev/null, stdout and stderr the supervisor's); every other descriptor
 * is closed. */
#define PROC_FD_CONTROL 3 /* every child: its control socket */
#define PROC_FD_KEY 4     /* a worker: its key-protocol socket */
#define PROC_FD_LISTEN 5  /* a worker: the listening socket */
#define PROC_FD_SHARED 6  /* a worker: the shared region (service/shared.h) */

/* The hidden role arguments, and the process names (/proc/PID/comm). */
#define PROC_ROLE_KEY "--role=key"
#define PROC_ROLE_WORKER "--role=worker"
#define PROC_NAME_KEY "smimed-key"
#define PROC_NAME_WORKER "smimed-worker"

/*
 * Control messages, one SOCK_SEQPACKET datagram each: {u16 type, u16
 * length of data, u32 arg} and the data; PROC_CTL_KEY_SOCKET carries one
 * descriptor (SCM_RIGHTS). The supervisor is the more privileged end: a
 * child takes only the messages its role expects, and the supervisor
 * takes from a worker nothing but PROC_CTL_READY.
 */
typedef enum {
    /* supervisor → key process: the key end of worker arg's socket;
     * supervisor → worker: a new key-protocol socket (the key process was
     * replaced) */
    PROC_CTL_KEY_SOCKET = 1,
    /* supervisor → key process, before PROC_CTL_OPEN: data is
     * "NAME\0PIN" for a pin_env token (the PIN lives in the supervisor,
     * never in a child's environment) */
    PROC_CTL_PIN = 2,
    /* supervisor → key process: every PIN is there, open the tokens */
    PROC_CTL_OPEN = 3,
    /* supervisor → key process: load the configuration again (SIGHUP);
     * key process → supervisor: arg 1 when the new one serves, 0 when the
     * running one stays */
    PROC_CTL_RELOAD = 4,
    /* supervisor → child: reopen log and audit files (SIGUSR1); to a
     * worker it carries the supervisor's log file, reopened, which a
     * confined worker could not open itself */
    PROC_CTL_REOPEN = 5,
    /* supervisor → child: finish what is in flight and exit (SIGTERM) */
    PROC_CTL_STOP = 6,
    /* child → supervisor: serving (the key process: its tokens are open) */
    PROC_CTL_READY = 7,
    /* key process → supervisor: a token absent at the last load answers
     * now, reload to open it */
    PROC_CTL_WANT_RELOAD = 8,
    /* supervisor → worker, its first message: arg is the slot of the
     * shared region (PROC_FD_SHARED) it writes */
    PROC_CTL_SHARED_SLOT = 9,
} proc_ctl_type;

#define PROC_CTL_DATA_MAX 512

typedef struct proc_ctl {
    unsigned type;
    uint32_t arg;
    size_t len;
    unsigned char data[PROC_CTL_DATA_MAX];
} proc_ctl;

/* Sends one message, with descriptor pass_fd (-1: none). 0, or -1 with
 * errno. Never blocks for long: the peer reads its control socket. */
int proc_ctl_send(int fd, unsigned type, uint32_t arg, const void *data,
                  size_t len, int pass_fd);
/* Receives one message into *msg and the descriptor that came with it in
 * *got_fd (-1: none; a message that brings more than one has the others
 * closed). 1 on a message, 0 when the peer closed, -1 on an error or a
 * malformed message (errno EPROTO). */
int proc_ctl_recv(int fd, proc_ctl *msg, int *got_fd);

/* The supervisor: starts the key process and the workers, restarts them,
 * relays signals, and returns the exit status once they are all gone.
 * Takes cfg, the configuration at config_path already checked, and
 * listen_fd, the listening socket every worker gets (closed once the
 * workers are told to stop); listen is its address, handed to the
 * workers. */
int proc_supervise(const char *config_path, const char *listen, int listen_fd,
                   config *cfg);

#endif
