/*
 * The key protocol's decoders (proto/proto.c) on arbitrary bytes: the key
 * process's request decoder and the worker's reply decoder. Whatever
 * either accepts must encode back to exactly the same bytes (the protocol
 * has one encoding per message), and every string it hands out must be
 * valid UTF-8 within its maximum, every byte string inside the input.
 */
#include <stdint.h>
#include <string.h>

#include "proto/proto.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static unsigned char out[PROTO_MSG_MAX];

static int inside(const uint8_t *data, size_t size, const unsigned char *p,
                  size_t len)
{
    return len == 0 ||
           (p >= data && len <= size && (size_t)(p - data) <= size - len);
}

static void check_text(const char *s, size_t max)
{
    size_t n = strnlen(s, max + 1);

    FUZZ_CHECK(n <= max, "a string of %zu bytes (max %zu)", n, max);
    FUZZ_CHECK(test_utf8_valid((const unsigned char *)s, n), "bad UTF-8");
}

static void check_claims(const proto_claims *c)
{
    check_text(c->request_id, PROTO_REQUEST_ID_MAX);
    FUZZ_CHECK(c->request_id[0] != '\0', "an empty request id");
    check_text(c->client, PROTO_CLIENT_MAX);
    check_text(c->remote, PROTO_REMOTE_MAX);
    check_text(c->content_sha256, PROTO_SHA256_HEX);
}

static void check_request(const uint8_t *data, size_t size,
                          const proto_request *req)
{
    switch (req->type) {
    case PROTO_SIGN:
        check_text(req->u.sign.key, PROTO_NAME_MAX);
        check_claims(&req->u.sign.claims);
        FUZZ_CHECK(
            inside(data, size, req->u.sign.digest, req->u.sign.digest_len),
            "the digest points outside the input");
        FUZZ_CHECK(req->u.sign.md == PROTO_MD_NONE ||
                       req->u.sign.digest_len == proto_md_size(req->u.sign.md),
                   "a digest of the wrong length");
        break;
    case PROTO_DECRYPT:
        check_text(req->u.decrypt.key, PROTO_NAME_MAX);
        check_claims(&req->u.decrypt.claims);
        FUZZ_CHECK(inside(data, size, req->u.decrypt.ciphertext,
                          req->u.decrypt.ciphertext_len) &&
                       req->u.decrypt.ciphertext_len <= PROTO_RSA_MAX,
                   "the ciphertext");
        FUZZ_CHECK(
            inside(data, size, req->u.decrypt.label, req->u.decrypt.label_len),
            "the label");
        break;
    case PROTO_DERIVE:
        check_text(req->u.derive.key, PROTO_NAME_MAX);
        check_claims(&req->u.derive.claims);
        FUZZ_CHECK(
            inside(data, size, req->u.derive.point, req->u.derive.point_len) &&
                req->u.derive.point[0] == 0x04,
            "the point");
        break;
    case PROTO_AUDIT:
        check_claims(&req->u.audit.claims);
        check_text(req->u.audit.operation, PROTO_OPERATION_MAX);
        check_text(req->u.audit.key, PROTO_NAME_MAX);
        check_text(req->u.audit.error, PROTO_CODE_MAX);
        break;
    case PROTO_FINISH:
        check_text(req->u.finish.request_id, PROTO_REQUEST_ID_MAX);
        check_text(req->u.finish.error, PROTO_CODE_MAX);
        break;
    default:
        FUZZ_CHECK(req->type == PROTO_KEYS || req->type == PROTO_STATE,
                   "accepted type %u", req->type);
    }
}

static void check_reply(const uint8_t *data, size_t size,
                        const proto_reply *rep)
{
    size_t i, j;

    check_text(rep->message, PROTO_MESSAGE_MAX);
    if (rep->type == (PROTO_REPLY | PROTO_KEYS) && rep->status == PROTO_OK) {
        for (i = 0; i < rep->u.keys.nkeys; i++) {
            const proto_key_entry *k = &rep->u.keys.keys[i];

            check_text(k->name, PROTO_NAME_MAX);
            check_text(k->reason_sign, PROTO_REASON_MAX);
            FUZZ_CHECK(inside(data, size, k->cert, k->cert_len),
                       "a certificate outside the input");
            for (j = 0; j < k->nchain; j++)
                FUZZ_CHECK(inside(data, size, k->chain[j], k->chain_len[j]),
                           "a chain certificate outside the input");
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    proto_request req;
    proto_reply rep;
    proto_error err;
    size_t len;

    err.message[0] = '\0';
    if (proto_request_decode(data, size, &req, &err) == 0) {
        check_request(data, size, &req);
        FUZZ_CHECK(proto_request_encode(&req, out, sizeof(out), &len, &err) ==
                       0,
                   "an accepted request does not encode: %s", err.message);
        FUZZ_CHECK(len == size && memcmp(out, data, size) == 0,
                   "an accepted request encodes to other bytes");
    } else {
        FUZZ_CHECK(err.message[0] != '\0' &&
                       test_utf8_valid((const unsigned char *)err.message,
                                       strlen(err.message)),
                   "a refusal without a message");
    }
    if (proto_reply_decode(data, size, &rep, &err) == 0) {
        check_reply(data, size, &rep);
        FUZZ_CHECK(proto_reply_encode(&rep, out, sizeof(out), &len, &err) == 0,
                   "an accepted reply does not encode: %s", err.message);
        FUZZ_CHECK(len == size && memcmp(out, data, size) == 0,
                   "an accepted reply encodes to other bytes");
        proto_reply_clear(&rep);
    }
    return 0;
}
