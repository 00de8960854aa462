/*
 * The rkey provider with a real backend: keys in memory (RSA-2048 and
 * P-256 of the default provider) behind rkey_backend, doing the real
 * private operations the key process would ask a token for, and the
 * provider's EVP_PKEY put through cms/ exactly as the daemon uses it
 * (cms_sign_entity, cms_envelope_decrypt) and through OpenSSL's CMS where
 * cms/ has no call for it (PSS, receipts). Results are checked by
 * cms_verify_entity and by the openssl command line; envelopes come from
 * the openssl command line and from cms_encrypt_entity.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "cms/cms.h"
#include "rkey/rkey.h"
#include "tap.h"
#include "testkeys.h"

/* ---- the file-key backend ---------------------------------------------- */

typedef struct file_key {
    EVP_PKEY *pkey;
    rkey_status fail; /* not RKEY_OK: every call fails so */
    int short_answer; /* answers one octet short */
    atomic_int calls;
    atomic_int released;
} file_key;

static int fk_fails(file_key *fk, rkey_error *err)
{
    atomic_fetch_add(&fk->calls, 1);
    if (fk->fail == RKEY_OK)
        return 0;
    err->status = fk->fail;
    err->retry_after = 7;
    snprintf(err->message, sizeof(err->message), "token demo: %s",
             rkey_status_name(fk->fail));
    return 1;
}

static void fk_failed(rkey_error *err, const char *what)
{
    if (err->status == RKEY_OK) {
        err->status = RKEY_FAILED;
        snprintf(err->message, sizeof(err->message), "%s", what);
    }
    ERR_clear_error();
}

/* What CKM_RSA_PKCS is given: the DER DigestInfo of a digest_nid digest. */
static int is_digest_info(const unsigned char *der, size_t len, int md_nid)
{
    const unsigned char *p = der;
    X509_SIG *xs = d2i_X509_SIG(NULL, &p, (long)len);
    const X509_ALGOR *alg;
    const ASN1_OCTET_STRING *d;
    const ASN1_OBJECT *oid;
    int ok = 0;

    if (xs != NULL && p == der + len) {
        X509_SIG_get0(xs, &alg, &d);
        X509_ALGOR_get0(&oid, NULL, NULL, alg);
        ok = OBJ_obj2nid(oid) == md_nid &&
             ASN1_STRING_length(d) ==
                 EVP_MD_get_size(EVP_get_digestbynid(md_nid));
    }
    X509_SIG_free(xs);
    return ok;
}

static int fk_sign(void *handle, const rkey_sign_params *p,
                   const unsigned char *tbs, size_t tbs_len, unsigned char *sig,
                   size_t *sig_len, rkey_error *err)
{
    file_key *fk = handle;
    EVP_PKEY_CTX *ctx = NULL;
    unsigned char der[160];
    const unsigned char *q = der;
    size_t der_len = sizeof(der), half;
    ECDSA_SIG *es = NULL;
    const BIGNUM *r, *s;
    int rc = -1;

    if (fk_fails(fk, err))
        return -1;
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, fk->pkey, NULL);
    if (ctx == NULL || EVP_PKEY_sign_init(ctx) <= 0)
        goto out;
    switch (p->mech) {
    case RKEY_SIGN_RSA_PKCS1:
        if (!is_digest_info(tbs, tbs_len, p->md_nid)) {
            err->status = RKEY_BAD_REQUEST;
            snprintf(err->message, sizeof(err->message), "not a DigestInfo");
            goto out;
        }
        if (EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) <= 0 ||
            EVP_PKEY_sign(ctx, sig, sig_len, tbs, tbs_len) <= 0)
            goto out;
        break;
    case RKEY_SIGN_RSA_PSS:
        if (EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
            EVP_PKEY_CTX_set_signature_md(
                ctx, EVP_get_digestbynid(p->md_nid)) <= 0 ||
            EVP_PKEY_CTX_set_rsa_mgf1_md(
                ctx, EVP_get_digestbynid(p->mgf1_nid)) <= 0 ||
            EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, p->salt_len) <= 0 ||
            EVP_PKEY_sign(ctx, sig, sig_len, tbs, tbs_len) <= 0)
            goto out;
        break;
    case RKEY_SIGN_ECDSA:
        /* DER from OpenSSL, r || s as a token gives it */
        half = ((size_t)EVP_PKEY_get_bits(fk->pkey) + 7) / 8;
        if (*sig_len < 2 * half ||
            EVP_PKEY_sign(ctx, der, &der_len, tbs, tbs_len) <= 0 ||
            (es = d2i_ECDSA_SIG(NULL, &q, (long)der_len)) == NULL)
            goto out;
        ECDSA_SIG_get0(es, &r, &s);
        if (BN_bn2binpad(r, sig, (int)half) < 0 ||
            BN_bn2binpad(s, sig + half, (int)half) < 0)
            goto out;
        *sig_len = 2 * half;
        break;
    }
    if (fk->short_answer)
        (*sig_len)--;
    rc = 0;
out:
    if (rc != 0)
        fk_failed(err, "the file key cannot sign");
    ECDSA_SIG_free(es);
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

static int fk_decrypt(void *handle, const rkey_rsa_params *p,
                      const unsigned char *in, size_t in_len,
                      unsigned char *out, size_t *out_len, rkey_error *err)
{
    file_key *fk = handle;
    EVP_PKEY_CTX *ctx = NULL;
    int rc = -1;

    if (fk_fails(fk, err))
        return -1;
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, fk->pkey, NULL);
    if (ctx == NULL || EVP_PKEY_decrypt_init(ctx) <= 0)
        goto out;
    if (p->padding == RKEY_RSA_OAEP) {
        if (EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) <= 0 ||
            EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_get_digestbynid(p->md_nid)) <=
                0 ||
            EVP_PKEY_CTX_set_rsa_mgf1_md(ctx,
                                         EVP_get_digestbynid(p->mgf1_nid)) <= 0)
            goto out;
        if (p->label_len > 0 && EVP_PKEY_CTX_set0_rsa_oaep_label(
                                    ctx, OPENSSL_memdup(p->label, p->label_len),
                                    (int)p->label_len) <= 0)
            goto out;
    } else if (EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) <= 0) {
        goto out;
    }
    if (EVP_PKEY_decrypt(ctx, out, out_len, in, in_len) <= 0)
        goto out;
    rc = 0;
out:
    if (rc != 0)
        fk_failed(err, "decryption failed");
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

static int fk_derive(void *handle, const unsigned char *peer, size_t peer_len,
                     unsigned char *z, size_t *z_len, rkey_error *err)
{
    file_key *fk = handle;
    EVP_PKEY_CTX *pc = NULL, *ctx = NULL;
    EVP_PKEY *pk = NULL;
    OSSL_PARAM params[3];
    char group[64];
    int rc = -1;

    if (fk_fails(fk, err))
        return -1;
    /* the provider promises an uncompressed point */
    if (peer_len < 1 || peer[0] != 0x04 ||
        !EVP_PKEY_get_utf8_string_param(fk->pkey, OSSL_PKEY_PARAM_GROUP_NAME,
                                        group, sizeof(group), NULL))
        goto out;
    params[0] =
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                  (void *)peer, peer_len);
    params[2] = OSSL_PARAM_construct_end();
    pc = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (pc == NULL || EVP_PKEY_fromdata_init(pc) <= 0 ||
        EVP_PKEY_fromdata(pc, &pk, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        goto out;
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, fk->pkey, NULL);
    if (ctx == NULL || EVP_PKEY_derive_init(ctx) <= 0 ||
        EVP_PKEY_derive_set_peer(ctx, pk) <= 0 ||
        EVP_PKEY_derive(ctx, z, z_len) <= 0)
        goto out;
    if (fk->short_answer)
        (*z_len)--;
    rc = 0;
out:
    if (rc != 0)
        fk_failed(err, "the file key cannot derive");
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_CTX_free(pc);
    EVP_PKEY_free(pk);
    return rc;
}

static void fk_release(void *handle)
{
    file_key *fk = handle;

    atomic_fetch_add(&fk->released, 1);
}

static const rkey_backend file_backend = {fk_sign, fk_decrypt, fk_derive,
                                          fk_release};

/* ---- parties ---------------------------------------------------------- */

typedef struct party {
    const char *file; /* FILE.pem, FILE.key in the temporary directory */
    file_key fk;      /* the key itself */
    X509 *cert;
    EVP_PKEY *pk; /* the provider's key */
} party;

static EVP_PKEY *ca_key;
static X509 *ca_cert;
static party rsa = {.file = "rsa"}, ec = {.file = "ec"},
             carol = {.file = "carol"}, alice = {.file = "alice"};

static const struct cert_spec spec_rsa = {
    "critical,digitalSignature,nonRepudiation,keyEncipherment",
    "emailProtection", -86400, 86400L * 365};
static const struct cert_spec spec_ec = {
    "critical,digitalSignature,nonRepudiation,keyAgreement", "emailProtection",
    -86400, 86400L * 365};

static void party_make(party *p, const char *type, const char *email)
{
    rkey_error err;
    int is_rsa = strcmp(type, "RSA") == 0;

    p->fk.pkey = is_rsa ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048)
                        : EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (p->fk.pkey == NULL)
        die("keygen");
    p->cert = make_cert_spec(p->fk.pkey, p->file, email, ca_cert, ca_key, 0,
                             is_rsa ? &spec_rsa : &spec_ec);
    p->pk = rkey_pkey_new(&file_backend, &p->fk, p->cert, &err);
    if (p->pk == NULL) {
        fprintf(stderr, "rkey_pkey_new: %s\n", err.message);
        die("rkey_pkey_new");
    }
}

static void party_free(party *p)
{
    EVP_PKEY_free(p->pk);
    X509_free(p->cert);
    EVP_PKEY_free(p->fk.pkey);
}

/* ---- the openssl command line ---------------------------------------- */

typedef struct {
    unsigned char *data;
    size_t len;
} bytes;

static char tmp[64];

static void write_file(const char *name, const void *data, size_t len)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0)
        die("write_file");
}

static bytes read_file(const char *name)
{
    char path[256];
    FILE *f;
    bytes b = {NULL, 0};
    long n;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "rb");
    if (f == NULL)
        die("read_file");
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b.data = xmalloc((size_t)n + 1);
    b.len = fread(b.data, 1, (size_t)n, f);
    b.data[b.len] = '\0';
    fclose(f);
    return b;
}

static void write_cert(const char *name, X509 *cert)
{
    char path[256];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmp, name);
    f = fopen(path, "w");
    if (f == NULL || !PEM_write_X509(f, cert))
        die("write_cert");
    fclose(f);
}

/* Runs a command in the temporary directory; 1 when it exits 0. */
__attribute__((format(printf, 1, 2))) static int sh(const char *fmt, ...)
{
    char cmd[2048];
    size_t n;
    va_list ap;

    n = (size_t)snprintf(cmd, sizeof(cmd), "cd %s && ", tmp);
    va_start(ap, fmt);
    vsnprintf(cmd + n, sizeof(cmd) - n, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>/dev/null", sizeof(cmd) - strlen(cmd) - 1);
    return system(cmd) == 0;
}

/* ---- checks ------------------------------------------------------------ */

/* 1 when cms_verify_entity finds mime validly signed by cert with digest. */
static int verifies(const unsigned char *mime, size_t len, X509 *cert,
                    const char *digest)
{
    STACK_OF(X509) *anchors = sk_X509_new_null();
    cms_verification *v = NULL;
    const cms_signer *s;
    cms_error err;
    int ok;

    sk_X509_push(anchors, ca_cert);
    ok = cms_verify_entity(mime, len, anchors, NULL, NULL, &v, &err) == 0 &&
         cms_verification_valid(v) && cms_verification_count_signers(v) == 1 &&
         (s = cms_verification_signer_at(v, 0)) != NULL && s->cert != NULL &&
         X509_cmp(s->cert, cert) == 0 && strcmp(s->digest, digest) == 0;
    if (!ok && v != NULL)
        printf("# cms_verify_entity: %s (%s)\n",
               cms_verification_reason(v) ? cms_verification_reason(v) : "",
               cms_verification_detail(v) ? cms_verification_detail(v) : "");
    cms_verification_free(v);
    sk_X509_free(anchors);
    return ok;
}

static int cli_verifies(const unsigned char *mime, size_t len, const char *ca)
{
    write_file("signed.eml", mime, len);
    return sh("openssl cms -verify -in signed.eml -CAfile %s -out content", ca);
}

/* The decrypted entity holds sample's body. */
static int has_body(const unsigned char *data, size_t len)
{
    static const char body[] = "Hello Bob,\r\n\r\nthe numbers are in.\r\n";

    return memmem(data, len, body, strlen(body)) != NULL;
}

/* ---- the key ---------------------------------------------------------- */

static void test_init(void)
{
    rkey_error err;

    tap_ok(rkey_provider_init(&err) == 0 && rkey_provider_init(&err) == 0,
           "rkey_provider_init, twice");
}

static void test_key(party *p, const char *type, party *other)
{
    EVP_PKEY *pub = X509_get0_pubkey(p->cert);
    unsigned char *d1 = NULL, *d2 = NULL;
    OSSL_PARAM *params = NULL;
    BIGNUM *bn = NULL;
    BIO *b = BIO_new(BIO_s_mem());
    EVP_PKEY_CTX *check;
    char md[32];
    int l1, l2, ok;

    tap_ok(EVP_PKEY_is_a(p->pk, type) &&
               EVP_PKEY_get_bits(p->pk) == EVP_PKEY_get_bits(pub) &&
               EVP_PKEY_get_security_bits(p->pk) ==
                   EVP_PKEY_get_security_bits(pub) &&
               EVP_PKEY_get_size(p->pk) == EVP_PKEY_get_size(pub),
           "%s: type, bits (%d), security bits and size are the "
           "certificate's",
           type, EVP_PKEY_get_bits(p->pk));
    tap_ok(EVP_PKEY_get_base_id(p->pk) == EVP_PKEY_get_base_id(pub) &&
               EVP_PKEY_get_base_id(p->pk) ==
                   (strcmp(type, "RSA") == 0 ? EVP_PKEY_RSA : EVP_PKEY_EC),
           "%s: EVP_PKEY_get_base_id is the standard one", type);
    check = EVP_PKEY_CTX_new_from_pkey(NULL, p->pk, NULL);
    tap_ok(check != NULL && EVP_PKEY_public_check(check) == 1 &&
               EVP_PKEY_param_check(check) == 1,
           "%s: EVP_PKEY_public_check and EVP_PKEY_param_check", type);
    EVP_PKEY_CTX_free(check);
    tap_ok(EVP_PKEY_get_default_digest_name(p->pk, md, sizeof(md)) > 0 &&
               strcmp(md, "SHA256") == 0,
           "%s: the default digest is SHA256", type);
    tap_ok(X509_check_private_key(p->cert, p->pk) == 1,
           "%s: X509_check_private_key with its certificate", type);
    tap_ok(X509_check_private_key(other->cert, p->pk) != 1,
           "%s: not with another key's certificate", type);
    ERR_clear_error();
    tap_ok(EVP_PKEY_eq(pub, p->pk) == 1 && EVP_PKEY_eq(p->pk, pub) == 1 &&
               EVP_PKEY_eq(p->fk.pkey, p->pk) == 1 &&
               EVP_PKEY_eq(other->fk.pkey, p->pk) != 1,
           "%s: EVP_PKEY_eq both ways, with the public key and the key pair",
           type);
    ERR_clear_error();
    l1 = i2d_PUBKEY(p->pk, &d1);
    l2 = i2d_PUBKEY(pub, &d2);
    tap_ok(l1 > 0 && l1 == l2 && memcmp(d1, d2, (size_t)l1) == 0,
           "%s: the SubjectPublicKeyInfo is the certificate's", type);
    if (strcmp(type, "RSA") == 0) {
        ok =
            !EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_RSA_D, &bn) &&
            !EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_RSA_FACTOR1, &bn) &&
            !EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_RSA_EXPONENT2, &bn) &&
            !EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
                                   &bn) &&
            EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_RSA_N, &bn);
        tap_ok(ok && bn != NULL, "RSA: d, p, dQ, qInv cannot be read, n can");
    } else {
        ok = !EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_PRIV_KEY, &bn) &&
             EVP_PKEY_get_bn_param(p->pk, OSSL_PKEY_PARAM_EC_PUB_X, &bn);
        tap_ok(ok && bn != NULL, "EC: priv cannot be read, the point can");
    }
    BN_free(bn);
    tap_ok(PEM_write_bio_PrivateKey(b, p->pk, NULL, NULL, 0, NULL, NULL) != 1 &&
               BIO_pending(b) == 0,
           "%s: PEM_write_bio_PrivateKey fails and writes nothing", type);
    OPENSSL_free(d1);
    d1 = NULL;
    tap_ok(i2d_PrivateKey(p->pk, &d1) <= 0, "%s: i2d_PrivateKey fails", type);
    tap_ok(EVP_PKEY_todata(p->pk, EVP_PKEY_KEYPAIR, &params) != 1,
           "%s: EVP_PKEY_todata of the key pair fails", type);
    OSSL_PARAM_free(params);
    params = NULL;
    tap_ok(EVP_PKEY_todata(p->pk, EVP_PKEY_PUBLIC_KEY, &params) == 1 &&
               OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_RSA_D) == NULL &&
               OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_PRIV_KEY) == NULL,
           "%s: EVP_PKEY_todata of the public key, without private values",
           type);
    ERR_clear_error();
    OSSL_PARAM_free(params);
    OPENSSL_free(d1);
    OPENSSL_free(d2);
    BIO_free(b);
}

static void test_unsupported(void)
{
    EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    X509 *cert;
    rkey_error err = {0};
    EVP_PKEY *pk;

    if (ed == NULL)
        die("ED25519");
    cert = make_cert_spec(ed, "ed", NULL, ca_cert, ca_key, 0, &spec_ec);
    pk = rkey_pkey_new(&file_backend, NULL, cert, &err);
    tap_ok(pk == NULL && err.status == RKEY_UNSUPPORTED &&
               strstr(err.message, "ED25519") != NULL,
           "an Ed25519 certificate is refused: %s", err.message);
    EVP_PKEY_free(pk);
    X509_free(cert);
    EVP_PKEY_free(ed);
}

static void test_release(void)
{
    file_key fk = {.pkey = rsa.fk.pkey};
    rkey_error err;
    EVP_PKEY *pk = rkey_pkey_new(&file_backend, &fk, rsa.cert, &err), *dup;
    EVP_PKEY_CTX *ctx;
    unsigned char d[32] = {0}, sig[256];
    size_t len = sizeof(sig);
    int signed_ok;

    dup = EVP_PKEY_dup(pk);
    EVP_PKEY_free(pk);
    ctx = EVP_PKEY_CTX_new_from_pkey(NULL, dup, NULL);
    EVP_PKEY_free(dup);
    signed_ok = ctx != NULL && EVP_PKEY_sign_init(ctx) > 0 &&
                EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) > 0 &&
                EVP_PKEY_sign(ctx, sig, &len, d, sizeof(d)) > 0;
    tap_ok(signed_ok && fk.calls == 1 && fk.released == 0,
           "a copy (EVP_PKEY_dup) keeps the handle after the original is "
           "freed, and a context after the copy is");
    EVP_PKEY_CTX_free(ctx);
    tap_ok(fk.released == 1, "the handle is released once, with the last "
                             "reference");
}

/* ---- signing ----------------------------------------------------------- */

static void test_sign_cms(party *p)
{
    static const cms_digest digests[] = {CMS_DIGEST_SHA256, CMS_DIGEST_SHA384,
                                         CMS_DIGEST_SHA512};
    static const cms_mode modes[] = {CMS_MODE_DETACHED, CMS_MODE_OPAQUE};
    size_t i, j, len;

    for (i = 0; i < 3; i++) {
        for (j = 0; j < 2; j++) {
            cms_result *res = NULL;
            const unsigned char *data;
            cms_error err;
            int before = p->fk.calls, ok;

            ok = cms_sign_entity((const unsigned char *)sample, strlen(sample),
                                 p->pk, p->cert, NULL, modes[j], digests[i],
                                 &res, &err) == 0;
            tap_ok(ok && p->fk.calls == before + 1,
                   "%s %s %s: cms_sign_entity, one backend call%s%s", p->file,
                   cms_digest_name(digests[i]), cms_mode_name(modes[j]),
                   ok ? "" : ": ", ok ? "" : err.message);
            if (!ok)
                continue;
            data = cms_result_data(res, &len);
            tap_ok(verifies(data, len, p->cert, cms_digest_name(digests[i])),
                   "%s %s %s: cms_verify_entity", p->file,
                   cms_digest_name(digests[i]), cms_mode_name(modes[j]));
            tap_ok(cli_verifies(data, len, "ca.pem"),
                   "%s %s %s: openssl cms -verify", p->file,
                   cms_digest_name(digests[i]), cms_mode_name(modes[j]));
            if (i == 0 && j == 0)
                tap_ok(!cli_verifies(data, len, "other-ca.pem"),
                       "%s: openssl cms -verify refuses it under another CA",
                       p->file);
            cms_result_free(res);
        }
    }
}

static void test_sign_wrong_cert(void)
{
    cms_result *res = NULL;
    cms_error err;

    int rc = cms_sign_entity((const unsigned char *)sample, strlen(sample),
                             rsa.pk, carol.cert, NULL, CMS_MODE_DETACHED,
                             CMS_DIGEST_SHA256, &res, &err);

    tap_ok(rc != 0 && err.status == CMS_ERR_KEY,
           "cms/ refuses the key with another key's certificate: %s",
           err.message);
    cms_result_free(res);
}

/* EVP_DigestSign*: the digest here, DUPCTX for EVP_DigestSignFinal. */
static void test_digest_sign(party *p)
{
    static const char msg[] = "the numbers are in";
    EVP_MD_CTX *mctx = EVP_MD_CTX_new(), *vctx = EVP_MD_CTX_new();
    unsigned char sig[512];
    size_t len = 0;
    int ok;

    ok = EVP_DigestSignInit(mctx, NULL, EVP_sha384(), NULL, p->pk) == 1 &&
         EVP_DigestSignUpdate(mctx, msg, 4) == 1 &&
         EVP_DigestSignUpdate(mctx, msg + 4, sizeof(msg) - 5) == 1 &&
         EVP_DigestSignFinal(mctx, NULL, &len) == 1 && len <= sizeof(sig) &&
         EVP_DigestSignFinal(mctx, sig, &len) == 1;
    ok = ok &&
         EVP_DigestVerifyInit(vctx, NULL, EVP_sha384(), NULL,
                              X509_get0_pubkey(p->cert)) == 1 &&
         EVP_DigestVerify(vctx, sig, len, (const unsigned char *)msg,
                          sizeof(msg) - 1) == 1;
    tap_ok(ok,
           "%s: EVP_DigestSign in two updates verifies with the "
           "certificate",
           p->file);
    ERR_clear_error();
    EVP_MD_CTX_free(mctx);
    EVP_MD_CTX_free(vctx);
}

/* RSA-PSS with OpenSSL's CMS API (cms/ signs PKCS#1 v1.5 only), written
 * as S/MIME. saltlen 0: the default. */
static bytes pss_sign(party *p, const EVP_MD *md, int saltlen, int detached,
                      int *is_pss)
{
    int flags = CMS_BINARY | (detached ? CMS_DETACHED : 0);
    BIO *in = BIO_new_mem_buf(sample_inner, -1);
    BIO *again = BIO_new_mem_buf(sample_inner, -1);
    BIO *out = BIO_new(BIO_s_mem());
    CMS_ContentInfo *cms =
        CMS_sign(NULL, NULL, NULL, NULL, flags | CMS_PARTIAL);
    CMS_SignerInfo *si;
    EVP_PKEY_CTX *pctx;
    X509_ALGOR *alg = NULL;
    bytes b = {NULL, 0};
    char *mem;
    long n;

    *is_pss = 0;
    si = cms != NULL
             ? CMS_add1_signer(cms, p->cert, p->pk, md, flags | CMS_KEY_PARAM)
             : NULL;
    pctx = si != NULL ? CMS_SignerInfo_get0_pkey_ctx(si) : NULL;
    if (pctx == NULL ||
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
        (saltlen != 0 &&
         EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, saltlen) <= 0) ||
        CMS_final(cms, in, NULL, flags) != 1 ||
        /* without CMS_REUSE_DIGEST a detached one is signed again */
        SMIME_write_CMS(out, cms, again, flags | CMS_REUSE_DIGEST) != 1)
        goto out;
    CMS_SignerInfo_get0_algs(si, NULL, NULL, NULL, &alg);
    *is_pss = alg != NULL && OBJ_obj2nid(alg->algorithm) == NID_rsassaPss;
    n = BIO_get_mem_data(out, &mem);
    b.data = xmalloc((size_t)n);
    memcpy(b.data, mem, (size_t)n);
    b.len = (size_t)n;
out:
    ERR_print_errors_fp(stdout);
    CMS_ContentInfo_free(cms);
    BIO_free(in);
    BIO_free(again);
    BIO_free(out);
    return b;
}

static void test_pss(void)
{
    static const struct {
        const char *md;
        int saltlen;
        int detached;
        const char *label;
    } cases[] = {
        {"sha256", 0, 1, "SHA-256, default salt, detached"},
        {"sha256", RSA_PSS_SALTLEN_DIGEST, 0, "SHA-256, salt = hLen, opaque"},
        {"sha384", 48, 1, "SHA-384, salt 48, detached"},
        {"sha512", RSA_PSS_SALTLEN_DIGEST, 0, "SHA-512, salt = hLen, opaque"},
    };
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int is_pss, before = rsa.fk.calls;
        bytes b = pss_sign(&rsa, EVP_get_digestbyname(cases[i].md),
                           cases[i].saltlen, cases[i].detached, &is_pss);

        tap_ok(b.data != NULL && is_pss && rsa.fk.calls == before + 1,
               "PSS %s: CMS_sign with the provider key, RSASSA-PSS, one "
               "backend call",
               cases[i].label);
        if (b.data == NULL)
            continue;
        tap_ok(verifies(b.data, b.len, rsa.cert, cases[i].md),
               "PSS %s: cms_verify_entity", cases[i].label);
        tap_ok(cli_verifies(b.data, b.len, "ca.pem"),
               "PSS %s: openssl cms -verify", cases[i].label);
        free(b.data);
    }
}

/* ---- receipts ----------------------------------------------------------- */

static CMS_ContentInfo *der_copy(CMS_ContentInfo *cms)
{
    unsigned char *der = NULL;
    const unsigned char *p;
    CMS_ContentInfo *copy = NULL;
    int len = i2d_CMS_ContentInfo(cms, &der);

    p = der;
    if (len > 0)
        copy = d2i_CMS_ContentInfo(NULL, &p, len);
    OPENSSL_free(der);
    return copy;
}

/* alice asks for a receipt; p (the provider key) signs it; alice checks. */
static void test_receipt(party *p)
{
    STACK_OF(GENERAL_NAMES) *to = sk_GENERAL_NAMES_new_null();
    GENERAL_NAMES *names = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *name =
        a2i_GENERAL_NAME(NULL, NULL, NULL, GEN_EMAIL, "alice@example.org", 0);
    CMS_ReceiptRequest *rr;
    CMS_ContentInfo *ocms = NULL, *received = NULL, *rcms = NULL, *rcopy = NULL;
    CMS_SignerInfo *si;
    X509_STORE *store = X509_STORE_new();
    X509_ALGOR *dig = NULL;
    BIO *in = BIO_new_mem_buf(sample_inner, -1);
    int before = p->fk.calls, ok;

    sk_GENERAL_NAME_push(names, name);
    sk_GENERAL_NAMES_push(to, names);
    rr = CMS_ReceiptRequest_create0(NULL, -1, 0, NULL, to);
    X509_STORE_add_cert(store, ca_cert);
    ocms = CMS_sign(NULL, NULL, NULL, NULL, CMS_PARTIAL | CMS_BINARY);
    si = CMS_add1_signer(ocms, alice.cert, alice.fk.pkey, EVP_sha256(),
                         CMS_BINARY);
    if (rr == NULL || si == NULL || CMS_add1_ReceiptRequest(si, rr) != 1 ||
        CMS_final(ocms, in, NULL, CMS_BINARY) != 1)
        die("the signed message asking for a receipt");
    received = der_copy(ocms);
    si = sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(received), 0);
    rcms = CMS_sign_receipt(si, p->cert, p->pk, NULL, 0);
    tap_ok(rcms != NULL && p->fk.calls == before + 1,
           "%s: CMS_sign_receipt with the provider key", p->file);
    if (rcms == NULL) {
        ERR_print_errors_fp(stdout);
        goto out;
    }
    CMS_SignerInfo_get0_algs(
        sk_CMS_SignerInfo_value(CMS_get0_SignerInfos(rcms), 0), NULL, NULL,
        &dig, NULL);
    tap_ok(dig != NULL && OBJ_obj2nid(dig->algorithm) == NID_sha256,
           "%s: the receipt is signed with the key's default digest, SHA-256",
           p->file);
    rcopy = der_copy(rcms);
    ok = rcopy != NULL && CMS_verify_receipt(rcopy, ocms, NULL, store, 0) == 1;
    tap_ok(ok, "%s: CMS_verify_receipt", p->file);
    if (!ok)
        ERR_print_errors_fp(stdout);
out:
    ERR_clear_error();
    CMS_ReceiptRequest_free(rr);
    CMS_ContentInfo_free(ocms);
    CMS_ContentInfo_free(received);
    CMS_ContentInfo_free(rcms);
    CMS_ContentInfo_free(rcopy);
    X509_STORE_free(store);
    BIO_free(in);
}

/* ---- decryption --------------------------------------------------------- */

/* cms_envelope_decrypt of mime with p's provider key; 1 when it gives
 * sample's body. */
static int decrypts(const unsigned char *mime, size_t len, party *p, X509 *cert,
                    cms_error *err)
{
    cms_envelope *env = NULL;
    cms_result *res = NULL;
    const unsigned char *data;
    size_t n;
    int is_signed, ok = 0;

    memset(err, 0, sizeof(*err));
    if (cms_envelope_parse(mime, len, &env, err) == 0 &&
        cms_envelope_decrypt(env, p->pk, cert, &res, &is_signed, err) == 0) {
        data = cms_result_data(res, &n);
        ok = has_body(data, n) && !is_signed;
    }
    cms_result_free(res);
    cms_envelope_free(env);
    return ok;
}

static void test_decrypt_cli(void)
{
    static const struct {
        const char *label;
        party *p;
        const char *opts;
    } cases[] = {
        {"KTRI PKCS#1 v1.5, aes-256-cbc", &rsa, "-aes256"},
        {"KTRI PKCS#1 v1.5, aes-128-gcm", &rsa, "-aes-128-gcm"},
        {"KTRI OAEP SHA-1, aes-128-cbc", &rsa,
         "-aes128 -keyopt rsa_padding_mode:oaep"},
        {"KTRI OAEP SHA-256, aes-256-gcm", &rsa,
         "-aes-256-gcm -keyopt rsa_padding_mode:oaep -keyopt "
         "rsa_oaep_md:sha256 -keyopt rsa_mgf1_md:sha256"},
        {"KARI SHA-1 KDF, aes-128-cbc", &ec, "-aes128"},
        {"KARI SHA-256 KDF, aes-256-gcm", &ec,
         "-aes-256-gcm -keyopt ecdh_kdf_md:sha256"},
        {"KARI SHA-384 KDF, aes-192-cbc", &ec,
         "-aes192 -keyopt ecdh_kdf_md:sha384"},
        {"KARI SHA-512 KDF, aes-128-gcm", &ec,
         "-aes-128-gcm -keyopt ecdh_kdf_md:sha512"},
        {"KARI SHA-224 KDF, aes-256-cbc", &ec,
         "-aes256 -keyopt ecdh_kdf_md:sha224"},
    };
    size_t i;

    write_file("inner.eml", sample_inner, strlen(sample_inner));
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cms_error err;
        bytes b;
        int before = cases[i].p->fk.calls, ok;

        /* -keyopt applies to the -recip before it */
        if (!tap_ok(sh("openssl cms -encrypt -binary -in inner.eml "
                       "-recip %s.pem %s -out enc.eml",
                       cases[i].p->file, cases[i].opts),
                    "openssl cms -encrypt %s", cases[i].label))
            continue;
        b = read_file("enc.eml");
        ok = decrypts(b.data, b.len, cases[i].p, cases[i].p->cert, &err) &&
             cases[i].p->fk.calls == before + 1;
        tap_ok(ok,
               "%s: cms_envelope_decrypt with the provider key, one backend "
               "call%s%s",
               cases[i].label, err.message[0] ? ": " : "", err.message);
        free(b.data);
    }
}

static void test_decrypt_ours(void)
{
    static const cms_cipher ciphers[] = {
        CMS_CIPHER_AES128_CBC, CMS_CIPHER_AES256_CBC, CMS_CIPHER_AES128_GCM,
        CMS_CIPHER_AES256_GCM};
    static const struct {
        party *p;
        cms_rsa_padding pad;
        const char *label;
    } keys[] = {
        {&rsa, CMS_RSA_PKCS1, "KTRI PKCS#1 v1.5"},
        {&rsa, CMS_RSA_OAEP, "KTRI OAEP SHA-256"},
        {&ec, CMS_RSA_PKCS1, "KARI"},
    };
    size_t i, j, len;

    for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        for (j = 0; j < sizeof(ciphers) / sizeof(ciphers[0]); j++) {
            STACK_OF(X509) *rcpts = sk_X509_new_null();
            cms_result *res = NULL;
            const unsigned char *data;
            cms_error err = {0};
            int ok;

            sk_X509_push(rcpts, keys[i].p->cert);
            ok = cms_encrypt_entity((const unsigned char *)sample,
                                    strlen(sample), rcpts, ciphers[j],
                                    keys[i].pad, &res, &err) == 0;
            if (ok) {
                data = cms_result_data(res, &len);
                ok = decrypts(data, len, keys[i].p, keys[i].p->cert, &err);
            }
            tap_ok(ok,
                   "%s %s: cms_encrypt_entity, then cms_envelope_decrypt "
                   "with the provider key%s%s",
                   keys[i].label, cms_cipher_name(ciphers[j]),
                   err.message[0] ? ": " : "", err.message);
            cms_result_free(res);
            sk_X509_free(rcpts);
        }
    }
}

/* RSA-OAEP at the EVP level, with a label (CMS never sets one). */
static int oaep_round_trip(const char *enc_label, const char *dec_label)
{
    static const unsigned char secret[16] = "0123456789abcdef";
    EVP_PKEY_CTX *enc =
        EVP_PKEY_CTX_new_from_pkey(NULL, X509_get0_pubkey(rsa.cert), NULL);
    EVP_PKEY_CTX *dec = EVP_PKEY_CTX_new_from_pkey(NULL, rsa.pk, NULL);
    unsigned char ct[256], pt[256];
    size_t ct_len = sizeof(ct), pt_len = sizeof(pt);
    int ok;

    ok = enc != NULL && dec != NULL && EVP_PKEY_encrypt_init(enc) == 1 &&
         EVP_PKEY_CTX_set_rsa_padding(enc, RSA_PKCS1_OAEP_PADDING) == 1 &&
         EVP_PKEY_CTX_set_rsa_oaep_md(enc, EVP_sha256()) == 1 &&
         EVP_PKEY_CTX_set_rsa_mgf1_md(enc, EVP_sha384()) == 1 &&
         EVP_PKEY_CTX_set0_rsa_oaep_label(enc, OPENSSL_strdup(enc_label),
                                          (int)strlen(enc_label)) == 1 &&
         EVP_PKEY_encrypt(enc, ct, &ct_len, secret, sizeof(secret)) == 1 &&
         EVP_PKEY_decrypt_init(dec) == 1 &&
         EVP_PKEY_CTX_set_rsa_padding(dec, RSA_PKCS1_OAEP_PADDING) == 1 &&
         EVP_PKEY_CTX_set_rsa_oaep_md(dec, EVP_sha256()) == 1 &&
         EVP_PKEY_CTX_set_rsa_mgf1_md(dec, EVP_sha384()) == 1 &&
         EVP_PKEY_CTX_set0_rsa_oaep_label(dec, OPENSSL_strdup(dec_label),
                                          (int)strlen(dec_label)) == 1 &&
         EVP_PKEY_decrypt(dec, pt, &pt_len, ct, ct_len) == 1 &&
         pt_len == sizeof(secret) && memcmp(pt, secret, pt_len) == 0;
    ERR_clear_error();
    EVP_PKEY_CTX_free(enc);
    EVP_PKEY_CTX_free(dec);
    return ok;
}

static void test_oaep_label(void)
{
    tap_ok(oaep_round_trip("smimed", "smimed"),
           "OAEP SHA-256, MGF1 SHA-384, a label: decrypts");
    tap_ok(!oaep_round_trip("smimed", "smime"),
           "OAEP with another label: does not");
}

/* Encrypted to rsa; decrypted with carol's key under rsa's certificate
 * (the key does not fit: OpenSSL's CMS goes on with a random key), and
 * with carol's key under her own certificate (not a recipient). */
static void test_decrypt_wrong_key(void)
{
    STACK_OF(X509) *rcpts = sk_X509_new_null();
    cms_result *res = NULL;
    const unsigned char *data;
    cms_error err1, err2;
    size_t len;
    int ok1, ok2;

    sk_X509_push(rcpts, rsa.cert);
    if (cms_encrypt_entity((const unsigned char *)sample, strlen(sample), rcpts,
                           CMS_CIPHER_AES256_GCM, CMS_RSA_PKCS1, &res,
                           &err1) != 0)
        die("cms_encrypt_entity");
    data = cms_result_data(res, &len);
    rkey_error_clear();
    ok1 = decrypts(data, len, &carol, rsa.cert, &err1);
    tap_ok(!ok1 && err1.status == CMS_ERR_DECRYPT &&
               rkey_last_error()->status == RKEY_FAILED,
           "another key under the recipient's certificate: CMS_ERR_DECRYPT, "
           "the backend said failed");
    ok2 = decrypts(data, len, &carol, carol.cert, &err2);
    tap_ok(!ok2 && err2.status == CMS_ERR_DECRYPT &&
               strcmp(err1.message, err2.message) == 0,
           "not a recipient: the same status and message");
    cms_result_free(res);
    sk_X509_free(rcpts);
}

/* ---- the peer of an ECDH ------------------------------------------------ */

static void test_ecdh_peer(void)
{
    EVP_PKEY *eph = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    EVP_PKEY *peer = EVP_PKEY_new(), *eph_pub = NULL;
    EVP_PKEY_CTX *ctx = NULL, *ref = NULL;
    unsigned char point[65], comp[33], bad[65], z[32], zref[32], *der = NULL;
    const unsigned char *q;
    size_t point_len = 0, comp_len = 0, len = 0, ref_len = sizeof(zref);
    int der_len, before;

    /* Z as the file key makes it, from the other side */
    ref = EVP_PKEY_CTX_new_from_pkey(NULL, eph, NULL);
    if (ref == NULL || EVP_PKEY_derive_init(ref) <= 0 ||
        EVP_PKEY_derive_set_peer(ref, X509_get0_pubkey(ec.cert)) <= 0 ||
        EVP_PKEY_derive(ref, zref, &ref_len) <= 0 ||
        !EVP_PKEY_get_octet_string_param(eph,
                                         OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                         point, sizeof(point), &point_len))
        die("reference ECDH");
    der_len = i2d_PUBKEY(eph, &der);
    q = der;
    eph_pub = d2i_PUBKEY(NULL, &q, der_len);
    memcpy(bad, point, sizeof(bad));
    bad[64] ^= 1;
    comp[0] = (unsigned char)(0x02 | (point[64] & 1));
    memcpy(comp + 1, point + 1, 32);
    comp_len = 33;

    tap_ok(EVP_PKEY_copy_parameters(peer, ec.pk) == 1 &&
               EVP_PKEY_set1_encoded_public_key(peer, bad, sizeof(bad)) != 1,
           "a peer made from the key's group takes no point off the curve");
    ERR_clear_error();
    before = ec.fk.calls;
    tap_ok(EVP_PKEY_set1_encoded_public_key(peer, point, point_len) == 1 &&
               (ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ec.pk, NULL)) != NULL &&
               EVP_PKEY_derive_init(ctx) == 1 &&
               EVP_PKEY_derive_set_peer(ctx, peer) == 1 &&
               EVP_PKEY_derive(ctx, NULL, &len) == 1 && len == 32 &&
               EVP_PKEY_derive(ctx, z, &len) == 1 && len == 32 &&
               memcmp(z, zref, 32) == 0 && ec.fk.calls == before + 1,
           "ECDH with the peer's point set: Z is the other side's");
    EVP_PKEY_CTX_free(ctx);
    ctx = NULL;
    len = sizeof(z);
    memset(z, 0, sizeof(z));
    tap_ok((ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ec.pk, NULL)) != NULL &&
               EVP_PKEY_derive_init(ctx) == 1 &&
               EVP_PKEY_derive_set_peer(ctx, eph_pub) == 1 &&
               EVP_PKEY_derive(ctx, z, &len) == 1 && memcmp(z, zref, 32) == 0,
           "ECDH with a peer of the default provider");
    EVP_PKEY_CTX_free(ctx);
    ctx = NULL;
    EVP_PKEY_free(peer);
    peer = EVP_PKEY_new();
    len = sizeof(z);
    memset(z, 0, sizeof(z));
    tap_ok(EVP_PKEY_copy_parameters(peer, ec.pk) == 1 &&
               EVP_PKEY_set1_encoded_public_key(peer, comp, comp_len) == 1 &&
               (ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ec.pk, NULL)) != NULL &&
               EVP_PKEY_derive_init(ctx) == 1 &&
               EVP_PKEY_derive_set_peer(ctx, peer) == 1 &&
               EVP_PKEY_derive(ctx, z, &len) == 1 && memcmp(z, zref, 32) == 0,
           "ECDH with a compressed point (the backend gets it uncompressed)");
    EVP_PKEY_CTX_free(ctx);
    before = ec.fk.calls;
    tap_ok((ctx = EVP_PKEY_CTX_new_from_pkey(NULL, ec.pk, NULL)) != NULL &&
               EVP_PKEY_derive_init(ctx) == 1 &&
               EVP_PKEY_derive_set_peer(ctx, p384) != 1 &&
               ec.fk.calls == before,
           "a peer on another curve is refused before the backend");
    ERR_clear_error();
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_CTX_free(ref);
    EVP_PKEY_free(peer);
    EVP_PKEY_free(eph_pub);
    EVP_PKEY_free(eph);
    EVP_PKEY_free(p384);
    OPENSSL_free(der);
}

/* ---- backend failures ------------------------------------------------- */

static void test_failures(void)
{
    STACK_OF(X509) *rcpts = sk_X509_new_null();
    cms_result *res = NULL, *env_rsa = NULL, *env_ec = NULL;
    const unsigned char *data;
    const rkey_error *e;
    cms_error err;
    size_t len;
    int rc;

    sk_X509_push(rcpts, rsa.cert);
    if (cms_encrypt_entity((const unsigned char *)sample, strlen(sample), rcpts,
                           CMS_CIPHER_AES128_GCM, CMS_RSA_OAEP, &env_rsa,
                           &err) != 0)
        die("cms_encrypt_entity");
    sk_X509_set(rcpts, 0, ec.cert);
    if (cms_encrypt_entity((const unsigned char *)sample, strlen(sample), rcpts,
                           CMS_CIPHER_AES128_CBC, CMS_RSA_PKCS1, &env_ec,
                           &err) != 0)
        die("cms_encrypt_entity");

    rkey_error_clear();
    tap_ok(rkey_last_error()->status == RKEY_OK, "no error after clearing");
    rsa.fk.fail = RKEY_BUSY;
    rc = cms_sign_entity((const unsigned char *)sample, strlen(sample), rsa.pk,
                         rsa.cert, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256,
                         &res, &err);
    e = rkey_last_error();
    tap_ok(rc != 0 && err.status == CMS_ERR_KEY && e->status == RKEY_BUSY &&
               e->retry_after == 7 &&
               strcmp(e->message, "token demo: busy") == 0,
           "signing on a busy token: CMS_ERR_KEY, and rkey_last_error says "
           "busy, retry after 7 s: %s",
           e->message);
    rsa.fk.fail = RKEY_UNAVAILABLE;
    rkey_error_clear();
    data = cms_result_data(env_rsa, &len);
    tap_ok(!decrypts(data, len, &rsa, rsa.cert, &err) &&
               err.status == CMS_ERR_DECRYPT &&
               rkey_last_error()->status == RKEY_UNAVAILABLE,
           "decrypting (OAEP) with the token unavailable: CMS_ERR_DECRYPT, "
           "rkey_last_error says unavailable");
    rsa.fk.fail = RKEY_OK;
    ec.fk.fail = RKEY_NOT_FOUND;
    rkey_error_clear();
    data = cms_result_data(env_ec, &len);
    tap_ok(!decrypts(data, len, &ec, ec.cert, &err) &&
               err.status == CMS_ERR_DECRYPT &&
               rkey_last_error()->status == RKEY_NOT_FOUND,
           "ECDH with the key gone: CMS_ERR_DECRYPT, rkey_last_error says "
           "not_found");
    rc = cms_sign_entity((const unsigned char *)sample, strlen(sample), ec.pk,
                         ec.cert, NULL, CMS_MODE_OPAQUE, CMS_DIGEST_SHA384,
                         &res, &err);
    tap_ok(rc != 0 && rkey_last_error()->status == RKEY_NOT_FOUND,
           "ECDSA with the key gone: rkey_last_error says not_found");
    ec.fk.fail = RKEY_OK;

    rkey_error_clear();
    rsa.fk.short_answer = ec.fk.short_answer = 1;
    rc = cms_sign_entity((const unsigned char *)sample, strlen(sample), rsa.pk,
                         rsa.cert, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256,
                         &res, &err);
    tap_ok(rc != 0 && rkey_last_error()->status == RKEY_INTERNAL,
           "an RSA signature one octet short: refused, internal: %s",
           rkey_last_error()->message);
    rkey_error_clear();
    rc = cms_sign_entity((const unsigned char *)sample, strlen(sample), ec.pk,
                         ec.cert, NULL, CMS_MODE_DETACHED, CMS_DIGEST_SHA256,
                         &res, &err);
    tap_ok(rc != 0 && rkey_last_error()->status == RKEY_INTERNAL,
           "an ECDSA r || s one octet short: refused, internal: %s",
           rkey_last_error()->message);
    rkey_error_clear();
    tap_ok(!decrypts(data, len, &ec, ec.cert, &err) &&
               rkey_last_error()->status == RKEY_INTERNAL,
           "a shared secret one octet short: refused, internal");
    rsa.fk.short_answer = ec.fk.short_answer = 0;

    rkey_error_clear();
    tap_ok(decrypts(data, len, &ec, ec.cert, &err) &&
               rkey_last_error()->status == RKEY_OK,
           "the key back: decryption works, and leaves no error");
    cms_result_free(env_rsa);
    cms_result_free(env_ec);
    sk_X509_free(rcpts);
}

/* ---- threads ---------------------------------------------------------- */

struct job {
    party *p;
    int n;
    int ok;
};

static void *sign_many(void *arg)
{
    struct job *j = arg;
    int i;

    for (i = 0; i < j->n; i++) {
        cms_result *res = NULL;
        const unsigned char *data;
        cms_error err;
        size_t len;

        if (cms_sign_entity((const unsigned char *)sample, strlen(sample),
                            j->p->pk, j->p->cert, NULL, CMS_MODE_DETACHED,
                            CMS_DIGEST_SHA256, &res, &err) == 0) {
            data = cms_result_data(res, &len);
            j->ok += verifies(data, len, j->p->cert, "sha256");
        }
        cms_result_free(res);
    }
    return NULL;
}

static void test_threads(party *p)
{
    enum { THREADS = 6, EACH = 20 };
    pthread_t t[THREADS];
    struct job jobs[THREADS];
    int i, ok = 0, before = p->fk.calls;

    for (i = 0; i < THREADS; i++) {
        jobs[i] = (struct job){p, EACH, 0};
        if (pthread_create(&t[i], NULL, sign_many, &jobs[i]) != 0)
            die("pthread_create");
    }
    for (i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        ok += jobs[i].ok;
    }
    tap_ok(ok == THREADS * EACH && p->fk.calls == before + THREADS * EACH,
           "%s: %d threads signing with one EVP_PKEY: %d of %d verify", p->file,
           THREADS, ok, THREADS * EACH);
}

/* ---- the cost of the provider ---------------------------------------- */

static double seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Microseconds per EVP_PKEY_sign of a SHA-256 digest, as cms/ signs. */
static double us_per_sign(EVP_PKEY *key, int n)
{
    unsigned char d[32] = {1}, sig[512];
    double t0 = seconds();
    int i, ok = 1;

    for (i = 0; i < n; i++) {
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
        size_t len = sizeof(sig);

        ok = ok && ctx != NULL && EVP_PKEY_sign_init(ctx) > 0 &&
             EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) > 0 &&
             EVP_PKEY_sign(ctx, sig, &len, d, sizeof(d)) > 0;
        EVP_PKEY_CTX_free(ctx);
    }
    if (!ok)
        die("us_per_sign");
    return (seconds() - t0) * 1e6 / n;
}

static void test_overhead(void)
{
    party *ps[] = {&rsa, &ec};
    size_t i;

    /* the best of 5 alternating rounds: the machine is shared */
    for (i = 0; i < 2; i++) {
        double direct = 1e9, via = 1e9, t;
        int round;

        for (round = 0; round < 5; round++) {
            t = us_per_sign(ps[i]->fk.pkey, 50);
            direct = t < direct ? t : direct;
            t = us_per_sign(ps[i]->pk, 50);
            via = t < via ? t : via;
        }

        printf("# %s: %.1f us per signature with the key itself, %.1f us "
               "through the provider (%+.1f us)\n",
               ps[i]->file, direct, via, via - direct);
    }
}

int main(void)
{
    EVP_PKEY *other_key;
    X509 *other_ca;
    rkey_error err;

    if (rkey_provider_init(&err) != 0) {
        fprintf(stderr, "%s\n", err.message);
        die("rkey_provider_init");
    }
    cms_init();
    snprintf(tmp, sizeof(tmp), "/tmp/smimed-rkey-XXXXXX");
    if (mkdtemp(tmp) == NULL)
        die("mkdtemp");
    ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    other_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ca_cert = make_cert(ca_key, "Test CA", NULL, NULL, NULL, 1);
    other_ca = make_cert(other_key, "Test CA", NULL, NULL, NULL, 1);
    party_make(&rsa, "RSA", "rsa@example.org");
    party_make(&ec, "EC", "ec@example.org");
    party_make(&carol, "RSA", "carol@example.org");
    party_make(&alice, "RSA", "alice@example.org");
    write_cert("ca.pem", ca_cert);
    write_cert("other-ca.pem", other_ca);
    write_cert("rsa.pem", rsa.cert);
    write_cert("ec.pem", ec.cert);

    test_init();
    test_key(&rsa, "RSA", &carol);
    test_key(&ec, "EC", &rsa);
    test_unsupported();
    test_release();
    test_sign_cms(&rsa);
    test_sign_cms(&ec);
    test_sign_wrong_cert();
    test_digest_sign(&rsa);
    test_digest_sign(&ec);
    test_pss();
    test_receipt(&rsa);
    test_receipt(&ec);
    test_decrypt_cli();
    test_decrypt_ours();
    test_decrypt_wrong_key();
    test_oaep_label();
    test_ecdh_peer();
    test_failures();
    test_threads(&rsa);
    test_threads(&ec);
    test_overhead();

    sh("rm -rf %s", tmp);
    party_free(&rsa);
    party_free(&ec);
    party_free(&carol);
    party_free(&alice);
    X509_free(ca_cert);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(other_key);
    X509_free(other_ca);
    return tap_done();
}
