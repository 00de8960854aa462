/*
 * A session probe, and the login, that go around libp11.
 *
 * libp11 0.4.12 hands out sessions from a per-slot pool
 * (pkcs11_get_session in src/p11_slot.c): when the pool is empty and fewer
 * than 16 sessions exist it calls C_OpenSession, and when that fails with
 * anything but CKR_SESSION_COUNT it falls through to pthread_cond_wait
 * without a timeout. On a fresh context nothing is in flight to signal that
 * condition, so the first login or object enumeration on a token whose
 * sessions cannot be opened (absent card, broken reader, a module out of
 * sessions) blocks its thread forever. Opening one session ourselves first,
 * through the module's own function list, turns that into a CKR code we can
 * report while libp11 is still untouched. The same probe, run later, tells
 * whether a token that failed an operation still answers.
 *
 * The login goes through the function list too, so that libp11 never sees
 * the PIN: PKCS11_login keeps a copy (slot->prev_pin) for the life of the
 * slot, to log in again after a fork. A PKCS#11 login belongs to the
 * application, not to the session it was made on, and lasts until the
 * application's last session on the token closes; libp11 0.4.12 reads its
 * own slot->logged_in only in PKCS11_login, PKCS11_logout,
 * PKCS11_is_logged_in and its after-fork reload, none of which token/ calls.
 *
 * dlopen of the path libp11 loads returns the same, already initialised
 * module, so this needs no C_Initialize of its own.
 *
 * The PKCS#11 declarations come from p11-kit's pkcs11.h (through
 * internal.h): libp11-dev ships none.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "token/internal.h"

struct tk_probe {
    void *handle;
    CK_FUNCTION_LIST_PTR funcs;
};

tk_probe *tk_probe_open(const char *path, token_error *err)
{
    tk_probe *probe = NULL;
    tk_probe *p = NULL;
    CK_C_GetFunctionList get_list;
    const char *why;
    void *sym;
    CK_RV rv;

    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        goto out;
    }
    /* RTLD_NOW: a module with unresolved symbols fails here, with a reason,
     * instead of at its first call. */
    p->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (p->handle == NULL) {
        why = dlerror();
        tk_error(err, TOKEN_ERR_CONFIG, "cannot load PKCS#11 module %s: %s",
                 path, why != NULL ? why : "unknown error");
        goto out;
    }
    sym = dlsym(p->handle, "C_GetFunctionList");
    if (sym == NULL) {
        tk_error(err, TOKEN_ERR_CONFIG,
                 "%s is not a PKCS#11 module (no C_GetFunctionList)", path);
        goto out;
    }
    /* ISO C has no conversion from void * to a function pointer. */
    memcpy(&get_list, &sym, sizeof(get_list));
    rv = get_list(&p->funcs);
    if (rv != CKR_OK || p->funcs == NULL) {
        char ckr[64];

        tk_ckr_describe(rv, ckr, sizeof(ckr));
        tk_error(err, TOKEN_ERR_CONFIG,
                 "PKCS#11 module %s: C_GetFunctionList failed: %s", path, ckr);
        goto out;
    }
    probe = p;
    p = NULL;
out:
    tk_probe_close(p);
    return probe;
}

void tk_probe_close(tk_probe *probe)
{
    if (probe == NULL)
        return;
    if (probe->handle != NULL)
        dlclose(probe->handle);
    free(probe);
}

int tk_probe_same_module(const tk_probe *a, const tk_probe *b)
{
    return a->handle == b->handle;
}

int tk_probe_initialised(const tk_probe *probe)
{
    CK_INFO info;

    return probe->funcs->C_GetInfo(&info) != CKR_CRYPTOKI_NOT_INITIALIZED;
}

void tk_probe_adopt(tk_probe *probe, void *function_list)
{
    if (function_list != NULL)
        probe->funcs = function_list;
}

unsigned long tk_probe_session(const tk_probe *probe, unsigned long slot_id,
                               tk_token_state *state)
{
    CK_SESSION_INFO session_info;
    CK_TOKEN_INFO info;
    CK_SESSION_HANDLE session;
    CK_RV rv;

    rv = probe->funcs->C_GetTokenInfo(slot_id, &info);
    if (rv != CKR_OK)
        return rv;
    rv = probe->funcs->C_OpenSession(slot_id, CKF_SERIAL_SESSION, NULL, NULL,
                                     &session);
    if (rv != CKR_OK)
        return rv;
    /* The login state is the application's, so any session shows it. */
    rv = probe->funcs->C_GetSessionInfo(session, &session_info);
    /* A failed close leaves one stray session until the module is
     * finalised; the probe's answer, that sessions can be opened, holds.
     * Closing it never ends our login: from the login on, libp11 holds
     * sessions of its own on the token (see tk_probe_login). */
    probe->funcs->C_CloseSession(session);
    if (rv != CKR_OK)
        return rv;
    state->max_sessions = info.ulMaxSessionCount == CK_UNAVAILABLE_INFORMATION
                              ? 0
                              : info.ulMaxSessionCount;
    state->pin_locked = (info.flags & CKF_USER_PIN_LOCKED) != 0;
    state->logged_in = session_info.state == CKS_RO_USER_FUNCTIONS ||
                       session_info.state == CKS_RW_USER_FUNCTIONS;
    return CKR_OK;
}

unsigned long tk_probe_login(const tk_probe *probe, unsigned long slot_id,
                             const char *pin, unsigned long *session)
{
    CK_SESSION_HANDLE s;
    CK_RV rv;

    rv = probe->funcs->C_OpenSession(slot_id, CKF_SERIAL_SESSION, NULL, NULL,
                                     &s);
    if (rv != CKR_OK)
        return rv;
    /* The module only reads the PIN; PKCS#11 2.x just lacks the const. */
    rv = probe->funcs->C_Login(s, CKU_USER, (unsigned char *)pin,
                               (CK_ULONG)strlen(pin));
    if (rv == CKR_USER_ALREADY_LOGGED_IN)
        rv = CKR_OK;
    if (rv != CKR_OK) {
        probe->funcs->C_CloseSession(s);
        return rv;
    }
    *session = s;
    return CKR_OK;
}

void tk_probe_end_session(const tk_probe *probe, unsigned long session)
{
    probe->funcs->C_CloseSession(session);
}

int tk_probe_has_mechanism(const tk_probe *probe, unsigned long slot_id,
                           unsigned long mechanism)
{
    CK_MECHANISM_TYPE *list = NULL;
    CK_ULONG count = 0, i;
    int r = -1;

    if (probe->funcs->C_GetMechanismList(slot_id, NULL, &count) != CKR_OK)
        return -1;
    /* + 1: a token without mechanisms must not turn this into calloc(0) */
    list = calloc(count + 1, sizeof(*list));
    if (list == NULL ||
        probe->funcs->C_GetMechanismList(slot_id, list, &count) != CKR_OK)
        goto out;
    r = 0;
    for (i = 0; i < count && r == 0; i++)
        r = list[i] == mechanism;
out:
    free(list);
    return r;
}

#define CKR_NAME(rv)                                                           \
    {                                                                          \
        rv, #rv                                                                \
    }

static const struct {
    unsigned long rv;
    const char *name;
} ckr_names[] = {
    CKR_NAME(CKR_OK),
    CKR_NAME(CKR_CANCEL),
    CKR_NAME(CKR_HOST_MEMORY),
    CKR_NAME(CKR_SLOT_ID_INVALID),
    CKR_NAME(CKR_GENERAL_ERROR),
    CKR_NAME(CKR_FUNCTION_FAILED),
    CKR_NAME(CKR_ARGUMENTS_BAD),
    CKR_NAME(CKR_DEVICE_ERROR),
    CKR_NAME(CKR_DEVICE_MEMORY),
    CKR_NAME(CKR_DEVICE_REMOVED),
    CKR_NAME(CKR_ENCRYPTED_DATA_INVALID),
    CKR_NAME(CKR_FUNCTION_NOT_SUPPORTED),
    CKR_NAME(CKR_KEY_HANDLE_INVALID),
    CKR_NAME(CKR_KEY_FUNCTION_NOT_PERMITTED),
    CKR_NAME(CKR_MECHANISM_INVALID),
    CKR_NAME(CKR_OBJECT_HANDLE_INVALID),
    CKR_NAME(CKR_PIN_INCORRECT),
    CKR_NAME(CKR_PIN_INVALID),
    CKR_NAME(CKR_PIN_LEN_RANGE),
    CKR_NAME(CKR_PIN_EXPIRED),
    CKR_NAME(CKR_PIN_LOCKED),
    CKR_NAME(CKR_SESSION_CLOSED),
    CKR_NAME(CKR_SESSION_COUNT),
    CKR_NAME(CKR_SESSION_HANDLE_INVALID),
    CKR_NAME(CKR_SESSION_PARALLEL_NOT_SUPPORTED),
    CKR_NAME(CKR_TOKEN_NOT_PRESENT),
    CKR_NAME(CKR_TOKEN_NOT_RECOGNIZED),
    CKR_NAME(CKR_USER_ALREADY_LOGGED_IN),
    CKR_NAME(CKR_USER_NOT_LOGGED_IN),
    CKR_NAME(CKR_USER_PIN_NOT_INITIALIZED),
    CKR_NAME(CKR_USER_TYPE_INVALID),
    CKR_NAME(CKR_CRYPTOKI_NOT_INITIALIZED),
    CKR_NAME(CKR_CRYPTOKI_ALREADY_INITIALIZED),
};

void tk_ckr_describe(unsigned long rv, char *buf, size_t len)
{
    size_t i;

    for (i = 0; i < sizeof(ckr_names) / sizeof(ckr_names[0]); i++) {
        if (ckr_names[i].rv == rv) {
            snprintf(buf, len, "%s (0x%lx)", ckr_names[i].name, rv);
            return;
        }
    }
    snprintf(buf, len, "CKR 0x%lx", rv);
}
