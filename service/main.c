/*
 * smimed: the command line. The process started is the supervisor
 * (service/proc.c); the key process and the workers are the same binary
 * started again with a hidden role argument.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <openssl/crypto.h>

#include <config.h> /* generated: version */
#include "api/api.h"
#include "service/audit.h"
#include "service/config.h"
#include "service/harden.h"
#include "service/http.h"
#include "service/keyd.h"
#include "service/log.h"
#include "service/proc.h"
#include "service/worker.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: smimed --config FILE [--listen HOST:PORT] "
               "[--check-config]\n"
               "       smimed --hash-token < TOKEN\n"
               "       smimed --help | --version\n"
               "\n"
               "  -c, --config FILE     JSON configuration (see README.md)\n"
               "  -l, --listen H:P      override the listen address "
               "(port 0: any free port)\n"
               "      --check-config    check FILE, print every problem, exit\n"
               "      --hash-token      read a client token on stdin, print "
               "its config line\n"
               "  -h, --help            this text\n"
               "  -V, --version         print the version\n");
}

static int print_problems(const config_problems *p)
{
    size_t i;

    for (i = 0; i < p->count; i++)
        fprintf(stderr, "%s\n", p->lines[i]);
    return p->count > 0;
}

/* A client token: random, at least this long (a guessable token is a
 * password, and these are checked without any rate limit). */
#define TOKEN_MIN_LEN 16
#define TOKEN_MAX_LEN 4096

/* smimed --hash-token: the token on stdin (one line), its config line on
 * stdout; the token never appears in argv or in the config. */
static int hash_token(void)
{
    char buf[TOKEN_MAX_LEN + 2];
    unsigned char d[API_TOKEN_SHA256_LEN];
    size_t len = fread(buf, 1, sizeof(buf), stdin), i;
    int ret = 1;

    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    if (len > TOKEN_MAX_LEN || memchr(buf, '\n', len) != NULL) {
        fprintf(stderr,
                "smimed: the token must be one line of at most %d bytes\n",
                TOKEN_MAX_LEN);
    } else if (len < TOKEN_MIN_LEN) {
        fprintf(stderr,
                "smimed: the token is shorter than %d bytes; use a random "
                "one (openssl rand -hex 32)\n",
                TOKEN_MIN_LEN);
    } else if (api_hash_token(buf, len, d) != 0) {
        fprintf(stderr, "smimed: cannot compute SHA-256\n");
    } else {
        printf("\"token_sha256\": \"");
        for (i = 0; i < sizeof(d); i++)
            printf("%02x", d[i]);
        printf("\"\n");
        ret = 0;
    }
    OPENSSL_cleanse(buf, sizeof(buf));
    return ret;
}

/* Nobody but the host may reach an unauthenticated daemon, unless the
 * operator wrote a setting that says it is insecure. */
static int check_exposure(const config *cfg, const char *listen)
{
    if (cfg->nclients > 0 || http_listen_is_loopback(listen))
        return 0;
    if (cfg->allow_insecure_unauthenticated_listen) {
        log_warn("listening on %s without client authentication "
                 "(allow_insecure_unauthenticated_listen): anyone who reaches "
                 "it can use every key",
                 listen);
        return 0;
    }
    log_error("refusing to listen on %s, which is not a loopback address, "
              "without client authentication: configure \"clients\" (or set "
              "\"allow_insecure_unauthenticated_listen\": true)",
              listen);
    return -1;
}

/* The supervisor: checks the configuration, opens the listening socket
 * the workers share, then starts and keeps the process tree
 * (service/proc.h). */
static int supervise(const char *config_path, const char *listen,
                     int check_only)
{
    config_problems problems = {0};
    char errbuf[256];
    config *cfg;
    int fd;

    cfg = config_load(config_path, &problems);
    if (print_problems(&problems) || cfg == NULL) {
        config_problems_clear(&problems);
        config_free(cfg);
        return 1;
    }
    config_problems_clear(&problems);
    if (check_only) {
        printf("%s: OK\n", config_path);
        config_free(cfg);
        return 0;
    }
    if (listen == NULL)
        listen = cfg->listen;
    if (log_open(cfg->log_file, cfg->log_level) != 0)
        fprintf(stderr, "cannot open log file %s; logging to stderr\n",
                cfg->log_file);
    if (check_exposure(cfg, listen) != 0) {
        config_free(cfg);
        return 1;
    }
    if (cfg->nclients > 0 && cfg->tls_certificate == NULL &&
        !http_listen_is_loopback(listen))
        log_warn("bearer tokens travel in clear on %s: configure \"tls\"",
                 listen);
    /* the key process writes the trail; one it cannot open stops the
     * start here, rather than in a key process started again and again */
    if (audit_open(cfg->audit_log) != 0) {
        log_error("cannot open the audit log %s: %s", cfg->audit_log,
                  strerror(errno));
        config_free(cfg);
        return 1;
    }
    audit_close();
    /* before any worker exists: they all accept on this one */
    fd = http_listen_open(listen, errbuf, sizeof(errbuf));
    if (fd < 0) {
        log_error("%s", errbuf);
        config_free(cfg);
        return 1;
    }
    log_info("%s %s listening on %s (port %u)%s%s", SMIMED_NAME, SMIMED_VERSION,
             listen, http_listen_port(fd),
             cfg->tls_certificate != NULL ? " with TLS" : "",
             cfg->nclients > 0 ? ", client authentication on" : "");
    return proc_supervise(config_path, listen, fd, cfg);
}

/* A child of the supervisor, by its hidden role argument. */
static int run_role(const char *role, const char *config_path,
                    const char *listen)
{
    if (strcmp(role, PROC_ROLE_KEY + strlen("--role=")) == 0)
        return keyd_main(config_path);
    if (strcmp(role, PROC_ROLE_WORKER + strlen("--role=")) == 0)
        return worker_main(config_path, listen);
    usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"check-config", no_argument, NULL, 'k'},
        {"hash-token", no_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        /* hidden: what the supervisor starts its children with */
        {"role", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *listen = NULL, *role = NULL;
    char errbuf[256];
    int opt, check_only = 0, hash_only = 0;

    if (harden_process(errbuf, sizeof(errbuf)) != 0) {
        fprintf(stderr, "smimed: %s\n", errbuf);
        return 1;
    }

    while ((opt = getopt_long(argc, argv, "c:l:hV", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'l':
            listen = optarg;
            break;
        case 'k':
            check_only = 1;
            break;
        case 't':
            hash_only = 1;
            break;
        case 'r':
            role = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("%s %s\n", SMIMED_NAME, SMIMED_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (hash_only && config_path == NULL && optind == argc)
        return hash_token();
    if (config_path == NULL || optind != argc || hash_only ||
        (role != NULL && check_only)) {
        usage(stderr);
        return 2;
    }
    if (role != NULL)
        return run_role(role, config_path, listen);
    return supervise(config_path, listen, check_only);
}
