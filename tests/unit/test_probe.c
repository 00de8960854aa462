/*
 * token/ against a token that fails on demand: the module is
 * tests/unit/faulty_p11.c in front of a real SoftHSMv2 token.
 *
 * - A token whose sessions cannot be opened is reported down instead of
 *   hanging token_set_add inside libp11 (see the top of token/set.c);
 *   FAULTY_P11_FAIL_OPEN=1 makes C_OpenSession fail with CKR_DEVICE_ERROR.
 * - A token that breaks at run time (FAULTY_P11_FLAG: "removed") is found
 *   by token_key_check_fault, goes down, wakes the requests waiting for it,
 *   and comes back through the recovery thread's rebuild once the fault is
 *   gone; an operation that fails while the token answers ("refuse")
 *   leaves it up, and is the token's fault when the token fails a check
 *   operation of its own on the key too; sessions that went stale while
 *   the process stayed logged in ("stale": the probe passes) are found by
 *   that check and re-opened at once.
 * - A PIN the token refused is not sent again on reload, nor any PIN while
 *   the process is logged in (FAULTY_P11_LOG counts the C_Login calls).
 *
 * Each case runs in a child process the parent waits for with a deadline,
 * so a hang is a failing case rather than a stuck suite; it also gives each
 * case a process in which libp11 has never touched the slot, which is the
 * state the hang needs. Exits 77 (skip) when the SoftHSM tools are missing.
 */
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tap.h"
#include "testtoken.h"
#include "token/token.h"

#ifndef FAULTY_P11_PATH
#error "tests/meson.build passes the path of the built faulty_p11 module"
#endif

/* MODULE (testtoken.h) is the one faulty_p11 wraps by default. */
#define DEADLINE_S 20

static char dir[64];
static char conf_path[128];
static char pin_path[128];
static char badpin_path[128];
static char otherpin_path[128];
static char flag_path[128];
static char log_path[128];

/* What a child found out, sent to the parent through a pipe, which reports
 * it: the checks as the child made them, then how the child ended. */
#define MAX_CHECKS 24

struct outcome {
    int complete; /* the child got to the end */
    int nchecks;
    struct {
        int ok;
        char what[200];
    } checks[MAX_CHECKS];
    int wait_status; /* filled in by the parent */
};

static int have_tools(void)
{
    return access(FAULTY_P11_PATH, R_OK) == 0 && have_softhsm_tools();
}

/* One token "t" with an RSA key k1 and a certificate for it with the same
 * ID. Made with the real module: the tools are not built with the
 * sanitizers the faulty module is. */
static int setup_token(void)
{
    char tokens[128];

    snprintf(conf_path, sizeof(conf_path), "%s/softhsm2.conf", dir);
    snprintf(pin_path, sizeof(pin_path), "%s/pin", dir);
    snprintf(badpin_path, sizeof(badpin_path), "%s/badpin", dir);
    snprintf(otherpin_path, sizeof(otherpin_path), "%s/otherpin", dir);
    snprintf(flag_path, sizeof(flag_path), "%s/flag", dir);
    snprintf(log_path, sizeof(log_path), "%s/calls", dir);
    snprintf(tokens, sizeof(tokens), "%s/tokens", dir);
    if (!write_softhsm_conf(conf_path, tokens))
        return 0;
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
              "printf '" PIN "\\n' >pin\n"
              "printf '00000000\\n' >badpin\n"
              "printf '11111111\\n' >otherpin\n"
              "chmod 600 pin badpin otherpin\n",
              dir);
}

/* ---- in the child ---- */

__attribute__((format(printf, 3, 4))) static int
check(struct outcome *o, int ok, const char *fmt, ...)
{
    va_list ap;

    /* A case with more checks than room fails its last one visibly. */
    if (o->nchecks == MAX_CHECKS) {
        o->checks[MAX_CHECKS - 1].ok = 0;
        snprintf(o->checks[MAX_CHECKS - 1].what, sizeof(o->checks[0].what),
                 "more than %d checks", MAX_CHECKS);
        return ok;
    }
    o->checks[o->nchecks].ok = ok;
    va_start(ap, fmt);
    vsnprintf(o->checks[o->nchecks].what, sizeof(o->checks[0].what), fmt, ap);
    va_end(ap);
    o->nchecks++;
    return ok;
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&t, &t) < 0)
        ;
}

/* Switches the module's fault: "removed", "refuse", or NULL for none. */
static void set_fault(const char *word)
{
    FILE *f;

    if (word == NULL) {
        unlink(flag_path);
        return;
    }
    f = fopen(flag_path, "w");
    if (f != NULL) {
        fprintf(f, "%s\n", word);
        fclose(f);
    }
}

/* How many times the module saw the call name since watch_calls. */
static int calls(const char *name)
{
    char line[64];
    int n = 0;
    FILE *f = fopen(log_path, "r");

    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        n += strcmp(line, name) == 0;
    }
    fclose(f);
    return n;
}

/* No fault, and an empty call log, as a case begins. */
static void watch_calls(void)
{
    set_fault(NULL);
    unlink(log_path);
    setenv("FAULTY_P11_FLAG", flag_path, 1);
    setenv("FAULTY_P11_LOG", log_path, 1);
}

/* A set with the one token "faulty" holding the key "signer"; NULL only
 * when token_set_add failed. */
static token_set *faulty_set(const char *pin_file, int max_sessions,
                             token_error *err)
{
    const token_key_spec keys[] = {{"signer", "pkcs11:object=k1", NULL, NULL}};
    const token_spec spec = {
        .name = "faulty",
        .module = FAULTY_P11_PATH,
        .uri = "pkcs11:token=t",
        .pin_file = pin_file,
        .max_sessions = max_sessions,
        .wait_ms = 5000,
        .keys = keys,
        .nkeys = 1,
    };

    return set_with(&spec, err);
}

/* What keeps a set from being ready: "" when nothing does. */
static const char *why_not(token_set *set, const token_error *err)
{
    return set == NULL ? err->message : reason_of(set);
}

static token_key *signer(token_set *set)
{
    return set != NULL ? token_set_find_key(set, "signer") : NULL;
}

/* The probe's case: libp11 would wait forever for a session. */
static void case_open_fails(struct outcome *o)
{
    token_error err = {0};
    struct timespec start;
    token_status status;
    token_set *set;

    setenv("FAULTY_P11_FAIL_OPEN", "1", 1);
    clock_gettime(CLOCK_MONOTONIC, &start);
    set = faulty_set(pin_path, 0, &err);
    check(o, 1, "token_set_add returns (%ld ms)", elapsed_ms(&start));
    check(o, set != NULL, "token still added%s%s",
          err.message[0] != '\0' ? ": " : "", err.message);
    check(o, strstr(reason_of(set), "CKR_DEVICE_ERROR") != NULL,
          "token down, \"%s\"", reason_of(set));
    check(o,
          !sign_and_verify(signer(set), &status) &&
              status == TOKEN_ERR_UNAVAILABLE,
          "acquire is TOKEN_ERR_UNAVAILABLE");
    token_set_free(set);
}

/* The same token through the same module, nothing injected: the wrapper
 * forwards, so the failure above is the injected one. */
static void case_open_forwarded(struct outcome *o)
{
    token_error err = {0};
    struct timespec start;
    token_status status;
    token_set *set;

    unsetenv("FAULTY_P11_FAIL_OPEN");
    clock_gettime(CLOCK_MONOTONIC, &start);
    set = faulty_set(pin_path, 0, &err);
    check(o, 1, "token_set_add returns (%ld ms)", elapsed_ms(&start));
    check(o, set != NULL && reason_of(set)[0] == '\0', "token ready%s%s",
          why_not(set, &err)[0] != '\0' ? ": " : "", why_not(set, &err));
    check(o, sign_and_verify(signer(set), &status) && status == TOKEN_OK,
          "key acquired for signing, signature verifies with the "
          "certificate");
    token_set_free(set);
}

struct waiter {
    token_key *key;
    token_status status;
    long ms;
};

/* Waits for the key's only session, which the main thread holds. */
static void *acquire_waiting(void *arg)
{
    struct waiter *w = arg;
    token_error err = {0};
    struct timespec start;
    EVP_PKEY *pkey = NULL;

    clock_gettime(CLOCK_MONOTONIC, &start);
    if (token_key_acquire(w->key, TOKEN_USE_SIGN, &pkey, &err) == 0) {
        token_key_release(w->key);
        err.status = TOKEN_OK;
    }
    w->ms = elapsed_ms(&start);
    w->status = err.status;
    return NULL;
}

/* A token that breaks after it was opened, and comes back. The probe is
 * counted by the C_OpenSession calls the module sees: nothing else opens a
 * session while the token is down. */
static void case_runtime_fault(struct outcome *o)
{
    token_error err = {0};
    struct timespec down_at, probed_at, start;
    struct waiter w = {0};
    EVP_PKEY *pkey = NULL;
    const char *reason = NULL;
    token_status status;
    token_set *set;
    token_key *k;
    pthread_t thread;
    int opens, logins, rc, held, waiting = 0;

    watch_calls();
    if (!check(o, token_recovery_start(NULL, NULL, &err) == 0,
               "recovery thread starts"))
        return;
    /* One session, so a second request waits in token_key_acquire. */
    set = faulty_set(pin_path, 1, &err);
    k = signer(set);
    if (!check(o, k != NULL && reason_of(set)[0] == '\0', "token ready%s%s",
               why_not(set, &err)[0] != '\0' ? ": " : "", why_not(set, &err))) {
        token_set_free(set);
        return;
    }
    check(o, sign_and_verify(k, &status), "signs before the fault");

    set_fault("removed");
    check(o, !sign_and_verify(k, &status) && status == TOKEN_OK,
          "token removed: acquire works, the signature fails");
    /* Hold the only session; the waiter would wait 5 s for it. */
    held = token_key_acquire(k, TOKEN_USE_SIGN, &pkey, &err) == 0;
    w.key = k;
    if (held)
        waiting = pthread_create(&thread, NULL, acquire_waiting, &w) == 0;
    sleep_ms(200);
    rc = token_key_check_fault(k, &err);
    clock_gettime(CLOCK_MONOTONIC, &down_at);
    check(o,
          rc == -1 && err.status == TOKEN_ERR_UNAVAILABLE &&
              strstr(err.message, "CKR_DEVICE_REMOVED") != NULL,
          "token_key_check_fault: -1, TOKEN_ERR_UNAVAILABLE, \"%s\"",
          err.message);
    if (waiting)
        pthread_join(thread, NULL);
    if (held)
        token_key_release(k);
    check(o, waiting && w.status == TOKEN_ERR_UNAVAILABLE && w.ms < 1000,
          "a request waiting for a session is woken and fails (%ld ms)", w.ms);
    reason = reason_of(set);
    check(o, strstr(reason, "CKR_DEVICE_REMOVED") != NULL, "token down: \"%s\"",
          reason);
    opens = calls("C_OpenSession");
    logins = calls("C_Login");
    clock_gettime(CLOCK_MONOTONIC, &start);
    rc = token_key_acquire(k, TOKEN_USE_SIGN, &pkey, &err);
    check(o,
          rc < 0 && err.status == TOKEN_ERR_UNAVAILABLE &&
              elapsed_ms(&start) < 50,
          "acquire fails at once with TOKEN_ERR_UNAVAILABLE (%ld ms)",
          elapsed_ms(&start));
    check(o, calls("C_OpenSession") == opens,
          "not probed again within the first second");

    /* The recovery thread's first attempt comes 1 s after the fault: a
     * rebuild whose probe (one C_OpenSession) fails while removed. */
    while (calls("C_OpenSession") == opens && elapsed_ms(&down_at) < 5000)
        sleep_ms(20);
    check(o,
          calls("C_OpenSession") == opens + 1 && elapsed_ms(&down_at) >= 900 &&
              elapsed_ms(&down_at) < 2500,
          "first recovery attempt about 1 s after the fault (%ld ms, %d "
          "probes)",
          elapsed_ms(&down_at), calls("C_OpenSession") - opens);
    clock_gettime(CLOCK_MONOTONIC, &probed_at);
    check(o, !token_set_token_ready(set, 0, NULL), "still removed: still down");
    set_fault(NULL);
    while (!token_set_token_ready(set, 0, NULL) &&
           elapsed_ms(&probed_at) < 6000)
        sleep_ms(20);
    check(o,
          token_set_token_ready(set, 0, NULL) && elapsed_ms(&probed_at) >= 1500,
          "token back: ready at the next attempt, 2 s after the first (%ld "
          "ms)",
          elapsed_ms(&probed_at));
    check(o, calls("C_Login") == logins + 1,
          "the rebuilt context logged in once more (%d logins)",
          calls("C_Login") - logins);
    check(o, sign_and_verify(k, &status), "signs again");
    token_set_free(set);
    token_recovery_stop();
}

/* An operation that fails while the token answers and does the key's
 * operations for a check is the operation's own failure; one the token
 * refuses for the check too is the token's, and the token stays up. */
static void case_operation_refused(struct outcome *o)
{
    token_error err = {0};
    token_status status;
    token_set *set;
    token_key *k;
    int rc;

    watch_calls();
    set = faulty_set(pin_path, 0, &err);
    k = signer(set);
    if (!check(o, k != NULL && reason_of(set)[0] == '\0', "token ready%s%s",
               why_not(set, &err)[0] != '\0' ? ": " : "", why_not(set, &err))) {
        token_set_free(set);
        return;
    }
    set_fault("refuse");
    check(o, !sign_and_verify(k, &status) && status == TOKEN_OK,
          "the token refuses the signature");
    err.status = TOKEN_OK;
    rc = token_key_check_fault(k, &err);
    check(o,
          rc == -1 && err.status == TOKEN_ERR_UNAVAILABLE &&
              strstr(err.message, "CKR_KEY_FUNCTION_NOT_PERMITTED") != NULL,
          "token_key_check_fault: -1, the check is refused too, \"%s\"",
          err.message);
    check(o, reason_of(set)[0] == '\0', "token still ready");
    set_fault(NULL);
    check(o, sign_and_verify(k, &status), "signs once the token allows it");
    err.status = TOKEN_OK;
    rc = token_key_check_fault(k, &err);
    check(o, rc == 0 && err.status == TOKEN_OK,
          "token_key_check_fault after a signature of its own: 0, the key "
          "works");
    token_set_free(set);
}

/* Sessions dead, the process still logged in: the probe passes, the check
 * operation does not; the module is rebuilt in the caller's thread (one
 * new login) and the operation works on the new context. */
static void case_stale_handles(struct outcome *o)
{
    token_error err = {0};
    token_status status;
    token_set *set;
    token_key *k;
    int rc, logins;

    watch_calls();
    set = faulty_set(pin_path, 0, &err);
    k = signer(set);
    if (!check(o, k != NULL && reason_of(set)[0] == '\0', "token ready%s%s",
               why_not(set, &err)[0] != '\0' ? ": " : "", why_not(set, &err))) {
        token_set_free(set);
        return;
    }
    logins = calls("C_Login");
    set_fault("stale");
    check(o, !sign_and_verify(k, &status) && status == TOKEN_OK,
          "the signature fails on a stale session");
    rc = token_key_check_fault(k, &err);
    check(o, rc == 1, "token_key_check_fault: 1, retry (%d, \"%s\")", rc,
          err.message);
    check(o, reason_of(set)[0] == '\0', "token ready after the rebuild");
    check(o, calls("C_Login") == logins + 1,
          "the rebuilt context logged in once more (%d logins)",
          calls("C_Login") - logins);
    check(o, sign_and_verify(k, &status), "signs on the rebuilt context");
    set_fault(NULL);
    token_set_free(set);
}

/* Each set is a reload: the earlier ones still hold the module, as the old
 * set does while the new one is built. A refused PIN is sent once, and no
 * PIN at all while the process is logged in. */
static void case_pins(struct outcome *o)
{
    token_set *sets[6] = {0};
    token_error err = {0};
    token_status status;
    size_t i;

    watch_calls();
    sets[0] = faulty_set(badpin_path, 0, &err);
    check(o,
          strcmp(reason_of(sets[0]), "login failed: incorrect PIN") == 0 &&
              calls("C_Login") == 1,
          "wrong PIN: one C_Login, down, \"%s\"", reason_of(sets[0]));
    sets[1] = faulty_set(badpin_path, 0, &err);
    check(o,
          strcmp(reason_of(sets[1]),
                 "login failed: this PIN was refused before; not retried "
                 "(fix the PIN and reload)") == 0 &&
              calls("C_Login") == 1,
          "the same wrong PIN again: not sent (%d C_Login), \"%s\"",
          calls("C_Login"), reason_of(sets[1]));
    sets[2] = faulty_set(pin_path, 0, &err);
    check(o,
          reason_of(sets[2])[0] == '\0' && calls("C_Login") == 2 &&
              sign_and_verify(signer(sets[2]), &status),
          "the right PIN: logs in, ready, signs%s%s",
          why_not(sets[2], &err)[0] != '\0' ? ": " : "",
          why_not(sets[2], &err));
    sets[3] = faulty_set(otherpin_path, 0, &err);
    check(o,
          strcmp(reason_of(sets[3]),
                 "the PIN changed while the token is logged in; restart to "
                 "log in with the new PIN") == 0 &&
              calls("C_Login") == 2,
          "another PIN while logged in: not sent, \"%s\"", reason_of(sets[3]));
    sets[4] = faulty_set(badpin_path, 0, &err);
    check(o,
          strstr(reason_of(sets[4]), "refused before; not retried") != NULL &&
              calls("C_Login") == 2,
          "the refused PIN while logged in: not sent, \"%s\"",
          reason_of(sets[4]));
    sets[5] = faulty_set(pin_path, 0, &err);
    check(o, reason_of(sets[5])[0] == '\0' && calls("C_Login") == 2,
          "the same right PIN: ready without another C_Login%s%s",
          why_not(sets[5], &err)[0] != '\0' ? ": " : "",
          why_not(sets[5], &err));
    for (i = 0; i < 5; i++)
        token_set_free(sets[i]);
    check(o, sign_and_verify(signer(sets[5]), &status),
          "the last set still signs once the others are freed");
    token_set_free(sets[5]);
}

/* ---- in the parent ---- */

/* Runs fn in a child and waits at most DEADLINE_S for it. Returns 0 when
 * the child hung and was killed; otherwise 1, with *o as far as the child
 * got (a crash leaves o->complete 0). */
static int run_child(void (*fn)(struct outcome *), struct outcome *o)
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
        fn(o);
        o->complete = 1;
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

/* Reports a case: its checks, then that the child ended without a hang, a
 * crash or a sanitizer report. */
static void run_case(const char *what, void (*fn)(struct outcome *))
{
    struct outcome o;
    int i;

    if (!run_child(fn, &o)) {
        tap_ok(0, "%s: hung, child killed after %d s", what, DEADLINE_S);
        return;
    }
    for (i = 0; i < o.nchecks; i++)
        tap_ok(o.checks[i].ok, "%s: %s", what, o.checks[i].what);
    tap_ok(o.complete && WIFEXITED(o.wait_status) &&
               WEXITSTATUS(o.wait_status) == 0,
           "%s: child exits cleanly (status 0x%x)", what,
           (unsigned)o.wait_status);
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
        run_case("C_OpenSession failing", case_open_fails);
        run_case("C_OpenSession forwarded", case_open_forwarded);
        run_case("fault at run time", case_runtime_fault);
        run_case("operation refused", case_operation_refused);
        run_case("stale handles", case_stale_handles);
        run_case("PINs on reload", case_pins);
    } else {
        sh("sed 's/^/# /' %s/setup.log", dir);
    }
    sh("rm -rf %s", dir);
    return tap_done();
}
