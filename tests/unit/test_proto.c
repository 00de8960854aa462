/*
 * proto/: every message round-trips; every truncation, every oversized
 * length, a wrong version or type, text with NUL, control characters or
 * bad UTF-8, fields that break their mechanism's rules and trailing bytes
 * are refused. Hostile messages are written with a builder of this file's
 * own, not with proto's encoder, so a bug shared by both sides cannot hide.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"
#include "tap.h"

/* ---- an independent builder ---- */

typedef struct tb {
    unsigned char buf[PROTO_MSG_MAX + 64];
    size_t len;
} tb;

static void tb_raw(tb *b, const void *p, size_t n)
{
    if (b->len + n > sizeof(b->buf))
        abort();
    memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void tb_uint(tb *b, uint64_t v, size_t n)
{
    unsigned char x[8];
    size_t i;

    for (i = 0; i < n; i++)
        x[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
    tb_raw(b, x, n);
}

static void tb_head(tb *b, unsigned version, unsigned type, uint32_t id)
{
    b->len = 0;
    tb_uint(b, version, 2);
    tb_uint(b, type, 2);
    tb_uint(b, id, 4);
    tb_uint(b, 0, 4);
}

/* The length field of the header, made to match the body. */
static void tb_seal(tb *b)
{
    size_t body = b->len - PROTO_HEADER_LEN;

    b->buf[8] = (unsigned char)(body >> 24);
    b->buf[9] = (unsigned char)(body >> 16);
    b->buf[10] = (unsigned char)(body >> 8);
    b->buf[11] = (unsigned char)body;
}

static void tb_bytes(tb *b, const void *p, size_t n)
{
    tb_uint(b, n, 4);
    tb_raw(b, p, n);
}

static void tb_str(tb *b, const char *s)
{
    tb_bytes(b, s, strlen(s));
}

static void tb_claims(tb *b)
{
    tb_str(b, "0123456789abcdef");
    tb_str(b, "webmail");
    tb_str(b, "127.0.0.1");
    tb_str(b,
           "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
}

static const unsigned char sha256_digest[32] = {
    0x9f, 0x86, 0xd0, 0x81, 0x88, 0x4c, 0x7d, 0x65, 0x9a, 0x2f, 0xea,
    0xa0, 0xc5, 0x5a, 0xd0, 0x15, 0xa3, 0xbf, 0x4f, 0x1b, 0x2b, 0x0b,
    0x82, 0x2c, 0xd1, 0x5d, 0x6c, 0x15, 0xb0, 0xf0, 0x0a, 0x08,
};

/* A valid SIGN, field by field; key and digest replaceable. */
static void tb_sign(tb *b, const char *key, unsigned mech, unsigned md,
                    unsigned mgf1, uint32_t salt, const void *digest,
                    size_t dlen)
{
    tb_head(b, PROTO_VERSION, PROTO_SIGN, 7);
    tb_str(b, key);
    tb_uint(b, mech, 1);
    tb_uint(b, md, 1);
    tb_uint(b, mgf1, 1);
    tb_uint(b, salt, 4);
    tb_bytes(b, digest, dlen);
    tb_claims(b);
    tb_seal(b);
}

/* A DECRYPT, field by field. */
static void tb_decrypt(tb *b, const char *key, unsigned padding,
                       unsigned oaep_md, unsigned mgf1_md, const void *label,
                       size_t llen, const void *ct, size_t clen)
{
    tb_head(b, PROTO_VERSION, PROTO_DECRYPT, 9);
    tb_str(b, key);
    tb_uint(b, padding, 1);
    tb_uint(b, oaep_md, 1);
    tb_uint(b, mgf1_md, 1);
    tb_bytes(b, label, llen);
    tb_bytes(b, ct, clen);
    tb_claims(b);
    tb_seal(b);
}

/* A DERIVE, field by field. */
static void tb_derive(tb *b, const char *key, const void *pt, size_t plen)
{
    tb_head(b, PROTO_VERSION, PROTO_DERIVE, 9);
    tb_str(b, key);
    tb_bytes(b, pt, plen);
    tb_claims(b);
    tb_seal(b);
}

/* A FINISH, field by field. */
static void tb_finish(tb *b, const char *request_id, unsigned result,
                      const char *error)
{
    tb_head(b, PROTO_VERSION, PROTO_FINISH, 9);
    tb_str(b, request_id);
    tb_uint(b, result, 2);
    tb_str(b, error);
    tb_uint(b, 0, 4);
    tb_seal(b);
}

/* The fields every reply starts with: status, no retry_after, epoch 1 and
 * message; the caller adds a payload and seals. */
static void tb_reply_head(tb *b, unsigned type, unsigned status,
                          const char *message)
{
    tb_head(b, PROTO_VERSION, type, 5);
    tb_uint(b, status, 1);
    tb_uint(b, 0, 4);
    tb_uint(b, 1, 8);
    tb_str(b, message);
}

static int decodes(const tb *b)
{
    proto_request req;
    proto_error err = {{0}};

    return proto_request_decode(b->buf, b->len, &req, &err) == 0;
}

/* ---- the messages every loop below goes through ---- */

static unsigned char big_cert[PROTO_CERT_MAX];
static unsigned char label[] = "a label";
static unsigned char ciphertext[256];
static unsigned char point[65];

static void claims(proto_claims *c)
{
    snprintf(c->request_id, sizeof(c->request_id), "%s", "00ff00ff00ff00ff");
    snprintf(c->client, sizeof(c->client), "%s", "cl\xc3\xa9ment");
    snprintf(c->remote, sizeof(c->remote), "%s", "::1");
    snprintf(
        c->content_sha256, sizeof(c->content_sha256), "%s",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

/* Fills req with the i-th sample request; 0 past the last. */
static int sample_request(int i, proto_request *req)
{
    memset(req, 0, sizeof(*req));
    req->id = 1000u + (unsigned)i;
    switch (i) {
    case 0:
        req->type = PROTO_KEYS;
        req->u.page.start = 3;
        return 1;
    case 1:
        req->type = PROTO_STATE;
        return 1;
    case 2:
    case 3:
    case 4:
    case 5:
        req->type = PROTO_SIGN;
        snprintf(req->u.sign.key, sizeof(req->u.sign.key), "demo-rsa");
        req->u.sign.mech = i == 2   ? PROTO_SIGN_RSA_PKCS1
                           : i == 3 ? PROTO_SIGN_RSA_PSS
                                    : PROTO_SIGN_ECDSA;
        req->u.sign.md = i == 5 ? PROTO_MD_SHA384 : PROTO_MD_SHA256;
        req->u.sign.digest = sha256_digest;
        req->u.sign.digest_len = 32;
        if (i == 5) /* only the length is checked: any 48 bytes */
            req->u.sign.digest = big_cert, req->u.sign.digest_len = 48;
        if (i == 3) {
            req->u.sign.mgf1_md = PROTO_MD_SHA256;
            req->u.sign.salt_len = 32;
        }
        claims(&req->u.sign.claims);
        return 1;
    case 6:
    case 7:
        req->type = PROTO_DECRYPT;
        snprintf(req->u.decrypt.key, sizeof(req->u.decrypt.key), "demo-rsa");
        req->u.decrypt.padding = i == 6 ? PROTO_PAD_PKCS1 : PROTO_PAD_OAEP;
        if (i == 7) {
            req->u.decrypt.oaep_md = PROTO_MD_SHA256;
            req->u.decrypt.mgf1_md = PROTO_MD_SHA1;
            req->u.decrypt.label = label;
            req->u.decrypt.label_len = sizeof(label) - 1;
        }
        req->u.decrypt.ciphertext = ciphertext;
        req->u.decrypt.ciphertext_len = sizeof(ciphertext);
        claims(&req->u.decrypt.claims);
        return 1;
    case 8:
        req->type = PROTO_DERIVE;
        snprintf(req->u.derive.key, sizeof(req->u.derive.key), "demo-ec");
        req->u.derive.point = point;
        req->u.derive.point_len = sizeof(point);
        claims(&req->u.derive.claims);
        return 1;
    case 9:
        req->type = PROTO_AUDIT;
        claims(&req->u.audit.claims);
        req->u.audit.claims.content_sha256[0] = '\0';
        snprintf(req->u.audit.operation, sizeof(req->u.audit.operation),
                 "/v1/keys");
        req->u.audit.result = 401;
        snprintf(req->u.audit.error, sizeof(req->u.audit.error),
                 "unauthorized");
        return 1;
    case 10:
        req->type = PROTO_FINISH;
        snprintf(req->u.finish.request_id, sizeof(req->u.finish.request_id),
                 "00ff00ff00ff00ff");
        req->u.finish.result = 200;
        req->u.finish.latency_us = 12345;
        return 1;
    default:
        return 0;
    }
}

static proto_token_entry tokens[2];
static proto_key_entry keys[2];
static const unsigned char cert_a[] = {0x30, 0x03, 0x02, 0x01, 0x01};
static const unsigned char sig[256] = {1, 2, 3};

static void sample_directory(void)
{
    memset(tokens, 0, sizeof(tokens));
    memset(keys, 0, sizeof(keys));
    snprintf(tokens[0].name, sizeof(tokens[0].name), "demo");
    tokens[0].state = PROTO_TOKEN_READY;
    tokens[0].flags = PROTO_TOKEN_DISCOVERY;
    tokens[0].since = 1767225600;
    tokens[0].ops_sign = 12;
    tokens[0].max_sessions = 16;
    snprintf(tokens[1].name, sizeof(tokens[1].name), "spare");
    tokens[1].state = PROTO_TOKEN_DOWN;
    tokens[1].flags = PROTO_TOKEN_OPTIONAL;
    snprintf(tokens[1].reason, sizeof(tokens[1].reason), "no token matches");
    snprintf(keys[0].name, sizeof(keys[0].name), "demo-rsa");
    snprintf(keys[0].token, sizeof(keys[0].token), "demo");
    snprintf(keys[0].algorithm, sizeof(keys[0].algorithm), "rsa-2048");
    keys[0].flags = PROTO_KEY_FLAGS;
    keys[0].cert = cert_a;
    keys[0].cert_len = sizeof(cert_a);
    keys[0].nchain = 2;
    keys[0].chain[0] = cert_a;
    keys[0].chain_len[0] = sizeof(cert_a);
    keys[0].chain[1] = big_cert;
    keys[0].chain_len[1] = 100;
    snprintf(keys[1].name, sizeof(keys[1].name), "demo-ec");
    snprintf(keys[1].token, sizeof(keys[1].token), "demo");
    keys[1].flags = PROTO_KEY_SIGN_SUPPORTED | PROTO_KEY_SIGN_USABLE;
    snprintf(keys[1].reason_decrypt, sizeof(keys[1].reason_decrypt),
             "the token cannot derive");
}

static int sample_reply(int i, proto_reply *rep)
{
    memset(rep, 0, sizeof(*rep));
    rep->id = 2000u + (unsigned)i;
    rep->epoch = 0x0102030405060708ULL;
    switch (i) {
    case 0:
        rep->type = PROTO_REPLY | PROTO_KEYS;
        rep->u.keys.total = 5;
        rep->u.keys.next = 2;
        rep->u.keys.nkeys = 2;
        rep->u.keys.keys = keys;
        return 1;
    case 1:
        rep->type = PROTO_REPLY | PROTO_STATE;
        rep->u.state.total = 2;
        rep->u.state.next = 2;
        rep->u.state.ntokens = 2;
        rep->u.state.tokens = tokens;
        return 1;
    case 2:
    case 3:
    case 4:
        rep->type = PROTO_REPLY | (i == 2   ? PROTO_SIGN
                                   : i == 3 ? PROTO_DECRYPT
                                            : PROTO_DERIVE);
        rep->u.bytes.data = sig;
        rep->u.bytes.len = i == 4 ? 32 : sizeof(sig);
        return 1;
    case 5:
        rep->type = PROTO_REPLY | PROTO_SIGN;
        rep->status = PROTO_BUSY;
        rep->retry_after = 2;
        snprintf(rep->message, sizeof(rep->message), "token demo: busy");
        return 1;
    case 6:
        rep->type = PROTO_ERROR;
        rep->status = PROTO_BAD_REQUEST;
        snprintf(rep->message, sizeof(rep->message), "the version is wrong");
        return 1;
    case 7:
        rep->type = PROTO_NOTICE;
        rep->id = 0;
        return 1;
    case 8:
        rep->type = PROTO_REPLY | PROTO_FINISH;
        return 1;
    default:
        return 0;
    }
}

/* ---- round trips ---- */

static void test_request_round_trips(void)
{
    unsigned char a[PROTO_MSG_MAX], b[PROTO_MSG_MAX];
    size_t alen, blen;
    proto_request req, back;
    proto_error err = {{0}};
    int i;

    for (i = 0; sample_request(i, &req); i++) {
        int ok = proto_request_encode(&req, a, sizeof(a), &alen, &err) == 0 &&
                 proto_request_decode(a, alen, &back, &err) == 0 &&
                 proto_request_encode(&back, b, sizeof(b), &blen, &err) == 0;

        tap_ok(ok && alen == blen && memcmp(a, b, alen) == 0 &&
                   back.type == req.type && back.id == req.id,
               "request %d (type %u) round-trips (%s)", i, req.type,
               ok ? "same bytes" : err.message);
    }
    sample_request(3, &req);
    proto_request_encode(&req, a, sizeof(a), &alen, &err);
    proto_request_decode(a, alen, &back, &err);
    tap_ok(strcmp(back.u.sign.key, "demo-rsa") == 0 &&
               back.u.sign.mech == PROTO_SIGN_RSA_PSS &&
               back.u.sign.mgf1_md == PROTO_MD_SHA256 &&
               back.u.sign.salt_len == 32 && back.u.sign.digest_len == 32 &&
               memcmp(back.u.sign.digest, sha256_digest, 32) == 0 &&
               strcmp(back.u.sign.claims.client, "cl\xc3\xa9ment") == 0 &&
               strcmp(back.u.sign.claims.remote, "::1") == 0,
           "a decoded SIGN holds what was sent");
    sample_request(7, &req);
    proto_request_encode(&req, a, sizeof(a), &alen, &err);
    proto_request_decode(a, alen, &back, &err);
    tap_ok(back.u.decrypt.label_len == 7 &&
               memcmp(back.u.decrypt.label, "a label", 7) == 0 &&
               back.u.decrypt.ciphertext_len == sizeof(ciphertext) &&
               back.u.decrypt.mgf1_md == PROTO_MD_SHA1,
           "a decoded DECRYPT holds what was sent");
}

static void test_reply_round_trips(void)
{
    unsigned char a[PROTO_MSG_MAX], b[PROTO_MSG_MAX];
    size_t alen, blen;
    proto_reply rep, back;
    proto_error err = {{0}};
    int i;

    sample_directory();
    for (i = 0; sample_reply(i, &rep); i++) {
        int ok = proto_reply_encode(&rep, a, sizeof(a), &alen, &err) == 0 &&
                 proto_reply_decode(a, alen, &back, &err) == 0 &&
                 proto_reply_encode(&back, b, sizeof(b), &blen, &err) == 0;

        tap_ok(ok && alen == blen && memcmp(a, b, alen) == 0 &&
                   back.epoch == rep.epoch,
               "reply %d (type %#x) round-trips (%s)", i, rep.type,
               ok ? "same bytes" : err.message);
        if (ok)
            proto_reply_clear(&back);
    }
    sample_reply(0, &rep);
    proto_reply_encode(&rep, a, sizeof(a), &alen, &err);
    tap_ok(proto_reply_decode(a, alen, &back, &err) == 0 &&
               back.u.keys.nkeys == 2 && back.u.keys.keys[0].nchain == 2 &&
               back.u.keys.keys[0].chain_len[1] == 100 &&
               strcmp(back.u.keys.keys[1].reason_decrypt,
                      "the token cannot derive") == 0 &&
               back.u.keys.keys[1].cert_len == 0,
           "a decoded KEYS reply holds the directory");
    proto_reply_clear(&back);
    /* the page arithmetic the key process fills pages with */
    rep.u.keys.nkeys = 0;
    proto_reply_encode(&rep, a, sizeof(a), &alen, &err);
    tap_ok(alen == proto_keys_reply_overhead(),
           "proto_keys_reply_overhead is the size of an empty page");
    rep.u.keys.nkeys = 1;
    proto_reply_encode(&rep, b, sizeof(b), &blen, &err);
    tap_ok(blen == alen + proto_key_entry_size(&keys[0]),
           "proto_key_entry_size is what an entry adds");
    sample_reply(1, &rep);
    proto_reply_encode(&rep, a, sizeof(a), &alen, &err);
    tap_ok(proto_reply_decode(a, alen, &back, &err) == 0 &&
               back.u.state.ntokens == 2 &&
               strcmp(back.u.state.tokens[1].reason, "no token matches") == 0 &&
               back.u.state.tokens[0].ops_sign == 12 &&
               back.u.state.tokens[0].max_sessions == 16 &&
               back.u.state.tokens[0].since == 1767225600,
           "a decoded STATE reply holds the tokens");
    proto_reply_clear(&back);
}

/* ---- hostile requests ---- */

static void test_truncations(void)
{
    unsigned char a[PROTO_MSG_MAX];
    size_t alen, n;
    proto_request req;
    proto_error err = {{0}};
    int i, refused, refused_sealed;
    tb b;

    for (i = 0; sample_request(i, &req); i++) {
        proto_request_encode(&req, a, sizeof(a), &alen, &err);
        refused = refused_sealed = 1;
        for (n = 0; n < alen; n++) {
            memcpy(b.buf, a, n);
            b.len = n;
            if (decodes(&b))
                refused = 0;
            /* the same prefix with a header that claims it is whole: the
             * field that is cut short must be noticed on its own */
            if (n >= PROTO_HEADER_LEN) {
                tb_seal(&b);
                if (decodes(&b))
                    refused_sealed = 0;
            }
        }
        tap_ok(refused && refused_sealed,
               "request %d: each of its %zu truncations is refused", i, alen);
    }
}

static void test_trailing(void)
{
    unsigned char a[PROTO_MSG_MAX];
    size_t alen;
    proto_request req;
    proto_error err = {{0}};
    int i, refused = 1;
    tb b;

    for (i = 0; sample_request(i, &req); i++) {
        proto_request_encode(&req, a, sizeof(a), &alen, &err);
        memcpy(b.buf, a, alen);
        b.len = alen;
        tb_uint(&b, 0, 1);
        tb_seal(&b);
        if (decodes(&b))
            refused = 0;
        b.len = alen + 1; /* unsealed: the length disagrees */
        memcpy(b.buf, a, alen);
        b.buf[alen] = 0;
        if (decodes(&b))
            refused = 0;
    }
    tap_ok(refused, "a byte after the last field is refused, with the "
                    "length sealed or not");
}

static void test_header(void)
{
    tb b;

    tb_sign(&b, "demo-rsa", PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, 0, 0,
            sha256_digest, 32);
    tap_ok(decodes(&b), "the hand-built SIGN is accepted");
    b.buf[1] = 2;
    tap_ok(!decodes(&b), "version 2 is refused");
    b.buf[1] = 0;
    tap_ok(!decodes(&b), "version 0 is refused");
    b.buf[1] = 1;
    b.buf[3] = 0;
    tap_ok(!decodes(&b), "type 0 is refused");
    b.buf[3] = 8;
    tap_ok(!decodes(&b), "type 8 (none) is refused");
    b.buf[3] = PROTO_REPLY | PROTO_SIGN;
    tap_ok(!decodes(&b), "a reply type is not a request");
    b.buf[2] = 1;
    b.buf[3] = PROTO_SIGN;
    tap_ok(!decodes(&b), "type 0x0102 is refused");
    b.buf[2] = 0;
    b.buf[4] = b.buf[5] = b.buf[6] = b.buf[7] = 0;
    tap_ok(!decodes(&b), "id 0 is refused");
    b.buf[7] = 7;
    b.buf[11] ^= 1;
    tap_ok(!decodes(&b), "a length that is not the message's is refused");
    b.buf[11] ^= 1;
    b.buf[8] = 0xff;
    tap_ok(!decodes(&b), "a length of 4 GiB is refused");
    b.buf[8] = 0;
    tap_ok(decodes(&b), "and the message is fine once put back");

    memset(b.buf, 0, PROTO_MSG_MAX + 1);
    b.len = PROTO_MSG_MAX + 1;
    b.buf[1] = 1;
    b.buf[3] = PROTO_KEYS;
    b.buf[7] = 1;
    tb_seal(&b);
    tap_ok(!decodes(&b), "a message over PROTO_MSG_MAX is refused");
}

/* Each length-prefixed field over its maximum (with the bytes there to
 * read), and with a length far past the message. */
static void test_oversized(void)
{
    char name[PROTO_NAME_MAX + 2];
    unsigned char big[2048];
    tb b;

    memset(big, 0x41, sizeof(big));
    memset(name, 'k', sizeof(name));
    name[PROTO_NAME_MAX] = '\0';
    tb_sign(&b, name, PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, 0, 0,
            sha256_digest, 32);
    tap_ok(decodes(&b), "a key name of %d bytes is accepted", PROTO_NAME_MAX);
    name[PROTO_NAME_MAX] = 'k';
    name[PROTO_NAME_MAX + 1] = '\0';
    tb_sign(&b, name, PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, 0, 0,
            sha256_digest, 32);
    tap_ok(!decodes(&b), "a key name of %d bytes is refused",
           PROTO_NAME_MAX + 1);
    tb_sign(&b, "", PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, 0, 0, sha256_digest,
            32);
    tap_ok(!decodes(&b), "an empty key name is refused");
    tb_sign(&b, "k", PROTO_SIGN_RSA_PKCS1, PROTO_MD_NONE, 0, 0, big,
            PROTO_DIGEST_MAX);
    tap_ok(decodes(&b), "a DigestInfo of %d bytes is accepted",
           PROTO_DIGEST_MAX);
    tb_sign(&b, "k", PROTO_SIGN_RSA_PKCS1, PROTO_MD_NONE, 0, 0, big,
            PROTO_DIGEST_MAX + 1);
    tap_ok(!decodes(&b), "a digest of %d bytes is refused",
           PROTO_DIGEST_MAX + 1);

    /* a length of 0xffffffff where the key name goes */
    tb_head(&b, PROTO_VERSION, PROTO_SIGN, 7);
    tb_uint(&b, 0xffffffffu, 4);
    tb_raw(&b, big, 64);
    tb_seal(&b);
    tap_ok(!decodes(&b), "a text length of 0xffffffff is refused");

    /* DECRYPT: the ciphertext and the label */
    tb_decrypt(&b, "demo-rsa", PROTO_PAD_PKCS1, 0, 0, "", 0, big,
               PROTO_RSA_MAX + 1);
    tap_ok(!decodes(&b), "a ciphertext of %d bytes is refused",
           PROTO_RSA_MAX + 1);
    tb_decrypt(&b, "demo-rsa", PROTO_PAD_OAEP, PROTO_MD_SHA256, PROTO_MD_SHA256,
               big, PROTO_LABEL_MAX + 1, big, 256);
    tap_ok(!decodes(&b), "an OAEP label of %d bytes is refused",
           PROTO_LABEL_MAX + 1);
    tb_decrypt(&b, "demo-rsa", PROTO_PAD_PKCS1, 0, 0, "", 0, "", 0);
    tap_ok(!decodes(&b), "an empty ciphertext is refused");

    /* DERIVE: the point */
    big[0] = 0x04;
    tb_derive(&b, "demo-ec", big, PROTO_POINT_MAX + 1);
    tap_ok(!decodes(&b), "a point of %d bytes is refused", PROTO_POINT_MAX + 1);
}

/* Claims: the request id, client, remote and digest, each over its
 * maximum or off its alphabet. */
static void test_claims(void)
{
    static const struct {
        const char *rid, *client, *remote, *sha, *what;
        int ok;
    } cases[] = {
        {"r", "", "", "", "a bare request id", 1},
        {"", "", "", "", "no request id", 0},
        {"0123456789012345678901234567890123456789012345678901234567890123", "",
         "", "", "a request id of 64", 1},
        {"01234567890123456789012345678901234567890123456789012345678901234",
         "", "", "", "a request id of 65", 0},
        {"id with space", "", "", "", "a space in the request id", 0},
        {"r", "012345678901234567890123456789012345678901234567890123456789012",
         "", "", "a client of 63", 1},
        {"r",
         "0123456789012345678901234567890123456789012345678901234567890123", "",
         "", "a client of 64", 0},
        {"r", "",
         "01234567890123456789012345678901234567890123456789012345678901234",
         "", "a remote of 65", 0},
        {"r", "", "",
         "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
         "an uppercase digest", 0},
        {"r", "", "",
         "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0",
         "a digest of 63 hex digits", 0},
        {"r", "", "", "9f86", "a digest of 4 hex digits", 0},
    };
    size_t i;
    tb b;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        tb_head(&b, PROTO_VERSION, PROTO_DERIVE, 3);
        tb_str(&b, "demo-ec");
        memset(point, 0, sizeof(point));
        point[0] = 4;
        tb_bytes(&b, point, sizeof(point));
        tb_str(&b, cases[i].rid);
        tb_str(&b, cases[i].client);
        tb_str(&b, cases[i].remote);
        tb_str(&b, cases[i].sha);
        tb_seal(&b);
        tap_ok(decodes(&b) == cases[i].ok, "claims: %s is %s", cases[i].what,
               cases[i].ok ? "accepted" : "refused");
    }
}

/* Text with a NUL, control characters, bad UTF-8 in a key name. */
static void test_text(void)
{
    static const struct {
        const char *bytes;
        size_t len;
        const char *what;
        int ok;
    } cases[] = {
        {"caf\xc3\xa9", 5, "UTF-8 (U+00E9)", 1},
        {"\xf0\x9f\x94\x91", 4, "UTF-8 (U+1F511)", 1},
        {"a\0b", 3, "a NUL", 0},
        {"a\nb", 3, "a newline", 0},
        {"a\x7f", 2, "DEL", 0},
        {"\xc0\x80", 2, "an overlong NUL", 0},
        {"\xe0\x80\xaf", 3, "an overlong '/'", 0},
        {"\xed\xa0\x80", 3, "a surrogate", 0},
        {"\xf4\x90\x80\x80", 4, "a code point past U+10FFFF", 0},
        {"\xf5\x80\x80\x80", 4, "the byte 0xf5", 0},
        {"ab\xc3", 3, "a sequence cut short", 0},
        {"\x80", 1, "a lone continuation byte", 0},
    };
    size_t i;
    tb b;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        tb_head(&b, PROTO_VERSION, PROTO_SIGN, 7);
        tb_bytes(&b, cases[i].bytes, cases[i].len);
        tb_uint(&b, PROTO_SIGN_ECDSA, 1);
        tb_uint(&b, PROTO_MD_SHA256, 1);
        tb_uint(&b, 0, 1);
        tb_uint(&b, 0, 4);
        tb_bytes(&b, sha256_digest, 32);
        tb_claims(&b);
        tb_seal(&b);
        tap_ok(decodes(&b) == cases[i].ok, "a key name with %s is %s",
               cases[i].what, cases[i].ok ? "accepted" : "refused");
    }
}

/* Fields that are well formed but break the mechanism's rules. */
static void test_rules(void)
{
    unsigned char digest48[48] = {0};
    tb b;

    tb_sign(&b, "k", PROTO_SIGN_RSA_PSS, PROTO_MD_SHA256, PROTO_MD_NONE, 32,
            sha256_digest, 32);
    tap_ok(!decodes(&b), "PSS without an MGF1 digest is refused");
    tb_sign(&b, "k", PROTO_SIGN_RSA_PSS, PROTO_MD_SHA256, PROTO_MD_SHA256,
            PROTO_RSA_MAX + 1, sha256_digest, 32);
    tap_ok(!decodes(&b), "a PSS salt over %d is refused", PROTO_RSA_MAX);
    tb_sign(&b, "k", PROTO_SIGN_RSA_PSS, PROTO_MD_SHA256, PROTO_MD_SHA256, 0,
            sha256_digest, 32);
    tap_ok(decodes(&b), "a PSS salt of 0 is accepted");
    tb_sign(&b, "k", PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, 0, 20,
            sha256_digest, 32);
    tap_ok(!decodes(&b), "a salt with PKCS#1 v1.5 is refused");
    tb_sign(&b, "k", PROTO_SIGN_RSA_PKCS1, PROTO_MD_SHA256, PROTO_MD_SHA1, 0,
            sha256_digest, 32);
    tap_ok(!decodes(&b), "an MGF1 digest with PKCS#1 v1.5 is refused");
    tb_sign(&b, "k", PROTO_SIGN_ECDSA, PROTO_MD_NONE, 0, 0, sha256_digest, 32);
    tap_ok(!decodes(&b), "ECDSA without a digest is refused");
    tb_sign(&b, "k", PROTO_SIGN_ECDSA, PROTO_MD_SHA384, 0, 0, sha256_digest,
            32);
    tap_ok(!decodes(&b), "a SHA-384 digest of 32 bytes is refused");
    tb_sign(&b, "k", PROTO_SIGN_ECDSA, PROTO_MD_SHA384, 0, 0, digest48, 48);
    tap_ok(decodes(&b), "a SHA-384 digest of 48 bytes is accepted");
    tb_sign(&b, "k", PROTO_SIGN_ECDSA, PROTO_MD_COUNT, 0, 0, sha256_digest, 32);
    tap_ok(!decodes(&b), "an unknown digest is refused");
    tb_sign(&b, "k", 4, PROTO_MD_SHA256, 0, 0, sha256_digest, 32);
    tap_ok(!decodes(&b), "an unknown mechanism is refused");
    tb_sign(&b, "k", 0, PROTO_MD_SHA256, 0, 0, sha256_digest, 32);
    tap_ok(!decodes(&b), "mechanism 0 is refused");

    tb_decrypt(&b, "k", PROTO_PAD_PKCS1, 0, 0, "L", 1, ciphertext, 256);
    tap_ok(!decodes(&b), "a label with PKCS#1 v1.5 is refused");
    tb_decrypt(&b, "k", 3, 0, 0, "", 0, ciphertext, 256);
    tap_ok(!decodes(&b), "an unknown padding is refused");

    point[0] = 0x02;
    tb_derive(&b, "k", point, 33);
    tap_ok(!decodes(&b), "a compressed point is refused");
    tb_derive(&b, "k", point, 65);
    tap_ok(!decodes(&b), "a point of 65 bytes not starting 0x04 is refused");
    point[0] = 0x04;

    tb_finish(&b, "r", 600, "");
    tap_ok(!decodes(&b), "an HTTP status of 600 is refused");
    tb_finish(&b, "r", 503, "Token-Busy");
    tap_ok(!decodes(&b), "an error code that is not snake_case is refused");
    tb_head(&b, PROTO_VERSION, PROTO_AUDIT, 9);
    tb_claims(&b);
    tb_str(&b, "");
    tb_str(&b, "");
    tb_uint(&b, 401, 2);
    tb_str(&b, "unauthorized");
    tb_seal(&b);
    tap_ok(!decodes(&b), "an AUDIT without an operation is refused");
}

/* The encoder refuses what the decoder would. */
static void test_encoder_refuses(void)
{
    unsigned char a[PROTO_MSG_MAX];
    proto_request req;
    proto_reply rep;
    proto_error err = {{0}};
    size_t len;

    sample_request(2, &req);
    req.u.sign.salt_len = 1;
    tap_ok(proto_request_encode(&req, a, sizeof(a), &len, &err) != 0,
           "encode: a salt with PKCS#1 v1.5 (%s)", err.message);
    sample_request(2, &req);
    req.u.sign.key[0] = '\n';
    tap_ok(proto_request_encode(&req, a, sizeof(a), &len, &err) != 0,
           "encode: a key name with a newline");
    sample_request(2, &req);
    req.id = 0;
    tap_ok(proto_request_encode(&req, a, sizeof(a), &len, &err) != 0,
           "encode: id 0");
    sample_request(2, &req);
    tap_ok(proto_request_encode(&req, a, 40, &len, &err) != 0,
           "encode: a buffer too small");
    sample_reply(5, &rep);
    rep.message[0] = '\0';
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: a refusal without a message");
    sample_reply(2, &rep);
    rep.retry_after = 1;
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: retry_after on success");
    sample_reply(4, &rep);
    rep.u.bytes.len = PROTO_SECRET_MAX + 1;
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: a shared secret over %d bytes", PROTO_SECRET_MAX);
    sample_directory();
    sample_reply(0, &rep);
    keys[0].flags &= ~PROTO_KEY_SIGN_USABLE;
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: a key not usable without a reason");
    sample_directory();
    keys[0].nchain = PROTO_CHAIN_MAX + 1;
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: a chain of %d", PROTO_CHAIN_MAX + 1);
    sample_directory();
    keys[0].cert = big_cert;
    keys[0].cert_len = PROTO_CERT_MAX;
    keys[0].nchain = PROTO_CHAIN_MAX;
    keys[0].chain[2] = big_cert;
    keys[0].chain_len[2] = PROTO_CERT_MAX;
    keys[0].chain[3] = big_cert;
    keys[0].chain_len[3] = PROTO_CERT_MAX;
    keys[0].chain[4] = big_cert;
    keys[0].chain_len[4] = PROTO_CERT_MAX;
    tap_ok(proto_reply_encode(&rep, a, sizeof(a), &len, &err) != 0,
           "encode: a page over %d bytes (%s)", PROTO_MSG_MAX, err.message);
    sample_directory();
}

/* Hostile replies, for the worker's decoder. */
static void test_hostile_replies(void)
{
    unsigned char a[PROTO_MSG_MAX];
    proto_reply rep, back;
    proto_error err = {{0}};
    size_t alen, n;
    int refused = 1, i;
    tb b;

    sample_directory();
    for (i = 0; sample_reply(i, &rep); i++) {
        proto_reply_encode(&rep, a, sizeof(a), &alen, &err);
        for (n = PROTO_HEADER_LEN; n < alen; n++) {
            memcpy(b.buf, a, n);
            b.len = n;
            tb_seal(&b);
            if (proto_reply_decode(b.buf, b.len, &back, &err) == 0) {
                proto_reply_clear(&back);
                refused = 0;
            }
        }
    }
    tap_ok(refused, "every truncation of every sample reply is refused");

    /* a KEYS reply that claims 300 keys on 20 bytes */
    tb_reply_head(&b, PROTO_REPLY | PROTO_KEYS, PROTO_OK, "");
    tb_uint(&b, 300, 4);
    tb_uint(&b, 300, 4);
    tb_uint(&b, 300, 2);
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "a page of %d keys is refused (%s)", 300, err.message);
    tb_reply_head(&b, PROTO_REPLY | PROTO_KEYS, PROTO_OK, "");
    tb_uint(&b, 200, 4);
    tb_uint(&b, 200, 4);
    tb_uint(&b, 200, 2);
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "200 keys announced on no bytes are refused before allocating");
    /* a status past the list, an error reply with status ok */
    tb_reply_head(&b, PROTO_REPLY | PROTO_SIGN, PROTO_STATUS_COUNT, "what");
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "an unknown status is refused");
    tb_reply_head(&b, PROTO_ERROR, PROTO_OK, "");
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "an error reply that says ok is refused");
    tb_reply_head(&b, PROTO_NOTICE, PROTO_OK, "");
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "a notice with an id is refused");
    tb_reply_head(&b, PROTO_REPLY | PROTO_SIGN, PROTO_FAILED,
                  "decryption failed");
    tb_bytes(&b, sig, 4);
    tb_seal(&b);
    tap_ok(proto_reply_decode(b.buf, b.len, &back, &err) != 0,
           "a failure that carries a result is refused");
}

/* The seeds of tests/fuzz/corpus/proto/, written by the test suite's own
 * Python encoder (tests/integration/keyproto.py): what it writes, the C
 * decoders take and encode back byte for byte; what it writes wrong on
 * purpose, they refuse. */
static void test_python_seeds(void)
{
    static const struct {
        const char *file;
        int reply, ok;
    } seeds[] = {
        {"keys.msg", 0, 1},          {"state.msg", 0, 1},
        {"sign-pkcs1.msg", 0, 1},    {"sign-digestinfo.msg", 0, 1},
        {"sign-pss.msg", 0, 1},      {"sign-ecdsa.msg", 0, 1},
        {"decrypt-pkcs1.msg", 0, 1}, {"decrypt-oaep.msg", 0, 1},
        {"derive.msg", 0, 1},        {"audit.msg", 0, 1},
        {"finish.msg", 0, 1},        {"reply-keys.msg", 1, 1},
        {"reply-state.msg", 1, 1},   {"reply-sign.msg", 1, 1},
        {"reply-busy.msg", 1, 1},    {"reply-error.msg", 1, 1},
        {"notice.msg", 1, 1},        {"bad-version.msg", 0, 0},
        {"bad-length.msg", 0, 0},    {"bad-utf8.msg", 0, 0},
    };
    static unsigned char in[PROTO_MSG_MAX + 1], out[PROTO_MSG_MAX];
    char path[256];
    proto_request req;
    proto_reply rep;
    proto_error err = {{0}};
    size_t i, n, len;
    FILE *f;
    int ok;

    for (i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        snprintf(path, sizeof(path), "fuzz/corpus/proto/%s", seeds[i].file);
        f = fopen(path, "rb");
        n = f != NULL ? fread(in, 1, sizeof(in), f) : 0;
        if (f != NULL)
            fclose(f);
        if (seeds[i].reply) {
            ok = proto_reply_decode(in, n, &rep, &err) == 0 &&
                 proto_reply_encode(&rep, out, sizeof(out), &len, &err) == 0 &&
                 len == n && memcmp(in, out, n) == 0;
            if (ok)
                proto_reply_clear(&rep);
        } else {
            ok =
                proto_request_decode(in, n, &req, &err) == 0 &&
                proto_request_encode(&req, out, sizeof(out), &len, &err) == 0 &&
                len == n && memcmp(in, out, n) == 0;
        }
        tap_ok(n > 0 && ok == seeds[i].ok, "%s (Python's encoder) is %s%s%s",
               seeds[i].file, seeds[i].ok ? "taken and re-encoded" : "refused",
               ok ? "" : ": ", ok ? "" : err.message);
    }
}

int main(void)
{
    memset(point, 0, sizeof(point));
    point[0] = 0x04;
    memset(ciphertext, 0x5a, sizeof(ciphertext));
    test_request_round_trips();
    test_reply_round_trips();
    test_truncations();
    test_trailing();
    test_header();
    test_oversized();
    test_claims();
    test_text();
    test_rules();
    test_encoder_refuses();
    test_hostile_replies();
    test_python_seeds();
    return tap_done();
}
