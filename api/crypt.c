/*
 * POST /v1/encrypt and POST /v1/decrypt, and the recipient list that
 * encrypt and sign's encrypt_for share.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "api/internal.h"

void api_recipients_clear(api_recipients *r)
{
    size_t i;

    for (i = 0; r->slots != NULL && i < r->names.count; i++)
        X509_free(r->slots[i]);
    free(r->slots);
    r->slots = NULL;
    api_strings_clear(&r->names);
    sk_X509_pop_free(r->certs, X509_free);
    r->certs = NULL;
}

static X509 *pem_cert(const char *text)
{
    BIO *bio = BIO_new_mem_buf(text, -1);
    X509 *cert = NULL;

    if (bio != NULL)
        cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    ERR_clear_error();
    return cert;
}

static int is_pem(const char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
        s++;
    return strncmp(s, "-----BEGIN", 10) == 0;
}

static int recipient_options(api_input *in, int present, api_recipients *out,
                             api_error *err)
{
    const char *cipher = NULL, *padding = NULL;
    int unset = -1;

    if (api_input_string(in, "cipher", &cipher, err) != 0 ||
        api_input_string(in, "rsa_padding", &padding, err) != 0 ||
        api_input_bool(in, "allow_unfit_recipients", &unset, err) != 0)
        return -1;
    if (!present && (cipher != NULL || padding != NULL || unset != -1))
        return api_fail(err, 400, "invalid_field",
                        "cipher, rsa_padding and allow_unfit_recipients "
                        "need %s",
                        out->field);
    out->allow_unfit = unset == 1;
    out->cipher = CMS_CIPHER_AES256_CBC;
    out->padding = CMS_RSA_PKCS1;
    if (cipher != NULL && cms_cipher_from_name(cipher, &out->cipher) != 0)
        return api_fail(err, 400, "invalid_field",
                        "cipher must be aes-128-cbc, aes-192-cbc, "
                        "aes-256-cbc, aes-128-gcm or aes-256-gcm");
    if (padding != NULL &&
        cms_rsa_padding_from_name(padding, &out->padding) != 0)
        return api_fail(err, 400, "invalid_field",
                        "rsa_padding must be pkcs1 or oaep");
    return 0;
}

int api_recipients_read(api_input *in, const char *field, int required,
                        api_recipients *out, api_error *err)
{
    size_t i;
    int present;

    out->field = field;
    if (api_input_strings(in, field, &out->names, err) != 0)
        return -1;
    present = in->root != NULL ? json_object_get(in->root, field) != NULL
                               : out->names.count > 0;
    if (recipient_options(in, present, out, err) != 0)
        return -1;
    if (!present && !required)
        return 0;
    if (out->names.count == 0)
        return api_fail(err, 400, present ? "invalid_field" : "missing_field",
                        "%s must list at least one recipient", field);
    out->slots = calloc(out->names.count, sizeof(*out->slots));
    if (out->slots == NULL)
        return api_fail(err, 500, "internal_error", "out of memory");
    for (i = 0; i < out->names.count; i++) {
        if (is_pem(out->names.items[i]) &&
            (out->slots[i] = pem_cert(out->names.items[i])) == NULL)
            return api_fail(err, 400, "invalid_certificate",
                            "%s[%zu] is not a PEM certificate", field, i);
    }
    return 0;
}

/* The certificates of the recipients named by key: only names need the
 * key process's directory, PEM recipients do not. */
static int resolve_names(api *a, api_recipients *r, api_error *err)
{
    rkey_dir *dir = NULL;
    rkey_key *key;
    char missing[160];
    size_t i;
    int ret = -1;

    for (i = 0; i < r->names.count; i++) {
        if (r->slots[i] != NULL)
            continue;
        if (dir == NULL && (dir = api_dir_get1(a, err)) == NULL)
            goto out;
        key = rkey_dir_find_key(dir, r->names.items[i]);
        if (key == NULL) {
            /* a discovery token that is down may hold it (a reload that
             * met the token absent serves none of its keys) */
            snprintf(missing, sizeof(missing),
                     "%s[%zu]: no key named \"%.60s\" is available", r->field,
                     i, r->names.items[i]);
            if (api_fail_if_discovery_down(dir, missing, err) == 0)
                api_fail(err, 404, "unknown_key",
                         "%s[%zu]: no key named \"%s\"", r->field, i,
                         r->names.items[i]);
            goto out;
        }
        if (rkey_key_cert0(key) == NULL) {
            api_fail(err, 422, "unfit_recipient",
                     "%s[%zu]: key \"%s\" has no certificate", r->field, i,
                     r->names.items[i]);
            goto out;
        }
        r->slots[i] = rkey_key_cert0(key);
        X509_up_ref(r->slots[i]);
    }
    ret = 0;
out:
    rkey_dir_free(dir);
    return ret;
}

int api_recipients_resolve(api *a, api_recipients *r, api_error *err)
{
    cms_error cerr = {0};
    size_t i;

    if (r->names.count == 0)
        return 0;
    if (resolve_names(a, r, err) != 0)
        return -1;
    for (i = 0; !r->allow_unfit && i < r->names.count; i++) {
        if (cms_recipient_check(r->slots[i], &cerr) != 0)
            return api_fail(err, 422, "unfit_recipient", "%s[%zu]: %s",
                            r->field, i, cerr.message);
    }
    r->certs = sk_X509_new_reserve(NULL, (int)r->names.count);
    if (r->certs == NULL)
        return api_fail(err, 500, "internal_error", "out of memory");
    for (i = 0; i < r->names.count; i++) {
        sk_X509_push(r->certs, r->slots[i]);
        r->slots[i] = NULL;
    }
    return 0;
}

json_t *api_recipients_json(const api_recipients *r)
{
    json_t *list = json_array();
    int i;

    for (i = 0; list != NULL && i < sk_X509_num(r->certs); i++) {
        if (json_array_append_new(
                list, api_cert_json(sk_X509_value(r->certs, i), 0)) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    return list;
}

int api_handle_encrypt(api *a, const api_request *req, api_response *res,
                       api_error *err)
{
    static const char *const fields[] = {"recipients", "cipher", "rsa_padding",
                                         "allow_unfit_recipients", NULL};
    api_input in;
    api_recipients rcpt = {0};
    cms_result *enc = NULL;
    cms_error cerr = {0};
    const unsigned char *data;
    size_t len;
    int ret = -1;

    if (api_input_open(&in, req, fields, err) != 0 ||
        api_recipients_read(&in, "recipients", 1, &rcpt, err) != 0 ||
        api_recipients_resolve(a, &rcpt, err) != 0)
        goto out;
    if (cms_encrypt_entity(in.mime, in.mime_len, rcpt.certs, rcpt.cipher,
                           rcpt.padding, &enc, &cerr) != 0) {
        api_fail_cms(err, &cerr);
        goto out;
    }
    data = cms_result_data(enc, &len);
    if (api_respond_entity(res, req->kind, data, len,
                           json_pack("{s:s,s:o}", "cipher",
                                     cms_cipher_name(rcpt.cipher), "recipients",
                                     api_recipients_json(&rcpt))) != 0) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    cms_result_free(enc);
    api_recipients_clear(&rcpt);
    api_input_close(&in);
    return ret;
}

/* The key to decrypt with when the request does not force one: the first
 * served key whose certificate a RecipientInfo names, that the client may
 * use and that may decrypt now. *denied is a named key the client may not
 * use, when that is all there is. */
static rkey_key *choose_key(rkey_dir *d, const api_request *req,
                            const cms_envelope *env, rkey_key **denied,
                            api_error *err)
{
    rkey_key *key, *named = NULL;
    size_t i;

    *denied = NULL;
    for (i = 0; i < rkey_dir_count_keys(d); i++) {
        key = rkey_dir_key_at(d, i);
        if (rkey_key_cert0(key) == NULL ||
            !cms_envelope_names(env, rkey_key_cert0(key)))
            continue;
        if (!api_client_may(req, rkey_key_name(key), API_OP_DECRYPT)) {
            if (*denied == NULL)
                *denied = key;
            continue;
        }
        if (rkey_key_usable(key, RKEY_USE_DECRYPT, NULL) &&
            rkey_key_pkey0(key) != NULL)
            return key;
        if (named == NULL)
            named = key;
    }
    /* named but not usable: say why rather than "no recipient" */
    if (named != NULL) {
        *denied = NULL;
        api_check_key(d, named, RKEY_USE_DECRYPT, err);
        return NULL;
    }
    if (*denied != NULL)
        return NULL;
    if (api_fail_if_discovery_down(d, "no served key is a recipient", err) == 0)
        api_fail(err, 422, "no_matching_recipient",
                 "none of the served keys is a recipient of this message");
    return NULL;
}

/* The forced key, once the envelope is known: it must be a recipient
 * (422) and usable (503). */
static int check_forced(const rkey_dir *d, const rkey_key *key,
                        const cms_envelope *env, api_error *err)
{
    if (!cms_envelope_names(env, rkey_key_cert0(key)))
        return api_fail(err, 422, "no_matching_recipient",
                        "key \"%s\" is not among the message's recipients",
                        rkey_key_name(key));
    return api_check_key(d, key, RKEY_USE_DECRYPT, err);
}

/* Decrypts with the key in the key process. A failure is 422
 * decryption_failed unless the key process says the token is to blame:
 * OpenSSL's CMS hides the operation's error (it goes on with a random key,
 * so that bad padding looks like a wrong key), and the key process
 * answers every failure of the decryption itself alike ("failed"), telling
 * a token fault apart on its own (token_key_check_fault, with a retry on a
 * rebuilt context), so whether this is a 503 depends on the token, never
 * on the ciphertext. */
static int decrypt_remote(const api_request *req, api_response *res,
                          api_input *in, const rkey_key *key, cms_envelope *env,
                          cms_result **out, int *is_signed, api_error *err)
{
    const rkey_error *e;
    cms_error cerr = {0};

    api_claims_set(req, res, in);
    rkey_error_clear();
    if (cms_envelope_decrypt(env, rkey_key_pkey0(key), rkey_key_cert0(key), out,
                             is_signed, &cerr) == 0)
        return 0;
    e = rkey_last_error();
    if (e->status != RKEY_OK && e->status != RKEY_FAILED &&
        (cerr.status == CMS_ERR_DECRYPT || cerr.status == CMS_ERR_KEY))
        return api_fail_rkey(err, e);
    return api_fail_cms(err, &cerr);
}

/* What "verify": true adds: the verify response for a signed entity, or a
 * negative one that says there was no signature to check, or none smimed
 * checks (an algorithm outside its lists: the plaintext is still the
 * caller's, where /v1/verify would answer 422). */
static int decrypt_verification(api *a, const api_trust *t, const cms_result *r,
                                int is_signed, json_t **out, api_error *err)
{
    const unsigned char *data;
    size_t len;

    if (is_signed) {
        data = cms_result_data(r, &len);
        if (api_verify_entity(a, t, data, len, out, err) == 0)
            return 0;
        if (strcmp(err->code, "unsupported_algorithm") != 0)
            return -1;
        *out = json_pack("{s:b,s:s,s:s,s:[]}", "valid", 0, "reason",
                         "unsupported_algorithm", "detail", err->message,
                         "signers");
    } else {
        *out = json_pack(
            "{s:b,s:s,s:s,s:[]}", "valid", 0, "reason", "not_signed", "detail",
            "the decrypted entity carries no signature", "signers");
    }
    if (*out == NULL)
        return api_fail(err, 500, "internal_error", "out of memory");
    return 0;
}

int api_handle_decrypt(api *a, const api_request *req, api_response *res,
                       api_error *err)
{
    static const char *const fields[] = {"key", "verify", "trust", "crls",
                                         NULL};
    api_input in;
    api_trust trust = {0};
    const char *forced = NULL;
    cms_envelope *env = NULL;
    cms_result *plain = NULL;
    cms_error cerr = {0};
    rkey_dir *dir = NULL;
    rkey_key *key = NULL, *denied = NULL;
    json_t *fields_out = NULL, *verification = NULL;
    const unsigned char *data;
    size_t len;
    int verify = 0, is_signed = 0, ret = -1;

    /* the contract's order: request syntax (400), the client's rights to
     * a forced key (403), that key (404), the content (422), then the token
     * (503); without a forced key the rights are known once the envelope
     * names its recipients */
    if (api_input_open(&in, req, fields, err) != 0 ||
        api_input_key(&in, "key", &forced, err) != 0 ||
        api_input_bool(&in, "verify", &verify, err) != 0 ||
        api_trust_read(&in, &trust, err) != 0)
        goto out;
    if (forced != NULL) {
        if (api_authorize(req, res, &in, forced, API_OP_DECRYPT, err) != 0)
            goto out;
        if ((dir = api_dir_get1(a, err)) == NULL ||
            (key = api_lookup_key(dir, forced, err)) == NULL)
            goto out;
    }
    if (cms_envelope_parse(in.mime, in.mime_len, &env, &cerr) != 0) {
        if (cerr.status == CMS_ERR_INPUT)
            api_fail(err, 422, "invalid_smime", "%s", cerr.message);
        else
            api_fail_cms(err, &cerr);
        goto out;
    }
    if (key != NULL) {
        if (check_forced(dir, key, env, err) != 0)
            goto out;
    } else {
        if ((dir = api_dir_get1(a, err)) == NULL)
            goto out;
        key = choose_key(dir, req, env, &denied, err);
        /* only keys the client may not use open it: 403, and audited */
        if (key == NULL && denied != NULL)
            api_authorize(req, res, &in, rkey_key_name(denied), API_OP_DECRYPT,
                          err);
        if (key == NULL || api_authorize(req, res, &in, rkey_key_name(key),
                                         API_OP_DECRYPT, err) != 0)
            goto out;
    }
    res->key_op = 1;
    if (decrypt_remote(req, res, &in, key, env, &plain, &is_signed, err) != 0)
        goto out;
    if (verify && decrypt_verification(a, &trust, plain, is_signed,
                                       &verification, err) != 0)
        goto out;
    fields_out = json_pack("{s:s,s:b,s:o*}", "key", rkey_key_name(key),
                           "signed", is_signed, "verification", verification);
    verification = NULL;
    data = cms_result_data(plain, &len);
    if (api_respond_entity(res, req->kind, data, len, fields_out) != 0) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    json_decref(verification);
    cms_result_free(plain);
    cms_envelope_free(env);
    rkey_dir_free(dir);
    api_trust_clear(&trust);
    api_input_close(&in);
    return ret;
}
