/*
 * Request counters and a latency histogram per endpoint, in this
 * process's area of the shared region (service/shared.h), so /metrics
 * sums every worker's whichever worker answers. A process writes only its
 * own area: appends (a new endpoint or status) under a local mutex,
 * published by bumping the count after the entry is written; the numbers
 * with atomic adds, which readers in other processes load atomically.
 * What the page reads from other areas is checked as it is read (counts
 * capped, names bounded and of route-path characters only, statuses three
 * digits): another worker's area is not trusted.
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
/* An endpoint's name, NUL included (route paths are short). */
#define NAME_LEN 32

struct series {
    char endpoint[NAME_LEN];
    uint32_t status;
    uint32_t pad;
    uint64_t count;
};

struct latency {
    char endpoint[NAME_LEN];
    uint64_t bucket[NBUCKETS]; /* cumulative at render time only */
    uint64_t count;
    uint64_t sum_us;
};

struct area {
    uint32_t nseries, nlatencies;
    struct series series[MAX_SERIES];
    struct latency latencies[MAX_ENDPOINTS];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static shared *region;
static const budget *body_budget;
static conns *connections;

size_t metrics_area_size(void)
{
    return sizeof(struct area);
}

void metrics_set_sources(shared *r, const budget *b, conns *c)
{
    pthread_mutex_lock(&lock);
    region = r;
    body_budget = b;
    connections = c;
    pthread_mutex_unlock(&lock);
}

/* This process's area, or NULL (no region, or the creator's handle). */
static struct area *own_area(void)
{
    int self = region != NULL ? shared_self(region) : -1;

    return self >= 0 ? shared_area(region, (unsigned)self) : NULL;
}

void metrics_request_begin(void)
{
    pthread_mutex_lock(&lock);
    if (region != NULL)
        shared_count(region, SHARED_REQUESTS_IN_FLIGHT, 1);
    pthread_mutex_unlock(&lock);
}

static void name_of(char name[NAME_LEN], const char *endpoint)
{
    memset(name, 0, NAME_LEN);
    strncpy(name, endpoint, NAME_LEN - 1);
}

static uint32_t count_of(const uint32_t *n, uint32_t max)
{
    uint32_t v = __atomic_load_n(n, __ATOMIC_ACQUIRE);

    return v < max ? v : max;
}

/* Under lock: the own area's entries, found or appended. */
static struct series *series_for(struct area *a, const char *name, int status)
{
    uint32_t n = count_of(&a->nseries, MAX_SERIES), i;
    struct series *s;

    for (i = 0; i < n; i++) {
        s = &a->series[i];
        if (s->status == (uint32_t)status &&
            memcmp(s->endpoint, name, NAME_LEN) == 0)
            return s;
    }
    if (n == MAX_SERIES)
        return &a->series[MAX_SERIES - 1];
    s = &a->series[n];
    memcpy(s->endpoint, name, NAME_LEN);
    s->status = (uint32_t)status;
    __atomic_store_n(&a->nseries, n + 1, __ATOMIC_RELEASE);
    return s;
}

static struct latency *latency_for(struct area *a, const char *name)
{
    uint32_t n = count_of(&a->nlatencies, MAX_ENDPOINTS), i;
    struct latency *l;

    for (i = 0; i < n; i++)
        if (memcmp(a->latencies[i].endpoint, name, NAME_LEN) == 0)
            return &a->latencies[i];
    if (n == MAX_ENDPOINTS)
        return NULL;
    l = &a->latencies[n];
    memcpy(l->endpoint, name, NAME_LEN);
    __atomic_store_n(&a->nlatencies, n + 1, __ATOMIC_RELEASE);
    return l;
}

static void add(uint64_t *v, uint64_t n)
{
    __atomic_add_fetch(v, n, __ATOMIC_RELAXED);
}

void metrics_request_end(const char *endpoint, int status, double seconds)
{
    char name[NAME_LEN];
    struct latency *l;
    struct area *a;
    size_t i;

    name_of(name, endpoint != NULL ? endpoint : "other");
    pthread_mutex_lock(&lock);
    if (region != NULL)
        shared_count(region, SHARED_REQUESTS_IN_FLIGHT, -1);
    a = own_area();
    if (a == NULL)
        goto out;
    add(&series_for(a, name, status)->count, 1);
    l = latency_for(a, name);
    if (l != NULL) {
        for (i = 0; i < NBUCKETS && seconds > buckets[i]; i++)
            ;
        if (i < NBUCKETS)
            add(&l->bucket[i], 1);
        add(&l->count, 1);
        add(&l->sum_us, seconds > 0 ? (uint64_t)(seconds * 1e6) : 0);
    }
out:
    pthread_mutex_unlock(&lock);
}

/* ---- every area, summed ---- */

typedef struct totals {
    struct series series[MAX_SERIES];
    size_t nseries;
    struct latency latencies[MAX_ENDPOINTS];
    size_t nlatencies;
} totals;

/* Copies another area's name out; 0 unless it is a plausible route path
 * (what this build writes), so the page carries nothing else. */
static int name_read(char out[NAME_LEN], const char *in)
{
    size_t i;

    memcpy(out, in, NAME_LEN);
    out[NAME_LEN - 1] = '\0';
    if (out[0] == '\0')
        return 0;
    for (i = 0; out[i] != '\0'; i++)
        if (!((out[i] >= 'a' && out[i] <= 'z') ||
              (out[i] >= 'A' && out[i] <= 'Z') ||
              (out[i] >= '0' && out[i] <= '9') || strchr("/_.-", out[i])))
            return 0;
    return 1;
}

static uint64_t load(const uint64_t *v)
{
    return __atomic_load_n(v, __ATOMIC_RELAXED);
}

static void sum_area(totals *t, const struct area *a)
{
    uint32_t n = count_of(&a->nseries, MAX_SERIES), i, status;
    char name[NAME_LEN];
    size_t j, k;

    for (i = 0; i < n; i++) {
        status = __atomic_load_n(&a->series[i].status, __ATOMIC_RELAXED);
        if (!name_read(name, a->series[i].endpoint) || status < 100 ||
            status > 999)
            continue;
        for (j = 0; j < t->nseries; j++)
            if (t->series[j].status == status &&
                strcmp(t->series[j].endpoint, name) == 0)
                break;
        if (j == t->nseries && t->nseries < MAX_SERIES) {
            memcpy(t->series[j].endpoint, name, NAME_LEN);
            t->series[j].status = status;
            t->nseries++;
        }
        if (j == MAX_SERIES)
            j = MAX_SERIES - 1;
        t->series[j].count += load(&a->series[i].count);
    }
    n = count_of(&a->nlatencies, MAX_ENDPOINTS);
    for (i = 0; i < n; i++) {
        const struct latency *l = &a->latencies[i];

        if (!name_read(name, l->endpoint))
            continue;
        for (j = 0; j < t->nlatencies; j++)
            if (strcmp(t->latencies[j].endpoint, name) == 0)
                break;
        if (j == MAX_ENDPOINTS)
            continue;
        if (j == t->nlatencies) {
            memcpy(t->latencies[j].endpoint, name, NAME_LEN);
            t->nlatencies++;
        }
        for (k = 0; k < NBUCKETS; k++)
            t->latencies[j].bucket[k] += load(&l->bucket[k]);
        t->latencies[j].count += load(&l->count);
        t->latencies[j].sum_us += load(&l->sum_us);
    }
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

static void render_requests(page *p, const totals *t, uint64_t in_flight)
{
    unsigned long long cumulative;
    size_t i, j;

    put(p, "# HELP smimed_requests_total HTTP requests answered, by "
           "endpoint and status.\n# TYPE smimed_requests_total counter\n");
    for (i = 0; i < t->nseries; i++)
        put(p, "smimed_requests_total{endpoint=\"%s\",status=\"%u\"} %llu\n",
            t->series[i].endpoint, (unsigned)t->series[i].status,
            (unsigned long long)t->series[i].count);
    put(p, "# HELP smimed_request_duration_seconds Time from the request's "
           "first byte to its answer.\n"
           "# TYPE smimed_request_duration_seconds histogram\n");
    for (i = 0; i < t->nlatencies; i++) {
        const struct latency *l = &t->latencies[i];

        cumulative = 0;
        for (j = 0; j < NBUCKETS; j++) {
            cumulative += l->bucket[j];
            put(p,
                "smimed_request_duration_seconds_bucket{endpoint=\"%s\","
                "le=\"%g\"} %llu\n",
                l->endpoint, buckets[j], cumulative);
        }
        put(p,
            "smimed_request_duration_seconds_bucket{endpoint=\"%s\","
            "le=\"+Inf\"} %llu\n",
            l->endpoint, (unsigned long long)l->count);
        put(p, "smimed_request_duration_seconds_sum{endpoint=\"%s\"} %.6f\n",
            l->endpoint, (double)l->sum_us / 1e6);
        put(p, "smimed_request_duration_seconds_count{endpoint=\"%s\"} %llu\n",
            l->endpoint, (unsigned long long)l->count);
    }
    put(p,
        "# HELP smimed_requests_in_flight HTTP requests being answered.\n"
        "# TYPE smimed_requests_in_flight gauge\n"
        "smimed_requests_in_flight %llu\n",
        (unsigned long long)in_flight);
}

/* The supervisor's numbers. */
static void render_processes(page *p, shared *r)
{
    put(p,
        "# HELP smimed_worker_restarts_total Request workers the supervisor "
        "started again after one ended unasked.\n"
        "# TYPE smimed_worker_restarts_total counter\n"
        "smimed_worker_restarts_total %llu\n",
        (unsigned long long)shared_sum(r, SHARED_WORKER_RESTARTS));
}

/* The body budget and the connection counts: the whole daemon's. */
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
    totals *t = NULL;
    const budget *b;
    conns *c;
    shared *r;
    unsigned i;
    int ret = -1;

    p.cap = 4096;
    p.buf = malloc(p.cap);
    t = calloc(1, sizeof(*t));
    if (p.buf == NULL || t == NULL)
        goto out;
    p.buf[0] = '\0';
    pthread_mutex_lock(&lock);
    r = region;
    b = body_budget;
    c = connections;
    pthread_mutex_unlock(&lock);
    if (r != NULL) {
        for (i = 0; i < shared_slots(r); i++)
            sum_area(t, shared_area(r, i));
        render_requests(&p, t, shared_sum(r, SHARED_REQUESTS_IN_FLIGHT));
        render_processes(&p, r);
    }
    render_limits(&p, b, c);
    render_tokens(&p, tokens, ntokens);
    if (p.failed)
        goto out;
    *out = p.buf;
    *len = p.len;
    p.buf = NULL;
    ret = 0;
out:
    free(p.buf);
    free(t);
    return ret;
}
