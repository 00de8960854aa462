/*
 * budget: the request body bytes in flight across the whole daemon. A
 * request reserves what its body may take before any of it is read and
 * gives it back when it completes; past the limit it is refused (503
 * server_busy) instead. The bytes live in the shared region
 * (service/shared.h), recorded per worker slot, so every worker draws on
 * one budget and a worker that dies gives back what it held.
 */
#ifndef SMIMED_BUDGET_H
#define SMIMED_BUDGET_H

#include <stddef.h>
#include <stdint.h>

#include "service/shared.h"

typedef struct budget budget;

/* On region (borrowed: it outlives the budget), which holds the limit.
 * NULL (errno set) without memory. */
budget *budget_new(shared *region);
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
