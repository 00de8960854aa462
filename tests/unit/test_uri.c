/*
 * token/: PKCS#11 URI parsing, PIN files, and token_set against a real
 * SoftHSMv2 token built in a temporary directory with the command-line
 * tools (softhsm2-util, pkcs11-tool, openssl). Exits 77 (skip) when those
 * tools are missing.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#include "tap.h"
#include "testtoken.h"
#include "token/token.h"

static char dir[64];

/* Files under dir the token tests use. */
static struct {
    char conf[128];
    char tokens[128];
    char pin[128];
    char badpin[128];
    char ca[128];
    char k2_cert[128];
    char expired_cert[128];
    char ku_cert[128];
} files;

static void set_paths(void)
{
    snprintf(files.conf, sizeof(files.conf), "%s/softhsm2.conf", dir);
    snprintf(files.tokens, sizeof(files.tokens), "%s/tokens", dir);
    snprintf(files.pin, sizeof(files.pin), "%s/pin", dir);
    snprintf(files.badpin, sizeof(files.badpin), "%s/badpin", dir);
    snprintf(files.ca, sizeof(files.ca), "%s/ca.pem", dir);
    snprintf(files.k2_cert, sizeof(files.k2_cert), "%s/k2.pem", dir);
    snprintf(files.expired_cert, sizeof(files.expired_cert),
             "%s/k1-expired.pem", dir);
    snprintf(files.ku_cert, sizeof(files.ku_cert), "%s/k1-ku.pem", dir);
}

/* ---- URIs ---- */

static int uri_fails(const char *text, const char *needle)
{
    token_uri u = {0};
    token_error err = {0};
    int failed = token_uri_parse(text, &u, &err) < 0;

    if (!failed)
        token_uri_clear(&u);
    return failed && err.status == TOKEN_ERR_CONFIG &&
           strstr(err.message, needle) != NULL;
}

static void test_uri(void)
{
    static const unsigned char want_id[] = {0x01, 0x00, 0xff, 0xab};
    token_uri u = {0};
    token_error err = {0};
    int ok;

    ok = token_uri_parse("pkcs11:token=My%20Token;manufacturer=ACME%20Inc;"
                         "serial=0042;model=M%2fX;slot-id=42;"
                         "object=k%3b1;id=%01%00%ff%AB;type=private"
                         "?pin-source=file:%2Fetc%2Fpin",
                         &u, &err) == 0;
    tap_ok(ok, "uri: all attributes parse%s%s", ok ? "" : ": ",
           ok ? "" : err.message);
    tap_ok(ok && strcmp(u.token, "My Token") == 0, "uri: token decoded");
    tap_ok(ok && strcmp(u.manufacturer, "ACME Inc") == 0,
           "uri: manufacturer decoded");
    tap_ok(ok && strcmp(u.serial, "0042") == 0, "uri: serial");
    tap_ok(ok && strcmp(u.model, "M/X") == 0, "uri: model, lowercase escape");
    tap_ok(ok && strcmp(u.object, "k;1") == 0, "uri: object with escaped ;");
    tap_ok(ok && u.has_slot_id && u.slot_id == 42, "uri: slot-id");
    tap_ok(ok && u.id_len == sizeof(want_id) &&
               memcmp(u.id, want_id, sizeof(want_id)) == 0,
           "uri: binary id with NUL and high bytes");
    token_uri_clear(&u);
    tap_ok(u.token == NULL && u.id == NULL && !u.has_slot_id,
           "uri: clear resets every field");

    ok = token_uri_parse("PKCS11:object=a b", &u, &err) == 0;
    tap_ok(ok && strcmp(u.object, "a b") == 0 && u.token == NULL &&
               u.id == NULL && !u.has_slot_id,
           "uri: scheme case-insensitive, literal space, absent fields");
    token_uri_clear(&u);

    ok = token_uri_parse("pkcs11:id=%00", &u, &err) == 0;
    tap_ok(ok && u.id_len == 1 && u.id[0] == 0, "uri: one-byte zero id");
    token_uri_clear(&u);

    u.token = (char *)"sentinel";
    tap_ok(token_uri_parse("pkcs11:tokn=x", &u, &err) < 0 &&
               strcmp(u.token, "sentinel") == 0,
           "uri: output untouched on failure");
    u.token = NULL;

    tap_ok(uri_fails("pkcs11:tokn=x", "\"tokn\""),
           "uri: unknown attribute named");
    tap_ok(uri_fails("pkcs11:token=a%zz", "\"token\"") &&
               uri_fails("pkcs11:token=a%zz", "percent"),
           "uri: bad escape names the attribute");
    tap_ok(uri_fails("pkcs11:id=%0", "\"id\""), "uri: truncated escape");
    tap_ok(uri_fails("pkcs11:id=%", "percent"), "uri: lone percent");
    tap_ok(uri_fails("token=a", "pkcs11:"), "uri: missing scheme");
    tap_ok(uri_fails("pkcs12:token=a", "pkcs11:"), "uri: wrong scheme");
    tap_ok(uri_fails("pkcs11:token=a;token=b", "twice"),
           "uri: duplicate attribute");
    tap_ok(uri_fails("", "empty"), "uri: empty string");
    tap_ok(uri_fails("pkcs11:", "selects nothing"), "uri: empty path");
    tap_ok(uri_fails("pkcs11:type=private", "selects nothing"),
           "uri: type alone selects nothing");
    tap_ok(uri_fails("pkcs11:token=", "empty value"), "uri: empty value");
    tap_ok(uri_fails("pkcs11:token", "no '='"), "uri: attribute without =");
    tap_ok(uri_fails("pkcs11:token=a;", "empty attribute"),
           "uri: trailing semicolon");
    tap_ok(uri_fails("pkcs11:token=a;;object=b", "empty attribute"),
           "uri: empty attribute between semicolons");
    tap_ok(uri_fails("pkcs11:object=a;type=cert", "type"),
           "uri: type other than private");
    tap_ok(uri_fails("pkcs11:token=a;library-manufacturer=x",
                     "\"library-manufacturer\""),
           "uri: library-* refused");
    tap_ok(
        uri_fails("pkcs11:token=a;slot-description=x", "\"slot-description\""),
        "uri: slot-description refused");
    tap_ok(uri_fails("pkcs11:token=a?pin-value=1234", "pin-value") &&
               !uri_fails("pkcs11:token=a?pin-value=1234", "1234"),
           "uri: pin-value refused without echoing it");
    tap_ok(uri_fails("pkcs11:token=a?module-path=/x.so", "module-path"),
           "uri: module-path refused");
    tap_ok(uri_fails("pkcs11:token=a%00b", "NUL"), "uri: NUL in text");
    tap_ok(uri_fails("pkcs11:slot-id=12a", "slot-id"),
           "uri: slot-id not a number");
    tap_ok(uri_fails("pkcs11:slot-id=99999999999999999999999", "slot-id"),
           "uri: slot-id overflow");
    tap_ok(uri_fails("pkcs11:token=a#frag", "fragment"), "uri: fragment");
    tap_ok(uri_fails("pkcs11:token=a\tb", "control"), "uri: control character");
}

/* ---- PINs ---- */

static char *pin_from(const char *content, size_t len, token_error *err)
{
    char path[] = "/tmp/smimed-pin-XXXXXX";
    char *pin;
    int fd = mkstemp(path);

    if (fd < 0 || write(fd, content, len) != (ssize_t)len) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    close(fd);
    pin = token_pin_read_file(path, err);
    unlink(path);
    return pin;
}

static void check_pin(const char *content, const char *want, const char *name)
{
    token_error err = {0};
    char *pin = pin_from(content, strlen(content), &err);

    tap_ok(pin != NULL && strcmp(pin, want) == 0, "pin file: %s", name);
    token_pin_free(pin);
}

static void check_pin_error(const char *content, size_t len, const char *name)
{
    token_error err = {0};
    char *pin = pin_from(content, len, &err);

    tap_ok(pin == NULL && err.status == TOKEN_ERR_CONFIG &&
               strstr(err.message, "/tmp/smimed-pin-") != NULL,
           "pin file: %s refused (%s)", name, err.message);
    token_pin_free(pin);
}

/* A PIN file open to group or others is refused, by the read and by the
 * check the config loader runs, naming the file and the fix. */
static void check_pin_mode(mode_t mode, int ok, const char *name)
{
    char path[] = "/tmp/smimed-pin-XXXXXX";
    token_error err = {0}, cerr = {0};
    char *pin = NULL;
    int fd = mkstemp(path), checked = -1;

    if (fd >= 0 && write(fd, "1234\n", 5) == 5 && fchmod(fd, mode) == 0) {
        pin = token_pin_read_file(path, &err);
        checked = token_pin_check_file(path, &cerr);
    }
    if (fd >= 0)
        close(fd);
    unlink(path);
    if (ok)
        tap_ok(pin != NULL && strcmp(pin, "1234") == 0 && checked == 0,
               "pin file: %s", name);
    else
        tap_ok(pin == NULL && checked == -1 &&
                   strstr(err.message, "chmod 600") != NULL &&
                   strstr(err.message, path) != NULL &&
                   strcmp(err.message, cerr.message) == 0,
               "pin file: %s (%s)", name, err.message);
    token_pin_free(pin);
}

static void test_pin(void)
{
    token_error err = {0};
    char *pin;

    check_pin("1234\n", "1234", "newline stripped");
    check_pin("1234\r\n", "1234", "CRLF stripped");
    check_pin("1234", "1234", "no newline");
    check_pin("12 34 \nsecond line\n", "12 34 ",
              "first line only, spaces kept");
    check_pin_error("", 0, "empty file");
    check_pin_error("\nsecret\n", 9, "empty first line");
    check_pin_error("\r\n", 2, "CRLF only");
    check_pin_error("12\0"
                    "34\n",
                    6, "NUL byte");

    check_pin_mode(0600, 1, "mode 0600 accepted");
    check_pin_mode(0400, 1, "mode 0400 accepted");
    check_pin_mode(0640, 0, "mode 0640 refused");
    check_pin_mode(0604, 0, "mode 0604 refused");
    check_pin_mode(0620, 0, "mode 0620 refused");

    pin = token_pin_read_file("/nonexistent/smimed/pin", &err);
    tap_ok(pin == NULL && err.status == TOKEN_ERR_CONFIG &&
               strstr(err.message, "/nonexistent/smimed/pin") != NULL,
           "pin file: missing file named in the error");

    setenv("SMIMED_TEST_PIN_ENV", "9876", 1);
    pin = token_pin_read_env("SMIMED_TEST_PIN_ENV", &err);
    tap_ok(pin != NULL && strcmp(pin, "9876") == 0, "pin env: read");
    token_pin_free(pin);
    tap_ok(getenv("SMIMED_TEST_PIN_ENV") == NULL &&
               token_pin_env_available("SMIMED_TEST_PIN_ENV"),
           "pin env: moved out of the environment, still available");
    pin = token_pin_read_env("SMIMED_TEST_PIN_ENV", &err);
    tap_ok(pin != NULL && strcmp(pin, "9876") == 0,
           "pin env: read again from locked memory");
    token_pin_free(pin);
    setenv("SMIMED_TEST_PIN_ENV", "", 1);
    pin = token_pin_read_env("SMIMED_TEST_PIN_ENV", &err);
    tap_ok(pin == NULL && err.status == TOKEN_ERR_CONFIG, "pin env: empty");
    unsetenv("SMIMED_TEST_PIN_ENV");
    pin = token_pin_read_env("SMIMED_TEST_PIN_ENV", &err);
    tap_ok(pin == NULL && strstr(err.message, "SMIMED_TEST_PIN_ENV") != NULL,
           "pin env: unset, named in the error");
}

/* ---- SoftHSM ---- */

static int setup_tokens(void)
{
    if (!write_softhsm_conf(files.conf, files.tokens))
        return 0;
    /* One script, logged to setup.log, shown on failure. */
    return sh(
        "cd %s && exec >setup.log 2>&1 && set -ex\n"
        "M=" MODULE "\n"
        "softhsm2-util --init-token --free --label t --pin " PIN
        " --so-pin 27182818\n"
        "softhsm2-util --init-token --free --label u --pin " PIN
        " --so-pin 27182818\n"
        "p11() { t=$1; shift; pkcs11-tool --module $M --token-label $t "
        "--login --pin " PIN " \"$@\"; }\n"
        "p11 t --keypairgen --key-type rsa:2048 --id 01 --label k1\n"
        "p11 t --keypairgen --key-type EC:prime256v1 --id 02 --label k2\n"
        "p11 t --keypairgen --key-type EC:prime256v1 --id 03 --label k3\n"
        "p11 u --keypairgen --key-type EC:secp521r1 --id 11 --label u1\n"
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
        "-nodes -keyout ca.key -out ca.pem -subj /CN=test-ca -days 30\n"
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
        "-nodes -keyout /dev/null -subj /CN=any -out any.csr\n"
        "printf 'keyUsage=critical,digitalSignature,keyEncipherment\\n"
        "extendedKeyUsage=emailProtection\\n' >good.ext\n"
        "printf 'keyUsage=critical,keyEncipherment\\n' >ku.ext\n"
        "cert() { openssl x509 -req -in any.csr -force_pubkey $2 -CA ca.pem "
        "-CAkey ca.key -extfile $3 -days $4 -subj /CN=$1 -out $1.pem; }\n"
        "onto() { p11 $1 --read-object --type pubkey --id $2 -o $3.der\n"
        "  openssl pkey -pubin -inform DER -in $3.der -out $3.pub\n"
        "  cert $3 $3.pub good.ext 30\n"
        "  openssl x509 -in $3.pem -outform DER -out $3.cder\n"
        "  p11 $1 --write-object $3.cder --type cert --id $2 --label $3; }\n"
        "onto t 01 k1\n"
        "onto t 02 k2\n"
        "onto u 11 u1\n"
        "cert k1-expired k1.pub good.ext -1\n"
        "cert k1-ku k1.pub ku.ext 30\n"
        "printf '" PIN "\\n' >pin\n"
        "printf '00000000\\n' >badpin\n"
        "chmod 600 pin badpin\n",
        dir);
}

static int key_reason_is(token_set *set, const char *name, const char *want)
{
    token_key *k = token_set_find_key(set, name);
    const char *reason = NULL;

    return k != NULL && !token_key_usable(k, TOKEN_USE_SIGN, &reason) &&
           reason != NULL && strncmp(reason, want, strlen(want)) == 0;
}

struct worker {
    token_key *key;
    int failures;
};

static void *sign_loop(void *arg)
{
    struct worker *w = arg;
    int i;

    for (i = 0; i < 25; i++)
        w->failures += !sign_and_verify(w->key, NULL);
    return NULL;
}

/* wait_ms 0: no wait at all once every session is in use. A second set on
 * the same token has its own count. */
static void test_no_wait(const token_spec *u_spec)
{
    token_spec spec = *u_spec;
    token_set *set = token_set_new();
    token_error err = {0};
    struct timespec start;
    EVP_PKEY *pkey = NULL;
    token_key *k;
    int ok;

    spec.wait_ms = 0;
    ok = token_set_add(set, &spec, &err) == 0 &&
         (k = token_set_find_key(set, "u1")) != NULL &&
         token_key_acquire(k, TOKEN_USE_SIGN, &pkey, &err) == 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    tap_ok(ok && token_key_acquire(k, TOKEN_USE_SIGN, &pkey, &err) < 0 &&
               err.status == TOKEN_ERR_BUSY && elapsed_ms(&start) < 50,
           "busy: wait_ms 0 fails at once");
    if (ok)
        token_key_release(k);
    token_set_free(set);
}

static void test_main_set(void)
{
    const token_key_spec t_keys[] = {
        {"signer", "pkcs11:object=k1;type=private", NULL, NULL},
        {"k2", "pkcs11:id=%02", NULL, NULL},
        {"mismatch", "pkcs11:object=k1", files.k2_cert, NULL},
        {"expired", "pkcs11:id=%01", files.expired_cert, NULL},
        {"ku", "pkcs11:token=t;object=k1", files.ku_cert, NULL},
        {"missing", "pkcs11:object=nope", NULL, NULL},
        {"elsewhere", "pkcs11:token=u;object=k1", NULL, NULL},
    };
    const token_spec t_spec = {
        .name = "hsm",
        .module = MODULE,
        .uri = "pkcs11:token=t;model=SoftHSM%20v2",
        .pin_file = files.pin,
        .chain_file = files.ca,
        .discovery = 1,
        .keys = t_keys,
        .nkeys = sizeof(t_keys) / sizeof(t_keys[0]),
    };
    const token_spec u_spec = {
        .module = MODULE,
        .uri = "pkcs11:token=u",
        .pin_env = "SMIMED_TEST_PIN",
        .discovery = 1,
        .max_sessions = 1,
        .wait_ms = 100,
    };
    const token_key_spec ghost_keys[] = {
        {"ghost-key", "pkcs11:object=k1", NULL, NULL},
    };
    const token_spec ghost_spec = {
        .name = "ghost",
        .module = MODULE,
        .uri = "pkcs11:token=nothing-here",
        .pin_file = files.pin,
        .optional = 1,
        .keys = ghost_keys,
        .nkeys = 1,
    };
    token_set *set = token_set_new();
    token_error err = {0};
    const char *reason = NULL;
    EVP_PKEY *p1 = NULL, *p2 = NULL;
    struct worker workers[4];
    pthread_t threads[4];
    struct timespec start;
    token_key *k;
    int rc, ok, i;

    setenv("SMIMED_TEST_PIN", PIN, 1);
    ok = token_set_add(set, &t_spec, &err) == 0;
    tap_ok(ok, "set: add token t%s%s", ok ? "" : ": ", ok ? "" : err.message);
    ok = token_set_add(set, &u_spec, &err) == 0;
    tap_ok(ok, "set: add token u, PIN from env%s%s", ok ? "" : ": ",
           ok ? "" : err.message);
    tap_ok(token_set_count_tokens(set) == 2 &&
               strcmp(token_set_token_name(set, 0), "hsm") == 0 &&
               strcmp(token_set_token_name(set, 1), "u") == 0,
           "set: two tokens, unnamed one named by its label");
    tap_ok(token_set_token_ready(set, 0, &reason) &&
               token_set_token_ready(set, 1, &reason),
           "set: both tokens ready");
    /* 7 configured; discovery adds k1 (not k2: configured under that
     * name; not k3: no certificate) on t and u1 on u. */
    tap_ok(token_set_count_keys(set) == 9, "set: 9 keys (%zu)",
           token_set_count_keys(set));
    tap_ok(token_set_find_key(set, "k1") != NULL &&
               token_set_find_key(set, "u1") != NULL &&
               token_set_find_key(set, "k3") == NULL,
           "discovery: labelled keys with a certificate only");

    k = token_set_find_key(set, "signer");
    tap_ok(k != NULL && token_key_usable(k, TOKEN_USE_SIGN, &reason) &&
               strcmp(token_key_algorithm(k), "rsa-2048") == 0 &&
               strcmp(token_key_token_name(k), "hsm") == 0,
           "key signer: usable rsa-2048 on hsm");
    tap_ok(k != NULL && token_key_cert0(k) != NULL &&
               token_key_chain0(k) != NULL &&
               sk_X509_num(token_key_chain0(k)) == 1,
           "key signer: token certificate and chain");
    tap_ok(k != NULL && sign_and_verify(k, NULL),
           "key signer: RSA SHA-256 signature verifies with the certificate");
    k = token_set_find_key(set, "k2");
    tap_ok(k != NULL && token_key_usable(k, TOKEN_USE_SIGN, NULL) &&
               strcmp(token_key_algorithm(k), "ec-p256") == 0 &&
               sign_and_verify(k, NULL),
           "key k2 (by id): ec-p256, ECDSA signature verifies");
    k = token_set_find_key(set, "u1");
    tap_ok(k != NULL && token_key_usable(k, TOKEN_USE_SIGN, NULL) &&
               strcmp(token_key_algorithm(k), "ec-p521") == 0 &&
               sign_and_verify(k, NULL),
           "key u1 (discovered): ec-p521, signature verifies");
    tap_ok(key_reason_is(set, "mismatch",
                         "certificate does not match the private key"),
           "key mismatch: not usable, reason");
    tap_ok(key_reason_is(set, "expired", "certificate expired on 20"),
           "key expired: not usable, reason");
    tap_ok(key_reason_is(set, "ku",
                         "certificate key usage does not allow "
                         "digitalSignature"),
           "key ku: keyEncipherment only refused");
    k = token_set_find_key(set, "ku");
    tap_ok(k != NULL && token_key_usable(k, TOKEN_USE_DECRYPT, NULL),
           "key ku: keyEncipherment only is usable for decryption");
    k = token_set_find_key(set, "expired");
    tap_ok(k != NULL && token_key_usable(k, TOKEN_USE_DECRYPT, NULL),
           "key expired: still usable for decryption (old mail)");
    k = token_set_find_key(set, "mismatch");
    tap_ok(k != NULL && !token_key_usable(k, TOKEN_USE_DECRYPT, NULL),
           "key mismatch: not usable for decryption either");
    tap_ok(key_reason_is(set, "missing", "no private key on the token"),
           "key missing: not usable, reason");
    tap_ok(key_reason_is(set, "elsewhere", "the key URI names a different"),
           "key URI naming another token: not usable");
    k = token_set_find_key(set, "expired");
    tap_ok(k != NULL && token_key_acquire(k, TOKEN_USE_SIGN, &p1, &err) < 0 &&
               err.status == TOKEN_ERR_UNAVAILABLE && p1 == NULL,
           "acquire: unusable key is TOKEN_ERR_UNAVAILABLE");

    /* max_sessions 1, wait_ms 100 on u. */
    k = token_set_find_key(set, "u1");
    tap_ok(k != NULL && token_key_acquire(k, TOKEN_USE_SIGN, &p1, &err) == 0 &&
               p1 != NULL,
           "busy: first acquire");
    clock_gettime(CLOCK_MONOTONIC, &start);
    rc = k != NULL ? token_key_acquire(k, TOKEN_USE_SIGN, &p2, &err) : 0;
    tap_ok(rc < 0 && err.status == TOKEN_ERR_BUSY && p2 == NULL &&
               elapsed_ms(&start) >= 90,
           "busy: second acquire waits ~100 ms, then TOKEN_ERR_BUSY (%s)",
           err.message);
    if (k != NULL)
        token_key_release(k);
    tap_ok(k != NULL && token_key_acquire(k, TOKEN_USE_SIGN, &p2, &err) == 0,
           "busy: acquire again after release");
    if (k != NULL)
        token_key_release(k);
    test_no_wait(&u_spec);

    for (i = 0; i < 4; i++) {
        workers[i].key = token_set_find_key(set, i % 2 ? "signer" : "k2");
        workers[i].failures = 0;
        pthread_create(&threads[i], NULL, sign_loop, &workers[i]);
    }
    rc = 0;
    for (i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        rc += workers[i].failures;
    }
    tap_ok(rc == 0, "threads: 100 concurrent signatures (%d failed)", rc);

    ok = token_set_add(set, &ghost_spec, &err) == 0;
    tap_ok(ok && token_set_count_tokens(set) == 3 &&
               !token_set_token_ready(set, 2, &reason) &&
               strcmp(reason, "no initialised token matches the URI") == 0 &&
               token_set_token_optional(set, 2),
           "token URI matching nothing: added down, with reason");
    tap_ok(key_reason_is(set, "ghost-key", "no initialised token"),
           "token down: its key not usable, token reason");
    k = token_set_find_key(set, "ghost-key");
    tap_ok(k != NULL && token_key_acquire(k, TOKEN_USE_SIGN, &p1, &err) < 0 &&
               err.status == TOKEN_ERR_UNAVAILABLE,
           "token down: acquire is TOKEN_ERR_UNAVAILABLE");

    {
        token_spec bad = t_spec;
        token_key_spec bad_key = {"other", "pkcs11:object=k1",
                                  "/nonexistent/cert.pem", NULL};

        bad.name = "again";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "signer") != NULL,
               "config: key name used twice (%s)", err.message);
        bad.keys = NULL;
        bad.nkeys = 0;
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "already configured as hsm") != NULL,
               "config: same token twice (%s)", err.message);
        bad.uri = "pkcs11:token=t;tokn=x";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "again") != NULL &&
                   strstr(err.message, "tokn") != NULL,
               "config: bad token URI (%s)", err.message);
        bad.uri = "pkcs11:token=t;object=k1";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG,
               "config: token URI naming an object (%s)", err.message);
        bad.uri = t_spec.uri;
        bad.pin_file = "/nonexistent/pin";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "/nonexistent/pin") != NULL,
               "config: unreadable PIN file (%s)", err.message);
        bad.pin_file = t_spec.pin_file;
        bad.module = "/nonexistent/module.so";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "/nonexistent/module.so") != NULL,
               "config: unloadable module (%s)", err.message);
        bad.module = MODULE;
        bad.keys = &bad_key;
        bad.nkeys = 1;
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "/nonexistent/cert.pem") != NULL,
               "config: unreadable certificate file (%s)", err.message);
        bad_key.cert_file = NULL;
        bad_key.uri = "pkcs11:token=t";
        ok = token_set_add(set, &bad, &err) < 0;
        tap_ok(ok && err.status == TOKEN_ERR_CONFIG &&
                   strstr(err.message, "object= or id=") != NULL,
               "config: key URI without object or id (%s)", err.message);
        tap_ok(token_set_count_tokens(set) == 3 &&
                   token_set_count_keys(set) == 10,
               "config errors leave the set unchanged");
    }
    token_set_free(set);
}

/* A reload builds the new set while the old one still serves; freeing the
 * old one must not finalise the module under the new one, even when the
 * two name it by different paths. */
static void test_two_sets(void)
{
    char real[4096];
    token_spec spec = {
        .module = MODULE,
        .uri = "pkcs11:token=t",
        .pin_file = files.pin,
        .discovery = 1,
    };
    token_set *a = token_set_new(), *b = token_set_new();
    token_error err = {0};
    token_key *k;
    int ok;

    ok = token_set_add(a, &spec, &err) == 0;
    if (realpath(MODULE, real) != NULL)
        spec.module = real;
    ok = ok && token_set_add(b, &spec, &err) == 0;
    tap_ok(ok, "reload: two sets on one token, module by two paths%s%s",
           ok ? "" : ": ", ok ? "" : err.message);
    token_set_free(a);
    k = token_set_find_key(b, "k1");
    tap_ok(k != NULL && sign_and_verify(k, NULL),
           "reload: the new set still signs after the old one is freed");
    token_set_free(b);
}

static void test_wrong_pin(void)
{
    const token_key_spec keys[] = {{"signer", "pkcs11:object=k1", NULL, NULL}};
    const token_spec spec = {
        .name = "hsm",
        .module = MODULE,
        .uri = "pkcs11:token=t",
        .pin_file = files.badpin,
        .keys = keys,
        .nkeys = 1,
    };
    token_set *set = token_set_new();
    token_error err = {0};
    const char *reason = "";
    int ok, ready;

    ok = token_set_add(set, &spec, &err) == 0;
    tap_ok(ok, "wrong PIN: token still added%s%s", ok ? "" : ": ",
           ok ? "" : err.message);
    ready = ok && token_set_token_ready(set, 0, &reason);
    tap_ok(ok && !ready && strcmp(reason, "login failed: incorrect PIN") == 0,
           "wrong PIN: token down, \"%s\"", reason);
    tap_ok(key_reason_is(set, "signer", "login failed: incorrect PIN"),
           "wrong PIN: key not usable");
    token_set_free(set);
}

/* SoftHSM sets "user PIN count low" on token t after a wrong PIN and
 * clears it after a right one. 1 when the flags show it clear. */
static int pin_counter_clear(void)
{
    return sh("pkcs11-tool --module " MODULE " -L 2>/dev/null | "
              "grep -A3 'token label *: t$' | grep 'token flags' | "
              "grep -vq 'count low'");
}

/* A reload builds its set while the old one holds the login: a PIN is not
 * sent again once refused, nor while the process is logged in. */
static void test_pin_reload(void)
{
    const token_key_spec keys[] = {{"signer", "pkcs11:object=k1", NULL, NULL}};
    token_spec good = {
        .name = "hsm",
        .module = MODULE,
        .uri = "pkcs11:token=t",
        .pin_file = files.pin,
        .keys = keys,
        .nkeys = 1,
    };
    token_spec bad = good;
    token_set *a, *b, *c;

    bad.pin_file = files.badpin;
    a = set_with(&good, NULL);
    tap_ok(a != NULL && reason_of(a)[0] == '\0' && pin_counter_clear(),
           "pin reload: right PIN, ready, SoftHSM PIN counter clear%s%s",
           reason_of(a)[0] != '\0' ? ": " : "", reason_of(a));
    b = set_with(&bad, NULL);
    tap_ok(strcmp(reason_of(b),
                  "the PIN changed while the token is logged in; restart to "
                  "log in with the new PIN") == 0,
           "pin reload: wrong PIN while logged in: down, \"%s\"", reason_of(b));
    tap_ok(b != NULL && key_reason_is(b, "signer", "the PIN changed"),
           "pin reload: its key not usable");
    tap_ok(pin_counter_clear(),
           "pin reload: wrong PIN not sent, SoftHSM PIN counter still clear");
    tap_ok(a != NULL && sign_and_verify(token_set_find_key(a, "signer"), NULL),
           "pin reload: the serving set still signs");
    token_set_free(b);
    token_set_free(a);

    /* The module is unloaded: a fresh process as far as the token is
     * concerned. The counter shows this wrong PIN reached the token, so
     * the clear counter above means that one did not. */
    a = set_with(&bad, NULL);
    tap_ok(strcmp(reason_of(a), "login failed: incorrect PIN") == 0 &&
               !pin_counter_clear(),
           "pin reload: wrong PIN at start: sent once, \"%s\"", reason_of(a));
    b = set_with(&bad, NULL);
    tap_ok(strcmp(reason_of(b),
                  "login failed: this PIN was refused before; not retried "
                  "(fix the PIN and reload)") == 0,
           "pin reload: the same wrong PIN: \"%s\"", reason_of(b));
    c = set_with(&good, NULL);
    tap_ok(c != NULL && reason_of(c)[0] == '\0' &&
               sign_and_verify(token_set_find_key(c, "signer"), NULL),
           "pin reload: a fixed PIN logs in and signs%s%s",
           reason_of(c)[0] != '\0' ? ": " : "", reason_of(c));
    token_set_free(c);
    token_set_free(b);
    token_set_free(a);
}

int main(void)
{
    /* The skip status covers the whole program, so decide it before any
     * case is reported. */
    if (!have_softhsm_tools()) {
        printf("1..0 # SKIP SoftHSMv2 tools or module missing\n");
        return 77;
    }
    test_uri();
    test_pin();
    strcpy(dir, "/tmp/smimed-token-XXXXXX");
    if (mkdtemp(dir) == NULL) {
        tap_ok(0, "mkdtemp");
        return tap_done();
    }
    set_paths();
    if (tap_ok(setup_tokens(), "softhsm: tokens, keys and certificates")) {
        test_main_set();
        /* Fresh module load: the earlier sets are gone, so the login below
         * really reaches the token. */
        test_wrong_pin();
        test_two_sets();
        test_pin_reload();
    } else {
        sh("sed 's/^/# /' %s/setup.log", dir);
    }
    sh("rm -rf %s", dir);
    return tap_done();
}
