/*
 * Request counters and a latency histogram per endpoint, under one mutex:
 * the work per request is a few increments, far below the cost of the
 * request itself, and a page rendered under the same lock is consistent.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "service/metrics.h"

/* Upper bounds in seconds: a P-256 signature takes well under 1 ms, a
 * smartcard RSA signature up to half a second, a request waiting for a
 * busy token up to its wait_ms. */
static const double buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                 0.25,  0.5,    1,     2.5,  5,     10};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

/* Endpoints are route paths (a handful) and "other"; statuses a handful
 * each. Past this many pairs, the last one counts every new pair. */
#define MAX_SERIES 96
#define MAX_ENDPOINTS 24

struct series {
    const char *endpoint; /* static: a route path or "other" */
    int status;
    unsigned long count;
};

struct latency {
    const char *endpoint;
    unsigned long bucket[NBUCKETS]; /* cumulative at render time only */
    unsigned long count;
    double sum;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct series series[MAX_SERIES];
static size_t nseries;
static struct latency latencies[MAX_ENDPOINTS];
static size_t nlatencies;
static unsigned long in_flight;
static const budget *body_budget;
static conns *connections;

void metrics_set_sources(const budget *b, conns *c)
{
    pthread_mutex_lock(&lock);
    body_budget = b;
    connections = c;
    pthread_mutex_unlock(&lock);
}

void metrics_request_begin(void)
{
    pthread_mutex_lock(&lock);
    in_flight++;
    pthread_mutex_unlock(&lock);
}

static struct series *series_for(const char *endpoint, int status)
{
    size_t i;

    for (i = 0; i < nseries; i++) {
        if (series[i].status == status &&
            strcmp(series[i].endpoint, endpoint) == 0)
            return &series[i];
    }
    if (nseries < MAX_SERIES) {
        series[nseries].endpoint = endpoint;
        series[nseries].status = status;
        return &series[nseries++];
    }
    return &series[MAX_SERIES - 1];
}

static struct latency *latency_for(const char *endpoint)
{
    size_t i;

    for (i = 0; i < nlatencies; i++) {
        if (strcmp(latencies[i].endpoint, endpoint) == 0)
            return &latencies[i];
    }
    if (nlatencies == MAX_ENDPOINTS)
        return NULL;
    latencies[nlatencies].endpoint = endpoint;
    return &latencies[nlatencies++];
}

void metrics_request_end(const char *endpoint, int status, double seconds)
{
    struct latency *l;
    size_t i;

    if (endpoint == NULL)
        endpoint = "other";
    pthread_mutex_lock(&lock);
    if (in_flight > 0)
        in_flight--;
    series_for(endpoint, status)->count++;
    l = latency_for(endpoint);
    if (l != NULL) {
        for (i = 0; i < NBUCKETS && seconds > buckets[i]; i++)
            ;
        if (i < NBUCKETS)
            l->bucket[i]++;
        l->count++;
        l->sum += seconds;
    }
    pthread_mutex_unlock(&lock);
}

/* A growing text buffer; a failed append marks it failed. */
typedef struct page {
    char *buf;
    size_t len, cap;
    int failed;
} page;

__attribute__((format(printf, 2, 3))) static void put(page *p, const char *fmt,
                                                      ...)
{
    va_list ap;
    int n;

    if (p->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(p->buf + p->len, p->cap - p->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            p->failed = 1;
            return;
        }
        if ((size_t)n < p->cap - p->len) {
            p->len += (size_t)n;
            return;
        }
        size_t cap = p->cap * 2 + (size_t)n + 1;
        char *b = realloc(p->buf, cap);

        if (b == NULL) {
            p->failed = 1;
            return;
        }
        p->buf = b;
        p->cap = cap;
    }
}

/* A label value: backslash, double quote and newline escaped, as the
 * format requires (token names come from the configuration or the
 * token's own label). */
static void put_label(page *p, const char *value)
{
    const char *c;

    for (c = value; *c != '\0'; c++) {
        if (*c == '\\' || *c == '"')
            put(p, "\\%c", *c);
        else if (*c == '\n')
            put(p, "\\n");
        else
            put(p, "%c", *c);
    }
}

static void render_requests(page *p)
{
    unsigned long cumulative;
    size_t i, j;

    put(p, "# HELP smimed_requests_total HTTP requests answered, by "
           "endpoint and status.\n# TYPE smimed_requests_total counter\n");
    for (i = 0; i < nseries; i++)
        put(p, "smimed_requests_total{endpoint=\"%s\",status=\"%d\"} %lu\n",
            series[i].endpoint, series[i].status, series[i].count);
    put(p, "# HELP smimed_request_duration_seconds Time from the request's "
           "first byte to its answer.\n"
           "# TYPE smimed_request_duration_seconds histogram\n");
    for (i = 0; i < nlatencies; i++) {
        const struct latency *l = &latencies[i];

        cumulative = 0;
        for (j = 0; j < NBUCKETS; j++) {
            cumulative += l->bucket[j];
            put(p,
                "smimed_request_duration_seconds_bucket{endpoint=\"%s\","
                "le=\"%g\"} %lu\n",
                l->endpoint, buckets[j], cumulative);
        }
        put(p,
            "smimed_request_duration_seconds_bucket{endpoint=\"%s\","
            "le=\"+Inf\"} %lu\n",
            l->endpoint, l->count);
        put(p, "smimed_request_duration_seconds_sum{endpoint=\"%s\"} %.6f\n",
            l->endpoint, l->sum);
        put(p, "smimed_request_duration_seconds_count{endpoint=\"%s\"} %lu\n",
            l->endpoint, l->count);
    }
    put(p,
        "# HELP smimed_requests_in_flight HTTP requests being answered.\n"
        "# TYPE smimed_requests_in_flight gauge\n"
        "smimed_requests_in_flight %lu\n",
        in_flight);
}

/* The body budget is one for the whole daemon, however many processes
 * serve it; the connection counts are this process's. */
static void render_limits(page *p, const budget *b, conns *c)
{
    conns_stats st;

    if (b != NULL)
        put(p,
            "# HELP smimed_body_bytes_in_flight Request body bytes reserved "
            "now (their Content-Length, or max_body_bytes when chunked).\n"
            "# TYPE smimed_body_bytes_in_flight gauge\n"
            "smimed_body_bytes_in_flight %llu\n"
            "# HELP smimed_body_bytes_limit max_inflight_body_bytes.\n"
            "# TYPE smimed_body_bytes_limit gauge\n"
            "smimed_body_bytes_limit %llu\n"
            "# HELP smimed_server_busy_total Requests refused with 503 "
            "server_busy: their body did not fit the budget.\n"
            "# TYPE smimed_server_busy_total counter\n"
            "smimed_server_busy_total %llu\n",
            (unsigned long long)budget_in_flight(b),
            (unsigned long long)budget_limit(b),
            (unsigned long long)budget_refusals(b));
    if (c == NULL)
        return;
    conns_get_stats(c, &st);
    put(p,
        "# HELP smimed_connections HTTP connections open now.\n"
        "# TYPE smimed_connections gauge\n"
        "smimed_connections %u\n"
        "# HELP smimed_header_timeouts_total Connections shut down without a "
        "complete request header within header_timeout_s.\n"
        "# TYPE smimed_header_timeouts_total counter\n"
        "smimed_header_timeouts_total %llu\n"
        "# HELP smimed_connections_refused_total Connections refused on "
        "accept: per_ip (max_connections_per_ip), reserve (the last slots "
        "are kept for addresses with few connections).\n"
        "# TYPE smimed_connections_refused_total counter\n"
        "smimed_connections_refused_total{reason=\"per_ip\"} %llu\n"
        "smimed_connections_refused_total{reason=\"reserve\"} %llu\n",
        st.open, (unsigned long long)st.header_timeouts,
        (unsigned long long)st.refused_per_ip,
        (unsigned long long)st.refused_reserve);
}

/* One line per token: "name{token="x"<extra>} value". */
__attribute__((format(printf, 5, 6))) static void
put_token(page *p, const char *name, const char *token, const char *extra,
          const char *fmt, ...)
{
    char value[64];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(value, sizeof(value), fmt, ap);
    va_end(ap);
    put(p, "%s{token=\"", name);
    put_label(p, token);
    put(p, "\"%s} %s\n", extra, value);
}

#define STAT_GETTER(field)                                                     \
    static unsigned long long stat_##field(const proto_token_entry *t)         \
    {                                                                          \
        return t->field;                                                       \
    }
STAT_GETTER(ops_sign)
STAT_GETTER(ops_decrypt)
STAT_GETTER(busy)
STAT_GETTER(unavailable)
STAT_GETTER(faults)
STAT_GETTER(retries)
STAT_GETTER(recoveries)
STAT_GETTER(in_flight)
STAT_GETTER(waiting)
STAT_GETTER(max_sessions)

/* The numbers of a STATE entry as series, one line per token each; help
 * (and type) only on the first series of a name. */
static const struct token_series {
    const char *name, *extra, *type, *help;
    unsigned long long (*get)(const proto_token_entry *);
} token_series[] = {
    {"smimed_token_operations_total", ",kind=\"sign\"", "counter",
     "Private-key operations started, by token and kind.", stat_ops_sign},
    {"smimed_token_operations_total", ",kind=\"decrypt\"", NULL, NULL,
     stat_ops_decrypt},
    {"smimed_token_failures_total", ",kind=\"busy\"", "counter",
     "Operations refused or failed for the token's sake: busy (no session in "
     "time), unavailable (token or key not usable), fault (the token stopped "
     "answering), retry (sessions died; retried once on a rebuilt context).",
     stat_busy},
    {"smimed_token_failures_total", ",kind=\"unavailable\"", NULL, NULL,
     stat_unavailable},
    {"smimed_token_failures_total", ",kind=\"fault\"", NULL, NULL, stat_faults},
    {"smimed_token_failures_total", ",kind=\"retry\"", NULL, NULL,
     stat_retries},
    {"smimed_token_recoveries_total", "", "counter",
     "Times the token was re-opened on a rebuilt module context.",
     stat_recoveries},
    {"smimed_token_operations_in_flight", "", "gauge",
     "Private-key operations holding a session now.", stat_in_flight},
    {"smimed_token_operations_waiting", "", "gauge",
     "Private-key operations queued for a session now.", stat_waiting},
    {"smimed_token_sessions", "", "gauge",
     "Operations a token admits at once (max_sessions).", stat_max_sessions},
};

/* The key process's counters: one STATE snapshot, so the series of a
 * scrape agree. */
static void render_tokens(page *p, const proto_token_entry *tokens, size_t n)
{
    size_t i, j;
    char extra[64];

    put(p, "# HELP smimed_token_state 1 for the state each token is in.\n"
           "# TYPE smimed_token_state gauge\n");
    for (i = 0; i < n; i++) {
        for (j = 0; j < PROTO_TOKEN_STATE_COUNT; j++) {
            snprintf(extra, sizeof(extra), ",state=\"%s\"",
                     proto_token_state_name((unsigned)j));
            put_token(p, "smimed_token_state", tokens[i].name, extra, "%d",
                      tokens[i].state == j);
        }
    }
    for (j = 0; j < sizeof(token_series) / sizeof(token_series[0]); j++) {
        const struct token_series *ts = &token_series[j];

        if (ts->help != NULL)
            put(p, "# HELP %s %s\n# TYPE %s %s\n", ts->name, ts->help, ts->name,
                ts->type);
        for (i = 0; i < n; i++)
            put_token(p, ts->name, tokens[i].name, ts->extra, "%llu",
                      ts->get(&tokens[i]));
    }
}

int metrics_render(const proto_token_entry *tokens, size_t ntokens, char **out,
                   size_t *len)
{
    page p = {0};
    const budget *b;
    conns *c;

    p.cap = 4096;
    p.buf = malloc(p.cap);
    if (p.buf == NULL)
        return -1;
    p.buf[0] = '\0';
    pthread_mutex_lock(&lock);
    render_requests(&p);
    b = body_budget;
    c = connections;
    pthread_mutex_unlock(&lock);
    render_limits(&p, b, c);
    render_tokens(&p, tokens, ntokens);
    if (p.failed) {
        free(p.buf);
        return -1;
    }
    *out = p.buf;
    *len = p.len;
    return 0;
}
