/*
 * PINs from files and the environment. Every buffer that held PIN bytes is
 * wiped before it is released, and no message ever carries PIN bytes.
 * A PIN file is read again at each login, and must be private to its owner.
 * A PIN from the environment is moved, on first use, into a page locked in
 * memory (never swapped, left out of core dumps) and wiped from the
 * environment, so neither /proc/PID/environ nor a child process sees it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* the char * strerror_r */
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

/* A PIN readable (or writable) by anyone but the owner is as good as
 * published on a shared host. */
static int check_mode(const char *path, const struct stat *st, token_error *err)
{
    if ((st->st_mode & 077) == 0)
        return 0;
    tk_error(err, TOKEN_ERR_CONFIG,
             "PIN file %s is open to group or others (mode %04o); "
             "chmod 600 it",
             path, (unsigned)(st->st_mode & 07777));
    return -1;
}

int token_pin_check_file(const char *path, token_error *err)
{
    char errbuf[128];
    struct stat st;

    if (stat(path, &st) != 0) {
        tk_error(err, TOKEN_ERR_CONFIG, "cannot stat PIN file %s: %s", path,
                 strerror_r(errno, errbuf, sizeof(errbuf)));
        return -1;
    }
    return check_mode(path, &st, err);
}

char *token_pin_read_file(const char *path, token_error *err)
{
    struct stat st;
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
    if (fstat(fd, &st) != 0) {
        tk_error(err, TOKEN_ERR_CONFIG, "cannot stat PIN file %s: %s", path,
                 strerror_r(errno, errbuf, sizeof(errbuf)));
        goto out;
    }
    if (check_mode(path, &st, err) != 0)
        goto out;
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

/* Environment PINs live in fixed slots of one locked page. */
#define ENV_SLOTS 16
#define ENV_SLOT_SIZE 256

static pthread_mutex_t env_lock = PTHREAD_MUTEX_INITIALIZER;
static char *env_page; /* ENV_SLOTS * ENV_SLOT_SIZE bytes, mlock'd */
static char *env_names[ENV_SLOTS];

static int env_find(const char *name)
{
    int i;

    for (i = 0; i < ENV_SLOTS; i++)
        if (env_names[i] != NULL && strcmp(env_names[i], name) == 0)
            return i;
    return -1;
}

static void env_drop(int i)
{
    OPENSSL_cleanse(env_page + i * ENV_SLOT_SIZE, ENV_SLOT_SIZE);
    free(env_names[i]);
    env_names[i] = NULL;
}

static int env_page_get(token_error *err)
{
    char errbuf[128];
    void *p;

    if (env_page != NULL)
        return 0;
    p = mmap(NULL, ENV_SLOTS * ENV_SLOT_SIZE, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot map memory for a PIN: %s",
                 strerror_r(errno, errbuf, sizeof(errbuf)));
        return -1;
    }
    if (mlock(p, ENV_SLOTS * ENV_SLOT_SIZE) != 0) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "cannot lock memory for an environment PIN: %s (raise "
                 "LimitMEMLOCK, or use pin_file)",
                 strerror_r(errno, errbuf, sizeof(errbuf)));
        munmap(p, ENV_SLOTS * ENV_SLOT_SIZE);
        return -1;
    }
    madvise(p, ENV_SLOTS * ENV_SLOT_SIZE, MADV_DONTDUMP);
    /* a forked child (the supervisor's, before its exec) gets no copy */
    madvise(p, ENV_SLOTS * ENV_SLOT_SIZE, MADV_DONTFORK);
    env_page = p;
    return 0;
}

/* Copies value into name's slot (a new one when name has none). */
static int env_store(const char *name, const char *value, token_error *err)
{
    size_t len = strlen(value);
    int i = env_find(name);

    if (len >= ENV_SLOT_SIZE) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PIN environment variable %s is longer than %d bytes", name,
                 ENV_SLOT_SIZE - 1);
        return -1;
    }
    if (env_page_get(err) != 0)
        return -1;
    if (i < 0) {
        for (i = 0; i < ENV_SLOTS && env_names[i] != NULL; i++)
            ;
        if (i == ENV_SLOTS) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "more than %d PIN environment variables", ENV_SLOTS);
            return -1;
        }
        env_names[i] = strdup(name);
        if (env_names[i] == NULL) {
            tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
            return -1;
        }
    }
    OPENSSL_cleanse(env_page + i * ENV_SLOT_SIZE, ENV_SLOT_SIZE);
    memcpy(env_page + i * ENV_SLOT_SIZE, value, len);
    return i;
}

/* Moves the variable's value into a slot and wipes it where it was: the
 * bytes of the original environment block are what /proc/PID/environ
 * shows, and unsetenv alone leaves them there. */
static int env_capture(const char *name, char *value, token_error *err)
{
    int i = env_store(name, value, err);

    if (i < 0)
        return -1;
    OPENSSL_cleanse(value, strlen(value));
    unsetenv(name);
    return i;
}

int token_pin_put_env(const char *name, const char *pin, token_error *err)
{
    int i;

    if (pin[0] == '\0') {
        tk_error(err, TOKEN_ERR_CONFIG, "PIN environment variable %s is empty",
                 name);
        return -1;
    }
    pthread_mutex_lock(&env_lock);
    i = env_store(name, pin, err);
    pthread_mutex_unlock(&env_lock);
    return i < 0 ? -1 : 0;
}

char *token_pin_read_env(const char *name, token_error *err)
{
    char *value, *pin = NULL;
    int i;

    pthread_mutex_lock(&env_lock);
    /* set again since it was taken: the new value wins */
    value = getenv(name);
    i = env_find(name);
    if (value != NULL && value[0] == '\0') {
        if (i >= 0)
            env_drop(i);
        tk_error(err, TOKEN_ERR_CONFIG, "PIN environment variable %s is empty",
                 name);
        goto out;
    }
    if (value != NULL)
        i = env_capture(name, value, err);
    else if (i < 0)
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PIN environment variable %s is not set", name);
    if (i >= 0) {
        value = env_page + i * ENV_SLOT_SIZE;
        pin = pin_dup(value, strlen(value), err);
    }
out:
    pthread_mutex_unlock(&env_lock);
    return pin;
}

int token_pin_env_available(const char *name)
{
    int found;

    pthread_mutex_lock(&env_lock);
    found = env_find(name) >= 0 || getenv(name) != NULL;
    pthread_mutex_unlock(&env_lock);
    return found;
}

void token_pin_free(char *pin)
{
    if (pin != NULL)
        OPENSSL_clear_free(pin, strlen(pin));
}
