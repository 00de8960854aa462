/*
 * Recovery: fault checks after a failed operation, rebuilding a module's
 * context, and the recovery thread.
 *
 * Faults at run time. A failed key operation does not say whether the
 * token broke (OpenSSL's CMS even hides decryption errors), so the caller
 * asks token_key_check_fault, which probes the token through the function
 * list: a session must open, and a token we logged in to must still show
 * the process logged in. A token that does not answer goes down (TK_FAULT)
 * and waiters in token_key_acquire fail at once; the recovery thread then
 * rebuilds its module's context with back-off (1 s, doubling to 30 s). A
 * token that answers but logged us out was reset: libp11's pooled
 * sessions are dead, so the caller rebuilds the module at once and
 * retries its operation. A token that passes the probe may still have
 * dead libp11 handles (sessions gone while the login stayed): check.c
 * runs the same kind of operation once more, on input of our own, through
 * libp11's key; a CKR code of dead handles gets the same rebuild and
 * retry, any other failure makes the operation the token's fault (a 503,
 * the token stays up), and only a check that works leaves the failure to
 * the operation itself. A rebuild (module_rebuild) stops and drains every
 * token of the module, of every token set, then PKCS11_CTX_unload,
 * PKCS11_CTX_load, and re-opens each token in the order above: probe, log
 * in through the function list, and only then let libp11 list the keys.
 * Tokens that were down from the start (TK_DOWN) are not re-opened in
 * place: if they were absent, a rebuild looks for them and the service is
 * asked to reload once they answer (token_look_again). A refused or locked
 * PIN (TK_PIN_REFUSED) is never tried again with the same PIN.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_timedjoin_np */
#endif
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libp11.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "token/internal.h"

/* Re-probing a token that went down at run time: first after 1 s, then
 * after twice the last wait, at most 30 s. */
#define TK_BACKOFF_FIRST_S 1
#define TK_BACKOFF_MAX_S 30

/* How long a rebuild waits for the operations in flight on the module's
 * tokens to finish before it gives up and tries again later. */
#define TK_DRAIN_MS 5000

/* ---- faults found at run time ---- */

/* Asks the token, through the module's function list (libp11 could wait
 * forever for a session), whether it still works for us. TK_ANSWERS when
 * it does, TK_LOGGED_OUT when it answers but has forgotten our login (a
 * reset: libp11's sessions are dead too), TK_SILENT when it does not
 * answer; why says what is wrong. Needs no lock: the probe and the slot id
 * change only in a rebuild, with every operation drained. */
enum tk_answer { TK_ANSWERS, TK_LOGGED_OUT, TK_SILENT };

static enum tk_answer token_answers(const struct tk_token *t, char *why,
                                    size_t len)
{
    tk_token_state st;
    unsigned long rv;
    char ckr[64];

    pthread_rwlock_rdlock(&t->module->calls);
    rv = tk_probe_session(t->module->probe, t->slot_id, &st);
    pthread_rwlock_unlock(&t->module->calls);
    /* Every session in use is an answer too: the token works, and is
     * busy with our own operations. */
    if (rv == CKR_SESSION_COUNT)
        return TK_ANSWERS;
    if (rv != 0) {
        tk_ckr_describe(rv, ckr, sizeof(ckr));
        snprintf(why, len, "the token does not answer: %s", ckr);
        return TK_SILENT;
    }
    if (t->logs_in && !st.logged_in) {
        snprintf(why, len, "the token logged this process out (was it reset?)");
        return TK_LOGGED_OUT;
    }
    return TK_ANSWERS;
}

/* Under t->lock: the next recovery attempt, after the back-off that
 * follows the last one (1 s after a first fault, doubling to 30 s). */
void tk_schedule_recovery(struct tk_token *t)
{
    unsigned s = t->backoff_s == 0 ? TK_BACKOFF_FIRST_S : 2 * t->backoff_s;

    if (s > TK_BACKOFF_MAX_S)
        s = TK_BACKOFF_MAX_S;
    clock_gettime(CLOCK_MONOTONIC, &t->next_probe);
    t->next_probe.tv_sec += s;
    t->backoff_s = s;
}

/* Under t->lock. Waiters in token_key_acquire wake up and fail; the
 * recovery loop takes it from here. */
static void token_fault(struct tk_token *t, const char *why)
{
    tk_token_set_fault_reason(t, why);
    tk_token_set_state(t, TK_FAULT);
    tk_wake_all(t);
}

static int recovery_due(const struct tk_token *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > t->next_probe.tv_sec ||
           (now.tv_sec == t->next_probe.tv_sec &&
            now.tv_nsec >= t->next_probe.tv_nsec);
}

/* ---- rebuilding a module's libp11 context ---- */

/* Waits until no operation is in flight on any token of m; the tokens
 * are already out of TK_READY, so none starts. 0 when drained, -1 when the
 * deadline passed first. */
static int module_drain(struct tk_module *m)
{
    struct timespec deadline;
    size_t i;
    int rc = 0;

    deadline = tk_deadline_after(CLOCK_MONOTONIC, TK_DRAIN_MS);
    for (i = 0; i < m->ntokens && rc == 0; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        while (t->in_flight > 0 && rc == 0)
            rc = pthread_cond_timedwait(&t->cond, &t->lock, &deadline);
        if (t->in_flight == 0)
            rc = 0;
        pthread_mutex_unlock(&t->lock);
    }
    return rc == 0 ? 0 : -1;
}

/* Finds each of the token's keys again on the fresh context, by the label
 * and ID of the object bound before. 0 when listed, -1 (and why) when the
 * token could not list its keys. A key that is gone stays without pkey,
 * which token_key_acquire refuses. */
static int token_rebind_keys(struct tk_token *t, char *why, size_t len)
{
    PKCS11_KEY *keys = NULL;
    unsigned nkeys = 0, i;
    char ckr[96];
    size_t j;

    if (PKCS11_enumerate_keys(t->slot->token, &keys, &nkeys) < 0) {
        tk_libp11_failure(ckr, sizeof(ckr));
        snprintf(why, len, "cannot list private keys: %s", ckr);
        return -1;
    }
    for (j = 0; j < t->nkeys; j++) {
        token_key *k = t->keys[j];

        if (k->label == NULL && k->id == NULL)
            continue;
        for (i = 0; i < nkeys; i++) {
            const PKCS11_KEY *pk = &keys[i];

            if ((k->label == NULL) != (pk->label == NULL) ||
                (k->label != NULL && strcmp(k->label, pk->label) != 0) ||
                k->id_len != pk->id_len ||
                (k->id_len > 0 && memcmp(k->id, pk->id, k->id_len) != 0))
                continue;
            k->pkey = PKCS11_get_private_key(&keys[i]);
            /* the same name must stand for the same key pair */
            if (k->pkey != NULL && k->cert != NULL &&
                EVP_PKEY_eq(X509_get0_pubkey(k->cert), k->pkey) != 1) {
                EVP_PKEY_free(k->pkey);
                k->pkey = NULL;
            }
            break;
        }
    }
    ERR_clear_error();
    return 0;
}

/* Opens a token again on its module's fresh context, in the order set.c
 * gives: find its slot, probe it through the function list,
 * log in through the function list, and only then let libp11 list its
 * keys. The token ends ready, or down with the reason (TK_PIN_REFUSED when
 * the PIN was refused). Under the module's lock, the module drained. */
static void token_reopen(struct tk_token *t)
{
    struct tk_module *m = t->module;
    unsigned long rv, session = 0;
    char why[TK_REASON_LEN], ckr[64];
    token_error err = {0};
    tk_token_state st;
    char *pin = NULL;
    int rc, holding = 0;

    t->slot = tk_module_find_slot(m, &t->uri);
    if (t->slot == NULL) {
        tk_token_down(t, TK_FAULT, "no initialised token matches the URI now");
        return;
    }
    t->slot_id = PKCS11_get_slotid_from_slot(t->slot);
    rv = tk_probe_session(m->probe, t->slot_id, &st);
    if (rv != 0) {
        tk_ckr_describe(rv, ckr, sizeof(ckr));
        tk_token_down(t, TK_FAULT, "cannot open a session: %s", ckr);
        return;
    }
    if (t->has_pin) {
        pin = tk_token_pin_again(t, why, sizeof(why));
        if (pin == NULL) {
            tk_token_down(t, TK_FAULT, "%s", why);
            return;
        }
    }
    rc = tk_token_login(t, &pin, &st, &session, &holding, &err);
    if (rc < 0)
        tk_token_down(t, TK_FAULT, "%s", err.message);
    if (rc <= 0)
        return;
    rc = token_rebind_keys(t, why, sizeof(why));
    if (holding)
        tk_probe_end_session(m->probe, session);
    if (rc < 0) {
        tk_token_down(t, TK_FAULT, "%s", why);
        return;
    }
    pthread_mutex_lock(&t->lock);
    t->backoff_s = 0;
    t->stats.recoveries++;
    tk_token_set_state(t, TK_READY);
    tk_wake_all(t);
    pthread_mutex_unlock(&t->lock);
}

/* A token that was absent when its set was built: renews its slot and,
 * when it answers now, asks the service for the reload that opens it
 * (once per token object; the reload replaces it). Under the module's
 * lock, in a rebuild. */
static void token_look_again(struct tk_token *t)
{
    tk_token_state st;
    int absent;

    t->slot = tk_module_find_slot(t->module, &t->uri);
    pthread_mutex_lock(&t->lock);
    absent = t->state == TK_DOWN && t->absent && !t->answers_now;
    pthread_mutex_unlock(&t->lock);
    if (!absent || t->slot == NULL)
        return;
    t->slot_id = PKCS11_get_slotid_from_slot(t->slot);
    if (tk_probe_session(t->module->probe, t->slot_id, &st) != 0)
        return;
    t->answers_now = 1;
    tk_event_present(t->name);
}

/* Rebuilds m's libp11 context: stops and drains every token of the module
 * (of every token set), frees every libp11 object, PKCS11_CTX_unload
 * (C_Finalize), PKCS11_CTX_load (C_Initialize), lists the slots, and opens
 * each token that was ready once again (token_reopen). Tokens down since
 * they were configured keep their state; their slot pointers are renewed.
 * Tokens whose PIN was refused are not touched beyond that. 0 when the
 * context was rebuilt (whatever each token made of it), -1 when the
 * operations in flight did not drain or the module did not load. Under
 * the module's lock. */
static int module_rebuild(struct tk_module *m)
{
    token_error err = {0};
    struct timespec deadline;
    size_t i, j;
    int locked = 0;

    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        if (t->opened && t->state != TK_PIN_REFUSED) {
            tk_token_set_state(t, TK_RECOVERING);
            tk_wake_all(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    if (module_drain(m) < 0) {
        snprintf(err.message, sizeof(err.message),
                 "operations in flight did not finish within %d ms; the "
                 "token is re-opened later",
                 TK_DRAIN_MS);
        goto failed;
    }
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += TK_DRAIN_MS / 1000;
    if (pthread_rwlock_timedwrlock(&m->calls, &deadline) != 0) {
        snprintf(err.message, sizeof(err.message),
                 "probes of the token did not finish within %d ms; the "
                 "token is re-opened later",
                 TK_DRAIN_MS);
        goto failed;
    }
    locked = 1;
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        for (j = 0; j < t->nkeys; j++) {
            EVP_PKEY_free(t->keys[j]->pkey);
            t->keys[j]->pkey = NULL;
        }
        t->slot = NULL;
    }
    if (m->slots != NULL)
        PKCS11_release_all_slots(m->ctx, m->slots, m->nslots);
    m->slots = NULL;
    m->nslots = 0;
    if (m->loaded)
        PKCS11_CTX_unload(m->ctx);
    m->loaded = 0;
    __atomic_add_fetch(&m->generation, 1, __ATOMIC_RELEASE);
    /* C_Finalize ended every login of the process. */
    for (struct tk_pins *p = m->pins; p != NULL; p = p->next)
        p->logged_in = 0;
    if (tk_module_load(m, &err) < 0)
        goto failed;
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];
        int reopen;

        pthread_mutex_lock(&t->lock);
        reopen = t->state == TK_RECOVERING;
        pthread_mutex_unlock(&t->lock);
        if (reopen)
            token_reopen(t);
        else
            token_look_again(t);
    }
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        /* A token that was serving until now starts its back-off; the
         * others had theirs advanced by the caller. */
        pthread_mutex_lock(&t->lock);
        if (t->state == TK_FAULT && t->backoff_s == 0)
            tk_schedule_recovery(t);
        pthread_mutex_unlock(&t->lock);
    }
    pthread_rwlock_unlock(&m->calls);
    return 0;
failed:
    if (locked)
        pthread_rwlock_unlock(&m->calls);
    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];

        pthread_mutex_lock(&t->lock);
        if (t->state == TK_RECOVERING || t->state == TK_FAULT) {
            token_fault(t, err.message);
            if (t->backoff_s == 0)
                tk_schedule_recovery(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    return -1;
}

/* The recovery loop: one thread for the process looks at every module
 * each quarter second, and a module with a token down since a run-time
 * fault (its back-off passed) gets a worker thread of its own for the
 * attempt, so a module hung inside a rebuild or a probe holds up its own
 * tokens and no other module's recovery. At most one worker per module;
 * the loop only tries the module's lock, and skips a module whose lock is
 * taken. When other tokens of the module still serve, the faulty one must
 * first answer a probe on the old context, so a token that stays absent
 * does not pause its neighbours at every attempt. */
static pthread_mutex_t recovery_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t recovery_thread;
static int recovery_running; /* under recovery_lock */
static int recovery_stop;    /* under recovery_lock; read atomically */
static pthread_cond_t recovery_cond = PTHREAD_COND_INITIALIZER;

/* How long token_recovery_stop waits for the workers inside a module. */
#define TK_WORKERS_STOP_MS 5000

/* Whether an attempt on m is due, and whether it starts with a probe of
 * the faulty tokens (*probe_first: others serve). Advances the back-off
 * of the tokens it finds due. Under m->lock. */
static int module_due(struct tk_module *m, int *probe_first)
{
    int fault_due = 0, absent_due = 0, serving = 0;
    size_t i;

    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];
        int absent;

        pthread_mutex_lock(&t->lock);
        absent = t->state == TK_DOWN && t->absent && !t->answers_now;
        if (t->state == TK_READY)
            serving = 1;
        if ((t->state == TK_FAULT || absent) && recovery_due(t)) {
            if (absent)
                absent_due = 1;
            else
                fault_due = 1;
            tk_schedule_recovery(t);
        }
        pthread_mutex_unlock(&t->lock);
    }
    *probe_first = serving;
    /* A token absent since the load is looked for only by a rebuild that
     * pauses nobody: with tokens of the module serving, a reload finds it. */
    return serving ? fault_due : fault_due || absent_due;
}

/* A faulty token of m answers a probe on the old context. Under m->lock. */
static int module_answers(struct tk_module *m)
{
    char why[TK_REASON_LEN];
    size_t i;

    for (i = 0; i < m->ntokens; i++) {
        struct tk_token *t = m->tokens[i];
        int fault;

        pthread_mutex_lock(&t->lock);
        fault = t->state == TK_FAULT;
        pthread_mutex_unlock(&t->lock);
        if (fault && m->loaded && t->slot != NULL &&
            token_answers(t, why, sizeof(why)) != TK_SILENT)
            return 1;
    }
    return 0;
}

/* One attempt on a module, on a thread of its own; holds a reference. */
static void *recovery_worker(void *arg)
{
    struct tk_module *m = arg;
    int abandoned;

    tk_module_lock(m, -1);
    if (!m->worker_probe_first || module_answers(m))
        module_rebuild(m);
    tk_module_unlock(m);
    tk_events_flush();
    pthread_mutex_lock(&tk_registry_lock);
    abandoned = m->worker_state == TK_WORKER_ABANDONED;
    m->worker_state = abandoned ? TK_WORKER_NONE : TK_WORKER_DONE;
    pthread_mutex_unlock(&tk_registry_lock);
    /* Nobody joins a detached worker: it drops its reference itself. */
    if (abandoned)
        tk_module_put(m);
    return NULL;
}

static void worker_start(struct tk_module *m, int probe_first)
{
    pthread_t th;

    pthread_mutex_lock(&tk_registry_lock);
    m->refs++;
    m->worker_state = TK_WORKER_RUNNING;
    m->worker_probe_first = probe_first;
    pthread_mutex_unlock(&tk_registry_lock);
    if (pthread_create(&th, NULL, recovery_worker, m) != 0) {
        /* tried again at the token's next back-off */
        pthread_mutex_lock(&tk_registry_lock);
        m->worker_state = TK_WORKER_NONE;
        pthread_mutex_unlock(&tk_registry_lock);
        tk_module_put(m);
        return;
    }
    pthread_mutex_lock(&tk_registry_lock);
    m->worker = th;
    pthread_mutex_unlock(&tk_registry_lock);
}

/* Joins m's ended worker; with until, also waits for a running one until
 * then, and detaches it when it is still inside the module. The caller
 * holds a reference to m. */
static void worker_reap(struct tk_module *m, const struct timespec *until)
{
    enum tk_worker state;
    int joined = 0;
    pthread_t th;

    pthread_mutex_lock(&tk_registry_lock);
    state = m->worker_state;
    th = m->worker;
    pthread_mutex_unlock(&tk_registry_lock);
    if (state == TK_WORKER_RUNNING && until != NULL) {
        joined = pthread_timedjoin_np(th, NULL, until) == 0;
        if (!joined) {
            pthread_mutex_lock(&tk_registry_lock);
            state = m->worker_state;
            if (state == TK_WORKER_RUNNING) {
                m->worker_state = TK_WORKER_ABANDONED;
                pthread_detach(th);
            }
            pthread_mutex_unlock(&tk_registry_lock);
            if (state == TK_WORKER_RUNNING)
                return;
        }
    } else if (state != TK_WORKER_DONE) {
        return;
    }
    if (!joined)
        pthread_join(th, NULL);
    pthread_mutex_lock(&tk_registry_lock);
    m->worker_state = TK_WORKER_NONE;
    pthread_mutex_unlock(&tk_registry_lock);
    tk_module_put(m);
}

/* Visits every module with a reference held, so the list may change
 * while fn runs (fn takes no registry lock of the caller's). */
static void modules_each(void (*fn)(struct tk_module *, const void *),
                         const void *arg)
{
    struct tk_module *m, *next;

    pthread_mutex_lock(&tk_registry_lock);
    m = tk_registry;
    if (m != NULL)
        m->refs++;
    pthread_mutex_unlock(&tk_registry_lock);
    while (m != NULL) {
        fn(m, arg);
        pthread_mutex_lock(&tk_registry_lock);
        next = m->next;
        if (next != NULL)
            next->refs++;
        pthread_mutex_unlock(&tk_registry_lock);
        tk_module_put(m);
        m = next;
    }
}

static void module_visit(struct tk_module *m, const void *arg)
{
    enum tk_worker state;
    int due = 0, probe_first = 0;

    (void)arg;
    worker_reap(m, NULL);
    pthread_mutex_lock(&tk_registry_lock);
    state = m->worker_state;
    pthread_mutex_unlock(&tk_registry_lock);
    if (state != TK_WORKER_NONE || tk_module_trylock(m) != 0)
        return;
    due = module_due(m, &probe_first);
    tk_module_unlock(m);
    if (due && !__atomic_load_n(&recovery_stop, __ATOMIC_ACQUIRE))
        worker_start(m, probe_first);
}

static void module_stop_worker(struct tk_module *m, const void *arg)
{
    worker_reap(m, arg);
}

static void *recovery_main(void *arg)
{
    struct timespec wake;

    (void)arg;
    pthread_mutex_lock(&recovery_lock);
    while (!recovery_stop) {
        pthread_mutex_unlock(&recovery_lock);
        modules_each(module_visit, NULL);
        tk_events_flush();
        pthread_mutex_lock(&recovery_lock);
        /* Back-offs are whole seconds; a quarter second is their grain. */
        wake = tk_deadline_after(CLOCK_REALTIME, 250);
        if (!recovery_stop)
            pthread_cond_timedwait(&recovery_cond, &recovery_lock, &wake);
    }
    pthread_mutex_unlock(&recovery_lock);
    return NULL;
}

int token_recovery_start(token_event_fn fn, token_present_fn present,
                         token_error *err)
{
    __atomic_store_n(&tk_event_fn, fn, __ATOMIC_RELEASE);
    __atomic_store_n(&tk_present_fn, present, __ATOMIC_RELEASE);
    pthread_mutex_lock(&recovery_lock);
    if (recovery_running) {
        pthread_mutex_unlock(&recovery_lock);
        return 0;
    }
    __atomic_store_n(&recovery_stop, 0, __ATOMIC_RELEASE);
    if (pthread_create(&recovery_thread, NULL, recovery_main, NULL) != 0) {
        pthread_mutex_unlock(&recovery_lock);
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot start the recovery thread");
        return -1;
    }
    recovery_running = 1;
    pthread_mutex_unlock(&recovery_lock);
    return 0;
}

void token_recovery_stop(void)
{
    struct timespec until;

    pthread_mutex_lock(&recovery_lock);
    if (!recovery_running) {
        pthread_mutex_unlock(&recovery_lock);
        return;
    }
    __atomic_store_n(&recovery_stop, 1, __ATOMIC_RELEASE);
    pthread_cond_signal(&recovery_cond);
    pthread_mutex_unlock(&recovery_lock);
    pthread_join(recovery_thread, NULL);
    /* A worker still inside a hung module after the bound is left there
     * (detached, its module kept): the process is on its way out. */
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += TK_WORKERS_STOP_MS / 1000;
    modules_each(module_stop_worker, &until);
    pthread_mutex_lock(&recovery_lock);
    recovery_running = 0;
    pthread_mutex_unlock(&recovery_lock);
    __atomic_store_n(&tk_event_fn, NULL, __ATOMIC_RELEASE);
    __atomic_store_n(&tk_present_fn, NULL, __ATOMIC_RELEASE);
}

/* CKR codes of a check operation that mean libp11's handles (its pooled
 * sessions, its key object, its login on them) are dead while the token
 * itself answers the probe: a rebuilt context serves again. */
static int ckr_stale(unsigned long rv)
{
    switch (rv) {
    case CKR_DEVICE_REMOVED: /* gone, and back by the probe */
    case CKR_KEY_HANDLE_INVALID:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_TOKEN_NOT_PRESENT: /* as CKR_DEVICE_REMOVED */
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return 1;
    default:
        return 0;
    }
}

/* What a known-answer test (check.c) made of a key whose operation failed
 * on a token that answers the probe. */
enum tk_verdict {
    TK_KEY_WORKS,     /* the failure was the operation's own */
    TK_KEY_STALE,     /* libp11's handles are dead: rebuild, retry */
    TK_KEY_FAILS,     /* the token fails the key's operations */
    TK_KEY_UNCHECKED, /* no slot for the check: err says why */
};

/* Runs the check on an operation slot of its own, queued like any
 * operation (libp11 must never wait for a session). why gets the reason
 * of TK_KEY_STALE and TK_KEY_FAILS. */
static enum tk_verdict key_answers(token_key *key, token_use use, char *why,
                                   size_t len, token_error *err)
{
    char ckr_text[64];
    unsigned long ckr;
    EVP_PKEY *pkey;
    int r;

    if (tk_acquire_slot(key, use, &pkey, 1, err) != 0)
        return TK_KEY_UNCHECKED;
    r = tk_key_known_answer(pkey, X509_get0_pubkey(key->cert), use, &ckr);
    token_key_release(key);
    /* A check that cannot be made leaves the verdict as it was before
     * there were checks: the operation's own failure. */
    if (r != 0)
        return TK_KEY_WORKS;
    if (ckr != 0)
        tk_ckr_describe(ckr, ckr_text, sizeof(ckr_text));
    else
        snprintf(ckr_text, sizeof(ckr_text), "a wrong result");
    if (ckr_stale(ckr)) {
        snprintf(why, len,
                 "the token's sessions are stale (a check operation got %s)",
                 ckr_text);
        return TK_KEY_STALE;
    }
    snprintf(why, len, "the token fails the key's %s operations too (%s)",
             use == TOKEN_USE_SIGN ? "signature" : "decryption", ckr_text);
    return TK_KEY_FAILS;
}

/* token_key_check_fault, whose state changes are told once it returns. */
static int check_fault(token_key *key, token_error *err)
{
    struct tk_token *t = key->token;
    struct tk_module *m = t->module;
    unsigned long gen = tk_op_last == t
                            ? tk_op_generation
                            : __atomic_load_n(&m->generation, __ATOMIC_ACQUIRE);
    char why[TK_REASON_LEN];
    enum tk_answer answer = TK_ANSWERS;
    enum tk_verdict verdict = TK_KEY_WORKS;
    int ready, rebuilt, down = 0;

    pthread_mutex_lock(&t->lock);
    ready = t->state == TK_READY;
    pthread_mutex_unlock(&t->lock);
    /* Another request's rebuild may be under way (it holds the module's
     * lock until it is done, and marks the token down just before it
     * starts): wait for its outcome before judging the token, as long as
     * the request would wait for a session. */
    if (!ready) {
        if (tk_module_lock(m, t->wait_ms) == 0)
            tk_module_unlock(m);
        pthread_mutex_lock(&t->lock);
        ready = t->state == TK_READY;
        pthread_mutex_unlock(&t->lock);
    }
    /* The context the operation used is gone: its failure says nothing
     * about the token, and the new context may serve it. */
    if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen && ready)
        goto retry;
    /* A token already down explains the failure without another probe. */
    if (ready) {
        answer = token_answers(t, why, sizeof(why));
        /* a rebuild ran while the probe waited for it */
        if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen)
            goto retry;
        if (answer == TK_ANSWERS) {
            /* The token answers; do libp11's handles? (check.c says why
             * a decryption cannot tell.) */
            verdict = key_answers(key, tk_op_use, why, sizeof(why), err);
            if (__atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) != gen)
                goto retry;
            if (verdict == TK_KEY_WORKS)
                return 0;
            if (verdict == TK_KEY_UNCHECKED)
                return -1;
            if (verdict == TK_KEY_FAILS) {
                pthread_mutex_lock(&t->lock);
                t->stats.faults++;
                pthread_mutex_unlock(&t->lock);
                tk_error(err, TOKEN_ERR_UNAVAILABLE, "key %s: %s", key->name,
                         why);
                return -1;
            }
        }
    }
    if (answer == TK_LOGGED_OUT || verdict == TK_KEY_STALE) {
        /* A reset: libp11's sessions are dead, the token is not. Rebuild
         * now, in this thread, so the operation can be retried; but not
         * behind a call hung inside the module: then the token is down
         * and the recovery loop's. */
        if (tk_module_lock(m, TK_HUNG_MS) < 0) {
            snprintf(why, sizeof(why),
                     "the module has been inside another call for over %d ms",
                     TK_HUNG_MS);
            answer = TK_SILENT;
            goto down;
        }
        rebuilt = __atomic_load_n(&m->generation, __ATOMIC_ACQUIRE) == gen;
        /* Straight from ready to recovering (module_rebuild): a token
         * marked down first, even for a moment, turned away the requests
         * that looked at it then (api_check_key) with 503 instead of
         * letting them wait for the rebuild. */
        if (rebuilt)
            module_rebuild(m);
        tk_module_unlock(m);
        pthread_mutex_lock(&t->lock);
        ready = t->state == TK_READY;
        pthread_mutex_unlock(&t->lock);
        /* Handles that are stale on the context just rebuilt for that
         * reason would have every request rebuild it again: such a token
         * is left to the recovery loop's back-off. */
        if (ready && rebuilt && verdict == TK_KEY_STALE) {
            verdict = key_answers(key, tk_op_use, why, sizeof(why), err);
            down = verdict == TK_KEY_STALE || verdict == TK_KEY_FAILS;
        }
        if (ready && !down)
            goto retry;
    }
down:
    pthread_mutex_lock(&t->lock);
    /* Another caller may have marked it down meanwhile; its reason
     * stands. */
    if ((answer == TK_SILENT || down) && t->state == TK_READY) {
        token_fault(t, why);
        t->backoff_s = 0;
        tk_schedule_recovery(t);
    }
    t->stats.faults++;
    tk_error(err, TOKEN_ERR_UNAVAILABLE, "token %s: %s", t->name,
             t->state == TK_RECOVERING ? "the token is being re-opened"
                                       : t->reason);
    pthread_mutex_unlock(&t->lock);
    return -1;
retry:
    pthread_mutex_lock(&t->lock);
    t->stats.retries++;
    pthread_mutex_unlock(&t->lock);
    /* For a caller that has retried once already and gives up. */
    tk_error(err, TOKEN_ERR_UNAVAILABLE,
             "token %s: re-opened under this request, and the operation "
             "failed again",
             t->name);
    return 1;
}

int token_key_check_fault(token_key *key, token_error *err)
{
    int r = check_fault(key, err);

    tk_events_flush();
    return r;
}
