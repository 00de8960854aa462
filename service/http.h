/*
 * http: the libmicrohttpd server of a worker. One thread per connection,
 * so a request waiting on a slow token never holds up /healthz or keys on
 * another token; the per-token bound on work in flight lives in the key
 * process.
 */
#ifndef SMIMED_HTTP_H
#define SMIMED_HTTP_H

#include <stddef.h>

#include "api/api.h"
#include "service/budget.h"
#include "service/shared.h"

typedef struct http_options {
    const char *listen; /* host:port, for messages */
    int listen_fd;      /* the listening socket (http_listen_open) */
    size_t max_body_bytes;
    unsigned max_connections;
    unsigned max_connections_per_ip;
    unsigned timeout_s;
    unsigned header_timeout_s; /* for a complete request header */
    budget *budget; /* body bytes in flight; borrowed, outlives the server */
    /* connection counts, the metrics area: this process's slot of the
     * shared region; borrowed, outlives the server */
    shared *region;
    /* TLS when set (http_tls_read); copied by http_start */
    const struct http_tls *tls;
} http_options;

/* The TLS files as PEM text, read before a worker confines itself: the key
 * file is often readable by root alone, and a confined worker opens no
 * file outside its short list (service/confine.h). */
typedef struct http_tls {
    char *certificate; /* the server's certificate (and chain) */
    char *key;         /* its private key, unencrypted */
    char *client_ca;   /* CAs client certificates must verify against;
                        * NULL: clients are not asked for one */
} http_tls;

/* Reads the files (client_ca may be NULL) into tls; 0, or -1 with errbuf
 * filled in and tls left empty. */
int http_tls_read(http_tls *tls, const char *certificate, const char *key,
                  const char *client_ca, char *errbuf, size_t errlen);
/* Frees the texts, the key wiped first. */
void http_tls_clear(http_tls *tls);

typedef struct http_server http_server;

/* A listening TCP socket on listen (host:port; port 0 picks a free one),
 * non-blocking, for every worker to share; -1 with errbuf filled in. */
int http_listen_open(const char *addr, char *errbuf, size_t errlen);
/* The port a listening socket is bound to; 0 when unknown. */
unsigned http_listen_port(int fd);
/* Serves on opts->listen_fd (closed when accepting stops). a and keys
 * (where refusals and the end of key operations are recorded, and token
 * states for /metrics are read) are borrowed and must outlive the
 * server. */
http_server *http_start(const http_options *opts, api *a, rkey_client *keys,
                        char *errbuf, size_t errlen);
/* 1 when listen names a loopback address (127/8, ::1). */
int http_listen_is_loopback(const char *listen);
/* Stops accepting, waits up to timeout_ms for requests in flight, stops.
 * Returns the number of requests still running when it gave up. */
unsigned http_shutdown(http_server *srv, unsigned timeout_ms);

#endif
