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
 * The few PKCS#11 declarations needed are written out here rather than
 * taken from a pkcs11.h: libp11-dev ships none, and the layouts are fixed by
 * the PKCS#11 2.x ABI (natural alignment on Unix).
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "token/internal.h"

typedef unsigned long ck_ulong;
typedef ck_ulong ck_rv;

#define CKR_OK 0UL
#define CKR_USER_ALREADY_LOGGED_IN 0x100UL
#define CKR_CRYPTOKI_NOT_INITIALIZED 0x190UL
#define CKF_SERIAL_SESSION 0x4UL
#define CKF_USER_PIN_LOCKED 0x40000UL
#define CKU_USER 1UL
#define CKS_RO_USER_FUNCTIONS 1UL
#define CKS_RW_USER_FUNCTIONS 3UL
#define CK_UNAVAILABLE_INFORMATION (~0UL)

struct ck_version {
    unsigned char major;
    unsigned char minor;
};

struct ck_token_info {
    unsigned char label[32];
    unsigned char manufacturer_id[32];
    unsigned char model[16];
    unsigned char serial_number[16];
    ck_ulong flags;
    ck_ulong max_session_count;
    ck_ulong session_count;
    ck_ulong max_rw_session_count;
    ck_ulong rw_session_count;
    ck_ulong max_pin_len;
    ck_ulong min_pin_len;
    ck_ulong total_public_memory;
    ck_ulong free_public_memory;
    ck_ulong total_private_memory;
    ck_ulong free_private_memory;
    struct ck_version hardware_version;
    struct ck_version firmware_version;
    unsigned char utc_time[16];
};

struct ck_session_info {
    ck_ulong slot_id;
    ck_ulong state;
    ck_ulong flags;
    ck_ulong device_error;
};

typedef ck_rv (*ck_notify)(ck_ulong session, ck_ulong event, void *app);

/* The head of CK_FUNCTION_LIST, up to the last entry used here; the module
 * owns the full table and it is only ever read through this pointer. */
struct ck_function_list_head {
    struct ck_version version;
    ck_rv (*C_Initialize)(void *args);
    ck_rv (*C_Finalize)(void *reserved);
    ck_rv (*C_GetInfo)(void *info);
    ck_rv (*C_GetFunctionList)(void *list);
    ck_rv (*C_GetSlotList)(unsigned char present, ck_ulong *slots,
                           ck_ulong *count);
    ck_rv (*C_GetSlotInfo)(ck_ulong slot, void *info);
    ck_rv (*C_GetTokenInfo)(ck_ulong slot, struct ck_token_info *info);
    ck_rv (*C_GetMechanismList)(ck_ulong slot, ck_ulong *list, ck_ulong *count);
    ck_rv (*C_GetMechanismInfo)(ck_ulong slot, ck_ulong type, void *info);
    ck_rv (*C_InitToken)(ck_ulong slot, unsigned char *pin, ck_ulong len,
                         unsigned char *label);
    ck_rv (*C_InitPIN)(ck_ulong session, unsigned char *pin, ck_ulong len);
    ck_rv (*C_SetPIN)(ck_ulong session, unsigned char *old_pin,
                      ck_ulong old_len, unsigned char *new_pin,
                      ck_ulong new_len);
    ck_rv (*C_OpenSession)(ck_ulong slot, ck_ulong flags, void *app,
                           ck_notify notify, ck_ulong *session);
    ck_rv (*C_CloseSession)(ck_ulong session);
    ck_rv (*C_CloseAllSessions)(ck_ulong slot);
    ck_rv (*C_GetSessionInfo)(ck_ulong session, struct ck_session_info *info);
    ck_rv (*C_GetOperationState)(ck_ulong session, unsigned char *state,
                                 ck_ulong *len);
    ck_rv (*C_SetOperationState)(ck_ulong session, unsigned char *state,
                                 ck_ulong len, ck_ulong enc_key,
                                 ck_ulong auth_key);
    ck_rv (*C_Login)(ck_ulong session, ck_ulong user, unsigned char *pin,
                     ck_ulong len);
};

typedef ck_rv (*ck_get_function_list)(struct ck_function_list_head **list);

struct tk_probe {
    void *handle;
    struct ck_function_list_head *funcs;
};

tk_probe *tk_probe_open(const char *path, token_error *err)
{
    tk_probe *probe = NULL;
    tk_probe *p = NULL;
    ck_get_function_list get_list;
    const char *why;
    void *sym;
    ck_rv rv;

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

/* CK_INFO: two versions, two 32-byte strings and the flags between them. */
struct ck_info {
    struct ck_version cryptoki_version;
    unsigned char manufacturer_id[32];
    ck_ulong flags;
    unsigned char library_description[32];
    struct ck_version library_version;
};

int tk_probe_initialised(const tk_probe *probe)
{
    struct ck_info info;

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
    struct ck_session_info session_info;
    struct ck_token_info info;
    ck_ulong session;
    ck_rv rv;

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
    state->max_sessions = info.max_session_count == CK_UNAVAILABLE_INFORMATION
                              ? 0
                              : info.max_session_count;
    state->pin_locked = (info.flags & CKF_USER_PIN_LOCKED) != 0;
    state->logged_in = session_info.state == CKS_RO_USER_FUNCTIONS ||
                       session_info.state == CKS_RW_USER_FUNCTIONS;
    return CKR_OK;
}

unsigned long tk_probe_login(const tk_probe *probe, unsigned long slot_id,
                             const char *pin, unsigned long *session)
{
    ck_ulong s;
    ck_rv rv;

    rv = probe->funcs->C_OpenSession(slot_id, CKF_SERIAL_SESSION, NULL, NULL,
                                     &s);
    if (rv != CKR_OK)
        return rv;
    /* The module only reads the PIN; PKCS#11 2.x just lacks the const. */
    rv = probe->funcs->C_Login(s, CKU_USER, (unsigned char *)pin,
                               (ck_ulong)strlen(pin));
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
    ck_ulong *list = NULL, count = 0, i;
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

static const struct {
    unsigned long rv;
    const char *name;
} ckr_names[] = {
    {0x00, "CKR_OK"},
    {0x01, "CKR_CANCEL"},
    {0x02, "CKR_HOST_MEMORY"},
    {0x03, "CKR_SLOT_ID_INVALID"},
    {0x05, "CKR_GENERAL_ERROR"},
    {0x06, "CKR_FUNCTION_FAILED"},
    {0x07, "CKR_ARGUMENTS_BAD"},
    {0x30, "CKR_DEVICE_ERROR"},
    {0x31, "CKR_DEVICE_MEMORY"},
    {0x32, "CKR_DEVICE_REMOVED"},
    {0x40, "CKR_ENCRYPTED_DATA_INVALID"},
    {0x54, "CKR_FUNCTION_NOT_SUPPORTED"},
    {0x60, "CKR_KEY_HANDLE_INVALID"},
    {0x68, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
    {0x70, "CKR_MECHANISM_INVALID"},
    {0x82, "CKR_OBJECT_HANDLE_INVALID"},
    {0xa0, "CKR_PIN_INCORRECT"},
    {0xa1, "CKR_PIN_INVALID"},
    {0xa2, "CKR_PIN_LEN_RANGE"},
    {0xa3, "CKR_PIN_EXPIRED"},
    {0xa4, "CKR_PIN_LOCKED"},
    {0xb0, "CKR_SESSION_CLOSED"},
    {0xb1, "CKR_SESSION_COUNT"},
    {0xb3, "CKR_SESSION_HANDLE_INVALID"},
    {0xb4, "CKR_SESSION_PARALLEL_NOT_SUPPORTED"},
    {0xe0, "CKR_TOKEN_NOT_PRESENT"},
    {0xe1, "CKR_TOKEN_NOT_RECOGNIZED"},
    {0x100, "CKR_USER_ALREADY_LOGGED_IN"},
    {0x101, "CKR_USER_NOT_LOGGED_IN"},
    {0x102, "CKR_USER_PIN_NOT_INITIALIZED"},
    {0x103, "CKR_USER_TYPE_INVALID"},
    {0x190, "CKR_CRYPTOKI_NOT_INITIALIZED"},
    {0x191, "CKR_CRYPTOKI_ALREADY_INITIALIZED"},
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
