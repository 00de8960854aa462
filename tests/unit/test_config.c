/*
 * The config validator: every problem reported with its location, all of
 * them at once, and a good config loaded with paths resolved against its
 * folder.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "service/config.h"
#include "tap.h"

static char dir[] = "/tmp/smimed-config-XXXXXX";

static void write_file(const char *name, const char *text)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

static void chmod_file(const char *name, mode_t mode)
{
    char path[256];

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (chmod(path, mode) != 0) {
        perror(path);
        exit(1);
    }
}

/* Loads text as a config; returns it (or NULL) and leaves problems. */
static config *load(const char *text, config_problems *p)
{
    char path[256];

    write_file("smimed.conf", text);
    snprintf(path, sizeof(path), "%s/smimed.conf", dir);
    config_problems_clear(p);
    return config_load(path, p);
}

static int has_problem(const config_problems *p, const char *a, const char *b)
{
    size_t i;

    for (i = 0; i < p->count; i++)
        if (strstr(p->lines[i], a) != NULL &&
            (b == NULL || strstr(p->lines[i], b) != NULL))
            return 1;
    return 0;
}

/* One config with one thing wrong: it fails, naming where and what. */
static void expect_problem(const char *name, const char *text,
                           const char *where, const char *what)
{
    config_problems p = {0};
    config *cfg = load(text, &p);

    tap_ok(cfg == NULL && has_problem(&p, where, what), "%s (%s: %s)", name,
           where, what);
    if (cfg != NULL || !has_problem(&p, where, what)) {
        size_t i;

        for (i = 0; i < p.count; i++)
            printf("# got: %s\n", p.lines[i]);
    }
    config_free(cfg);
    config_problems_clear(&p);
}

#define HASH60 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"

#define TOKEN_OK                                                               \
    "\"module\": \"module.so\", \"uri\": \"pkcs11:token=t\", "                 \
    "\"pin_file\": \"pin\""

static void test_good_clients(void)
{
    config_problems p = {0};
    config *cfg;
    char want[256];

    cfg = load("{\"audit_log\": \"audit.log\", "
               "\"allow_insecure_unauthenticated_listen\": true, "
               "\"tls\": {\"certificate\": \"cert.pem\", \"key\": "
               "\"cert.pem\", \"client_ca\": \"cert.pem\"}, "
               "\"clients\": [{\"name\": \"a\", \"token_sha256\": "
               "\"00ff" HASH60 "\", \"keys\": [\"k1\", \"k2\"], "
               "\"operations\": [\"sign\", \"decrypt\"]}, "
               "{\"name\": \"b\", \"certificate_san\": \"b.example\"}], "
               "\"tokens\": [{" TOKEN_OK ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && p.count == 0, "a config with clients loads");
    if (cfg == NULL)
        return;
    snprintf(want, sizeof(want), "%s/audit.log", dir);
    tap_ok(strcmp(cfg->audit_log, want) == 0 && cfg->tls_client_ca != NULL &&
               cfg->allow_insecure_unauthenticated_listen,
           "audit_log resolved, tls read, insecure override read");
    tap_ok(cfg->nclients == 2 && cfg->clients[0].has_token &&
               cfg->clients[0].token_sha256[0] == 0x00 &&
               cfg->clients[0].token_sha256[1] == 0xff &&
               cfg->clients[0].nkeys == 2 &&
               strcmp(cfg->clients[0].keys[1], "k2") == 0 &&
               cfg->clients[0].ops == (API_OP_SIGN | API_OP_DECRYPT),
           "client a: token hash, keys, operations");
    tap_ok(!cfg->clients[1].has_token &&
               strcmp(cfg->clients[1].cert_san, "b.example") == 0 &&
               cfg->clients[1].nkeys == 0 && cfg->clients[1].ops == 0,
           "client b: a certificate, no rights (default deny)");
    config_free(cfg);
    config_problems_clear(&p);
}

/* min(1 GiB, a quarter of the physical memory), computed apart from the
 * loader's own arithmetic. */
static size_t expected_budget(void)
{
    unsigned long long mem = (unsigned long long)sysconf(_SC_PHYS_PAGES) *
                             (unsigned long long)sysconf(_SC_PAGESIZE);

    return mem / 4 < (1ULL << 30) ? (size_t)(mem / 4) : (size_t)1 << 30;
}

static void test_good(void)
{
    config_problems p = {0};
    config *cfg;
    char want[256];

    cfg = load("{\"listen\": \"127.0.0.1:0\", \"log_level\": \"debug\", "
               "\"max_body_bytes\": 4096, \"tokens\": [{" TOKEN_OK
               ", \"name\": \"hsm\", \"max_sessions\": 4, \"optional\": true, "
               "\"keys\": [{\"name\": \"k1\", \"uri\": "
               "\"pkcs11:object=k%201;id=%01%02\", \"certificate\": "
               "\"cert.pem\"}]}, {" TOKEN_OK ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && p.count == 0, "a good config loads");
    if (cfg == NULL)
        return;
    snprintf(want, sizeof(want), "%s/pin", dir);
    tap_ok(strcmp(cfg->tokens[0].pin_file, want) == 0,
           "relative paths resolve against the config's folder");
    tap_ok(strcmp(cfg->listen, "127.0.0.1:0") == 0 &&
               cfg->max_body_bytes == 4096 && cfg->log_level == LOG_LEVEL_DEBUG,
           "top-level options are read");
    tap_ok(cfg->ntokens == 2 && cfg->tokens[0].nkeys == 1 &&
               strcmp(cfg->tokens[0].keys[0].name, "k1") == 0 &&
               cfg->tokens[0].max_sessions == 4 && cfg->tokens[0].optional &&
               cfg->tokens[1].discovery && cfg->tokens[1].nkeys == 0,
           "tokens and keys are read");
    config_free(cfg);

    cfg = load("{\"max_body_bytes\": 4294968320, \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->max_body_bytes == 4294968320ULL,
           "max_body_bytes past 4 GiB is kept whole");
    config_free(cfg);
    cfg = load("{\"trust\": \".\", \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->trust_dir != NULL && cfg->trust == NULL,
           "a trust directory is kept as a hashed directory");
    config_free(cfg);
    cfg = load("{\"tokens\": [{" TOKEN_OK ", \"discovery\": true}]}", &p);
    tap_ok(cfg != NULL && cfg->max_body_bytes == (size_t)64 << 20 &&
               strcmp(cfg->listen, "127.0.0.1:8080") == 0,
           "defaults: 64 MiB body cap, 127.0.0.1:8080");
    tap_ok(cfg != NULL && cfg->max_connections == 1024 &&
               cfg->max_connections_per_ip == 64 && cfg->header_timeout_s == 10,
           "defaults: 1024 connections, 64 from one address, 10 s for a "
           "request header");
    tap_ok(cfg != NULL && cfg->max_inflight_body_bytes == expected_budget(),
           "default body bytes in flight: a quarter of the memory, at most "
           "1 GiB (%zu)",
           cfg != NULL ? cfg->max_inflight_body_bytes : 0);
    tap_ok(cfg != NULL && cfg->nclients == 0 && cfg->audit_log == NULL &&
               cfg->tls_certificate == NULL &&
               !cfg->allow_insecure_unauthenticated_listen,
           "defaults: no clients, no audit log, no TLS");
    tap_ok(
        cfg != NULL && cfg->workers == (unsigned)sysconf(_SC_NPROCESSORS_ONLN),
        "default workers: one per core (%u)", cfg != NULL ? cfg->workers : 0);
    config_free(cfg);
    cfg = load("{\"workers\": 3, \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->workers == 3, "workers is read");
    config_free(cfg);
    cfg = load("{\"user\": \"daemon\", \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->user != NULL &&
               strcmp(cfg->user, "daemon") == 0 && cfg->user_uid == 1 &&
               cfg->user_gid == 1,
           "user is read with its uid and primary gid");
    config_free(cfg);
    cfg = load("{\"tokens\": [{" TOKEN_OK ", \"discovery\": true}]}", &p);
    tap_ok(cfg != NULL && (geteuid() == 0 ? cfg->user != NULL &&
                                                strcmp(cfg->user, "nobody") == 0
                                          : cfg->user == NULL),
           "default user: nobody when started as root, none otherwise (%s)",
           cfg != NULL && cfg->user != NULL ? cfg->user : "none");
    config_free(cfg);
    /* a worker reads the file without the PIN sources: a PIN file it
     * cannot open and an unset pin_env are no problem to it */
    write_file("w.conf", "{\"tokens\": [{\"module\": \"module.so\", "
                         "\"uri\": \"pkcs11:token=t\", \"pin_file\": "
                         "\"no-such-pin\", \"discovery\": true}, {\"module\": "
                         "\"module.so\", \"uri\": \"pkcs11:token=u\", "
                         "\"pin_env\": \"SMIMED_TEST_UNSET_PIN\", "
                         "\"discovery\": true}]}");
    snprintf(want, sizeof(want), "%s/w.conf", dir);
    cfg = config_load(want, &p);
    tap_ok(cfg == NULL && p.count == 2,
           "config_load: a missing PIN file and an unset pin_env are problems");
    config_free(cfg);
    config_problems_clear(&p);
    cfg = config_load_without_pins(want, &p);
    tap_ok(cfg != NULL && p.count == 0 && cfg->ntokens == 2,
           "config_load_without_pins: they are not");
    config_free(cfg);
    cfg = load("{\"max_body_bytes\": 4294967296, \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->max_inflight_body_bytes == 4294967296ULL,
           "the default budget is never below max_body_bytes");
    config_free(cfg);
    cfg = load("{\"max_body_bytes\": 4096, \"max_inflight_body_bytes\": "
               "4096, \"header_timeout_s\": 3, \"tokens\": [{" TOKEN_OK
               ", \"discovery\": true}]}",
               &p);
    tap_ok(cfg != NULL && cfg->max_inflight_body_bytes == 4096 &&
               cfg->header_timeout_s == 3,
           "max_inflight_body_bytes equal to max_body_bytes, header_timeout_s");
    config_free(cfg);
    test_good_clients();
    config_problems_clear(&p);
}

static void test_problems(void)
{
    config_problems p = {0};
    config *cfg;

    expect_problem("malformed JSON", "{\"tokens\": [}", "smimed.conf",
                   "line 1");
    expect_problem("duplicate JSON key",
                   "{\"listen\": \"a:1\", \"listen\": \"b:2\", \"tokens\": []}",
                   "smimed.conf", "duplicate");
    expect_problem("unknown top-level option",
                   "{\"tokns\": [], \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "smimed.conf", "unknown option \"tokns\"");
    /* found by tests/fuzz/fuzz_config.c: a name from the file put a line
     * break into its problem line */
    expect_problem("a line break in an option name",
                   "{\"a\\nb\\u001b[2J\": 1, \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "smimed.conf", "unknown option \"a?b?[2J\"");
    expect_problem("unknown user",
                   "{\"user\": \"smimed-no-such-user\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "user", "no user \"smimed-no-such-user\"");
    expect_problem("user root",
                   "{\"user\": \"root\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "user", "keep root's privileges");
    expect_problem("tokens missing", "{}", "smimed.conf",
                   "\"tokens\" is "
                   "required");
    expect_problem("tokens empty", "{\"tokens\": []}", "tokens",
                   "at least one");
    expect_problem("wrong type",
                   "{\"tokens\": [{" TOKEN_OK ", \"discovery\": \"yes\"}]}",
                   "tokens[0]", "\"discovery\" must be a boolean");
    expect_problem("integer out of range",
                   "{\"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true, \"max_sessions\": 64}]}",
                   "tokens[0]", "between 1 and 16");
    expect_problem("missing file",
                   "{\"tokens\": [{\"module\": \"module.so\", \"uri\": "
                   "\"pkcs11:token=t\", \"pin_file\": \"nopin\", "
                   "\"discovery\": true}]}",
                   "tokens[0]", "cannot read");
    expect_problem("bad token URI",
                   "{\"tokens\": [{\"module\": \"module.so\", \"uri\": "
                   "\"pkcs11:tokn=t\", \"pin_file\": \"pin\", "
                   "\"discovery\": true}]}",
                   "tokens[0]", "\"uri\"");
    expect_problem("token URI naming a key",
                   "{\"tokens\": [{\"module\": \"module.so\", \"uri\": "
                   "\"pkcs11:token=t;object=k\", \"pin_file\": \"pin\", "
                   "\"discovery\": true}]}",
                   "tokens[0]", "selects the token");
    expect_problem("key URI naming no key",
                   "{\"tokens\": [{" TOKEN_OK ", \"keys\": [{\"name\": \"k\", "
                   "\"uri\": \"pkcs11:token=t\"}]}]}",
                   "tokens[0].keys[0]", "object= or id=");
    expect_problem("key without name",
                   "{\"tokens\": [{" TOKEN_OK ", \"keys\": [{"
                   "\"uri\": \"pkcs11:object=k\"}]}]}",
                   "tokens[0].keys[0]", "\"name\" is required");
    /* found by tests/fuzz/fuzz_config.c: the duplicate check compared
     * the nameless key's NULL name */
    expect_problem("a key without name after one with",
                   "{\"tokens\": [{" TOKEN_OK ", \"keys\": [{\"name\": \"k\", "
                   "\"uri\": \"pkcs11:object=a\"}, {\"name\": 7, "
                   "\"uri\": \"pkcs11:object=b\"}]}]}",
                   "tokens[0].keys[1]", "\"name\" must be a string");
    expect_problem("duplicate key names",
                   "{\"tokens\": [{" TOKEN_OK ", \"keys\": [{\"name\": \"k\", "
                   "\"uri\": \"pkcs11:object=a\"}]}, {" TOKEN_OK
                   ", \"keys\": [{\"name\": \"k\", \"uri\": "
                   "\"pkcs11:object=b\"}]}]}",
                   "tokens[1].keys[0]", "used twice");
    expect_problem("both pin sources",
                   "{\"tokens\": [{" TOKEN_OK
                   ", \"pin_env\": \"HOME\", \"discovery\": true}]}",
                   "tokens[0]", "exactly one");
    expect_problem("pin_env not set",
                   "{\"tokens\": [{\"module\": \"module.so\", \"uri\": "
                   "\"pkcs11:token=t\", \"pin_env\": "
                   "\"SMIMED_TEST_UNSET_PIN\", \"discovery\": true}]}",
                   "tokens[0]", "SMIMED_TEST_UNSET_PIN is not set");
    expect_problem("no keys and no discovery", "{\"tokens\": [{" TOKEN_OK "}]}",
                   "tokens[0]", "no keys");
    expect_problem("bad listen",
                   "{\"listen\": \"localhost\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "listen", "HOST:PORT");
    expect_problem("trust file without certificates",
                   "{\"trust\": \"pin\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "trust", "holds no PEM certificate");
    expect_problem("crls file without CRLs",
                   "{\"crls\": \"pin\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "crls", "holds no PEM CRL");
    expect_problem("budget below one body",
                   "{\"max_body_bytes\": 8192, \"max_inflight_body_bytes\": "
                   "4096, \"tokens\": [{" TOKEN_OK ", \"discovery\": true}]}",
                   "max_inflight_body_bytes", "below max_body_bytes");
    expect_problem("header_timeout_s of 0",
                   "{\"header_timeout_s\": 0, \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "smimed.conf", "between 1 and 3600");
    expect_problem("bad log level",
                   "{\"log_level\": \"loud\", \"tokens\": [{" TOKEN_OK
                   ", \"discovery\": true}]}",
                   "log_level", "debug");

    cfg = load("{\"bogus\": 1, \"tokens\": [{\"module\": \"nomodule.so\", "
               "\"uri\": \"pkcs11:x=1\", \"pin_file\": \"pin\", "
               "\"discovery\": 3}]}",
               &p);
    tap_ok(cfg == NULL && p.count >= 3 && has_problem(&p, "bogus", NULL) &&
               has_problem(&p, "tokens[0]", "discovery"),
           "every problem is reported, not just the first (%zu)", p.count);
    config_free(cfg);
    config_problems_clear(&p);
}

/* A config with one key and one client, named as given. */
static config *load_named(const char *key, const char *client,
                          const char *client_key, config_problems *p)
{
    char *text = NULL;
    config *cfg;

    if (asprintf(&text,
                 "{\"clients\": [{\"name\": \"%s\", \"token_sha256\": "
                 "\"00ff" HASH60 "\", \"keys\": [\"%s\"], "
                 "\"operations\": [\"sign\"]}], \"tokens\": [{" TOKEN_OK
                 ", \"keys\": [{\"name\": \"%s\", \"uri\": "
                 "\"pkcs11:object=k\"}]}]}",
                 client, client_key, key) < 0)
        exit(1);
    cfg = load(text, p);
    free(text);
    return cfg;
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);

    if (s == NULL)
        exit(1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* Names go whole into the audit record's fixed fields: the longest that
 * fit load, one byte more is a problem, and so is a control character. */
static void test_names(void)
{
    config_problems p = {0};
    char *k127 = repeat('k', TOKEN_KEY_NAME_MAX);
    char *k128 = repeat('k', TOKEN_KEY_NAME_MAX + 1);
    char *c63 = repeat('c', API_CLIENT_NAME_MAX);
    char *c64 = repeat('c', API_CLIENT_NAME_MAX + 1);
    config *cfg;

    cfg = load_named(k127, c63, k127, &p);
    tap_ok(cfg != NULL && p.count == 0 &&
               strlen(cfg->tokens[0].keys[0].name) == TOKEN_KEY_NAME_MAX &&
               strlen(cfg->clients[0].name) == API_CLIENT_NAME_MAX,
           "a %d-byte key name and a %d-byte client name load",
           TOKEN_KEY_NAME_MAX, API_CLIENT_NAME_MAX);
    config_free(cfg);
    cfg = load_named(k128, c63, k127, &p);
    tap_ok(cfg == NULL && has_problem(&p, "tokens[0].keys[0]", "128 bytes"),
           "a %d-byte key name is refused", TOKEN_KEY_NAME_MAX + 1);
    config_free(cfg);
    cfg = load_named(k127, c64, k127, &p);
    tap_ok(cfg == NULL && has_problem(&p, "clients[0]", "client name") &&
               has_problem(&p, "clients[0]", "64 bytes"),
           "a %d-byte client name is refused", API_CLIENT_NAME_MAX + 1);
    config_free(cfg);
    cfg = load_named(k127, c63, k128, &p);
    tap_ok(cfg == NULL && has_problem(&p, "clients[0]", "key name"),
           "a client's key over %d bytes is refused", TOKEN_KEY_NAME_MAX);
    config_free(cfg);
    cfg = load_named("k\\u000aforged", c63, "k", &p);
    tap_ok(cfg == NULL &&
               has_problem(&p, "tokens[0].keys[0]", "control character"),
           "a key name with a newline is refused");
    config_free(cfg);
    cfg = load_named("k", "c\\u001b[1m", "k", &p);
    tap_ok(cfg == NULL && has_problem(&p, "clients[0]", "control character"),
           "a client name with an escape character is refused");
    config_free(cfg);
    config_problems_clear(&p);
    free(k127);
    free(k128);
    free(c63);
    free(c64);
}

int main(void)
{
    char cmd[300];

    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    write_file("module.so", "not really a module; config only checks it "
                            "can be read\n");
    write_file("pin", "1234\n");
    chmod_file("pin", 0600);
    write_file("cert.pem", "");
    test_good();
    test_problems();
    test_names();
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", dir);
    return tap_done();
}
