/*
 * budget: the request body bytes in flight across the whole daemon. A
 * request reserves what its body may take before any of it is read and
 * gives it back when it completes; past the limit it is refused (503
 * server_busy) instead. The counter lives in a MAP_SHARED anonymous
 * mapping made at start and is updated with atomics only, so processes
 * forked after budget_new share one budget with no lock between them.
 */
#ifndef SMIMED_BUDGET_H
#define SMIMED_BUDGET_H

#include <stddef.h>
#include <stdint.h>

typedef struct budget budget;

/* NULL (errno set) when the mapping cannot be made. limit > 0. */
budget *budget_new(uint64_t limit);
/* Unmaps; every process that shares it unmaps its own view. */
void budget_free(budget *b);
/* 0 and n bytes reserved, or -1 when they would take the bytes in flight
 * past the limit (nothing reserved). n = 0 always fits. */
int budget_reserve(budget *b, uint64_t n);
/* Gives back n bytes of an earlier reservation. */
void budget_release(budget *b, uint64_t n);
uint64_t budget_in_flight(const budget *b);
uint64_t budget_limit(const budget *b);
/* Requests refused since start (the whole daemon). */
uint64_t budget_refusals(const budget *b);

#endif
