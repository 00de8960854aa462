/*
 * deadline: the point in time a wait ends at, on a given clock
 * (CLOCK_MONOTONIC for our own waits, CLOCK_REALTIME for
 * pthread_cond_timedwait with the default condition clock). Header only:
 * service/ and rkey/ share it; token/ and cms/ import nothing of ours and
 * keep their own.
 */
#ifndef SMIMED_DEADLINE_H
#define SMIMED_DEADLINE_H

#include <time.h>

/* Now plus ms on clock. */
static inline struct timespec deadline_after(clockid_t clock, long ms)
{
    struct timespec t;

    clock_gettime(clock, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/* Whole milliseconds from now to t on clock, 0 once it passed. */
static inline long deadline_ms_left(const struct timespec *t, clockid_t clock)
{
    struct timespec now;
    long ms;

    clock_gettime(clock, &now);
    ms = (long)(t->tv_sec - now.tv_sec) * 1000L +
         (t->tv_nsec - now.tv_nsec) / 1000000L;
    return ms < 0 ? 0 : ms;
}

static inline int deadline_passed(const struct timespec *t, clockid_t clock)
{
    struct timespec now;

    clock_gettime(clock, &now);
    return now.tv_sec > t->tv_sec ||
           (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

#endif
