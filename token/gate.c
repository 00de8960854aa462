/*
 * The session gate: token states, and the bounded, first come, first served
 * queue for an operation slot.
 *
 * The wait inside libp11's session pool (set.c) is also kept out of the
 * semaphore per token (a mutex, a count and a queue of waiters) admits at
 * most max_sessions operations, never more than libp11's 16 and never more
 * than the token's ulMaxSessionCount, so libp11 always finds or can open a
 * session, and the requests beyond that wait in the queue with a deadline
 * (CLOCK_MONOTONIC) and fail with TOKEN_ERR_BUSY. There is no lock around
 * the operations themselves.
 *
 * The queue is first come, first served: only its head may take a free
 * slot, and a newcomer queues behind anyone waiting even when a slot is
 * free. With every waiter on one condition variable, whichever thread got
 * the mutex first after a release took the slot, and under load some
 * requests waited many times longer than the rest (script/bench: p99 six
 * times p50 at 32 connections). Each waiter sleeps on a condition variable
 * of its own (on its stack), so a release wakes the head alone: a ticket
 * counter on the shared one would be as fair, but every release would wake
 * every waiter (over a hundred threads at 128 connections) to find the one
 * whose turn it is, and a waiter that timed out would leave a hole in the
 * tickets. A change of state wakes every waiter (tk_wake_all): a fault fails
 * them, a rebuild's outcome lets them go or fail, and while the token is
 * TK_RECOVERING they keep their places. The shared condition variable
 * t->cond is left to module_drain, which waits on it for in_flight to
 * reach 0; a release broadcasts it while the token is not ready.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>

#include "token/internal.h"

/* Told of every state change of a published token, and of a token absent
 * at load that answers now (token_recovery_start). */
token_event_fn tk_event_fn;
token_present_fn tk_present_fn;

/* What is to be told, oldest first. A state changes under its token's
 * lock, often under the registry lock too, and the service's hooks may
 * write or log: so a change is copied here where it happens and told by
 * tk_events_flush once the thread holds no lock of token/. One thread
 * tells at a time (telling), so the hooks hear the changes in order. Past
 * TK_EVENTS_MAX untold, new ones are dropped: a hook that slow loses
 * states, never blocks a token. */
#define TK_EVENTS_MAX 64
#define TK_EVENT_NAME 128

static pthread_mutex_t events_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tk_event {
    int present; /* a token_present_fn call, else a token_event_fn one */
    char token[TK_EVENT_NAME];
    const char *state; /* a token_state_name: static */
    char reason[TK_REASON_LEN];
    int has_reason;
} events[TK_EVENTS_MAX];
static unsigned events_head, events_count;
static int events_telling;

static void event_queue(int present, const char *token, const char *state,
                        const char *reason)
{
    struct tk_event *e;

    pthread_mutex_lock(&events_lock);
    if (events_count < TK_EVENTS_MAX) {
        e = &events[(events_head + events_count++) % TK_EVENTS_MAX];
        e->present = present;
        snprintf(e->token, sizeof(e->token), "%s", token);
        e->state = state;
        e->has_reason = reason != NULL;
        snprintf(e->reason, sizeof(e->reason), "%s", reason ? reason : "");
    }
    pthread_mutex_unlock(&events_lock);
}

void tk_event_present(const char *token)
{
    if (__atomic_load_n(&tk_present_fn, __ATOMIC_ACQUIRE) != NULL)
        event_queue(1, token, NULL, NULL);
}

void tk_events_flush(void)
{
    token_present_fn present;
    token_event_fn fn;
    struct tk_event e;

    pthread_mutex_lock(&events_lock);
    /* the thread telling now tells ours too */
    if (events_telling) {
        pthread_mutex_unlock(&events_lock);
        return;
    }
    events_telling = 1;
    while (events_count > 0) {
        e = events[events_head];
        events_head = (events_head + 1) % TK_EVENTS_MAX;
        events_count--;
        pthread_mutex_unlock(&events_lock);
        fn = __atomic_load_n(&tk_event_fn, __ATOMIC_ACQUIRE);
        present = __atomic_load_n(&tk_present_fn, __ATOMIC_ACQUIRE);
        if (e.present && present != NULL)
            present(e.token);
        else if (!e.present && fn != NULL)
            fn(e.token, e.state, e.has_reason ? e.reason : NULL);
        pthread_mutex_lock(&events_lock);
    }
    events_telling = 0;
    pthread_mutex_unlock(&events_lock);
}

/* The state as the outside sees it. Under t->lock. */
static token_state state_public(const struct tk_token *t)
{
    switch (t->state) {
    case TK_READY:
        return t->in_flight >= t->max_sessions ? TOKEN_STATE_BUSY
                                               : TOKEN_STATE_READY;
    case TK_PIN_REFUSED:
        return TOKEN_STATE_PIN_REJECTED;
    case TK_RECOVERING:
        return TOKEN_STATE_RECOVERING;
    case TK_DOWN:
    case TK_FAULT:
        break;
    }
    return TOKEN_STATE_DOWN;
}

const char *token_state_name(token_state state)
{
    static const char *const names[] = {
        [TOKEN_STATE_READY] = "ready",
        [TOKEN_STATE_DOWN] = "down",
        [TOKEN_STATE_BUSY] = "busy",
        [TOKEN_STATE_PIN_REJECTED] = "pin_rejected",
        [TOKEN_STATE_RECOVERING] = "recovering",
    };

    return (unsigned)state < sizeof(names) / sizeof(names[0]) ? names[state]
                                                              : "down";
}

/* Under t->lock: after a change of state, every waiter looks again (see
 * the top of this file), and so does a rebuild's drain. */
void tk_wake_all(struct tk_token *t)
{
    struct tk_waiter *w;

    for (w = t->queue; w != NULL; w = w->next)
        pthread_cond_signal(&w->cond);
    pthread_cond_broadcast(&t->cond);
}

/* Under t->lock once published: the state, its time, and word to the
 * event hook, told by the next tk_events_flush. */
void tk_token_set_state(struct tk_token *t, enum tk_state state)
{
    if (t->state == state)
        return;
    t->state = state;
    t->changed = time(NULL);
    if (t->published && __atomic_load_n(&tk_event_fn, __ATOMIC_ACQUIRE) != NULL)
        event_queue(0, t->name, token_state_name(state_public(t)),
                    state == TK_READY ? NULL : t->reason);
}

/* Marks the token down with a reason: while token_set_add opens it, in
 * open_reason; once other threads see it (a rebuild re-opening it), under
 * its lock in a kept reason. */
__attribute__((format(printf, 3, 4))) void
tk_token_down(struct tk_token *t, enum tk_state state, const char *fmt, ...)
{
    char why[TK_REASON_LEN];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    ERR_clear_error();
    if (!t->published) {
        t->state = state;
        snprintf(t->open_reason, sizeof(t->open_reason), "%s", why);
        t->reason = t->open_reason;
        return;
    }
    pthread_mutex_lock(&t->lock);
    tk_token_set_fault_reason(t, why);
    tk_token_set_state(t, state);
    tk_wake_all(t);
    pthread_mutex_unlock(&t->lock);
}

/* Points t->reason at a kept copy of text. Past TK_FAULT_REASONS_MAX
 * distinct texts, or without memory, a fixed one stands in. Under t->lock. */
void tk_token_set_fault_reason(struct tk_token *t, const char *text)
{
    struct tk_reason *r;

    for (r = t->fault_reasons; r != NULL; r = r->next) {
        if (strcmp(r->text, text) == 0) {
            t->reason = r->text;
            return;
        }
    }
    r = t->nfault_reasons < TK_FAULT_REASONS_MAX ? malloc(sizeof(*r)) : NULL;
    if (r == NULL) {
        t->reason = "the token does not answer";
        return;
    }
    snprintf(r->text, sizeof(r->text), "%s", text);
    r->next = t->fault_reasons;
    t->fault_reasons = r;
    t->nfault_reasons++;
    t->reason = r->text;
}

/* 1 when the token is ready (or, with recovering_too, being re-opened: an
 * operation then waits for the outcome in token_key_acquire); otherwise 0
 * and *reason (when not NULL) says why, in a string that stays valid as
 * long as the token. */
int tk_token_ready(struct tk_token *t, int recovering_too, const char **reason)
{
    int ready;

    pthread_mutex_lock(&t->lock);
    ready =
        t->state == TK_READY || (recovering_too && t->state == TK_RECOVERING);
    if (!ready && reason != NULL)
        *reason = t->state == TK_RECOVERING ? "the token is being re-opened"
                                            : t->reason;
    pthread_mutex_unlock(&t->lock);
    return ready;
}

/* The calling thread's operations. tk_op_token: the token of the operation
 * in progress, between token_key_acquire and token_key_release, for
 * tk_ui_read (whose PIN does libp11 ask for?). tk_op_last, tk_op_generation and
 * tk_op_use: the token, module generation and use of the last operation
 * acquired, kept past the release for token_key_check_fault (was the
 * context rebuilt since that operation began? what kind of operation is
 * to be checked?); tk_op_last is only compared, never followed. */
__thread struct tk_token *tk_op_token;
__thread const struct tk_token *tk_op_last;
__thread unsigned long tk_op_generation;
__thread token_use tk_op_use;

/* Under t->lock: a slot is free and the queue does not hold it back. */
static int slot_free(const struct tk_token *t, const struct tk_waiter *w)
{
    return t->state == TK_READY && t->in_flight < t->max_sessions &&
           t->queue == w;
}

/* Under t->lock: the caller joins the queue, sleeps until it is the head
 * and a slot is free, the token fails (anything but ready or recovering)
 * or the deadline passes, and leaves the queue; then whether a slot is
 * free for it. */
static int wait_in_queue(struct tk_token *t, const struct timespec *deadline)
{
    struct tk_waiter w = {.next = NULL}, **pp;
    pthread_condattr_t attr;
    int rc = 0, free_now;

    if (pthread_condattr_init(&attr) != 0)
        return 0;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
         pthread_cond_init(&w.cond, &attr) != 0;
    pthread_condattr_destroy(&attr);
    if (rc != 0)
        return 0;
    *t->queue_tail = &w;
    t->queue_tail = &w.next;
    /* A rebuild usually takes well under a second: wait for its outcome
     * as for a session, within the same bound. */
    while (!slot_free(t, &w) &&
           (t->state == TK_READY || t->state == TK_RECOVERING) &&
           rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&w.cond, &t->lock, deadline);
    free_now = slot_free(t, &w);
    for (pp = &t->queue; *pp != &w; pp = &(*pp)->next)
        ;
    *pp = w.next;
    if (t->queue_tail == &w.next)
        t->queue_tail = pp;
    pthread_cond_destroy(&w.cond);
    return free_now;
}

/* token_key_acquire, and the slot of a check operation (check): that one
 * is not counted as an operation and leaves the record of the last
 * operation (tk_op_last, tk_op_generation, tk_op_use) alone. */
int tk_acquire_slot(token_key *key, token_use use, EVP_PKEY **pkey, int check,
                    token_error *err)
{
    struct tk_token *t = key->token;
    struct timespec deadline;
    const char *reason;
    int free_now;
    int r = -1;

    if (!token_key_usable(key, use, &reason)) {
        pthread_mutex_lock(&t->lock);
        t->stats.unavailable++;
        pthread_mutex_unlock(&t->lock);
        tk_error(err, TOKEN_ERR_UNAVAILABLE, "key %s: %s", key->name, reason);
        return -1;
    }
    deadline = tk_deadline_after(CLOCK_MONOTONIC, t->wait_ms);
    pthread_mutex_lock(&t->lock);
    free_now = slot_free(t, NULL) || wait_in_queue(t, &deadline);
    if (t->state != TK_READY) {
        t->stats.unavailable++;
        tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name,
                 t->state == TK_RECOVERING ? "the token is being re-opened"
                                           : t->reason);
    } else if (!free_now) {
        t->stats.busy++;
        tk_error(err, TOKEN_ERR_BUSY,
                 "token %s: no session came free within %ld ms (%u in use)",
                 t->name, t->wait_ms, t->in_flight);
    } else if (key->pkey == NULL) {
        t->stats.unavailable++;
        tk_error(err, TOKEN_ERR_UNAVAILABLE,
                 "key %s: not found again after the token was re-opened",
                 key->name);
    } else {
        t->in_flight++;
        *pkey = key->pkey;
        tk_op_token = t;
        if (!check) {
            t->stats.operations[use == TOKEN_USE_DECRYPT]++;
            tk_op_last = t;
            tk_op_use = use;
            tk_op_generation =
                __atomic_load_n(&t->module->generation, __ATOMIC_ACQUIRE);
        }
        r = 0;
    }
    /* the queue's new head may find a slot free too */
    if (t->queue != NULL && slot_free(t, t->queue))
        pthread_cond_signal(&t->queue->cond);
    pthread_mutex_unlock(&t->lock);
    return r;
}

int token_key_acquire(token_key *key, token_use use, EVP_PKEY **pkey,
                      token_error *err)
{
    return tk_acquire_slot(key, use, pkey, 0, err);
}

void token_key_release(token_key *key)
{
    struct tk_token *t = key->token;

    pthread_mutex_lock(&t->lock);
    /* An unpaired release must not wrap the count and shut the token. */
    if (t->in_flight > 0)
        t->in_flight--;
    if (t->state != TK_READY)
        pthread_cond_broadcast(&t->cond); /* a rebuild may be draining */
    else if (t->queue != NULL)
        pthread_cond_signal(&t->queue->cond);
    pthread_mutex_unlock(&t->lock);
    tk_op_token = NULL;
}

token_state token_set_token_state(const token_set *set, size_t i, time_t *since,
                                  const char **reason)
{
    struct tk_token *t;
    token_state state;

    if (i >= set->ntokens)
        return TOKEN_STATE_DOWN;
    t = set->tokens[i];
    pthread_mutex_lock(&t->lock);
    state = state_public(t);
    if (since != NULL)
        *since = t->changed;
    if (reason != NULL)
        *reason = t->state == TK_READY        ? NULL
                  : t->state == TK_RECOVERING ? "the token is being re-opened"
                                              : t->reason;
    pthread_mutex_unlock(&t->lock);
    return state;
}

void token_set_token_stats(const token_set *set, size_t i, token_stats *out)
{
    const struct tk_waiter *w;
    struct tk_token *t;

    memset(out, 0, sizeof(*out));
    if (i >= set->ntokens)
        return;
    t = set->tokens[i];
    pthread_mutex_lock(&t->lock);
    *out = t->stats;
    out->in_flight = t->in_flight;
    for (w = t->queue; w != NULL; w = w->next)
        out->waiting++;
    out->max_sessions = t->max_sessions;
    pthread_mutex_unlock(&t->lock);
}
