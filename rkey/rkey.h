/*
 * rkey: "remote keys", private keys whose private half lives in another
 * process. An OpenSSL 3 provider of our own (registered in-process) gives
 * OpenSSL an EVP_PKEY whose public parts come from the key's certificate
 * and whose private operations (sign, RSA decrypt, ECDH derive) are handed
 * to a backend: in the daemon the key process, in the unit tests a key in
 * memory. cms/ uses such an EVP_PKEY as it would any other and never knows.
 *
 * The private parts are never present: exporting them, encoding them or
 * asking for them as parameters fails.
 */
#ifndef SMIMED_RKEY_H
#define SMIMED_RKEY_H

#include <stddef.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

/* What a private-key operation ended with; the statuses of the key
 * protocol's replies. */
typedef enum {
    RKEY_OK = 0,
    RKEY_BUSY,         /* the token is busy: try again after retry_after */
    RKEY_UNAVAILABLE,  /* the token or the key process cannot be reached */
    RKEY_NOT_FOUND,    /* no such key (any more) */
    RKEY_UNSUPPORTED,  /* the key cannot do this operation or mechanism */
    RKEY_FAILED,       /* the operation failed (a decryption, say) */
    RKEY_AUDIT_FAILED, /* the audit record could not be written */
    RKEY_BAD_REQUEST,  /* the request was refused as malformed */
    RKEY_INTERNAL,
} rkey_status;

typedef struct rkey_error {
    rkey_status status;
    unsigned retry_after; /* seconds; 0 when the reply named none */
    char message[256];    /* for people; valid UTF-8 */
} rkey_error;

/* "busy", "unavailable", ...: the protocol's names. */
const char *rkey_status_name(rkey_status status);

/* The mechanism of a signature, as PKCS#11 names it. */
typedef enum {
    RKEY_SIGN_RSA_PKCS1, /* CKM_RSA_PKCS over a DER DigestInfo */
    RKEY_SIGN_RSA_PSS,   /* CKM_RSA_PKCS_PSS over the digest */
    RKEY_SIGN_ECDSA,     /* CKM_ECDSA over the digest */
} rkey_sign_mech;

typedef struct rkey_sign_params {
    rkey_sign_mech mech;
    int md_nid;   /* the digest's NID; NID_undef when the caller set none */
    int mgf1_nid; /* RSA_PSS: MGF1's digest */
    int salt_len; /* RSA_PSS: in octets */
} rkey_sign_params;

typedef enum {
    RKEY_RSA_PKCS1, /* RSAES-PKCS1-v1_5, CKM_RSA_PKCS */
    RKEY_RSA_OAEP,  /* RSAES-OAEP, CKM_RSA_PKCS_OAEP */
} rkey_rsa_padding;

typedef struct rkey_rsa_params {
    rkey_rsa_padding padding;
    int md_nid;                 /* OAEP: the label's digest */
    int mgf1_nid;               /* OAEP: MGF1's digest */
    const unsigned char *label; /* OAEP; NULL when empty */
    size_t label_len;
} rkey_rsa_params;

/*
 * Where the private operations go. Each is called on the thread of the
 * OpenSSL call that needs it, from any number of threads at once, and
 * returns 0 or, with err filled in, -1. Lengths are in/out: the room in
 * the output buffer in, the octets written out.
 *
 * sign: tbs is what the token signs: the DER DigestInfo for
 * RKEY_SIGN_RSA_PKCS1 (the input of CKM_RSA_PKCS), the digest itself for
 * RSA-PSS and ECDSA. An RSA signature is exactly as long as the modulus;
 * an ECDSA signature is raw r || s as PKCS#11 returns it, each half as long
 * as the group order (the provider makes the DER SEQUENCE OpenSSL wants).
 *
 * decrypt: in is the ciphertext, as long as the modulus; out receives the
 * plaintext. A failure of the decryption itself is RKEY_FAILED, one
 * answer whatever its cause.
 *
 * derive: peer is the other side's public point, uncompressed
 * (04 || x || y); z receives the raw ECDH shared secret (the x coordinate,
 * as long as the field), which the provider puts through the KDF.
 *
 * release, when not NULL, is called once the last EVP_PKEY made with the
 * handle (and every copy OpenSSL made of it) is gone.
 */
typedef struct rkey_backend {
    int (*sign)(void *handle, const rkey_sign_params *p,
                const unsigned char *tbs, size_t tbs_len, unsigned char *sig,
                size_t *sig_len, rkey_error *err);
    int (*decrypt)(void *handle, const rkey_rsa_params *p,
                   const unsigned char *in, size_t in_len, unsigned char *out,
                   size_t *out_len, rkey_error *err);
    int (*derive)(void *handle, const unsigned char *peer, size_t peer_len,
                  unsigned char *z, size_t *z_len, rkey_error *err);
    void (*release)(void *handle);
} rkey_backend;

/*
 * Once per process, before the first rkey_pkey_new and before other
 * threads use OpenSSL: registers the provider, loads it and the default
 * provider into the default library context and makes the default
 * provider the one preferred (EVP_set_default_properties
 * "?provider=default"), so that every ordinary key (recipients,
 * certificates, the ephemeral key of an ECDH peer) stays there. Later
 * calls return what the first returned.
 */
int rkey_provider_init(rkey_error *err);

/* An EVP_PKEY for the private key of cert (RSA, or EC on a named curve)
 * whose private operations call be's functions with handle. be must
 * outlive every EVP_PKEY made with it. NULL with err filled in when the
 * certificate's key is of another type or the provider is not initialised; the
 * handle is then still the caller's. */
EVP_PKEY *rkey_pkey_new(const rkey_backend *be, void *handle, X509 *cert,
                        rkey_error *err);

/*
 * When a backend call fails (or answers something malformed), its error
 * is kept for the thread, so that a caller told only "signing failed" or
 * "cannot decrypt" by cms/ (which, against padding oracles, cannot say
 * more) can tell a busy or unreachable token from a bad message: clear
 * before the cms/ call, read after it. RKEY_OK when no backend call of
 * this thread failed since the last clear.
 */
void rkey_error_clear(void);
const rkey_error *rkey_last_error(void);

#endif
