/*
 * Worker confinement, in the order each step needs: the paths Landlock
 * allows are opened while the process may still reach them; the user
 * changes before NO_NEW_PRIVS (a setuid-root drop needs no privilege
 * that bit removes); Landlock and seccomp need NO_NEW_PRIVS (or
 * CAP_SYS_ADMIN, which the worker must not keep); seccomp goes last
 * because it forbids the calls the steps before it make. Reasons for the
 * lists are in docs/DESIGN.md, "Worker confinement".
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>
#include <linux/landlock.h>
#include <seccomp.h>

#include "service/confine.h"

static int confined;

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CONFINE_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(CONFINE_ASAN)
/* LeakSanitizer's check at exit stops the world with ptrace from a cloned
 * thread and reads /proc/self/task: neither is left to a confined
 * process, and a failed check would turn every worker's exit into an
 * error. A confined worker is not leak-checked; the supervisor, the key
 * process and every unit test are. */
int __lsan_is_turned_off(void);
int __lsan_is_turned_off(void)
{
    return confined;
}
#endif

__attribute__((format(printf, 2, 3))) static void fail(confine_error *err,
                                                       const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

/* The summary line, grown part by part. */
typedef struct line {
    char *buf;
    size_t len, used;
} line;

__attribute__((format(printf, 2, 3))) static void add(line *l, const char *fmt,
                                                      ...)
{
    va_list ap;
    int n;

    if (l->used >= l->len)
        return;
    va_start(ap, fmt);
    n = vsnprintf(l->buf + l->used, l->len - l->used, fmt, ap);
    va_end(ap);
    if (n > 0)
        l->used += (size_t)n;
}

static int count_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ------------------------------------------------------------- user */

static int drop_user(const config *cfg, line *l, confine_error *err)
{
    uid_t ru, eu, su;
    gid_t rg, eg, sg;

    if (geteuid() != 0) {
        add(l, "user %u (not started as root: stays)", (unsigned)geteuid());
        return 0;
    }
    if (cfg->user == NULL) {
        fail(err, "started as root without a user to become");
        return -1;
    }
    if (setgroups(0, NULL) != 0 ||
        setresgid(cfg->user_gid, cfg->user_gid, cfg->user_gid) != 0 ||
        setresuid(cfg->user_uid, cfg->user_uid, cfg->user_uid) != 0) {
        fail(err, "cannot become user %s: %s", cfg->user, strerror(errno));
        return -1;
    }
    /* OpenSSH's permanently_set_uid: check that every id moved and that
     * root cannot be had back */
    if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0 ||
        ru != cfg->user_uid || eu != cfg->user_uid || su != cfg->user_uid ||
        rg != cfg->user_gid || eg != cfg->user_gid || sg != cfg->user_gid ||
        getgroups(0, NULL) != 0) {
        fail(err, "the ids of user %s did not all take", cfg->user);
        return -1;
    }
    if (setuid(0) == 0 || seteuid(0) == 0 || setgid(0) == 0) {
        fail(err, "root could be regained after becoming %s", cfg->user);
        return -1;
    }
    add(l, "user %s", cfg->user);
    return 0;
}

/* --------------------------------------------------------- Landlock */

/* Newer ABIs than Debian 12's headers know (ABI 2); the kernel takes the
 * attribute struct at the size of the fields it should read. */
#define LL_FS_TRUNCATE (1ULL << 14)  /* ABI 3 */
#define LL_FS_IOCTL_DEV (1ULL << 15) /* ABI 5 */
#define LL_NET_BIND_TCP (1ULL << 0)  /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)

/* confine_cap_landlock_abi's; 0: the kernel's */
static long abi_cap;

void confine_cap_landlock_abi(long abi)
{
    abi_cap = abi;
}

typedef struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
} ll_ruleset_attr;

#define LL_READ (LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR)

/* What a worker reads after start besides the configured trust directory:
 * glibc's iconv modules (GMime converts charsets through iconv, which
 * loads a module per charset on first use) and time zone data (GLib's
 * local time zone). Paths that do not exist are left out. */
static const char *const system_reads[] = {
    "/usr/lib/x86_64-linux-gnu/gconv",
    "/usr/lib64/gconv",
    "/usr/lib/gconv",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    NULL,
};

/* 1 when a rule was added, 0 when path does not exist, -1 on error. */
static int ll_allow_read(int ruleset, const char *path)
{
    struct landlock_path_beneath_attr pb = {0};
    struct stat st;
    int fd = open(path, O_PATH | O_CLOEXEC), ret = -1, saved;

    if (fd < 0)
        return errno == ENOENT || errno == ENOTDIR ? 0 : -1;
    if (fstat(fd, &st) != 0)
        goto out;
    /* a rule on a file may carry file rights only */
    pb.allowed_access =
        S_ISDIR(st.st_mode) ? LL_READ : LANDLOCK_ACCESS_FS_READ_FILE;
    pb.parent_fd = fd;
    if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &pb,
                0) != 0)
        goto out;
    ret = 1;
out:
    saved = errno;
    close(fd);
    errno = saved;
    return ret;
}

/* Adds the rule for path; one that cannot be added leaves the path
 * unreadable (the domain is still made: a path too few is safer than no
 * domain) and is named in the summary. */
static int ll_rule(int ruleset, const char *path, line *l)
{
    if (ll_allow_read(ruleset, path) >= 0)
        return 0;
    add(l, ", landlock: %s unreadable (%s)", path, strerror(errno));
    return 1;
}

/* The ruleset, built while the process still has the rights it started
 * with (a trust directory under a folder only root may search is opened
 * as root). -1 with errno when Landlock is missing; *missed counts the
 * rules that could not be added, named in notes. */
static int ll_prepare(const config *cfg, long *abi, line *notes, int *missed)
{
    ll_ruleset_attr attr = {0};
    size_t size = sizeof(attr.handled_access_fs), i;
    int fd;

    *abi = syscall(SYS_landlock_create_ruleset, NULL, 0,
                   LANDLOCK_CREATE_RULESET_VERSION);
    if (*abi < 1)
        return -1;
    if (abi_cap > 0 && *abi > abi_cap)
        *abi = abi_cap;
    attr.handled_access_fs = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;
    if (*abi >= 2)
        attr.handled_access_fs |= LANDLOCK_ACCESS_FS_REFER;
    if (*abi >= 3)
        attr.handled_access_fs |= LL_FS_TRUNCATE;
    if (*abi >= 5)
        attr.handled_access_fs |= LL_FS_IOCTL_DEV;
    if (*abi >= 4) {
        /* no rule: no TCP bind or connect at all */
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP;
        size = offsetof(ll_ruleset_attr, scoped);
    }
    if (*abi >= 6) {
        /* no signal to, and no abstract socket of, a process outside */
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        size = sizeof(attr);
    }
    fd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (fd < 0)
        return -1;
    if (cfg->trust_dir != NULL)
        *missed += ll_rule(fd, cfg->trust_dir, notes);
    for (i = 0; system_reads[i] != NULL; i++)
        *missed += ll_rule(fd, system_reads[i], notes);
    return fd;
}

/* ---------------------------------------------------------- seccomp */

/* Calls allowed whatever their arguments: what strace -f shows the
 * daemon's request threads make under the integration suites (sign,
 * verify, encrypt, decrypt, hostile, transport, errors, fast paths) once
 * they accept connections, less the PKCS#11 module's own (file locks, the
 * syslog socket), and what the unit test's confined work needs; plus
 * harmless neighbours a library may pick instead (statx for fstatat,
 * ppoll for poll, the epoll family for an event loop made after start). */
static const char *const allowed[] = {
    /* memory (glibc's realloc of a large block is mremap) */
    "brk",
    "munmap",
    "mremap",
    "madvise",
    /* threads and waiting */
    "futex",
    "set_robust_list",
    "rseq",
    "sched_yield",
    "sched_getaffinity",
    "nanosleep",
    "clock_nanosleep",
    "restart_syscall",
    /* descriptors already open, and files Landlock lets it open */
    "read",
    "readv",
    "pread64",
    "write",
    "writev",
    "lseek",
    "close",
    "fcntl",
    "openat",
    "newfstatat",
    "fstat",
    "statx",
    "getdents64",
    "readlinkat",
    "faccessat",
    "faccessat2",
    "pipe2",
    "eventfd2",
    /* event loops */
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    /* the sockets it was given and the connections it accepts */
    "accept4",
    "accept",
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "shutdown",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
    /* time, randomness, identity */
    "clock_gettime",
    "clock_getres",
    "gettimeofday",
    "time",
    "getrandom",
    "getpid",
    "gettid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "getgroups",
    "uname",
    "sysinfo",
    /* signals and the end */
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigtimedwait",
    "sigaltstack",
    "exit",
    "exit_group",
    NULL,
};

static int allow_if(scmp_filter_ctx ctx, const char *name, unsigned n,
                    const struct scmp_arg_cmp *cmp)
{
    int nr = seccomp_syscall_resolve_name(name);

    if (nr == __NR_SCMP_ERROR)
        return 0;
    return seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, n, cmp) == 0 ? 1
                                                                        : -1;
}

/* Calls allowed with some arguments only; returns how many rules, or -1. */
static int add_conditional(scmp_filter_ctx ctx)
{
    const struct scmp_arg_cmp thread[] = {
        SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD)};
    const struct scmp_arg_cmp no_exec[] = {
        SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0)};
    const struct scmp_arg_cmp no_write[] = {
        SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_WRITE, 0)};
    const struct scmp_arg_cmp self[] = {
        SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid(), 0)};
    const struct scmp_arg_cmp get_limit[] = {SCMP_A2(SCMP_CMP_EQ, 0, 0)};
    const struct scmp_arg_cmp prctls[] = {SCMP_A0(SCMP_CMP_EQ, PR_SET_NAME, 0),
                                          SCMP_A0(SCMP_CMP_EQ, PR_GET_NAME, 0)};
    const struct scmp_arg_cmp tty[] = {SCMP_A1(SCMP_CMP_EQ, TCGETS, 0)};
    int r[10], n = 0;
    size_t i;

    /* threads, never a process: no fork, no vfork, no namespaces */
    r[0] = allow_if(ctx, "clone", 1, thread);
    /* W^X: no page both writable and executable (a loaded iconv module
     * is mapped executable, read-only) */
    r[1] = allow_if(ctx, "mmap", 1, no_exec);
    r[2] = allow_if(ctx, "mmap", 1, no_write);
    r[3] = allow_if(ctx, "mprotect", 1, no_exec);
    r[4] = allow_if(ctx, "mprotect", 1, no_write);
    /* raise() and abort() signal the calling thread */
    r[5] = allow_if(ctx, "tgkill", 1, self);
    /* getrlimit, never setrlimit */
    r[6] = allow_if(ctx, "prlimit64", 1, get_limit);
    /* thread names */
    r[7] = allow_if(ctx, "prctl", 1, &prctls[0]);
    r[8] = allow_if(ctx, "prctl", 1, &prctls[1]);
    /* isatty (the sanitizers ask it of stderr before a report) */
    r[9] = allow_if(ctx, "ioctl", 1, tty);
    for (i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        if (r[i] < 0)
            return -1;
        n += r[i];
    }
    return n;
}

/* 0 when the filter is loaded, 1 (said in the summary) when not. */
static int confine_seccomp(line *l)
{
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
    int n = 0, r = -ENOMEM, nr;
    size_t i;

    if (ctx == NULL)
        goto out;
    /* every thread, should one exist; a binary tree rather than a list
     * for the calls the kernel's cache of argument-free allows misses */
    if ((r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1)) != 0 ||
        (r = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2)) != 0)
        goto out;
    for (i = 0; allowed[i] != NULL; i++) {
        nr = seccomp_syscall_resolve_name(allowed[i]);
        if (nr == __NR_SCMP_ERROR)
            continue;
        if ((r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)) != 0)
            goto out;
        n++;
    }
    if ((r = add_conditional(ctx)) < 0)
        goto out;
    n += r;
    /* glibc's pthread_create tries clone3 first, whose flags live in
     * memory the filter cannot read, and falls back to clone on ENOSYS */
    nr = seccomp_syscall_resolve_name("clone3");
    if (nr != __NR_SCMP_ERROR &&
        (r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0)) != 0)
        goto out;
    r = seccomp_load(ctx);
out:
    if (r == 0)
        add(l, ", seccomp (%d rules)", n);
    else
        add(l, ", no seccomp (%s)", strerror(r < 0 ? -r : ENOMEM));
    seccomp_release(ctx);
    return r != 0;
}

/* ------------------------------------------------------------- all */

int confine_process(const config *cfg, char *summary, size_t summary_len,
                    confine_error *err)
{
    char notes_buf[512] = "";
    line l = {summary, summary_len, 0};
    line notes = {notes_buf, sizeof(notes_buf), 0};
    int threads = count_threads(), ruleset, missed = 0, ret = -1;
    long abi = 0;

    summary[0] = '\0';
    if (threads < 0) {
        fail(err, "cannot count the threads in /proc/self/task: %s",
             strerror(errno));
        return -1;
    }
    if (threads != 1) {
        fail(err,
             "the process has %d threads; Landlock would confine only this "
             "one",
             threads);
        return -1;
    }
    ruleset = ll_prepare(cfg, &abi, &notes, &missed);
    if (ruleset < 0)
        add(&notes, ", no landlock (%s)", strerror(errno));
    if (drop_user(cfg, &l, err) != 0)
        goto out;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        fail(err, "cannot set no_new_privs: %s", strerror(errno));
        goto out;
    }
    add(&l, ", no_new_privs");
    /* Landlock allows it, but the user must be able to read it too, or
     * every verification against it fails as untrusted */
    if (cfg->trust_dir != NULL && access(cfg->trust_dir, R_OK | X_OK) != 0) {
        add(&notes, ", trust directory %s unreadable by this user (%s)",
            cfg->trust_dir, strerror(errno));
        missed++;
    }
    if (ruleset < 0) {
        add(&l, "%s", notes_buf);
        missed++;
    } else if (syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) {
        add(&l, ", no landlock (restrict_self: %s)", strerror(errno));
        missed++;
    } else {
        add(&l, ", landlock abi %ld%s", abi, notes_buf);
    }
    confined = 1;
    missed += confine_seccomp(&l);
    ret = missed > 0;
out:
    if (ruleset >= 0)
        close(ruleset);
    return ret;
}
