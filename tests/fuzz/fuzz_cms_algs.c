/*
 * The allow-list walker (cms/algs.c) on arbitrary bytes, both as an
 * envelope and as a SignedData: it must never read past its input, never
 * nest past its bound, and answer 0 or -1 with CMS_ERR_INPUT or
 * CMS_ERR_ALGORITHM and a message. Seeds: real envelopes and signatures
 * made with openssl (RSA, OAEP, ECDH, GCM, BER), and refused ones.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "cms/internal.h"

static void check(int rc, const cms_error *err)
{
    if (rc == 0)
        return;
    if (rc != -1 ||
        (err->status != CMS_ERR_INPUT && err->status != CMS_ERR_ALGORITHM) ||
        err->message[0] == '\0')
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cms_error err = {0};

    check(cms_algs_check_enveloped(data, size, &err), &err);
    err = (cms_error){0};
    check(cms_algs_check_signed(data, size, &err), &err);
    return 0;
}
