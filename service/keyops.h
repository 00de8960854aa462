/*
 * keyops: the private-key operations of the key protocol on a token's
 * EVP_PKEY, exactly as OpenSSL's CMS would call them on the same key
 * (EVP_PKEY_sign over a digest, EVP_PKEY_decrypt, EVP_PKEY_derive), and
 * the checks of a request against the key's certificate that come first.
 * Knows nothing of tokens or sockets; never logs.
 */
#ifndef SMIMED_KEYOPS_H
#define SMIMED_KEYOPS_H

#include <stddef.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "proto/proto.h"

/* What a request may be before a token is asked: PROTO_OK, or
 * PROTO_UNSUPPORTED (the key's type cannot do it: PSS with an EC key) or
 * PROTO_BAD_REQUEST (sizes that cannot fit the key: a ciphertext that is
 * not the modulus' length, a salt too long, a DigestInfo of no accepted
 * digest), with why. pub is the certificate's public key. A SIGN whose
 * input is a DigestInfo comes back as a digest and its md (*req is
 * rewritten, its digest pointing into the DigestInfo). */
proto_status keyops_check_sign(EVP_PKEY *pub, proto_sign_req *req, char *why,
                               size_t len);
proto_status keyops_check_decrypt(EVP_PKEY *pub, const proto_decrypt_req *req,
                                  char *why, size_t len);
/* The peer's key for a DERIVE: the point on the curve of pub, checked to
 * be on it; NULL with why (PROTO_BAD_REQUEST or PROTO_UNSUPPORTED in
 * *status) otherwise. */
EVP_PKEY *keyops_peer(EVP_PKEY *pub, const proto_derive_req *req,
                      proto_status *status, char *why, size_t len);

/* The operation itself with the token's key; out has room for
 * PROTO_RSA_MAX bytes (*outlen: the result's length). 0 on success, -1
 * when the operation failed; OpenSSL's error queue is left for the
 * caller's fault check (token_key_check_fault). */
int keyops_sign(EVP_PKEY *pkey, const proto_sign_req *req, unsigned char *out,
                size_t *outlen);
int keyops_decrypt(EVP_PKEY *pkey, const proto_decrypt_req *req,
                   unsigned char *out, size_t *outlen);
int keyops_derive(EVP_PKEY *pkey, EVP_PKEY *peer, unsigned char *out,
                  size_t *outlen);

#endif
