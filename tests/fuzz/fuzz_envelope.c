/*
 * Decryption as the daemon does it, with file keys instead of a token:
 * cms_envelope_parse, then for the TEST-ONLY RSA-2048 and P-256 keys of
 * tests/fuzz/keys/ cms_envelope_names and cms_envelope_decrypt (KTRI with
 * PKCS#1 v1.5 or OAEP, KARI, EnvelopedData and AuthEnvelopedData). The
 * seeds were encrypted to those keys with openssl (tests/fuzz/make-seeds).
 * Invariants:
 *   - every decryption failure is the one CMS_ERR_DECRYPT message (no
 *     padding oracle), whatever the key and the input;
 *   - a key the envelope does not name never decrypts it;
 *   - a decrypted entity starts with a well-formed header block and, taken
 *     again from the same cms_envelope, decrypts to the same octets (no
 *     state carried over from the first attempt).
 */
#include <stdint.h>

#include "cms/internal.h"
#include "fuzz.h"

static struct {
    const char *name;
    EVP_PKEY *key;
    X509 *cert;
} keys[] = {{"rsa", NULL, NULL}, {"ec", NULL, NULL}};

/* The first CMS_ERR_DECRYPT message seen; all later ones must match. */
static char decrypt_failed[sizeof(((cms_error *)0)->message)];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    size_t i;

    cms_init();
    for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        keys[i].key = fuzz_key(keys[i].name);
        keys[i].cert = fuzz_cert(keys[i].name);
    }
    return 0;
}

static void check_failure(const char *who, const cms_error *err)
{
    FUZZ_CHECK(fuzz_refusal(err->status), "%s: status %d: %s", who, err->status,
               err->message);
    FUZZ_CHECK(fuzz_text_valid(err->message), "%s: message is not UTF-8", who);
    if (err->status != CMS_ERR_DECRYPT)
        return;
    if (decrypt_failed[0] == '\0')
        memcpy(decrypt_failed, err->message, sizeof(decrypt_failed));
    FUZZ_CHECK(strcmp(err->message, decrypt_failed) == 0,
               "%s: a second decryption failure message: \"%s\"", who,
               err->message);
}

static void decrypt_with(cms_envelope *env, size_t k)
{
    cms_result *res = NULL, *again = NULL;
    cms_header_block hb = {0};
    cms_error err = {0};
    const unsigned char *out, *out2;
    size_t len, len2;
    int named, is_signed = -1, is_signed2 = -1;

    named = cms_envelope_names(env, keys[k].cert);
    if (cms_envelope_decrypt(env, keys[k].key, keys[k].cert, &res, &is_signed,
                             &err) != 0) {
        check_failure(keys[k].name, &err);
        return;
    }
    FUZZ_CHECK(named, "%s: decrypts an envelope that does not name it",
               keys[k].name);
    FUZZ_CHECK(is_signed == 0 || is_signed == 1, "is_signed %d", is_signed);
    out = cms_result_data(res, &len);
    FUZZ_CHECK(len > 0 && cms_header_block_read(out, len, &hb, NULL) == 0,
               "%s: the decrypted entity has no header block", keys[k].name);
    cms_header_block_release(&hb);

    FUZZ_CHECK(cms_envelope_decrypt(env, keys[k].key, keys[k].cert, &again,
                                    &is_signed2, &err) == 0,
               "%s: decrypts once, then not: %s", keys[k].name, err.message);
    out2 = cms_result_data(again, &len2);
    FUZZ_CHECK(len == len2 && memcmp(out, out2, len) == 0 &&
                   is_signed == is_signed2,
               "%s: two decryptions differ", keys[k].name);
    cms_result_free(again);
    cms_result_free(res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cms_envelope *env = NULL;
    cms_error err = {0};
    size_t k;

    if (cms_envelope_parse(data, size, &env, &err) != 0) {
        FUZZ_CHECK(fuzz_refusal(err.status) && err.message[0] != '\0',
                   "parse: status %d: %s", err.status, err.message);
        FUZZ_CHECK(fuzz_text_valid(err.message), "parse: message not UTF-8");
        return 0;
    }
    for (k = 0; k < sizeof(keys) / sizeof(keys[0]); k++)
        decrypt_with(env, k);
    cms_envelope_free(env);
    return 0;
}
