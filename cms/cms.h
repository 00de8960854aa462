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
    CMS_ERR_INPUT,   /* the entity cannot be processed (bad MIME) */
    CMS_ERR_KEY,     /* the private-key operation failed */
    CMS_ERR_INTERNAL,
} cms_status;

typedef struct cms_error {
    cms_status status;
    char message[256];
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

/* A produced entity and what was changed to make it 7-bit safe. */
typedef struct cms_result cms_result;

void cms_result_free(cms_result *res);
const unsigned char *cms_result_data(const cms_result *res, size_t *len);
/* Re-encoded parts, as "PART-NUMBER ENCODING" (IMAP part numbers, "1" for a
 * single-part entity), e.g. "2 quoted-printable". */
size_t cms_result_count_reencoded(const cms_result *res);
const char *cms_result_reencoded_at(const cms_result *res, size_t i);

/* Signs the MIME entity mime[0..len). Top-level mail headers (From, To,
 * Subject, ...) stay outside the signature and are repeated on the result;
 * the Content-* headers and the body are made 7-bit safe, canonicalised to
 * CRLF and signed. chain may be NULL. */
int cms_sign_entity(const unsigned char *mime, size_t len, EVP_PKEY *pkey,
                    X509 *cert, STACK_OF(X509) *chain, cms_mode mode,
                    cms_digest digest, cms_result **out, cms_error *err);

#endif
