/*
 * The worker's end of the key protocol. Locks, in the order they may be
 * taken: dir_lock (one directory fetch at a time) → send_lock (a
 * read-write lock: senders share it, a new socket takes it alone) → lock
 * (waiters, the socket, its generation, the epoch seen, the directory).
 * No lock is held across a wait for a reply; the caller reading the
 * socket takes only lock.
 *
 * No thread of its own reads the socket: a caller waiting for its reply
 * reads it when no other caller does (reading), hands every other reply
 * to its waiter and, once its own has come, wakes a waiter left to read
 * on. A call alone on the connection thus costs one wake-up for its reply,
 * not two (a reader thread's, then the caller's). Notices that came while
 * nobody called are read before the directory is looked at.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/obj_mac.h>

#include "common/deadline.h"
#include "rkey/client.h"
#include "rkey/rkey.h"

/* How often the caller reading looks at the waiters' deadlines, at
 * most. */
#define READER_TICK_MS 250
/* Keys one directory may hold. */
#define DIR_KEYS_MAX 100000
#define DIR_ATTEMPTS 3
#define REQUEST_MAX 4096

typedef struct waiter {
    struct waiter *next;
    uint32_t id;
    unsigned gen;
    struct timespec deadline;
    pthread_cond_t cond;
    int finished;
    unsigned char *reply; /* the datagram, the waiter's own */
    size_t reply_len;
    rkey_failure fail;
} waiter;

struct rkey_key {
    char name[PROTO_NAME_MAX + 1];
    char token[PROTO_TOKEN_MAX + 1];
    char algorithm[PROTO_ALGORITHM_MAX + 1];
    uint8_t flags;
    char reason_sign[PROTO_REASON_MAX + 1];
    char reason_decrypt[PROTO_REASON_MAX + 1];
    X509 *cert;
    STACK_OF(X509) *chain;
    EVP_PKEY *pkey; /* private operations go to the key process */
};

struct rkey_dir {
    unsigned refs; /* atomic */
    uint64_t epoch;
    struct timespec fetched;
    size_t nkeys;
    rkey_key *keys;
    size_t *by_name; /* indices into keys, sorted by name */
    size_t ntokens;
    proto_token_entry *tokens;
};

struct rkey_client {
    pthread_mutex_t lock;
    pthread_rwlock_t send_lock;
    pthread_mutex_t dir_lock;
    int fd;
    unsigned gen;
    int dead;
    int reading;              /* a caller reads the socket */
    pthread_cond_t read_cond; /* reading ended */
    unsigned char *rbuf;      /* the reading caller's */
    unsigned timed_gen;       /* the generation whose socket has
                                 READER_TICK_MS as its receive timeout */
    uint32_t next_id;
    waiter *waiters;
    unsigned timeout_ms;
    uint64_t epoch_seen;
    rkey_dir *dir;
    int dir_stale;
};

static __thread proto_claims tl_claims;
static __thread int tl_has_claims;
/* key operations sent with tl_claims since they were set */
static __thread unsigned tl_ops;

static void fail(rkey_failure *f, proto_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(rkey_failure *f, proto_status st, const char *fmt, ...)
{
    va_list ap;

    f->status = st;
    f->retry_after = st == PROTO_UNAVAILABLE ? 5 : 0;
    va_start(ap, fmt);
    vsnprintf(f->message, sizeof(f->message), fmt, ap);
    va_end(ap);
}

void rkey_claims_set(const proto_claims *claims)
{
    tl_has_claims = claims != NULL;
    tl_ops = 0;
    if (claims != NULL)
        tl_claims = *claims;
}

unsigned rkey_claims_ops(void)
{
    return tl_ops;
}

unsigned rkey_md_from_nid(int nid)
{
    switch (nid) {
    case NID_undef:
        return PROTO_MD_NONE;
    case NID_sha1:
        return PROTO_MD_SHA1;
    case NID_sha224:
        return PROTO_MD_SHA224;
    case NID_sha256:
        return PROTO_MD_SHA256;
    case NID_sha384:
        return PROTO_MD_SHA384;
    case NID_sha512:
        return PROTO_MD_SHA512;
    default:
        return PROTO_MD_COUNT;
    }
}

/* ---- waiters (under c->lock) ---- */

static void waiter_finish(waiter *w, proto_status st, const char *message)
{
    w->finished = 1;
    fail(&w->fail, st, "%s", message);
    pthread_cond_signal(&w->cond);
}

static waiter *waiter_take(rkey_client *c, uint32_t id, unsigned gen)
{
    waiter **pp, *w;

    for (pp = &c->waiters; (w = *pp) != NULL; pp = &w->next) {
        if (w->id == id && w->gen == gen) {
            *pp = w->next;
            return w;
        }
    }
    return NULL;
}

/* Ends the waiters of generation gen (every one when all) whose deadline
 * passed; *next_ms: until the soonest left. */
static void waiters_expire(rkey_client *c, unsigned gen, int all,
                           proto_status st, const char *message, long *next_ms)
{
    waiter **pp, *w;
    long left;

    for (pp = &c->waiters; (w = *pp) != NULL;) {
        if (w->gen != gen) {
            pp = &w->next;
            continue;
        }
        left = deadline_ms_left(&w->deadline, CLOCK_MONOTONIC);
        if (all || left == 0) {
            *pp = w->next;
            waiter_finish(w, st, message);
            continue;
        }
        if (next_ms != NULL && left < *next_ms)
            *next_ms = left;
        pp = &w->next;
    }
}

/* ---- the reader ---- */

/* Hands a datagram to its waiter: 1 when that was me. */
static int deliver(rkey_client *c, unsigned gen, const unsigned char *buf,
                   size_t len, const waiter *me)
{
    proto_reply rep;
    proto_error err;
    uint16_t type;
    uint32_t id;
    waiter *w;
    int ok = proto_reply_decode(buf, len, &rep, &err) == 0;

    if (ok)
        proto_reply_clear(&rep);
    else if (proto_peek(buf, len, &type, &id) != 0)
        return 0;
    pthread_mutex_lock(&c->lock);
    if (ok && gen == c->gen)
        c->epoch_seen = rep.epoch;
    w = ok && rep.type == PROTO_NOTICE ? NULL
                                       : waiter_take(c, ok ? rep.id : id, gen);
    if (w != NULL && !ok) {
        waiter_finish(w, PROTO_INTERNAL,
                      "a malformed reply from the key "
                      "process");
    } else if (w != NULL) {
        w->reply = malloc(len);
        if (w->reply == NULL) {
            waiter_finish(w, PROTO_INTERNAL, "out of memory");
        } else {
            memcpy(w->reply, buf, len);
            w->reply_len = len;
            w->finished = 1;
            if (w != me)
                pthread_cond_signal(&w->cond);
        }
    }
    pthread_mutex_unlock(&c->lock);
    return w != NULL && w == me;
}

/* Reads the datagrams there are, waiting up to wait_ms for the first,
 * until me (NULL: none) has its reply; 1 when the socket ended. By the
 * caller reading, without c->lock. */
static int receive(rkey_client *c, int fd, unsigned gen, int wait_ms, int timed,
                   const waiter *me)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int flags = MSG_DONTWAIT;
    ssize_t n;

    /* a socket with its receive timeout (READER_TICK_MS) is waited on in
     * recv itself: one system call per reply, not a poll and a recv */
    if (wait_ms > 0 && timed)
        flags = 0;
    else if (wait_ms > 0 && poll(&pfd, 1, wait_ms) == 0)
        return 0;
    for (;; flags = MSG_DONTWAIT) {
        n = recv(fd, c->rbuf, PROTO_MSG_MAX + 1, flags);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : 1;
        if (n == 0)
            return 1;
        if (n <= PROTO_MSG_MAX && deliver(c, gen, c->rbuf, (size_t)n, me))
            return 0;
    }
}

/* Under c->lock: the caller reading is done with generation gen; a waiter
 * left reads on. */
static void reading_end(rkey_client *c, unsigned gen, int ended)
{
    waiter *w;

    if (ended) {
        if (c->gen == gen)
            c->dead = 1;
        waiters_expire(c, gen, 1, PROTO_UNAVAILABLE,
                       "the connection to the key process closed", NULL);
    }
    c->reading = 0;
    pthread_cond_broadcast(&c->read_cond);
    for (w = c->waiters; w != NULL && w->gen != c->gen; w = w->next)
        ;
    if (w != NULL)
        pthread_cond_signal(&w->cond);
}

/* Under c->lock, which it lets go while it waits: reads the socket until
 * w has its reply or its deadline passed. */
static void read_for(rkey_client *c, waiter *w)
{
    unsigned gen = c->gen;
    int fd = c->fd, ended = 0, timed = c->timed_gen == gen;
    char why[64];
    long next_ms;

    c->reading = 1;
    snprintf(why, sizeof(why), "no answer from the key process in %u ms",
             c->timeout_ms);
    for (;;) {
        next_ms = READER_TICK_MS;
        waiters_expire(c, gen, 0, PROTO_UNAVAILABLE, why, &next_ms);
        if (w->finished || ended)
            break;
        pthread_mutex_unlock(&c->lock);
        ended = receive(c, fd, gen, (int)next_ms + 1, timed, w);
        pthread_mutex_lock(&c->lock);
    }
    reading_end(c, gen, ended);
}

/* The notices that came while nobody called (the epoch they carry). */
static void drain(rkey_client *c)
{
    unsigned gen;
    int fd, ended;

    pthread_mutex_lock(&c->lock);
    /* a caller waiting reads them soon enough */
    if (c->reading || c->dead || c->waiters != NULL) {
        pthread_mutex_unlock(&c->lock);
        return;
    }
    c->reading = 1;
    fd = c->fd;
    gen = c->gen;
    pthread_mutex_unlock(&c->lock);
    ended = receive(c, fd, gen, 0, 0, NULL);
    pthread_mutex_lock(&c->lock);
    reading_end(c, gen, ended);
    pthread_mutex_unlock(&c->lock);
}

/* ---- the client ---- */

rkey_client *rkey_client_new(int fd, unsigned timeout_ms)
{
    rkey_client *c = calloc(1, sizeof(*c));

    if (c == NULL) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_rwlock_init(&c->send_lock, NULL);
    pthread_mutex_init(&c->dir_lock, NULL);
    pthread_cond_init(&c->read_cond, NULL);
    c->rbuf = malloc(PROTO_MSG_MAX + 1);
    if (c->rbuf == NULL) {
        if (fd >= 0)
            close(fd);
        pthread_mutex_destroy(&c->lock);
        pthread_rwlock_destroy(&c->send_lock);
        pthread_mutex_destroy(&c->dir_lock);
        pthread_cond_destroy(&c->read_cond);
        free(c);
        return NULL;
    }
    c->fd = -1;
    c->dead = 1;
    c->timeout_ms = timeout_ms;
    c->next_id = 1;
    rkey_client_set_socket(c, fd);
    return c;
}

void rkey_client_set_socket(rkey_client *c, int fd)
{
    struct timeval tick = {0, READER_TICK_MS * 1000};
    int old_fd;

    pthread_rwlock_wrlock(&c->send_lock);
    pthread_mutex_lock(&c->lock);
    old_fd = c->fd;
    waiters_expire(c, c->gen, 1, PROTO_UNAVAILABLE,
                   "the key process was replaced", NULL);
    ++c->gen;
    if (fd >= 0 &&
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof(tick)) == 0)
        c->timed_gen = c->gen;
    c->fd = fd;
    c->dead = fd < 0;
    c->epoch_seen = 0;
    c->dir_stale = 1;
    /* a caller reading the old socket sees it end, and lets go of it */
    if (old_fd >= 0)
        shutdown(old_fd, SHUT_RDWR);
    while (c->reading)
        pthread_cond_wait(&c->read_cond, &c->lock);
    pthread_mutex_unlock(&c->lock);
    if (old_fd >= 0)
        close(old_fd);
    pthread_rwlock_unlock(&c->send_lock);
}

void rkey_client_free(rkey_client *c)
{
    if (c == NULL)
        return;
    rkey_client_set_socket(c, -1);
    rkey_dir_free(c->dir);
    pthread_mutex_destroy(&c->lock);
    pthread_rwlock_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->dir_lock);
    pthread_cond_destroy(&c->read_cond);
    free(c->rbuf);
    free(c);
}

/* Sends a datagram on the socket of generation gen: the bytes sent, or
 * -1. Any number of threads send at once (a datagram goes whole or not at
 * all); send_lock's read side keeps the socket from being closed under
 * them. */
static ssize_t send_datagram(rkey_client *c, unsigned gen,
                             const unsigned char *buf, size_t len)
{
    ssize_t n = -1;
    int fd;

    pthread_rwlock_rdlock(&c->send_lock);
    pthread_mutex_lock(&c->lock);
    fd = !c->dead && c->gen == gen ? c->fd : -1;
    pthread_mutex_unlock(&c->lock);
    if (fd >= 0) {
        do
            n = send(fd, buf, len, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
    }
    pthread_rwlock_unlock(&c->send_lock);
    return n;
}

static uint32_t take_id(rkey_client *c)
{
    uint32_t id;

    do
        id = __atomic_fetch_add(&c->next_id, 1, __ATOMIC_RELAXED);
    while (id == 0);
    return id;
}

/* Sends req and waits for its reply: 0 with the datagram in *reply and
 * *reply_len (the caller wipes and frees it) decoded into *rep
 * (proto_reply_clear it), or -1 with *f, a reply that is not ok
 * included. */
static int call(rkey_client *c, proto_request *req, unsigned char **reply,
                size_t *reply_len, proto_reply *rep, rkey_failure *f)
{
    unsigned char buf[REQUEST_MAX];
    waiter w;
    proto_error perr;
    size_t len;
    ssize_t n;
    int dead;

    *reply = NULL;
    memset(&w, 0, sizeof(w));
    req->id = w.id = take_id(c);
    if (proto_request_encode(req, buf, sizeof(buf), &len, &perr) != 0) {
        fail(f, PROTO_BAD_REQUEST, "%s", perr.message);
        return -1;
    }
    pthread_cond_init(&w.cond, NULL);
    w.deadline = deadline_after(CLOCK_MONOTONIC, (long)c->timeout_ms);
    pthread_mutex_lock(&c->lock);
    w.gen = c->gen;
    dead = c->dead;
    if (!dead) {
        w.next = c->waiters;
        c->waiters = &w;
    }
    pthread_mutex_unlock(&c->lock);
    n = dead ? -1 : send_datagram(c, w.gen, buf, len);
    OPENSSL_cleanse(buf, len);
    pthread_mutex_lock(&c->lock);
    if (dead)
        waiter_finish(&w, PROTO_UNAVAILABLE,
                      "the key process cannot be reached");
    else if (n != (ssize_t)len && waiter_take(c, w.id, w.gen) != NULL)
        waiter_finish(&w, PROTO_UNAVAILABLE, "cannot send to the key process");
    while (!w.finished) {
        if (c->reading)
            pthread_cond_wait(&w.cond, &c->lock);
        else
            read_for(c, &w);
    }
    pthread_mutex_unlock(&c->lock);
    pthread_cond_destroy(&w.cond);
    if (w.reply == NULL) {
        *f = w.fail;
        return -1;
    }
    if (proto_reply_decode(w.reply, w.reply_len, rep, &perr) != 0 ||
        (rep->type != (PROTO_REPLY | req->type) && rep->type != PROTO_ERROR)) {
        if (rep->type != 0)
            proto_reply_clear(rep);
        OPENSSL_clear_free(w.reply, w.reply_len);
        fail(f, PROTO_INTERNAL,
             "a reply of the wrong type from the key "
             "process");
        return -1;
    }
    if (rep->status != PROTO_OK) {
        f->status = rep->status;
        f->retry_after = rep->retry_after;
        snprintf(f->message, sizeof(f->message), "%s", rep->message);
        proto_reply_clear(rep);
        OPENSSL_clear_free(w.reply, w.reply_len);
        return -1;
    }
    *reply = w.reply;
    *reply_len = w.reply_len;
    return 0;
}

/* A call whose answer is a byte string (a signature, a plaintext, Z). */
static int call_bytes(rkey_client *c, proto_request *req, unsigned char *out,
                      size_t *out_len, rkey_failure *f)
{
    unsigned char *raw;
    size_t raw_len;
    proto_reply rep;
    int r = -1;

    if (call(c, req, &raw, &raw_len, &rep, f) != 0)
        return -1;
    if (rep.u.bytes.len > *out_len) {
        fail(f, PROTO_INTERNAL, "the result does not fit (%zu bytes)",
             rep.u.bytes.len);
    } else {
        memcpy(out, rep.u.bytes.data, rep.u.bytes.len);
        *out_len = rep.u.bytes.len;
        r = 0;
    }
    proto_reply_clear(&rep);
    OPENSSL_clear_free(raw, raw_len);
    return r;
}

static int take_claims(proto_claims *out, rkey_failure *f)
{
    if (!tl_has_claims) {
        fail(f, PROTO_INTERNAL, "a key operation outside a request");
        return -1;
    }
    *out = tl_claims;
    tl_ops++;
    return 0;
}

static int set_key(char *dst, const char *key, rkey_failure *f)
{
    if (!proto_name_is_valid(key, PROTO_NAME_MAX)) {
        fail(f, PROTO_BAD_REQUEST, "a key name the protocol cannot carry");
        return -1;
    }
    snprintf(dst, PROTO_NAME_MAX + 1, "%s", key);
    return 0;
}

/* Starts req, of type, as an operation with key under the claims of the
 * request being served; key_field and claims are req's own fields. */
static int start_key_op(proto_request *req, unsigned type, char *key_field,
                        proto_claims *claims, const char *key, rkey_failure *f)
{
    memset(req, 0, sizeof(*req));
    req->type = (uint16_t)type;
    if (set_key(key_field, key, f) != 0 || take_claims(claims, f) != 0)
        return -1;
    return 0;
}

int rkey_sign(rkey_client *c, const char *key, const rkey_sign_args *a,
              const unsigned char *tbs, size_t tbs_len, unsigned char *out,
              size_t *out_len, rkey_failure *f)
{
    proto_request req;

    if (start_key_op(&req, PROTO_SIGN, req.u.sign.key, &req.u.sign.claims, key,
                     f) != 0)
        return -1;
    req.u.sign.mech = (uint8_t)a->mech;
    req.u.sign.md = (uint8_t)a->md;
    req.u.sign.mgf1_md = (uint8_t)a->mgf1_md;
    req.u.sign.salt_len = a->salt_len;
    req.u.sign.digest = tbs;
    req.u.sign.digest_len = tbs_len;
    return call_bytes(c, &req, out, out_len, f);
}

int rkey_decrypt(rkey_client *c, const char *key, const rkey_decrypt_args *a,
                 const unsigned char *in, size_t in_len, unsigned char *out,
                 size_t *out_len, rkey_failure *f)
{
    proto_request req;

    if (start_key_op(&req, PROTO_DECRYPT, req.u.decrypt.key,
                     &req.u.decrypt.claims, key, f) != 0)
        return -1;
    req.u.decrypt.padding = (uint8_t)a->padding;
    req.u.decrypt.oaep_md = (uint8_t)a->oaep_md;
    req.u.decrypt.mgf1_md = (uint8_t)a->mgf1_md;
    req.u.decrypt.label = a->label;
    req.u.decrypt.label_len = a->label_len;
    req.u.decrypt.ciphertext = in;
    req.u.decrypt.ciphertext_len = in_len;
    return call_bytes(c, &req, out, out_len, f);
}

int rkey_derive(rkey_client *c, const char *key, const unsigned char *point,
                size_t point_len, unsigned char *out, size_t *out_len,
                rkey_failure *f)
{
    proto_request req;

    if (start_key_op(&req, PROTO_DERIVE, req.u.derive.key, &req.u.derive.claims,
                     key, f) != 0)
        return -1;
    req.u.derive.point = point;
    req.u.derive.point_len = point_len;
    return call_bytes(c, &req, out, out_len, f);
}

/* A call whose ok reply says nothing more. */
static int call_plain(rkey_client *c, proto_request *req, rkey_failure *f)
{
    unsigned char *raw;
    size_t raw_len;
    proto_reply rep;

    if (call(c, req, &raw, &raw_len, &rep, f) != 0)
        return -1;
    proto_reply_clear(&rep);
    free(raw);
    return 0;
}

int rkey_audit(rkey_client *c, const proto_claims *claims,
               const char *operation, const char *key, unsigned result,
               const char *error, rkey_failure *f)
{
    proto_request req;

    memset(&req, 0, sizeof(req));
    req.type = PROTO_AUDIT;
    req.u.audit.claims = *claims;
    snprintf(req.u.audit.operation, sizeof(req.u.audit.operation), "%s",
             operation);
    snprintf(req.u.audit.key, sizeof(req.u.audit.key), "%s",
             key != NULL ? key : "");
    req.u.audit.result = (uint16_t)result;
    snprintf(req.u.audit.error, sizeof(req.u.audit.error), "%s",
             error != NULL ? error : "");
    return call_plain(c, &req, f);
}

/* Sends req, which has no reply: 0 once it is in the socket. */
static int send_only(rkey_client *c, proto_request *req, rkey_failure *f)
{
    unsigned char buf[REQUEST_MAX];
    proto_error perr;
    unsigned gen;
    size_t len;
    ssize_t n;

    req->id = take_id(c);
    if (proto_request_encode(req, buf, sizeof(buf), &len, &perr) != 0) {
        fail(f, PROTO_BAD_REQUEST, "%s", perr.message);
        return -1;
    }
    pthread_mutex_lock(&c->lock);
    gen = c->gen;
    pthread_mutex_unlock(&c->lock);
    n = send_datagram(c, gen, buf, len);
    if (n != (ssize_t)len) {
        fail(f, PROTO_UNAVAILABLE, "cannot send to the key process");
        return -1;
    }
    return 0;
}

/* One way: the key process answers no FINISH (the round trip was a
 * third of the process wall's cost per request), and writes its record
 * after the HTTP answer may have left. */
int rkey_finish(rkey_client *c, const char *request_id, unsigned result,
                const char *error, uint32_t latency_us, rkey_failure *f)
{
    proto_request req;

    memset(&req, 0, sizeof(req));
    req.type = PROTO_FINISH;
    snprintf(req.u.finish.request_id, sizeof(req.u.finish.request_id), "%s",
             request_id);
    req.u.finish.result = (uint16_t)result;
    snprintf(req.u.finish.error, sizeof(req.u.finish.error), "%s",
             error != NULL ? error : "");
    req.u.finish.latency_us = latency_us;
    return send_only(c, &req, f);
}

/* Takes the entries of one page for a fetch_pages caller: 0, or -1 with
 * *f. */
typedef int (*page_take)(rkey_client *c, void *ctx, const proto_reply *rep,
                         rkey_failure *f);

/* Every page of type (PROTO_KEYS or PROTO_STATE), all of one epoch
 * (*epoch: 0 takes the first's), each handed to take; another epoch on
 * the way is f->status PROTO_BUSY (read again). what names the list in
 * messages; a total past max_total is malformed. */
static int fetch_pages(rkey_client *c, unsigned type, uint64_t *epoch,
                       uint32_t max_total, const char *what, page_take take,
                       void *ctx, rkey_failure *f)
{
    proto_request req;
    proto_reply rep;
    unsigned char *raw;
    uint32_t start = 0, total, next;
    size_t raw_len;
    int r;

    do {
        memset(&req, 0, sizeof(req));
        req.type = (uint16_t)type;
        req.u.page.start = start;
        if (call(c, &req, &raw, &raw_len, &rep, f) != 0)
            return -1;
        if (*epoch == 0)
            *epoch = rep.epoch;
        total = type == PROTO_KEYS ? rep.u.keys.total : rep.u.state.total;
        next = type == PROTO_KEYS ? rep.u.keys.next : rep.u.state.next;
        if (rep.epoch != *epoch || next <= start || total > max_total) {
            fail(f, rep.epoch != *epoch ? PROTO_BUSY : PROTO_INTERNAL,
                 "%s changed or is malformed", what);
            r = -1;
        } else {
            r = take(c, ctx, &rep, f);
        }
        proto_reply_clear(&rep);
        free(raw);
        if (r != 0)
            return -1;
        start = next;
    } while (start < total);
    return 0;
}

typedef struct token_list {
    proto_token_entry *all;
    size_t n;
} token_list;

static int take_tokens(rkey_client *c, void *ctx, const proto_reply *rep,
                       rkey_failure *f)
{
    token_list *l = ctx;
    proto_token_entry *grown =
        realloc(l->all, (l->n + rep->u.state.ntokens + 1) * sizeof(*grown));

    if (grown == NULL) {
        fail(f, PROTO_INTERNAL, "out of memory");
        return -1;
    }
    l->all = grown;
    memcpy(l->all + l->n, rep->u.state.tokens,
           rep->u.state.ntokens * sizeof(*grown));
    l->n += rep->u.state.ntokens;
    return 0;
}

/* Every page of STATE, all of one epoch (*epoch: 0 takes the first's). */
static int fetch_tokens(rkey_client *c, uint64_t *epoch,
                        proto_token_entry **out, size_t *count, rkey_failure *f)
{
    token_list l = {NULL, 0};

    if (fetch_pages(c, PROTO_STATE, epoch, PROTO_PAGE_TOKENS_MAX * 1024u,
                    "the key process's token list", take_tokens, &l, f) != 0) {
        free(l.all);
        return -1;
    }
    *out = l.all;
    *count = l.n;
    return 0;
}

int rkey_state(rkey_client *c, proto_token_entry **tokens, size_t *count,
               rkey_failure *f)
{
    uint64_t epoch = 0;
    int tries;

    for (tries = 0; tries < DIR_ATTEMPTS; tries++) {
        if (fetch_tokens(c, &epoch, tokens, count, f) == 0)
            return 0;
        if (f->status != PROTO_BUSY)
            return -1;
        epoch = 0;
    }
    return -1;
}

/* ---- the provider's backend: a directory key's private operations ---- */

/* An EVP_PKEY's handle: which key, through which client. The client
 * outlives every EVP_PKEY (it is the worker's for its whole life). */
typedef struct remote_key {
    rkey_client *c;
    size_t half; /* ECDSA: the group order's length, the half of r || s */
    char name[PROTO_NAME_MAX + 1];
} remote_key;

static rkey_status status_from_proto(proto_status st)
{
    switch (st) {
    case PROTO_OK:
        return RKEY_OK;
    case PROTO_BUSY:
        return RKEY_BUSY;
    case PROTO_UNAVAILABLE:
        return RKEY_UNAVAILABLE;
    case PROTO_NOT_FOUND:
        return RKEY_NOT_FOUND;
    case PROTO_UNSUPPORTED:
        return RKEY_UNSUPPORTED;
    case PROTO_FAILED:
        return RKEY_FAILED;
    case PROTO_AUDIT_FAILED:
        return RKEY_AUDIT_FAILED;
    case PROTO_BAD_REQUEST:
        return RKEY_BAD_REQUEST;
    default:
        return RKEY_INTERNAL;
    }
}

static int remote_fail(const rkey_failure *f, rkey_error *err)
{
    err->status = status_from_proto(f->status);
    err->retry_after = f->retry_after;
    snprintf(err->message, sizeof(err->message), "%.255s", f->message);
    return -1;
}

static int remote_sign(void *handle, const rkey_sign_params *p,
                       const unsigned char *tbs, size_t tbs_len,
                       unsigned char *sig, size_t *sig_len, rkey_error *err)
{
    const remote_key *rk = handle;
    rkey_sign_args a = {0};
    rkey_failure f = {0};
    unsigned char der[2 * PROTO_SECRET_MAX + 16];
    const unsigned char *q = der;
    size_t der_len = sizeof(der);
    ECDSA_SIG *es;
    const BIGNUM *r, *s;
    int ok;

    switch (p->mech) {
    case RKEY_SIGN_RSA_PKCS1:
        /* tbs is the DigestInfo, which the key process checks itself */
        a.mech = PROTO_SIGN_RSA_PKCS1;
        a.md = PROTO_MD_NONE;
        break;
    case RKEY_SIGN_RSA_PSS:
        a.mech = PROTO_SIGN_RSA_PSS;
        a.md = rkey_md_from_nid(p->md_nid);
        a.mgf1_md = rkey_md_from_nid(p->mgf1_nid);
        a.salt_len = p->salt_len < 0 ? 0 : (uint32_t)p->salt_len;
        break;
    default:
        a.mech = PROTO_SIGN_ECDSA;
        a.md = rkey_md_from_nid(p->md_nid);
    }
    if (a.md == PROTO_MD_COUNT || a.mgf1_md == PROTO_MD_COUNT) {
        err->status = RKEY_UNSUPPORTED;
        snprintf(err->message, sizeof(err->message),
                 "a digest the key protocol does not carry");
        return -1;
    }
    if (a.mech != PROTO_SIGN_ECDSA)
        return rkey_sign(rk->c, rk->name, &a, tbs, tbs_len, sig, sig_len, &f) ==
                       0
                   ? 0
                   : remote_fail(&f, err);
    /* the key process answers what EVP_PKEY_sign makes, DER; the provider
     * takes r || s as PKCS#11 gives it */
    if (rkey_sign(rk->c, rk->name, &a, tbs, tbs_len, der, &der_len, &f) != 0)
        return remote_fail(&f, err);
    es = d2i_ECDSA_SIG(NULL, &q, (long)der_len);
    ECDSA_SIG_get0(es, &r, &s);
    ok = es != NULL && q == der + der_len && *sig_len >= 2 * rk->half &&
         BN_bn2binpad(r, sig, (int)rk->half) == (int)rk->half &&
         BN_bn2binpad(s, sig + rk->half, (int)rk->half) == (int)rk->half;
    ECDSA_SIG_free(es);
    ERR_clear_error();
    if (!ok) {
        err->status = RKEY_INTERNAL;
        snprintf(err->message, sizeof(err->message),
                 "the key process sent an ECDSA signature that does not "
                 "parse");
        return -1;
    }
    *sig_len = 2 * rk->half;
    return 0;
}

static int remote_decrypt(void *handle, const rkey_rsa_params *p,
                          const unsigned char *in, size_t in_len,
                          unsigned char *out, size_t *out_len, rkey_error *err)
{
    const remote_key *rk = handle;
    rkey_decrypt_args a = {0};
    rkey_failure f = {0};

    a.padding = p->padding == RKEY_RSA_OAEP ? PROTO_PAD_OAEP : PROTO_PAD_PKCS1;
    if (a.padding == PROTO_PAD_OAEP) {
        a.oaep_md = rkey_md_from_nid(p->md_nid);
        a.mgf1_md = rkey_md_from_nid(p->mgf1_nid);
        a.label = p->label;
        a.label_len = p->label_len;
        if (a.oaep_md == PROTO_MD_COUNT || a.oaep_md == PROTO_MD_NONE ||
            a.mgf1_md == PROTO_MD_COUNT || a.mgf1_md == PROTO_MD_NONE) {
            err->status = RKEY_UNSUPPORTED;
            snprintf(err->message, sizeof(err->message),
                     "an OAEP digest the key protocol does not carry");
            return -1;
        }
    }
    return rkey_decrypt(rk->c, rk->name, &a, in, in_len, out, out_len, &f) == 0
               ? 0
               : remote_fail(&f, err);
}

static int remote_derive(void *handle, const unsigned char *peer,
                         size_t peer_len, unsigned char *z, size_t *z_len,
                         rkey_error *err)
{
    const remote_key *rk = handle;
    rkey_failure f = {0};

    return rkey_derive(rk->c, rk->name, peer, peer_len, z, z_len, &f) == 0
               ? 0
               : remote_fail(&f, err);
}

static const rkey_backend remote_backend = {
    remote_sign,
    remote_decrypt,
    remote_derive,
    free,
};

/* The EVP_PKEY of a directory key; NULL when it has no certificate, its
 * key is of a type rkey does not carry or the provider is not loaded
 * (a process that reads the directory without signing: rkeytool). */
static EVP_PKEY *remote_pkey_new(rkey_client *c, const rkey_key *k)
{
    remote_key *rk;
    EVP_PKEY *pk, *pub;
    rkey_error err = {0};

    if (k->cert == NULL || (pub = X509_get0_pubkey(k->cert)) == NULL)
        return NULL;
    rk = calloc(1, sizeof(*rk));
    if (rk == NULL)
        return NULL;
    rk->c = c;
    rk->half = ((size_t)EVP_PKEY_get_bits(pub) + 7) / 8;
    memcpy(rk->name, k->name, sizeof(rk->name));
    pk = rkey_pkey_new(&remote_backend, rk, k->cert, &err);
    if (pk == NULL)
        free(rk);
    ERR_clear_error();
    return pk;
}

/* ---- the directory ---- */

static void key_clear(rkey_key *k)
{
    EVP_PKEY_free(k->pkey);
    X509_free(k->cert);
    sk_X509_pop_free(k->chain, X509_free);
}

static void dir_destroy(rkey_dir *d)
{
    size_t i;

    for (i = 0; i < d->nkeys; i++)
        key_clear(&d->keys[i]);
    free(d->keys);
    free(d->by_name);
    free(d->tokens);
    free(d);
}

void rkey_dir_free(rkey_dir *d)
{
    if (d != NULL && __atomic_sub_fetch(&d->refs, 1, __ATOMIC_ACQ_REL) == 0)
        dir_destroy(d);
}

static X509 *parse_cert(const unsigned char *der, size_t len)
{
    const unsigned char *p = der;
    X509 *x = d2i_X509(NULL, &p, (long)len);

    if (x != NULL && p != der + len) {
        X509_free(x);
        x = NULL;
    }
    ERR_clear_error();
    return x;
}

/* Copies e into k; certificates that do not parse leave the key listed
 * but not usable. */
static void key_from_entry(rkey_key *k, const proto_key_entry *e)
{
    static const char unparsed[] = "the key process sent a certificate that "
                                   "does not parse";
    size_t i;
    X509 *x;
    int ok = 1;

    memcpy(k->name, e->name, sizeof(k->name));
    memcpy(k->token, e->token, sizeof(k->token));
    memcpy(k->algorithm, e->algorithm, sizeof(k->algorithm));
    memcpy(k->reason_sign, e->reason_sign, sizeof(k->reason_sign));
    memcpy(k->reason_decrypt, e->reason_decrypt, sizeof(k->reason_decrypt));
    k->flags = e->flags;
    if (e->cert_len > 0 && (k->cert = parse_cert(e->cert, e->cert_len)) == NULL)
        ok = 0;
    k->chain = sk_X509_new_null();
    for (i = 0; ok && i < e->nchain; i++) {
        x = parse_cert(e->chain[i], e->chain_len[i]);
        if (x == NULL || k->chain == NULL || !sk_X509_push(k->chain, x)) {
            X509_free(x);
            ok = 0;
        }
    }
    if (ok && k->chain != NULL)
        return;
    k->flags &= ~(PROTO_KEY_SIGN_USABLE | PROTO_KEY_DECRYPT_USABLE);
    snprintf(k->reason_sign, sizeof(k->reason_sign), "%s", unparsed);
    snprintf(k->reason_decrypt, sizeof(k->reason_decrypt), "%s", unparsed);
}

static int by_name(const void *a, const void *b, void *keys)
{
    const rkey_key *k = keys;

    return strcmp(k[*(const size_t *)a].name, k[*(const size_t *)b].name);
}

/* Adds the keys of one KEYS page to the directory ctx, each with its
 * EVP_PKEY on c. */
static int take_keys(rkey_client *c, void *ctx, const proto_reply *rep,
                     rkey_failure *f)
{
    rkey_dir *d = ctx;
    rkey_key *grown =
        realloc(d->keys, (d->nkeys + rep->u.keys.nkeys + 1) * sizeof(*grown));
    size_t i;

    if (grown == NULL) {
        fail(f, PROTO_INTERNAL, "out of memory");
        return -1;
    }
    d->keys = grown;
    for (i = 0; i < rep->u.keys.nkeys; i++) {
        memset(&d->keys[d->nkeys], 0, sizeof(d->keys[0]));
        key_from_entry(&d->keys[d->nkeys], &rep->u.keys.keys[i]);
        d->keys[d->nkeys].pkey = remote_pkey_new(c, &d->keys[d->nkeys]);
        d->nkeys++;
    }
    return 0;
}

/* Every page of KEYS and of STATE, all of one epoch; a change in between
 * is f->status PROTO_BUSY (read again). */
static rkey_dir *fetch_dir(rkey_client *c, rkey_failure *f)
{
    rkey_dir *d = calloc(1, sizeof(*d));
    size_t i;

    if (d == NULL) {
        fail(f, PROTO_INTERNAL, "out of memory");
        return NULL;
    }
    if (fetch_pages(c, PROTO_KEYS, &d->epoch, DIR_KEYS_MAX, "the key directory",
                    take_keys, d, f) != 0 ||
        fetch_tokens(c, &d->epoch, &d->tokens, &d->ntokens, f) != 0)
        goto fail;
    d->by_name = calloc(d->nkeys + 1, sizeof(*d->by_name));
    if (d->by_name == NULL) {
        fail(f, PROTO_INTERNAL, "out of memory");
        goto fail;
    }
    for (i = 0; i < d->nkeys; i++)
        d->by_name[i] = i;
    qsort_r(d->by_name, d->nkeys, sizeof(*d->by_name), by_name, d->keys);
    clock_gettime(CLOCK_MONOTONIC, &d->fetched);
    d->refs = 1;
    return d;
fail:
    dir_destroy(d);
    return NULL;
}

/* The directory with a reference, when it is fresh. */
static rkey_dir *dir_fresh(rkey_client *c)
{
    struct timespec now;
    rkey_dir *d;

    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&c->lock);
    d = c->dir;
    if (d != NULL && !c->dir_stale && d->epoch == c->epoch_seen &&
        now.tv_sec - d->fetched.tv_sec < RKEY_DIR_TTL_S)
        __atomic_add_fetch(&d->refs, 1, __ATOMIC_ACQ_REL);
    else
        d = NULL;
    pthread_mutex_unlock(&c->lock);
    return d;
}

rkey_dir *rkey_dir_get1(rkey_client *c, rkey_failure *f)
{
    rkey_dir *d, *old = NULL;
    int tries;

    /* without dir_lock: every request looks, few fetch */
    drain(c);
    d = dir_fresh(c);
    if (d != NULL)
        return d;
    pthread_mutex_lock(&c->dir_lock);
    d = dir_fresh(c);
    if (d != NULL) {
        pthread_mutex_unlock(&c->dir_lock);
        return d;
    }
    for (tries = 0; d == NULL && tries < DIR_ATTEMPTS; tries++) {
        d = fetch_dir(c, f);
        if (d == NULL && f->status != PROTO_BUSY)
            break;
    }
    if (d != NULL) {
        __atomic_add_fetch(&d->refs, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_lock(&c->lock);
        old = c->dir;
        c->dir = d;
        c->dir_stale = 0;
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_unlock(&c->dir_lock);
    rkey_dir_free(old);
    return d;
}

uint64_t rkey_dir_epoch(const rkey_dir *d)
{
    return d->epoch;
}

size_t rkey_dir_count_keys(const rkey_dir *d)
{
    return d->nkeys;
}

rkey_key *rkey_dir_key_at(rkey_dir *d, size_t i)
{
    return i < d->nkeys ? &d->keys[i] : NULL;
}

rkey_key *rkey_dir_find_key(rkey_dir *d, const char *name)
{
    size_t lo = 0, hi = d->nkeys, mid;
    int cmp;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        cmp = strcmp(name, d->keys[d->by_name[mid]].name);
        if (cmp == 0)
            return &d->keys[d->by_name[mid]];
        if (cmp < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

size_t rkey_dir_count_tokens(const rkey_dir *d)
{
    return d->ntokens;
}

const proto_token_entry *rkey_dir_token_at(const rkey_dir *d, size_t i)
{
    return i < d->ntokens ? &d->tokens[i] : NULL;
}

const char *rkey_key_name(const rkey_key *k)
{
    return k->name;
}

const char *rkey_key_token_name(const rkey_key *k)
{
    return k->token;
}

const char *rkey_key_algorithm(const rkey_key *k)
{
    return k->algorithm;
}

X509 *rkey_key_cert0(const rkey_key *k)
{
    return k->cert;
}

STACK_OF(X509) *rkey_key_chain0(const rkey_key *k)
{
    return k->chain;
}

EVP_PKEY *rkey_key_pkey0(const rkey_key *k)
{
    return k->pkey;
}

int rkey_key_usable(const rkey_key *k, rkey_use use, const char **reason)
{
    int usable =
        (k->flags & (use == RKEY_USE_SIGN ? PROTO_KEY_SIGN_USABLE
                                          : PROTO_KEY_DECRYPT_USABLE)) != 0;

    if (!usable && reason != NULL)
        *reason = use == RKEY_USE_SIGN ? k->reason_sign : k->reason_decrypt;
    return usable;
}

int rkey_key_supports(const rkey_key *k, rkey_use use)
{
    return (k->flags & (use == RKEY_USE_SIGN ? PROTO_KEY_SIGN_SUPPORTED
                                             : PROTO_KEY_DECRYPT_SUPPORTED)) !=
           0;
}
