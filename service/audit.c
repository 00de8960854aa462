/*
 * The audit trail. Each record is formatted into one buffer and appended
 * with a single write(2) to a file opened O_APPEND, so records from
 * concurrent requests never interleave and a rotated file never gets a torn
 * line. No fsync per record: a write that the kernel accepted survives the
 * daemon; one it refuses (disk full, I/O error) fails the operation.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>

#include "service/audit.h"

static pthread_mutex_t audit_lock = PTHREAD_MUTEX_INITIALIZER;
static int audit_fd = -1;
static char *audit_path;
/* the trail audit_swap switches to; set by audit_stage */
static int staged_fd = -1;
static char *staged_path;
static int staged;

static int open_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY,
                0600);
}

int audit_stage(const char *path)
{
    char *copy = NULL;
    int fd = -1;

    if (path != NULL) {
        copy = strdup(path);
        if (copy == NULL)
            return -1;
        fd = open_file(path);
        if (fd < 0) {
            free(copy);
            return -1;
        }
    }
    audit_discard();
    pthread_mutex_lock(&audit_lock);
    staged_fd = fd;
    staged_path = copy;
    staged = 1;
    pthread_mutex_unlock(&audit_lock);
    return 0;
}

void audit_swap(void)
{
    int fd;
    char *path;

    pthread_mutex_lock(&audit_lock);
    if (staged) {
        fd = audit_fd;
        path = audit_path;
        audit_fd = staged_fd;
        audit_path = staged_path;
        staged_fd = fd;
        staged_path = path;
    }
    pthread_mutex_unlock(&audit_lock);
}

void audit_discard(void)
{
    int fd;
    char *path;

    pthread_mutex_lock(&audit_lock);
    fd = staged_fd;
    path = staged_path;
    staged_fd = -1;
    staged_path = NULL;
    staged = 0;
    pthread_mutex_unlock(&audit_lock);
    if (fd >= 0)
        close(fd);
    free(path);
}

int audit_open(const char *path)
{
    if (audit_stage(path) != 0)
        return -1;
    audit_swap();
    audit_discard();
    return 0;
}

int audit_reopen(void)
{
    int fd, old, ret = 0;

    pthread_mutex_lock(&audit_lock);
    if (audit_path != NULL) {
        fd = open_file(audit_path);
        if (fd < 0) {
            ret = -1;
        } else {
            old = audit_fd;
            audit_fd = fd;
            if (old >= 0)
                close(old);
        }
    }
    pthread_mutex_unlock(&audit_lock);
    return ret;
}

void audit_close(void)
{
    audit_open(NULL);
}

/* RFC 3339 UTC with milliseconds. */
static void now_text(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;
    char sec[32];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(sec, sizeof(sec), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf, len, "%s.%03dZ", sec, (int)(ts.tv_nsec / 1000000L) % 1000);
}

/* A JSON string of client-supplied text; bytes that are not printable
 * ASCII become '?' so the record is valid UTF-8 whatever was sent. */
static json_t *text_or_null(const char *s)
{
    json_t *v;
    char *copy, *p;

    if (s == NULL || s[0] == '\0')
        return json_null();
    copy = strdup(s);
    if (copy == NULL)
        return NULL;
    for (p = copy; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
            *p = '?';
    v = json_string(copy);
    free(copy);
    return v;
}

static int write_all(int fd, const char *buf, size_t len)
{
    ssize_t n;

    while (len > 0) {
        n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The record is formatted without the lock, which covers only the
 * descriptor's use (a reopen closes it): the key process writes two
 * records per request from several threads, and formatting under the lock
 * made them wait for each other. */
int audit_write(const audit_record *r)
{
    char when[40], *line = NULL;
    json_t *rec;
    size_t len;
    int ret = -1, on;

    pthread_mutex_lock(&audit_lock);
    on = audit_fd >= 0;
    pthread_mutex_unlock(&audit_lock);
    if (!on)
        return 0;
    now_text(when, sizeof(when));
    rec = json_pack("{s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:f}", "time", when,
                    "request_id", text_or_null(r->request_id), "client",
                    text_or_null(r->client), "remote", text_or_null(r->remote),
                    "operation", text_or_null(r->operation), "key",
                    text_or_null(r->key), "content_sha256",
                    text_or_null(r->content_sha256), "result",
                    r->result != 0 ? json_integer(r->result) : json_null(),
                    "error", text_or_null(r->error), "latency_ms",
                    (double)(long long)(r->latency_ms * 1000.0) / 1000.0);
    if (rec != NULL &&
        ((r->stage != NULL &&
          json_object_set_new(rec, "stage", json_string(r->stage)) != 0) ||
         (r->token != NULL &&
          json_object_set_new(rec, "token", text_or_null(r->token)) != 0) ||
         (r->asserted && json_object_set_new(rec, "asserted_by",
                                             json_string("worker")) != 0))) {
        json_decref(rec);
        rec = NULL;
    }
    if (rec == NULL)
        goto out;
    line = json_dumps(rec, JSON_COMPACT | JSON_PRESERVE_ORDER |
                               JSON_REAL_PRECISION(12));
    json_decref(rec);
    if (line == NULL)
        goto out;
    len = strlen(line);
    line[len] = '\n';
    pthread_mutex_lock(&audit_lock);
    ret = audit_fd >= 0 ? write_all(audit_fd, line, len + 1) : 0;
    pthread_mutex_unlock(&audit_lock);
    line[len] = '\0';
out:
    free(line);
    return ret;
}
