/*
 * Connection admission and the header deadline.
 *
 * One mutex guards the address table and the list of connections. The
 * address table is a fixed array with linear probing (at most
 * max_connections addresses are ever in it, and it has at least twice as
 * many slots), so admission allocates nothing and the table could live in
 * a shared mapping. Admission only reads it: a connection is counted when
 * libmicrohttpd reports it started, since it may still drop one after the
 * accept policy said yes; both run on the accepting thread.
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
#include <sys/random.h>

#include "service/conns.h"
#include "service/log.h"

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

typedef struct slot {
    addr_key key;
    unsigned count; /* 0: free */
} slot;

struct conns_entry {
    conns_entry *prev, *next;
    int fd;
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
    conns_entry *head;
    unsigned open;
    slot *slots;
    size_t nslots; /* a power of two */
    uint64_t seed;
    uint64_t header_timeouts, refused_per_ip, refused_reserve;
};

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

/* Seeded, so addresses chosen to collide cannot be computed in advance. */
static size_t home_of(const conns *c, const addr_key *k)
{
    uint64_t h = c->seed, w;
    size_t i;

    for (i = 0; i < sizeof(k->b); i += 8) {
        memcpy(&w, &k->b[i], 8);
        h ^= w;
        h *= 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
    }
    return (size_t)h & (c->nslots - 1);
}

/* The slot holding k, or the free slot where it would go. */
static slot *slot_find(conns *c, const addr_key *k)
{
    size_t i = home_of(c, k), n;

    for (n = 0; n < c->nslots; n++, i = (i + 1) & (c->nslots - 1))
        if (c->slots[i].count == 0 ||
            memcmp(&c->slots[i].key, k, sizeof(*k)) == 0)
            return &c->slots[i];
    return NULL;
}

/* 1 when h lies in the cyclic range (from, to]. */
static int between(size_t from, size_t h, size_t to)
{
    return from < to ? from < h && h <= to : from < h || h <= to;
}

/* Frees slot s, moving back later entries that probed past it (linear
 * probing's deletion without tombstones). */
static void slot_free(conns *c, slot *s)
{
    size_t mask = c->nslots - 1, i = (size_t)(s - c->slots), j = i, h;

    for (;;) {
        j = (j + 1) & mask;
        if (c->slots[j].count == 0)
            break;
        h = home_of(c, &c->slots[j].key);
        if (!between(i, h, j)) {
            c->slots[i] = c->slots[j];
            i = j;
        }
    }
    c->slots[i].count = 0;
}

static struct timespec now_plus_ms(long ms)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
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
            e->deadline = now_plus_ms(1000L * c->header_timeout_s);
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
            idle_due = now_plus_ms(IDLE_POLL_MS);
        next = watch_pass(c, &now, poll_idle, &idle_due);
        soonest = now_plus_ms(PASS_MIN_MS);
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
    free(c->slots);
    free(c);
}

conns *conns_new(const conns_options *opts, char *errbuf, size_t errlen)
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
    c->max_per_ip = opts->max_per_ip;
    c->max_connections = opts->max_connections;
    c->header_timeout_s = opts->header_timeout_s;
    for (c->nslots = 16; c->nslots < 2 * (size_t)opts->max_connections;)
        c->nslots *= 2;
    c->slots = calloc(c->nslots, sizeof(*c->slots));
    if (c->slots == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto fail;
    }
    if (getrandom(&c->seed, sizeof(c->seed), 0) != sizeof(c->seed))
        c->seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 32;
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

int conns_admit(conns *c, const struct sockaddr *sa, socklen_t len)
{
    addr_key k;
    slot *s;
    unsigned held, free_slots;
    int ok = 1;

    key_of(sa, len, &k);
    pthread_mutex_lock(&c->lock);
    s = slot_find(c, &k);
    held = s != NULL ? s->count : 0;
    free_slots =
        c->open < c->max_connections ? c->max_connections - c->open : 0;
    if (held >= c->max_per_ip) {
        c->refused_per_ip++;
        ok = 0;
    } else if (free_slots <= c->max_connections / RESERVE_PART &&
               (uint64_t)held * RESERVE_PART >= free_slots) {
        c->refused_reserve++;
        ok = 0;
    }
    pthread_mutex_unlock(&c->lock);
    return ok;
}

conns_entry *conns_open(conns *c, const struct sockaddr *sa, int fd)
{
    conns_entry *e = calloc(1, sizeof(*e));
    slot *s;

    if (e == NULL) {
        shutdown(fd, SHUT_RDWR);
        return NULL;
    }
    /* libmicrohttpd keeps the address but not its length */
    key_of(sa,
           sa == NULL                 ? 0
           : sa->sa_family == AF_INET ? (socklen_t)sizeof(struct sockaddr_in)
                                      : (socklen_t)sizeof(struct sockaddr_in6),
           &e->key);
    e->fd = fd;
    e->state = ST_WAIT;
    e->idle_bytes = UINT64_MAX;
    e->deadline = now_plus_ms(1000L * c->header_timeout_s);
    pthread_mutex_lock(&c->lock);
    s = slot_find(c, &e->key);
    if (s == NULL) {
        /* more addresses than max_connections: cannot happen */
        pthread_mutex_unlock(&c->lock);
        shutdown(fd, SHUT_RDWR);
        free(e);
        return NULL;
    }
    if (s->count++ == 0)
        s->key = e->key;
    e->next = c->head;
    if (c->head != NULL)
        c->head->prev = e;
    c->head = e;
    c->open++;
    pthread_mutex_unlock(&c->lock);
    return e;
}

void conns_close(conns *c, conns_entry *e)
{
    slot *s;

    if (e == NULL)
        return;
    pthread_mutex_lock(&c->lock);
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    c->open--;
    s = slot_find(c, &e->key);
    if (s != NULL && s->count > 0 && --s->count == 0)
        slot_free(c, s);
    pthread_mutex_unlock(&c->lock);
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
    pthread_mutex_lock(&c->lock);
    st->open = c->open;
    st->header_timeouts = c->header_timeouts;
    st->refused_per_ip = c->refused_per_ip;
    st->refused_reserve = c->refused_reserve;
    pthread_mutex_unlock(&c->lock);
}
