/*
 * Log output. Lines are formatted into one buffer and written with a single
 * write(2) so lines from concurrent requests never interleave.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "service/log.h"

log_level log_current_level = LOG_LEVEL_INFO;

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = STDERR_FILENO;
static char *log_path;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

static int open_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

int log_open(const char *path, log_level level)
{
    int fd = STDERR_FILENO;

    /* read by every request thread while a reload writes it */
    __atomic_store_n(&log_current_level, level, __ATOMIC_RELAXED);
    if (path != NULL && (fd = open_file(path)) < 0)
        return -1;
    pthread_mutex_lock(&log_lock);
    free(log_path);
    log_path = path != NULL ? strdup(path) : NULL;
    if (log_fd != STDERR_FILENO)
        close(log_fd);
    log_fd = fd;
    pthread_mutex_unlock(&log_lock);
    return 0;
}

int log_reopen(void)
{
    int fd, ret = 0;

    pthread_mutex_lock(&log_lock);
    if (log_path != NULL) {
        fd = open_file(log_path);
        if (fd < 0) {
            ret = -1;
        } else {
            close(log_fd);
            log_fd = fd;
        }
    }
    pthread_mutex_unlock(&log_lock);
    return ret;
}

int log_file_fd(void)
{
    int fd;

    pthread_mutex_lock(&log_lock);
    fd = log_fd != STDERR_FILENO ? log_fd : -1;
    pthread_mutex_unlock(&log_lock);
    return fd;
}

void log_take_fd(int fd)
{
    pthread_mutex_lock(&log_lock);
    if (log_fd != STDERR_FILENO) {
        close(log_fd);
        log_fd = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&log_lock);
    if (fd >= 0)
        close(fd);
}

void log_close(void)
{
    pthread_mutex_lock(&log_lock);
    if (log_fd != STDERR_FILENO)
        close(log_fd);
    log_fd = STDERR_FILENO;
    free(log_path);
    log_path = NULL;
    pthread_mutex_unlock(&log_lock);
}

void log_write(log_level level, const char *func, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t n;
    va_list ap;
    int r;

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    r = snprintf(line + n, sizeof(line) - n,
                 ".%03ldZ %s %s: ", (long)(tv.tv_usec / 1000),
                 level_names[level], func);
    if (r > 0)
        n += (size_t)r;
    va_start(ap, fmt);
    r = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    if (r > 0)
        n += (size_t)r;
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    pthread_mutex_lock(&log_lock);
    while (write(log_fd, line, n) < 0 && errno == EINTR)
        ;
    pthread_mutex_unlock(&log_lock);
}
