/*
 * The shared region across real processes: forked workers on their own
 * slots hammering connection records and body bytes (the counts exact,
 * the limits never passed), reclaim of what a killed worker held (also
 * when it died holding the lock), a worker scribbling over the whole
 * region (the others keep going), and attach refusing what is not a
 * sealed region of its geometry.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "service/shared.h"
#include "tap.h"

#define SLOTS 6
#define CONNS 64
#define LIMIT 1000
#define AREA 256
#define WORKERS 4
#define ROUNDS 200000
#define PER_IP 5

/* 10.0.0.n as conns.c keys it */
static void addr_n(unsigned n, unsigned char a[SHARED_ADDR_LEN])
{
    memset(a, 0, SHARED_ADDR_LEN);
    a[10] = a[11] = 0xff;
    a[12] = 10;
    a[15] = (unsigned char)n;
}

/* admit callbacks: arg is the limit per address, or where to note */
static int admit_any(void *arg, unsigned open, unsigned held)
{
    return 0;
}

static int admit_per_ip(void *arg, unsigned open, unsigned held)
{
    return held >= *(unsigned *)arg ? 1 : open >= CONNS ? 2 : 0;
}

typedef struct seen {
    unsigned open, held;
} seen;

/* Refuses, noting the counts as they are under the lock. */
static int admit_peek(void *arg, unsigned open, unsigned held)
{
    ((seen *)arg)->open = open;
    ((seen *)arg)->held = held;
    return 9;
}

static seen peek(shared *s, unsigned n)
{
    unsigned char a[SHARED_ADDR_LEN];
    seen v = {0, 0};
    unsigned rec;

    addr_n(n, a);
    shared_conn_take(s, a, admit_peek, &v, &rec);
    return v;
}

/* One worker's churn: connections from 4 addresses under PER_IP, and
 * body reservations; exits 0 when every check held. */
static int churn(int fd, unsigned slot)
{
    char errbuf[128];
    shared *s = shared_attach(fd, slot, errbuf, sizeof(errbuf));
    unsigned char a[SHARED_ADDR_LEN];
    unsigned recs[16], held = 0, limit = PER_IP, rec, i, seed = slot + 1;
    int bad = 0;

    if (s == NULL)
        return 2;
    for (i = 0; i < ROUNDS; i++) {
        seed = seed * 1103515245u + 12345u;
        shared_count(s, SHARED_HEADER_TIMEOUTS, 1);
        if (held > 0 && ((seed >> 16) % 2 == 0 || held == 16)) {
            shared_conn_give(s, recs[--held]);
            continue;
        }
        addr_n((seed >> 8) % 4, a);
        if (shared_conn_take(s, a, admit_per_ip, &limit, &rec) == 0) {
            recs[held++] = rec;
            if (peek(s, a[15]).held > PER_IP)
                bad = 1;
        }
        if (shared_body_reserve(s, 100 + (seed >> 20) % 300) == 0) {
            if (shared_body_in_flight(s) > LIMIT)
                bad = 1;
            shared_body_release(s, 100 + (seed >> 20) % 300);
        }
    }
    while (held > 0)
        shared_conn_give(s, recs[--held]);
    shared_free(s);
    return bad;
}

static void test_basics(shared *region, shared *w)
{
    unsigned char a[SHARED_ADDR_LEN];
    unsigned recs[8], limit = 3, rec, i;
    unsigned char *area;

    tap_ok(shared_slots(w) == SLOTS && shared_max_connections(w) == CONNS &&
               shared_self(w) == 0 && shared_self(region) == -1,
           "an attached worker sees the creator's geometry");
    addr_n(1, a);
    for (i = 0; i < 3; i++)
        tap_ok(shared_conn_take(w, a, admit_per_ip, &limit, &recs[i]) == 0,
               "connection %u from one address", i + 1);
    tap_ok(shared_conn_take(w, a, admit_per_ip, &limit, &rec) == 1,
           "the fourth is refused with admit's reason");
    tap_ok(peek(w, 1).held == 3 && peek(w, 1).open == 3 &&
               shared_conn_open(w) == 3,
           "three held, three open");
    shared_conn_give(w, recs[1]);
    shared_conn_give(w, recs[1]);
    shared_conn_give(w, 999999);
    tap_ok(peek(w, 1).held == 2 && shared_conn_open(w) == 2,
           "a record given twice, or past the end, counts once or not at all");
    shared_conn_give(w, recs[0]);
    shared_conn_give(w, recs[2]);
    tap_ok(peek(w, 1).held == 0 && shared_conn_open(w) == 0, "all given back");
    tap_ok(shared_conn_take(region, a, admit_any, NULL, &rec) == -1,
           "the creator's handle takes no connection");
    for (i = 0; i < CONNS; i++) {
        addr_n(i, a);
        if (shared_conn_take(w, a, admit_any, NULL, &rec) != 0)
            break;
    }
    addr_n(200, a);
    tap_ok(i == CONNS && shared_conn_take(w, a, admit_any, NULL, &rec) == -1,
           "max_connections records, then none");
    for (i = 0; i < CONNS; i++)
        shared_conn_give(w, i);
    tap_ok(shared_conn_open(w) == 0, "records are numbered 0 to max - 1");

    tap_ok(shared_body_reserve(w, 0) == 0, "nothing always fits");
    tap_ok(shared_body_reserve(w, 600) == 0 &&
               shared_body_reserve(w, 401) != 0 &&
               shared_body_reserve(w, 400) == 0 &&
               shared_body_in_flight(w) == LIMIT &&
               shared_body_reserve(w, UINT64_MAX) != 0,
           "reservations up to the limit, none past it, none that wraps");
    shared_body_release(w, 1000);
    tap_ok(shared_body_in_flight(w) == 0 &&
               shared_sum(w, SHARED_BODY_REFUSALS) == 2,
           "released; the refusals counted");

    area = shared_area(w, 0);
    tap_ok(area != NULL && shared_area(w, SLOTS) == NULL &&
               area == shared_area(w, 0) && area != shared_area(w, 1) &&
               area[0] == 0 && area[AREA - 1] == 0,
           "one zeroed area per slot");
}

static void test_hammer(shared *region, shared *w)
{
    pid_t pid[WORKERS];
    int status, ok = 1, slot;
    size_t i;
    uint64_t before = shared_sum(w, SHARED_HEADER_TIMEOUTS);

    for (i = 0; i < WORKERS; i++) {
        slot = shared_slot_take(region);
        pid[i] = fork();
        if (pid[i] == 0)
            _exit(churn(shared_fd(region), (unsigned)slot));
    }
    for (i = 0; i < WORKERS; i++) {
        waitpid(pid[i], &status, 0);
        ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    tap_ok(ok,
           "%d processes: never more than %d from one address, never "
           "more than %d body bytes",
           WORKERS, PER_IP, LIMIT);
    tap_ok(shared_conn_open(w) == 0 && peek(w, 0).held == 0 &&
               peek(w, 3).held == 0 && shared_body_in_flight(w) == 0,
           "every record and byte given back across the processes");
    tap_ok(
        shared_sum(w, SHARED_HEADER_TIMEOUTS) - before ==
            (uint64_t)WORKERS * ROUNDS,
        "counters from every slot sum exactly (%llu)",
        (unsigned long long)(shared_sum(w, SHARED_HEADER_TIMEOUTS) - before));
    for (i = 1; i <= WORKERS; i++)
        shared_slot_reclaim(region, (unsigned)i);
}

/* Says it is ready, then never returns: the lock stays held. */
static int admit_hang(void *arg, unsigned open, unsigned held)
{
    if (write(*(int *)arg, "x", 1) != 1)
        _exit(3);
    for (;;)
        pause();
}

/* A worker that holds connections, bytes and a gauge, then waits to be
 * killed; with hang_in_lock it waits inside admit, under the lock. */
static int holder(int fd, unsigned slot, int ready, int hang_in_lock)
{
    char errbuf[128];
    shared *s = shared_attach(fd, slot, errbuf, sizeof(errbuf));
    unsigned char a[SHARED_ADDR_LEN];
    unsigned rec, i;

    if (s == NULL)
        return 2;
    addr_n(7, a);
    for (i = 0; i < 10; i++)
        shared_conn_take(s, a, admit_any, NULL, &rec);
    addr_n(8, a);
    for (i = 0; i < 5; i++)
        shared_conn_take(s, a, admit_any, NULL, &rec);
    shared_body_reserve(s, 400);
    shared_count(s, SHARED_REQUESTS_IN_FLIGHT, 3);
    shared_count(s, SHARED_REFUSED_PER_IP, 7);
    if (!hang_in_lock) {
        if (write(ready, "x", 1) != 1)
            return 3;
        for (;;)
            pause();
    }
    addr_n(9, a);
    shared_conn_take(s, a, admit_hang, &ready, &rec);
    return 4;
}

static void test_reclaim(shared *region, shared *w, int hang)
{
    unsigned char a[SHARED_ADDR_LEN];
    unsigned rec, mine;
    int p[2], slot = shared_slot_take(region), r;
    uint64_t refused = shared_sum(w, SHARED_REFUSED_PER_IP);
    pid_t pid;
    char c;

    addr_n(7, a);
    shared_conn_take(w, a, admit_any, NULL, &mine);
    if (pipe(p) != 0)
        return;
    pid = fork();
    if (pid == 0)
        _exit(holder(shared_fd(region), (unsigned)slot, p[1], hang));
    close(p[1]);
    tap_ok(read(p[0], &c, 1) == 1, "the holder is ready");
    close(p[0]);
    if (!hang)
        tap_ok(shared_conn_open(w) == 16 && peek(w, 7).held == 11 &&
                   shared_body_in_flight(w) == 400 &&
                   shared_sum(w, SHARED_REQUESTS_IN_FLIGHT) == 3,
               "its holdings count for everyone");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    r = shared_slot_reclaim(region, (unsigned)slot);
    tap_ok(r == (hang ? 1 : 0), "reclaimed (%d: %s)", r,
           hang ? "it died holding the lock" : "the lock was free");
    tap_ok(shared_conn_open(w) == 1 && peek(w, 7).held == 1 &&
               peek(w, 8).held == 0 && shared_body_in_flight(w) == 0 &&
               shared_sum(w, SHARED_REQUESTS_IN_FLIGHT) == 0,
           "exactly what it held is given back, the other worker's kept");
    tap_ok(shared_sum(w, SHARED_REFUSED_PER_IP) - refused == 7,
           "its counters stay: sums only grow");
    shared_conn_give(w, mine);
    tap_ok(shared_conn_open(w) == 0 &&
               shared_conn_take(w, a, admit_any, NULL, &rec) == 0,
           "the region works on after the reclaim");
    shared_conn_give(w, rec);
}

/* A compromised worker writes garbage over everything; the others must
 * not crash, and the supervisor's reclaim puts the indexes right. */
static void test_scribble(shared *region, shared *w)
{
    unsigned char a[SHARED_ADDR_LEN];
    unsigned rec, i, limit = PER_IP;
    int slot = shared_slot_take(region), r, status;
    pid_t pid = fork();

    if (pid == 0) {
        struct stat st;
        unsigned char *p;
        unsigned seed = 99;
        size_t j;

        /* all of it, as a worker with its descriptor could */
        if (fstat(shared_fd(region), &st) != 0)
            _exit(1);
        p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                 shared_fd(region), 0);
        if (p == MAP_FAILED)
            _exit(1);
        for (j = 0; j < (size_t)st.st_size; j++) {
            seed = seed * 1103515245u + 12345u;
            p[j] = (unsigned char)(seed >> 16);
        }
        _exit(0);
    }
    waitpid(pid, &status, 0);
    r = shared_slot_reclaim(region, (unsigned)slot);
    tap_ok(r == 2, "the garbage lock word is taken after a second (%d)", r);
    for (i = 0; i < 2000; i++) {
        addr_n(i % 50, a);
        if (shared_conn_take(w, a, admit_per_ip, &limit, &rec) == 0)
            shared_conn_give(w, rec);
        if (shared_body_reserve(w, 10) == 0)
            shared_body_release(w, 10);
    }
    tap_ok(shared_conn_open(w) <= CONNS,
           "a worker goes on over a scribbled region without crashing");
    tap_ok(shared_slots(w) == SLOTS && shared_max_connections(w) == CONNS,
           "its geometry is its own copy");
}

static void test_attach(shared *region)
{
    char errbuf[128];
    int fd = memfd_create("not-sealed", MFD_CLOEXEC);
    shared *s;

    tap_ok(shared_attach(shared_fd(region), SLOTS, errbuf, sizeof(errbuf)) ==
               NULL,
           "a slot past the last is refused (%s)", errbuf);
    tap_ok(fd >= 0 && ftruncate(fd, 1 << 20) == 0 &&
               shared_attach(fd, 0, errbuf, sizeof(errbuf)) == NULL,
           "an unsealed memfd is refused (%s)", errbuf);
    close(fd);
    s = shared_attach(shared_fd(region), 1, errbuf, sizeof(errbuf));
    tap_ok(s != NULL, "a second handle on the same region");
    shared_free(s);
}

int main(void)
{
    shared_options o = {SLOTS, CONNS, LIMIT, AREA};
    char errbuf[128];
    shared *region = shared_create(&o, errbuf, sizeof(errbuf)), *w;
    int slot;

    if (!tap_ok(region != NULL, "shared_create (%s)",
                region == NULL ? errbuf : "ok"))
        return tap_done();
    slot = shared_slot_take(region);
    w = shared_attach(shared_fd(region), (unsigned)slot, errbuf,
                      sizeof(errbuf));
    if (!tap_ok(slot == 0 && w != NULL, "attached to slot 0"))
        return tap_done();
    test_basics(region, w);
    test_hammer(region, w);
    test_reclaim(region, w, 0);
    test_reclaim(region, w, 1);
    test_attach(region);
    test_scribble(region, w);
    shared_free(w);
    shared_free(region);
    return tap_done();
}
