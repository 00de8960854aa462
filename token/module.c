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
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>

#include "token/internal.h"

/* Guards the module list and every libp11 call that is not a key
 * operation: libp11 0.4.12 does not lock its per-slot key and certificate
 * caches, and token sets may be built and freed from different threads. */
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

/* ---- modules (tk_registry_lock held) ---- */

void tk_module_put(struct tk_module *m)
{
    struct tk_module **p;

    if (m == NULL || --m->refs > 0)
        return;
    for (p = &tk_registry; *p != m; p = &(*p)->next)
        ;
    *p = m->next;
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

/* A counted reference to the module at path, loaded and its slots listed
 * on first use. */
int tk_module_get(const char *path, struct tk_module **out, token_error *err)
{
    struct tk_module *m = NULL;
    UI_METHOD *ui;
    tk_probe *probe;
    int r = -1;

    probe = tk_probe_open(path, err);
    if (probe == NULL)
        goto out;
    for (m = tk_registry; m != NULL; m = m->next) {
        if (tk_probe_same_module(m->probe, probe))
            break;
    }
    if (m != NULL) {
        m->refs++;
        *out = m;
        m = NULL;
        r = 0;
        goto out;
    }
    m = calloc(1, sizeof(*m));
    if (m == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    m->probe = probe;
    probe = NULL;
    m->refs = 1;
    m->next = tk_registry;
    tk_registry = m;
    if (module_init_lock(m) < 0) {
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot create a lock");
        goto out;
    }
    m->path = strdup(path);
    m->ctx = PKCS11_CTX_new();
    if (m->path == NULL || m->ctx == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    /* libp11 asks this UI for the PIN of a CKA_ALWAYS_AUTHENTICATE key
     * at each operation (see tk_ui_read). */
    ui = tk_login_ui_method();
    if (ui != NULL)
        PKCS11_set_ui_method(m->ctx, ui, NULL);
    if (tk_module_load(m, err) < 0)
        goto out;
    *out = m;
    m = NULL;
    r = 0;
out:
    tk_module_put(m);
    tk_probe_close(probe);
    return r;
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
