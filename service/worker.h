/*
 * worker: a request worker (smimed --role=worker), started by the
 * supervisor with its control socket and its key-protocol socket at fixed
 * descriptors (service/proc.h). It holds no PKCS#11 module and no PIN: its
 * keys are the key process's directory (rkey/client.h).
 */
#ifndef SMIMED_WORKER_H
#define SMIMED_WORKER_H

/* Runs the worker until the supervisor says stop (or goes away); returns
 * the exit status. */
int worker_main(const char *config_path);

#endif
