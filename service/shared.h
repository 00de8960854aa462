/*
 * shared: the memory every request worker of the daemon shares, so the
 * limits and the numbers are one across processes: connection records
 * and the per-address counts (max_connections, max_connections_per_ip),
 * the body bytes reserved (max_inflight_body_bytes), counters per process
 * and an area per worker slot that metrics.c lays out.
 *
 * The supervisor creates it (a sealed memfd: MAP_SHARED anonymous memory
 * does not survive execve) and hands the descriptor to each worker with
 * the number of the worker slot that worker writes. Every reservation is
 * recorded in the slot that made it, so when a worker dies the supervisor
 * gives back exactly what it held (shared_slot_reclaim) before a
 * replacement takes the slot. A slot's counters are kept across that: the
 * sums /metrics reports only grow.
 *
 * A worker trusts nothing in the region for its memory safety: geometry is
 * read once at attach and checked against the sealed size, every index is
 * bounds-checked and every probe bounded. A compromised worker can corrupt
 * counts and hold the region's lock (deny service); it cannot reach
 * another process's memory through it.
 *
 * The single-process daemon and the unit tests use a region of their own
 * in the same way: shared_create, then shared_attach on a slot.
 */
#ifndef SMIMED_SHARED_H
#define SMIMED_SHARED_H

#include <stddef.h>
#include <stdint.h>

typedef struct shared shared;

/* Worker slots at most, and bytes of a slot's area at most. */
#define SHARED_SLOTS_MAX 1024
#define SHARED_AREA_MAX ((size_t)1 << 16)
#define SHARED_CONNECTIONS_MAX 65536

/* An address as conns.c keys it: IPv4 mapped into IPv6, IPv6 by /64. */
#define SHARED_ADDR_LEN 16

typedef struct shared_options {
    unsigned slots;           /* workers attached at once, at most */
    unsigned max_connections; /* connection records, the whole daemon */
    uint64_t body_limit;      /* body bytes reserved at once, > 0 */
    size_t area_bytes;        /* each slot's area (metrics.c) */
} shared_options;

/* Counters each process keeps in its own slot; sums are over every slot
 * and the supervisor's. Gauges are cleared when their slot is reclaimed,
 * counters never. */
typedef enum {
    SHARED_BODY_REFUSALS,      /* requests refused: no room for the body */
    SHARED_HEADER_TIMEOUTS,    /* shut down at the header deadline */
    SHARED_REFUSED_PER_IP,     /* connections refused: max_per_ip */
    SHARED_REFUSED_RESERVE,    /* connections refused: the last slots */
    SHARED_WORKER_RESTARTS,    /* the supervisor's: workers started again */
    SHARED_REQUESTS_IN_FLIGHT, /* gauge */
    SHARED_NCOUNTERS
} shared_counter;

/* The supervisor's (or the single process's) end: makes and seals the
 * region. NULL with a message on failure. */
shared *shared_create(const shared_options *o, char *errbuf, size_t errlen);
/* The region's descriptor (close-on-exec; the supervisor moves it to
 * PROC_FD_SHARED in each worker). */
int shared_fd(const shared *s);
/* A free worker slot, now in use; -1 when all are. */
int shared_slot_take(shared *s);
/* The worker in slot is gone: its connections, body bytes and gauges are
 * given back (its counters stay), the slot is free. 0; 1 when it died
 * holding the region's lock (taken over); 2 when another process held the
 * lock for more than a second (taken anyway: the caller logs it). */
int shared_slot_reclaim(shared *s, unsigned slot);

/* A worker's end: maps the region of fd (not taken: the caller closes it)
 * to write as slot. NULL with a message when it is not a region of the
 * expected geometry and seals. */
shared *shared_attach(int fd, unsigned slot, char *errbuf, size_t errlen);
/* Unmaps (and, the creator's, closes the descriptor). NULL is ignored. */
void shared_free(shared *s);

unsigned shared_slots(const shared *s);
unsigned shared_max_connections(const shared *s);

/* ---- connections (a worker) ---- */

/* Decides under the region's lock whether a connection from an address
 * that holds held of the open ones may have one more: 0 yes, or a
 * positive reason that shared_conn_take returns. Pure arithmetic: it runs
 * while every other worker's accept waits. */
typedef int (*shared_admit_fn)(void *arg, unsigned open, unsigned held);

/* One step: the counts are read, admit decides, and a connection record
 * is taken for this slot. 0 and the record in *rec; admit's reason; or -1
 * when no record is free (every one is taken). */
int shared_conn_take(shared *s, const unsigned char addr[SHARED_ADDR_LEN],
                     shared_admit_fn admit, void *arg, unsigned *rec);
/* Gives back a record this slot took; any other is ignored. */
void shared_conn_give(shared *s, unsigned rec);
/* Connections open now, the whole daemon. */
unsigned shared_conn_open(const shared *s);

/* ---- the body budget (a worker) ---- */

/* 0 and n bytes reserved by this slot, or -1 (nothing reserved, a refusal
 * counted) when the bytes reserved would pass the limit. 0 always fits. */
int shared_body_reserve(shared *s, uint64_t n);
/* Gives back n bytes this slot reserved. */
void shared_body_release(shared *s, uint64_t n);
uint64_t shared_body_in_flight(shared *s);
uint64_t shared_body_limit(const shared *s);

/* ---- counters and areas ---- */

/* Adds delta (negative for a gauge going down) to this process's
 * counter. */
void shared_count(shared *s, shared_counter c, int64_t delta);
/* The sum over every slot and the supervisor's (gauges: at least 0). */
uint64_t shared_sum(const shared *s, shared_counter c);
/* This process's slot number, -1 for the creator's handle. */
int shared_self(const shared *s);
/* The area of slot (shared_options.area_bytes long, zero at creation),
 * NULL past the last slot. Only its own slot's is written by a worker;
 * whoever reads another's must check what it reads. */
void *shared_area(const shared *s, unsigned slot);

#endif
