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

/* A record's line, formatted by hand: with jansson (an object of a dozen
 * values built, dumped and freed) each record cost the key process a few
 * microseconds, and it writes two per request. The output is what that
 * code wrote, byte for byte: the fields in order, compact. */
typedef struct line {
    char *p;
    size_t len, cap;
} line;

static void put(line *l, const char *s, size_t n)
{
    if (l->len + n <= l->cap)
        memcpy(l->p + l->len, s, n);
    l->len += n;
}

static void put_str(line *l, const char *s)
{
    put(l, s, strlen(s));
}

/* ,"name": */
static void put_name(line *l, const char *name)
{
    put(l, l->len == 0 ? "{\"" : ",\"", 2);
    put_str(l, name);
    put(l, "\":", 2);
}

/* A JSON string of client-supplied text, null for none; bytes that are
 * not printable ASCII become '?' so the record is valid UTF-8 whatever
 * was sent. */
static void put_text(line *l, const char *name, const char *s)
{
    const char *run;

    put_name(l, name);
    if (s == NULL || s[0] == '\0') {
        put(l, "null", 4);
        return;
    }
    put(l, "\"", 1);
    for (run = s; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch >= 0x20 && ch < 0x7f && ch != '"' && ch != '\\')
            continue;
        put(l, run, (size_t)(s - run));
        run = s + 1;
        if (ch == '"' || ch == '\\') {
            put(l, "\\", 1);
            put(l, s, 1);
        } else {
            put(l, "?", 1);
        }
    }
    put(l, run, (size_t)(s - run));
    put(l, "\"", 1);
}

/* jansson's real with JSON_REAL_PRECISION(12): %.12g, ".0" when that
 * reads as an integer, no '+' or leading zeros in the exponent. */
static void put_real(line *l, const char *name, double v)
{
    char num[40], *e, *digits, *from;
    int n = snprintf(num, sizeof(num), "%.12g", v);

    if (n < 0 || (size_t)n >= sizeof(num) - 3)
        n = snprintf(num, sizeof(num), "0.0");
    if (strchr(num, '.') == NULL && strchr(num, 'e') == NULL)
        memcpy(num + n, ".0", 3);
    e = strchr(num, 'e');
    if (e != NULL) {
        digits = e + 1;
        from = digits + 1;
        if (*digits == '-')
            digits++;
        while (*from == '0')
            from++;
        if (from != digits)
            memmove(digits, from, strlen(from) + 1);
    }
    put_name(l, name);
    put_str(l, num);
}

/* The record's line with its newline into l; l->len > l->cap when it did
 * not fit. */
static void format_record(line *l, const audit_record *r, const char *when)
{
    char num[16];

    put_text(l, "time", when);
    put_text(l, "request_id", r->request_id);
    put_text(l, "client", r->client);
    put_text(l, "remote", r->remote);
    put_text(l, "operation", r->operation);
    put_text(l, "key", r->key);
    put_text(l, "content_sha256", r->content_sha256);
    put_name(l, "result");
    if (r->result != 0) {
        snprintf(num, sizeof(num), "%d", r->result);
        put_str(l, num);
    } else {
        put(l, "null", 4);
    }
    put_text(l, "error", r->error);
    put_real(l, "latency_ms",
             (double)(long long)(r->latency_ms * 1000.0) / 1000.0);
    if (r->stage != NULL) {
        put_name(l, "stage");
        put(l, "\"", 1);
        put_str(l, r->stage);
        put(l, "\"", 1);
    }
    if (r->token != NULL)
        put_text(l, "token", r->token);
    if (r->asserted) {
        put_name(l, "asserted_by");
        put_str(l, "\"worker\"");
    }
    put(l, "}\n", 2);
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
    char when[40], stack[2048];
    line l = {stack, 0, sizeof(stack)};
    int ret, on;

    pthread_mutex_lock(&audit_lock);
    on = audit_fd >= 0;
    pthread_mutex_unlock(&audit_lock);
    if (!on)
        return 0;
    now_text(when, sizeof(when));
    format_record(&l, r, when);
    if (l.len > l.cap) {
        /* long client-supplied text: the exact size, and again */
        l.p = malloc(l.len);
        if (l.p == NULL)
            return -1;
        l.cap = l.len;
        l.len = 0;
        format_record(&l, r, when);
    }
    pthread_mutex_lock(&audit_lock);
    ret = audit_fd >= 0 ? write_all(audit_fd, l.p, l.len) : 0;
    pthread_mutex_unlock(&audit_lock);
    if (l.p != stack)
        free(l.p);
    return ret;
}
