/*
 * Private to rkey/: the key data of the provider's key manager
 * (provider.c), which the signature (signature.c), asymmetric cipher
 * (cipher.c) and key exchange (exchange.c) implementations use.
 */
#ifndef SMIMED_RKEY_INTERNAL_H
#define SMIMED_RKEY_INTERNAL_H

#include <stdatomic.h>

#include <openssl/core_dispatch.h>

#include "rkey/rkey.h"

/* Where every fetch of the provider's own helpers (digests, the X9.63
 * KDF, keys holding public parts) goes. */
#define RKEY_DEFAULT_PROPQ "provider=default"

typedef enum {
    RKEY_KIND_RSA,
    RKEY_KIND_EC,
} rkey_kind;

/* The remote half: shared by every copy OpenSSL makes of a key. */
typedef struct rkey_ref {
    atomic_int refs;
    int armed; /* release the handle when the last reference goes */
    const rkey_backend *be;
    void *handle;
} rkey_ref;

/*
 * The key manager's key data. pub is a key of the default provider that
 * holds what OpenSSL may know: the public parts (has_public), or for an
 * EC key without a point (the peer of an ECDH before its point is set)
 * the group alone; NULL when there is nothing. ref is the remote private
 * half, NULL for public keys. Reference-counted, since the operation
 * contexts keep the key they were initialised with.
 */
typedef struct rkey_key {
    atomic_int refs;
    rkey_kind kind;
    int has_public;
    EVP_PKEY *pub;
    rkey_ref *ref;
} rkey_key;

rkey_key *rkey_key_up(rkey_key *key);
void rkey_key_down(rkey_key *key);

/* Raises an OpenSSL error (library ERR_LIB_USER) with a message. */
void rkey_raise(int reason, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Calls into the backend: 0, or -1 with its error kept for the thread
 * (rkey_last_error) and raised. */
int rkey_call_sign(const rkey_key *key, const rkey_sign_params *p,
                   const unsigned char *tbs, size_t tbs_len, unsigned char *sig,
                   size_t *sig_len);
int rkey_call_decrypt(const rkey_key *key, const rkey_rsa_params *p,
                      const unsigned char *in, size_t in_len,
                      unsigned char *out, size_t *out_len);
int rkey_call_derive(const rkey_key *key, const unsigned char *peer,
                     size_t peer_len, unsigned char *z, size_t *z_len);
/* A backend answer the provider cannot use, kept as RKEY_INTERNAL. */
void rkey_fail_answer(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* A digest of the default provider by name, for the ctx params; NULL,
 * with an error raised, when unknown. Properties callers pass with a
 * digest name are not used: every digest here is the default provider's. */
EVP_MD *rkey_md_fetch(const char *name);

/* OSSL_PARAM helpers shared by the operations: an int given as an integer
 * or, for the named values in names[] (NULL-terminated pairs of value and
 * name), as a string. */
typedef struct rkey_named_int {
    int value;
    const char *name;
} rkey_named_int;
int rkey_param_get_named_int(const OSSL_PARAM *p, const rkey_named_int *names,
                             int *value);
int rkey_param_set_named_int(OSSL_PARAM *p, const rkey_named_int *names,
                             int value);
/* Sets p (a UTF-8 string) to md's name, or "" when md is NULL. */
int rkey_param_set_md(OSSL_PARAM *p, const EVP_MD *md);

extern const OSSL_DISPATCH rkey_rsa_signature_functions[];
extern const OSSL_DISPATCH rkey_ecdsa_signature_functions[];
extern const OSSL_DISPATCH rkey_rsa_cipher_functions[];
extern const OSSL_DISPATCH rkey_ecdh_exchange_functions[];

#endif
