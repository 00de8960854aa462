/*
 * Verification of multipart/signed and application/pkcs7-mime signed-data
 * entities.
 *
 * CMS_verify answers yes or no and hides why. The steps it takes are done
 * here one at a time, in its order and with its functions, so each failure
 * gets its own reason: SignerInfos present, a certificate for each, the
 * signature over the signed attributes (CMS_SignerInfo_verify: a failure is
 * "bad_signature"), the content against the messageDigest attribute
 * (CMS_SignerInfo_verify_content: a mismatch is "content_modified"; without
 * signed attributes that call checks the signature itself, so a failure
 * there is "bad_signature"), then the signer's certificate path
 * (X509_verify_cert, purpose smime_sign), whose X509_V_ERR code maps to a
 * reason. The entity is valid when it has signers and every one passes;
 * the reason is the first failing signer's.
 *
 * A trust anchor need not be self-signed (X509_V_FLAG_PARTIAL_CHAIN): the
 * caller's anchors are what it trusts, an intermediate or a pinned signer
 * certificate included. Paths are checked at the current time, as mail
 * clients do, not at the claimed signing time.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cms/internal.h"

struct cms_verification {
    int valid;
    const char *reason;
    char detail[256];
    cms_signer *signers;
    size_t n_signers;
    cms_buf content;
};

/* ---- taking the entity apart ---------------------------------------- */

void cms_signed_release(cms_signed *sd)
{
    CMS_ContentInfo_free(sd->cms);
    cms_buf_release(&sd->content);
    memset(sd, 0, sizeof(*sd));
}

/* Reads the CMS structure from the body of an entity whose header block is
 * hb, once the allow-lists have passed it and found it SignedData. */
static CMS_ContentInfo *read_signed_data(const unsigned char *s, size_t len,
                                         const cms_header_block *hb,
                                         cms_error *err)
{
    CMS_ContentInfo *cms = NULL;
    cms_buf der = {0};

    if (cms_body_decode(s + hb->body, len - hb->body, hb->transfer_encoding,
                        &der, err))
        goto out;
    /* the allow-lists and the type, before OpenSSL reads any of it */
    if (cms_algs_check_signed(der.data, der.len, err))
        goto out;
    cms = cms_der_read(der.data, der.len, err);
out:
    cms_buf_release(&der);
    return cms;
}

/*
 * Finds the two parts of the canonical multipart body s[0..len): part i is
 * s[start[i]..end[i]), the exact octets between its delimiter line and the
 * CRLF before the next delimiter, which belongs to that delimiter.
 */
static int split_parts(const unsigned char *s, size_t len, const char *boundary,
                       size_t start[2], size_t end[2], cms_error *err)
{
    size_t blen = strlen(boundary), pos = 0, next, n;
    int parts = 0, close = 0;

    while (pos < len) {
        const unsigned char *lf = memchr(s + pos, '\n', len - pos);

        next = lf != NULL ? (size_t)(lf - s) + 1 : len;
        n = next - pos;
        if (n >= 2 && s[next - 1] == '\n' && s[next - 2] == '\r')
            n -= 2;
        if (cms_is_delimiter(s, pos, n, boundary, blen, &close)) {
            if (parts > 0)
                end[parts - 1] = pos > start[parts - 1] ? pos - 2 : pos;
            if (close)
                break;
            if (parts == 2) {
                cms_set_error(err, CMS_ERR_INPUT,
                              "the multipart/signed entity has more than "
                              "two parts");
                return -1;
            }
            start[parts++] = next;
        }
        pos = next;
    }
    if (!close) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the multipart/signed entity has no closing "
                      "delimiter (truncated?)");
        return -1;
    }
    if (parts != 2) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the multipart/signed entity has %d parts, not two",
                      parts);
        return -1;
    }
    return 0;
}

static int read_detached(const unsigned char *mime, size_t len,
                         const cms_header_block *hb, GMimeContentType *ct,
                         cms_signed *sd, cms_error *err)
{
    const char *boundary = g_mime_content_type_get_parameter(ct, "boundary");
    cms_header_block sig_hb = {0};
    GMimeContentType *sig_ct = NULL;
    cms_buf body = {0};
    size_t start[2], end[2];
    const unsigned char *sig;
    int r = -1;

    if (boundary == NULL || *boundary == '\0') {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the multipart/signed entity has no boundary");
        goto out;
    }
    /* What was signed is the first part in canonical form: the line breaks
     * of the whole body become CRLF, as they were when it was signed. */
    if (cms_buf_add_canonical(&body, mime + hb->body, len - hb->body)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (split_parts(body.data, body.len, boundary, start, end, err))
        goto out;
    if (end[0] - start[0] > INT_MAX) {
        cms_set_error(err, CMS_ERR_INPUT, "the signed part is too large");
        goto out;
    }
    sig = body.data + start[1];
    if (cms_header_block_read(sig, end[1] - start[1], &sig_hb, err))
        goto out;
    sig_ct = g_mime_content_type_parse(
        NULL, sig_hb.content_type ? sig_hb.content_type : "");
    if (!g_mime_content_type_is_type(sig_ct, "application",
                                     "pkcs7-signature") &&
        !g_mime_content_type_is_type(sig_ct, "application",
                                     "x-pkcs7-signature")) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the second part of the multipart/signed entity is "
                      "not application/pkcs7-signature");
        goto out;
    }
    sd->cms = read_signed_data(sig, end[1] - start[1], &sig_hb, err);
    if (sd->cms == NULL)
        goto out;
    if (CMS_is_detached(sd->cms) != 1) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the signature part carries content of its own");
        goto out;
    }
    if (cms_buf_add(&sd->content, body.data + start[0], end[0] - start[0])) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    sd->detached = 1;
    r = 0;
out:
    if (sig_ct != NULL)
        g_object_unref(sig_ct);
    cms_header_block_release(&sig_hb);
    cms_buf_release(&body);
    return r;
}

static int read_opaque(const unsigned char *mime, size_t len,
                       const cms_header_block *hb, GMimeContentType *ct,
                       cms_signed *sd, cms_error *err)
{
    const char *smime_type =
        g_mime_content_type_get_parameter(ct, "smime-type");
    char shown[61];

    if (smime_type != NULL &&
        g_ascii_strcasecmp(smime_type, "signed-data") != 0) {
        cms_text_escape(shown, sizeof(shown), smime_type, strlen(smime_type));
        cms_set_error(err, CMS_ERR_INPUT,
                      "smime-type %s is not a signed entity", shown);
        return -1;
    }
    sd->cms = read_signed_data(mime, len, hb, err);
    if (sd->cms == NULL)
        return -1;
    if (CMS_is_detached(sd->cms) != 0) {
        cms_set_error(err, CMS_ERR_INPUT, "the signed data has no content");
        return -1;
    }
    return 0;
}

int cms_signed_read(const unsigned char *mime, size_t len, cms_signed *sd,
                    cms_error *err)
{
    cms_header_block hb = {0};
    GMimeContentType *ct = NULL;
    cms_signed s = {0};
    char shown[128];
    int r = -1;

    if (cms_smime_header_read(mime, len, &hb, &ct, err) != 0)
        goto out;
    if (g_mime_content_type_is_type(ct, "multipart", "signed")) {
        if (read_detached(mime, len, &hb, ct, &s, err))
            goto out;
    } else if (cms_is_pkcs7_mime(ct)) {
        if (read_opaque(mime, len, &hb, ct, &s, err))
            goto out;
    } else {
        cms_content_type_text(ct, shown, sizeof(shown));
        cms_set_error(err, CMS_ERR_INPUT,
                      "Content-Type %s is not a signed S/MIME entity", shown);
        goto out;
    }
    *sd = s;
    memset(&s, 0, sizeof(s));
    r = 0;
out:
    if (r != 0)
        ERR_clear_error();
    cms_signed_release(&s);
    if (ct != NULL)
        g_object_unref(ct);
    cms_header_block_release(&hb);
    return r;
}

/* ---- checking it ------------------------------------------------------ */

static X509_STORE *make_store(STACK_OF(X509) *anchors, const char *anchor_dir,
                              cms_error *err)
{
    X509_STORE *store = X509_STORE_new();
    X509_LOOKUP *lookup;
    int i;

    if (store == NULL)
        goto fail;
    for (i = 0; i < sk_X509_num(anchors); i++) {
        if (!X509_STORE_add_cert(store, sk_X509_value(anchors, i)))
            goto fail;
    }
    if (anchor_dir != NULL) {
        lookup = X509_STORE_add_lookup(store, X509_LOOKUP_hash_dir());
        if (lookup == NULL ||
            !X509_LOOKUP_add_dir(lookup, anchor_dir, X509_FILETYPE_PEM))
            goto fail;
    }
    return store;
fail:
    cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot set up the trust anchors");
    X509_STORE_free(store);
    return NULL;
}

static const char *path_reason(int code)
{
    switch (code) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "certificate_expired";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "certificate_not_yet_valid";
    case X509_V_ERR_CERT_REVOKED:
        return "certificate_revoked";
    /* No CRL that can be relied on for a certificate of the path. */
    case X509_V_ERR_UNABLE_TO_GET_CRL:
    case X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER:
    case X509_V_ERR_CRL_HAS_EXPIRED:
    case X509_V_ERR_CRL_NOT_YET_VALID:
    case X509_V_ERR_CRL_SIGNATURE_FAILURE:
    case X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE:
    case X509_V_ERR_ERROR_IN_CRL_LAST_UPDATE_FIELD:
    case X509_V_ERR_ERROR_IN_CRL_NEXT_UPDATE_FIELD:
    case X509_V_ERR_KEYUSAGE_NO_CRL_SIGN:
    case X509_V_ERR_DIFFERENT_CRL_SCOPE:
    case X509_V_ERR_UNHANDLED_CRITICAL_CRL_EXTENSION:
        return "crl_missing";
    /* The path exists, but a certificate may not sign mail. */
    case X509_V_ERR_INVALID_PURPOSE:
    case X509_V_ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE:
    case X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION:
        return "unfit_certificate";
    default:
        return "untrusted_signer";
    }
}

/* Checks the path of signer i's certificate: 1 when it holds, 0 with the
 * reason and detail of v filled, -1 with err when verification could not
 * run. */
static int check_path(cms_verification *v, size_t i, X509 *cert,
                      X509_STORE *store, STACK_OF(X509) *untrusted,
                      STACK_OF(X509_CRL) *crls, cms_error *err)
{
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    X509 *failed;
    char who[96];
    int code, ok = -1;

    if (ctx == NULL || !X509_STORE_CTX_init(ctx, store, cert, untrusted) ||
        !X509_STORE_CTX_set_default(ctx, "smime_sign")) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                          "cannot set up certificate verification");
        goto out;
    }
    X509_STORE_CTX_set_flags(ctx, X509_V_FLAG_PARTIAL_CHAIN);
    if (crls != NULL) {
        X509_STORE_CTX_set0_crls(ctx, crls);
        X509_STORE_CTX_set_flags(ctx, X509_V_FLAG_CRL_CHECK |
                                          X509_V_FLAG_CRL_CHECK_ALL);
    }
    ok = X509_verify_cert(ctx) == 1;
    if (ok)
        goto out;
    code = X509_STORE_CTX_get_error(ctx);
    failed = X509_STORE_CTX_get_current_cert(ctx);
    cms_cert_label(failed != NULL ? failed : cert, who, sizeof(who));
    v->reason = path_reason(code);
    cms_format_text(v->detail, sizeof(v->detail),
                    "signer %zu: certificate of %s (depth %d): %s", i + 1, who,
                    X509_STORE_CTX_get_error_depth(ctx),
                    X509_verify_cert_error_string(code));
out:
    X509_STORE_CTX_free(ctx);
    return ok;
}

/* Sets the reason and detail of v from OpenSSL's queued errors. */
static void fail_ssl(cms_verification *v, size_t i, const char *reason,
                     const char *what)
{
    cms_error e = {0}; /* for its message only */
    char msg[200];

    snprintf(msg, sizeof(msg), "signer %zu: %s", i + 1, what);
    cms_set_ssl_error(&e, CMS_ERR_INTERNAL, msg);
    v->reason = reason;
    cms_format_text(v->detail, sizeof(v->detail), "%s", e.message);
    ERR_clear_error();
}

/* Checks signer i: its signature, the content, its certificate path. As
 * check_path returns. */
static int check_signer(cms_verification *v, size_t i, CMS_SignerInfo *si,
                        BIO *digests, X509_STORE *store,
                        STACK_OF(X509) *untrusted, STACK_OF(X509_CRL) *crls,
                        cms_error *err)
{
    X509 *cert = NULL;
    int has_attrs = CMS_signed_get_attr_count(si) >= 0, rc;

    CMS_SignerInfo_get0_algs(si, NULL, &cert, NULL, NULL);
    if (cert == NULL) {
        v->reason = "signer_certificate_missing";
        cms_format_text(v->detail, sizeof(v->detail),
                        "signer %zu: its certificate is not in the message",
                        i + 1);
        return 0;
    }
    if (has_attrs && CMS_SignerInfo_verify(si) != 1) {
        fail_ssl(v, i, "bad_signature",
                 "the signature over the signed attributes does not verify");
        return 0;
    }
    rc = CMS_SignerInfo_verify_content(si, digests);
    if (rc != 1) {
        /* 0 is a messageDigest mismatch with attributes, a signature that
         * fails without; below 0, a malformed or unsupported SignerInfo. */
        if (has_attrs && rc == 0)
            fail_ssl(v, i, "content_modified",
                     "the content does not match the signed messageDigest");
        else
            fail_ssl(v, i, "bad_signature",
                     "the signature over the content does not verify");
        return 0;
    }
    return check_path(v, i, cert, store, untrusted, crls, err);
}

static void signer_info(CMS_SignerInfo *si, cms_signer *s)
{
    X509_ALGOR *dig = NULL;
    X509_ATTRIBUTE *attr;
    ASN1_TYPE *t;
    const char *name;
    size_t k;
    int idx, nid;

    CMS_SignerInfo_get0_algs(si, NULL, &s->cert, &dig, NULL);
    if (s->cert != NULL && !X509_up_ref(s->cert))
        s->cert = NULL;
    nid = dig != NULL ? OBJ_obj2nid(dig->algorithm) : NID_undef;
    name = nid != NID_undef ? OBJ_nid2sn(nid) : NULL;
    if (name == NULL || strlen(name) >= sizeof(s->digest))
        name = "unknown";
    for (k = 0; name[k] != '\0'; k++)
        s->digest[k] = (char)g_ascii_tolower(name[k]);
    s->digest[k] = '\0';

    idx = CMS_signed_get_attr_by_NID(si, NID_pkcs9_signingTime, -1);
    attr = idx >= 0 ? CMS_signed_get_attr(si, idx) : NULL;
    t = attr != NULL && X509_ATTRIBUTE_count(attr) == 1
            ? X509_ATTRIBUTE_get0_type(attr, 0)
            : NULL;
    if (t == NULL ||
        (t->type != V_ASN1_UTCTIME && t->type != V_ASN1_GENERALIZEDTIME) ||
        cms_time_format((const ASN1_TIME *)t->value.asn1_string,
                        s->signing_time, sizeof(s->signing_time)))
        s->signing_time[0] = '\0';
}

/* Whether chain has a digest BIO for md already. */
static int has_digest(BIO *chain, const EVP_MD *md)
{
    const EVP_MD *m;

    for (; chain != NULL; chain = BIO_next(chain)) {
        if (BIO_method_type(chain) == BIO_TYPE_MD &&
            BIO_get_md(chain, &m) > 0 && m != NULL &&
            EVP_MD_get_type(m) == EVP_MD_get_type(md))
            return 1;
    }
    return 0;
}

/*
 * Reads content through one digest BIO per digest algorithm the signers
 * name; CMS_SignerInfo_verify_content finds its own in the chain. Not
 * CMS_dataInit: it makes one BIO per entry of the SignedData's
 * digestAlgorithms set, which the sender writes, so a few kilobytes of
 * repeated entries would mean thousands of passes over the content. A
 * signer whose algorithm is unknown gets no BIO and fails alone. NULL when
 * out of memory.
 */
static BIO *digest_content(STACK_OF(CMS_SignerInfo) *sinfos,
                           const cms_buf *content)
{
    unsigned char buf[4096];
    X509_ALGOR *dig;
    const EVP_MD *md;
    BIO *chain = NULL, *b;
    int i, n;

    for (i = 0; i < sk_CMS_SignerInfo_num(sinfos); i++) {
        dig = NULL;
        CMS_SignerInfo_get0_algs(sk_CMS_SignerInfo_value(sinfos, i), NULL, NULL,
                                 &dig, NULL);
        md = dig != NULL ? EVP_get_digestbyobj(dig->algorithm) : NULL;
        if (md == NULL || has_digest(chain, md))
            continue;
        b = BIO_new(BIO_f_md());
        if (b == NULL || BIO_set_md(b, md) <= 0) {
            BIO_free(b);
            goto fail;
        }
        chain = chain != NULL ? BIO_push(chain, b) : b;
    }
    b = BIO_new_mem_buf(content->len > 0 ? content->data
                                         : (const unsigned char *)"",
                        (int)content->len);
    if (b == NULL)
        goto fail;
    chain = chain != NULL ? BIO_push(chain, b) : b;
    while ((n = BIO_read(chain, buf, sizeof(buf))) > 0)
        ;
    if (n < 0)
        goto fail;
    return chain;
fail:
    BIO_free_all(chain);
    return NULL;
}

/* The checks on an entity that parsed: fills v. */
static int check(cms_verification *v, cms_signed *sd, STACK_OF(X509) *anchors,
                 X509_STORE *store, STACK_OF(X509_CRL) *crls, cms_error *err)
{
    STACK_OF(CMS_SignerInfo) *sinfos = CMS_get0_SignerInfos(sd->cms);
    STACK_OF(X509) *untrusted = NULL;
    ASN1_OCTET_STRING **econtent;
    BIO *chain = NULL;
    size_t i, n;
    int ok = 1, r = -1;

    if (sd->detached) {
        v->content = sd->content;
        memset(&sd->content, 0, sizeof(sd->content));
    } else {
        econtent = CMS_get0_content(sd->cms);
        if (econtent == NULL || *econtent == NULL) {
            cms_set_error(err, CMS_ERR_INPUT, "the signed data has no content");
            goto out;
        }
        if (cms_buf_add(&v->content, (*econtent)->data,
                        (size_t)(*econtent)->length)) {
            cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
            goto out;
        }
    }
    /* cms_algs_check_signed held signers and certificates to
     * CMS_MAX_SIGNERS and CMS_MAX_CERTS before OpenSSL parsed them. */
    n = sinfos != NULL ? (size_t)sk_CMS_SignerInfo_num(sinfos) : 0;
    untrusted = CMS_get1_certs(sd->cms);
    if (n == 0) {
        v->reason = "no_signers";
        cms_format_text(v->detail, sizeof(v->detail),
                        "the signed data has no SignerInfo");
        r = 0;
        goto out;
    }
    v->signers = calloc(n, sizeof(*v->signers));
    if (v->signers == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    /* Attaches each signer's certificate, from the anchors (a pinned
     * signer may have sent none) or the message; a signer left without one
     * fails below. */
    (void)CMS_set1_signers_certs(sd->cms, anchors, 0);
    for (i = 0; i < n; i++)
        signer_info(sk_CMS_SignerInfo_value(sinfos, (int)i), &v->signers[i]);
    v->n_signers = n;

    /* The detached content was checked against INT_MAX when read; an
     * encapsulated one has an int length. */
    chain = digest_content(sinfos, &v->content);
    if (chain == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INTERNAL, "cannot digest the content");
        goto out;
    }
    ERR_clear_error();
    for (i = 0; ok == 1 && i < n; i++)
        ok = check_signer(v, i, sk_CMS_SignerInfo_value(sinfos, (int)i), chain,
                          store, untrusted, crls, err);
    if (ok < 0)
        goto out;
    if (ok) {
        v->valid = 1;
        v->reason = NULL;
        cms_format_text(v->detail, sizeof(v->detail),
                        "every signature verifies and chains to a trust "
                        "anchor");
    }
    r = 0;
out:
    BIO_free_all(chain);
    sk_X509_pop_free(untrusted, X509_free);
    return r;
}

int cms_verify_entity(const unsigned char *mime, size_t len,
                      STACK_OF(X509) *anchors, const char *anchor_dir,
                      STACK_OF(X509_CRL) *crls, cms_verification **out,
                      cms_error *err)
{
    cms_signed sd = {0};
    cms_verification *v = NULL;
    X509_STORE *store = NULL;
    cms_buf outer = {0};
    int r = -1;

    cms_init();
    if (out == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "no result");
        goto out;
    }
    if (cms_signed_read(mime, len, &sd, err))
        goto out;
    v = calloc(1, sizeof(*v));
    if (v == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    store = make_store(anchors, anchor_dir, err);
    if (store == NULL || check(v, &sd, anchors, store, crls, err))
        goto out;
    /* The content was digested as signed; the caller gets the message. */
    if (cms_outer_read(mime, len, &outer, err) ||
        cms_outer_restore(&outer, &v->content, err))
        goto out;
    *out = v;
    v = NULL;
    r = 0;
out:
    /* A failed check leaves OpenSSL's reasons queued; they are in the
     * detail already. */
    ERR_clear_error();
    cms_buf_release(&outer);
    X509_STORE_free(store);
    cms_verification_free(v);
    cms_signed_release(&sd);
    return r;
}

void cms_verification_free(cms_verification *v)
{
    size_t i;

    if (v == NULL)
        return;
    for (i = 0; i < v->n_signers; i++)
        X509_free(v->signers[i].cert);
    free(v->signers);
    cms_buf_release(&v->content);
    free(v);
}

int cms_verification_valid(const cms_verification *v)
{
    return v != NULL && v->valid;
}

const char *cms_verification_reason(const cms_verification *v)
{
    return v != NULL ? v->reason : NULL;
}

const char *cms_verification_detail(const cms_verification *v)
{
    return v != NULL ? v->detail : NULL;
}

size_t cms_verification_count_signers(const cms_verification *v)
{
    return v != NULL ? v->n_signers : 0;
}

const cms_signer *cms_verification_signer_at(const cms_verification *v,
                                             size_t i)
{
    return v != NULL && i < v->n_signers ? &v->signers[i] : NULL;
}

const unsigned char *cms_verification_content(const cms_verification *v,
                                              size_t *len)
{
    if (len != NULL)
        *len = v != NULL ? v->content.len : 0;
    return v != NULL ? v->content.data : NULL;
}
