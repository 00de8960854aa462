/*
 * config_load on the input, written to config.json in a sandbox folder
 * made at start ($TMPDIR, which script/fuzz points into the build folder).
 * The sandbox holds what seeds refer to by relative name: ca.pem, crl.pem,
 * ec.pem, rsa.pem (TEST-ONLY, from tests/fuzz/keys/), a PIN file "pin"
 * (0600) and "pin-open" (0644), "module.so" and a folder "trust.d".
 *
 * What config_load touches: it reads the JSON, access()es every path
 * option, stat()s PIN files for their mode (it never reads a PIN) and the
 * trust path, and reads the PEM files named by "trust" and "crls". It
 * loads no module (the token layer does that later) and reads no PIN.
 * So that it touches nothing outside the sandbox (no /dev/zero as a trust
 * bundle, no FIFO), an input with any string starting with '/' or holding
 * ".." is skipped.
 *
 * Invariants: a config comes back exactly when no problem was found; each
 * problem is one line naming the file; in a loaded config every path is
 * inside the sandbox and every token and key has what its loader
 * promises (a token URI, key names and URIs that parse).
 */
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "service/config.h"
#include "fuzz.h"

static char sandbox[4096];
static char config_path[4096 + 16];

static void put_file(const char *name, const char *text, mode_t mode)
{
    char path[sizeof(sandbox) + 64];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", sandbox, name);
    f = fopen(path, "w");
    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0 ||
        chmod(path, mode) != 0)
        fuzz_die(path);
}

static void copy_key_file(const char *name)
{
    BIO *in = fuzz_key_file(name);
    char buf[8192];
    int n = BIO_read(in, buf, sizeof(buf) - 1);

    BIO_free(in);
    if (n <= 0)
        fuzz_die(name);
    buf[n] = '\0';
    put_file(name, buf, 0644);
}

static void remove_sandbox(void)
{
    static const char *const names[] = {"config.json", "ca.pem",   "crl.pem",
                                        "ec.pem",      "rsa.pem",  "pin",
                                        "pin-open",    "module.so"};
    char path[sizeof(sandbox) + 64];
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", sandbox, names[i]);
        unlink(path);
    }
    snprintf(path, sizeof(path), "%s/trust.d", sandbox);
    rmdir(path);
    rmdir(sandbox);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *tmp = getenv("TMPDIR");
    char path[sizeof(sandbox) + 64];

    snprintf(sandbox, sizeof(sandbox), "%s/smimed-fuzz-config.XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    if (mkdtemp(sandbox) == NULL)
        fuzz_die("cannot make the sandbox folder");
    atexit(remove_sandbox);
    snprintf(config_path, sizeof(config_path), "%s/config.json", sandbox);
    copy_key_file("ca.pem");
    copy_key_file("crl.pem");
    copy_key_file("ec.pem");
    copy_key_file("rsa.pem");
    put_file("pin", "fuzz-not-a-pin\n", 0600);
    put_file("pin-open", "fuzz-not-a-pin\n", 0644);
    put_file("module.so", "not a module: config_load never loads one\n", 0644);
    snprintf(path, sizeof(path), "%s/trust.d", sandbox);
    if (mkdir(path, 0755) != 0)
        fuzz_die(path);
    /* for seeds with "pin_env" */
    setenv("SMIMED_FUZZ_PIN", "fuzz-not-a-pin", 1);
    return 0;
}

/* 1 when some string in v could name a file outside the sandbox. */
static int escapes(json_t *v)
{
    const char *name, *s;
    json_t *item;
    size_t i;

    switch (json_typeof(v)) {
    case JSON_STRING:
        s = json_string_value(v);
        return s[0] == '/' || strstr(s, "..") != NULL;
    case JSON_ARRAY:
        json_array_foreach (v, i, item)
            if (escapes(item))
                return 1;
        return 0;
    case JSON_OBJECT:
        json_object_foreach (v, name, item)
            if (escapes(item))
                return 1;
        return 0;
    default:
        return 0;
    }
}

static void check_path(const char *what, const char *path)
{
    size_t n = strlen(sandbox);

    if (path != NULL)
        FUZZ_CHECK(strncmp(path, sandbox, n) == 0 && path[n] == '/',
                   "%s \"%s\" outside the sandbox", what, path);
}

static void check_config(const config *cfg)
{
    token_uri uri;
    token_error terr;
    size_t t, k;

    FUZZ_CHECK(cfg->listen != NULL && cfg->ntokens > 0,
               "no listen address or no token");
    check_path("trust_dir", cfg->trust_dir);
    check_path("log_file", cfg->log_file);
    check_path("audit_log", cfg->audit_log);
    check_path("tls certificate", cfg->tls_certificate);
    check_path("tls key", cfg->tls_key);
    check_path("tls client_ca", cfg->tls_client_ca);
    for (t = 0; t < cfg->ntokens; t++) {
        const token_spec *ts = &cfg->tokens[t];

        check_path("module", ts->module);
        check_path("pin_file", ts->pin_file);
        check_path("chain", ts->chain_file);
        FUZZ_CHECK(ts->module != NULL && ts->uri != NULL,
                   "token %zu without module or URI", t);
        FUZZ_CHECK((ts->pin_file != NULL) != (ts->pin_env != NULL),
                   "token %zu: not exactly one PIN source", t);
        FUZZ_CHECK(ts->discovery || ts->nkeys > 0, "token %zu: no keys", t);
        for (k = 0; k < ts->nkeys; k++) {
            const token_key_spec *ks = &ts->keys[k];

            check_path("certificate", ks->cert_file);
            check_path("chain", ks->chain_file);
            FUZZ_CHECK(ks->name != NULL && ks->uri != NULL,
                       "token %zu key %zu: no name or URI", t, k);
            memset(&uri, 0, sizeof(uri));
            FUZZ_CHECK(token_uri_parse(ks->uri, &uri, &terr) == 0 &&
                           (uri.object != NULL || uri.id != NULL),
                       "key \"%s\": URI does not name a key", ks->name);
            token_uri_clear(&uri);
        }
    }
    for (k = 0; k < cfg->nclients; k++)
        FUZZ_CHECK(cfg->clients[k].name != NULL, "client %zu has no name", k);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    config_problems problems = {0};
    json_error_t jerr;
    json_t *root;
    config *cfg;
    FILE *f;
    size_t i, n = strlen(config_path);

    root = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
    if (root != NULL && escapes(root)) {
        json_decref(root);
        return 0;
    }
    json_decref(root);

    f = fopen(config_path, "wb");
    if (f == NULL || fwrite(data, 1, size, f) != size || fclose(f) != 0)
        fuzz_die(config_path);
    cfg = config_load(config_path, &problems);
    FUZZ_CHECK((cfg == NULL) == (problems.count > 0), "config %s, %zu problems",
               cfg != NULL ? "loaded" : "refused", problems.count);
    for (i = 0; i < problems.count; i++) {
        FUZZ_CHECK(strncmp(problems.lines[i], config_path, n) == 0 &&
                       strncmp(problems.lines[i] + n, ": ", 2) == 0,
                   "problem \"%s\" does not name the file", problems.lines[i]);
        FUZZ_CHECK(strpbrk(problems.lines[i], "\r\n") == NULL,
                   "problem \"%s\" is more than one line", problems.lines[i]);
    }
    if (cfg != NULL)
        check_config(cfg);
    config_free(cfg);
    config_problems_clear(&problems);
    return 0;
}
