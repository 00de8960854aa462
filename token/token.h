/*
 * token: private keys and their certificates on PKCS#11 tokens, through
 * libp11. The only module that talks to PKCS#11. Knows nothing of HTTP or
 * MIME; returns errors in a caller-owned struct and never logs.
 */
#ifndef SMIMED_TOKEN_H
#define SMIMED_TOKEN_H

#include <stddef.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

typedef enum {
    TOKEN_OK = 0,
    TOKEN_ERR_CONFIG,      /* bad URI, unreadable file, unloadable module */
    TOKEN_ERR_UNAVAILABLE, /* token absent, down, or login failed */
    TOKEN_ERR_BUSY,        /* every session in use past the wait limit */
    TOKEN_ERR_NOT_FOUND,   /* no such key */
    TOKEN_ERR_INTERNAL,
} token_status;

typedef struct token_error {
    token_status status;
    char message[256];
} token_error;

/* RFC 7512 PKCS#11 URI, the path attributes this daemon selects by.
 * Every field is NULL (or has_slot_id 0) when absent. */
typedef struct token_uri {
    char *token;
    char *manufacturer;
    char *serial;
    char *model;
    char *object;
    unsigned char *id;
    size_t id_len;
    unsigned long slot_id;
    int has_slot_id;
} token_uri;

/* Parses "pkcs11:..." into uri. Unknown path attributes are an error
 * (a typo must not silently widen the selection); query attributes other
 * than pin-source are refused for the same reason. */
int token_uri_parse(const char *text, token_uri *uri, token_error *err);
void token_uri_clear(token_uri *uri);

/* Reads a PIN from a file (first line, trailing CR/LF stripped; refused
 * when the file is open to group or others) or from an environment
 * variable (moved into locked memory and out of the environment on first
 * read; later reads return that copy). The caller wipes and frees it with
 * token_pin_free. */
char *token_pin_read_file(const char *path, token_error *err);
char *token_pin_read_env(const char *name, token_error *err);
/* -1 when the PIN file cannot be used (missing, or open to group or
 * others). */
int token_pin_check_file(const char *path, token_error *err);
/* Keeps pin as the value of the environment variable name, as if it had
 * been read from there: for a process that gets its PINs from its parent
 * (the key process, from the supervisor) rather than in its environment.
 * The caller wipes its own copy. */
int token_pin_put_env(const char *name, const char *pin, token_error *err);
/* 1 when token_pin_read_env(name) has a value to return. */
int token_pin_env_available(const char *name);
void token_pin_free(char *pin);

/* The longest key name served, in bytes. Audit records and logs hold key
 * names in buffers of this size plus one: a configured name over it is a
 * configuration error, a discovered label over it is not served. */
#define TOKEN_KEY_NAME_MAX 127

/* 1 when name can be a served key name: 1 to TOKEN_KEY_NAME_MAX bytes and
 * no control characters (it travels in response headers and log lines). */
int token_name_is_valid(const char *name);

/* One key named in the configuration. */
typedef struct token_key_spec {
    const char *name;       /* served name */
    const char *uri;        /* pkcs11: URI with object= and/or id= */
    const char *cert_file;  /* PEM certificate; NULL: the token's, same ID */
    const char *chain_file; /* PEM bundle added to signatures; may be NULL */
} token_key_spec;

/* One token in the configuration. Strings are borrowed for the call. */
typedef struct token_spec {
    const char *name;     /* label in /readyz; defaults to the token label */
    const char *module;   /* path of the PKCS#11 module */
    const char *uri;      /* pkcs11: URI selecting exactly one token */
    const char *pin_file; /* one of pin_file / pin_env */
    const char *pin_env;
    const char *chain_file; /* default chain for its keys; may be NULL */
    int discovery;          /* also serve every key with a same-ID cert */
    int optional;           /* /readyz ignores this token when down */
    int max_sessions;       /* operations in flight; 0 = default (16) */
    int wait_ms;            /* how long an excess request waits for one */
    const token_key_spec *keys;
    size_t nkeys;
} token_spec;

typedef struct token_set token_set;
typedef struct token_key token_key;

token_set *token_set_new(void);
void token_set_free(token_set *set);

/* Loads the module (shared between tokens that name the same path), finds
 * the token, logs in and resolves keys. A token that cannot be reached is
 * still added, in the down state with its reason, so the daemon can start
 * and report it; only configuration errors fail the call. */
int token_set_add(token_set *set, const token_spec *spec, token_error *err);

size_t token_set_count_tokens(const token_set *set);
const char *token_set_token_name(const token_set *set, size_t i);
/* 1 when usable; otherwise 0 and *reason says why. */
int token_set_token_ready(const token_set *set, size_t i, const char **reason);
int token_set_token_optional(const token_set *set, size_t i);
/* 1 when the token also serves discovered keys: a key name no token knows
 * may then live on it while it is down. */
int token_set_token_discovery(const token_set *set, size_t i);

/* Keys discovery found on token i but does not serve, because their label
 * cannot be a key name (token_name_is_valid): how many, and in *first the
 * first one's label, cut short and with control characters replaced, for
 * a log line. */
size_t token_set_token_skipped(const token_set *set, size_t i,
                               const char **first);
size_t token_set_count_keys(const token_set *set);
token_key *token_set_key_at(token_set *set, size_t i);
token_key *token_set_find_key(token_set *set, const char *name);

const char *token_key_name(const token_key *key);
const char *token_key_token_name(const token_key *key);
/* "rsa-2048", "ec-p256", "ec-p384" */
const char *token_key_algorithm(const token_key *key);
/* What a key is wanted for: the certificate must allow it. */
typedef enum {
    TOKEN_USE_SIGN,    /* digitalSignature or nonRepudiation; valid now */
    TOKEN_USE_DECRYPT, /* keyEncipherment (RSA) or keyAgreement (EC); an
                        * expired certificate does not stop old mail from
                        * being read */
} token_use;

/* 1 when the key can be used for use now (its token may be being
 * re-opened: token_key_acquire waits for that); otherwise 0 and *reason
 * (when reason is not NULL) says why: certificate mismatch, expired, wrong
 * key usage, token down. */
int token_key_usable(const token_key *key, token_use use, const char **reason);
/* 0 when the key's token cannot do use at all, whatever its state: an EC
 * key on a token without CKM_ECDH1_DERIVE (p11-kit remoting) cannot
 * decrypt. token_key_usable then says so too. */
int token_key_supports(const token_key *key, token_use use);
X509 *token_key_cert0(const token_key *key);
STACK_OF(X509) *token_key_chain0(const token_key *key);

/* Waits (bounded) for a free operation slot on the key's token and hands
 * out the token-backed private key, borrowed until token_key_release.
 * TOKEN_ERR_BUSY when the wait expires, TOKEN_ERR_UNAVAILABLE when the token
 * or key is not usable. */
int token_key_acquire(token_key *key, token_use use, EVP_PKEY **pkey,
                      token_error *err);
void token_key_release(token_key *key);

/* Call after a private-key operation with key failed (the error itself may
 * be gone: OpenSSL's CMS hides decryption errors), from the thread that
 * acquired the key. Probes the key's token through the module's own
 * function list and, when it answers, runs one operation of the same kind
 * with the key on input of its own (token/check.c); neither depends on
 * what the failed operation was given. 0: the token answers and does the
 * check, the failure was the operation's own (e.g. bad input). 1: the
 * operation's sessions were dead (the token was reset, its handles went
 * stale, or its module's context was rebuilt meanwhile) and the module now
 * serves on a rebuilt context: retry the operation once (err says what to
 * answer when the retry fails the same way). -1 with TOKEN_ERR_UNAVAILABLE:
 * the token is down, with the reason, and the recovery loop re-opens it;
 * or it answers but fails the check too (the reason names the token's
 * code) and stays up. -1 with TOKEN_ERR_BUSY: no operation slot came free
 * for the check. */
int token_key_check_fault(token_key *key, token_error *err);

/* What operators see of a token. */
typedef enum {
    TOKEN_STATE_READY,
    TOKEN_STATE_DOWN,         /* unreachable, or not opened */
    TOKEN_STATE_BUSY,         /* ready, every session in use */
    TOKEN_STATE_PIN_REJECTED, /* no login is tried until a reload */
    TOKEN_STATE_RECOVERING,   /* its module's context is being rebuilt */
} token_state;

const char *token_state_name(token_state state);

/* The state, the time of its last change (*since, when not NULL) and, when
 * not ready, why (*reason, a string that lives as long as the set). */
token_state token_set_token_state(const token_set *set, size_t i, time_t *since,
                                  const char **reason);

/* Counters since the token set was built (a reload starts them anew). */
typedef struct token_stats {
    unsigned long operations[2]; /* started, by token_use */
    unsigned long busy;          /* refused: no session came free in time */
    unsigned long unavailable;   /* refused: token or key not usable */
    unsigned long faults;        /* failed: the token stopped answering */
    unsigned long retries;       /* failed on a dead context, retried */
    unsigned long recoveries;    /* re-opened on a rebuilt context */
    unsigned in_flight;
    unsigned waiting; /* requests queued for a session */
    unsigned max_sessions;
} token_stats;

void token_set_token_stats(const token_set *set, size_t i, token_stats *out);

/* Called on every state change of a token, in order, from whichever
 * thread made it (the recovery loop, or a request that found the token
 * down), with no lock of token/ held; state is a token_state_name, reason
 * NULL when ready. Past 64 changes not yet told (a hook that blocks),
 * later ones are dropped. Must not call into token/. */
typedef void (*token_event_fn)(const char *token, const char *state,
                               const char *reason);

/* Called from the recovery loop, with no lock of token/ held, when a
 * token that was absent when its set was built (no token matched its URI,
 * or no session opened) answers now: its keys are found only by building
 * a new set, so the caller reloads. Must not call into token/. */
typedef void (*token_present_fn)(const char *token);

/* The recovery loop: a thread that rebuilds the libp11 context of every
 * module with a token that went down at run time, with back-off (1 s,
 * doubling to 30 s); on modules where no token serves, it also looks for
 * tokens absent at load with the same back-off. Start it once the first
 * token set exists, stop it before the last one is freed. */
int token_recovery_start(token_event_fn fn, token_present_fn present,
                         token_error *err);
void token_recovery_stop(void);

#endif
