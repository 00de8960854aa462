/*
 * certs: whether a certificate's extensions fit an S/MIME key, judged one
 * way for token/ (a key's own certificate) and cms/ (a recipient's). A
 * leaf: it needs OpenSSL and nothing of ours, so both may use it without
 * depending on each other. Returns verdicts; the messages stay with the
 * callers, who know what the certificate is for.
 */
#ifndef SMIMED_CERTS_H
#define SMIMED_CERTS_H

#include <openssl/x509.h>

typedef enum {
    CERTS_USE_SIGN,    /* digitalSignature or nonRepudiation */
    CERTS_USE_DECRYPT, /* receiving mail: keyEncipherment (RSA) or
                        * keyAgreement (EC: ECDH) */
} certs_use;

/* 1 when OpenSSL can read the certificate's extensions (no
 * EXFLAG_INVALID); the key usage checks below mean nothing otherwise. */
int certs_extensions_valid(X509 *cert);

/* 1 when the key usage extension, when present, allows use with the
 * certificate's key. */
int certs_key_usage_allows(X509 *cert, certs_use use);

/* The key usage bit use needs with this certificate's key, by its RFC 5280
 * name ("keyAgreement"), for a message. */
const char *certs_key_usage_name(X509 *cert, certs_use use);

/* 1 when the extended key usage extension, when present, includes
 * emailProtection or anyExtendedKeyUsage (RFC 8550 section 4.4.4). */
int certs_email_allowed(X509 *cert);

#endif
