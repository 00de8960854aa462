/*
 * keyd: the key process (smimed --role=key). The only process that loads
 * PKCS#11 modules, reads PINs, logs in, holds sessions and recovers
 * tokens, and the only one that writes the audit trail. It serves the key
 * protocol (proto/) on one SOCK_SEQPACKET socket per worker, handed over
 * by the supervisor on the control socket (PROC_FD_CONTROL), and never
 * parses HTTP, JSON request bodies, MIME or CMS.
 */
#ifndef SMIMED_KEYD_H
#define SMIMED_KEYD_H

/* Runs the key process on the configuration at config_path until the
 * supervisor says stop (or goes away); returns the exit status. */
int keyd_main(const char *config_path);

#endif
