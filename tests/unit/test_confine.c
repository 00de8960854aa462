/*
 * Worker confinement, proved from inside: each case starts this program
 * again (fork and exec, a fresh process as a worker is: no library state
 * from the parent) to load a test configuration as a worker does, confine
 * itself with confine_process and then try something. What a worker does after
 * start (threads, signing, verifying against the trust directory,
 * encrypting, decrypting, Latin-1 text through iconv) works; opening a PIN
 * file, a PKCS#11 module or the token store, writing anywhere, execve, a
 * new socket, connect, bind, ptrace, fork and the other calls a
 * compromised worker would want fail (the seccomp filter kills the child:
 * SIGSYS). The parent checks from outside what /proc shows.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <iconv.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <gmime/gmime.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "cms/cms.h"
#include "service/config.h"
#include "service/confine.h"
#include "tap.h"

#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define TOKEN_STORE "/var/lib/softhsm/tokens"
#define KEYS "fuzz/keys/"

static char dir[64] = "/tmp/smimed-confine-XXXXXX";
static char conf[256], pin[256], open_pin[256], trust_file[512];
static char trust_dir[256];

/* The descriptors a probe child finds its pipes at. */
#define FD_RESULTS 3
#define FD_GO 4
static EVP_PKEY *rsa_key, *ec_key;
static X509 *rsa_cert, *ec_cert;

/* A check made inside a child, sent to the parent to print. */
typedef struct result {
    int ok;
    char text[240];
} result;

static int results_fd = -1;

__attribute__((format(printf, 2, 3))) static int report(int ok, const char *fmt,
                                                        ...)
{
    result r = {ok, ""};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(r.text, sizeof(r.text), fmt, ap);
    va_end(ap);
    if (write(results_fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
        _exit(3);
    return ok;
}

static void fatal(const char *what)
{
    perror(what);
    exit(1);
}

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");

    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0 ||
        chmod(path, mode) != 0)
        fatal(path);
}

static X509 *read_cert(const char *path)
{
    FILE *f = fopen(path, "r");
    X509 *x = f != NULL ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;

    if (x == NULL)
        fatal(path);
    fclose(f);
    return x;
}

static EVP_PKEY *read_key(const char *path)
{
    FILE *f = fopen(path, "r");
    EVP_PKEY *k = f != NULL ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;

    if (k == NULL)
        fatal(path);
    fclose(f);
    return k;
}

/* The files under dir; the trust file is named by the test CA's hash. */
static void set_paths(void)
{
    X509 *ca = read_cert(KEYS "ca.pem");

    snprintf(pin, sizeof(pin), "%s/pin", dir);
    snprintf(open_pin, sizeof(open_pin), "%s/open-pin", dir);
    snprintf(trust_dir, sizeof(trust_dir), "%s/trust", dir);
    snprintf(trust_file, sizeof(trust_file), "%s/%08lx.0", trust_dir,
             X509_subject_name_hash(ca));
    snprintf(conf, sizeof(conf), "%s/smimed.conf", dir);
    X509_free(ca);
}

/* The test's files: a PIN file as the daemon wants it (0600) and one any
 * user could read (so only Landlock keeps the worker out), a hashed trust
 * directory with the test CA, and a configuration naming them and a real
 * PKCS#11 module. The folder is open to all for the same reason. */
static void make_files(void)
{
    char text[1024];
    X509 *ca;
    FILE *f;

    if (mkdtemp(dir) == NULL || chmod(dir, 0755) != 0)
        fatal("mkdtemp");
    set_paths();
    write_file(pin, "1234567890123456\n", 0600);
    write_file(open_pin, "1234567890123456\n", 0644);
    if (mkdir(trust_dir, 0755) != 0)
        fatal(trust_dir);
    ca = read_cert(KEYS "ca.pem");
    f = fopen(trust_file, "w");
    if (f == NULL || !PEM_write_X509(f, ca) || fclose(f) != 0)
        fatal(trust_file);
    X509_free(ca);
    snprintf(text, sizeof(text),
             "{\"user\": \"nobody\", \"trust\": \"trust\", \"tokens\": "
             "[{\"module\": \"" MODULE "\", \"uri\": \"pkcs11:token=t\", "
             "\"pin_file\": \"pin\", \"discovery\": true}]}");
    /* readable by the user the not-root case starts as */
    write_file(conf, text, 0644);
}

/* What a probe child holds before it confines itself, as a worker holds
 * its keys' certificates: keys and certificates read from files. */
static void read_keys(void)
{
    rsa_key = read_key(KEYS "rsa.key");
    rsa_cert = read_cert(KEYS "rsa.pem");
    ec_key = read_key(KEYS "ec.key");
    ec_cert = read_cert(KEYS "ec.pem");
}

static void remove_files(void)
{
    char path[512];

    unlink(trust_file);
    rmdir(trust_dir);
    unlink(pin);
    unlink(open_pin);
    unlink(conf);
    snprintf(path, sizeof(path), "%s/written", dir);
    unlink(path);
    rmdir(dir);
}

/* What a worker does before it confines itself: its configuration, loaded
 * without the PIN sources. */
static config *load_config(void)
{
    config_problems problems = {0};
    config *cfg = config_load_without_pins(conf, &problems);
    size_t i;

    for (i = 0; i < problems.count; i++)
        fprintf(stderr, "%s\n", problems.lines[i]);
    config_problems_clear(&problems);
    return cfg;
}

typedef void (*probe_fn)(void);

/* Starts probe NAME in a fresh confined child. summary gets the
 * confinement line ("FAILED: why" when confining failed), and before the
 * probe runs the parent reads the child's /proc/PID/status into status
 * (when not NULL) and checks that it can read the child's memory. Returns
 * the child's wait status; the child's reports are printed. */
static int run_confined(const char *name, char *summary, size_t slen,
                        char *status, size_t stlen, int pre_drop)
{
    int res[2], go[2], ws = 0;
    char path[64], line[512], c = 0;
    result r;
    ssize_t n;
    pid_t pid;
    FILE *f;

    if (pipe(res) != 0 || pipe(go) != 0)
        fatal("pipe");
    fflush(stdout);
    pid = fork();
    if (pid < 0)
        fatal("fork");
    if (pid == 0) {
        char *argv[] = {"test_confine",       "--probe", (char *)name, dir,
                        pre_drop ? "1" : "0", NULL};

        if (dup2(res[1], FD_RESULTS) < 0 || dup2(go[0], FD_GO) < 0)
            _exit(3);
        execv("/proc/self/exe", argv);
        _exit(3);
    }
    close(res[1]);
    close(go[0]);
    memset(summary, 0, slen);
    if (read(res[0], line, sizeof(line)) == (ssize_t)sizeof(line))
        snprintf(summary, slen, "%s", line);
    if (status != NULL) {
        snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
        f = fopen(path, "r");
        n = f != NULL ? (ssize_t)fread(status, 1, stlen - 1, f) : 0;
        status[n > 0 ? n : 0] = '\0';
        if (f != NULL)
            fclose(f);
    }
    /* a child that failed before confining has gone already */
    if (write(go[1], &c, 1) != 1)
        tap_ok(0, "the child waits for its probe: %s", strerror(errno));
    close(go[1]);
    while ((n = read(res[0], &r, sizeof(r))) == (ssize_t)sizeof(r))
        tap_ok(r.ok, "%s", r.text);
    close(res[0]);
    if (waitpid(pid, &ws, 0) != pid)
        fatal("waitpid");
    return ws;
}

static const char *describe(int ws)
{
    static char text[64];

    if (WIFSIGNALED(ws))
        snprintf(text, sizeof(text), "killed by %s", strsignal(WTERMSIG(ws)));
    else
        snprintf(text, sizeof(text), "exited %d", WEXITSTATUS(ws));
    return text;
}

static int has_line(const char *status, const char *prefix, const char *value)
{
    const char *p = strstr(status, prefix);
    char want[128];

    snprintf(want, sizeof(want), "%s\t%s", prefix, value);
    return p != NULL && strncmp(p, want, strlen(want)) == 0;
}

/* ------------------------------------------------------------ probes */

static int opens(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC, 0644);

    if (fd < 0)
        return -errno;
    close(fd);
    return 0;
}

static void probe_files(void)
{
    char written[512], buf[64];
    void *handle;
    int r, fd;
    ssize_t n;

    r = opens(pin, O_RDONLY);
    report(r == -EACCES, "the PIN file (0600) cannot be opened (%s)",
           strerror(-r));
    r = opens(open_pin, O_RDONLY);
    report(r == -EACCES,
           "a PIN file any user may read cannot be opened either (%s)",
           strerror(-r));
    r = opens(conf, O_RDONLY);
    report(r == -EACCES, "nor the configuration (%s)", strerror(-r));
    r = opens(MODULE, O_RDONLY);
    report(r == -EACCES, "the PKCS#11 module cannot be opened (%s)",
           strerror(-r));
    handle = dlopen(MODULE, RTLD_NOW);
    report(handle == NULL, "nor loaded: %s",
           handle == NULL ? dlerror() : "loaded");
    r = opens(TOKEN_STORE, O_RDONLY | O_DIRECTORY);
    report(r == -EACCES || r == -ENOENT,
           "the SoftHSM token store cannot be opened (%s)", strerror(-r));
    r = opens("/etc/passwd", O_RDONLY);
    report(r == -EACCES, "nor /etc/passwd (%s)", strerror(-r));
    snprintf(written, sizeof(written), "%s/written", dir);
    r = opens(written, O_WRONLY | O_CREAT);
    report(r == -EACCES, "no file can be made in the test folder (%s)",
           strerror(-r));
    r = opens("/tmp/smimed-confine-written", O_WRONLY | O_CREAT);
    report(r == -EACCES, "nor in /tmp (%s)", strerror(-r));
    r = opens(trust_file, O_WRONLY | O_APPEND);
    report(r == -EACCES, "a readable file cannot be written (%s)",
           strerror(-r));
    fd = open(trust_file, O_RDONLY | O_CLOEXEC);
    n = fd >= 0 ? read(fd, buf, sizeof(buf)) : -1;
    report(n > 10 && memcmp(buf, "-----BEGIN", 10) == 0,
           "the trust directory's CA file reads");
    if (fd >= 0)
        close(fd);
    r = opens("/etc/localtime", O_RDONLY);
    report(r == 0, "time zone data reads (%s)", strerror(-r));
}

static void *thread_main(void *arg)
{
    *(int *)arg = 42;
    return arg;
}

/* Latin-1 through glibc's iconv modules (GMime's charset conversion). */
static void probe_charsets(void)
{
    static const char *const charsets[] = {"ISO-8859-1", "ISO-8859-15",
                                           "WINDOWS-1252", "KOI8-R"};
    char in[] = "caf\xe9", out[16], *ip, *op;
    size_t il, ol, i;
    iconv_t cd;
    char *decoded;

    for (i = 0; i < sizeof(charsets) / sizeof(charsets[0]); i++) {
        cd = iconv_open("UTF-8", charsets[i]);
        ip = in;
        op = out;
        il = strlen(in);
        ol = sizeof(out);
        report(cd != (iconv_t)-1 && iconv(cd, &ip, &il, &op, &ol) == 0 &&
                   il == 0,
               "iconv from %s to UTF-8", charsets[i]);
        if (cd != (iconv_t)-1)
            iconv_close(cd);
    }
    decoded = g_mime_utils_header_decode_text(NULL, "=?iso-8859-1?q?caf=E9?=");
    report(decoded != NULL && strcmp(decoded, "caf\xc3\xa9") == 0,
           "GMime decodes a Latin-1 encoded word (%s)",
           decoded != NULL ? decoded : "NULL");
    g_free(decoded);
}

static const char latin1_mime[] = "Content-Type: text/plain; "
                                  "charset=iso-8859-1\r\n"
                                  "Content-Transfer-Encoding: 8bit\r\n"
                                  "\r\n"
                                  "Caf\xe9 cr\xe8me, na\xefve fa\xe7"
                                  "ade.\r\n"
                                  "From the start of a line\r\n";

static void sign_and_verify(EVP_PKEY *key, X509 *cert, cms_mode mode,
                            const char *what)
{
    cms_error err = {0};
    cms_result *res = NULL;
    cms_verification *v = NULL;
    const unsigned char *data;
    char trust[512];
    size_t len = 0;
    int ok;

    ok = cms_sign_entity((const unsigned char *)latin1_mime,
                         sizeof(latin1_mime) - 1, key, cert, NULL, mode,
                         CMS_DIGEST_SHA256, &res, &err) == 0;
    report(ok, "%s: signs an 8-bit Latin-1 entity %s", what, err.message);
    if (!ok)
        return;
    data = cms_result_data(res, &len);
    snprintf(trust, sizeof(trust), "%s/trust", dir);
    ok = cms_verify_entity(data, len, NULL, trust, NULL, &v, &err) == 0 &&
         cms_verification_valid(v);
    report(ok, "%s: verifies against the trust directory %s%s", what,
           err.message,
           v != NULL && cms_verification_reason(v) != NULL
               ? cms_verification_reason(v)
               : "");
    cms_verification_free(v);
    cms_result_free(res);
}

static void encrypt_and_decrypt(cms_cipher cipher, cms_rsa_padding padding)
{
    STACK_OF(X509) *to = sk_X509_new_null();
    cms_error err = {0};
    cms_result *res = NULL, *plain = NULL;
    cms_envelope *env = NULL;
    const unsigned char *data;
    size_t len = 0, i;
    int ok, is_signed = 0;
    EVP_PKEY *keys[2] = {rsa_key, ec_key};
    X509 *certs[2] = {rsa_cert, ec_cert};

    sk_X509_push(to, rsa_cert);
    sk_X509_push(to, ec_cert);
    ok = cms_encrypt_entity((const unsigned char *)latin1_mime,
                            sizeof(latin1_mime) - 1, to, cipher, padding, &res,
                            &err) == 0;
    report(ok, "encrypts with %s (%s) to RSA and P-256 %s",
           cms_cipher_name(cipher), padding == CMS_RSA_OAEP ? "oaep" : "pkcs1",
           err.message);
    sk_X509_free(to);
    if (!ok)
        return;
    data = cms_result_data(res, &len);
    for (i = 0; i < 2; i++) {
        ok = cms_envelope_parse(data, len, &env, &err) == 0 &&
             cms_envelope_decrypt(env, keys[i], certs[i], &plain, &is_signed,
                                  &err) == 0;
        report(ok, "and the %s key decrypts it %s", i == 0 ? "RSA" : "P-256",
               err.message);
        cms_envelope_free(env);
        env = NULL;
        cms_result_free(plain);
        plain = NULL;
    }
    cms_result_free(res);
}

static void probe_work(void)
{
    unsigned char rnd[32];
    pthread_t t;
    int v = 0;
    void *ret = NULL;

    report(pthread_create(&t, NULL, thread_main, &v) == 0 &&
               pthread_join(t, &ret) == 0 && v == 42,
           "a thread starts and is joined");
    report(RAND_bytes(rnd, sizeof(rnd)) == 1, "OpenSSL's random generator");
    probe_charsets();
    sign_and_verify(rsa_key, rsa_cert, CMS_MODE_DETACHED, "RSA, detached");
    sign_and_verify(ec_key, ec_cert, CMS_MODE_OPAQUE, "P-256, opaque");
    encrypt_and_decrypt(CMS_CIPHER_AES256_CBC, CMS_RSA_PKCS1);
    encrypt_and_decrypt(CMS_CIPHER_AES128_GCM, CMS_RSA_OAEP);
}

/* Each forbidden call is made in a child of its own: the filter kills. */
static int spare_fd = -1;

static void try_execve(void)
{
    char *argv[] = {"true", NULL}, *envp[] = {NULL};

    execve("/bin/true", argv, envp);
}

static void try_socket_inet(void)
{
    socket(AF_INET, SOCK_STREAM, 0);
}

static void try_socket_unix(void)
{
    socket(AF_UNIX, SOCK_STREAM, 0);
}

static void try_connect(void)
{
    struct sockaddr_in sa = {0};

    sa.sin_family = AF_INET;
    sa.sin_port = htons(9);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connect(spare_fd, (struct sockaddr *)&sa, sizeof(sa));
}

static void try_bind(void)
{
    struct sockaddr_in sa = {0};

    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(spare_fd, (struct sockaddr *)&sa, sizeof(sa));
}

static void try_ptrace(void)
{
    ptrace(PTRACE_ATTACH, getppid(), NULL, NULL);
}

static void try_fork(void)
{
    syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
}

static void try_mount(void)
{
    mount("none", "/tmp", "tmpfs", 0, NULL);
}

static void try_bpf(void)
{
    union bpf_attr attr;

    memset(&attr, 0, sizeof(attr));
    syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof(attr));
}

static void try_keyctl(void)
{
    syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0);
}

static void try_process_vm_readv(void)
{
    char buf[8];
    struct iovec local = {buf, sizeof(buf)}, remote = {(void *)0x1000, 8};

    syscall(SYS_process_vm_readv, getppid(), &local, 1, &remote, 1, 0);
}

static void try_perf_event_open(void)
{
    char attr[128] = {0};

    syscall(SYS_perf_event_open, attr, 0, -1, -1, 0);
}

static void try_setuid(void)
{
    syscall(SYS_setuid, 0);
}

static void try_unshare(void)
{
    unshare(CLONE_NEWUSER);
}

static void try_wx_mmap(void)
{
    mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

static void try_mkdir(void)
{
    mkdir("/tmp/smimed-confine-dir", 0700);
}

static void try_kill_parent(void)
{
    kill(getppid(), 0);
}

static void try_setrlimit(void)
{
    struct rlimit rl = {0, 0};

    setrlimit(RLIMIT_NOFILE, &rl);
}

static void try_prctl_dumpable(void)
{
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
}

static void *idle_thread(void *arg)
{
    pause();
    return arg;
}

/* Every probe a child can run: "-" none, the allowed work, and the
 * forbidden calls (whose children the filter kills). */
static const struct {
    const char *name;
    probe_fn fn;
    int forbidden;
} probes[] = {
    {"-", NULL, 0},
    {"files", probe_files, 0},
    {"work", probe_work, 0},
    {"execve", try_execve, 1},
    {"socket(AF_INET)", try_socket_inet, 1},
    {"socket(AF_UNIX)", try_socket_unix, 1},
    {"connect", try_connect, 1},
    {"bind", try_bind, 1},
    {"ptrace", try_ptrace, 1},
    {"fork (clone without CLONE_THREAD)", try_fork, 1},
    {"mount", try_mount, 1},
    {"bpf", try_bpf, 1},
    {"keyctl", try_keyctl, 1},
    {"process_vm_readv", try_process_vm_readv, 1},
    {"perf_event_open", try_perf_event_open, 1},
    {"setuid", try_setuid, 1},
    {"unshare", try_unshare, 1},
    {"mmap writable and executable", try_wx_mmap, 1},
    {"kill", try_kill_parent, 1},
    {"mkdir", try_mkdir, 1},
    {"setrlimit (prlimit64 with a new limit)", try_setrlimit, 1},
    {"prctl(PR_SET_DUMPABLE)", try_prctl_dumpable, 1},
};

#define NPROBES (sizeof(probes) / sizeof(probes[0]))

/* The child: test_confine --probe NAME DIR PRE_DROP, its pipes at
 * FD_RESULTS and FD_GO. Does what a worker does before confining (its
 * certificates and keys, GMime, its configuration), confines itself,
 * sends the summary, waits for the parent to look at it, runs the probe.
 * "threads" starts a second thread first, which must be refused. */
static int probe_main(char **argv)
{
    confine_error err = {{0}};
    char line[512] = "", partial[480] = "", c;
    const char *name = argv[2];
    config *cfg;
    pthread_t t;
    size_t i;
    int r;

    results_fd = FD_RESULTS;
    snprintf(dir, sizeof(dir), "%s", argv[3]);
    set_paths();
    if (strcmp(argv[4], "1") == 0 && setresuid(65534, 65534, 65534) != 0)
        return 4;
    read_keys();
    cms_init();
    spare_fd = socket(AF_INET, SOCK_STREAM, 0);
    cfg = load_config();
    if (cfg == NULL || spare_fd < 0)
        return 5;
    /* "files@N": the file checks with Landlock ABI N at most */
    if (strncmp(name, "files@", 6) == 0) {
        confine_cap_landlock_abi(atol(name + 6));
        name = "files";
    }
    if (strcmp(name, "threads") == 0 &&
        pthread_create(&t, NULL, idle_thread, NULL) != 0)
        return 5;
    r = confine_process(cfg, partial, sizeof(partial), &err);
    snprintf(line, sizeof(line), "%s", partial);
    if (r < 0)
        snprintf(line, sizeof(line), "FAILED: %s", err.message);
    else if (r > 0)
        snprintf(line, sizeof(line), "PARTIAL: %s", partial);
    if (write(FD_RESULTS, line, sizeof(line)) != (ssize_t)sizeof(line) ||
        read(FD_GO, &c, 1) != 1)
        _exit(3);
    for (i = 0; i < NPROBES; i++)
        if (strcmp(probes[i].name, name) == 0 && probes[i].fn != NULL)
            probes[i].fn();
    /* no exit handlers: the child owes the parent nothing but its status */
    _exit(0);
}

/* ------------------------------------------------------------- cases */

static void test_summary(void)
{
    char summary[512], status[4096];
    int ws, root = geteuid() == 0;

    ws = run_confined("-", summary, sizeof(summary), status, sizeof(status), 0);
    tap_ok(WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "a confined child exits: %s",
           describe(ws));
    tap_ok(strncmp(summary, root ? "user nobody" : "user ", 5) == 0 &&
               strstr(summary, root ? "user nobody" : "not started as root") !=
                   NULL &&
               strstr(summary, ", no_new_privs, landlock abi ") != NULL &&
               strstr(summary, ", seccomp (") != NULL,
           "the summary names every confinement: %s", summary);
    if (root)
        tap_ok(has_line(status, "Uid:", "65534\t65534\t65534\t65534") &&
                   has_line(status, "Gid:", "65534\t65534\t65534\t65534") &&
                   has_line(status, "Groups:", ""),
               "from outside: uid and gid nobody, no supplementary groups");
    tap_ok(has_line(status, "NoNewPrivs:", "1"), "from outside: NoNewPrivs 1");
    tap_ok(has_line(status, "Seccomp:", "2"),
           "from outside: Seccomp 2 (filter)");
    tap_ok(has_line(status, "CapEff:", "0000000000000000") &&
               has_line(status, "CapPrm:", "0000000000000000"),
           "from outside: no capabilities left");
}

static void test_not_root(void)
{
    char summary[512];
    int ws;

    if (geteuid() != 0)
        return;
    ws = run_confined("-", summary, sizeof(summary), NULL, 0, 1);
    tap_ok(WIFEXITED(ws) && WEXITSTATUS(ws) == 0 &&
               strstr(summary, "user 65534 (not started as root: stays)") !=
                   NULL &&
               strstr(summary, "landlock abi") != NULL,
           "started as another user: stays, says so, confines the rest: %s",
           summary);
}

/* Each older ABI's ruleset (its rights, the attribute's size) makes a
 * domain that keeps the same files out and lets the same ones in. */
static void test_older_abis(void)
{
    char summary[512], want[64], name[32];
    long abi, kernel = syscall(SYS_landlock_create_ruleset, NULL, 0, 1);
    int ws;

    for (abi = 1; abi < kernel; abi++) {
        snprintf(name, sizeof(name), "files@%ld", abi);
        ws = run_confined(name, summary, sizeof(summary), NULL, 0, 0);
        snprintf(want, sizeof(want), ", landlock abi %ld, seccomp", abi);
        tap_ok(WIFEXITED(ws) && WEXITSTATUS(ws) == 0 &&
                   strstr(summary, want) != NULL,
               "Landlock ABI %ld: %s (%s)", abi, summary, describe(ws));
    }
}

static void test_threads_refused(void)
{
    char summary[512];

    run_confined("threads", summary, sizeof(summary), NULL, 0, 0);
    tap_ok(strncmp(summary, "FAILED: ", 8) == 0 &&
               strstr(summary, "2 threads") != NULL,
           "a process with a second thread is refused: %s", summary);
}

int main(int argc, char **argv)
{
    char summary[512];
    size_t i;
    int ws;

    if (argc == 5 && strcmp(argv[1], "--probe") == 0)
        return probe_main(argv);
    signal(SIGPIPE, SIG_IGN);
    make_files();
    test_summary();
    test_not_root();
    test_threads_refused();
    test_older_abis();
    for (i = 1; i < NPROBES; i++) {
        ws = run_confined(probes[i].name, summary, sizeof(summary), NULL, 0, 0);
        if (probes[i].forbidden)
            tap_ok(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGSYS,
                   "%s: the filter kills the worker (%s)", probes[i].name,
                   describe(ws));
        else
            tap_ok(WIFEXITED(ws) && WEXITSTATUS(ws) == 0,
                   "the %s probe ran to its end confined: %s", probes[i].name,
                   describe(ws));
    }
    remove_files();
    return tap_done();
}
