/*
 * cms: MIME entities in, S/MIME entities out. Gets its private key as an
 * EVP_PKEY and never knows where it lives (a token in the daemon, a file in
 * the unit tests). Returns errors in a caller-owned struct; never logs.
 */
#ifndef SMIMED_CMS_H
#define SMIMED_CMS_H

#include <stddef.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

typedef enum {
    CMS_OK = 0,
    CMS_ERR_INPUT,     /* the entity cannot be processed (bad MIME or CMS) */
    CMS_ERR_KEY,       /* the private-key operation failed (signing) */
    CMS_ERR_DECRYPT,   /* decryption failed; one message for every cause */
    CMS_ERR_RECIPIENT, /* a recipient certificate cannot receive mail */
    CMS_ERR_ALGORITHM, /* an algorithm (or its parameters) not accepted */
    CMS_ERR_INTERNAL,
} cms_status;

typedef struct cms_error {
    cms_status status;
    char message[256]; /* for people; valid UTF-8 */
} cms_error;

typedef enum {
    CMS_MODE_DETACHED, /* multipart/signed */
    CMS_MODE_OPAQUE,   /* application/pkcs7-mime; smime-type=signed-data */
} cms_mode;

typedef enum {
    CMS_DIGEST_SHA256,
    CMS_DIGEST_SHA384,
    CMS_DIGEST_SHA512,
} cms_digest;

/* Parses "sha256"/"sha384"/"sha512" and "detached"/"opaque"; -1 if unknown. */
int cms_digest_from_name(const char *name, cms_digest *digest);
const char *cms_digest_name(cms_digest digest);
int cms_mode_from_name(const char *name, cms_mode *mode);
const char *cms_mode_name(cms_mode mode);

/* Once per process, before any other call (initialises GMime). */
void cms_init(void);

/* Strict base64 (alphabet and padding checked; blanks and line breaks
 * ignored): a malloc'd buffer of *out_len octets, or NULL with
 * CMS_ERR_INPUT naming the fault (CMS_ERR_INTERNAL when out of memory). */
unsigned char *cms_base64_decode(const unsigned char *text, size_t len,
                                 size_t *out_len, cms_error *err);

/* A produced entity and what was changed to make it 7-bit safe. */
typedef struct cms_result cms_result;

void cms_result_free(cms_result *res);
const unsigned char *cms_result_data(const cms_result *res, size_t *len);
/* The data, now the caller's to free(); res keeps the rest and has no data
 * left. */
unsigned char *cms_result_take_data(cms_result *res, size_t *len);
/* Re-encoded parts, as "PART-NUMBER ENCODING" (IMAP part numbers, "1" for a
 * single-part entity), e.g. "2 quoted-printable". */
size_t cms_result_count_reencoded(const cms_result *res);
const char *cms_result_reencoded_at(const cms_result *res, size_t i);

/* Signs the MIME entity mime[0..len). Top-level mail headers (From, To,
 * Subject, ...) stay outside the signature and are repeated on the result;
 * the Content-* headers and the body are made 7-bit safe, canonicalised to
 * CRLF and signed. An entity that cannot be made 7-bit safe (8-bit octets
 * in a header field, a preamble or epilogue, inside a multipart/signed,
 * ...) is CMS_ERR_INPUT naming the part. chain may be NULL. The same as
 * cms_prepare_entity, then cms_sign_prepared. */
int cms_sign_entity(const unsigned char *mime, size_t len, EVP_PKEY *pkey,
                    X509 *cert, STACK_OF(X509) *chain, cms_mode mode,
                    cms_digest digest, cms_result **out, cms_error *err);

/* An entity made ready for signing (split, 7-bit safe, canonical), so the
 * private key is needed only for the signature itself. */
typedef struct cms_prepared cms_prepared;
/* Everything of signing that can fail on the input (parsing, re-encoding,
 * the 7-bit check; CMS_ERR_INPUT as for cms_sign_entity), without a key:
 * callers holding a scarce key (a token session) prepare first. An entity
 * that is signed as it is (CRLF line ends, nothing to re-encode, the
 * Content-* fields ending its header block) is not copied: prep then
 * points into mime, which must outlive it. */
int cms_prepare_entity(const unsigned char *mime, size_t len,
                       cms_prepared **out, cms_error *err);
void cms_prepared_free(cms_prepared *prep);

/*
 * A signature in the making, in steps, so that a caller holding a key
 * others wait for (a token session) holds it for the private-key operation
 * alone:
 *   cms_signing_new     digests the content and builds the SignedData
 *                       with every signed attribute (no private key);
 *   cms_signing_sign    the one private-key operation: a signature over
 *                       the digest of the signed attributes;
 *   cms_signing_finish  writes the S/MIME entity.
 * The output is what CMS_sign/CMS_final would make with the same signing
 * time (RFC 5652 SignedData, DER; signed attributes contentType,
 * messageDigest, signingTime, SMIMECapabilities and ESS
 * signingCertificateV2). The signing time is taken in cms_signing_new.
 */
typedef struct cms_signing cms_signing;
/* prep is borrowed until cms_signing_free; cert is the signer's
 * certificate, chain (may be NULL) certificates to add. Threads may start
 * signings of the same prep at once. */
int cms_signing_new(const cms_prepared *prep, X509 *cert, STACK_OF(X509) *chain,
                    cms_mode mode, cms_digest digest, cms_signing **out,
                    cms_error *err);
/* Signs with pkey, the private key of the certificate: CMS_ERR_KEY when
 * it is not, or when the operation fails (a token fault: the caller may
 * call again, with the key re-opened; a later signature replaces an
 * earlier one). */
int cms_signing_sign(cms_signing *s, EVP_PKEY *pkey, cms_error *err);
/* The signed entity; CMS_ERR_INTERNAL before cms_signing_sign succeeded. */
int cms_signing_finish(cms_signing *s, cms_result **out, cms_error *err);
void cms_signing_free(cms_signing *s);

/* cms_signing_new, _sign and _finish at once; prep can be signed again
 * (e.g. with another digest), from several threads at once. */
int cms_sign_prepared(const cms_prepared *prep, EVP_PKEY *pkey, X509 *cert,
                      STACK_OF(X509) *chain, cms_mode mode, cms_digest digest,
                      cms_result **out, cms_error *err);

/* ---- decrypt ---- */

/* A parsed S/MIME encrypted entity: EnvelopedData or AuthEnvelopedData. */
typedef struct cms_envelope cms_envelope;

/* Parses application/pkcs7-mime or application/x-pkcs7-mime (smime-type
 * enveloped-data, authEnveloped-data, or none), base64 with or without line
 * breaks or binary, DER or BER (indefinite lengths). Anything else (not
 * MIME, another content type, SignedData, certificate-only, truncated or
 * garbage CMS, nesting past a sane depth) is CMS_ERR_INPUT naming what is
 * wrong. A content encryption, key transport, key agreement or key wrap
 * algorithm outside smimed's lists (README, "Accepted algorithms"), or
 * parameters of one that are not accepted, is CMS_ERR_ALGORITHM naming it
 * and its OID; that is checked before OpenSSL parses anything. */
int cms_envelope_parse(const unsigned char *mime, size_t len,
                       cms_envelope **out, cms_error *err);
void cms_envelope_free(cms_envelope *env);

/* 1 when a KeyTransRecipientInfo or KeyAgreeRecipientInfo of env names cert
 * (issuer and serial number, or subject key identifier). OpenSSL does not
 * promise that reading a parsed CMS structure from two threads is safe, so
 * the same cms_envelope must not be used from two threads at once. */
int cms_envelope_names(const cms_envelope *env, X509 *cert);

/* Decrypts env with pkey, the private key of cert (a token key: the RSA
 * decryption or the ECDH derivation runs on the token). Every failure after
 * parsing is CMS_ERR_DECRYPT with one fixed message, whether the key is
 * wrong, the padding is bad, the tag does not match or the decrypted bytes
 * are not a MIME entity (a random CBC key passes the padding check about
 * once in 256 tries), so callers cannot serve as a padding oracle. On
 * success *out holds the decrypted entity as it was encrypted and
 * *is_signed says whether it is itself an S/MIME signed entity
 * (multipart/signed or pkcs7-mime signed-data; also when its signature
 * uses an algorithm outside the lists, which cms_verify_entity then
 * refuses with CMS_ERR_ALGORITHM). The same cms_envelope
 * must not be used from two threads at once. */
int cms_envelope_decrypt(cms_envelope *env, EVP_PKEY *pkey, X509 *cert,
                         cms_result **out, int *is_signed, cms_error *err);

/* ---- encrypt ---- */

typedef enum {
    CMS_CIPHER_AES128_CBC,
    CMS_CIPHER_AES192_CBC,
    CMS_CIPHER_AES256_CBC,
    CMS_CIPHER_AES128_GCM,
    CMS_CIPHER_AES256_GCM,
} cms_cipher;

typedef enum {
    CMS_RSA_PKCS1, /* RSAES-PKCS1-v1_5, what every client reads */
    CMS_RSA_OAEP,  /* RSAES-OAEP with SHA-256 */
} cms_rsa_padding;

/* "aes-256-cbc" ... "aes-256-gcm", "pkcs1"/"oaep"; -1 if unknown. */
int cms_cipher_from_name(const char *name, cms_cipher *cipher);
const char *cms_cipher_name(cms_cipher cipher);
int cms_rsa_padding_from_name(const char *name, cms_rsa_padding *padding);

/* 0 when cert can receive encrypted mail now: an RSA key of at least 2048
 * bits or an EC key on P-256, P-384 or P-521, key usage allowing
 * keyEncipherment (RSA) or keyAgreement (EC) when the extension is
 * present, extended key usage allowing emailProtection when present,
 * inside its validity dates. Otherwise -1 with CMS_ERR_RECIPIENT and the
 * reason. Chains are not checked: the caller vouches for its recipients. */
int cms_recipient_check(X509 *cert, cms_error *err);

/* Encrypts the entity to every recipient. As for signing, top-level mail
 * headers stay outside and the Content-* headers and body (7-bit safe,
 * CRLF) are encrypted. CBC ciphers give EnvelopedData with
 * smime-type=enveloped-data, GCM ones AuthEnvelopedData with
 * smime-type=authEnveloped-data. RSA recipients get KeyTransRecipientInfo
 * with padding; EC recipients KeyAgreeRecipientInfo (ECDH, X9.63 KDF).
 * Recipients are not checked here: call cms_recipient_check first. A
 * recipient whose key cannot take the content-encryption key (an RSA key
 * too small for OAEP, say) is CMS_ERR_RECIPIENT naming it. The inner
 * entity must be 7-bit safe after re-encoding, as for signing. */
int cms_encrypt_entity(const unsigned char *mime, size_t len,
                       STACK_OF(X509) *recipients, cms_cipher cipher,
                       cms_rsa_padding padding, cms_result **out,
                       cms_error *err);

/* ---- verify ---- */

typedef struct cms_signer {
    X509 *cert;            /* NULL when the signature carries none */
    char signing_time[32]; /* RFC 3339 UTC; "" when absent */
    char digest[16];       /* "sha256", "sha384", "sha512", "sha1"... */
} cms_signer;

typedef struct cms_verification cms_verification;

/* Verifies a detached multipart/signed or an opaque application/pkcs7-mime
 * (or x-pkcs7-mime) signed-data entity against the trust anchors (a stack,
 * a hashed directory, or both; either may be NULL) and CRLs (checked for
 * every certificate of the path when given; NULL: no revocation checks).
 * -1 (CMS_ERR_INPUT) only when the entity cannot be parsed or holds more
 * than 16 SignerInfos or 256 certificates (bounds on the work one request
 * can cause; real mail has one signer and a handful of certificates);
 * CMS_ERR_ALGORITHM when a digest or signature algorithm of the SignedData
 * is outside smimed's lists (checked before OpenSSL parses it); a
 * signature that does not verify is 0 with a result whose valid flag is 0
 * and whose reason is one of "bad_signature", "content_modified",
 * "untrusted_signer", "certificate_expired", "certificate_not_yet_valid",
 * "certificate_revoked", "crl_missing", "no_signers",
 * "signer_certificate_missing", "unfit_certificate". */
int cms_verify_entity(const unsigned char *mime, size_t len,
                      STACK_OF(X509) *anchors, const char *anchor_dir,
                      STACK_OF(X509_CRL) *crls, cms_verification **out,
                      cms_error *err);
void cms_verification_free(cms_verification *v);
int cms_verification_valid(const cms_verification *v);
/* NULL when valid. */
const char *cms_verification_reason(const cms_verification *v);
/* A sentence for people, e.g. OpenSSL's certificate verification error;
 * valid UTF-8, names from certificates escaped as by error messages. */
const char *cms_verification_detail(const cms_verification *v);
size_t cms_verification_count_signers(const cms_verification *v);
const cms_signer *cms_verification_signer_at(const cms_verification *v,
                                             size_t i);
/* The signed content (the inner entity as signed, CRLF). */
const unsigned char *cms_verification_content(const cms_verification *v,
                                              size_t *len);

#endif
