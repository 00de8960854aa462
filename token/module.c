/*
 * The module registry: one libp11 context per loaded PKCS#11 module.
 *
 * There is one PKCS11_CTX per loaded module in the whole process, kept in a
 * reference-counted registry and shared by every token_set: a configuration
 * reload builds a new set while the old one still serves, and a second
 * context on the same module would C_Finalize it, or C_CloseAllSessions on
 * its slots, under the first one's feet, leaving libp11 with dead session
 * handles. Modules are matched by dlopen handle, so two paths to one file
 * share a context too. (While two sets overlap they may together ask for
 * more than 16 sessions on one slot; the excess waits in libp11 for
 * operations in flight, which is bounded.)
 *
 * Each module has a lock of its own for its libp11 calls (libp11 0.4.12
 * does not lock its per-slot key and certificate caches), so a module hung
 * inside a call stalls what needs that module and nothing else. The
 * registry lock guards only the list and the references, never a call.
 * Freeing a token and adding one to a module's list need the module's
 * lock; a thread that must not wait for a hung module leaves that to the
 * lock's next holder (tk_module_retire, tk_module_join_later).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_mutex_clocklock */
#endif
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>

#include "token/internal.h"

/* The module list, references and pending tokens (internal.h, lock 4). */
pthread_mutex_t tk_registry_lock = PTHREAD_MUTEX_INITIALIZER;
struct tk_module *tk_registry;

void tk_error(token_error *err, token_status status, const char *fmt, ...)
{
    va_list ap;

    ERR_clear_error();
    if (err == NULL)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

/* Describes why the last libp11 call failed and empties the error queue.
 * Returns the CKR code, 0 when the failure did not come from the module. */
unsigned long tk_libp11_failure(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    unsigned long rv = 0;

    if (e != 0 && (int)ERR_GET_LIB(e) == ERR_get_CKR_code()) {
        rv = (unsigned long)ERR_GET_REASON(e);
        tk_ckr_describe(rv, buf, len);
    } else if (e != 0 && ERR_reason_error_string(e) != NULL) {
        snprintf(buf, len, "%s", ERR_reason_error_string(e));
    } else {
        snprintf(buf, len, "unknown error");
    }
    ERR_clear_error();
    return rv;
}

/* ---- the module's lock ---- */

static long long now_ms(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

int tk_module_trylock(struct tk_module *m)
{
    if (pthread_mutex_trylock(&m->lock) != 0)
        return -1;
    __atomic_store_n(&m->held_since, now_ms(), __ATOMIC_RELAXED);
    return 0;
}

int tk_module_lock(struct tk_module *m, long bound_ms)
{
    struct timespec until;
    long long end;

    if (bound_ms < 0) {
        pthread_mutex_lock(&m->lock);
        __atomic_store_n(&m->held_since, now_ms(), __ATOMIC_RELAXED);
        return 0;
    }
    /* The bound runs from when the present holder took the lock, so a
     * holder hung for minutes is given up on at once; a new holder
     * starts it again. */
    while (tk_module_trylock(m) != 0) {
        end = __atomic_load_n(&m->held_since, __ATOMIC_RELAXED) + bound_ms;
        if (now_ms() >= end)
            return -1;
        until.tv_sec = (time_t)(end / 1000);
        until.tv_nsec = (long)(end % 1000) * 1000000L;
        if (pthread_mutex_clocklock(&m->lock, CLOCK_MONOTONIC, &until) == 0) {
            __atomic_store_n(&m->held_since, now_ms(), __ATOMIC_RELAXED);
            return 0;
        }
    }
    return 0;
}

/* Takes m's pending tokens off the list. */
static struct tk_token *pending_take(struct tk_module *m)
{
    struct tk_token *list, *t;

    pthread_mutex_lock(&tk_registry_lock);
    list = m->pending;
    m->pending = NULL;
    for (t = list; t != NULL; t = t->pending_next)
        t->on_pending = 0;
    pthread_mutex_unlock(&tk_registry_lock);
    return list;
}

static int pending_any(struct tk_module *m)
{
    int any;

    pthread_mutex_lock(&tk_registry_lock);
    any = m->pending != NULL;
    pthread_mutex_unlock(&tk_registry_lock);
    return any;
}

void tk_module_unlock(struct tk_module *m)
{
    struct tk_token *list, *t, *next;
    unsigned puts = 0;

    for (;;) {
        list = pending_take(m);
        for (t = list; t != NULL; t = next) {
            /* read before the list is left: a token taken off may be put
             * on again, as dead, by its set's free */
            next = t->pending_next;
            if (t->pending_dead) {
                tk_token_discard(t);
                puts++;
            } else if (tk_module_remember(m, t) < 0) {
                /* Without memory it stays out of the module's list: no
                 * rebuild re-opens it, as none could open it. */
                continue;
            }
        }
        if (list != NULL)
            continue;
        pthread_mutex_unlock(&m->lock);
        /* A token put on the list after it was last looked at found the
         * lock taken: its thread left it to this one. */
        if (!pending_any(m) || tk_module_trylock(m) != 0)
            break;
    }
    while (puts-- > 0)
        tk_module_put(m);
}

static void pending_push(struct tk_module *m, struct tk_token *t, int dead)
{
    pthread_mutex_lock(&tk_registry_lock);
    if (!t->on_pending) {
        t->pending_next = m->pending;
        m->pending = t;
        t->on_pending = 1;
    }
    t->pending_dead = dead;
    pthread_mutex_unlock(&tk_registry_lock);
    if (tk_module_trylock(m) == 0)
        tk_module_unlock(m);
}

void tk_module_join_later(struct tk_module *m, struct tk_token *t)
{
    pending_push(m, t, 0);
}

void tk_module_retire(struct tk_module *m, struct tk_token *t)
{
    pending_push(m, t, 1);
}

/* ---- modules ---- */

void tk_module_put(struct tk_module *m)
{
    struct tk_module **p;
    int last;

    if (m == NULL)
        return;
    pthread_mutex_lock(&tk_registry_lock);
    last = --m->refs == 0;
    if (last) {
        for (p = &tk_registry; *p != m; p = &(*p)->next)
            ;
        *p = m->next;
    }
    pthread_mutex_unlock(&tk_registry_lock);
    if (!last)
        return;
    /* Nobody else can reach it now: no lock is needed for its calls. */
    while (m->pins != NULL) {
        struct tk_pins *next = m->pins->next;

        OPENSSL_cleanse(m->pins, sizeof(*m->pins));
        free(m->pins);
        m->pins = next;
    }
    if (m->slots != NULL)
        PKCS11_release_all_slots(m->ctx, m->slots, m->nslots);
    if (m->loaded)
        PKCS11_CTX_unload(m->ctx);
    if (m->ctx != NULL)
        PKCS11_CTX_free(m->ctx);
    tk_probe_close(m->probe);
    if (m->calls_ready)
        pthread_rwlock_destroy(&m->calls);
    pthread_mutex_destroy(&m->lock);
    free(m->tokens);
    free(m->path);
    free(m);
}

/* The CK_FUNCTION_LIST libp11 calls through. libp11 0.4.12 has no accessor
 * for it; its private context (src/libp11-int.h, PKCS11_CTX_private)
 * starts with that pointer, "CK_FUNCTION_LIST_PTR method". Used only for a
 * module that hands each C_GetFunctionList caller an instance of its own
 * (p11-kit-client.so), where the probe and the login must go through
 * libp11's instance to see libp11's sessions; tk_probe_initialised checks
 * the result before it is trusted. */
static void *libp11_function_list(PKCS11_CTX *ctx)
{
    return ctx->_private != NULL ? *(void **)ctx->_private : NULL;
}

/* Writers first: probes come from every failed request, and a rebuild
 * must not wait behind a stream of them. */
static int module_init_lock(struct tk_module *m)
{
    pthread_rwlockattr_t attr;
    int ok;

    if (pthread_rwlockattr_init(&attr) != 0)
        return -1;
    ok = pthread_rwlockattr_setkind_np(
             &attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP) == 0 &&
         pthread_rwlock_init(&m->calls, &attr) == 0;
    pthread_rwlockattr_destroy(&attr);
    m->calls_ready = ok;
    return ok ? 0 : -1;
}

/* Loads the module into m->ctx and lists its slots. */
int tk_module_load(struct tk_module *m, token_error *err)
{
    char why[96];

    /* libp11 0.4.12's load sets these two without freeing what an earlier
     * load of the same context set: a rebuild would leak them. */
    OPENSSL_free(m->ctx->manufacturer);
    OPENSSL_free(m->ctx->description);
    m->ctx->manufacturer = NULL;
    m->ctx->description = NULL;
    if (PKCS11_CTX_load(m->ctx, m->path) < 0) {
        tk_libp11_failure(why, sizeof(why));
        tk_error(err, TOKEN_ERR_CONFIG,
                 "cannot initialise PKCS#11 module %s: %s", m->path, why);
        return -1;
    }
    m->loaded = 1;
    if (!tk_probe_initialised(m->probe)) {
        tk_probe_adopt(m->probe, libp11_function_list(m->ctx));
        if (!tk_probe_initialised(m->probe)) {
            tk_error(err, TOKEN_ERR_CONFIG,
                     "PKCS#11 module %s: its function list cannot be "
                     "reached beside libp11",
                     m->path);
            return -1;
        }
    }
    if (PKCS11_enumerate_slots(m->ctx, &m->slots, &m->nslots) < 0) {
        tk_libp11_failure(why, sizeof(why));
        m->slots = NULL;
        m->nslots = 0;
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 module %s: cannot list slots: %s", m->path, why);
        return -1;
    }
    return 0;
}

/* Makes m's libp11 context and loads it: the first holder of the lock
 * does, and again the next one if that failed. Under m->lock. */
static int module_init(struct tk_module *m, token_error *err)
{
    UI_METHOD *ui;

    if (m->ctx == NULL) {
        m->ctx = PKCS11_CTX_new();
        if (m->ctx == NULL) {
            tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
            return -1;
        }
        /* libp11 asks this UI for the PIN of a CKA_ALWAYS_AUTHENTICATE
         * key at each operation (see tk_ui_read). */
        ui = tk_login_ui_method();
        if (ui != NULL)
            PKCS11_set_ui_method(m->ctx, ui, NULL);
    }
    if (tk_module_load(m, err) < 0) {
        if (m->loaded)
            PKCS11_CTX_unload(m->ctx);
        m->loaded = 0;
        return -1;
    }
    m->initialised = 1;
    return 0;
}

/* A new module entry for probe, not yet loaded; NULL without memory. */
static struct tk_module *module_new(const char *path, tk_probe *probe)
{
    struct tk_module *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->path = strdup(path);
    if (m->path == NULL || pthread_mutex_init(&m->lock, NULL) != 0) {
        free(m->path);
        free(m);
        return NULL;
    }
    if (module_init_lock(m) < 0) {
        pthread_mutex_destroy(&m->lock);
        free(m->path);
        free(m);
        return NULL;
    }
    m->probe = probe;
    m->refs = 1;
    return m;
}

int tk_module_get(const char *path, struct tk_module **out, token_error *err)
{
    struct tk_module *m;
    tk_probe *probe;

    /* dlopen outside every lock: it runs the module's constructors. */
    probe = tk_probe_open(path, err);
    if (probe == NULL)
        return -1;
    pthread_mutex_lock(&tk_registry_lock);
    for (m = tk_registry; m != NULL; m = m->next) {
        if (tk_probe_same_module(m->probe, probe))
            break;
    }
    if (m != NULL) {
        m->refs++;
    } else {
        m = module_new(path, probe);
        if (m != NULL) {
            probe = NULL;
            m->next = tk_registry;
            tk_registry = m;
        }
    }
    pthread_mutex_unlock(&tk_registry_lock);
    tk_probe_close(probe);
    if (m == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        return -1;
    }
    if (tk_module_lock(m, TK_HUNG_MS) < 0) {
        *out = m;
        return 1;
    }
    if (!m->initialised && module_init(m, err) < 0) {
        tk_module_unlock(m);
        tk_module_put(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* An attribute the URI does not give matches anything. libp11 has already
 * cut the blank padding off the token's fixed-width fields. */
static int field_matches(const char *want, const char *have)
{
    return want == NULL || (have != NULL && strcmp(want, have) == 0);
}

int tk_slot_matches(const token_uri *u, PKCS11_SLOT *slot)
{
    const PKCS11_TOKEN *tok = slot->token;

    if (tok == NULL || !tok->initialized)
        return 0;
    if (u->has_slot_id && u->slot_id != PKCS11_get_slotid_from_slot(slot))
        return 0;
    return field_matches(u->token, tok->label) &&
           field_matches(u->manufacturer, tok->manufacturer) &&
           field_matches(u->serial, tok->serialnr) &&
           field_matches(u->model, tok->model);
}

int tk_module_remember(struct tk_module *m, struct tk_token *t)
{
    struct tk_token **tokens;

    tokens = realloc(m->tokens, (m->ntokens + 1) * sizeof(*tokens));
    if (tokens == NULL)
        return -1;
    m->tokens = tokens;
    m->tokens[m->ntokens++] = t;
    return 0;
}

void tk_module_forget(struct tk_module *m, const struct tk_token *t)
{
    size_t i;

    if (m == NULL)
        return;
    for (i = 0; i < m->ntokens; i++) {
        if (m->tokens[i] == t) {
            m->tokens[i] = m->tokens[--m->ntokens];
            return;
        }
    }
}

/* The one slot whose token the URI selects, or NULL. */
PKCS11_SLOT *tk_module_find_slot(struct tk_module *m, const token_uri *u)
{
    PKCS11_SLOT *slot = NULL;
    unsigned i, matches = 0;

    for (i = 0; i < m->nslots; i++) {
        if (tk_slot_matches(u, &m->slots[i])) {
            slot = &m->slots[i];
            matches++;
        }
    }
    return matches == 1 ? slot : NULL;
}
