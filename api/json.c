/*
 * Encodings the API needs around its JSON bodies: base64 for binary MIME
 * going out (cms_base64_decode reads it coming in), UTF-8 checks to choose
 * between "mime" and "mime_base64", and the certificate description shared
 * by /v1/keys and the verify results.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "api/internal.h"

char *api_base64_encode(const unsigned char *data, size_t len)
{
    char *out;
    size_t outlen = 4 * ((len + 2) / 3) + 1;

    if (len > INT32_MAX)
        return NULL;
    out = malloc(outlen);
    if (out == NULL)
        return NULL;
    EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    return out;
}

int api_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        unsigned char c = s[i];
        size_t need, k;
        uint32_t cp;
        uint64_t word;

        /* ASCII, the usual mail text, eight octets at a time */
        if (len - i >= 8) {
            memcpy(&word, s + i, 8);
            if ((word & 0x8080808080808080ULL) == 0) {
                i += 8;
                continue;
            }
        }
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            need = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            need = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            need = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (len - i <= need)
            return 0;
        for (k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        /* overlong forms, surrogates and values past U+10FFFF are not UTF-8 */
        if ((need == 1 && cp < 0x80) || (need == 2 && cp < 0x800) ||
            (need == 3 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += need + 1;
    }
    return 1;
}

/* Length of the valid UTF-8 sequence at s[0..len), 0 when there is none. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    size_t n = s[0] < 0x80             ? 1
               : (s[0] & 0xE0) == 0xC0 ? 2
               : (s[0] & 0xF0) == 0xE0 ? 3
               : (s[0] & 0xF8) == 0xF0 ? 4
                                       : 0;

    return n > 0 && n <= len && api_utf8_valid(s, n) ? n : 0;
}

void api_utf8_sanitize(char *s)
{
    unsigned char *p = (unsigned char *)s;
    size_t len = strlen(s), n;

    while (len > 0) {
        n = utf8_seq(p, len);
        if (n == 0) {
            *p = '?';
            n = 1;
        }
        p += n;
        len -= n;
    }
}

json_t *api_json_text(const char *s, size_t len)
{
    json_t *ret;
    char *copy;

    if (api_utf8_valid((const unsigned char *)s, len) &&
        memchr(s, '\0', len) == NULL)
        return json_stringn(s, len);
    copy = strndup(s, len);
    if (copy == NULL)
        return NULL;
    api_utf8_sanitize(copy);
    ret = json_string(copy);
    free(copy);
    return ret;
}

static json_t *name_json(const X509_NAME *name)
{
    BIO *bio = BIO_new(BIO_s_mem());
    json_t *ret = NULL;
    char *data;
    long len;

    if (bio == NULL)
        return NULL;
    /* a name OpenSSL cannot print is the sender's problem, not a 500 */
    if (X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) < 0) {
        ERR_clear_error();
        ret = json_null();
        goto out;
    }
    len = BIO_get_mem_data(bio, &data);
    ret = api_json_text(data, (size_t)len);
out:
    BIO_free(bio);
    return ret;
}

static json_t *serial_json(X509 *cert)
{
    BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
    json_t *ret = NULL;
    char *hex = NULL;

    if (bn == NULL)
        return NULL;
    hex = BN_bn2hex(bn);
    if (hex != NULL)
        ret = json_string(hex);
    OPENSSL_free(hex);
    BN_free(bn);
    return ret;
}

static json_t *time_json(const ASN1_TIME *t)
{
    struct tm tm;
    char buf[32];

    /* an unreadable time in a certificate the caller sent is not our
     * failure: say nothing rather than fail the request */
    if (!ASN1_TIME_to_tm(t, &tm))
        return json_null();
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_string(buf);
}

static json_t *emails_json(X509 *cert)
{
    STACK_OF(OPENSSL_STRING) *emails = X509_get1_email(cert);
    json_t *arr = json_array();
    int i;

    for (i = 0; arr != NULL && i < sk_OPENSSL_STRING_num(emails); i++) {
        if (json_array_append_new(
                arr, api_json_text(
                         sk_OPENSSL_STRING_value(emails, i),
                         strlen(sk_OPENSSL_STRING_value(emails, i)))) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    X509_email_free(emails);
    return arr;
}

static json_t *pem_json(X509 *cert)
{
    BIO *bio = BIO_new(BIO_s_mem());
    json_t *ret = NULL;
    char *data;
    long len;

    if (bio == NULL)
        return NULL;
    if (PEM_write_bio_X509(bio, cert)) {
        len = BIO_get_mem_data(bio, &data);
        ret = json_stringn(data, (size_t)len);
    }
    BIO_free(bio);
    return ret;
}

json_t *api_cert_json(X509 *cert, int full)
{
    json_t *obj = json_object();
    int days = 0, secs = 0;
    int failed = obj == NULL;

    failed = failed ||
             json_object_set_new(obj, "subject",
                                 name_json(X509_get_subject_name(cert))) ||
             json_object_set_new(obj, "issuer",
                                 name_json(X509_get_issuer_name(cert))) ||
             json_object_set_new(obj, "serial", serial_json(cert)) ||
             json_object_set_new(obj, "not_before",
                                 time_json(X509_get0_notBefore(cert))) ||
             json_object_set_new(obj, "not_after",
                                 time_json(X509_get0_notAfter(cert))) ||
             json_object_set_new(obj, "emails", emails_json(cert)) ||
             (full && json_object_set_new(obj, "pem", pem_json(cert)));
    /* whole days left, negative once expired, so monitoring can alert early */
    if (!failed && full &&
        ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(cert)))
        failed = json_object_set_new(obj, "expires_in_days",
                                     json_integer(days)) != 0;
    if (failed) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}
