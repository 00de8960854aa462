/*
 * config: the daemon's JSON configuration, checked completely before use.
 * Options are declared in one table per object; every problem is reported
 * with its location (file and JSON path), not just the first.
 */
#ifndef SMIMED_CONFIG_H
#define SMIMED_CONFIG_H

#include <stddef.h>
#include <sys/types.h>

#include <openssl/x509.h>

#include "api/api.h"
#include "token/token.h"

typedef enum {
    LOG_LEVEL_ERROR,
    LOG_LEVEL_WARN,
    LOG_LEVEL_INFO,
    LOG_LEVEL_DEBUG,
} log_level;

typedef struct config {
    char *listen;          /* "host:port" */
    size_t max_body_bytes; /* request body cap */
    /* request body bytes in flight across the daemon; >= max_body_bytes */
    size_t max_inflight_body_bytes;
    unsigned max_connections;
    unsigned max_connections_per_ip;
    unsigned request_timeout_s;
    unsigned header_timeout_s; /* deadline for a complete request header */
    unsigned workers;          /* request worker processes */
    /* the account a worker drops to when started as root, and its ids;
     * NULL when the daemon does not run as root and "user" is not set */
    char *user;
    uid_t user_uid;
    gid_t user_gid;
    log_level log_level;
    char *log_file; /* NULL: stderr */
    /* verification: anchors from a PEM bundle or a hashed directory, and
     * CRLs; NULL when not configured */
    STACK_OF(X509) *trust;
    char *trust_dir;
    STACK_OF(X509_CRL) *crls;
    token_spec *tokens;
    size_t ntokens;
    /* API clients; none: authentication off (loopback only, unless
     * allow_insecure_unauthenticated_listen) */
    api_client *clients;
    size_t nclients;
    int allow_insecure_unauthenticated_listen;
    /* TLS: server certificate and key, and the CA bundle client
     * certificates are verified against; NULL when not configured */
    char *tls_certificate;
    char *tls_key;
    char *tls_client_ca;
    char *audit_log; /* NULL: no audit trail */
    void *priv;      /* owns every string above */
} config;

/* Problems found while loading, one line each ("FILE: PATH: text"). */
typedef struct config_problems {
    char **lines;
    size_t count;
} config_problems;

void config_problems_clear(config_problems *p);

/* Loads and checks path. NULL when any problem was found; problems holds
 * them all. Relative paths inside are resolved against the file's folder. */
config *config_load(const char *path, config_problems *problems);
/* config_load as a request worker needs it: the tokens' PIN sources are
 * neither read nor checked, and pin_file is left NULL (a worker has no
 * PIN and never opens the file; the key process checks them). */
config *config_load_without_pins(const char *path, config_problems *problems);
void config_free(config *cfg);

int config_log_level_from_name(const char *name, log_level *level);

#endif
