/*
 * The region shared by the workers. Layout, each part 64-byte aligned:
 *
 *   head        geometry (written once by the creator), the hash seed,
 *               the lock word, the number of free connection records
 *   records     max_connections x {owner slot + 1 (0: free), address}
 *   free        a stack of the free records' numbers
 *   addresses   open addressing, at least 2 x max_connections entries
 *               {address, count}, linear probing, backward-shift delete
 *   states      (slots + 1) x {counters, body bytes reserved}; the last is
 *               the creator's (the supervisor's restart count)
 *   areas       slots x area_bytes, laid out by metrics.c
 *
 * The records and the body bytes per slot are the truth; the free stack
 * and the address table are indexes over the records, kept under the lock
 * and rebuilt from the records whenever a slot is reclaimed, so a worker
 * that died halfway through changing them leaves nothing behind. The body
 * bytes in flight are the sum of the slots' reservations, taken under the
 * lock when reserving (so the limit holds exactly) and read without it
 * otherwise; a release is one atomic subtraction.
 *
 * The lock is one 32-bit word: 0, or the holder's id (its state index + 1)
 * with LOCK_WAITERS once someone sleeps on it (futex, not private: the
 * waiters are in other processes). No pointer ever lives in the region:
 * glibc's process-shared robust mutexes keep list pointers inside the
 * mutex, which a compromised worker could aim at another's memory. Every
 * value read from the region that becomes an index is loaded once into a
 * local and checked before use.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "service/shared.h"

#define MAGIC 0x736d696d65647368ULL /* "smimedsh" */
#define VERSION 1
#define ALIGN 64
#define LOCK_WAITERS 0x80000000u
/* Tries before sleeping: a holder keeps the lock for a few hundred
 * instructions. */
#define SPINS 100
/* A sleeper looks again this often, whatever it was told. */
#define SLEEP_MS 50
/* The supervisor waits this long for a live holder before taking the lock
 * from it (a holder that slow is stuck or hostile). */
#define TAKEOVER_MS 1000

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

struct head {
    uint64_t magic;
    uint32_t version, slots, max_conns, area_bytes;
    uint64_t seed, body_limit;
    uint32_t lock;
    uint32_t free_top;
};

struct rec {
    uint32_t owner; /* slot + 1; 0: free */
    uint32_t pad;
    unsigned char addr[SHARED_ADDR_LEN];
};

struct ip_ent {
    unsigned char addr[SHARED_ADDR_LEN];
    uint32_t count; /* 0: free */
    uint32_t pad;
};

struct state {
    _Alignas(ALIGN) uint64_t counter[SHARED_NCOUNTERS];
    uint64_t body; /* body bytes this slot holds */
};

_Static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0),
               "the region needs lock-free 64-bit atomics");

struct shared {
    unsigned char *base;
    size_t size;
    int fd;      /* the creator's, owned; -1 in a worker */
    int creator; /* made the region: takes and reclaims slots */
    unsigned slots, max_conns;
    size_t ip_slots; /* a power of two */
    size_t area_bytes, area_stride;
    uint64_t seed, body_limit;
    struct head *head;
    struct rec *recs;
    uint32_t *free;
    struct ip_ent *ip;
    struct state *states;
    unsigned char *areas;
    unsigned self;       /* index into states: the slot, or slots (creator) */
    uint32_t id;         /* lock owner id: self + 1 */
    unsigned char *live; /* the creator's: slots in use */
};

static size_t aligned(size_t n)
{
    return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1);
}

/* Offsets from the geometry alone; the caller has bounded the inputs, so
 * nothing overflows. */
static void layout(shared *s)
{
    size_t off, page = (size_t)sysconf(_SC_PAGESIZE);

    for (s->ip_slots = 16; s->ip_slots < 2 * (size_t)s->max_conns;)
        s->ip_slots *= 2;
    s->area_stride = aligned(s->area_bytes);
    off = aligned(sizeof(struct head));
    s->recs = (struct rec *)(s->base + off);
    off += aligned(s->max_conns * sizeof(struct rec));
    s->free = (uint32_t *)(s->base + off);
    off += aligned(s->max_conns * sizeof(uint32_t));
    s->ip = (struct ip_ent *)(s->base + off);
    off += aligned(s->ip_slots * sizeof(struct ip_ent));
    s->states = (struct state *)(s->base + off);
    off += (s->slots + 1) * sizeof(struct state);
    s->areas = s->base + off;
    off += s->slots * s->area_stride;
    s->size = (off + page - 1) / page * page;
}

static int geometry_ok(unsigned slots, unsigned max_conns, size_t area)
{
    return slots >= 1 && slots <= SHARED_SLOTS_MAX && max_conns >= 1 &&
           max_conns <= SHARED_CONNECTIONS_MAX && area <= SHARED_AREA_MAX;
}

/* The region's size, from a geometry, before anything is mapped. */
static size_t size_of(unsigned slots, unsigned max_conns, size_t area)
{
    shared probe = {0};

    probe.slots = slots;
    probe.max_conns = max_conns;
    probe.area_bytes = area;
    layout(&probe);
    return probe.size;
}

static shared *handle_new(void)
{
    shared *s = calloc(1, sizeof(*s));

    if (s != NULL)
        s->fd = -1;
    return s;
}

void shared_free(shared *s)
{
    if (s == NULL)
        return;
    if (s->base != NULL)
        munmap(s->base, s->size);
    if (s->fd >= 0)
        close(s->fd);
    free(s->live);
    free(s);
}

shared *shared_create(const shared_options *o, char *errbuf, size_t errlen)
{
    shared *s = handle_new(), *ret = NULL;
    void *p;
    unsigned i;

    if (s == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    if (!geometry_ok(o->slots, o->max_connections, o->area_bytes) ||
        o->body_limit == 0) {
        snprintf(errbuf, errlen, "shared region: geometry out of range");
        goto out;
    }
    s->creator = 1;
    s->slots = o->slots;
    s->max_conns = o->max_connections;
    s->area_bytes = o->area_bytes;
    s->body_limit = o->body_limit;
    s->self = s->slots;
    s->id = s->self + 1;
    s->live = calloc(s->slots, 1);
    if (s->live == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    s->size = size_of(s->slots, s->max_conns, s->area_bytes);
    s->fd = memfd_create("smimed-shared", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (s->fd < 0 || ftruncate(s->fd, (off_t)s->size) != 0 ||
        fcntl(s->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) !=
            0) {
        snprintf(errbuf, errlen, "shared region: %s", strerror(errno));
        goto out;
    }
    p = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (p == MAP_FAILED) {
        snprintf(errbuf, errlen, "shared region: mmap: %s", strerror(errno));
        goto out;
    }
    s->base = p;
    layout(s);
    s->head = (struct head *)s->base;
    if (getrandom(&s->seed, sizeof(s->seed), 0) != sizeof(s->seed))
        s->seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 32;
    s->head->magic = MAGIC;
    s->head->version = VERSION;
    s->head->slots = s->slots;
    s->head->max_conns = s->max_conns;
    s->head->area_bytes = (uint32_t)s->area_bytes;
    s->head->seed = s->seed;
    s->head->body_limit = s->body_limit;
    /* popped from the top: record 0 first */
    for (i = 0; i < s->max_conns; i++)
        s->free[i] = s->max_conns - 1 - i;
    s->head->free_top = s->max_conns;
    ret = s;
    s = NULL;
out:
    shared_free(s);
    return ret;
}

int shared_fd(const shared *s)
{
    return s->fd;
}

shared *shared_attach(int fd, unsigned slot, char *errbuf, size_t errlen)
{
    shared *s = handle_new(), *ret = NULL;
    const struct head *h;
    struct stat st;
    int seals;
    void *p;

    if (s == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    /* a region nobody can shrink: no SIGBUS from a worker's ftruncate */
    seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || seals < 0 ||
        (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) !=
            (F_SEAL_SHRINK | F_SEAL_GROW) ||
        st.st_size <= 0 ||
        (uint64_t)st.st_size > size_of(SHARED_SLOTS_MAX, SHARED_CONNECTIONS_MAX,
                                       SHARED_AREA_MAX)) {
        snprintf(errbuf, errlen, "descriptor %d is not a sealed region", fd);
        goto out;
    }
    p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
             0);
    if (p == MAP_FAILED) {
        snprintf(errbuf, errlen, "shared region: mmap: %s", strerror(errno));
        goto out;
    }
    s->base = p;
    s->size = (size_t)st.st_size;
    h = p;
    /* read once: from here on only the private copy counts */
    s->slots = __atomic_load_n(&h->slots, __ATOMIC_RELAXED);
    s->max_conns = __atomic_load_n(&h->max_conns, __ATOMIC_RELAXED);
    s->area_bytes = __atomic_load_n(&h->area_bytes, __ATOMIC_RELAXED);
    s->seed = __atomic_load_n(&h->seed, __ATOMIC_RELAXED);
    s->body_limit = __atomic_load_n(&h->body_limit, __ATOMIC_RELAXED);
    if (__atomic_load_n(&h->magic, __ATOMIC_RELAXED) != MAGIC ||
        __atomic_load_n(&h->version, __ATOMIC_RELAXED) != VERSION ||
        !geometry_ok(s->slots, s->max_conns, s->area_bytes) ||
        size_of(s->slots, s->max_conns, s->area_bytes) != s->size ||
        slot >= s->slots) {
        snprintf(errbuf, errlen,
                 "shared region: geometry does not match its size, or slot "
                 "%u is past its slots",
                 slot);
        goto out;
    }
    layout(s);
    s->head = (struct head *)s->base;
    s->self = slot;
    s->id = slot + 1;
    ret = s;
    s = NULL;
out:
    shared_free(s);
    return ret;
}

unsigned shared_slots(const shared *s)
{
    return s->slots;
}

unsigned shared_max_connections(const shared *s)
{
    return s->max_conns;
}

int shared_self(const shared *s)
{
    return s->creator ? -1 : (int)s->self;
}

void *shared_area(const shared *s, unsigned slot)
{
    return slot < s->slots ? s->areas + (size_t)slot * s->area_stride : NULL;
}

/* ---- the lock ---- */

static void futex_wait(uint32_t *w, uint32_t val, long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};

    syscall(SYS_futex, w, FUTEX_WAIT, val, &t, NULL, 0);
}

static void futex_wake(uint32_t *w)
{
    syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static int lock_try(uint32_t *w, uint32_t *cur, uint32_t want)
{
    *cur = 0;
    return __atomic_compare_exchange_n(w, cur, want, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

/* Sleeps on w while it holds cur, with the waiters flag set. */
static void lock_sleep(uint32_t *w, uint32_t cur)
{
    if (!(cur & LOCK_WAITERS) &&
        !__atomic_compare_exchange_n(w, &cur, cur | LOCK_WAITERS, 0,
                                     __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return;
    futex_wait(w, cur | LOCK_WAITERS, SLEEP_MS);
}

static void region_lock(shared *s)
{
    uint32_t *w = &s->head->lock, cur, want = s->id;
    unsigned spins = 0;

    while (!lock_try(w, &cur, want)) {
        if (spins++ < SPINS) {
            cpu_relax();
            continue;
        }
        /* a sleeper keeps the flag when it gets the lock: others may
         * still sleep */
        want = s->id | LOCK_WAITERS;
        lock_sleep(w, cur);
    }
}

static void region_unlock(shared *s)
{
    if (__atomic_exchange_n(&s->head->lock, 0, __ATOMIC_RELEASE) & LOCK_WAITERS)
        futex_wake(&s->head->lock);
}

static double now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* The creator's lock for a reclaim: 0, 1 taken from the dead, 2 forced. */
static int region_lock_reclaim(shared *s, uint32_t dead)
{
    uint32_t *w = &s->head->lock, cur, want = s->id | LOCK_WAITERS;
    double deadline = now_ms() + TAKEOVER_MS;

    while (!lock_try(w, &cur, want)) {
        if ((cur & ~LOCK_WAITERS) == dead) {
            if (__atomic_compare_exchange_n(w, &cur, want, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED))
                return 1;
            continue;
        }
        if (now_ms() > deadline) {
            __atomic_exchange_n(w, want, __ATOMIC_ACQUIRE);
            return 2;
        }
        lock_sleep(w, cur);
    }
    return 0;
}

/* ---- the address table (under the lock) ---- */

static size_t home_of(const shared *s, const unsigned char *k)
{
    uint64_t h = s->seed, w;
    size_t i;

    for (i = 0; i < SHARED_ADDR_LEN; i += 8) {
        memcpy(&w, &k[i], 8);
        h ^= w;
        h *= 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
    }
    return (size_t)h & (s->ip_slots - 1);
}

/* The entry holding k, or the free one where it would go; NULL when a
 * whole lap found neither (only a corrupted table is full). */
static struct ip_ent *ip_find(shared *s, const unsigned char *k)
{
    size_t i = home_of(s, k), n;

    for (n = 0; n < s->ip_slots; n++, i = (i + 1) & (s->ip_slots - 1))
        if (__atomic_load_n(&s->ip[i].count, __ATOMIC_RELAXED) == 0 ||
            memcmp(s->ip[i].addr, k, SHARED_ADDR_LEN) == 0)
            return &s->ip[i];
    return NULL;
}

/* 1 when h lies in the cyclic range (from, to]. */
static int between(size_t from, size_t h, size_t to)
{
    return from < to ? from < h && h <= to : from < h || h <= to;
}

/* Frees entry i, moving back later entries that probed past it. */
static void ip_free(shared *s, size_t i)
{
    size_t mask = s->ip_slots - 1, j = i, h, n;

    for (n = 0; n < s->ip_slots; n++) {
        j = (j + 1) & mask;
        if (__atomic_load_n(&s->ip[j].count, __ATOMIC_RELAXED) == 0)
            break;
        h = home_of(s, s->ip[j].addr);
        if (!between(i, h, j)) {
            memcpy(&s->ip[i], &s->ip[j], sizeof(s->ip[i]));
            i = j;
        }
    }
    __atomic_store_n(&s->ip[i].count, 0, __ATOMIC_RELAXED);
}

static void ip_add(shared *s, const unsigned char *k)
{
    struct ip_ent *e = ip_find(s, k);

    if (e == NULL)
        return;
    if (e->count == 0)
        memcpy(e->addr, k, SHARED_ADDR_LEN);
    e->count++;
}

static void ip_remove(shared *s, const unsigned char *k)
{
    struct ip_ent *e = ip_find(s, k);
    uint32_t n;

    if (e == NULL)
        return;
    n = __atomic_load_n(&e->count, __ATOMIC_RELAXED);
    if (n > 1)
        __atomic_store_n(&e->count, n - 1, __ATOMIC_RELAXED);
    else if (n == 1)
        ip_free(s, (size_t)(e - s->ip));
}

/* ---- connections ---- */

int shared_conn_take(shared *s, const unsigned char addr[SHARED_ADDR_LEN],
                     shared_admit_fn admit, void *arg, unsigned *rec)
{
    struct ip_ent *e;
    unsigned held = 0, open;
    uint32_t top, r;
    int ret;

    if (s->creator)
        return -1;
    region_lock(s);
    e = ip_find(s, addr);
    if (e != NULL)
        held = __atomic_load_n(&e->count, __ATOMIC_RELAXED);
    top = __atomic_load_n(&s->head->free_top, __ATOMIC_RELAXED);
    if (top > s->max_conns)
        top = 0; /* corrupted: nothing is free */
    open = s->max_conns - top;
    ret = admit(arg, open, held);
    if (ret != 0)
        goto out;
    ret = -1;
    if (e == NULL || top == 0)
        goto out;
    r = __atomic_load_n(&s->free[top - 1], __ATOMIC_RELAXED);
    if (r >= s->max_conns ||
        __atomic_load_n(&s->recs[r].owner, __ATOMIC_RELAXED) != 0)
        goto out;
    __atomic_store_n(&s->head->free_top, top - 1, __ATOMIC_RELAXED);
    memcpy(s->recs[r].addr, addr, SHARED_ADDR_LEN);
    __atomic_store_n(&s->recs[r].owner, s->id, __ATOMIC_RELAXED);
    ip_add(s, addr);
    *rec = r;
    ret = 0;
out:
    region_unlock(s);
    return ret;
}

void shared_conn_give(shared *s, unsigned rec)
{
    unsigned char addr[SHARED_ADDR_LEN];
    uint32_t top;

    if (rec >= s->max_conns)
        return;
    region_lock(s);
    if (__atomic_load_n(&s->recs[rec].owner, __ATOMIC_RELAXED) == s->id) {
        memcpy(addr, s->recs[rec].addr, sizeof(addr));
        ip_remove(s, addr);
        __atomic_store_n(&s->recs[rec].owner, 0, __ATOMIC_RELAXED);
        top = __atomic_load_n(&s->head->free_top, __ATOMIC_RELAXED);
        if (top < s->max_conns) {
            __atomic_store_n(&s->free[top], rec, __ATOMIC_RELAXED);
            __atomic_store_n(&s->head->free_top, top + 1, __ATOMIC_RELAXED);
        }
    }
    region_unlock(s);
}

unsigned shared_conn_open(const shared *s)
{
    uint32_t top = __atomic_load_n(&s->head->free_top, __ATOMIC_RELAXED);

    return top <= s->max_conns ? s->max_conns - top : s->max_conns;
}

/* ---- the body budget ---- */

static uint64_t body_sum(const shared *s)
{
    uint64_t sum = 0, n;
    unsigned i;

    for (i = 0; i <= s->slots; i++) {
        n = __atomic_load_n(&s->states[i].body, __ATOMIC_RELAXED);
        sum = n > UINT64_MAX - sum ? UINT64_MAX : sum + n;
    }
    return sum;
}

int shared_body_reserve(shared *s, uint64_t n)
{
    uint64_t sum;
    int ok;

    if (n == 0)
        return 0;
    region_lock(s);
    sum = body_sum(s);
    ok = n <= s->body_limit && sum <= s->body_limit - n;
    if (ok)
        __atomic_add_fetch(&s->states[s->self].body, n, __ATOMIC_RELAXED);
    region_unlock(s);
    if (!ok)
        shared_count(s, SHARED_BODY_REFUSALS, 1);
    return ok ? 0 : -1;
}

void shared_body_release(shared *s, uint64_t n)
{
    if (n > 0)
        __atomic_sub_fetch(&s->states[s->self].body, n, __ATOMIC_RELAXED);
}

/* Under the lock: slots read one by one without it could show one slot's
 * release late and another's later reservation, a sum past the limit. */
uint64_t shared_body_in_flight(shared *s)
{
    uint64_t sum;

    region_lock(s);
    sum = body_sum(s);
    region_unlock(s);
    return sum;
}

uint64_t shared_body_limit(const shared *s)
{
    return s->body_limit;
}

/* ---- counters ---- */

void shared_count(shared *s, shared_counter c, int64_t delta)
{
    if ((unsigned)c < SHARED_NCOUNTERS)
        __atomic_add_fetch(&s->states[s->self].counter[c], (uint64_t)delta,
                           __ATOMIC_RELAXED);
}

static int is_gauge(shared_counter c)
{
    return c == SHARED_REQUESTS_IN_FLIGHT;
}

uint64_t shared_sum(const shared *s, shared_counter c)
{
    uint64_t sum = 0;
    unsigned i;

    if ((unsigned)c >= SHARED_NCOUNTERS)
        return 0;
    for (i = 0; i <= s->slots; i++)
        sum += __atomic_load_n(&s->states[i].counter[c], __ATOMIC_RELAXED);
    /* a gauge's parts go up and down: a sum "below zero" is a moment of
     * skew between slots */
    if (is_gauge(c) && (int64_t)sum < 0)
        return 0;
    return sum;
}

/* ---- slots (the creator) ---- */

int shared_slot_take(shared *s)
{
    unsigned i;

    if (!s->creator)
        return -1;
    for (i = 0; i < s->slots; i++)
        if (!s->live[i]) {
            s->live[i] = 1;
            return (int)i;
        }
    return -1;
}

/* Under the lock: the free stack and the address table again from the
 * records, keeping only those of live slots. */
static void rebuild(shared *s)
{
    uint32_t top = 0, owner, i;

    memset(s->ip, 0, s->ip_slots * sizeof(*s->ip));
    for (i = 0; i < s->max_conns; i++) {
        owner = __atomic_load_n(&s->recs[i].owner, __ATOMIC_RELAXED);
        if (owner == 0 || owner > s->slots || !s->live[owner - 1]) {
            __atomic_store_n(&s->recs[i].owner, 0, __ATOMIC_RELAXED);
            s->free[top++] = i;
        } else {
            ip_add(s, s->recs[i].addr);
        }
    }
    __atomic_store_n(&s->head->free_top, top, __ATOMIC_RELAXED);
}

int shared_slot_reclaim(shared *s, unsigned slot)
{
    struct state *st;
    unsigned c;
    int r;

    if (!s->creator || slot >= s->slots)
        return 0;
    r = region_lock_reclaim(s, slot + 1);
    s->live[slot] = 0;
    st = &s->states[slot];
    __atomic_store_n(&st->body, 0, __ATOMIC_RELAXED);
    for (c = 0; c < SHARED_NCOUNTERS; c++)
        if (is_gauge((shared_counter)c))
            __atomic_store_n(&st->counter[c], 0, __ATOMIC_RELAXED);
    rebuild(s);
    region_unlock(s);
    return r;
}
