/*
 * POST /v1/sign, optionally followed by encryption of the signed entity
 * (encrypt_for) in the same call.
 */
#include <stdio.h>

#include "api/internal.h"

static const char *const sign_fields[] = {
    "key",         "mode",        "digest",
    "cipher",      "rsa_padding", "allow_unfit_recipients",
    "encrypt_for", NULL,
};

typedef struct sign_params {
    const char *key;
    cms_mode mode;
    cms_digest digest;
} sign_params;

static int sign_params_read(api_input *in, sign_params *p, api_error *err)
{
    const char *mode = NULL, *digest = NULL;

    if (api_input_key(in, "key", &p->key, err) != 0 ||
        api_input_string(in, "mode", &mode, err) != 0 ||
        api_input_string(in, "digest", &digest, err) != 0)
        return -1;
    if (p->key == NULL)
        return api_fail(err, 400, "missing_field", "key is required");
    p->mode = CMS_MODE_DETACHED;
    p->digest = CMS_DIGEST_SHA256;
    if (mode != NULL && cms_mode_from_name(mode, &p->mode) != 0)
        return api_fail(err, 400, "invalid_field",
                        "mode must be \"detached\" or \"opaque\"");
    if (digest != NULL && cms_digest_from_name(digest, &p->digest) != 0)
        return api_fail(err, 400, "invalid_field",
                        "digest must be \"sha256\", \"sha384\" or \"sha512\"");
    return 0;
}

/* Response fields; reencoded lists what was changed to make it 7-bit
 * safe. */
static json_t *sign_fields_json(const sign_params *p, const cms_result *r,
                                const api_recipients *rcpt)
{
    json_t *reenc = json_array(), *fields;
    size_t i;

    for (i = 0; reenc != NULL && i < cms_result_count_reencoded(r); i++) {
        if (json_array_append_new(
                reenc, json_string(cms_result_reencoded_at(r, i))) != 0) {
            json_decref(reenc);
            reenc = NULL;
        }
    }
    fields = json_pack("{s:s,s:s,s:s,s:o}", "key", p->key, "digest",
                       cms_digest_name(p->digest), "mode",
                       cms_mode_name(p->mode), "reencoded", reenc);
    if (fields != NULL && rcpt->certs != NULL &&
        (json_object_set_new(fields, "cipher",
                             json_string(cms_cipher_name(rcpt->cipher))) ||
         json_object_set_new(fields, "recipients",
                             api_recipients_json(rcpt)))) {
        json_decref(fields);
        return NULL;
    }
    return fields;
}

/* The one private-key operation of a signing, in the key process: the
 * entity was prepared and digested, and the SignedData built, before
 * (cms_signing_new). The key process retries once on a rebuilt token
 * itself; what comes back here is its final word. */
static int sign_remote(const api_request *req, api_response *res, api_input *in,
                       const rkey_key *key, cms_signing *s, api_error *err)
{
    const rkey_error *e;
    cms_error cerr = {0};

    api_claims_set(req, res, in);
    rkey_error_clear();
    if (cms_signing_sign(s, rkey_key_pkey0(key), &cerr) == 0)
        return 0;
    e = rkey_last_error();
    if (cerr.status == CMS_ERR_KEY && e->status != RKEY_OK)
        return api_fail_rkey(err, e);
    return api_fail_cms(err, &cerr);
}

int api_handle_sign(api *a, const api_request *req, api_response *res,
                    api_error *err)
{
    api_input in;
    sign_params p = {0};
    api_recipients rcpt = {0};
    rkey_dir *dir = NULL;
    rkey_key *key;
    cms_error cerr = {0};
    cms_prepared *prep = NULL;
    cms_signing *signing = NULL;
    cms_result *signed_res = NULL, *enc = NULL, *out;
    const unsigned char *data;
    size_t len;
    int ret = -1;

    /* the contract's order: request syntax, malformed MIME included (400),
     * the client's rights (403), the key (404), the recipients (422), then
     * the token (503) */
    if (api_input_open(&in, req, sign_fields, err) != 0 ||
        sign_params_read(&in, &p, err) != 0 ||
        api_recipients_read(&in, "encrypt_for", 0, &rcpt, err) != 0)
        goto out;
    if (cms_prepare_entity(in.mime, in.mime_len, &prep, &cerr) != 0) {
        api_fail_cms(err, &cerr);
        goto out;
    }
    if (api_authorize(req, res, &in, p.key, API_OP_SIGN, err) != 0)
        goto out;
    dir = api_dir_get1(a, err);
    if (dir == NULL)
        goto out;
    key = api_lookup_key(dir, p.key, err);
    if (key == NULL || api_recipients_resolve(a, &rcpt, err) != 0)
        goto out;
    if (api_check_key(dir, key, RKEY_USE_SIGN, err) != 0)
        goto out;
    res->key_op = 1;
    if (cms_signing_new(prep, rkey_key_cert0(key), rkey_key_chain0(key), p.mode,
                        p.digest, &signing, &cerr) != 0) {
        api_fail_cms(err, &cerr);
        goto out;
    }
    if (sign_remote(req, res, &in, key, signing, err) != 0)
        goto out;
    if (cms_signing_finish(signing, &signed_res, &cerr) != 0) {
        api_fail_cms(err, &cerr);
        goto out;
    }
    /* the signed entity is a copy: what it was made from (the prepared
     * entity may point into the request body) goes before the response
     * is built */
    cms_signing_free(signing);
    signing = NULL;
    cms_prepared_free(prep);
    prep = NULL;
    api_input_drop_body(&in);
    out = signed_res;
    if (rcpt.certs != NULL) {
        data = cms_result_data(signed_res, &len);
        if (cms_encrypt_entity(data, len, rcpt.certs, rcpt.cipher, rcpt.padding,
                               &enc, &cerr) != 0) {
            api_fail_cms(err, &cerr);
            goto out;
        }
        out = enc;
    }
    if (api_respond_result(res, req->kind, out,
                           sign_fields_json(&p, signed_res, &rcpt)) != 0) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    cms_result_free(signed_res);
    cms_result_free(enc);
    cms_signing_free(signing);
    cms_prepared_free(prep);
    api_recipients_clear(&rcpt);
    rkey_dir_free(dir);
    api_input_close(&in);
    return ret;
}
