/*
 * Process hardening. Each step is one system or library call; the reasons
 * are in harden.h and README's security section.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <gnutls/gnutls.h>
#include <gnutls/pkcs11.h>
#include <openssl/crypto.h>

#include "service/harden.h"

int harden_process(char *errbuf, size_t errlen)
{
    struct rlimit none = {0, 0};

    /* before anything else touches OpenSSL: OPENSSL_CONF or the system
     * openssl.cnf could name providers or engines to load */
    if (!OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, NULL)) {
        snprintf(errbuf, errlen, "cannot initialise OpenSSL");
        return -1;
    }
    /* GnuTLS (TLS for the HTTP server) would otherwise load every p11-kit
     * registered PKCS#11 module on first use */
    if (gnutls_pkcs11_init(GNUTLS_PKCS11_FLAG_MANUAL, NULL) < 0) {
        snprintf(errbuf, errlen, "cannot initialise GnuTLS PKCS#11 (manual)");
        return -1;
    }
    if (setrlimit(RLIMIT_CORE, &none) != 0) {
        snprintf(errbuf, errlen, "cannot turn core dumps off: %s",
                 strerror(errno));
        return -1;
    }
    /* also keeps other processes of the same user from ptrace and from
     * reading /proc/PID/mem */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        snprintf(errbuf, errlen, "cannot make the process non-dumpable: %s",
                 strerror(errno));
        return -1;
    }
    return 0;
}

unsigned long harden_raise_nofile(unsigned long want)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 0;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want
                          ? want
                          : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    return (unsigned long)rl.rlim_cur;
}
