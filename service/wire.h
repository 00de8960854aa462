/*
 * wire: what libmicrohttpd 0.9.75 leaves of a request's bytes, and what it
 * needs for a response. It parses the header block in place in its
 * per-connection memory pool and records each header value with
 * strlen(), so a value holding a NUL arrives cut short, and it builds the
 * response head in whatever that pool has left: a head that does not fit
 * is a closed connection without an answer. These checks let http.c see
 * the first and prevent the second. They rely on that version's layout
 * (connection.c: get_next_header_line, process_header_line,
 * parse_initial_message_line, build_header_response).
 */
#ifndef SMIMED_WIRE_H
#define SMIMED_WIRE_H

#include <stddef.h>
#include <microhttpd.h>

#include "api/api.h"

/* Each connection's memory pool (MHD_OPTION_CONNECTION_MEMORY_LIMIT). */
#define WIRE_POOL_SIZE ((size_t)16 << 10)

/* The longest response head http.c builds: status line, Date,
 * Connection, Content-Type, Content-Length, X-Request-Id, Allow or
 * WWW-Authenticate or Retry-After, and the X-Smimed-* fields, of which one
 * may be API_HEADER_VALUE_MAX long and the others are short. */
#define WIRE_HEAD_MAX ((size_t)API_HEADER_VALUE_MAX + 1024)

typedef struct wire_scan {
    /* the Authorization header as sent, a NUL inside included; NULL when
     * absent */
    const char *authorization;
    size_t authorization_len;
    int chunked; /* Transfer-Encoding: chunked */
    /* pool bytes the response head may take: a head up to this size is
     * sure to be written */
    size_t room;
    /* the first problem found, in the contract's order of checks: 431
     * headers_too_large (before everything), then 400
     * unsupported_transfer_encoding or invalid_header; status 0 when
     * none. framing: the problem makes the body's end unknown, so the
     * connection closes after the answer. */
    api_error too_large;
    api_error problem;
    int framing;
} wire_scan;

/* Reads the header block at the first call of the access handler (method
 * and version as libmicrohttpd passed them). */
void wire_scan_headers(struct MHD_Connection *conn, const char *method,
                       const char *version, wire_scan *out);

/* 1 when the raw request target that libmicrohttpd hands to its URI log
 * callback had a NUL byte in it (the target then arrives cut there). */
int wire_target_has_nul(const char *uri);

/* The bytes libmicrohttpd writes around a response's headers: status
 * line, Date, Connection, Content-Length and the blank line. */
size_t wire_head_frame(unsigned status);
/* One header line, "name: value" and its CR LF. */
size_t wire_header_line(const char *name, const char *value);

#endif
