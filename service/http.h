/*
 * http: the libmicrohttpd server. One thread per connection, so a request
 * blocked on a slow token never holds up /healthz or keys on another token;
 * the per-token bound on work in flight lives in token/.
 */
#ifndef SMIMED_HTTP_H
#define SMIMED_HTTP_H

#include <stddef.h>

#include "api/api.h"
#include "service/budget.h"
#include "service/shared.h"

typedef struct http_options {
    const char *listen; /* host:port; port 0 picks a free one */
    size_t max_body_bytes;
    unsigned max_connections;
    unsigned max_connections_per_ip;
    unsigned timeout_s;
    unsigned header_timeout_s; /* for a complete request header */
    budget *budget; /* body bytes in flight; borrowed, outlives the server */
    /* connection counts, the metrics area: this process's slot of the
     * shared region; borrowed, outlives the server */
    shared *region;
    /* TLS when tls_certificate is set: PEM files of the server certificate
     * and key, and of the CA that client certificates must verify against
     * (NULL: clients are not asked for one) */
    const char *tls_certificate;
    const char *tls_key;
    const char *tls_client_ca;
} http_options;

typedef struct http_server http_server;

/* a is borrowed; it must outlive the server or its replacement. */
http_server *http_start(const http_options *opts, api *a, char *errbuf,
                        size_t errlen);
unsigned http_port(const http_server *srv);
/* 1 when listen names a loopback address (127/8, ::1). */
int http_listen_is_loopback(const char *listen);
/* Serves new requests with a, then waits up to timeout_ms for the requests
 * still using the api it replaces. 0: *old is that api, unused now (the
 * caller frees it). 1: requests still use it, so it must never be freed.
 * -1: out of memory, nothing changed. */
int http_set_api(http_server *srv, api *a, unsigned timeout_ms, api **old);
/* Stops accepting, waits up to timeout_ms for requests in flight, stops.
 * Returns the number of requests still running when it gave up. */
unsigned http_shutdown(http_server *srv, unsigned timeout_ms);

#endif
