/*
 * The names the API uses for digests, modes, ciphers and RSA paddings. One
 * table each, read both ways by the same two lookups.
 */
#include <string.h>

#include "cms/cms.h"

typedef struct name_entry {
    const char *name;
    int value;
} name_entry;

#define N_ELEMENTS(a) (sizeof(a) / sizeof((a)[0]))

static const name_entry digests[] = {
    {"sha256", CMS_DIGEST_SHA256},
    {"sha384", CMS_DIGEST_SHA384},
    {"sha512", CMS_DIGEST_SHA512},
};

static const name_entry modes[] = {
    {"detached", CMS_MODE_DETACHED},
    {"opaque", CMS_MODE_OPAQUE},
};

static const name_entry ciphers[] = {
    {"aes-128-cbc", CMS_CIPHER_AES128_CBC},
    {"aes-192-cbc", CMS_CIPHER_AES192_CBC},
    {"aes-256-cbc", CMS_CIPHER_AES256_CBC},
    {"aes-128-gcm", CMS_CIPHER_AES128_GCM},
    {"aes-256-gcm", CMS_CIPHER_AES256_GCM},
};

static const name_entry paddings[] = {
    {"pkcs1", CMS_RSA_PKCS1},
    {"oaep", CMS_RSA_OAEP},
};

static int value_of(const name_entry *t, size_t n, const char *name, int *value)
{
    size_t i;

    for (i = 0; name != NULL && i < n; i++) {
        if (strcmp(name, t[i].name) == 0) {
            *value = t[i].value;
            return 0;
        }
    }
    return -1;
}

static const char *name_of(const name_entry *t, size_t n, int value)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (t[i].value == value)
            return t[i].name;
    return NULL;
}

int cms_digest_from_name(const char *name, cms_digest *digest)
{
    int v;

    if (value_of(digests, N_ELEMENTS(digests), name, &v) != 0)
        return -1;
    *digest = (cms_digest)v;
    return 0;
}

const char *cms_digest_name(cms_digest digest)
{
    return name_of(digests, N_ELEMENTS(digests), (int)digest);
}

int cms_mode_from_name(const char *name, cms_mode *mode)
{
    int v;

    if (value_of(modes, N_ELEMENTS(modes), name, &v) != 0)
        return -1;
    *mode = (cms_mode)v;
    return 0;
}

const char *cms_mode_name(cms_mode mode)
{
    return name_of(modes, N_ELEMENTS(modes), (int)mode);
}

int cms_cipher_from_name(const char *name, cms_cipher *cipher)
{
    int v;

    if (value_of(ciphers, N_ELEMENTS(ciphers), name, &v) != 0)
        return -1;
    *cipher = (cms_cipher)v;
    return 0;
}

const char *cms_cipher_name(cms_cipher cipher)
{
    return name_of(ciphers, N_ELEMENTS(ciphers), (int)cipher);
}

int cms_rsa_padding_from_name(const char *name, cms_rsa_padding *padding)
{
    int v;

    if (value_of(paddings, N_ELEMENTS(paddings), name, &v) != 0)
        return -1;
    *padding = (cms_rsa_padding)v;
    return 0;
}
