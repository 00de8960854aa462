/*
 * faulty_p11: a PKCS#11 module that stands in front of SoftHSMv2 so a test
 * can make it fail on demand, at load or at any later moment.
 *
 * token/probe.c exists because libp11 0.4.12 waits forever when
 * C_OpenSession fails (with anything but CKR_SESSION_COUNT) on a slot it
 * has not used yet; see the top of token/set.c. And a token that breaks
 * at run time must be noticed by token_key_check_fault. A healthy SoftHSM
 * token never fails, and a broken reader cannot be had in a unit test, so
 * this module loads the real one and hands out a copy of its function list
 * with a few entries replaced; everything else reaches the real module
 * untouched, so the same token also works through this module and a test
 * can tell the wrapper itself is not what breaks it.
 *
 * FAULTY_P11_REAL names the real module (default: Debian's SoftHSMv2).
 * The rest is read at each call, not at load:
 *
 * FAULTY_P11_FAIL_OPEN=1 makes C_OpenSession return CKR_DEVICE_ERROR, as a
 * dead reader would.
 *
 * FAULTY_P11_FLAG names a file; while it exists, its first word says what
 * fails, and a number after it is an argument:
 *
 *   removed        C_OpenSession and the start of every private-key
 *                  operation (C_SignInit, C_DecryptInit, C_DeriveKey)
 *                  return CKR_DEVICE_REMOVED, as a pulled token would.
 *   not_present    the slot reports no token: C_GetSlotInfo clears
 *                  CKF_TOKEN_PRESENT, C_GetTokenInfo, C_OpenSession and the
 *                  key operations return CKR_TOKEN_NOT_PRESENT.
 *   refuse         only the key operations fail, with
 *                  CKR_KEY_FUNCTION_NOT_PERMITTED, while the token answers
 *                  everything else: an operation's own failure.
 *   session_invalid  once per write of the file: every session of the
 *                  real module is closed (C_CloseAllSessions on each slot),
 *                  as a token reset does. SoftHSM itself then answers
 *                  CKR_SESSION_HANDLE_INVALID for the handles libp11 keeps,
 *                  and the process is logged out.
 *   not_logged_in  once per write: the process is logged out (C_Logout),
 *                  as a token that dropped its login state; SoftHSM then
 *                  answers CKR_USER_NOT_LOGGED_IN for private-key
 *                  operations on the sessions that stay open.
 *   stale          once per write: every session opened through this
 *                  module so far goes stale: a key operation started on
 *                  one fails with CKR_SESSION_HANDLE_INVALID, while the
 *                  real sessions stay open, so the process stays logged
 *                  in and a new session works. A reset whose middleware
 *                  restores the login but not the handles (an HSM that
 *                  fails over to its twin): libp11's pooled sessions are
 *                  dead, and a probe on a session of its own sees nothing
 *                  wrong. A session handle opened again, C_CloseAllSessions
 *                  and C_Finalize clear the mark.
 *   latency N      each key operation start waits N ms first.
 *   block          each key operation start waits until the file no
 *                  longer says "block" (a hung card); then it proceeds.
 *   block_probe    C_GetTokenInfo, C_OpenSession and C_GetSessionInfo
 *                  wait until the file no longer says "block_probe", then
 *                  proceed: a module hung inside the calls a probe, a
 *                  login or a rebuild's slot listing make. Each wait
 *                  starts by logging "block_probe NAME" (FAULTY_P11_LOG),
 *                  so a test knows a call is held.
 *   pin_code N     C_Login as the user answers N (e.g. 0xa2,
 *                  CKR_PIN_LEN_RANGE) without asking the real module: the
 *                  refusals SoftHSM never gives (it says CKR_PIN_INCORRECT
 *                  to any wrong PIN).
 *
 * Only the calls that start an operation fail, never C_Sign or C_Decrypt
 * in the middle of one, so no operation is left half started in a session
 * libp11 reuses. A test writes the file by renaming a new one over it, so
 * every write is a new inode: that is how a one-shot command tells a new
 * write from the one it has already carried out.
 *
 * FAULTY_P11_LOG names a file to which each C_OpenSession and C_Login call
 * appends a line with its name, failed or not, so a test can count them;
 * a context-specific login (CKU_CONTEXT_SPECIFIC, a key with
 * CKA_ALWAYS_AUTHENTICATE) is logged as "C_Login context".
 *
 * The PKCS#11 declarations are p11-kit's pkcs11.h, as in token/.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define REAL_MODULE "/usr/lib/softhsm/libsofthsm2.so"

static pthread_once_t once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR real; /* the real module's list */
static CK_FUNCTION_LIST wrapped;

enum fault {
    FAULT_NONE,
    FAULT_REMOVED,
    FAULT_NOT_PRESENT,
    FAULT_REFUSE,
    FAULT_SESSION_INVALID,
    FAULT_NOT_LOGGED_IN,
    FAULT_STALE,
    FAULT_LATENCY,
    FAULT_BLOCK,
    FAULT_BLOCK_PROBE,
    FAULT_PIN_CODE,
};

static const struct {
    const char *word;
    enum fault fault;
} fault_words[] = {
    {"removed", FAULT_REMOVED},
    {"not_present", FAULT_NOT_PRESENT},
    {"refuse", FAULT_REFUSE},
    {"session_invalid", FAULT_SESSION_INVALID},
    {"not_logged_in", FAULT_NOT_LOGGED_IN},
    {"stale", FAULT_STALE},
    {"latency", FAULT_LATENCY},
    {"block", FAULT_BLOCK},
    {"block_probe", FAULT_BLOCK_PROBE},
    {"pin_code", FAULT_PIN_CODE},
};

/* The write of the flag file whose one-shot command was carried out. */
static pthread_mutex_t shot_lock = PTHREAD_MUTEX_INITIALIZER;
static struct stat shot_done;

static void reset_tokens(enum fault fault);

/* The sessions opened through this module and not closed since, and
 * whether each went stale. A linear table: a test opens a few dozen. */
#define MAX_TRACKED 1024

static pthread_mutex_t sessions_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tracked {
    CK_SESSION_HANDLE handle;
    CK_SLOT_ID slot;
    int stale;
} tracked[MAX_TRACKED];
static size_t ntracked;

static void track_open(CK_SLOT_ID slot, CK_SESSION_HANDLE handle)
{
    size_t i;

    pthread_mutex_lock(&sessions_lock);
    for (i = 0; i < ntracked && tracked[i].handle != handle; i++)
        ;
    if (i == ntracked && ntracked < MAX_TRACKED)
        ntracked++;
    if (i < ntracked)
        tracked[i] = (struct tracked){handle, slot, 0};
    pthread_mutex_unlock(&sessions_lock);
}

/* Forgets one session, or (all) every session of slot. */
static void track_close(CK_ULONG slot_or_handle, int all)
{
    size_t i = 0;

    pthread_mutex_lock(&sessions_lock);
    while (i < ntracked) {
        if (all ? tracked[i].slot == slot_or_handle
                : tracked[i].handle == slot_or_handle)
            tracked[i] = tracked[--ntracked];
        else
            i++;
    }
    pthread_mutex_unlock(&sessions_lock);
}

static void track_stale_all(void)
{
    size_t i;

    pthread_mutex_lock(&sessions_lock);
    for (i = 0; i < ntracked; i++)
        tracked[i].stale = 1;
    pthread_mutex_unlock(&sessions_lock);
}

static int session_stale(CK_SESSION_HANDLE handle)
{
    size_t i;
    int stale = 0;

    pthread_mutex_lock(&sessions_lock);
    for (i = 0; i < ntracked; i++) {
        if (tracked[i].handle == handle)
            stale = tracked[i].stale;
    }
    pthread_mutex_unlock(&sessions_lock);
    return stale;
}

/* What the flag file asks for now; *arg gets its number (0 without).
 * A one-shot command is carried out here, by the first call that sees a
 * new write of the file. */
static enum fault fault_now(long *arg)
{
    const char *path = getenv("FAULTY_P11_FLAG");
    enum fault fault = FAULT_NONE;
    char word[24] = "";
    struct stat st;
    long n = 0;
    size_t i;
    FILE *f;

    if (path == NULL || (f = fopen(path, "r")) == NULL)
        return FAULT_NONE;
    if (fscanf(f, "%23s %li", word, &n) < 1)
        word[0] = '\0';
    if (fstat(fileno(f), &st) != 0)
        memset(&st, 0, sizeof(st));
    fclose(f);
    for (i = 0; i < sizeof(fault_words) / sizeof(fault_words[0]); i++) {
        if (strcmp(word, fault_words[i].word) == 0)
            fault = fault_words[i].fault;
    }
    if (arg != NULL)
        *arg = n;
    if (fault == FAULT_SESSION_INVALID || fault == FAULT_NOT_LOGGED_IN ||
        fault == FAULT_STALE) {
        pthread_mutex_lock(&shot_lock);
        if (st.st_ino != shot_done.st_ino ||
            st.st_mtim.tv_sec != shot_done.st_mtim.tv_sec ||
            st.st_mtim.tv_nsec != shot_done.st_mtim.tv_nsec) {
            shot_done = st;
            reset_tokens(fault);
        }
        pthread_mutex_unlock(&shot_lock);
        fault = FAULT_NONE;
    }
    return fault;
}

static void log_call(const char *name)
{
    const char *path = getenv("FAULTY_P11_LOG");
    char line[40];
    int fd, n;

    if (path == NULL)
        return;
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    n = snprintf(line, sizeof(line), "%s\n", name);
    /* One write to an O_APPEND file: lines from threads do not mix. */
    if (write(fd, line, (size_t)n) != n)
        fprintf(stderr, "faulty_p11: cannot log to %s\n", path);
    close(fd);
}

/* Closes every session of every token, logs the process out of each, or
 * marks the sessions handed out so far stale. */
static void reset_tokens(enum fault fault)
{
    CK_SLOT_ID slots[16];
    CK_ULONG count = 16, i;
    CK_SESSION_HANDLE session;

    if (fault == FAULT_STALE) {
        track_stale_all();
        return;
    }
    if (real->C_GetSlotList(1, slots, &count) != CKR_OK)
        return;
    for (i = 0; i < count && i < 16; i++) {
        if (fault == FAULT_SESSION_INVALID) {
            track_close(slots[i], 1);
            real->C_CloseAllSessions(slots[i]);
        } else if (real->C_OpenSession(slots[i], CKF_SERIAL_SESSION, NULL, NULL,
                                       &session) == CKR_OK) {
            real->C_Logout(session);
            real->C_CloseSession(session);
        }
    }
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* CKR_OK when a key operation may start on session. */
static CK_RV key_operation_fault(CK_SESSION_HANDLE session)
{
    long arg;
    enum fault fault = fault_now(&arg);

    if (session_stale(session))
        return CKR_SESSION_HANDLE_INVALID;
    switch (fault) {
    case FAULT_REMOVED:
        return CKR_DEVICE_REMOVED;
    case FAULT_NOT_PRESENT:
        return CKR_TOKEN_NOT_PRESENT;
    case FAULT_REFUSE:
        return CKR_KEY_FUNCTION_NOT_PERMITTED;
    case FAULT_LATENCY:
        if (arg > 0)
            sleep_ms(arg);
        break;
    case FAULT_BLOCK:
        while (fault_now(NULL) == FAULT_BLOCK)
            sleep_ms(10);
        break;
    default:
        break;
    }
    return CKR_OK;
}

/* block_probe: holds the call named while the flag file says so. */
static void hold_probe_call(const char *name)
{
    char line[40];

    if (fault_now(NULL) != FAULT_BLOCK_PROBE)
        return;
    snprintf(line, sizeof(line), "block_probe %s", name);
    log_call(line);
    while (fault_now(NULL) == FAULT_BLOCK_PROBE)
        sleep_ms(10);
}

static CK_RV get_slot_info(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
    CK_RV rv = real->C_GetSlotInfo(slot, info);

    if (rv == CKR_OK && fault_now(NULL) == FAULT_NOT_PRESENT)
        info->flags &= ~CKF_TOKEN_PRESENT;
    return rv;
}

static CK_RV get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    hold_probe_call("C_GetTokenInfo");
    if (fault_now(NULL) == FAULT_NOT_PRESENT)
        return CKR_TOKEN_NOT_PRESENT;
    return real->C_GetTokenInfo(slot, info);
}

static CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags, void *app,
                          CK_NOTIFY notify, CK_SESSION_HANDLE_PTR session)
{
    const char *fail = getenv("FAULTY_P11_FAIL_OPEN");
    CK_RV rv;

    log_call("C_OpenSession");
    hold_probe_call("C_OpenSession");
    if (fail != NULL && strcmp(fail, "1") == 0)
        return CKR_DEVICE_ERROR;
    switch (fault_now(NULL)) {
    case FAULT_REMOVED:
        return CKR_DEVICE_REMOVED;
    case FAULT_NOT_PRESENT:
        return CKR_TOKEN_NOT_PRESENT;
    default:
        break;
    }
    rv = real->C_OpenSession(slot, flags, app, notify, session);
    if (rv == CKR_OK)
        track_open(slot, *session);
    return rv;
}

static CK_RV get_session_info(CK_SESSION_HANDLE session,
                              CK_SESSION_INFO_PTR info)
{
    hold_probe_call("C_GetSessionInfo");
    return real->C_GetSessionInfo(session, info);
}

static CK_RV close_session(CK_SESSION_HANDLE session)
{
    track_close(session, 0);
    return real->C_CloseSession(session);
}

static CK_RV close_all_sessions(CK_SLOT_ID slot)
{
    track_close(slot, 1);
    return real->C_CloseAllSessions(slot);
}

static CK_RV finalize(void *reserved)
{
    pthread_mutex_lock(&sessions_lock);
    ntracked = 0;
    pthread_mutex_unlock(&sessions_lock);
    return real->C_Finalize(reserved);
}

static CK_RV login(CK_SESSION_HANDLE session, CK_USER_TYPE user,
                   CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
    long code;

    log_call(user == CKU_CONTEXT_SPECIFIC ? "C_Login context" : "C_Login");
    if (user == CKU_USER && fault_now(&code) == FAULT_PIN_CODE)
        return (CK_RV)code;
    return real->C_Login(session, user, pin, len);
}

static CK_RV decrypt_init(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                          CK_OBJECT_HANDLE key)
{
    CK_RV rv = key_operation_fault(session);

    return rv != CKR_OK ? rv : real->C_DecryptInit(session, mechanism, key);
}

static CK_RV sign_init(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                       CK_OBJECT_HANDLE key)
{
    CK_RV rv = key_operation_fault(session);

    return rv != CKR_OK ? rv : real->C_SignInit(session, mechanism, key);
}

static CK_RV derive_key(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                        CK_OBJECT_HANDLE base, CK_ATTRIBUTE_PTR attributes,
                        CK_ULONG count, CK_OBJECT_HANDLE_PTR key)
{
    CK_RV rv = key_operation_fault(session);

    return rv != CKR_OK ? rv
                        : real->C_DeriveKey(session, mechanism, base,
                                            attributes, count, key);
}

/* Once per process: libp11 and the probe each ask for the list, and must
 * get the same one. The real module is never closed, since the copy points
 * into it. */
static void load_real(void)
{
    const char *path = getenv("FAULTY_P11_REAL");
    CK_C_GetFunctionList get_list;
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
    wrapped.C_GetSlotInfo = get_slot_info;
    wrapped.C_GetTokenInfo = get_token_info;
    wrapped.C_Finalize = finalize;
    wrapped.C_OpenSession = open_session;
    wrapped.C_GetSessionInfo = get_session_info;
    wrapped.C_CloseSession = close_session;
    wrapped.C_CloseAllSessions = close_all_sessions;
    wrapped.C_Login = login;
    wrapped.C_DecryptInit = decrypt_init;
    wrapped.C_SignInit = sign_init;
    wrapped.C_DeriveKey = derive_key;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    pthread_once(&once, load_real);
    if (real == NULL)
        return CKR_GENERAL_ERROR;
    *list = &wrapped;
    return CKR_OK;
}
