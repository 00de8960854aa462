/*
 * What sign does with a submitted entity: cms_prepare_entity (parse,
 * canonicalise, re-encode to 7-bit), then cms_sign_prepared with the
 * TEST-ONLY P-256 key of tests/fuzz/keys/. Whatever is prepared must sign,
 * and what is signed must verify (cms_verify_entity against the test CA)
 * to the prepared inside with the mail headers that stayed outside back in
 * front; the result starts with those headers and lists the same
 * re-encoded parts.
 * A refusal says why in a UTF-8 message. The mode (detached or
 * opaque) and the digest follow from the input's length, so both modes
 * and all digests are covered without spending input octets on them.
 */
#include <stdint.h>

#include "cms/internal.h"
#include "fuzz.h"

static EVP_PKEY *key;
static X509 *cert;
static STACK_OF(X509) *anchors;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    cms_init();
    key = fuzz_key("ec");
    cert = fuzz_cert("ec");
    anchors = sk_X509_new_null();
    if (anchors == NULL || !sk_X509_push(anchors, fuzz_cert("ca")))
        fuzz_die("out of memory");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cms_mode mode = size % 2 ? CMS_MODE_OPAQUE : CMS_MODE_DETACHED;
    cms_digest digest = (cms_digest)(size / 2 % 3);
    cms_prepared *prep = NULL;
    cms_result *res = NULL;
    cms_verification *v = NULL;
    cms_entity ent = {0};
    cms_error err = {0};
    const unsigned char *signed_data, *content;
    static const char mime_version[] = "MIME-Version: 1.0\r\n";
    size_t signed_len, content_len, head, i;
    int prepared;

    prepared = cms_prepare_entity(data, size, &prep, &err) == 0;
    FUZZ_CHECK(fuzz_text_valid(err.message), "message is not UTF-8");
    /* the same split, to compare with what comes out */
    FUZZ_CHECK((cms_entity_parse(data, size, &ent, &err) == 0) == prepared,
               "cms_prepare_entity and cms_entity_parse disagree");
    if (!prepared) {
        FUZZ_CHECK(fuzz_refusal(err.status), "status %d: %s", err.status,
                   err.message);
        goto out;
    }

    FUZZ_CHECK(
        cms_sign_prepared(prep, key, cert, NULL, mode, digest, &res, &err) == 0,
        "a prepared entity does not sign: %s", err.message);
    signed_data = cms_result_data(res, &signed_len);
    FUZZ_CHECK(signed_len >= ent.outer.len &&
                   (ent.outer.len == 0 ||
                    memcmp(signed_data, ent.outer.data, ent.outer.len) == 0),
               "the result does not start with the mail headers");
    FUZZ_CHECK(cms_result_count_reencoded(res) == ent.n_reencoded,
               "%zu re-encoded parts reported, %zu made",
               cms_result_count_reencoded(res), ent.n_reencoded);
    for (i = 0; i < ent.n_reencoded; i++)
        FUZZ_CHECK(strcmp(cms_result_reencoded_at(res, i), ent.reencoded[i]) ==
                       0,
                   "re-encoded part %zu differs", i);

    FUZZ_CHECK(cms_verify_entity(signed_data, signed_len, anchors, NULL, NULL,
                                 &v, &err) == 0,
               "our own signature does not parse: %s", err.message);
    FUZZ_CHECK(cms_verification_valid(v), "our own signature fails: %s (%s)",
               cms_verification_reason(v), cms_verification_detail(v));
    /* verify puts the mail headers back in front of what was signed, and
     * the MIME-Version the wrapper added when the inside has none */
    content = cms_verification_content(v, &content_len);
    FUZZ_CHECK(content_len >= ent.content.len &&
                   memcmp(content + content_len - ent.content.len,
                          ent.content.data, ent.content.len) == 0,
               "the signed content does not end in the prepared entity");
    head = content_len - ent.content.len;
    FUZZ_CHECK((head == ent.outer.len ||
                head == ent.outer.len + strlen(mime_version)) &&
                   (ent.outer.len == 0 ||
                    memcmp(content, ent.outer.data, ent.outer.len) == 0) &&
                   (head == ent.outer.len ||
                    memcmp(content + ent.outer.len, mime_version,
                           strlen(mime_version)) == 0),
               "the signed content has other headers in front");
out:
    cms_verification_free(v);
    cms_result_free(res);
    cms_prepared_free(prep);
    cms_entity_release(&ent);
    return 0;
}
