/*
 * confine: what a request worker gives up for the rest of its life once it
 * holds its sockets and its configuration. Started as root it becomes the
 * configured user (no supplementary groups, no way back); then no new
 * privileges, a Landlock domain in which the file system is read-only and
 * only what a worker reads after start is readable (the trust directory,
 * the iconv modules, time zone data), and a seccomp filter that kills the
 * process on any system call outside the list a worker uses (no execve,
 * no new sockets, no connect or bind, no ptrace). The PIN files, the
 * PKCS#11 modules and the token store are then unopenable however the
 * worker's memory was corrupted.
 *
 * Landlock and NO_NEW_PRIVS act on the calling thread only (and what it
 * starts after), so this runs while the process has one thread: before
 * the key-protocol client's reader and the HTTP server's threads. Files
 * only root may read (a TLS key) must have been read before.
 */
#ifndef SMIMED_CONFINE_H
#define SMIMED_CONFINE_H

#include <stddef.h>

#include "service/config.h"

typedef struct confine_error {
    char message[256];
} confine_error;

/*
 * Confines the calling process as cfg says, with summary set to the line
 * the worker logs: what took effect and, for each part that did not (a
 * kernel without Landlock, a seccomp the service manager forbids, a path
 * that could not be allowed), why. 0 when everything took effect; 1 when
 * some part did not but every step that must hold did (dropping root, no
 * new privileges); -1 with err set otherwise: the process must then exit,
 * having possibly changed some of its credentials already.
 */
int confine_process(const config *cfg, char *summary, size_t summary_len,
                    confine_error *err);

/* Makes confine_process use at most Landlock ABI abi, as on an older
 * kernel (Debian 12's 6.1 has ABI 2): the tests run each ABI's ruleset on
 * this machine's newer kernel, which takes them all. */
void confine_cap_landlock_abi(long abi);

#endif
