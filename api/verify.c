/*
 * POST /v1/verify, and the verification that decrypt runs on a signed
 * entity when asked. A request that parses is answered 200 with valid true
 * or false; only an entity that is not signed S/MIME at all is an error.
 */
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>

#include "api/internal.h"

/* Appends every PEM object of each string to certs or crls; 400 naming the
 * element that holds none or does not parse. */
static int read_pems(api_input *in, const char *field, STACK_OF(X509) *certs,
                     STACK_OF(X509_CRL) *crls, api_error *err)
{
    api_strings pems = {0};
    size_t i;
    int found, ret = -1;

    /* raw mode has no room for PEM text in a query string */
    if (in->root == NULL) {
        if (api_query_get(in->query, field) != NULL)
            return api_fail(err, 400, "invalid_field",
                            "%s needs a JSON request", field);
        return 0;
    }
    if (api_input_strings(in, field, &pems, err) != 0)
        return -1;
    for (i = 0; i < pems.count; i++) {
        BIO *bio = BIO_new_mem_buf(pems.items[i], -1);
        X509 *cert;
        X509_CRL *crl;

        found = 0;
        while (bio != NULL) {
            if (certs != NULL &&
                (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
                if (!sk_X509_push(certs, cert))
                    X509_free(cert);
            } else if (crls != NULL && (crl = PEM_read_bio_X509_CRL(
                                            bio, NULL, NULL, NULL)) != NULL) {
                if (!sk_X509_CRL_push(crls, crl))
                    X509_CRL_free(crl);
            } else {
                break;
            }
            found++;
        }
        BIO_free(bio);
        ERR_clear_error();
        if (found == 0) {
            api_fail(err, 400, "invalid_field", "%s[%zu] holds no PEM %s",
                     field, i, certs != NULL ? "certificate" : "CRL");
            goto out;
        }
    }
    ret = 0;
out:
    api_strings_clear(&pems);
    return ret;
}

static json_t *signer_json(const cms_signer *s)
{
    json_t *obj = s->cert != NULL ? api_cert_json(s->cert, 0) : json_object();

    if (obj == NULL)
        return NULL;
    if ((s->signing_time[0] != '\0' &&
         json_object_set_new(obj, "signing_time",
                             json_string(s->signing_time)) != 0) ||
        json_object_set_new(obj, "digest", json_string(s->digest)) != 0) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}

static json_t *verification_json(const cms_verification *v)
{
    json_t *signers = json_array(), *obj;
    const unsigned char *content;
    size_t i, len;
    int failed = signers == NULL;

    for (i = 0; !failed && i < cms_verification_count_signers(v); i++)
        failed = json_array_append_new(
            signers, signer_json(cms_verification_signer_at(v, i)));
    obj = failed ? NULL
                 : json_pack("{s:b,s:o}", "valid", cms_verification_valid(v),
                             "signers", signers);
    if (failed)
        json_decref(signers);
    if (obj == NULL)
        return NULL;
    content = cms_verification_content(v, &len);
    failed =
        (!cms_verification_valid(v) &&
         (json_object_set_new(obj, "reason",
                              json_string(cms_verification_reason(v))) != 0 ||
          json_object_set_new(
              obj, "detail",
              api_json_text(cms_verification_detail(v),
                            strlen(cms_verification_detail(v)))) != 0)) ||
        (content != NULL && api_set_mime_field(obj, content, len) != 0);
    if (failed) {
        json_decref(obj);
        return NULL;
    }
    return obj;
}

void api_trust_clear(api_trust *t)
{
    sk_X509_pop_free(t->anchors, X509_free);
    sk_X509_CRL_pop_free(t->crls, X509_CRL_free);
    t->anchors = NULL;
    t->crls = NULL;
}

int api_trust_read(api_input *in, api_trust *t, api_error *err)
{
    t->anchors = sk_X509_new_null();
    t->crls = sk_X509_CRL_new_null();
    if (t->anchors == NULL || t->crls == NULL)
        goto oom;
    if (read_pems(in, "trust", t->anchors, NULL, err) != 0 ||
        read_pems(in, "crls", NULL, t->crls, err) != 0)
        goto fail;
    return 0;
oom:
    api_fail(err, 500, "internal_error", "out of memory");
fail:
    api_trust_clear(t);
    return -1;
}

/* The request's anchors and CRLs plus the configured ones, put together
 * only when a signature is verified (decrypt reads trust on every call). */
static int trust_with_config(api *a, const api_trust *req, api_trust *all)
{
    STACK_OF(X509) *certs[2] = {req->anchors, a->trust};
    STACK_OF(X509_CRL) *crls[2] = {req->crls, a->crls};
    int i, k;

    all->anchors = sk_X509_new_null();
    all->crls = sk_X509_CRL_new_null();
    if (all->anchors == NULL || all->crls == NULL)
        goto fail;
    for (k = 0; k < 2; k++) {
        for (i = 0; i < sk_X509_num(certs[k]); i++)
            if (!X509_up_ref(sk_X509_value(certs[k], i)) ||
                !sk_X509_push(all->anchors, sk_X509_value(certs[k], i)))
                goto fail;
        for (i = 0; i < sk_X509_CRL_num(crls[k]); i++)
            if (!X509_CRL_up_ref(sk_X509_CRL_value(crls[k], i)) ||
                !sk_X509_CRL_push(all->crls, sk_X509_CRL_value(crls[k], i)))
                goto fail;
    }
    return 0;
fail:
    api_trust_clear(all);
    return -1;
}

int api_verify_entity(api *a, const api_trust *t, const unsigned char *mime,
                      size_t len, json_t **out, api_error *err)
{
    api_trust all = {0};
    cms_verification *v = NULL;
    cms_error cerr = {0};
    int ret = -1;

    if (trust_with_config(a, t, &all) != 0) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    if (cms_verify_entity(mime, len, all.anchors, a->trust_dir,
                          sk_X509_CRL_num(all.crls) > 0 ? all.crls : NULL, &v,
                          &cerr) != 0) {
        if (cerr.status == CMS_ERR_INPUT)
            api_fail(err, 422, "invalid_smime", "%s", cerr.message);
        else
            api_fail_cms(err, &cerr);
        goto out;
    }
    *out = verification_json(v);
    if (*out == NULL) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    cms_verification_free(v);
    api_trust_clear(&all);
    return ret;
}

int api_handle_verify(api *a, const api_request *req, api_response *res,
                      api_error *err)
{
    static const char *const fields[] = {"trust", "crls", NULL};
    api_input in;
    api_trust trust = {0};
    json_t *body = NULL;
    int ret = -1;

    if (api_input_open(&in, req, fields, err) != 0 ||
        api_trust_read(&in, &trust, err) != 0 ||
        api_verify_entity(a, &trust, in.mime, in.mime_len, &body, err) != 0)
        goto out;
    if (api_respond_json(res, 200, body) != 0) {
        api_fail(err, 500, "internal_error", "out of memory");
        goto out;
    }
    ret = 0;
out:
    api_trust_clear(&trust);
    api_input_close(&in);
    return ret;
}
