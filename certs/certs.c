/*
 * The checks token/ made of a key's certificate at load and cms/ of a
 * recipient's, once each before: the same key usage per key type and the
 * same extended key usage, now in one place.
 */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "certs/certs.h"

/* RSA receives a transported key, EC agrees on one (ECDH). */
static int decrypts_by_agreement(X509 *cert)
{
    EVP_PKEY *pub = X509_get0_pubkey(cert);

    ERR_clear_error();
    return pub != NULL && EVP_PKEY_get_base_id(pub) == EVP_PKEY_EC;
}

int certs_extensions_valid(X509 *cert)
{
    /* X509_get_extension_flags caches the extensions first. */
    int valid = !(X509_get_extension_flags(cert) & EXFLAG_INVALID);

    ERR_clear_error();
    return valid;
}

int certs_key_usage_allows(X509 *cert, certs_use use)
{
    uint32_t need;
    int ok;

    if (use == CERTS_USE_SIGN)
        need = KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION;
    else
        need = decrypts_by_agreement(cert) ? KU_KEY_AGREEMENT
                                           : KU_KEY_ENCIPHERMENT;
    /* Every bit when the extension is absent. */
    ok = (X509_get_key_usage(cert) & need) != 0;
    ERR_clear_error();
    return ok;
}

const char *certs_key_usage_name(X509 *cert, certs_use use)
{
    if (use == CERTS_USE_SIGN)
        return "digitalSignature";
    return decrypts_by_agreement(cert) ? "keyAgreement" : "keyEncipherment";
}

int certs_email_allowed(X509 *cert)
{
    /* Every bit when the extension is absent. */
    int ok =
        (X509_get_extended_key_usage(cert) & (XKU_SMIME | XKU_ANYEKU)) != 0;

    ERR_clear_error();
    return ok;
}
