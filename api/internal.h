/* Helpers shared inside api/; not part of its interface. */
#ifndef SMIMED_API_INTERNAL_H
#define SMIMED_API_INTERNAL_H

#include <stddef.h>
#include <jansson.h>
#include <openssl/x509.h>

/* Strict base64 (RFC 4648 alphabet, padding optional only at the very end,
 * CR/LF/space/tab ignored). Returns a malloc'd buffer, NULL when invalid. */
unsigned char *api_base64_decode(const char *text, size_t text_len,
                                 size_t *out_len);
char *api_base64_encode(const unsigned char *data, size_t len);

int api_utf8_valid(const unsigned char *s, size_t len);

/* {"subject","issuer","serial","not_before","not_after","emails","pem"} */
json_t *api_cert_json(X509 *cert);

#endif
