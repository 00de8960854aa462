/*
 * cms_base64_decode, the strict decoder for S/MIME bodies and mime_base64,
 * against the rules cms/cms.h documents and OpenSSL's decoder:
 *   - blanks and line breaks (space, tab, CR, LF) are ignored anywhere;
 *   - what is left is data characters of the standard alphabet, then at
 *     most two '=' of padding and nothing after them;
 *   - padding completes the last quantum to four characters, and may only
 *     follow two or three data characters; without padding, a last
 *     quantum of one character is truncated input.
 * Accepted input decodes to what EVP_DecodeBlock makes of it padded, and
 * the output encodes (EVP_EncodeBlock) to text that decodes back to it.
 */
#include <stdint.h>

#include <openssl/evp.h>

#include "cms/cms.h"
#include "fuzz.h"

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static int is_alphabet(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '+' || c == '/';
}

/* The rules above, as a second opinion: the compact text (blanks gone) in
 * *text, and whether the input is well-formed. */
static int rules_accept(const unsigned char *in, size_t len,
                        unsigned char *text, size_t *n_data, size_t *n_pad)
{
    size_t i, n = 0, data = 0, pad;

    for (i = 0; i < len; i++)
        if (!is_space(in[i]))
            text[n++] = in[i];
    while (data < n && is_alphabet(text[data]))
        data++;
    for (pad = 0; data + pad < n && text[data + pad] == '='; pad++)
        ;
    *n_data = data;
    *n_pad = pad;
    if (data + pad != n || pad > 2)
        return 0;
    if (pad == 0)
        return data % 4 != 1;
    return data % 4 >= 2 && (data + pad) % 4 == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *text = malloc(size + 4), *ref = malloc(size / 4 * 3 + 6);
    unsigned char *got, *enc = NULL, *again;
    size_t got_len = 0, again_len = 0, n_data, n_pad, padded, ref_len;
    cms_error err = {0};
    int accept, n;

    if (text == NULL || ref == NULL)
        fuzz_die("out of memory");
    accept = rules_accept(data, size, text, &n_data, &n_pad);
    got = cms_base64_decode(data, size, &got_len, &err);
    FUZZ_CHECK((got != NULL) == accept, "decoder says %s, the rules %s",
               got != NULL ? "yes" : err.message, accept ? "yes" : "no");
    if (got == NULL) {
        FUZZ_CHECK(err.status == CMS_ERR_INPUT && err.message[0] != '\0' &&
                       fuzz_text_valid(err.message),
                   "status %d, message \"%s\"", err.status, err.message);
        goto out;
    }

    /* OpenSSL decodes whole quanta only: pad the last one, then drop the
     * octets the padding stands for. */
    padded = n_data + n_pad;
    while (padded % 4 != 0)
        text[padded++] = '=';
    n = EVP_DecodeBlock(ref, text, (int)padded);
    FUZZ_CHECK(n >= 0, "OpenSSL refuses what the decoder took");
    ref_len = (size_t)n - (padded - n_data);
    FUZZ_CHECK(got_len == ref_len && memcmp(got, ref, got_len) == 0,
               "%zu octets decoded, OpenSSL has %zu", got_len, ref_len);

    enc = malloc(got_len / 3 * 4 + 5);
    if (enc == NULL)
        fuzz_die("out of memory");
    n = EVP_EncodeBlock(enc, got, (int)got_len);
    again = cms_base64_decode(enc, (size_t)n, &again_len, &err);
    FUZZ_CHECK(again != NULL, "own encoding refused: %s", err.message);
    FUZZ_CHECK(again_len == got_len && memcmp(again, got, got_len) == 0,
               "round trip changed %zu octets into %zu", got_len, again_len);
    free(again);
out:
    free(got);
    free(enc);
    free(text);
    free(ref);
    return 0;
}
