/*
 * harden: process-wide protections, set first thing in main: no core dumps
 * and no ptrace by other users (the process holds PINs and a logged-in
 * token session), and no code loaded from paths the configuration does not
 * name (OpenSSL's config file can load providers and engines, GnuTLS's
 * p11-kit can load PKCS#11 modules).
 */
#ifndef SMIMED_HARDEN_H
#define SMIMED_HARDEN_H

#include <stddef.h>

/* -1 with a message when a protection could not be set. */
int harden_process(char *errbuf, size_t errlen);
/* Raises the soft open-file limit towards want (one descriptor per
 * connection plus the modules' own); returns the limit now in force. */
unsigned long harden_raise_nofile(unsigned long want);

#endif
