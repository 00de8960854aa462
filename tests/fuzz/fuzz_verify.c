/*
 * cms_verify_entity (multipart/signed and pkcs7-mime signed-data) against
 * one fixed anchor, the TEST-ONLY CA of tests/fuzz/keys/, once without and
 * once with its CRL (which revokes the "revoked" signer). Seeds were
 * signed with the test keys by openssl, detached and opaque
 * (tests/fuzz/make-seeds). Invariants:
 *   - a refusal says why in UTF-8; otherwise the result is valid with no
 *     reason and at least one signer, or invalid with one of the reasons
 *     cms/cms.h lists;
 *   - signers' digests are names, signing times RFC 3339 UTC or empty;
 *   - the CRL can only take validity away: the same answer to whether the
 *     entity parses and how many signers it has, and valid with the CRL
 *     only when valid without it.
 */
#include <ctype.h>
#include <stdint.h>

#include "cms/cms.h"
#include "fuzz.h"

static STACK_OF(X509) *anchors;
static STACK_OF(X509_CRL) *crls;

static const char *const reasons[] = {
    "bad_signature",
    "content_modified",
    "untrusted_signer",
    "certificate_expired",
    "certificate_not_yet_valid",
    "certificate_revoked",
    "crl_missing",
    "no_signers",
    "signer_certificate_missing",
    "unfit_certificate",
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    cms_init();
    anchors = sk_X509_new_null();
    crls = sk_X509_CRL_new_null();
    if (anchors == NULL || crls == NULL ||
        !sk_X509_push(anchors, fuzz_cert("ca")) ||
        !sk_X509_CRL_push(crls, fuzz_crl()))
        fuzz_die("out of memory");
    return 0;
}

static int is_rfc3339(const char *t)
{
    static const char form[] = "dddd-dd-ddTdd:dd:ddZ";
    size_t i;

    if (strlen(t) != sizeof(form) - 1)
        return 0;
    for (i = 0; form[i] != '\0'; i++)
        if (form[i] == 'd' ? !isdigit((unsigned char)t[i]) : t[i] != form[i])
            return 0;
    return 1;
}

static void check_result(const cms_verification *v)
{
    const char *reason = cms_verification_reason(v);
    const cms_signer *s;
    size_t i, n = cms_verification_count_signers(v), len;
    int known = 0;

    FUZZ_CHECK(fuzz_text_valid(cms_verification_detail(v)),
               "detail is not UTF-8");
    if (cms_verification_valid(v)) {
        FUZZ_CHECK(reason == NULL && n > 0, "valid, but reason %s, %zu signers",
                   reason, n);
        FUZZ_CHECK(cms_verification_content(v, &len) != NULL,
                   "valid without content");
    } else {
        FUZZ_CHECK(reason != NULL, "invalid without a reason");
        for (i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
            known |= strcmp(reason, reasons[i]) == 0;
        FUZZ_CHECK(known, "unknown reason %s", reason);
    }
    for (i = 0; i < n; i++) {
        s = cms_verification_signer_at(v, i);
        FUZZ_CHECK(s != NULL, "signer %zu missing", i);
        FUZZ_CHECK(s->digest[0] != '\0' && fuzz_text_valid(s->digest),
                   "signer %zu: digest \"%s\"", i, s->digest);
        FUZZ_CHECK(s->signing_time[0] == '\0' || is_rfc3339(s->signing_time),
                   "signer %zu: signing time \"%s\"", i, s->signing_time);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cms_verification *plain = NULL, *checked = NULL;
    cms_error err = {0}, err2 = {0};
    int r, r2;

    r = cms_verify_entity(data, size, anchors, NULL, NULL, &plain, &err);
    r2 = cms_verify_entity(data, size, anchors, NULL, crls, &checked, &err2);
    FUZZ_CHECK(r == r2, "parses %s a CRL only", r == 0 ? "without" : "with");
    if (r != 0) {
        FUZZ_CHECK(fuzz_refusal(err.status) && err.message[0] != '\0' &&
                       fuzz_text_valid(err.message),
                   "status %d: %s", err.status, err.message);
        return 0;
    }
    check_result(plain);
    check_result(checked);
    FUZZ_CHECK(cms_verification_count_signers(plain) ==
                   cms_verification_count_signers(checked),
               "the CRL changed the number of signers");
    FUZZ_CHECK(
        !cms_verification_valid(checked) || cms_verification_valid(plain),
        "valid with the CRL, %s without", cms_verification_reason(plain));
    cms_verification_free(plain);
    cms_verification_free(checked);
    return 0;
}
