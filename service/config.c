/*
 * Configuration loading. Each JSON object is checked against a table of its
 * options (name, type, range) before any value is used, so unknown keys and
 * wrong types are reported the same way everywhere; then the checks that
 * need context (files exist, URIs parse, names are unique) run. Everything
 * wrong is collected so one --check-config run shows all of it.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pwd.h>
#include <unistd.h>
#include <sys/stat.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "service/config.h"

typedef enum {
    OPT_STRING,
    OPT_PATH,
    OPT_BOOL,
    OPT_INT,
    OPT_ARRAY,
    OPT_OBJECT,
} opt_type;

typedef struct opt {
    const char *name;
    opt_type type;
    int required;
    json_int_t min, max; /* OPT_INT only */
} opt;

static const opt top_opts[] = {
    {"listen", OPT_STRING, 0, 0, 0},
    {"max_body_bytes", OPT_INT, 0, 1024, (json_int_t)1 << 40},
    {"max_connections", OPT_INT, 0, 1, 65536},
    {"max_connections_per_ip", OPT_INT, 0, 1, 65536},
    {"request_timeout_s", OPT_INT, 0, 1, 3600},
    {"header_timeout_s", OPT_INT, 0, 1, 3600},
    {"max_inflight_body_bytes", OPT_INT, 0, 1024, (json_int_t)1 << 50},
    {"log_level", OPT_STRING, 0, 0, 0},
    {"log_file", OPT_STRING, 0, 0, 0},
    {"trust", OPT_PATH, 0, 0, 0},
    {"crls", OPT_PATH, 0, 0, 0},
    {"tokens", OPT_ARRAY, 1, 0, 0},
    {"clients", OPT_ARRAY, 0, 0, 0},
    {"tls", OPT_OBJECT, 0, 0, 0},
    {"audit_log", OPT_STRING, 0, 0, 0},
    {"allow_insecure_unauthenticated_listen", OPT_BOOL, 0, 0, 0},
    {"workers", OPT_INT, 0, 1, 256},
    {"user", OPT_STRING, 0, 0, 0},
    {NULL, 0, 0, 0, 0},
};

static const opt client_opts[] = {
    {"name", OPT_STRING, 1, 0, 0},
    {"token_sha256", OPT_STRING, 0, 0, 0},
    {"certificate_subject", OPT_STRING, 0, 0, 0},
    {"certificate_san", OPT_STRING, 0, 0, 0},
    {"keys", OPT_ARRAY, 0, 0, 0},
    {"operations", OPT_ARRAY, 0, 0, 0},
    {NULL, 0, 0, 0, 0},
};

static const opt tls_opts[] = {
    {"certificate", OPT_PATH, 1, 0, 0},
    {"key", OPT_PATH, 1, 0, 0},
    {"client_ca", OPT_PATH, 0, 0, 0},
    {NULL, 0, 0, 0, 0},
};

static const opt token_opts[] = {
    {"name", OPT_STRING, 0, 0, 0},       {"module", OPT_PATH, 1, 0, 0},
    {"uri", OPT_STRING, 1, 0, 0},        {"pin_file", OPT_PATH, 0, 0, 0},
    {"pin_env", OPT_STRING, 0, 0, 0},    {"chain", OPT_PATH, 0, 0, 0},
    {"discovery", OPT_BOOL, 0, 0, 0},    {"optional", OPT_BOOL, 0, 0, 0},
    {"max_sessions", OPT_INT, 0, 1, 16}, {"wait_ms", OPT_INT, 0, 0, 600000},
    {"keys", OPT_ARRAY, 0, 0, 0},        {NULL, 0, 0, 0, 0},
};

static const opt key_opts[] = {
    {"name", OPT_STRING, 1, 0, 0},
    {"uri", OPT_STRING, 1, 0, 0},
    {"certificate", OPT_PATH, 0, 0, 0},
    {"chain", OPT_PATH, 0, 0, 0},
    {NULL, 0, 0, 0, 0},
};

typedef struct config_priv {
    json_t *root;
    char **strings; /* resolved paths and copies, freed with the config */
    size_t nstrings;
} config_priv;

typedef struct loader {
    const char *file;
    char *dir;
    config *cfg;
    config_problems *problems;
    int without_pins; /* a request worker's load: no PIN source is read */
} loader;

void config_problems_clear(config_problems *p)
{
    size_t i;

    for (i = 0; i < p->count; i++)
        free(p->lines[i]);
    free(p->lines);
    p->lines = NULL;
    p->count = 0;
}

__attribute__((format(printf, 3, 4))) static void
problem(loader *ld, const char *where, const char *fmt, ...)
{
    char msg[512], *line = NULL, **grown, *p;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    grown = realloc(ld->problems->lines,
                    (ld->problems->count + 1) * sizeof(*grown));
    if (grown == NULL)
        return;
    ld->problems->lines = grown;
    if (asprintf(&line, "%s: %s%s%s", ld->file, where, *where ? ": " : "",
                 msg) < 0)
        return;
    /* one line each, whatever the names in the file hold */
    for (p = line; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    grown[ld->problems->count++] = line;
}

/* Keeps s alive as long as the config; NULL on allocation failure. */
static char *keep(loader *ld, char *s)
{
    config_priv *priv = ld->cfg->priv;
    char **grown;

    if (s == NULL)
        return NULL;
    grown = realloc(priv->strings, (priv->nstrings + 1) * sizeof(*grown));
    if (grown == NULL) {
        free(s);
        return NULL;
    }
    priv->strings = grown;
    grown[priv->nstrings++] = s;
    return s;
}

static const char *type_name(opt_type t)
{
    switch (t) {
    case OPT_BOOL:
        return "a boolean";
    case OPT_INT:
        return "an integer";
    case OPT_ARRAY:
        return "an array";
    case OPT_OBJECT:
        return "an object";
    default:
        return "a string";
    }
}

static int type_fits(opt_type t, json_t *v)
{
    switch (t) {
    case OPT_BOOL:
        return json_is_boolean(v);
    case OPT_INT:
        return json_is_integer(v);
    case OPT_ARRAY:
        return json_is_array(v);
    case OPT_OBJECT:
        return json_is_object(v);
    default:
        return json_is_string(v) && json_string_length(v) > 0 &&
               strlen(json_string_value(v)) == json_string_length(v);
    }
}

/* Checks obj against its table and records what does not fit; -1 only when
 * obj is no object at all. Callers go on after mismatches so that one run
 * reports every problem; the getters below read a mistyped option as
 * absent. */
static int check_object(loader *ld, const char *where, json_t *obj,
                        const opt *opts)
{
    const char *name;
    json_t *v;
    const opt *o;

    if (!json_is_object(obj)) {
        problem(ld, where, "must be an object");
        return -1;
    }
    json_object_foreach (obj, name, v) {
        for (o = opts; o->name != NULL; o++)
            if (strcmp(o->name, name) == 0)
                break;
        if (o->name == NULL) {
            problem(ld, where, "unknown option \"%s\"", name);
        } else if (!type_fits(o->type, v)) {
            problem(ld, where, "\"%s\" must be %s%s", name, type_name(o->type),
                    o->type == OPT_STRING || o->type == OPT_PATH
                        ? " (non-empty, no NUL)"
                        : "");
        } else if (o->type == OPT_INT && (json_integer_value(v) < o->min ||
                                          json_integer_value(v) > o->max)) {
            problem(ld, where, "\"%s\" must be between %lld and %lld", name,
                    (long long)o->min, (long long)o->max);
        }
    }
    for (o = opts; o->name != NULL; o++) {
        if (o->required && json_object_get(obj, o->name) == NULL)
            problem(ld, where, "\"%s\" is required", o->name);
    }
    return 0;
}

static const char *get_string(json_t *obj, const char *name)
{
    return json_string_value(json_object_get(obj, name));
}

/* Paths inside the config are relative to its folder, so a config and its
 * files can move together. */
static char *resolve(loader *ld, const char *value)
{
    char *path = NULL;

    if (value[0] == '/')
        path = strdup(value);
    else if (asprintf(&path, "%s/%s", ld->dir, value) < 0)
        path = NULL;
    return keep(ld, path);
}

/* Resolves a path option and checks that the file can be read; NULL (and a
 * problem) when it cannot. */
static const char *get_path(loader *ld, const char *where, json_t *obj,
                            const char *name)
{
    const char *value = get_string(obj, name);
    char *path;

    if (value == NULL)
        return NULL;
    path = resolve(ld, value);
    if (path == NULL) {
        problem(ld, where, "out of memory");
        return NULL;
    }
    if (access(path, R_OK) != 0) {
        problem(ld, where, "\"%s\": cannot read %s: %s", name, path,
                strerror(errno));
        return NULL;
    }
    return path;
}

static int get_bool(json_t *obj, const char *name)
{
    return json_is_true(json_object_get(obj, name));
}

/* The table bounds every integer option, so the narrowing is safe. */
static json_int_t get_int(json_t *obj, const char *name, json_int_t dflt)
{
    json_t *v = json_object_get(obj, name);

    return v != NULL ? json_integer_value(v) : dflt;
}

static void check_uri(loader *ld, const char *where, const char *text,
                      int for_key)
{
    token_uri uri = {0};
    token_error err = {0};

    if (text == NULL)
        return;
    if (token_uri_parse(text, &uri, &err) != 0) {
        problem(ld, where, "\"uri\": %s", err.message);
        return;
    }
    if (for_key && uri.object == NULL && uri.id == NULL)
        problem(ld, where, "\"uri\" must name the key with object= or id=");
    if (!for_key && (uri.object != NULL || uri.id != NULL))
        problem(ld, where,
                "\"uri\" selects the token; name keys in \"keys\" instead");
    token_uri_clear(&uri);
}

/* Names are unique across the whole config: a request names a key alone. */
static int name_taken(const config *cfg, size_t upto_token, size_t upto_key,
                      const char *name)
{
    size_t t, k;

    for (t = 0; t <= upto_token && t < cfg->ntokens; t++) {
        size_t n = t == upto_token ? upto_key : cfg->tokens[t].nkeys;

        for (k = 0; k < n; k++)
            if (cfg->tokens[t].keys[k].name != NULL &&
                strcmp(cfg->tokens[t].keys[k].name, name) == 0)
                return 1;
    }
    return 0;
}

/* Names go into audit records and log lines whole: longer than their
 * buffers, or with control characters, they would be cut or forge
 * lines. */
static void check_name(loader *ld, const char *where, const char *what,
                       const char *name, size_t max)
{
    size_t n, i;

    if (name == NULL)
        return;
    n = strlen(name);
    for (i = 0; i < n; i++) {
        if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f) {
            problem(ld, where,
                    "%s name holds a control character (0x%02x at byte %zu)",
                    what, (unsigned char)name[i], i);
            return;
        }
    }
    if (n > max)
        problem(ld, where,
                "%s name \"%.40s...\" is %zu bytes long; the limit is %zu",
                what, name, n, max);
}

static void load_key(loader *ld, size_t ti, size_t ki, json_t *obj)
{
    token_key_spec *ks = (token_key_spec *)&ld->cfg->tokens[ti].keys[ki];
    char where[64];

    snprintf(where, sizeof(where), "tokens[%zu].keys[%zu]", ti, ki);
    if (check_object(ld, where, obj, key_opts) != 0)
        return;
    ks->name = get_string(obj, "name");
    ks->uri = get_string(obj, "uri");
    ks->cert_file = get_path(ld, where, obj, "certificate");
    ks->chain_file = get_path(ld, where, obj, "chain");
    check_uri(ld, where, ks->uri, 1);
    check_name(ld, where, "key", ks->name, TOKEN_KEY_NAME_MAX);
    /* a missing name is a problem check_object reported already */
    if (ks->name != NULL && name_taken(ld->cfg, ti, ki, ks->name))
        problem(ld, where, "key name \"%s\" is used twice", ks->name);
}

static void load_token(loader *ld, size_t ti, json_t *obj)
{
    token_spec *ts = &ld->cfg->tokens[ti];
    token_error terr = {0};
    json_t *keys;
    char where[32];
    size_t ki;

    snprintf(where, sizeof(where), "tokens[%zu]", ti);
    if (check_object(ld, where, obj, token_opts) != 0)
        return;
    ts->name = get_string(obj, "name");
    ts->module = get_path(ld, where, obj, "module");
    ts->uri = get_string(obj, "uri");
    /* a worker does not touch the PIN file, not even to see it is there */
    ts->pin_file =
        ld->without_pins ? NULL : get_path(ld, where, obj, "pin_file");
    ts->pin_env = get_string(obj, "pin_env");
    ts->chain_file = get_path(ld, where, obj, "chain");
    ts->discovery = get_bool(obj, "discovery");
    ts->optional = get_bool(obj, "optional");
    ts->max_sessions = (int)get_int(obj, "max_sessions", 0);
    ts->wait_ms = (int)get_int(obj, "wait_ms", 5000);
    check_uri(ld, where, ts->uri, 0);
    if ((json_object_get(obj, "pin_file") != NULL) ==
        (json_object_get(obj, "pin_env") != NULL))
        problem(ld, where, "give exactly one of \"pin_file\" and \"pin_env\"");
    if (!ld->without_pins && ts->pin_env != NULL &&
        !token_pin_env_available(ts->pin_env))
        problem(ld, where, "\"pin_env\": environment variable %s is not set",
                ts->pin_env);
    if (ts->pin_file != NULL && token_pin_check_file(ts->pin_file, &terr) != 0)
        problem(ld, where, "\"pin_file\": %s", terr.message);
    keys = json_object_get(obj, "keys");
    if (!ts->discovery && json_array_size(keys) == 0)
        problem(ld, where,
                "no keys: list some in \"keys\" or set "
                "\"discovery\": true");
    if (json_array_size(keys) == 0)
        return;
    ts->keys = calloc(json_array_size(keys), sizeof(token_key_spec));
    if (ts->keys == NULL) {
        problem(ld, where, "out of memory");
        return;
    }
    ts->nkeys = json_array_size(keys);
    for (ki = 0; ki < ts->nkeys; ki++)
        load_key(ld, ti, ki, json_array_get(keys, ki));
}

/* Reads every certificate (want_crls 0) or CRL of a PEM file; a file with
 * none is a problem, since a typo there would silently trust nothing. */
static void load_pem_file(loader *ld, const char *where, const char *path,
                          int want_crls)
{
    BIO *bio = BIO_new_file(path, "r");
    config *cfg = ld->cfg;
    X509 *cert;
    X509_CRL *crl;
    int n = 0;

    if (want_crls)
        cfg->crls = sk_X509_CRL_new_null();
    else
        cfg->trust = sk_X509_new_null();
    while (bio != NULL &&
           (want_crls ? cfg->crls != NULL : cfg->trust != NULL)) {
        if (want_crls &&
            (crl = PEM_read_bio_X509_CRL(bio, NULL, NULL, NULL)) != NULL) {
            if (!sk_X509_CRL_push(cfg->crls, crl))
                X509_CRL_free(crl);
        } else if (!want_crls &&
                   (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
            if (!sk_X509_push(cfg->trust, cert))
                X509_free(cert);
        } else {
            break;
        }
        n++;
    }
    BIO_free(bio);
    ERR_clear_error();
    if (n == 0)
        problem(ld, where, "%s holds no PEM %s", path,
                want_crls ? "CRL" : "certificate");
}

static void load_trust(loader *ld, json_t *root)
{
    const char *path = get_path(ld, "trust", root, "trust");
    struct stat st;

    if (path != NULL && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        ld->cfg->trust_dir = (char *)path;
    else if (path != NULL)
        load_pem_file(ld, "trust", path, 0);
    path = get_path(ld, "crls", root, "crls");
    if (path != NULL)
        load_pem_file(ld, "crls", path, 1);
}

static int parse_sha256(const char *text, unsigned char *out)
{
    size_t n = 0;

    if (strlen(text) != 2 * API_TOKEN_SHA256_LEN)
        return -1;
    /* '\0': no separators between the hex pairs */
    if (OPENSSL_hexstr2buf_ex(out, API_TOKEN_SHA256_LEN, &n, text, '\0') != 1)
        return -1;
    return n == API_TOKEN_SHA256_LEN ? 0 : -1;
}

/* A client's "keys" or "operations": strings only. NULL with a problem
 * when it is not a list of non-empty strings. */
static const char **get_names(loader *ld, const char *where, json_t *obj,
                              const char *name, size_t *n)
{
    json_t *list = json_object_get(obj, name), *item;
    const char **names;
    size_t i;

    *n = json_array_size(list);
    names = calloc(*n + 1, sizeof(*names));
    if (names == NULL || keep(ld, (char *)names) == NULL) {
        problem(ld, where, "out of memory");
        return NULL;
    }
    json_array_foreach (list, i, item) {
        if (!type_fits(OPT_STRING, item)) {
            problem(ld, where, "\"%s\"[%zu] must be a non-empty string", name,
                    i);
            return NULL;
        }
        names[i] = json_string_value(item);
    }
    return names;
}

static void load_client(loader *ld, size_t ci, json_t *obj)
{
    api_client *c = &ld->cfg->clients[ci];
    const char *hash, **ops;
    char where[32];
    size_t i, nops = 0;

    snprintf(where, sizeof(where), "clients[%zu]", ci);
    if (check_object(ld, where, obj, client_opts) != 0)
        return;
    c->name = get_string(obj, "name");
    hash = get_string(obj, "token_sha256");
    c->cert_subject = get_string(obj, "certificate_subject");
    c->cert_san = get_string(obj, "certificate_san");
    if (hash != NULL) {
        c->has_token = 1;
        if (parse_sha256(hash, c->token_sha256) != 0)
            problem(ld, where,
                    "\"token_sha256\" must be 64 hex digits (smimed "
                    "--hash-token prints it)");
    }
    if (hash == NULL && c->cert_subject == NULL && c->cert_san == NULL)
        problem(ld, where,
                "give \"token_sha256\", \"certificate_subject\" or "
                "\"certificate_san\": a client nobody can be is a typo");
    if ((c->cert_subject != NULL || c->cert_san != NULL) &&
        ld->cfg->tls_client_ca == NULL)
        problem(ld, where,
                "certificate_subject and certificate_san need "
                "\"tls\": {\"client_ca\": ...}");
    check_name(ld, where, "client", c->name, API_CLIENT_NAME_MAX);
    c->keys = get_names(ld, where, obj, "keys", &c->nkeys);
    for (i = 0; c->keys != NULL && i < c->nkeys; i++)
        check_name(ld, where, "key", c->keys[i], TOKEN_KEY_NAME_MAX);
    ops = get_names(ld, where, obj, "operations", &nops);
    for (i = 0; ops != NULL && i < nops; i++) {
        if (strcmp(ops[i], "sign") == 0)
            c->ops |= API_OP_SIGN;
        else if (strcmp(ops[i], "decrypt") == 0)
            c->ops |= API_OP_DECRYPT;
        else
            problem(ld, where,
                    "\"operations\"[%zu] must be \"sign\" or \"decrypt\"", i);
    }
    for (i = 0; i < ci && c->name != NULL; i++) {
        if (ld->cfg->clients[i].name != NULL &&
            strcmp(ld->cfg->clients[i].name, c->name) == 0)
            problem(ld, where, "client name \"%s\" is used twice", c->name);
        /* one token, two clients: which one called? */
        if (c->has_token && ld->cfg->clients[i].has_token &&
            CRYPTO_memcmp(ld->cfg->clients[i].token_sha256, c->token_sha256,
                          API_TOKEN_SHA256_LEN) == 0)
            problem(ld, where, "clients[%zu] has the same token", i);
    }
}

static void load_clients(loader *ld, json_t *root)
{
    json_t *clients = json_object_get(root, "clients");
    size_t ci;

    if (json_array_size(clients) == 0)
        return;
    ld->cfg->clients = calloc(json_array_size(clients), sizeof(api_client));
    if (ld->cfg->clients == NULL) {
        problem(ld, "clients", "out of memory");
        return;
    }
    ld->cfg->nclients = json_array_size(clients);
    for (ci = 0; ci < ld->cfg->nclients; ci++)
        load_client(ld, ci, json_array_get(clients, ci));
}

static void load_tls(loader *ld, json_t *root)
{
    json_t *tls = json_object_get(root, "tls");

    if (!json_is_object(tls) || check_object(ld, "tls", tls, tls_opts) != 0)
        return;
    ld->cfg->tls_certificate = (char *)get_path(ld, "tls", tls, "certificate");
    ld->cfg->tls_key = (char *)get_path(ld, "tls", tls, "key");
    ld->cfg->tls_client_ca = (char *)get_path(ld, "tls", tls, "client_ca");
}

/* host:port, [v6]:port; the port may be 0 (any free port). */
static void check_listen(loader *ld, const char *listen)
{
    const char *colon = strrchr(listen, ':');
    char *end;
    long port;

    if (colon == NULL || colon == listen) {
        problem(ld, "listen", "\"%s\" is not HOST:PORT", listen);
        return;
    }
    errno = 0;
    port = strtol(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end != '\0' || errno != 0 || port < 0 ||
        port > 65535)
        problem(ld, "listen", "\"%s\" has no valid port", listen);
}

/* The default budget of body bytes in flight: a quarter of the memory,
 * at most 1 GiB, and never below one body of max_body_bytes (a smaller
 * one would refuse every large request; given explicitly, that is an
 * error). */
static void load_body_budget(loader *ld, json_t *root)
{
    config *cfg = ld->cfg;
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    size_t dflt = (size_t)1 << 30, quarter;

    cfg->max_body_bytes =
        (size_t)get_int(root, "max_body_bytes", (json_int_t)64 << 20);
    if (pages > 0 && size > 0) {
        quarter = (size_t)pages * (size_t)size / 4;
        if (quarter < dflt)
            dflt = quarter;
    }
    if (dflt < cfg->max_body_bytes)
        dflt = cfg->max_body_bytes;
    cfg->max_inflight_body_bytes =
        (size_t)get_int(root, "max_inflight_body_bytes", (json_int_t)dflt);
    if (cfg->max_inflight_body_bytes < cfg->max_body_bytes)
        problem(ld, "max_inflight_body_bytes",
                "%zu is below max_body_bytes (%zu): no request of the largest "
                "size could ever be served",
                cfg->max_inflight_body_bytes, cfg->max_body_bytes);
}

/* The account request workers run as when the daemon starts as root; an
 * unknown one is refused now rather than when a worker starts. The default
 * is looked up only when it would be used (a daemon started as another
 * user stays that user). */
static void load_user(loader *ld, json_t *root)
{
    const char *name = get_string(root, "user");
    struct passwd pw, *found = NULL;
    char buf[4096];
    int r;

    if (name == NULL && geteuid() != 0)
        return;
    if (name == NULL)
        name = "nobody";
    r = getpwnam_r(name, &pw, buf, sizeof(buf), &found);
    if (found == NULL) {
        problem(ld, "user", "no user \"%s\"%s%s", name, r != 0 ? ": " : "",
                r != 0 ? strerror(r) : "");
        return;
    }
    if (pw.pw_uid == 0 || pw.pw_gid == 0) {
        problem(ld, "user",
                "\"%s\" has uid or gid 0: the workers would keep root's "
                "privileges",
                name);
        return;
    }
    ld->cfg->user = keep(ld, strdup(name));
    if (ld->cfg->user == NULL) {
        problem(ld, "user", "out of memory");
        return;
    }
    ld->cfg->user_uid = pw.pw_uid;
    ld->cfg->user_gid = pw.pw_gid;
}

/* One request worker per core. */
static json_int_t default_workers(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n < 1 ? 1 : n > 256 ? 256 : n;
}

static void load_top(loader *ld, json_t *root)
{
    config *cfg = ld->cfg;
    json_t *tokens;
    const char *s;
    size_t ti;

    if (check_object(ld, "", root, top_opts) != 0)
        return;
    s = get_string(root, "listen");
    cfg->listen = keep(ld, strdup(s != NULL ? s : "127.0.0.1:8080"));
    if (cfg->listen != NULL)
        check_listen(ld, cfg->listen);
    load_body_budget(ld, root);
    cfg->max_connections = (unsigned)get_int(root, "max_connections", 1024);
    /* a webmail back end behind one address raises it (README) */
    cfg->max_connections_per_ip =
        (unsigned)get_int(root, "max_connections_per_ip", 64);
    cfg->request_timeout_s = (unsigned)get_int(root, "request_timeout_s", 60);
    cfg->header_timeout_s = (unsigned)get_int(root, "header_timeout_s", 10);
    cfg->workers = (unsigned)get_int(root, "workers", default_workers());
    load_user(ld, root);
    s = get_string(root, "log_level");
    cfg->log_level = LOG_LEVEL_INFO;
    if (s != NULL && config_log_level_from_name(s, &cfg->log_level) != 0)
        problem(ld, "log_level",
                "must be \"error\", \"warn\", \"info\" or \"debug\"");
    s = get_string(root, "log_file");
    if (s != NULL && (cfg->log_file = resolve(ld, s)) == NULL)
        problem(ld, "log_file", "out of memory");
    s = get_string(root, "audit_log");
    if (s != NULL && (cfg->audit_log = resolve(ld, s)) == NULL)
        problem(ld, "audit_log", "out of memory");
    cfg->allow_insecure_unauthenticated_listen =
        get_bool(root, "allow_insecure_unauthenticated_listen");
    load_trust(ld, root);
    load_tls(ld, root);
    load_clients(ld, root);
    tokens = json_object_get(root, "tokens");
    if (!json_is_array(tokens))
        return;
    if (json_array_size(tokens) == 0) {
        problem(ld, "tokens", "at least one token is required");
        return;
    }
    cfg->tokens = calloc(json_array_size(tokens), sizeof(token_spec));
    if (cfg->tokens == NULL) {
        problem(ld, "tokens", "out of memory");
        return;
    }
    cfg->ntokens = json_array_size(tokens);
    for (ti = 0; ti < cfg->ntokens; ti++)
        load_token(ld, ti, json_array_get(tokens, ti));
}

static config *load(const char *path, config_problems *problems,
                    int without_pins)
{
    loader ld = {path, NULL, NULL, problems, without_pins};
    config *cfg = NULL, *ret = NULL;
    json_error_t jerr;
    const char *slash;

    cfg = calloc(1, sizeof(*cfg));
    if (cfg == NULL || (cfg->priv = calloc(1, sizeof(config_priv))) == NULL) {
        problem(&ld, "", "out of memory");
        goto out;
    }
    ld.cfg = cfg;
    slash = strrchr(path, '/');
    ld.dir =
        slash == NULL
            ? strdup(".")
            : strndup(path, (size_t)(slash - path) + (slash == path ? 1 : 0));
    if (ld.dir == NULL) {
        problem(&ld, "", "out of memory");
        goto out;
    }
    /* duplicate keys would make one of two settings silently win */
    ((config_priv *)cfg->priv)->root =
        json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (((config_priv *)cfg->priv)->root == NULL) {
        if (jerr.line > 0)
            problem(&ld, "", "line %d column %d: %s", jerr.line, jerr.column,
                    jerr.text);
        else
            problem(&ld, "", "%s", jerr.text);
        goto out;
    }
    load_top(&ld, ((config_priv *)cfg->priv)->root);
    if (problems->count == 0) {
        ret = cfg;
        cfg = NULL;
    }
out:
    free(ld.dir);
    config_free(cfg);
    return ret;
}

config *config_load(const char *path, config_problems *problems)
{
    return load(path, problems, 0);
}

config *config_load_without_pins(const char *path, config_problems *problems)
{
    return load(path, problems, 1);
}

void config_free(config *cfg)
{
    config_priv *priv;
    size_t i;

    if (cfg == NULL)
        return;
    for (i = 0; i < cfg->ntokens; i++)
        free((void *)cfg->tokens[i].keys);
    free(cfg->tokens);
    free(cfg->clients);
    sk_X509_pop_free(cfg->trust, X509_free);
    sk_X509_CRL_pop_free(cfg->crls, X509_CRL_free);
    priv = cfg->priv;
    if (priv != NULL) {
        for (i = 0; i < priv->nstrings; i++)
            free(priv->strings[i]);
        free(priv->strings);
        json_decref(priv->root);
        free(priv);
    }
    free(cfg);
}

int config_log_level_from_name(const char *name, log_level *level)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(name, names[i]) == 0) {
            *level = (log_level)i;
            return 0;
        }
    }
    return -1;
}
