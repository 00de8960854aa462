/*
 * rkey client: a worker's one connection to the key process (proto/).
 * Thread-safe: any number of request threads call at once; a send lock
 * keeps datagrams whole on a socket that may be replaced, a reader thread
 * matches replies to waiters by id, and each call waits at most the
 * client's timeout. When the socket closes (the key process died) every
 * waiter gets PROTO_UNAVAILABLE at once and later calls fail fast, until
 * the supervisor hands a new socket (rkey_client_set_socket).
 *
 * The key directory (rkey_dir, rkey_key) is what api/ reads instead of a
 * token_set: names, tokens, certificates, usability; it is fetched again
 * when the key process announces a new epoch (a reload or a token's state
 * change), when the socket is replaced, and after RKEY_DIR_TTL_S.
 *
 * The calls are shaped for the provider's backend (rkey/rkey.h,
 * rkey_backend): sign takes what the token signs (a DigestInfo for
 * PKCS#1 v1.5, the digest for PSS and ECDSA), decrypt the ciphertext,
 * derive the peer's point; the audit claims of the request come from the
 * calling thread (rkey_claims_set), since OpenSSL calls the provider
 * without them.
 */
#ifndef SMIMED_RKEY_CLIENT_H
#define SMIMED_RKEY_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/x509.h>

#include "proto/proto.h"

/* A directory older than this is fetched again even without a notice:
 * a certificate's validity ends without any event. */
#define RKEY_DIR_TTL_S 60

/* Why a call failed: the reply's status, Retry-After and message, or
 * PROTO_UNAVAILABLE when the key process could not be reached or did not
 * answer in time, PROTO_INTERNAL for a malformed reply. */
typedef struct rkey_failure {
    proto_status status;
    uint32_t retry_after;
    char message[PROTO_MESSAGE_MAX + 1];
} rkey_failure;

typedef struct rkey_client rkey_client;

/* Takes fd (a SOCK_SEQPACKET socket to the key process; -1: none yet).
 * timeout_ms bounds every call; it must outlast the longest wait for a
 * token session (wait_ms) plus the operation. */
rkey_client *rkey_client_new(int fd, unsigned timeout_ms);
void rkey_client_free(rkey_client *c);
/* Takes fd in place of the socket in use: calls waiting on the old one
 * fail with PROTO_UNAVAILABLE, and the directory is fetched again. */
void rkey_client_set_socket(rkey_client *c, int fd);

/* The claims the calling thread's key operations carry (copied; NULL
 * clears them). A key operation without claims is refused here. */
void rkey_claims_set(const proto_claims *claims);
/* Key operations the calling thread sent with its claims since they were
 * last set: a request that sent any ends with rkey_finish. */
unsigned rkey_claims_ops(void);

/* proto's number for an OpenSSL digest NID; PROTO_MD_NONE for NID_undef
 * and PROTO_MD_COUNT for one the protocol does not carry. */
unsigned rkey_md_from_nid(int nid);

typedef struct rkey_sign_args {
    proto_sign_mech mech;
    unsigned md;       /* proto_md; NONE: tbs is a DigestInfo (PKCS#1 v1.5) */
    unsigned mgf1_md;  /* PSS */
    uint32_t salt_len; /* PSS, in octets */
} rkey_sign_args;

typedef struct rkey_decrypt_args {
    proto_padding padding;
    unsigned oaep_md, mgf1_md; /* OAEP */
    const unsigned char *label;
    size_t label_len;
} rkey_decrypt_args;

/* Each returns 0, or -1 with *f. *out_len is the room in out (in) and the
 * result's length (out). A signature is what EVP_PKEY_sign makes with the
 * token's key: RSA as long as the modulus, ECDSA DER encoded. */
int rkey_sign(rkey_client *c, const char *key, const rkey_sign_args *a,
              const unsigned char *tbs, size_t tbs_len, unsigned char *out,
              size_t *out_len, rkey_failure *f);
int rkey_decrypt(rkey_client *c, const char *key, const rkey_decrypt_args *a,
                 const unsigned char *in, size_t in_len, unsigned char *out,
                 size_t *out_len, rkey_failure *f);
int rkey_derive(rkey_client *c, const char *key, const unsigned char *point,
                size_t point_len, unsigned char *out, size_t *out_len,
                rkey_failure *f);

/* The record of a request refused without a key operation (401, 403). */
int rkey_audit(rkey_client *c, const proto_claims *claims,
               const char *operation, const char *key, unsigned result,
               const char *error, rkey_failure *f);
/* The end of a request whose key operations were recorded: its status
 * and error code (NULL: none), and how long it took. One way: 0 once it
 * is sent; the key process writes the record soon after. */
int rkey_finish(rkey_client *c, const char *request_id, unsigned result,
                const char *error, uint32_t latency_us, rkey_failure *f);

/* Every token's state and counters now, for /readyz and /metrics (not
 * cached): *tokens is an array of *count (free it with free()). */
int rkey_state(rkey_client *c, proto_token_entry **tokens, size_t *count,
               rkey_failure *f);

typedef struct rkey_dir rkey_dir;
typedef struct rkey_key rkey_key;

/* The directory, fetched again first when it is stale; a reference the
 * caller drops with rkey_dir_free. NULL with *f when it cannot be had. */
rkey_dir *rkey_dir_get1(rkey_client *c, rkey_failure *f);
void rkey_dir_free(rkey_dir *d);

/* The key process's epoch the directory was read at. */
uint64_t rkey_dir_epoch(const rkey_dir *d);
size_t rkey_dir_count_keys(const rkey_dir *d);
rkey_key *rkey_dir_key_at(rkey_dir *d, size_t i);
rkey_key *rkey_dir_find_key(rkey_dir *d, const char *name);
/* The tokens, as a STATE reply gave them when the directory was read. */
size_t rkey_dir_count_tokens(const rkey_dir *d);
const proto_token_entry *rkey_dir_token_at(const rkey_dir *d, size_t i);

/* What a key is wanted for, as token_use. */
typedef enum {
    RKEY_USE_SIGN,
    RKEY_USE_DECRYPT,
} rkey_use;

/* Borrowed from the directory, valid while it is held. */
const char *rkey_key_name(const rkey_key *k);
const char *rkey_key_token_name(const rkey_key *k);
const char *rkey_key_algorithm(const rkey_key *k);
X509 *rkey_key_cert0(const rkey_key *k);
STACK_OF(X509) *rkey_key_chain0(const rkey_key *k);
/* The key as an EVP_PKEY of the rkey provider (rkey/rkey.h): public parts
 * from the certificate, private operations sent to the key process with
 * the calling thread's claims. NULL without a certificate, for a key type
 * rkey does not carry, or when rkey_provider_init was not called. A new
 * epoch's directory has new ones; EVP_PKEY_up_ref keeps one past its
 * directory (its handle goes with its last reference). */
EVP_PKEY *rkey_key_pkey0(const rkey_key *k);
/* As token_key_usable and token_key_supports, when the directory was
 * read. */
int rkey_key_usable(const rkey_key *k, rkey_use use, const char **reason);
int rkey_key_supports(const rkey_key *k, rkey_use use);

#endif
