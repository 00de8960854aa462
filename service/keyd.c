/*
 * The key process. Threads and locks (docs/DESIGN.md, "The key process"):
 *
 * - the main thread reads the control socket (new worker sockets, reload,
 *   reopen, stop) and the event descriptor the token callbacks write to
 *   (a state change to log and announce, a token that answers now);
 * - per worker socket, threads that all wait in recvmsg on it (the kernel
 *   wakes one per datagram) and each answer what they received: KEYS,
 *   STATE, AUDIT and FINISH (none of them waits for a token), and SIGN,
 *   DECRYPT and DERIVE, checked against the key, then run on the same
 *   thread, which waits in the token's own session queue
 *   (token_key_acquire, bounded by the token's wait_ms). A thread that
 *   takes an operation first makes sure another one is left to receive
 *   (made on demand, at most CONN_THREADS per connection; idle ones leave
 *   after IDLE_S): a slow token holds only threads of its own operations,
 *   and one received message costs one wake-up, not two (the hand-over to
 *   a pool thread was a third of the key process's time per signature).
 *   They also write the "worker_lost" records of their connection;
 * - per token, a count of the operations accepted (at most POOL_CAP at
 *   once; more are answered busy at once).
 *
 * Locks: kd_lock (the set in service, every set's and connection's
 *   reference count, the connection list), a pool's lock (its count), a
 *   connection's lock (its threads) and keyaudit lock (its requests
 *   waiting for their end), ring_lock (token events) and ended_lock
 *   (threads to join).
 *   No two are ever held at once, and none across a token call, a send,
 *   an audit write or a thread's creation. token/'s own locks are below
 *   all of them: the token callbacks take ring_lock only.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#include "common/deadline.h"
#include "proto/proto.h"
#include "service/audit.h"
#include "service/keyaudit.h"
#include "service/keyd.h"
#include "service/keydir.h"
#include "service/keyops.h"
#include "service/keyset.h"
#include "service/log.h"
#include "service/proc.h"

/* Operations accepted at once per token (each waits on its own thread in
 * the token's queue); more are answered busy at once. */
#define POOL_CAP 256
/* Threads per connection: operations waiting or running on any token,
 * and one receiving. */
#define CONN_THREADS 512
#define IDLE_S 30
#define THREAD_STACK (512 * 1024)
/* How often a receiving thread wakes with nothing received, to write the
 * "worker_lost" records that are due and to leave when idle. */
#define RECV_TICK_MS 500
/* How long a reply may wait for room in a worker's socket before the
 * worker, which does not read its replies, loses its connection. */
#define SEND_TIMEOUT_MS 2000
#define STOP_TIMEOUT_MS 30000
/* Refused messages logged per connection; the rest are counted. */
#define REFUSALS_LOGGED 16

typedef struct kd_set kd_set;
typedef struct kd_conn kd_conn;

typedef struct kd_job {
    struct kd_job *next;
    kd_conn *conn; /* a reference each */
    kd_set *set;
    token_key *key;
    EVP_PKEY *peer; /* DERIVE */
    const proto_claims *claims;
    char token[PROTO_TOKEN_MAX + 1];
    proto_request req;
    struct timespec start;
    size_t len;
    unsigned char msg[]; /* the request, which req points into */
} kd_job;

typedef struct kd_pool {
    pthread_mutex_t lock;
    unsigned accepted; /* waiting for a session or running */
    int retired;
} kd_pool;

/* A token set in service and the pools of its tokens, by token index. */
struct kd_set {
    token_set *tokens;
    unsigned refs; /* under kd_lock: current, jobs, connection threads */
    size_t npools;
    kd_pool *pools;
};

struct kd_conn {
    struct kd_conn *next;
    int fd;
    unsigned slot;
    unsigned refs;    /* under kd_lock: one per thread and per job */
    int closing;      /* atomic */
    int ended;        /* atomic: the socket's end was seen and dealt with */
    unsigned refused; /* atomic */
    keyaudit *audit;  /* its requests' ends */
    pthread_mutex_t lock;
    unsigned threads, idle; /* under lock; idle: receiving */
};

static pthread_mutex_t kd_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t kd_cond = PTHREAD_COND_INITIALIZER; /* sets, conns */
static kd_set *kd_current;
static unsigned kd_nsets;
static kd_conn *kd_conns;
static uint64_t kd_epoch; /* atomic */
static int kd_events = -1;
static int kd_want_reload;
static int kd_control = PROC_FD_CONTROL;

/* ---- small helpers ---- */

static double ms_since(const struct timespec *t0)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) * 1000.0 +
           (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

static void epoch_bump(void)
{
    uint64_t one = 1;
    ssize_t n;

    __atomic_add_fetch(&kd_epoch, 1, __ATOMIC_RELEASE);
    n = write(kd_events, &one, sizeof(one));
    (void)n; /* a full counter is still a wake-up */
}

/* ---- threads that ended ----
 *
 * Pool and reader threads end on their own; each puts itself on this list
 * before it drops its last reference, and is joined later (before the
 * next thread is made, and at stop), so that its thread-local state
 * (OpenSSL's per-thread DRBGs and error queue) is gone before the process
 * exits. */

static pthread_mutex_t ended_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t *ended;
static size_t nended, ended_cap;

static void thread_ending(void)
{
    pthread_t *grown;

    pthread_mutex_lock(&ended_lock);
    if (nended == ended_cap) {
        grown = realloc(ended, (ended_cap * 2 + 8) * sizeof(*ended));
        if (grown == NULL) {
            pthread_mutex_unlock(&ended_lock);
            pthread_detach(pthread_self());
            return;
        }
        ended = grown;
        ended_cap = ended_cap * 2 + 8;
    }
    ended[nended++] = pthread_self();
    pthread_mutex_unlock(&ended_lock);
}

static void threads_join(void)
{
    pthread_t *list;
    size_t n, i;

    pthread_mutex_lock(&ended_lock);
    list = ended;
    n = nended;
    ended = NULL;
    nended = ended_cap = 0;
    pthread_mutex_unlock(&ended_lock);
    for (i = 0; i < n; i++)
        pthread_join(list[i], NULL);
    free(list);
}

/* A thread of ours, joinable (threads_join). */
static int thread_start(void *(*fn)(void *), void *arg, size_t stack)
{
    pthread_attr_t attr;
    pthread_t tid;
    int r;

    threads_join();
    pthread_attr_init(&attr);
    if (stack > 0)
        pthread_attr_setstacksize(&attr, stack);
    r = pthread_create(&tid, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    return r;
}

/* ---- token events: from token/'s threads (no lock of token/ held) ---- */

#define RING 64

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ring_event {
    char token[PROTO_TOKEN_MAX + 1];
    char state[32];
    char reason[PROTO_REASON_MAX + 1];
    int has_reason;
} ring[RING];
static unsigned ring_head, ring_count, ring_dropped;

/* Copies the event for the main thread, which logs and announces it: the
 * calling thread is in the middle of a token operation or a recovery, and
 * a log write or a send could block it. */
static void on_token_event(const char *token, const char *state,
                           const char *reason)
{
    struct ring_event *e;

    pthread_mutex_lock(&ring_lock);
    if (ring_count == RING) {
        ring_dropped++;
    } else {
        e = &ring[(ring_head + ring_count++) % RING];
        snprintf(e->token, sizeof(e->token), "%s", token);
        snprintf(e->state, sizeof(e->state), "%s", state);
        e->has_reason = reason != NULL;
        snprintf(e->reason, sizeof(e->reason), "%s", reason ? reason : "");
    }
    pthread_mutex_unlock(&ring_lock);
    epoch_bump();
}

static void on_token_present(const char *token)
{
    __atomic_store_n(&kd_want_reload, 1, __ATOMIC_RELEASE);
    epoch_bump();
}

static void drain_events(void)
{
    struct ring_event e;
    unsigned dropped;

    for (;;) {
        pthread_mutex_lock(&ring_lock);
        if (ring_count == 0) {
            dropped = ring_dropped;
            ring_dropped = 0;
            pthread_mutex_unlock(&ring_lock);
            break;
        }
        e = ring[ring_head];
        ring_head = (ring_head + 1) % RING;
        ring_count--;
        pthread_mutex_unlock(&ring_lock);
        keyset_log_event(e.token, e.state, e.has_reason ? e.reason : NULL);
    }
    if (dropped > 0)
        log_warn("%u token state changes were not logged", dropped);
}

/* ---- sets and pools ---- */

static void set_free(kd_set *s)
{
    size_t i;

    for (i = 0; i < s->npools; i++)
        pthread_mutex_destroy(&s->pools[i].lock);
    free(s->pools);
    token_set_free(s->tokens);
    free(s);
    pthread_mutex_lock(&kd_lock);
    kd_nsets--;
    pthread_cond_broadcast(&kd_cond);
    pthread_mutex_unlock(&kd_lock);
}

static kd_set *set_new(token_set *tokens)
{
    kd_set *s = calloc(1, sizeof(*s));
    size_t i;

    if (s == NULL)
        return NULL;
    s->npools = token_set_count_tokens(tokens);
    s->pools = calloc(s->npools > 0 ? s->npools : 1, sizeof(*s->pools));
    if (s->pools == NULL) {
        free(s);
        return NULL;
    }
    for (i = 0; i < s->npools; i++)
        pthread_mutex_init(&s->pools[i].lock, NULL);
    s->tokens = tokens;
    s->refs = 1;
    pthread_mutex_lock(&kd_lock);
    kd_nsets++;
    pthread_mutex_unlock(&kd_lock);
    return s;
}

static kd_set *set_get(void)
{
    kd_set *s;

    pthread_mutex_lock(&kd_lock);
    s = kd_current;
    if (s != NULL)
        s->refs++;
    pthread_mutex_unlock(&kd_lock);
    return s;
}

static void set_put(kd_set *s)
{
    int last;

    pthread_mutex_lock(&kd_lock);
    last = --s->refs == 0;
    pthread_mutex_unlock(&kd_lock);
    if (last)
        set_free(s);
}

/* Out of service: its pools take no more operations, and the set goes
 * with its last reference. */
static void set_retire(kd_set *s)
{
    size_t i;

    for (i = 0; i < s->npools; i++) {
        pthread_mutex_lock(&s->pools[i].lock);
        s->pools[i].retired = 1;
        pthread_mutex_unlock(&s->pools[i].lock);
    }
    set_put(s);
}

/* Replaces the set in service; NULL leaves none. */
static void set_swap(kd_set *next)
{
    kd_set *old;

    pthread_mutex_lock(&kd_lock);
    old = kd_current;
    kd_current = next;
    pthread_mutex_unlock(&kd_lock);
    if (old != NULL)
        set_retire(old);
    epoch_bump();
}

static kd_pool *pool_of(kd_set *s, const token_key *key)
{
    size_t i;

    for (i = 0; i < s->npools; i++)
        if (strcmp(token_set_token_name(s->tokens, i),
                   token_key_token_name(key)) == 0)
            return &s->pools[i];
    return NULL;
}

/* One more operation on p's token; -1: it has all it takes. */
static int pool_enter(kd_pool *p)
{
    int r = -1;

    pthread_mutex_lock(&p->lock);
    if (p->accepted < POOL_CAP && !p->retired) {
        p->accepted++;
        r = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

static void pool_leave(kd_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->accepted--;
    pthread_mutex_unlock(&p->lock);
}

/* ---- connections ---- */

static void conn_put(kd_conn *c)
{
    kd_conn **pp;
    int last;

    pthread_mutex_lock(&kd_lock);
    last = --c->refs == 0;
    if (last) {
        for (pp = &kd_conns; *pp != c; pp = &(*pp)->next)
            ;
        *pp = c->next;
        pthread_cond_broadcast(&kd_cond);
    }
    pthread_mutex_unlock(&kd_lock);
    if (!last)
        return;
    close(c->fd);
    keyaudit_free(c->audit);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

static void conn_close(kd_conn *c)
{
    __atomic_store_n(&c->closing, 1, __ATOMIC_RELEASE);
    shutdown(c->fd, SHUT_RDWR);
}

/* One datagram, waiting a bounded time for room. */
static int conn_send(kd_conn *c, const unsigned char *buf, size_t len, int wait)
{
    struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
    struct timespec until;
    ssize_t n;

    if (__atomic_load_n(&c->closing, __ATOMIC_ACQUIRE))
        return -1;
    until = deadline_after(CLOCK_MONOTONIC, SEND_TIMEOUT_MS);
    for (;;) {
        n = send(c->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)len)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait &&
            deadline_ms_left(&until, CLOCK_MONOTONIC) > 0) {
            poll(&pfd, 1, (int)deadline_ms_left(&until, CLOCK_MONOTONIC));
            continue;
        }
        break;
    }
    if (wait) {
        log_warn("worker %u: cannot send a reply (%s): closing its "
                 "connection",
                 c->slot, n < 0 ? strerror(errno) : "short write");
        conn_close(c);
    }
    return -1;
}

/* A reply without a directory page. message must be set unless ok. */
static void reply(kd_conn *c, unsigned type, uint32_t id, proto_status st,
                  uint32_t retry, const char *message,
                  const unsigned char *data, size_t len)
{
    unsigned char buf[2 * PROTO_RSA_MAX];
    proto_reply rep;
    proto_error err;
    size_t n;

    memset(&rep, 0, sizeof(rep));
    rep.type = (uint16_t)type;
    rep.id = id;
    rep.status = (uint8_t)st;
    rep.retry_after = st == PROTO_BUSY || st == PROTO_UNAVAILABLE ? retry : 0;
    rep.epoch = __atomic_load_n(&kd_epoch, __ATOMIC_ACQUIRE);
    if (st != PROTO_OK)
        keydir_text(rep.message, PROTO_MESSAGE_MAX, message,
                    proto_status_name(st));
    rep.u.bytes.data = data;
    rep.u.bytes.len = len;
    if (proto_reply_encode(&rep, buf, sizeof(buf), &n, &err) != 0) {
        log_error("worker %u: cannot encode a reply: %s", c->slot, err.message);
        /* the worker waits for an answer: it gets one without the data */
        rep.status = PROTO_INTERNAL;
        rep.retry_after = 0;
        snprintf(rep.message, sizeof(rep.message),
                 "the reply could not be "
                 "encoded");
        rep.u.bytes.data = NULL;
        rep.u.bytes.len = 0;
        if (proto_reply_encode(&rep, buf, sizeof(buf), &n, &err) != 0) {
            OPENSSL_cleanse(buf, sizeof(buf));
            return;
        }
    }
    conn_send(c, buf, n, 1);
    OPENSSL_cleanse(buf, sizeof(buf));
}

/* ---- private-key operations (on the connection's threads) ---- */

static proto_status status_of(const token_error *terr, uint32_t *retry)
{
    switch (terr->status) {
    case TOKEN_ERR_BUSY:
        *retry = 1;
        return PROTO_BUSY;
    case TOKEN_ERR_UNAVAILABLE:
        *retry = 5;
        return PROTO_UNAVAILABLE;
    case TOKEN_ERR_NOT_FOUND:
        return PROTO_NOT_FOUND;
    default:
        return PROTO_INTERNAL;
    }
}

/* The error code of a key record. */
static const char *status_code(proto_status st, unsigned type)
{
    switch (st) {
    case PROTO_OK:
        return NULL;
    case PROTO_BUSY:
        return "token_busy";
    case PROTO_UNAVAILABLE:
        return "token_unavailable";
    case PROTO_FAILED:
        return type == PROTO_SIGN ? "signing_failed" : "decryption_failed";
    case PROTO_NOT_FOUND:
        return "unknown_key";
    default:
        return "internal_error";
    }
}

static int job_operate(kd_job *job, EVP_PKEY *pkey, unsigned char *out,
                       size_t *outlen)
{
    switch (job->req.type) {
    case PROTO_SIGN:
        return keyops_sign(pkey, &job->req.u.sign, out, outlen);
    case PROTO_DECRYPT:
        return keyops_decrypt(pkey, &job->req.u.decrypt, out, outlen);
    default:
        return keyops_derive(pkey, job->peer, out, outlen);
    }
}

/* The record of the operation, before its answer; -1 when it cannot be
 * written (the result is withheld). */
static int job_record(const kd_job *job, proto_status st)
{
    return keyaudit_key(job->claims,
                        job->req.type == PROTO_SIGN ? "sign" : "decrypt",
                        token_key_name(job->key), job->token,
                        status_code(st, job->req.type), ms_since(&job->start));
}

static void job_free(kd_job *job)
{
    EVP_PKEY_free(job->peer);
    OPENSSL_cleanse(job->msg, job->len);
    conn_put(job->conn);
    set_put(job->set);
    free(job);
}

/* Runs the operation, retried once when the token's sessions were found
 * dead and rebuilt (token_key_check_fault), records it, then answers. A
 * failed decryption is one answer whatever the padding said; whether the
 * token is to blame is found out with input of token/'s own. */
static void job_run(kd_job *job)
{
    unsigned type = job->req.type;
    token_use use = type == PROTO_SIGN ? TOKEN_USE_SIGN : TOKEN_USE_DECRYPT;
    unsigned char out[PROTO_RSA_MAX];
    char message[PROTO_MESSAGE_MAX + 1] = "";
    token_error terr = {0};
    proto_status st = PROTO_OK;
    uint32_t retry = 0;
    size_t outlen = 0;
    EVP_PKEY *pkey;
    int tries = 0, fault = 0, rc;
    const char *rid = job->claims->request_id;

    for (;;) {
        if (token_key_acquire(job->key, use, &pkey, &terr) != 0) {
            st = status_of(&terr, &retry);
            snprintf(message, sizeof(message), "%s", terr.message);
            goto done;
        }
        rc = job_operate(job, pkey, out, &outlen);
        token_key_release(job->key);
        if (rc == 0)
            goto done;
        fault = token_key_check_fault(job->key, &terr);
        if (fault > 0 && tries++ == 0)
            continue;
        break;
    }
    ERR_clear_error();
    OPENSSL_cleanse(out, sizeof(out));
    outlen = 0;
    if (fault != 0) {
        st = status_of(&terr, &retry);
        snprintf(message, sizeof(message), "%s", terr.message);
    } else {
        st = PROTO_FAILED;
        snprintf(message, sizeof(message), "%s",
                 type == PROTO_SIGN ? "the token refused the signature"
                                    : "decryption failed");
    }
done:
    /* the protocol carries no empty result: an RSA plaintext of nothing
     * (bad padding can decrypt to that) is one more failed decryption */
    if (st == PROTO_OK && outlen == 0) {
        st = PROTO_FAILED;
        snprintf(message, sizeof(message), "%s",
                 type == PROTO_SIGN ? "the token refused the signature"
                                    : "decryption failed");
    }
    if (job_record(job, st) != 0) {
        log_error("cannot write the audit record of request %s: the "
                  "result of key %s is withheld",
                  rid, token_key_name(job->key));
        OPENSSL_cleanse(out, sizeof(out));
        outlen = 0;
        st = PROTO_AUDIT_FAILED;
        snprintf(message, sizeof(message), "cannot write the audit record");
    }
    keyaudit_end(job->conn->audit, rid);
    reply(job->conn, PROTO_REPLY | type, job->req.id, st, retry, message, out,
          st == PROTO_OK ? outlen : 0);
    OPENSSL_cleanse(out, sizeof(out));
}

/* ---- requests (on the connection's threads) ---- */

static void refuse(kd_conn *c, const unsigned char *buf, size_t len,
                   const char *why)
{
    uint16_t type = 0;
    uint32_t id = 0;

    if (__atomic_add_fetch(&c->refused, 1, __ATOMIC_RELAXED) <= REFUSALS_LOGGED)
        log_warn("worker %u: refused a message: %s", c->slot, why);
    if (proto_peek(buf, len, &type, &id) != 0 || id == 0)
        return;
    if (type >= PROTO_KEYS && type <= PROTO_FINISH)
        reply(c, PROTO_REPLY | type, id, PROTO_BAD_REQUEST, 0, why, NULL, 0);
    else
        reply(c, PROTO_ERROR, id, PROTO_BAD_REQUEST, 0, why, NULL, 0);
}

/* The checks of an operation against its key that need no token; then
 * the operation runs on this thread, when another one is left receiving
 * (may_wait), else it is answered busy. */
static void submit(kd_conn *c, const unsigned char *buf, size_t len,
                   int may_wait)
{
    char why[PROTO_MESSAGE_MAX + 1] = "";
    proto_status st = PROTO_INTERNAL;
    const char *name, *reason = NULL;
    proto_error perr;
    kd_job *job;
    kd_pool *pool;
    EVP_PKEY *pub;
    token_use use;
    unsigned type;

    job = calloc(1, sizeof(*job) + len);
    if (job == NULL) {
        refuse(c, buf, len, "out of memory");
        return;
    }
    memcpy(job->msg, buf, len);
    job->len = len;
    clock_gettime(CLOCK_MONOTONIC, &job->start);
    /* decoded once more where it stays: the byte strings point into it */
    proto_request_decode(job->msg, len, &job->req, &perr);
    type = job->req.type;
    name = type == PROTO_SIGN      ? job->req.u.sign.key
           : type == PROTO_DECRYPT ? job->req.u.decrypt.key
                                   : job->req.u.derive.key;
    job->claims = type == PROTO_SIGN      ? &job->req.u.sign.claims
                  : type == PROTO_DECRYPT ? &job->req.u.decrypt.claims
                                          : &job->req.u.derive.claims;
    use = type == PROTO_SIGN ? TOKEN_USE_SIGN : TOKEN_USE_DECRYPT;
    job->set = set_get();
    if (job->set == NULL) {
        st = PROTO_UNAVAILABLE;
        snprintf(why, sizeof(why), "no token set is in service");
        goto answer;
    }
    job->key = token_set_find_key(job->set->tokens, name);
    if (job->key == NULL) {
        st = PROTO_NOT_FOUND;
        snprintf(why, sizeof(why), "no key named \"%s\"", name);
        goto answer;
    }
    if (!token_key_supports(job->key, use)) {
        token_key_usable(job->key, use, &reason);
        st = PROTO_UNSUPPORTED;
        snprintf(why, sizeof(why), "key \"%s\": %s", name,
                 reason != NULL ? reason : "not supported by its token");
        goto answer;
    }
    pub = token_key_cert0(job->key) != NULL
              ? X509_get0_pubkey(token_key_cert0(job->key))
              : NULL;
    if (pub == NULL) {
        st = PROTO_UNAVAILABLE;
        snprintf(why, sizeof(why), "key \"%s\" has no certificate", name);
        goto answer;
    }
    if (type == PROTO_SIGN)
        st = keyops_check_sign(pub, &job->req.u.sign, why, sizeof(why));
    else if (type == PROTO_DECRYPT)
        st = keyops_check_decrypt(pub, &job->req.u.decrypt, why, sizeof(why));
    else
        job->peer = keyops_peer(pub, &job->req.u.derive, &st, why, sizeof(why));
    if (st != PROTO_OK)
        goto answer;
    pool = pool_of(job->set, job->key);
    if (pool == NULL) {
        st = PROTO_INTERNAL;
        snprintf(why, sizeof(why), "key \"%s\" has no token", name);
        goto answer;
    }
    keydir_text(job->token, PROTO_TOKEN_MAX, token_key_token_name(job->key),
                "?");
    if (keyaudit_begin(c->audit, job->claims,
                       type == PROTO_SIGN ? "sign" : "decrypt",
                       token_key_name(job->key), job->token) != 0) {
        st = PROTO_BUSY;
        snprintf(why, sizeof(why), "%d requests are open on this connection",
                 KEYAUDIT_PENDING_MAX);
        goto answer;
    }
    pthread_mutex_lock(&kd_lock);
    c->refs++;
    pthread_mutex_unlock(&kd_lock);
    job->conn = c;
    if (may_wait && pool_enter(pool) == 0) {
        job_run(job);
        /* before the job's reference to the set, which holds the pool */
        pool_leave(pool);
        job_free(job);
        return;
    }
    /* the token has all the operations it takes (or the connection all
     * its threads): busy, and recorded as a refusal of the token like a
     * wait that ran out */
    st = PROTO_BUSY;
    if (may_wait)
        snprintf(why, sizeof(why),
                 "token %s: %d operations are waiting already",
                 token_key_token_name(job->key), POOL_CAP);
    else
        snprintf(why, sizeof(why),
                 "%d operations are waiting on this connection already",
                 CONN_THREADS - 1);
    if (job_record(job, st) != 0) {
        st = PROTO_AUDIT_FAILED;
        snprintf(why, sizeof(why), "cannot write the audit record");
    }
    keyaudit_end(c->audit, job->claims->request_id);
    reply(c, PROTO_REPLY | type, job->req.id, st, 1, why, NULL, 0);
    job_free(job);
    return;
answer:
    reply(c, PROTO_REPLY | type, job->req.id, st,
          st == PROTO_UNAVAILABLE ? 5 : 0, why, NULL, 0);
    EVP_PKEY_free(job->peer);
    if (job->set != NULL)
        set_put(job->set);
    OPENSSL_cleanse(job->msg, len);
    free(job);
}

static void send_page(kd_conn *c, const proto_reply *rep)
{
    unsigned char *buf = malloc(PROTO_MSG_MAX);
    proto_error err;
    size_t n;

    if (buf == NULL) {
        reply(c, rep->type, rep->id, PROTO_INTERNAL, 0, "out of memory", NULL,
              0);
    } else if (proto_reply_encode(rep, buf, PROTO_MSG_MAX, &n, &err) != 0) {
        log_error("worker %u: cannot encode a page: %s", c->slot, err.message);
        reply(c, rep->type, rep->id, PROTO_INTERNAL, 0, err.message, NULL, 0);
    } else {
        conn_send(c, buf, n, 1);
    }
    free(buf);
}

/* KEYS and STATE: a page of the set in service. The epoch is read before
 * the page: a change while it is built makes the worker read again. */
static void reply_page(kd_conn *c, unsigned type, uint32_t id, uint32_t start)
{
    keydir_page page;
    proto_reply rep;
    proto_status st;
    const char *why = NULL;
    kd_set *s = set_get();
    token_set *tokens = s != NULL ? s->tokens : NULL;

    memset(&rep, 0, sizeof(rep));
    rep.type = (uint16_t)(PROTO_REPLY | type);
    rep.id = id;
    rep.epoch = __atomic_load_n(&kd_epoch, __ATOMIC_ACQUIRE);
    st = type == PROTO_KEYS ? keydir_keys(tokens, start, &page, &rep, &why)
                            : keydir_state(tokens, start, &page, &rep, &why);
    if (st == PROTO_OK)
        send_page(c, &rep);
    else
        reply(c, rep.type, id, st, 0, why, NULL, 0);
    keydir_page_clear(&page);
    if (s != NULL)
        set_put(s);
}

static void do_audit(kd_conn *c, const proto_request *req)
{
    if (keyaudit_refusal(&req->u.audit) == 0) {
        reply(c, PROTO_REPLY | PROTO_AUDIT, req->id, PROTO_OK, 0, NULL, NULL,
              0);
        return;
    }
    log_error("cannot write the audit record of request %s",
              req->u.audit.claims.request_id);
    reply(c, PROTO_REPLY | PROTO_AUDIT, req->id, PROTO_AUDIT_FAILED, 0,
          "cannot write the audit record", NULL, 0);
}

/* FINISH has no reply: the worker has sent its answer and does not wait
 * (a FINISH for no open request is dropped). */
static void do_finish(kd_conn *c, const proto_request *req)
{
    if (keyaudit_finish(c->audit, &req->u.finish) < 0)
        log_error("cannot write the audit record of request %s",
                  req->u.finish.request_id);
}

static void handle(kd_conn *c, const unsigned char *buf, size_t len,
                   int may_wait)
{
    proto_request req;
    proto_error err;

    if (proto_request_decode(buf, len, &req, &err) != 0) {
        refuse(c, buf, len, err.message);
        return;
    }
    switch (req.type) {
    case PROTO_KEYS:
    case PROTO_STATE:
        reply_page(c, req.type, req.id, req.u.page.start);
        break;
    case PROTO_AUDIT:
        do_audit(c, &req);
        break;
    case PROTO_FINISH:
        do_finish(c, &req);
        break;
    default:
        submit(c, buf, len, may_wait);
    }
}

static void *conn_main(void *arg);

/* One more receiving thread, already counted in c->threads and c->idle
 * (uncounted again when it cannot be made). */
static int conn_spawn(kd_conn *c)
{
    int r;

    pthread_mutex_lock(&kd_lock);
    c->refs++;
    pthread_mutex_unlock(&kd_lock);
    r = thread_start(conn_main, c, THREAD_STACK);
    if (r == 0)
        return 0;
    log_error("worker %u: cannot start a thread: %s", c->slot, strerror(r));
    pthread_mutex_lock(&c->lock);
    c->threads--;
    c->idle--;
    pthread_mutex_unlock(&c->lock);
    conn_put(c);
    return -1;
}

/* The calling thread received a message: 1 when another thread is left
 * receiving, so that this one may wait for a token. */
static int conn_take(kd_conn *c)
{
    int spawn, others;

    pthread_mutex_lock(&c->lock);
    c->idle--;
    spawn = c->idle == 0 && c->threads < CONN_THREADS;
    if (spawn) {
        c->threads++;
        c->idle++;
    }
    others = c->idle > 0;
    pthread_mutex_unlock(&c->lock);
    if (!spawn)
        return others;
    conn_spawn(c);
    pthread_mutex_lock(&c->lock);
    others = c->idle > 0;
    pthread_mutex_unlock(&c->lock);
    return others;
}

static void conn_untake(kd_conn *c)
{
    pthread_mutex_lock(&c->lock);
    c->idle++;
    pthread_mutex_unlock(&c->lock);
}

/* A thread idle for IDLE_S leaves unless it is the last receiving. */
static int conn_leave_idle(kd_conn *c)
{
    int leave;

    pthread_mutex_lock(&c->lock);
    leave = c->idle > 1;
    if (leave) {
        c->idle--;
        c->threads--;
    }
    pthread_mutex_unlock(&c->lock);
    return leave;
}

/* The socket ended (the worker went, or stop): the first thread to see it
 * records the open requests as lost; running ones are written when they
 * end. */
static void conn_ended(kd_conn *c)
{
    unsigned refused;

    pthread_mutex_lock(&c->lock);
    c->idle--;
    c->threads--;
    pthread_mutex_unlock(&c->lock);
    if (__atomic_exchange_n(&c->ended, 1, __ATOMIC_ACQ_REL))
        return;
    conn_close(c);
    keyaudit_expire(c->audit, 1);
    refused = __atomic_load_n(&c->refused, __ATOMIC_RELAXED);
    if (refused > REFUSALS_LOGGED)
        log_warn("worker %u: %u messages refused in all", c->slot, refused);
    log_info("worker %u: key-protocol connection closed", c->slot);
}

static void *conn_main(void *arg)
{
    kd_conn *c = arg;
    unsigned char *buf = malloc(PROTO_MSG_MAX + 1);
    struct timespec idle_since;
    struct iovec iov;
    struct msghdr mh;
    int may_wait;
    ssize_t n;

    clock_gettime(CLOCK_MONOTONIC, &idle_since);
    while (buf != NULL) {
        iov.iov_base = buf;
        iov.iov_len = PROTO_MSG_MAX + 1;
        memset(&mh, 0, sizeof(mh));
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        /* blocking, so that the kernel wakes one thread per datagram; no
         * room for ancillary data: descriptors a worker sends are closed
         * by the kernel (MSG_CTRUNC) */
        n = recvmsg(c->fd, &mh, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            keyaudit_expire(c->audit, 0);
            if (ms_since(&idle_since) >= IDLE_S * 1000.0 &&
                conn_leave_idle(c)) {
                free(buf);
                thread_ending();
                conn_put(c);
                return NULL;
            }
            continue;
        }
        if (n <= 0)
            break;
        if ((mh.msg_flags & MSG_TRUNC) || n > PROTO_MSG_MAX)
            refuse(c, buf, (size_t)n, "the message is longer than 64 KiB");
        else if (mh.msg_flags & MSG_CTRUNC)
            refuse(c, buf, (size_t)n, "the message carried descriptors");
        else {
            may_wait = conn_take(c);
            handle(c, buf, (size_t)n, may_wait);
            conn_untake(c);
        }
        keyaudit_expire(c->audit, 0);
        clock_gettime(CLOCK_MONOTONIC, &idle_since);
    }
    conn_ended(c);
    free(buf);
    thread_ending();
    conn_put(c);
    return NULL;
}

static void conn_start(int fd, unsigned slot)
{
    struct timeval tick = {0, RECV_TICK_MS * 1000};
    kd_conn *c = calloc(1, sizeof(*c));
    int flags;

    if (c == NULL) {
        log_error("out of memory for worker %u's connection", slot);
        close(fd);
        return;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof(tick)) != 0) {
        log_error("worker %u's socket: %s", slot, strerror(errno));
        close(fd);
        free(c);
        return;
    }
    c->fd = fd;
    c->slot = slot;
    c->refs = 1;
    pthread_mutex_init(&c->lock, NULL);
    c->audit = keyaudit_new(slot);
    if (c->audit == NULL) {
        log_error("out of memory for worker %u's connection", slot);
        close(fd);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return;
    }
    pthread_mutex_lock(&kd_lock);
    c->next = kd_conns;
    kd_conns = c;
    pthread_mutex_unlock(&kd_lock);
    c->threads = c->idle = 1;
    if (conn_spawn(c) != 0)
        conn_close(c);
    /* its threads hold it now */
    conn_put(c);
}

/* A notice of the new epoch to every worker; one whose socket is full
 * learns it from its next reply. */
static void announce(void)
{
    unsigned char buf[64];
    proto_reply rep;
    proto_error err;
    kd_conn **all = NULL, *c;
    size_t n = 0, i, len;

    memset(&rep, 0, sizeof(rep));
    rep.type = PROTO_NOTICE;
    rep.epoch = __atomic_load_n(&kd_epoch, __ATOMIC_ACQUIRE);
    if (proto_reply_encode(&rep, buf, sizeof(buf), &len, &err) != 0)
        return;
    pthread_mutex_lock(&kd_lock);
    for (c = kd_conns; c != NULL; c = c->next)
        n++;
    all = n > 0 ? calloc(n, sizeof(*all)) : NULL;
    for (c = kd_conns, i = 0; all != NULL && c != NULL; c = c->next) {
        c->refs++;
        all[i++] = c;
    }
    pthread_mutex_unlock(&kd_lock);
    for (i = 0; all != NULL && i < n; i++) {
        conn_send(all[i], buf, len, 0);
        conn_put(all[i]);
    }
    free(all);
}

/* ---- the main thread: configuration, control, shutdown ---- */

typedef struct kd_state {
    const char *config_path;
    config *cfg;
} kd_state;

static int audit_changes(const config *now, const config *next)
{
    return (now->audit_log == NULL) != (next->audit_log == NULL) ||
           (now->audit_log != NULL &&
            strcmp(now->audit_log, next->audit_log) != 0);
}

/* SIGHUP, through the supervisor: the new configuration's tokens are
 * opened before they replace the running ones, and a set that would lose
 * a working token is refused (keyset_loses_token); logins stay, since
 * both sets share each module. 1 when the new one serves. */
static int reload(kd_state *st)
{
    config_problems problems = {0};
    config *cfg;
    token_set *tokens = NULL;
    kd_set *current, *next = NULL;
    int new_audit = 0, lost;
    size_t i;

    cfg = config_load(st->config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    config_problems_clear(&problems);
    if (cfg == NULL)
        goto fail;
    new_audit = audit_changes(st->cfg, cfg);
    if (new_audit && audit_stage(cfg->audit_log) != 0) {
        log_error("cannot open the audit log %s: %s", cfg->audit_log,
                  strerror(errno));
        goto fail;
    }
    tokens = keyset_open(cfg);
    if (tokens == NULL)
        goto fail;
    current = set_get();
    lost = current != NULL && keyset_loses_token(current->tokens, tokens);
    if (current != NULL)
        set_put(current);
    if (lost || (next = set_new(tokens)) == NULL)
        goto fail;
    if (new_audit)
        audit_swap();
    audit_discard();
    set_swap(next);
    config_free(st->cfg);
    st->cfg = cfg;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        log_error("cannot open log file %s", cfg->log_file);
    log_info("the key process serves the tokens of %s", st->config_path);
    return 1;
fail:
    audit_discard();
    log_error("keeping the running configuration");
    if (next == NULL)
        token_set_free(tokens);
    config_free(cfg);
    return 0;
}

/* A PROC_CTL_PIN: "NAME\0PIN\0", kept as if NAME were in the
 * environment. */
static void take_pin(proc_ctl *m)
{
    token_error err = {0};
    size_t name_len = strnlen((const char *)m->data, m->len);

    if (name_len > 0 && name_len + 1 < m->len && m->data[m->len - 1] == '\0' &&
        token_pin_put_env((const char *)m->data,
                          (const char *)m->data + name_len + 1, &err) != 0)
        log_error("%s", err.message);
    OPENSSL_cleanse(m, sizeof(*m));
}

/* The PINs of pin_env tokens, then PROC_CTL_OPEN; -1 when the supervisor
 * went first. */
static int receive_pins(void)
{
    proc_ctl m;
    int fd, r;

    for (;;) {
        r = proc_ctl_recv(kd_control, &m, &fd);
        if (fd >= 0)
            close(fd);
        if (r < 0 && errno == EPROTO)
            continue;
        if (r <= 0)
            return -1;
        if (m.type == PROC_CTL_OPEN)
            return 0;
        if (m.type == PROC_CTL_PIN)
            take_pin(&m);
    }
}

/* Ends every connection, then the operations, the recovery loop and the
 * set, each within STOP_TIMEOUT_MS. */
static void stop(void)
{
    struct timespec until;
    kd_conn *c;
    int rc = 0;

    pthread_mutex_lock(&kd_lock);
    for (c = kd_conns; c != NULL; c = c->next)
        conn_close(c);
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += STOP_TIMEOUT_MS / 1000;
    while (kd_conns != NULL && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&kd_cond, &kd_lock, &until);
    pthread_mutex_unlock(&kd_lock);
    if (rc == ETIMEDOUT) {
        log_error("operations still running after %d ms", STOP_TIMEOUT_MS);
        return;
    }
    token_recovery_stop();
    set_swap(NULL);
    pthread_mutex_lock(&kd_lock);
    while (kd_nsets > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&kd_cond, &kd_lock, &until);
    pthread_mutex_unlock(&kd_lock);
    if (rc == ETIMEDOUT)
        log_error("a token set still in use after %d ms", STOP_TIMEOUT_MS);
    else
        threads_join();
}

/* Serves the control socket and the token events until stop. */
static void serve(kd_state *st)
{
    struct pollfd pfd[2] = {{.fd = kd_control, .events = POLLIN},
                            {.fd = kd_events, .events = POLLIN}};
    uint64_t count;
    proc_ctl m;
    int fd, r;

    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            log_error("poll: %s", strerror(errno));
            return;
        }
        if (pfd[1].revents & POLLIN) {
            if (read(kd_events, &count, sizeof(count)) < 0 && errno != EAGAIN)
                log_error("reading token events: %s", strerror(errno));
            drain_events();
            if (__atomic_exchange_n(&kd_want_reload, 0, __ATOMIC_ACQ_REL)) {
                log_info("a token absent at the last load answers now: "
                         "asking for a reload to open it");
                proc_ctl_send(kd_control, PROC_CTL_WANT_RELOAD, 0, NULL, 0, -1);
            }
            announce();
        }
        if (!(pfd[0].revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        r = proc_ctl_recv(kd_control, &m, &fd);
        if (r == 0)
            return; /* the supervisor went */
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EPROTO)
                continue;
            log_error("control socket: %s", strerror(errno));
            return;
        }
        switch (m.type) {
        case PROC_CTL_PIN: /* for a reload's new pin_env variables */
            take_pin(&m);
            break;
        case PROC_CTL_KEY_SOCKET:
            if (fd >= 0) {
                conn_start(fd, m.arg);
                fd = -1;
            }
            break;
        case PROC_CTL_RELOAD:
            proc_ctl_send(kd_control, PROC_CTL_RELOAD, (uint32_t)reload(st),
                          NULL, 0, -1);
            break;
        case PROC_CTL_REOPEN:
            if (log_reopen() != 0)
                log_error("cannot reopen the log file");
            if (audit_reopen() != 0)
                log_error("cannot reopen the audit log: %s; still writing "
                          "the old file",
                          strerror(errno));
            break;
        case PROC_CTL_STOP:
            if (fd >= 0)
                close(fd);
            return;
        default:
            break;
        }
        if (fd >= 0)
            close(fd);
    }
}

int keyd_main(const char *config_path)
{
    config_problems problems = {0};
    kd_state st = {config_path, NULL};
    token_error terr = {0};
    struct timespec now;
    token_set *tokens;
    kd_set *set;
    size_t i;
    int ret = 1;

    prctl(PR_SET_NAME, PROC_NAME_KEY, 0, 0, 0);
    signal(SIGPIPE, SIG_IGN);
    /* a replaced key process never repeats its predecessor's epochs */
    clock_gettime(CLOCK_REALTIME, &now);
    kd_epoch = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    /* before the configuration, whose pin_env variables must be there */
    if (receive_pins() != 0)
        return 1;
    st.cfg = config_load(config_path, &problems);
    for (i = 0; i < problems.count; i++)
        log_error("%s", problems.lines[i]);
    config_problems_clear(&problems);
    if (st.cfg == NULL)
        return 1;
    if (log_open(st.cfg->log_file, st.cfg->log_level) != 0)
        log_error("cannot open log file %s; logging to stderr",
                  st.cfg->log_file);
    if (audit_open(st.cfg->audit_log) != 0) {
        log_error("cannot open the audit log %s: %s", st.cfg->audit_log,
                  strerror(errno));
        goto out;
    }
    kd_events = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (kd_events < 0) {
        log_error("eventfd: %s", strerror(errno));
        goto out;
    }
    tokens = keyset_open(st.cfg);
    if (tokens == NULL)
        goto out;
    set = set_new(tokens);
    if (set == NULL) {
        token_set_free(tokens);
        log_error("out of memory");
        goto out;
    }
    set_swap(set);
    if (token_recovery_start(on_token_event, on_token_present, &terr) != 0) {
        log_error("%s", terr.message);
        set_swap(NULL);
        goto out;
    }
    proc_ctl_send(kd_control, PROC_CTL_READY, 0, NULL, 0, -1);
    log_info("key process %d serving", (int)getpid());
    serve(&st);
    stop();
    ret = 0;
out:
    if (kd_events >= 0)
        close(kd_events);
    audit_close();
    config_free(st.cfg);
    log_info("key process stopped");
    return ret;
}
