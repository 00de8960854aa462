/*
 * worker: a request worker (smimed --role=worker), started by the
 * supervisor with its control socket, its key-protocol socket and the
 * listening socket at fixed descriptors (service/proc.h). It holds no PKCS#11
 * module and no PIN: its keys are the key process's directory (rkey/client.h).
 */
#ifndef SMIMED_WORKER_H
#define SMIMED_WORKER_H

/* Runs the worker until the supervisor says stop (or goes away); returns
 * the exit status. It serves on PROC_FD_LISTEN; listen (NULL: the
 * configuration's) is the address, for messages. */
int worker_main(const char *config_path, const char *listen);

#endif
