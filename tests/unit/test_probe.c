/*
 * token/probe.c: a token whose sessions cannot be opened is reported down
 * instead of hanging token_set_add inside libp11 (see the top of
 * token/token.c). The module is tests/unit/faulty_p11.c in front of a real
 * SoftHSMv2 token; FAULTY_P11_FAIL_OPEN=1 makes its C_OpenSession fail with
 * CKR_DEVICE_ERROR.
 *
 * Each case runs in a child process the parent waits for with a deadline,
 * so a hang is a failing case rather than a stuck suite; it also gives each
 * case a process in which libp11 has never touched the slot, which is the
 * state the hang needs. Exits 77 (skip) when the SoftHSM tools are missing.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "tap.h"
#include "token/token.h"

#ifndef FAULTY_P11_PATH
#error "tests/meson.build passes the path of the built faulty_p11 module"
#endif

/* The module faulty_p11 wraps by default, and pkcs11-tool's. */
#define MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define PIN "31415926"
#define DEADLINE_S 20

static char dir[64];
static char conf_path[128];
static char pin_path[128];

/* What a child found out, sent to the parent through a pipe. */
struct outcome {
    int complete; /* the child got to the end */
    int added;
    long add_ms;
    char error[256];
    int ready;
    char reason[200];
    token_status acquire_status;
    int signs;
    int wait_status; /* filled in by the parent */
};

__attribute__((format(printf, 1, 2))) static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd) == 0;
}

static int have_tools(void)
{
    return access(MODULE, R_OK) == 0 && access(FAULTY_P11_PATH, R_OK) == 0 &&
           sh("{ command -v softhsm2-util && command -v pkcs11-tool && "
              "command -v openssl; } >/dev/null 2>&1") != 0;
}

/* One token "t" with an RSA key k1 and a certificate for it with the same
 * ID. Made with the real module: the tools are not built with the
 * sanitizers the faulty module is. */
static int setup_token(void)
{
    char tokens[128];
    FILE *f;

    snprintf(conf_path, sizeof(conf_path), "%s/softhsm2.conf", dir);
    snprintf(pin_path, sizeof(pin_path), "%s/pin", dir);
    snprintf(tokens, sizeof(tokens), "%s/tokens", dir);
    f = fopen(conf_path, "w");
    if (f == NULL)
        return 0;
    fprintf(f,
            "directories.tokendir = %s\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n",
            tokens);
    fclose(f);
    mkdir(tokens, 0700);
    setenv("SOFTHSM2_CONF", conf_path, 1);

    return sh("cd %s && exec >setup.log 2>&1 && set -ex\n"
              "softhsm2-util --init-token --free --label t --pin " PIN
              " --so-pin 27182818\n"
              "p11() { pkcs11-tool --module " MODULE " --token-label t "
              "--login --pin " PIN " \"$@\"; }\n"
              "p11 --keypairgen --key-type rsa:2048 --id 01 --label k1\n"
              "p11 --read-object --type pubkey --id 01 -o k1.der\n"
              "openssl pkey -pubin -inform DER -in k1.der -out k1.pub\n"
              "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
              "-nodes -keyout ca.key -out ca.pem -subj /CN=test-ca -days 30\n"
              "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
              "-nodes -keyout /dev/null -subj /CN=any -out any.csr\n"
              "openssl x509 -req -in any.csr -force_pubkey k1.pub -CA ca.pem "
              "-CAkey ca.key -days 30 -subj /CN=k1 -outform DER -out k1.cder\n"
              "p11 --write-object k1.cder --type cert --id 01 --label k1\n"
              "printf '" PIN "\\n' >pin\n",
              dir);
}

static long elapsed_ms(const struct timespec *since)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000 +
           (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* Acquires key for signing, signs, and checks the signature against the
 * key's certificate. *status is what the acquire returned. */
static int sign_and_verify(token_key *key, token_status *status)
{
    static const unsigned char msg[] = "Content-Type: text/plain\r\n\r\nhi";
    unsigned char sig[1024];
    size_t siglen = sizeof(sig);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY *pkey = NULL;
    token_error err = {0};
    int ok;

    *status = TOKEN_ERR_INTERNAL;
    if (md == NULL)
        return 0;
    if (token_key_acquire(key, TOKEN_USE_SIGN, &pkey, &err) < 0) {
        *status = err.status;
        EVP_MD_CTX_free(md);
        return 0;
    }
    *status = TOKEN_OK;
    ok = EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, pkey) == 1 &&
         EVP_DigestSign(md, sig, &siglen, msg, sizeof(msg)) == 1;
    token_key_release(key);
    EVP_MD_CTX_reset(md);
    ok = ok &&
         EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL,
                              X509_get0_pubkey(token_key_cert0(key))) == 1 &&
         EVP_DigestVerify(md, sig, siglen, msg, sizeof(msg)) == 1;
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return ok;
}

/* The child's part: the whole life of a token set on the faulty module. */
static void open_token(int fail_open, struct outcome *o)
{
    const token_key_spec keys[] = {{"signer", "pkcs11:object=k1", NULL, NULL}};
    const token_spec spec = {
        .name = "faulty",
        .module = FAULTY_P11_PATH,
        .uri = "pkcs11:token=t",
        .pin_file = pin_path,
        .keys = keys,
        .nkeys = 1,
    };
    token_set *set = token_set_new();
    token_error err = {0};
    const char *reason = NULL;
    struct timespec start;
    token_key *k;

    if (fail_open)
        setenv("FAULTY_P11_FAIL_OPEN", "1", 1);
    else
        unsetenv("FAULTY_P11_FAIL_OPEN");
    clock_gettime(CLOCK_MONOTONIC, &start);
    o->added = set != NULL && token_set_add(set, &spec, &err) == 0;
    o->add_ms = elapsed_ms(&start);
    snprintf(o->error, sizeof(o->error), "%s", err.message);
    if (o->added) {
        o->ready = token_set_token_ready(set, 0, &reason);
        snprintf(o->reason, sizeof(o->reason), "%s",
                 reason != NULL ? reason : "");
        k = token_set_find_key(set, "signer");
        o->signs = k != NULL && sign_and_verify(k, &o->acquire_status);
    }
    token_set_free(set);
    o->complete = 1;
}

/* Runs open_token in a child and waits at most DEADLINE_S for it. Returns 0
 * when the child hung and was killed; otherwise 1, with *o as far as the
 * child got (a crash leaves o->complete 0). */
static int run_child(int fail_open, struct outcome *o)
{
    const struct timespec tick = {0, 50 * 1000000L};
    struct timespec start;
    int fds[2], status = 0;
    ssize_t n;
    pid_t pid, w;

    memset(o, 0, sizeof(*o));
    if (pipe(fds) < 0)
        return 1;
    /* Output buffered now would otherwise be printed twice. */
    fflush(stdout);
    pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return 1;
    }
    if (pid == 0) {
        close(fds[0]);
        open_token(fail_open, o);
        n = write(fds[1], o, sizeof(*o));
        /* exit, not _exit: LeakSanitizer checks the child at exit. */
        exit(n == (ssize_t)sizeof(*o) ? 0 : 1);
    }
    close(fds[1]);
    clock_gettime(CLOCK_MONOTONIC, &start);
    while ((w = waitpid(pid, &status, WNOHANG)) == 0) {
        if (elapsed_ms(&start) > DEADLINE_S * 1000L) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            close(fds[0]);
            o->wait_status = status;
            return 0;
        }
        nanosleep(&tick, NULL);
    }
    /* The outcome fits in the pipe's buffer, so it is all there once the
     * child is gone. */
    n = read(fds[0], o, sizeof(*o));
    close(fds[0]);
    if (w < 0 || n != (ssize_t)sizeof(*o))
        memset(o, 0, sizeof(*o));
    o->wait_status = w < 0 ? -1 : status;
    return 1;
}

/* The checks both cases share: token_set_add came back, and the child
 * ended without a crash or a sanitizer report. */
static void check_returned(const char *what, int done, const struct outcome *o)
{
    if (!done)
        tap_ok(0, "%s: token_set_add hung, child killed after %d s", what,
               DEADLINE_S);
    else
        tap_ok(o->complete, "%s: token_set_add returns (%ld ms)", what,
               o->add_ms);
}

static void check_exit(const char *what, const struct outcome *o)
{
    tap_ok(o->complete && WIFEXITED(o->wait_status) &&
               WEXITSTATUS(o->wait_status) == 0,
           "%s: child exits cleanly (status 0x%x)", what,
           (unsigned)o->wait_status);
}

/* The probe's case: libp11 would wait forever for a session. */
static void test_open_fails(void)
{
    const char *what = "C_OpenSession failing";
    struct outcome o;
    int done = run_child(1, &o);

    check_returned(what, done, &o);
    tap_ok(done && o.added, "%s: token still added%s%s", what,
           o.error[0] != '\0' ? ": " : "", o.error);
    tap_ok(done && o.added && !o.ready &&
               strstr(o.reason, "CKR_DEVICE_ERROR") != NULL,
           "%s: token down, \"%s\"", what, o.reason);
    tap_ok(done && o.added && !o.signs &&
               o.acquire_status == TOKEN_ERR_UNAVAILABLE,
           "%s: acquire is TOKEN_ERR_UNAVAILABLE", what);
    check_exit(what, &o);
}

/* The same token through the same module, nothing injected: the wrapper
 * forwards, so the failure above is the injected one. */
static void test_open_forwarded(void)
{
    const char *what = "C_OpenSession forwarded";
    struct outcome o;
    int done = run_child(0, &o);

    check_returned(what, done, &o);
    tap_ok(done && o.added && o.ready, "%s: token ready%s%s%s%s", what,
           o.error[0] != '\0' ? ": " : "", o.error,
           o.reason[0] != '\0' ? ": " : "", o.reason);
    tap_ok(done && o.signs && o.acquire_status == TOKEN_OK,
           "%s: key acquired for signing, signature verifies with the "
           "certificate",
           what);
    check_exit(what, &o);
}

int main(void)
{
    if (!have_tools()) {
        printf("1..0 # SKIP SoftHSMv2 tools or module missing\n");
        return 77;
    }
    strcpy(dir, "/tmp/smimed-probe-XXXXXX");
    if (mkdtemp(dir) == NULL) {
        tap_ok(0, "mkdtemp");
        return tap_done();
    }
    if (tap_ok(setup_token(), "softhsm: token, RSA key and certificate")) {
        test_open_fails();
        test_open_forwarded();
    } else {
        sh("sed 's/^/# /' %s/setup.log", dir);
    }
    sh("rm -rf %s", dir);
    return tap_done();
}
