/*
 * metrics: what /metrics reports, in the Prometheus text format
 * (version 0.0.4). Request counts and latencies are gathered here, in this
 * process's area of the shared region, and the page sums every worker's;
 * token counters and states are the key process's, read when the page is
 * rendered.
 */
#ifndef SMIMED_METRICS_H
#define SMIMED_METRICS_H

#include <stddef.h>

#include "service/budget.h"
#include "service/conns.h"
#include "proto/proto.h"
#include "service/shared.h"

/* Bytes of the area each worker slot needs (shared_options.area_bytes). */
size_t metrics_area_size(void);

/* A request began / ended. endpoint is a route path, or NULL for a path no
 * route knows (counted as "other": clients must not be able to create
 * series at will). */
void metrics_request_begin(void);
void metrics_request_end(const char *endpoint, int status, double seconds);

/* The region whose area this process writes and whose areas the page
 * sums, and where it reads the body budget and the connection counts (all
 * borrowed; NULL: not counted, not shown). */
void metrics_set_sources(shared *region, const budget *b, conns *c);

/* The whole page, malloc'd, in *out (length *len), with the token series
 * of tokens (a STATE reply of the key process; none when NULL); -1
 * without memory. */
int metrics_render(const proto_token_entry *tokens, size_t ntokens, char **out,
                   size_t *len);

#endif
