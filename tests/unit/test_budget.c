/*
 * The budget of body bytes in flight: reservations within the limit, none
 * past it, and one budget for processes on their own slots of one region,
 * under concurrent use from several threads in each.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "service/budget.h"
#include "tap.h"

#define LIMIT 1000
#define ROUNDS 20000

static shared *region, *mine;
static budget *b;
static int over; /* a reservation that pushed the count past the limit */

static void *churn(void *arg)
{
    uint64_t n = (uint64_t)(size_t)arg;
    int i;

    for (i = 0; i < ROUNDS; i++) {
        if (budget_reserve(b, n) != 0)
            continue;
        if (budget_in_flight(b) > LIMIT)
            __atomic_store_n(&over, 1, __ATOMIC_RELAXED);
        budget_release(b, n);
    }
    return NULL;
}

/* Four threads reserving and releasing; 0 when the limit always held. */
static int run_threads(void)
{
    pthread_t t[4];
    size_t i;

    for (i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, churn, (void *)(100 + 150 * i));
    for (i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    return __atomic_load_n(&over, __ATOMIC_RELAXED);
}

/* A budget on a slot of the region of its own, as a worker has. */
static budget *budget_on_slot(void)
{
    char errbuf[128];
    int slot = shared_slot_take(region);

    mine = slot < 0 ? NULL
                    : shared_attach(shared_fd(region), (unsigned)slot, errbuf,
                                    sizeof(errbuf));
    return mine != NULL ? budget_new(mine) : NULL;
}

int main(void)
{
    shared_options o = {4, 16, LIMIT, 0};
    pid_t pid;
    int status = -1, up[2], down[2];
    char c, errbuf[128];

    region = shared_create(&o, errbuf, sizeof(errbuf));
    if (!tap_ok(region != NULL, "a region (%s)", region ? "ok" : errbuf))
        return tap_done();
    b = budget_on_slot();
    tap_ok(b != NULL && budget_limit(b) == LIMIT && budget_in_flight(b) == 0,
           "a new budget is empty");
    if (b == NULL)
        return tap_done();
    tap_ok(budget_reserve(b, 0) == 0, "nothing always fits");
    tap_ok(budget_reserve(b, 600) == 0 && budget_in_flight(b) == 600,
           "a reservation within the limit");
    tap_ok(budget_reserve(b, 401) != 0 && budget_in_flight(b) == 600 &&
               budget_refusals(b) == 1,
           "one past the limit is refused and reserves nothing");
    tap_ok(budget_reserve(b, 400) == 0 && budget_in_flight(b) == LIMIT,
           "exactly up to the limit");
    tap_ok(budget_reserve(b, (uint64_t)-1) != 0, "a huge one does not wrap");
    budget_release(b, 400);
    budget_release(b, 600);
    tap_ok(budget_in_flight(b) == 0, "released");

    /* the child's reservation is the parent's, and the other way round */
    if (pipe(up) != 0 || pipe(down) != 0)
        return 1;
    budget_reserve(b, 300);
    pid = fork();
    if (pid == 0) {
        int ok;

        b = budget_on_slot();
        ok = b != NULL && budget_in_flight(b) == 300 &&
             budget_reserve(b, 700) == 0 && budget_reserve(b, 1) != 0;

        /* hold the 700 until the parent has looked */
        if (write(up[1], "x", 1) != 1 || read(down[0], &c, 1) != 1)
            ok = 0;
        budget_release(b, 700);
        _exit(ok ? 0 : 1);
    }
    tap_ok(read(up[0], &c, 1) == 1 && budget_in_flight(b) == LIMIT &&
               budget_reserve(b, 1) != 0,
           "a forked child's reservation counts in the parent");
    if (write(down[1], "x", 1) != 1)
        return 1;
    waitpid(pid, &status, 0);
    tap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "the child saw the parent's reservation");
    tap_ok(budget_in_flight(b) == 300, "the child's release counts too");
    budget_release(b, 300);

    /* two processes of four threads each, on one budget */
    shared_slot_reclaim(region, 1);
    pid = fork();
    if (pid == 0) {
        b = budget_on_slot();
        _exit(b == NULL ? 2 : run_threads());
    }
    tap_ok(run_threads() == 0, "never past the limit in the parent");
    waitpid(pid, &status, 0);
    tap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "never past the limit in the child");
    tap_ok(budget_in_flight(b) == 0, "all given back across both processes");
    budget_free(b);
    shared_free(mine);
    shared_free(region);
    return tap_done();
}
