/*
 * faulty_p11: a PKCS#11 module that stands in front of SoftHSMv2 so a test
 * can make C_OpenSession fail on demand.
 *
 * token/probe.c exists because libp11 0.4.12 waits forever when
 * C_OpenSession fails (with anything but CKR_SESSION_COUNT) on a slot it
 * has not used yet; see the top of token/token.c. A healthy SoftHSM token
 * never fails that call, and a broken reader cannot be had in a unit test,
 * so this module loads the real one and hands out a copy of its function
 * list with C_OpenSession replaced. With FAULTY_P11_FAIL_OPEN=1 in the
 * environment the replacement returns CKR_DEVICE_ERROR, as a dead reader
 * would; otherwise it forwards, so the same token also works through this
 * module and a test can tell the wrapper itself is not what breaks it.
 * Every other call reaches the real module untouched.
 *
 * FAULTY_P11_REAL names the real module (default: Debian's SoftHSMv2).
 * FAULTY_P11_FAIL_OPEN is read at each call, not at load.
 *
 * The PKCS#11 declarations are written out, as in token/probe.c, because
 * no pkcs11.h is installed; the layout is the PKCS#11 2.x ABI.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned long ck_ulong;
typedef ck_ulong ck_rv;

#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 0x05UL
#define CKR_DEVICE_ERROR 0x30UL

#define REAL_MODULE "/usr/lib/softhsm/libsofthsm2.so"

struct ck_version {
    unsigned char major;
    unsigned char minor;
};

typedef ck_rv (*ck_notify)(ck_ulong session, ck_ulong event, void *app);

/* Entries that are only copied, never called here. */
typedef void (*ck_any_fn)(void);

/* CK_FUNCTION_LIST: the version, then 68 function pointers in the order the
 * standard fixes. Only the two entries this module replaces are named. */
struct ck_function_list {
    struct ck_version version;
    ck_any_fn before_get_list[3]; /* C_Initialize .. C_GetInfo */
    ck_rv (*C_GetFunctionList)(struct ck_function_list **list);
    ck_any_fn before_open[8]; /* C_GetSlotList .. C_SetPIN */
    ck_rv (*C_OpenSession)(ck_ulong slot, ck_ulong flags, void *app,
                           ck_notify notify, ck_ulong *session);
    ck_any_fn after_open[55]; /* C_CloseSession .. C_WaitForSlotEvent */
};

_Static_assert(sizeof(struct ck_function_list) ==
                   offsetof(struct ck_function_list, before_get_list) +
                       68 * sizeof(ck_any_fn),
               "CK_FUNCTION_LIST holds 68 functions");

typedef ck_rv (*ck_get_function_list)(struct ck_function_list **list);

/* The only symbol libp11 and token/probe.c look up. */
ck_rv C_GetFunctionList(struct ck_function_list **list);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static struct ck_function_list *real; /* the real module's list */
static struct ck_function_list wrapped;

static ck_rv open_session(ck_ulong slot, ck_ulong flags, void *app,
                          ck_notify notify, ck_ulong *session)
{
    const char *fail = getenv("FAULTY_P11_FAIL_OPEN");

    if (fail != NULL && strcmp(fail, "1") == 0)
        return CKR_DEVICE_ERROR;
    return real->C_OpenSession(slot, flags, app, notify, session);
}

/* Once per process: libp11 and the probe each ask for the list, and must
 * get the same one. The real module is never closed, since the copy points
 * into it. */
static void load_real(void)
{
    const char *path = getenv("FAULTY_P11_REAL");
    ck_get_function_list get_list;
    void *handle, *sym;

    if (path == NULL || path[0] == '\0')
        path = REAL_MODULE;
    handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    sym = handle != NULL ? dlsym(handle, "C_GetFunctionList") : NULL;
    if (sym == NULL) {
        fprintf(stderr, "faulty_p11: %s\n", dlerror());
        return;
    }
    /* ISO C has no conversion from void * to a function pointer. */
    memcpy(&get_list, &sym, sizeof(get_list));
    if (get_list(&real) != CKR_OK || real == NULL) {
        fprintf(stderr, "faulty_p11: C_GetFunctionList of %s failed\n", path);
        real = NULL;
        return;
    }
    wrapped = *real;
    wrapped.C_GetFunctionList = C_GetFunctionList;
    wrapped.C_OpenSession = open_session;
}

ck_rv C_GetFunctionList(struct ck_function_list **list)
{
    pthread_once(&once, load_real);
    if (real == NULL)
        return CKR_GENERAL_ERROR;
    *list = &wrapped;
    return CKR_OK;
}
