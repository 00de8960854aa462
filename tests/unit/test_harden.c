/*
 * Process hardening: after harden_process the process is not dumpable,
 * core dumps are off, and OpenSSL ignores OPENSSL_CONF (a config file
 * there could load providers or engines from any path).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <openssl/evp.h>

#include "service/harden.h"
#include "tap.h"

int main(void)
{
    char conf[] = "/tmp/smimed-openssl-XXXXXX";
    char errbuf[256] = "";
    struct rlimit rl;
    EVP_MD *md;
    FILE *f;
    int fd = mkstemp(conf);

    /* honoured, this file would make every SHA-256 fetch fail: no FIPS
     * provider is loaded to satisfy fips=yes */
    f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (f == NULL) {
        perror("openssl config");
        return 1;
    }
    fputs("openssl_conf = init\n[init]\nalg_section = algs\n"
          "[algs]\ndefault_properties = fips=yes\n",
          f);
    fclose(f);
    setenv("OPENSSL_CONF", conf, 1);

    tap_ok(harden_process(errbuf, sizeof(errbuf)) == 0, "harden_process %s",
           errbuf);
    tap_ok(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0, "not dumpable");
    tap_ok(getrlimit(RLIMIT_CORE, &rl) == 0 && rl.rlim_cur == 0 &&
               rl.rlim_max == 0,
           "core dumps off");
    md = EVP_MD_fetch(NULL, "SHA256", NULL);
    tap_ok(md != NULL, "OPENSSL_CONF is not loaded (SHA-256 still fetches)");
    EVP_MD_free(md);
    tap_ok(harden_raise_nofile(64) >= 64, "open-file limit at least 64");
    unlink(conf);
    return tap_done();
}
