/*
 * Connection admission (per-address limit, IPv6 by /64, the reserve of the
 * last slots) and the header deadline on real loopback TCP connections:
 * shut down when the header does not come, kept while a request runs and
 * while idle between requests, shut down when the next header trickles.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "service/conns.h"
#include "tap.h"

static struct sockaddr_in6 v6(const char *text)
{
    struct sockaddr_in6 a;

    memset(&a, 0, sizeof(a));
    a.sin6_family = AF_INET6;
    inet_pton(AF_INET6, text, &a.sin6_addr);
    return a;
}

static struct sockaddr_in v4(unsigned host)
{
    struct sockaddr_in a;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x0a000000u | host);
    return a;
}

#define SA(a) ((const struct sockaddr *)&(a))

/* A region of its own per test, written as slot 0, as a worker does. */
static shared *region, *self;

static shared *region_new(unsigned max_connections)
{
    shared_options o = {2, max_connections, 1 << 20, 0};
    char errbuf[128];

    shared_free(self);
    shared_free(region);
    region = shared_create(&o, errbuf, sizeof(errbuf));
    self = region == NULL ? NULL
                          : shared_attach(shared_fd(region),
                                          (unsigned)shared_slot_take(region),
                                          errbuf, sizeof(errbuf));
    return self;
}

/* Admits and opens one connection from a; NULL when refused. */
static conns_entry *take(conns *c, const struct sockaddr *a, socklen_t len)
{
    if (!conns_admit(c, a, len))
        return NULL;
    return conns_open(c, a, -1);
}

static void test_admission(void)
{
    conns_options o = {64, 4, 3600};
    conns_entry *e[80] = {0};
    conns_stats st;
    char errbuf[128];
    conns *c =
        conns_new(&o, region_new(o.max_connections), errbuf, sizeof(errbuf));
    struct sockaddr_in a = v4(1), b = v4(2);
    struct sockaddr_in6 m = v6("::ffff:10.0.0.1"), h1 = v6("2001:db8:1:2::1"),
                        h2 = v6("2001:db8:1:2:ffff::9"),
                        other = v6("2001:db8:1:3::1");
    size_t i, n = 0, fresh;
    int ok;

    if (!tap_ok(c != NULL, "conns_new (%s)", c == NULL ? errbuf : "ok"))
        return;
    for (i = 0; i < 4; i++)
        e[n++] = take(c, SA(a), sizeof(a));
    tap_ok(e[3] != NULL && !conns_admit(c, SA(a), sizeof(a)),
           "the fifth connection from one address is refused");
    tap_ok(!conns_admit(c, SA(m), sizeof(m)),
           "an IPv4-mapped IPv6 address is the same address");
    tap_ok(conns_admit(c, SA(b), sizeof(b)), "another address is admitted");
    for (i = 0; i < 4; i++)
        e[n++] =
            i % 2 ? take(c, SA(h1), sizeof(h1)) : take(c, SA(h2), sizeof(h2));
    tap_ok(e[n - 1] != NULL && !conns_admit(c, SA(h1), sizeof(h1)),
           "IPv6 addresses of one /64 count together");
    tap_ok(conns_admit(c, SA(other), sizeof(other)), "another /64 does not");
    conns_close(c, e[--n]);
    tap_ok(conns_admit(c, SA(h2), sizeof(h2)), "a closed connection frees");
    e[n++] = take(c, SA(h2), sizeof(h2));
    a = v4(500);
    e[n++] = take(c, SA(a), sizeof(a));
    /* fill to 56 of 64: 8 slots left, the reserve */
    for (i = 3; n < 56; i++) {
        struct sockaddr_in t = v4((unsigned)i);

        for (int k = 0; k < 4 && n < 56; k++)
            e[n++] = take(c, SA(t), sizeof(t));
    }
    conns_get_stats(c, &st);
    tap_ok(st.open == 56, "56 open (%u)", st.open);
    tap_ok(!conns_admit(c, SA(a), sizeof(a)),
           "in the reserve, an address holding one is refused");
    ok = 1;
    for (fresh = 0; n < 64; fresh++) {
        struct sockaddr_in t = v4((unsigned)(1000 + fresh));

        e[n] = take(c, SA(t), sizeof(t));
        ok = ok && e[n++] != NULL;
    }
    tap_ok(ok, "the last 8 slots go to addresses that hold none");
    conns_get_stats(c, &st);
    tap_ok(st.refused_per_ip >= 3 && st.refused_reserve >= 1,
           "refusals are counted (%llu per_ip, %llu reserve)",
           (unsigned long long)st.refused_per_ip,
           (unsigned long long)st.refused_reserve);
    while (n > 0)
        conns_close(c, e[--n]);
    conns_get_stats(c, &st);
    tap_ok(st.open == 0, "all closed");
    conns_free(c);
}

/* Random opens and closes over many addresses: deleting from the table
 * must not lose or keep counts. */
static void test_churn(void)
{
    conns_options o = {256, 3, 3600};
    conns_entry *e[256] = {0};
    unsigned who[256], held[300] = {0};
    char errbuf[128];
    conns *c =
        conns_new(&o, region_new(o.max_connections), errbuf, sizeof(errbuf));
    size_t n = 0, i;
    int bad = 0, round;

    if (c == NULL)
        return;
    srand(7);
    for (round = 0; round < 20000; round++) {
        unsigned addr = (unsigned)rand() % 300;
        struct sockaddr_in a = v4(addr);
        int admitted;

        if (n > 0 && (rand() % 2 || n == 200)) {
            i = (size_t)rand() % n;
            held[who[i]]--;
            conns_close(c, e[i]);
            e[i] = e[n - 1];
            who[i] = who[n - 1];
            n--;
            continue;
        }
        admitted = conns_admit(c, SA(a), sizeof(a));
        if (admitted != (held[addr] < 3))
            bad++;
        if (admitted) {
            e[n] = conns_open(c, SA(a), -1);
            who[n++] = addr;
            held[addr]++;
        }
    }
    tap_ok(bad == 0, "admission agrees with a count kept aside (%d off)", bad);
    while (n > 0)
        conns_close(c, e[--n]);
    bad = 0;
    for (i = 0; i < 300; i++) {
        struct sockaddr_in a = v4((unsigned)i);
        conns_entry *x[3];
        int k;

        for (k = 0; k < 3; k++)
            x[k] = take(c, SA(a), sizeof(a));
        if (x[2] == NULL || conns_admit(c, SA(a), sizeof(a)))
            bad++;
        for (k = 0; k < 3; k++)
            conns_close(c, x[k]);
    }
    tap_ok(bad == 0, "after the churn every address starts from zero");
    conns_free(c);
}

/* Two workers (processes on two slots of one region): the per-address
 * limit and the open count are the daemon's; a connection admitted that
 * libmicrohttpd never started is given back at the next admission. */
static void test_two_workers(void)
{
    conns_options o = {64, 4, 3600};
    struct sockaddr_in a = v4(1), b = v4(2);
    conns_entry *e[4] = {0};
    conns_stats st;
    char errbuf[128], ch;
    conns *c =
        conns_new(&o, region_new(o.max_connections), errbuf, sizeof(errbuf));
    int up[2], down[2], status = -1, slot = shared_slot_take(region);
    pid_t pid;

    if (c == NULL || pipe(up) != 0 || pipe(down) != 0)
        return;
    pid = fork();
    if (pid == 0) {
        shared *other = shared_attach(shared_fd(region), (unsigned)slot, errbuf,
                                      sizeof(errbuf));
        conns *oc =
            other != NULL ? conns_new(&o, other, errbuf, sizeof(errbuf)) : NULL;
        conns_entry *x = oc != NULL ? take(oc, SA(a), sizeof(a)) : NULL;
        conns_entry *y = oc != NULL ? take(oc, SA(a), sizeof(a)) : NULL;

        if (write(up[1], "x", 1) != 1 || read(down[0], &ch, 1) != 1)
            _exit(3);
        conns_close(oc, x);
        conns_close(oc, y);
        conns_free(oc);
        shared_free(other);
        _exit(x != NULL && y != NULL ? 0 : 1);
    }
    if (read(up[0], &ch, 1) != 1)
        return;
    e[0] = take(c, SA(a), sizeof(a));
    e[1] = take(c, SA(a), sizeof(a));
    conns_get_stats(c, &st);
    tap_ok(e[1] != NULL && !conns_admit(c, SA(a), sizeof(a)) && st.open == 4,
           "another worker's connections count: the fifth from one address "
           "is refused (%u open)",
           st.open);
    if (write(down[1], "x", 1) != 1)
        return;
    waitpid(pid, &status, 0);
    shared_slot_reclaim(region, (unsigned)slot);
    tap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
               conns_admit(c, SA(a), sizeof(a)),
           "once it closed them, the address has room again");
    conns_admit(c, SA(b), sizeof(b));
    conns_get_stats(c, &st);
    tap_ok(st.open == 3,
           "an admission libmicrohttpd never started is given back at the "
           "next (%u open)",
           st.open);
    conns_close(c, e[0]);
    conns_close(c, e[1]);
    e[2] = take(c, SA(b), sizeof(b));
    conns_close(c, e[2]);
    conns_get_stats(c, &st);
    tap_ok(st.open == 0, "all closed (%u)", st.open);
    conns_free(c);
}

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A loopback connection: *client and the accepted *server socket. */
static int pair(int *client, int *server, struct sockaddr_in *peer)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0);

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (l < 0 || bind(l, SA(a), sizeof(a)) != 0 || listen(l, 4) != 0 ||
        getsockname(l, (struct sockaddr *)&a, &len) != 0)
        return -1;
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (*client < 0 || connect(*client, SA(a), sizeof(a)) != 0)
        return -1;
    len = sizeof(*peer);
    *server = accept(l, (struct sockaddr *)peer, &len);
    close(l);
    return *server < 0 ? -1 : 0;
}

/* Seconds until the server side of fd's connection is shut down (the
 * client reads EOF), at most limit; -1 when it stays open. */
static double closed_within(int fd, double limit)
{
    double t0 = now_s();
    struct pollfd p = {fd, POLLIN, 0};
    char buf[16];

    while (now_s() - t0 < limit) {
        if (poll(&p, 1, 50) > 0 && read(fd, buf, sizeof(buf)) <= 0)
            return now_s() - t0;
    }
    return -1;
}

static void test_deadline(void)
{
    conns_options o = {16, 16, 1};
    char errbuf[128];
    conns *c =
        conns_new(&o, region_new(o.max_connections), errbuf, sizeof(errbuf));
    struct sockaddr_in peer;
    int cl, sv;
    conns_entry *e;
    conns_stats st;
    double t;

    if (c == NULL || pair(&cl, &sv, &peer) != 0) {
        tap_ok(0, "loopback connection: %s", strerror(errno));
        return;
    }
    e = conns_open(c, SA(peer), sv);
    t = closed_within(cl, 5);
    tap_ok(t >= 0.8 && t < 2.0, "no header: shut down at the deadline (%.2fs)",
           t);
    tap_ok(conns_begin_request(e) != 0, "a header after that is too late");
    conns_close(c, e);
    close(sv);
    close(cl);

    if (pair(&cl, &sv, &peer) != 0)
        return;
    e = conns_open(c, SA(peer), sv);
    tap_ok(conns_begin_request(e) == 0, "the header came in time");
    tap_ok(closed_within(cl, 2) < 0, "a request running is not shut down");
    conns_end_request(e);
    tap_ok(closed_within(cl, 2.5) < 0,
           "a connection idle between requests is not shut down");
    if (write(cl, "G", 1) != 1)
        return;
    t = closed_within(cl, 5);
    tap_ok(t >= 0.8 && t < 2.6,
           "the next header begun and not finished: shut down (%.2fs)", t);
    conns_get_stats(c, &st);
    tap_ok(st.header_timeouts == 2, "two header timeouts counted (%llu)",
           (unsigned long long)st.header_timeouts);
    conns_close(c, e);
    close(sv);
    close(cl);
    conns_free(c);
}

int main(void)
{
    test_admission();
    test_churn();
    test_two_workers();
    test_deadline();
    shared_free(self);
    shared_free(region);
    return tap_done();
}
