/*
 * PINs from files and the environment. Every buffer that held PIN bytes is
 * wiped before it is released, and no message ever carries PIN bytes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* the char * strerror_r */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "token/internal.h"

/* Far beyond any token's ulMaxPinLen; a longer first line means the path
 * names the wrong file. */
#define PIN_FILE_MAX 1024

static char *pin_dup(const char *src, size_t len, token_error *err)
{
    char *pin = OPENSSL_malloc(len + 1);

    if (pin == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    memcpy(pin, src, len);
    pin[len] = '\0';
    return pin;
}

char *token_pin_read_file(const char *path, token_error *err)
{
    char buf[PIN_FILE_MAX];
    char errbuf[128];
    char *pin = NULL;
    char *nl = NULL;
    size_t len = 0;
    ssize_t n;
    int fd = -1;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        tk_error(err, TOKEN_ERR_CONFIG, "cannot open PIN file %s: %s", path,
                 strerror_r(errno, errbuf, sizeof(errbuf)));
        goto out;
    }
    /* Only the first line counts: stop reading at its end. */
    while (nl == NULL && len < sizeof(buf)) {
        n = read(fd, buf + len, sizeof(buf) - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            tk_error(err, TOKEN_ERR_CONFIG, "cannot read PIN file %s: %s", path,
                     strerror_r(errno, errbuf, sizeof(errbuf)));
            goto out;
        }
        if (n == 0)
            break;
        nl = memchr(buf + len, '\n', (size_t)n);
        len += (size_t)n;
    }
    if (nl != NULL)
        len = (size_t)(nl - buf);
    else if (len == sizeof(buf)) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PIN file %s: the first line is longer than %d bytes", path,
                 PIN_FILE_MAX - 1);
        goto out;
    }
    /* The LF already ended the line; CRs before it (a file written on
     * Windows) are not part of the PIN either. */
    while (len > 0 && buf[len - 1] == '\r')
        len--;
    if (len == 0) {
        tk_error(err, TOKEN_ERR_CONFIG, "PIN file %s: the PIN is empty", path);
        goto out;
    }
    if (memchr(buf, '\0', len) != NULL) {
        tk_error(err, TOKEN_ERR_CONFIG, "PIN file %s: the PIN has a NUL byte",
                 path);
        goto out;
    }
    pin = pin_dup(buf, len, err);
out:
    OPENSSL_cleanse(buf, sizeof(buf));
    if (fd >= 0)
        close(fd);
    return pin;
}

char *token_pin_read_env(const char *name, token_error *err)
{
    const char *value = getenv(name);

    if (value == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PIN environment variable %s is not set", name);
        return NULL;
    }
    if (value[0] == '\0') {
        tk_error(err, TOKEN_ERR_CONFIG, "PIN environment variable %s is empty",
                 name);
        return NULL;
    }
    return pin_dup(value, strlen(value), err);
}

void token_pin_free(char *pin)
{
    if (pin != NULL)
        OPENSSL_clear_free(pin, strlen(pin));
}
