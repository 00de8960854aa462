/*
 * libmicrohttpd wiring. The URI log callback sees each request first, with
 * the request target as sent; the access handler is called next with the
 * headers, then with each piece of the body, then once more at the end.
 * Everything the contract checks from headers alone (route, method, size,
 * media type, the header block itself) is answered on the first call,
 * before any body is read, and so is every request without a body.
 * Every answer goes through respond(): the whole response is built before
 * a refusal is recorded, and one that cannot be built becomes a JSON 500,
 * so no request is recorded as answered that was not.
 */
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "common/deadline.h"
#include "service/budget.h"
#include "service/conns.h"
#include "service/http.h"
#include "service/log.h"
#include "service/metrics.h"
#include "service/wire.h"

struct http_server {
    struct MHD_Daemon *daemon;
    api *api;          /* borrowed */
    rkey_client *keys; /* borrowed */
    size_t max_body;
    budget *budget; /* borrowed */
    conns *conns;
    pthread_mutex_t lock;
    pthread_cond_t idle;
    unsigned in_flight;
    int closing;
    char *tls_cert, *tls_key, *tls_ca; /* PEM text, kept for MHD */
};

/* How much of a refused chunked body is read and thrown away so the
 * client can still get its answer: libmicrohttpd 0.9.75 takes none
 * before the body has ended, and a chunked one may never end. */
#define DRAIN_LIMIT ((size_t)1 << 20)

/* A stopping server waits for its idle connections this long once
 * nothing is in flight, looking every DRAIN_POLL_MS. */
#define DRAIN_IDLE_MS 1000
#define DRAIN_POLL_MS 20

/* Bound on a TLS certificate, key or CA bundle file. */
#define HTTP_PEM_MAX ((size_t)1 << 20)

/* TLS 1.2 and 1.3 only, GnuTLS's defaults otherwise. */
#define HTTP_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

/* subjectAltNames kept from a client certificate. */
#define PEER_SANS_MAX 16

typedef struct request {
    http_server *srv;
    struct timespec start;
    int started;            /* the access handler has been called */
    const api_route *route; /* NULL for /metrics */
    api_body_kind kind;
    unsigned char *body;
    size_t len, cap;
    size_t announced; /* Content-Length within max_body, else 0 */
    int answered;     /* a response is queued; ignore the rest of the body */
    int refused;      /* body refused mid-upload: drain it, then send err */
    size_t drained;   /* bytes thrown away since */
    int close;        /* the body's end is unknown: close after the answer */
    api_error err;
    int status;
    char method[16];
    char path[128];
    char key[PROTO_NAME_MAX + 1];
    const char *error; /* static */
    char id[17];       /* request id: X-Request-Id and the audit trail */
    char remote[INET6_ADDRSTRLEN];
    int has_peer; /* a TLS client certificate was presented */
    api_peer peer;
    char *peer_strings[PEER_SANS_MAX + 1]; /* subject, then sans; owned */
    const char *endpoint; /* static; metrics label of a route-less path */
    char *query;          /* the raw query string; NULL without '?' */
    size_t query_len;
    int target_nul;    /* the request target held a NUL byte */
    wire_scan scan;    /* the header block, read at the first call */
    uint64_t reserved; /* bytes of the body budget this request holds */
    conns_entry *conn; /* its connection's entry; NULL when untracked */
    unsigned key_ops;  /* sent to the key process: it awaits a FINISH */
} request;

static double ms_since(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) * 1e3 +
           (double)(now.tv_nsec - start->tv_nsec) / 1e6;
}

/* Copies text into buf (cut to fit) with control characters replaced:
 * the method and path are the client's text, and no log line is forged. */
static void copy_printable(char *buf, size_t size, const char *text, size_t len)
{
    size_t i;

    if (len >= size)
        len = size - 1;
    for (i = 0; i < len; i++)
        buf[i] =
            (unsigned char)text[i] < 0x20 || text[i] == 0x7f ? '?' : text[i];
    buf[len] = '\0';
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    size_t n;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n')
        msg[--n] = '\0';
    /* its messages may quote the request */
    copy_printable(msg, sizeof(msg), msg, n);
    log_warn("libmicrohttpd: %s", msg);
}

static void audit_refusal(request *r, const api_response *res);
static void audit_finish(request *r);

/* The whole response for res, every header added; NULL when it cannot be
 * built (no memory, a value libmicrohttpd refuses) or its head would be
 * longer than the connection's memory is sure to hold. Hands res->body to
 * libmicrohttpd, which frees it after sending. */
static struct MHD_Response *response_build(request *r, api_response *res)
{
    struct MHD_Response *resp;
    size_t i, head;
    int close = r->refused || r->close ||
                __atomic_load_n(&r->srv->closing, __ATOMIC_RELAXED);

    if (res->status < 100 || res->status > 599 || res->content_type == NULL)
        return NULL;
    head = wire_head_frame((unsigned)res->status) +
           wire_header_line(MHD_HTTP_HEADER_CONTENT_TYPE, res->content_type) +
           wire_header_line("X-Request-Id", r->id);
    for (i = 0; i < res->nheaders; i++)
        head += wire_header_line(res->headers[i].name, res->headers[i].value);
    if (head > WIRE_HEAD_MAX) {
        log_error("request %s: a response head of %zu bytes is over the %zu "
                  "the connection's memory is sure to hold",
                  r->id, head, WIRE_HEAD_MAX);
        return NULL;
    }
    resp = MHD_create_response_from_buffer_with_free_callback(res->body_len,
                                                              res->body, free);
    if (resp == NULL)
        return NULL;
    res->body = NULL;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                res->content_type) != MHD_YES)
        goto fail;
    for (i = 0; i < res->nheaders; i++)
        if (MHD_add_response_header(resp, res->headers[i].name,
                                    res->headers[i].value) != MHD_YES)
            goto fail;
    if (MHD_add_response_header(resp, "X-Request-Id", r->id) != MHD_YES)
        goto fail;
    /* while shutting down, keep-alive would hold connections open */
    if (close && MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION,
                                         "close") != MHD_YES)
        goto fail;
    return resp;
fail:
    MHD_destroy_response(resp);
    return NULL;
}

/* Replaces res with the error err and builds it. NULL when even that
 * fails; res then still says 500 for the audit trail and the log. */
static struct MHD_Response *error_build(request *r, api_response *res,
                                        const api_error *err)
{
    struct MHD_Response *resp = NULL;

    if (api_response_set_error(res, err) == 0)
        resp = response_build(r, res);
    if (resp == NULL) {
        res->status = 500;
        res->error = "internal_error";
    }
    return resp;
}

/* When not even an error body can be built (out of memory), a fixed one:
 * every non-2xx answer carries a JSON error. */
static struct MHD_Response *fixed_build(void)
{
    static const char body[] = "{\"error\":{\"code\":\"internal_error\","
                               "\"message\":\"out of memory\"}}";
    struct MHD_Response *resp;

    resp = MHD_create_response_from_buffer(sizeof(body) - 1, (void *)body,
                                           MHD_RESPMEM_PERSISTENT);
    if (resp != NULL &&
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                "application/json") != MHD_YES) {
        MHD_destroy_response(resp);
        resp = NULL;
    }
    return resp;
}

/* Builds res, has the key process record a refusal or the end of the
 * request's key operations (FINISH: the key process wrote each
 * operation's own record before it answered), then queues it. A response
 * that cannot be built is answered 500, and that is what the audit trail
 * records. */
static enum MHD_Result respond(request *r, struct MHD_Connection *conn,
                               api_response *res)
{
    struct MHD_Response *resp = response_build(r, res);
    api_error err;
    enum MHD_Result ret = MHD_NO;

    if (resp == NULL) {
        log_error("request %s: the %d response could not be built", r->id,
                  res->status);
        api_fail(&err, 500, "internal_error",
                 "the response could not be built");
        resp = error_build(r, res, &err);
    }
    if (resp == NULL)
        resp = fixed_build();
    r->status = resp != NULL ? res->status : 500;
    audit_refusal(r, res);
    r->answered = 1;
    /* a key name that is no key may come from the request */
    copy_printable(r->key, sizeof(r->key), res->key, strlen(res->key));
    r->error = res->error;
    /* one way (rkey_finish): the finish record may be written after the
     * answer leaves; the key operation's own record was written before */
    if (r->key_ops > 0)
        audit_finish(r);
    if (resp != NULL) {
        ret = MHD_queue_response(conn, (unsigned)r->status, resp);
        MHD_destroy_response(resp);
    }
    if (ret != MHD_YES)
        log_error("request %s: libmicrohttpd took no response; the "
                  "connection closes",
                  r->id);
    api_response_clear(res);
    return ret;
}

static enum MHD_Result answer_error(request *r, struct MHD_Connection *conn,
                                    const api_error *err)
{
    api_response res = {0};

    if (api_response_set_error(&res, err) != 0) {
        res.status = 500;
        res.error = "internal_error";
    }
    return respond(r, conn, &res);
}

static void remote_address(request *r, struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci != NULL ? ci->client_addr : NULL;

    snprintf(r->remote, sizeof(r->remote), "-");
    if (sa != NULL && sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr,
                  r->remote, sizeof(r->remote));
    else if (sa != NULL && sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr,
                  r->remote, sizeof(r->remote));
}

static char *datum_text(const void *data, size_t len)
{
    char *s = malloc(len + 1);

    if (s != NULL) {
        memcpy(s, data, len);
        s[len] = '\0';
    }
    return s;
}

/* Reads the client certificate of a TLS connection. libmicrohttpd asks for
 * one when it has a trust list, but completes the handshake without one or
 * with one that does not verify: the verification is ours. */
static void peer_read(request *r, struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    gnutls_session_t session;
    const gnutls_datum_t *certs;
    gnutls_x509_crt_t crt = NULL;
    gnutls_datum_t dn = {NULL, 0};
    unsigned n = 0, status = 1, i;
    char san[1024];
    size_t size;
    int type;

    if (ci == NULL || ci->tls_session == NULL)
        return;
    session = (gnutls_session_t)ci->tls_session;
    certs = gnutls_certificate_get_peers(session, &n);
    if (certs == NULL || n == 0)
        return;
    r->has_peer = 1;
    r->peer.sans = (const char *const *)&r->peer_strings[1];
    if (gnutls_x509_crt_init(&crt) < 0 ||
        gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) < 0)
        goto out;
    r->peer.verified =
        gnutls_certificate_verify_peers2(session, &status) == 0 && status == 0;
    if (gnutls_x509_crt_get_dn3(crt, &dn, 0) >= 0)
        r->peer.subject = r->peer_strings[0] = datum_text(dn.data, dn.size);
    for (i = 0; r->peer.nsans < PEER_SANS_MAX; i++) {
        size = sizeof(san) - 1;
        type = gnutls_x509_crt_get_subject_alt_name(crt, i, san, &size, NULL);
        if (type == GNUTLS_E_SHORT_MEMORY_BUFFER)
            continue;
        if (type < 0)
            break;
        if (type != GNUTLS_SAN_DNSNAME && type != GNUTLS_SAN_RFC822NAME &&
            type != GNUTLS_SAN_URI)
            continue;
        r->peer_strings[1 + r->peer.nsans] = datum_text(san, size);
        if (r->peer_strings[1 + r->peer.nsans] != NULL)
            r->peer.nsans++;
    }
out:
    gnutls_free(dn.data);
    if (crt != NULL)
        gnutls_x509_crt_deinit(crt);
}

/* A request, from its target as sent (NULL when it had none). */
static request *request_new(http_server *srv, struct MHD_Connection *conn,
                            const char *uri)
{
    request *r = calloc(1, sizeof(*r));
    unsigned char rnd[8];
    const char *q;
    size_t i;

    if (r == NULL)
        return NULL;
    r->srv = srv;
    q = uri != NULL ? strchr(uri, '?') : NULL;
    if (q != NULL) {
        r->query_len = strlen(q + 1);
        r->query = strdup(q + 1);
        if (r->query == NULL) {
            free(r);
            return NULL;
        }
    }
    r->target_nul = wire_target_has_nul(uri);
    if (RAND_bytes(rnd, sizeof(rnd)) != 1)
        memset(rnd, 0, sizeof(rnd));
    for (i = 0; i < sizeof(rnd); i++)
        snprintf(r->id + 2 * i, 3, "%02x", rnd[i]);
    remote_address(r, conn);
    peer_read(r, conn);
    clock_gettime(CLOCK_MONOTONIC, &r->start);
    /* until the access handler names them: a request libmicrohttpd
     * answers itself is logged by its target */
    snprintf(r->method, sizeof(r->method), "-");
    if (uri != NULL)
        copy_printable(r->path, sizeof(r->path), uri,
                       q != NULL ? (size_t)(q - uri) : strlen(uri));
    pthread_mutex_lock(&srv->lock);
    srv->in_flight++;
    pthread_mutex_unlock(&srv->lock);
    metrics_request_begin();
    return r;
}

/* libmicrohttpd 0.9.75 calls this with the request target as it arrived,
 * before it unescapes or splits anything (the raw query is ours to read);
 * what it returns is the request's *req_cls, and from here on it reports
 * the request's end to on_completed. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    return request_new(cls, conn, uri);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    request *r = *req_cls;
    http_server *srv = cls;
    const union MHD_ConnectionInfo *ci;

    if (r == NULL)
        return;
    budget_release(srv->budget, r->reserved);
    if (r->conn != NULL)
        conns_end_request(r->conn);
    /* answered by libmicrohttpd itself (its own 400, 413, 431) */
    if (!r->answered) {
        ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_HTTP_STATUS);
        if (ci != NULL && ci->http_status != 0) {
            r->status = (int)ci->http_status;
            r->error = "libmicrohttpd";
        }
    }
    /* method, path, status, latency and key only: never content or PINs */
    log_info("%s %s %d %.1fms key=%s%s%s%s", r->method, r->path, r->status,
             ms_since(&r->start), r->key[0] ? r->key : "-",
             r->error != NULL ? " error=" : "",
             r->error != NULL ? r->error : "",
             toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " aborted");
    metrics_request_end(r->route != NULL ? api_route_path(r->route)
                                         : r->endpoint,
                        r->status, ms_since(&r->start) / 1e3);
    free(r->body);
    free(r->query);
    for (size_t i = 0; i <= PEER_SANS_MAX; i++)
        free(r->peer_strings[i]);
    free(r);
    *req_cls = NULL;
    pthread_mutex_lock(&srv->lock);
    if (--srv->in_flight == 0)
        pthread_cond_broadcast(&srv->idle);
    pthread_mutex_unlock(&srv->lock);
}

/* Fills the request's credentials: the Authorization header as sent (a
 * NUL in it is the api's to refuse) and the TLS client certificate. */
static void credentials(request *r, api_request *areq)
{
    areq->authorization = r->scan.authorization;
    areq->authorization_len = r->scan.authorization_len;
    areq->peer = r->has_peer ? &r->peer : NULL;
}

/* 401 comes before everything else the contract checks, so it is decided
 * on the headers; api_handle checks again with the configuration that
 * serves the body. */
static int authenticate(request *r, api_error *err)
{
    api_request areq = {0};
    const api_client *client;

    credentials(r, &areq);
    return api_authenticate(r->srv->api, &areq, &client, err);
}

/* A 401 or 403 is recorded by the key process (the worker never opens
 * the audit trail). A record that cannot be written is logged: the
 * answer is a refusal either way. */
static void audit_refusal(request *r, const api_response *res)
{
    proto_claims claims;
    rkey_failure f = {0};
    char key[PROTO_NAME_MAX + 1];

    if (r->status != 401 && r->status != 403)
        return;
    memset(&claims, 0, sizeof(claims));
    snprintf(claims.request_id, sizeof(claims.request_id), "%s", r->id);
    snprintf(claims.client, sizeof(claims.client), "%s", res->client);
    snprintf(claims.remote, sizeof(claims.remote), "%s", r->remote);
    snprintf(claims.content_sha256, sizeof(claims.content_sha256), "%s",
             res->content_sha256);
    /* the key name may be the client's text */
    copy_printable(key, sizeof(key), res->key, strlen(res->key));
    if (rkey_audit(r->srv->keys, &claims,
                   res->operation != NULL ? res->operation : r->path, key,
                   (unsigned)r->status, res->error, &f) != 0)
        log_error("cannot have the refusal of request %s recorded: %s (%s)",
                  r->id, f.message, proto_status_name(f.status));
}

/* The end of a request whose key operations the key process recorded:
 * the status sent, for the record's second stage. */
static void audit_finish(request *r)
{
    rkey_failure f = {0};
    double us = ms_since(&r->start) * 1e3;

    if (rkey_finish(r->srv->keys, r->id, (unsigned)r->status, r->error,
                    us > 4e9 ? 4000000000u : (uint32_t)us, &f) != 0)
        log_error("cannot have the end of request %s recorded: %s (%s)", r->id,
                  f.message, proto_status_name(f.status));
}

/* GET /metrics: served here rather than by api/, which knows nothing of
 * request counts; like /healthz and /readyz it needs no credentials. */
static int is_metrics(const char *method, const char *url)
{
    return strcmp(url, "/metrics") == 0 &&
           (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0);
}

static enum MHD_Result answer_metrics(request *r, struct MHD_Connection *conn)
{
    api_response res = {0};
    api_error err;
    proto_token_entry *tokens = NULL;
    rkey_failure f = {0};
    size_t ntokens = 0;
    char *page = NULL;
    int rc;

    r->endpoint = "/metrics";
    /* without the key process the page still has the request series */
    if (rkey_state(r->srv->keys, &tokens, &ntokens, &f) != 0)
        log_warn("/metrics without token series: %s", f.message);
    rc = metrics_render(tokens, ntokens, &page, &res.body_len);
    free(tokens);
    if (rc != 0) {
        api_fail(&err, 500, "internal_error", "out of memory");
        return answer_error(r, conn, &err);
    }
    res.body = (unsigned char *)page;
    res.status = 200;
    res.content_type = "text/plain; version=0.0.4; charset=utf-8";
    return respond(r, conn, &res);
}

/* A body is read only within the daemon's budget of body bytes in flight:
 * its Content-Length, or a whole max_body_bytes when it comes chunked.
 * Decided on the headers, after 413 and 415 and before any of it is read;
 * on_completed gives it back, whichever way the request ends. */
static int reserve_body(request *r, struct MHD_Connection *conn, api_error *err)
{
    uint64_t want = r->announced;

    if (MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                    MHD_HTTP_HEADER_TRANSFER_ENCODING) != NULL)
        want = r->srv->max_body;
    if (budget_reserve(r->srv->budget, want) != 0) {
        api_fail(err, 503, "server_busy",
                 "no room for another request body of %llu bytes now",
                 (unsigned long long)want);
        err->retry_after = 1;
        return -1;
    }
    r->reserved = want;
    return 0;
}

/* The checks made from the headers alone, in the contract's order: 431
 * (a header block that leaves no room for the answer) before all, then
 * 401, 404/405, 413/415, and 400 for the header block and the target. */
static int check_headers(request *r, struct MHD_Connection *conn,
                         const char *method, const char *url,
                         const char *version, api_error *err)
{
    const char *clen, *ctype;
    char *end;
    unsigned long long n;

    wire_scan_headers(conn, method, version, &r->scan);
    r->close = r->scan.framing;
    if (r->scan.too_large.status != 0) {
        *err = r->scan.too_large;
        return -1;
    }
    if (!is_metrics(method, url)) {
        if (!api_path_is_open(url) && authenticate(r, err) != 0)
            return -1;
        r->route = api_route_find(method, url, err);
        if (r->route == NULL)
            return -1;
    }
    if (r->route != NULL && api_route_has_body(r->route)) {
        clen = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                           MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (clen != NULL && !r->scan.chunked) {
            errno = 0;
            n = strtoull(clen, &end, 10);
            if (errno == 0 && *end == '\0' && n > r->srv->max_body)
                return api_fail(err, 413, "body_too_large",
                                "request body of %llu bytes is over the "
                                "limit of %zu",
                                n, r->srv->max_body);
            if (errno == 0 && *end == '\0')
                r->announced = (size_t)n;
        }
        ctype = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                            MHD_HTTP_HEADER_CONTENT_TYPE);
        if (api_route_check_media(r->route, ctype, &r->kind, err) != 0 ||
            reserve_body(r, conn, err) != 0)
            return -1;
    }
    if (r->scan.problem.status != 0) {
        *err = r->scan.problem;
        return -1;
    }
    if (r->target_nul)
        return api_fail(err, 400, "invalid_field",
                        "the request target holds a NUL byte");
    return 0;
}

static int append_body(request *r, const char *data, size_t size,
                       api_error *err)
{
    unsigned char *grown;
    size_t cap;

    /* chunked bodies carry no Content-Length: stop at the cap as they come */
    if (size > r->srv->max_body - r->len)
        return api_fail(err, 413, "body_too_large",
                        "request body is over the limit of %zu",
                        r->srv->max_body);
    if (r->len + size > r->cap) {
        /* the announced length at once, when it arrives: growing by
         * doubling copies a large body once more (buffers up to 32 MiB are
         * in the heap, where realloc moves them) */
        cap = r->cap ? r->cap : r->announced > 16384 ? r->announced : 16384;
        while (cap < r->len + size)
            cap *= 2;
        if (cap > r->srv->max_body)
            cap = r->srv->max_body;
        grown = realloc(r->body, cap);
        if (grown == NULL) {
            api_fail(err, 503, "out_of_memory",
                     "no memory for the request body");
            err->retry_after = 5;
            return -1;
        }
        r->body = grown;
        r->cap = cap;
    }
    memcpy(r->body + r->len, data, size);
    r->len += size;
    return 0;
}

/* Hands the request to the api: on the last call for a request with a
 * body, on the first for one without. */
static enum MHD_Result handle(request *r, struct MHD_Connection *conn)
{
    api_request areq = {0};
    api_body body = {0};
    api_response res = {0};
    int rc;

    areq.request_id = r->id;
    areq.remote = r->remote;
    areq.route = r->route;
    areq.kind = r->kind;
    /* api_handle takes the body, and frees it as soon as it can */
    body.data = r->body;
    body.len = r->len;
    r->body = NULL;
    areq.body = &body;
    areq.query = r->query;
    areq.query_len = r->query_len;
    credentials(r, &areq);
    rc = api_handle(r->srv->api, &areq, &res);
    /* the claims api set are this request's alone */
    r->key_ops = rkey_claims_ops();
    rkey_claims_set(NULL);
    if (rc != 0) {
        res.status = 500;
        res.error = "internal_error";
    }
    return respond(r, conn, &res);
}

static int answer_now(request *r, struct MHD_Connection *conn)
{
    const char *clen = MHD_lookup_connection_value(
        conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *expect = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_EXPECT);
    int has_body = r->scan.chunked || (clen != NULL && strcmp(clen, "0") != 0);

    if (r->route == NULL || !api_route_has_body(r->route))
        return has_body;
    return !r->scan.chunked && r->announced == 0 && expect != NULL &&
           strcasecmp(expect, "100-continue") == 0;
}

/* The first call: everything decided on the headers. */
static enum MHD_Result first_call(request *r, struct MHD_Connection *conn,
                                  const char *method, const char *url,
                                  const char *version)
{
    api_error err = {0};

    r->started = 1;
    snprintf(r->method, sizeof(r->method), "%s", method);
    copy_printable(r->path, sizeof(r->path), url, strlen(url));
    if (check_headers(r, conn, method, url, version, &err) != 0) {
        api_response res = {0};

        if (api_response_set_error(&res, &err) != 0) {
            res.status = 500;
            res.error = "internal_error";
        }
        return respond(r, conn, &res);
    }
    /* An answer queued now ends the connection after it (libmicrohttpd
     * 0.9.75 reads nothing more of it), so only what must be is answered
     * now: a body sent to a route without one, which is then never read,
     * and a body route's request that announces no body but asks for 100
     * Continue, for which libmicrohttpd would call the handler again with
     * whatever bytes follow before it takes a response. */
    if (answer_now(r, conn))
        return r->route == NULL ? answer_metrics(r, conn) : handle(r, conn);
    return MHD_YES;
}

/* With no request (no memory for one), the fixed 500. */
static enum MHD_Result answer_without_request(struct MHD_Connection *conn)
{
    struct MHD_Response *resp = fixed_build();
    enum MHD_Result ret;

    if (resp == NULL)
        return MHD_NO;
    log_error("no memory for a request; answering 500");
    ret = MHD_queue_response(conn, 500, resp);
    MHD_destroy_response(resp);
    return ret;
}

static conns_entry *conn_entry(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

    return ci != NULL ? ci->socket_context : NULL;
}

/* libmicrohttpd's accept policy: after its own max_connections check. */
static enum MHD_Result on_accept(void *cls, const struct sockaddr *addr,
                                 socklen_t addrlen)
{
    http_server *srv = cls;

    return conns_admit(srv->conns, addr, addrlen) ? MHD_YES : MHD_NO;
}

/* A connection started or closed; the entry is its socket_context. Both
 * come from the thread that accepts, and CLOSED before libmicrohttpd
 * closes the descriptor. */
static void on_connection(void *cls, struct MHD_Connection *conn,
                          void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    http_server *srv = cls;
    const union MHD_ConnectionInfo *addr, *fd;

    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        conns_close(srv->conns, *socket_context);
        *socket_context = NULL;
        return;
    }
    addr = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    fd = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (fd != NULL)
        *socket_context =
            conns_open(srv->conns, addr != NULL ? addr->client_addr : NULL,
                       fd->connect_fd);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn,
                                  const char *url, const char *method,
                                  const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **req_cls)
{
    request *r = *req_cls;

    if (r == NULL)
        return answer_without_request(conn);
    if (!r->started) {
        r->conn = conn_entry(conn);
        /* the header is complete: its deadline no longer applies */
        if (r->conn != NULL && conns_begin_request(r->conn) != 0)
            return MHD_NO;
        return first_call(r, conn, method, url, version);
    }
    if (r->answered) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t size = *upload_data_size;

        *upload_data_size = 0;
        /* libmicrohttpd 0.9.75 takes no response while a body is still
         * arriving: keep nothing more and answer once it has ended */
        if (!r->refused && append_body(r, upload_data, size, &r->err) != 0) {
            r->refused = 1;
            free(r->body);
            r->body = NULL;
            r->len = r->cap = 0;
        } else if (r->refused) {
            /* a Content-Length body ends within max_body; a chunked one
             * that keeps coming gets its 413 only while that stays cheap,
             * and past the limit the connection is closed */
            r->drained += size;
            if (r->scan.chunked && r->drained > DRAIN_LIMIT)
                return MHD_NO;
        }
        return MHD_YES;
    }
    if (r->refused)
        return answer_error(r, conn, &r->err);
    return r->route == NULL ? answer_metrics(r, conn) : handle(r, conn);
}

/* "host:port" or "[v6]:port" into a socket address. */
static int parse_listen(const char *listen, struct sockaddr_storage *ss,
                        socklen_t *sslen, char *errbuf, size_t errlen)
{
    struct addrinfo hints = {0}, *ai = NULL;
    char host[256];
    const char *colon = strrchr(listen, ':');
    size_t hlen;
    int rc;

    if (colon == NULL || colon == listen) {
        snprintf(errbuf, errlen, "listen address %s is not HOST:PORT", listen);
        return -1;
    }
    hlen = (size_t)(colon - listen);
    if (listen[0] == '[' && colon[-1] == ']') {
        listen++;
        hlen -= 2;
    }
    if (hlen >= sizeof(host)) {
        snprintf(errbuf, errlen, "listen host is too long");
        return -1;
    }
    memcpy(host, listen, hlen);
    host[hlen] = '\0';
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host, colon + 1, &hints, &ai);
    if (rc != 0) {
        snprintf(errbuf, errlen, "listen address %.64s: %s", host,
                 gai_strerror(rc));
        return -1;
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *sslen = ai->ai_addrlen;
    freeaddrinfo(ai);
    return 0;
}

int http_listen_is_loopback(const char *listen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    char errbuf[128];

    if (parse_listen(listen, &ss, &sslen, errbuf, sizeof(errbuf)) != 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) ==
               127;
    return ss.ss_family == AF_INET6 &&
           IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&ss)->sin6_addr);
}

/* A PEM file for libmicrohttpd, which takes them as text. */
static char *read_pem(const char *path, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "re");
    char *text = NULL;
    size_t n = 0;

    if (f == NULL) {
        snprintf(errbuf, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    text = calloc(1, HTTP_PEM_MAX + 1);
    if (text != NULL)
        n = fread(text, 1, HTTP_PEM_MAX + 1, f);
    fclose(f);
    if (text == NULL || n == 0 || n > HTTP_PEM_MAX) {
        snprintf(errbuf, errlen, "%s is empty, too large or unreadable", path);
        free(text);
        return NULL;
    }
    return text;
}

static void free_secret(char *text)
{
    if (text != NULL)
        OPENSSL_clear_free(text, strlen(text));
}

void http_tls_clear(http_tls *tls)
{
    free(tls->certificate);
    free_secret(tls->key);
    free(tls->client_ca);
    memset(tls, 0, sizeof(*tls));
}

int http_tls_read(http_tls *tls, const char *certificate, const char *key,
                  const char *client_ca, char *errbuf, size_t errlen)
{
    memset(tls, 0, sizeof(*tls));
    if ((tls->certificate = read_pem(certificate, errbuf, errlen)) == NULL ||
        (tls->key = read_pem(key, errbuf, errlen)) == NULL ||
        (client_ca != NULL &&
         (tls->client_ca = read_pem(client_ca, errbuf, errlen)) == NULL)) {
        http_tls_clear(tls);
        return -1;
    }
    return 0;
}

static void server_free(http_server *srv)
{
    metrics_set_sources(NULL, NULL, NULL);
    conns_free(srv->conns);
    pthread_cond_destroy(&srv->idle);
    pthread_mutex_destroy(&srv->lock);
    free(srv->tls_cert);
    free_secret(srv->tls_key);
    free(srv->tls_ca);
    free(srv);
}

int http_listen_open(const char *addr, char *errbuf, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int fd, one = 1;

    if (parse_listen(addr, &ss, &sslen, errbuf, errlen) != 0)
        return -1;
    /* non-blocking: every worker polls it, and those that lose the race
     * for a connection must not sit in accept() */
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        (ss.ss_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) ||
        bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
        listen(fd, SOMAXCONN) != 0) {
        snprintf(errbuf, errlen, "cannot listen on %s: %s", addr,
                 strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

unsigned http_listen_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

http_server *http_start(const http_options *opts, api *a, rkey_client *keys,
                        char *errbuf, size_t errlen)
{
    http_server *srv = NULL, *ret = NULL;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof(ss);
    conns_options conns_opts;
    struct MHD_OptionItem o[16];
    size_t n = 0;
    unsigned flags = MHD_USE_AUTO | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG;

    if (getsockname(opts->listen_fd, (struct sockaddr *)&ss, &sslen) != 0) {
        snprintf(errbuf, errlen, "the listening socket: %s", strerror(errno));
        goto out;
    }
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    srv = calloc(1, sizeof(*srv));
    if (srv == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    pthread_mutex_init(&srv->lock, NULL);
    pthread_cond_init(&srv->idle, NULL);
    srv->api = a;
    srv->keys = keys;
    srv->max_body = opts->max_body_bytes;
    srv->budget = opts->budget;
    conns_opts.max_connections = opts->max_connections;
    conns_opts.max_per_ip = opts->max_connections_per_ip;
    conns_opts.header_timeout_s = opts->header_timeout_s;
    srv->conns = conns_new(&conns_opts, opts->region, errbuf, errlen);
    if (srv->conns == NULL)
        goto out;
    metrics_set_sources(opts->region, srv->budget, srv->conns);
#define OPT(opt, value, ptr)                                                   \
    o[n++] = (struct MHD_OptionItem){(opt), (intptr_t)(value), (ptr)}
    OPT(MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL);
    OPT(MHD_OPTION_LISTEN_SOCKET, opts->listen_fd, NULL);
    OPT(MHD_OPTION_CONNECTION_LIMIT, opts->max_connections, NULL);
    /* the per-address limit is conns_admit's, with the reserve */
    OPT(MHD_OPTION_CONNECTION_TIMEOUT, opts->timeout_s, NULL);
    OPT(MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv);
    OPT(MHD_OPTION_URI_LOG_CALLBACK, on_uri, srv);
    OPT(MHD_OPTION_CONNECTION_MEMORY_LIMIT, WIRE_POOL_SIZE, NULL);
    OPT(MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv);
    if (opts->tls != NULL) {
        flags |= MHD_USE_TLS;
        srv->tls_cert = strdup(opts->tls->certificate);
        srv->tls_key = strdup(opts->tls->key);
        if (srv->tls_cert == NULL || srv->tls_key == NULL) {
            snprintf(errbuf, errlen, "out of memory");
            goto out;
        }
        /* GnuTLS's NORMAL still offers TLS 1.0 and 1.1 */
        OPT(MHD_OPTION_HTTPS_PRIORITIES, 0, HTTP_TLS_PRIORITIES);
        OPT(MHD_OPTION_HTTPS_MEM_CERT, 0, srv->tls_cert);
        OPT(MHD_OPTION_HTTPS_MEM_KEY, 0, srv->tls_key);
        if (opts->tls->client_ca != NULL) {
            srv->tls_ca = strdup(opts->tls->client_ca);
            if (srv->tls_ca == NULL) {
                snprintf(errbuf, errlen, "out of memory");
                goto out;
            }
            OPT(MHD_OPTION_HTTPS_MEM_TRUST, 0, srv->tls_ca);
        }
    }
    OPT(MHD_OPTION_END, 0, NULL);
#undef OPT
    if (opts->tls != NULL &&
        MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
        snprintf(errbuf, errlen, "this libmicrohttpd has no TLS support");
        goto out;
    }
    srv->daemon = MHD_start_daemon(flags, 0, on_accept, srv, on_request, srv,
                                   MHD_OPTION_ARRAY, o, MHD_OPTION_END);
    if (srv->daemon == NULL) {
        snprintf(errbuf, errlen, "cannot listen on %s: %s%s", opts->listen,
                 strerror(errno),
                 opts->tls != NULL
                     ? " (or the TLS certificate and key do not load)"
                     : "");
        goto out;
    }
    ret = srv;
    srv = NULL;
out:
    if (srv != NULL)
        server_free(srv);
    return ret;
}

void http_quiesce(http_server *srv)
{
    MHD_socket fd;

    /* only the control thread calls this */
    if (__atomic_exchange_n(&srv->closing, 1, __ATOMIC_RELAXED))
        return;
    fd = MHD_quiesce_daemon(srv->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
}

unsigned http_shutdown(http_server *srv, unsigned timeout_ms)
{
    struct timespec deadline, tick = {0, DRAIN_POLL_MS * 1000000L};
    conns_stats st;
    unsigned left, quiet_ms = 0;

    http_quiesce(srv);
    /* the condition variable waits on CLOCK_REALTIME */
    deadline = deadline_after(CLOCK_REALTIME, (long)timeout_ms);
    /* Requests in flight end, and then connections: one accepted just
     * before the quiesce may not have sent its request yet (other workers
     * go on serving, so its client is owed an answer, not a close). Every
     * answer now says Connection: close; a connection that stays idle
     * DRAIN_IDLE_MS with nothing in flight is a keep-alive one that had
     * nothing more to ask. */
    for (;;) {
        pthread_mutex_lock(&srv->lock);
        while (srv->in_flight > 0 &&
               pthread_cond_timedwait(&srv->idle, &srv->lock, &deadline) == 0)
            ;
        left = srv->in_flight;
        pthread_mutex_unlock(&srv->lock);
        conns_get_stats(srv->conns, &st);
        if (left > 0 || st.open == 0 || quiet_ms >= DRAIN_IDLE_MS ||
            deadline_passed(&deadline, CLOCK_REALTIME))
            break;
        nanosleep(&tick, NULL);
        pthread_mutex_lock(&srv->lock);
        quiet_ms = srv->in_flight > 0 ? 0 : quiet_ms + DRAIN_POLL_MS;
        pthread_mutex_unlock(&srv->lock);
    }
    MHD_stop_daemon(srv->daemon);
    server_free(srv);
    return left;
}
