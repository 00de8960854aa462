/*
 * Connection admission and the header deadline.
 *
 * The counts are the shared region's (service/shared.h): the accept
 * policy reads them, decides and takes a connection record in one step
 * under the region's lock, since workers accept on one socket in
 * parallel. libmicrohttpd can still drop a connection after its policy
 * said yes (no memory, its own firm limit) without reporting it started;
 * the policy and STARTED run on the same accepting thread, one connection
 * after the other, so the record taken waits in a thread-local "pending"
 * until STARTED claims it, and the next admission on that thread gives
 * back one that nobody claimed.
 *
 * One mutex guards this process's list of connections (the watchdog's).
 *
 * A connection's state changes without the lock, by compare-and-swap:
 *   WAIT  (header not complete; deadline set)  -> BUSY  by the handler
 *   WAIT                                       -> SHUT  by the watchdog
 *   BUSY  (a request is being served)          -> IDLE  at its end
 *   IDLE  (between keep-alive requests)        -> WAIT  by the watchdog,
 *                                                       once bytes arrive
 *   IDLE                                       -> BUSY  by the handler
 * The watchdog shuts a socket down (never closes it) under the mutex, and
 * conns_close unlinks the entry under the same mutex before libmicrohttpd
 * closes the descriptor, so the descriptor it shuts down is always the
 * connection's own.
 */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <linux/tcp.h> /* struct tcp_info with tcpi_bytes_received */

#include "common/deadline.h"
#include "service/conns.h"
#include "service/log.h"
#include "service/shared.h"

enum { ST_WAIT, ST_BUSY, ST_IDLE, ST_SHUT };

/* How often idle keep-alive connections are looked at for a new request
 * (a getsockopt each); its header deadline starts when that is seen. */
#define IDLE_POLL_MS 1000
/* Deadlines are kept to within this: at most one pass over the
 * connections this often, however many deadlines fall in between. */
#define PASS_MIN_MS 100
/* The last 1/RESERVE_PART of max_connections is the reserve, and there an
 * address must hold fewer than 1/RESERVE_PART of the free slots. */
#define RESERVE_PART 8
/* The log reports shut-down and refused connections at most this often. */
#define REPORT_EVERY_S 60

/* An address: IPv4 as ::ffff:a.b.c.d, IPv6 by its /64 (one host or site
 * picks freely among 2^64 addresses of its own). */
typedef struct addr_key {
    unsigned char b[16];
} addr_key;

struct conns_entry {
    conns_entry *prev, *next;
    int fd;
    unsigned rec;        /* its record in the region */
    int state;           /* ST_*, atomic */
    uint64_t idle_bytes; /* atomic: bytes received when it went idle */
    struct timespec deadline;
    addr_key key;
};

struct conns {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* CLOCK_MONOTONIC */
    pthread_t thread;
    int started, stop;
    unsigned max_connections, max_per_ip, header_timeout_s;
    shared *region; /* borrowed */
    conns_entry *head;
    /* this process's, for the log line; /metrics has the region's sums */
    uint64_t header_timeouts, refused_per_ip, refused_reserve;
};

/* Why conns_admit refused (shared_admit_fn's reasons). */
enum { REFUSE_PER_IP = 1, REFUSE_RESERVE = 2 };

/* A record the accept policy took on this thread that STARTED has not
 * claimed yet. */
static __thread struct {
    conns *c;
    unsigned rec;
    addr_key key;
} pending;

static void key_of(const struct sockaddr *sa, socklen_t len, addr_key *k)
{
    memset(k, 0, sizeof(*k));
    if (sa != NULL && sa->sa_family == AF_INET &&
        len >= (socklen_t)sizeof(struct sockaddr_in)) {
        k->b[10] = k->b[11] = 0xff;
        memcpy(&k->b[12], &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa != NULL && sa->sa_family == AF_INET6 &&
               len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a =
            &((const struct sockaddr_in6 *)sa)->sin6_addr;

        memcpy(k->b, a, 16);
        if (!IN6_IS_ADDR_V4MAPPED(a))
            memset(&k->b[8], 0, 8);
    }
}

static int before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec ||
           (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* Bytes the kernel has received on fd; UINT64_MAX when it does not say. */
static uint64_t received(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);

    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 ||
        len < offsetof(struct tcp_info, tcpi_bytes_received) +
                  sizeof(ti.tcpi_bytes_received))
        return UINT64_MAX;
    return ti.tcpi_bytes_received;
}

static int state_move(conns_entry *e, int from, int to)
{
    return __atomic_compare_exchange_n(&e->state, &from, to, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* One pass over every connection, idle ones too when poll_idle; returns
 * when the next deadline is (at the latest *idle_due). */
static struct timespec watch_pass(conns *c, const struct timespec *now,
                                  int poll_idle,
                                  const struct timespec *idle_due)
{
    struct timespec next = *idle_due;
    conns_entry *e;
    uint64_t bytes, now_bytes;

    for (e = c->head; e != NULL; e = e->next) {
        switch (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE)) {
        case ST_WAIT:
            if (!before(now, &e->deadline)) {
                if (state_move(e, ST_WAIT, ST_SHUT)) {
                    shutdown(e->fd, SHUT_RDWR);
                    c->header_timeouts++;
                    shared_count(c->region, SHARED_HEADER_TIMEOUTS, 1);
                }
            } else if (before(&e->deadline, &next)) {
                next = e->deadline;
            }
            break;
        case ST_IDLE:
            bytes = __atomic_load_n(&e->idle_bytes, __ATOMIC_RELAXED);
            if (!poll_idle || bytes == UINT64_MAX)
                break;
            now_bytes = received(e->fd);
            if (now_bytes == UINT64_MAX || now_bytes == bytes)
                break;
            e->deadline =
                deadline_after(CLOCK_MONOTONIC, 1000L * c->header_timeout_s);
            if (state_move(e, ST_IDLE, ST_WAIT) && before(&e->deadline, &next))
                next = e->deadline;
            break;
        default:
            break;
        }
    }
    return next;
}

static void *watch(void *arg)
{
    conns *c = arg;
    struct timespec now, next, soonest, idle_due, reported = {0, 0};
    uint64_t seen[3] = {0, 0, 0}, counts[3];
    int report, poll_idle;

    clock_gettime(CLOCK_MONOTONIC, &reported);
    idle_due = reported;
    pthread_mutex_lock(&c->lock);
    while (!c->stop) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        poll_idle = !before(&now, &idle_due);
        if (poll_idle)
            idle_due = deadline_after(CLOCK_MONOTONIC, IDLE_POLL_MS);
        next = watch_pass(c, &now, poll_idle, &idle_due);
        soonest = deadline_after(CLOCK_MONOTONIC, PASS_MIN_MS);
        if (before(&next, &soonest))
            next = soonest;
        counts[0] = c->header_timeouts;
        counts[1] = c->refused_per_ip;
        counts[2] = c->refused_reserve;
        report = now.tv_sec - reported.tv_sec >= REPORT_EVERY_S &&
                 memcmp(counts, seen, sizeof(seen)) != 0;
        if (report) {
            /* the log is I/O: not under the lock */
            pthread_mutex_unlock(&c->lock);
            log_warn("in the last %ld s: %llu connections shut down without "
                     "a complete request header in %u s, %llu refused at "
                     "max_connections_per_ip, %llu refused from the last "
                     "slots (kept for addresses that hold few)",
                     (long)(now.tv_sec - reported.tv_sec),
                     (unsigned long long)(counts[0] - seen[0]),
                     c->header_timeout_s,
                     (unsigned long long)(counts[1] - seen[1]),
                     (unsigned long long)(counts[2] - seen[2]));
            memcpy(seen, counts, sizeof(seen));
            reported = now;
            pthread_mutex_lock(&c->lock);
            continue;
        }
        if (!c->stop)
            pthread_cond_timedwait(&c->wake, &c->lock, &next);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static void conns_destroy(conns *c)
{
    pthread_cond_destroy(&c->wake);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

conns *conns_new(const conns_options *opts, shared *region, char *errbuf,
                 size_t errlen)
{
    conns *c = calloc(1, sizeof(*c));
    pthread_condattr_t attr;
    int rc;

    if (c == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c->wake, &attr);
    pthread_condattr_destroy(&attr);
    c->region = region;
    c->max_per_ip = opts->max_per_ip;
    /* the region's records are all there is, whatever a reload said */
    c->max_connections = opts->max_connections;
    if (c->max_connections > shared_max_connections(region))
        c->max_connections = shared_max_connections(region);
    c->header_timeout_s = opts->header_timeout_s;
    rc = pthread_create(&c->thread, NULL, watch, c);
    if (rc != 0) {
        snprintf(errbuf, errlen, "cannot start the connection watchdog: %s",
                 strerror(rc));
        goto fail;
    }
    c->started = 1;
    return c;
fail:
    conns_destroy(c);
    return NULL;
}

void conns_free(conns *c)
{
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->lock);
    c->stop = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    if (c->started)
        pthread_join(c->thread, NULL);
    conns_destroy(c);
}

/* The policy, under the region's lock: arithmetic only. */
static int admit_policy(void *arg, unsigned open, unsigned held)
{
    const conns *c = arg;
    unsigned free_slots =
        open < c->max_connections ? c->max_connections - open : 0;

    if (held >= c->max_per_ip)
        return REFUSE_PER_IP;
    if (free_slots <= c->max_connections / RESERVE_PART &&
        (uint64_t)held * RESERVE_PART >= free_slots)
        return REFUSE_RESERVE;
    return 0;
}

static int admit_always(void *arg, unsigned open, unsigned held)
{
    return 0;
}

/* A record taken for a connection libmicrohttpd dropped before STARTED. */
static void pending_drop(void)
{
    if (pending.c != NULL)
        shared_conn_give(pending.c->region, pending.rec);
    pending.c = NULL;
}

int conns_admit(conns *c, const struct sockaddr *sa, socklen_t len)
{
    addr_key k;
    unsigned rec;
    int r;

    key_of(sa, len, &k);
    pending_drop();
    r = shared_conn_take(c->region, k.b, admit_policy, c, &rec);
    if (r == 0) {
        pending.c = c;
        pending.rec = rec;
        pending.key = k;
        return 1;
    }
    pthread_mutex_lock(&c->lock);
    if (r == REFUSE_PER_IP)
        c->refused_per_ip++;
    else
        c->refused_reserve++;
    pthread_mutex_unlock(&c->lock);
    /* no record free at all counts with the reserve: the last slots */
    shared_count(
        c->region,
        r == REFUSE_PER_IP ? SHARED_REFUSED_PER_IP : SHARED_REFUSED_RESERVE, 1);
    return 0;
}

conns_entry *conns_open(conns *c, const struct sockaddr *sa, int fd)
{
    conns_entry *e = calloc(1, sizeof(*e));

    if (e == NULL) {
        pending_drop();
        shutdown(fd, SHUT_RDWR);
        return NULL;
    }
    /* libmicrohttpd keeps the address but not its length */
    key_of(sa,
           sa == NULL                 ? 0
           : sa->sa_family == AF_INET ? (socklen_t)sizeof(struct sockaddr_in)
                                      : (socklen_t)sizeof(struct sockaddr_in6),
           &e->key);
    if (pending.c == c && memcmp(&pending.key, &e->key, sizeof(e->key)) == 0) {
        e->rec = pending.rec;
        pending.c = NULL;
    } else {
        /* opened without an admission on this thread: counted now */
        pending_drop();
        if (shared_conn_take(c->region, e->key.b, admit_always, NULL,
                             &e->rec) != 0) {
            shutdown(fd, SHUT_RDWR);
            free(e);
            return NULL;
        }
    }
    e->fd = fd;
    e->state = ST_WAIT;
    e->idle_bytes = UINT64_MAX;
    e->deadline = deadline_after(CLOCK_MONOTONIC, 1000L * c->header_timeout_s);
    pthread_mutex_lock(&c->lock);
    e->next = c->head;
    if (c->head != NULL)
        c->head->prev = e;
    c->head = e;
    pthread_mutex_unlock(&c->lock);
    return e;
}

void conns_close(conns *c, conns_entry *e)
{
    if (e == NULL)
        return;
    pthread_mutex_lock(&c->lock);
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    pthread_mutex_unlock(&c->lock);
    shared_conn_give(c->region, e->rec);
    free(e);
}

int conns_begin_request(conns_entry *e)
{
    int st = __atomic_load_n(&e->state, __ATOMIC_ACQUIRE);

    while (st != ST_SHUT)
        if (__atomic_compare_exchange_n(&e->state, &st, ST_BUSY, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 0;
    return -1;
}

void conns_end_request(conns_entry *e)
{
    __atomic_store_n(&e->idle_bytes, received(e->fd), __ATOMIC_RELAXED);
    state_move(e, ST_BUSY, ST_IDLE);
}

void conns_get_stats(conns *c, conns_stats *st)
{
    st->open = shared_conn_open(c->region);
    st->header_timeouts = shared_sum(c->region, SHARED_HEADER_TIMEOUTS);
    st->refused_per_ip = shared_sum(c->region, SHARED_REFUSED_PER_IP);
    st->refused_reserve = shared_sum(c->region, SHARED_REFUSED_RESERVE);
}
