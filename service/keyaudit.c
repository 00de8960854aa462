/*
 * The key process's audit records, and the table of requests whose end a
 * worker owes (one per connection, under its own lock; no record is
 * written under it).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/deadline.h"
#include "service/audit.h"
#include "service/keyaudit.h"
#include "service/log.h"

typedef struct pending {
    struct pending *next;
    proto_claims claims;
    char operation[16];
    char key[PROTO_NAME_MAX + 1];
    char token[PROTO_TOKEN_MAX + 1];
    unsigned running; /* its operations not answered yet */
    int lost;         /* the worker went; written when running ends */
    struct timespec first, deadline;
} pending;

struct keyaudit {
    pthread_mutex_t lock;
    unsigned slot;
    pending *list;
    size_t count;
};

static double ms_since(const struct timespec *t0)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) * 1000.0 +
           (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

keyaudit *keyaudit_new(unsigned slot)
{
    keyaudit *a = calloc(1, sizeof(*a));

    if (a == NULL)
        return NULL;
    pthread_mutex_init(&a->lock, NULL);
    a->slot = slot;
    return a;
}

void keyaudit_free(keyaudit *a)
{
    if (a == NULL)
        return;
    keyaudit_expire(a, 1);
    pthread_mutex_destroy(&a->lock);
    free(a);
}

int keyaudit_key(const proto_claims *claims, const char *operation,
                 const char *key, const char *token, const char *error,
                 double latency_ms)
{
    audit_record r = {0};

    r.request_id = claims->request_id;
    r.client = claims->client;
    r.remote = claims->remote;
    r.content_sha256 = claims->content_sha256;
    r.operation = operation;
    r.key = key;
    r.token = token;
    r.error = error;
    r.latency_ms = latency_ms;
    r.stage = "key";
    r.asserted = 1;
    return audit_write(&r);
}

static int write_finish(const pending *p, int result, const char *error,
                        double latency_ms)
{
    audit_record r = {0};

    r.request_id = p->claims.request_id;
    r.client = p->claims.client;
    r.remote = p->claims.remote;
    r.content_sha256 = p->claims.content_sha256;
    r.operation = p->operation;
    r.key = p->key;
    r.token = p->token;
    r.result = result;
    r.error = error;
    r.latency_ms = latency_ms;
    r.stage = "finish";
    r.asserted = 1;
    return audit_write(&r);
}

static void write_lost(const keyaudit *a, pending *list)
{
    pending *p;

    while ((p = list) != NULL) {
        list = p->next;
        if (write_finish(p, 0, "worker_lost", ms_since(&p->first)) != 0)
            log_error("cannot write the audit record of request %s (lost "
                      "by worker %u)",
                      p->claims.request_id, a->slot);
        free(p);
    }
}

int keyaudit_refusal(const proto_audit_req *m)
{
    audit_record r = {0};

    r.request_id = m->claims.request_id;
    r.client = m->claims.client;
    r.remote = m->claims.remote;
    r.content_sha256 = m->claims.content_sha256;
    r.operation = m->operation;
    r.key = m->key;
    r.result = m->result;
    r.error = m->error;
    r.stage = "refusal";
    r.asserted = 1;
    return audit_write(&r);
}

/* Under a->lock. */
static pending *find(keyaudit *a, const char *rid, pending ***at)
{
    pending **pp;

    for (pp = &a->list; *pp != NULL; pp = &(*pp)->next)
        if (strcmp((*pp)->claims.request_id, rid) == 0)
            break;
    if (at != NULL)
        *at = pp;
    return *pp;
}

int keyaudit_begin(keyaudit *a, const proto_claims *claims,
                   const char *operation, const char *key, const char *token)
{
    pending *p;
    int r = 0;

    pthread_mutex_lock(&a->lock);
    p = find(a, claims->request_id, NULL);
    if (p == NULL) {
        if (a->count >= KEYAUDIT_PENDING_MAX ||
            (p = calloc(1, sizeof(*p))) == NULL) {
            r = -1;
        } else {
            p->claims = *claims;
            snprintf(p->operation, sizeof(p->operation), "%s", operation);
            snprintf(p->key, sizeof(p->key), "%s", key);
            snprintf(p->token, sizeof(p->token), "%s", token);
            clock_gettime(CLOCK_MONOTONIC, &p->first);
            p->next = a->list;
            a->list = p;
            a->count++;
        }
    }
    if (r == 0)
        p->running++;
    pthread_mutex_unlock(&a->lock);
    return r;
}

void keyaudit_end(keyaudit *a, const char *request_id)
{
    pending *p, **at;
    long ms = KEYAUDIT_FINISH_MS;

    pthread_mutex_lock(&a->lock);
    p = find(a, request_id, &at);
    if (p != NULL && p->running > 0 && --p->running == 0) {
        p->deadline = deadline_after(CLOCK_MONOTONIC, ms);
        if (p->lost) {
            *at = p->next;
            a->count--;
            p->next = NULL;
        } else {
            p = NULL;
        }
    } else {
        p = NULL;
    }
    pthread_mutex_unlock(&a->lock);
    write_lost(a, p);
}

int keyaudit_finish(keyaudit *a, const proto_finish_req *m)
{
    pending *p, **at;
    int r;

    pthread_mutex_lock(&a->lock);
    p = find(a, m->request_id, &at);
    if (p != NULL) {
        *at = p->next;
        a->count--;
    }
    pthread_mutex_unlock(&a->lock);
    if (p == NULL)
        return 0;
    r = write_finish(p, m->result, m->error[0] != '\0' ? m->error : NULL,
                     m->latency_us / 1000.0) == 0
            ? 1
            : -1;
    free(p);
    return r;
}

int keyaudit_expire(keyaudit *a, int gone)
{
    pending *out = NULL, *p, **pp;
    long left, soonest = -1;

    pthread_mutex_lock(&a->lock);
    for (pp = &a->list; (p = *pp) != NULL;) {
        if (p->running > 0) {
            p->lost |= gone;
            pp = &p->next;
            continue;
        }
        left = deadline_ms_left(&p->deadline, CLOCK_MONOTONIC);
        if (gone || left == 0) {
            *pp = p->next;
            a->count--;
            p->next = out;
            out = p;
            continue;
        }
        if (soonest < 0 || left < soonest)
            soonest = left;
        pp = &p->next;
    }
    pthread_mutex_unlock(&a->lock);
    write_lost(a, out);
    return soonest < 0 ? -1 : (int)soonest + 1;
}
