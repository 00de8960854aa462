/*
 * conns: what smimed keeps about each HTTP connection, for the defences
 * against slow and greedy clients that libmicrohttpd lacks.
 *
 * - Admission (libmicrohttpd's accept policy): at most max_per_ip
 *   connections per address (an IPv6 client counts by its /64). The last
 *   eighth of max_connections is kept for addresses that hold few: with
 *   that little free, an address gets another connection only while it
 *   holds fewer than an eighth of the free slots, so the last eight go only
 *   to addresses that hold none, and clients from many addresses cannot
 *   take every slot from one that needs a single connection.
 * - A deadline for a complete request header: header_timeout_s from the
 *   connection's start, or from the first byte of a keep-alive request
 *   (seen by a watchdog thread through TCP_INFO's byte count). A
 *   connection still without its header then is shut down.
 *
 * The counts are the whole daemon's: they live in the shared region
 * (service/shared.h) that every worker draws on.
 *
 * Calls come from libmicrohttpd's callbacks: conns_admit and conns_open
 * from the thread that accepts (the same thread for one connection, one
 * after the other), conns_close from the thread that accepts,
 * conns_begin_request and conns_end_request from the connection's own
 * thread.
 */
#ifndef SMIMED_CONNS_H
#define SMIMED_CONNS_H

#include <stdint.h>
#include <sys/socket.h>

#include "service/shared.h"

typedef struct conns_options {
    unsigned max_connections;
    unsigned max_per_ip;
    unsigned header_timeout_s;
} conns_options;

/* The whole daemon's numbers. */
typedef struct conns_stats {
    unsigned open;            /* connections now */
    uint64_t header_timeouts; /* shut down at the header deadline */
    uint64_t refused_per_ip;  /* refused: the address held max_per_ip */
    uint64_t refused_reserve; /* refused: the last slots are for others */
} conns_stats;

typedef struct conns conns;
typedef struct conns_entry conns_entry;

/* Starts the watchdog thread; NULL with a message on failure. region is
 * borrowed and outlives c; max_connections is at most the region's. */
conns *conns_new(const conns_options *opts, shared *region, char *errbuf,
                 size_t errlen);
/* Stops the watchdog; every connection must have been closed. */
void conns_free(conns *c);
/* 1 to accept a connection from sa (counted from now on), 0 to refuse
 * it. */
int conns_admit(conns *c, const struct sockaddr *sa, socklen_t len);
/* A connection was accepted on fd; its header deadline starts now. It
 * takes the count conns_admit made on this thread (or, when there was
 * none, counts it now). NULL without memory or a free record, and then fd
 * has been shut down. */
conns_entry *conns_open(conns *c, const struct sockaddr *sa, int fd);
/* The connection is closed (fd is still open: libmicrohttpd closes it
 * after this returns); e is freed. NULL is ignored. */
void conns_close(conns *c, conns_entry *e);
/* A request's header is complete: no deadline until it has ended. -1 when
 * the watchdog has already shut the connection down. */
int conns_begin_request(conns_entry *e);
/* The request has been answered: the connection is idle until its next
 * request's first byte arrives. */
void conns_end_request(conns_entry *e);
void conns_get_stats(conns *c, conns_stats *st);

#endif
