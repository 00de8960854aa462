/*
 * proto: the key protocol between a request worker and the key process.
 * The key process treats every message as hostile: each one is a single
 * SOCK_SEQPACKET datagram of at most PROTO_MSG_MAX bytes, a fixed header
 * {u16 version, u16 type, u32 id, u32 length} and typed fields (big-endian
 * integers; byte strings and text with a u32 length prefix), every length
 * checked against the bytes left and against the field's own maximum,
 * text UTF-8 without NUL, no byte left over. Encoders enforce the same
 * rules as decoders, so whatever is accepted encodes back to the same
 * bytes (tests/fuzz/fuzz_proto.c holds both to that).
 *
 * Imports nothing of ours and no library: digests and paddings are named
 * by proto's own numbers, mapped to OpenSSL's by the two ends.
 */
#ifndef SMIMED_PROTO_H
#define SMIMED_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION 1
#define PROTO_HEADER_LEN 12
/* The whole datagram, header included. A key list longer than this is
 * sent in pages (PROTO_KEYS with start). */
#define PROTO_MSG_MAX 65536

/* Field maxima, in bytes. */
#define PROTO_NAME_MAX 127      /* a key name (token/'s TOKEN_KEY_NAME_MAX) */
#define PROTO_TOKEN_MAX 127     /* a token name */
#define PROTO_ALGORITHM_MAX 15  /* "rsa-2048", "ec-p256" */
#define PROTO_REQUEST_ID_MAX 64 /* the audit record's request id */
#define PROTO_CLIENT_MAX 63
#define PROTO_REMOTE_MAX 64
#define PROTO_SHA256_HEX 64
#define PROTO_OPERATION_MAX 255 /* "sign", or the path of a refusal */
#define PROTO_CODE_MAX 63       /* an API error code, snake_case */
#define PROTO_REASON_MAX 255
#define PROTO_MESSAGE_MAX 511
#define PROTO_DIGEST_MAX 128 /* a digest, or a DigestInfo (SHA-512: 83) */
#define PROTO_RSA_MAX 1024   /* RSA up to 8192 bits: signature, ciphertext */
#define PROTO_LABEL_MAX 256  /* RSA-OAEP label */
#define PROTO_POINT_MAX 133  /* uncompressed P-521 point */
#define PROTO_SECRET_MAX 66  /* ECDH Z of P-521 */
#define PROTO_CERT_MAX 16384 /* one DER certificate */
#define PROTO_CHAIN_MAX 16   /* certificates in one key's chain */
#define PROTO_PAGE_KEYS_MAX 256
#define PROTO_PAGE_TOKENS_MAX 64

typedef enum {
    PROTO_KEYS = 1, /* requests, worker to key process */
    PROTO_SIGN = 2,
    PROTO_DECRYPT = 3,
    PROTO_DERIVE = 4,
    PROTO_STATE = 5,
    PROTO_AUDIT = 6,
    PROTO_FINISH = 7,
    /* the reply to request type T is of type T | PROTO_REPLY */
    PROTO_REPLY = 0x80,
    /* the answer to a message whose type or version is not known */
    PROTO_ERROR = 0xfe,
    /* unsolicited, id 0: the key directory changed (a new epoch) */
    PROTO_NOTICE = 0xff,
} proto_type;

typedef enum {
    PROTO_OK = 0,
    PROTO_BUSY,        /* no token session came free in time */
    PROTO_UNAVAILABLE, /* token or key down (or the key process gone) */
    PROTO_NOT_FOUND,   /* no such key */
    PROTO_UNSUPPORTED, /* the key cannot do this at all */
    PROTO_FAILED,      /* the operation failed on its input */
    PROTO_AUDIT_FAILED,
    PROTO_BAD_REQUEST, /* the message was refused */
    PROTO_INTERNAL,
    PROTO_STATUS_COUNT
} proto_status;

/* "ok", "busy", ...: for logs and messages. */
const char *proto_status_name(proto_status status);

typedef enum {
    PROTO_MD_NONE = 0, /* RSA PKCS#1 v1.5 only: the input is a DigestInfo */
    PROTO_MD_SHA1,
    PROTO_MD_SHA224,
    PROTO_MD_SHA256,
    PROTO_MD_SHA384,
    PROTO_MD_SHA512,
    PROTO_MD_COUNT
} proto_md;

/* The digest's length in bytes; 0 for PROTO_MD_NONE or an unknown one. */
size_t proto_md_size(unsigned md);

typedef enum {
    PROTO_SIGN_RSA_PKCS1 = 1,
    PROTO_SIGN_RSA_PSS = 2,
    PROTO_SIGN_ECDSA = 3,
} proto_sign_mech;

typedef enum {
    PROTO_PAD_PKCS1 = 1,
    PROTO_PAD_OAEP = 2,
} proto_padding;

/* The same states as token/'s token_state, numbered for the wire. */
typedef enum {
    PROTO_TOKEN_READY = 0,
    PROTO_TOKEN_DOWN,
    PROTO_TOKEN_BUSY,
    PROTO_TOKEN_PIN_REJECTED,
    PROTO_TOKEN_RECOVERING,
    PROTO_TOKEN_STATE_COUNT
} proto_token_state;

/* "ready", "down", ... as token_state_name; "down" for a number out of
 * range. */
const char *proto_token_state_name(unsigned state);

/* What a worker says about the request a key operation serves; the key
 * process records it as asserted by the worker. Strings are
 * NUL-terminated; "" is absent (client, remote, content_sha256). */
typedef struct proto_claims {
    char request_id[PROTO_REQUEST_ID_MAX + 1]; /* required: [0-9A-Za-z._:-] */
    char client[PROTO_CLIENT_MAX + 1];
    char remote[PROTO_REMOTE_MAX + 1];
    char content_sha256[PROTO_SHA256_HEX + 1]; /* lowercase hex or "" */
} proto_claims;

/* PROTO_KEYS, PROTO_STATE: one page, from entry start on. */
typedef struct proto_page_req {
    uint32_t start;
} proto_page_req;

/* Byte strings point into the decoded buffer. */
typedef struct proto_sign_req {
    char key[PROTO_NAME_MAX + 1];
    uint8_t mech;                /* proto_sign_mech */
    uint8_t md;                  /* proto_md: NONE only with RSA_PKCS1 */
    uint8_t mgf1_md;             /* PSS only, else PROTO_MD_NONE */
    uint32_t salt_len;           /* PSS only (bytes), else 0 */
    const unsigned char *digest; /* md's size, or a DigestInfo */
    size_t digest_len;
    proto_claims claims;
} proto_sign_req;

typedef struct proto_decrypt_req {
    char key[PROTO_NAME_MAX + 1];
    uint8_t padding;            /* proto_padding */
    uint8_t oaep_md;            /* OAEP only, else PROTO_MD_NONE */
    uint8_t mgf1_md;            /* OAEP only, else PROTO_MD_NONE */
    const unsigned char *label; /* OAEP only, else empty */
    size_t label_len;
    const unsigned char *ciphertext;
    size_t ciphertext_len;
    proto_claims claims;
} proto_decrypt_req;

typedef struct proto_derive_req {
    char key[PROTO_NAME_MAX + 1];
    const unsigned char *point; /* 0x04 || X || Y: 65, 97 or 133 bytes */
    size_t point_len;
    proto_claims claims;
} proto_derive_req;

/* A record without a key operation (a 401 or 403). */
typedef struct proto_audit_req {
    proto_claims claims;
    char operation[PROTO_OPERATION_MAX + 1]; /* required */
    char key[PROTO_NAME_MAX + 1];
    uint16_t result; /* HTTP status, 100 to 599 */
    char error[PROTO_CODE_MAX + 1];
} proto_audit_req;

/* The end of a request whose key operations were recorded. */
typedef struct proto_finish_req {
    char request_id[PROTO_REQUEST_ID_MAX + 1];
    uint16_t result; /* HTTP status, 100 to 599 */
    char error[PROTO_CODE_MAX + 1];
    uint32_t latency_us;
} proto_finish_req;

typedef struct proto_request {
    uint16_t type; /* PROTO_KEYS .. PROTO_FINISH */
    uint32_t id;   /* chosen by the worker, echoed in the reply; not 0 */
    union {
        proto_page_req page; /* KEYS, STATE */
        proto_sign_req sign;
        proto_decrypt_req decrypt;
        proto_derive_req derive;
        proto_audit_req audit;
        proto_finish_req finish;
    } u;
} proto_request;

/* proto_key_entry.flags */
#define PROTO_KEY_SIGN_SUPPORTED 0x01u
#define PROTO_KEY_DECRYPT_SUPPORTED 0x02u
#define PROTO_KEY_SIGN_USABLE 0x04u
#define PROTO_KEY_DECRYPT_USABLE 0x08u
#define PROTO_KEY_FLAGS 0x0fu

/* One served key. cert and chain point into the decoded buffer; no
 * certificate: cert_len 0. A reason is "" exactly when usable. */
typedef struct proto_key_entry {
    char name[PROTO_NAME_MAX + 1];
    char token[PROTO_TOKEN_MAX + 1];
    char algorithm[PROTO_ALGORITHM_MAX + 1]; /* [a-z0-9-], may be "" */
    uint8_t flags;
    char reason_sign[PROTO_REASON_MAX + 1];
    char reason_decrypt[PROTO_REASON_MAX + 1];
    const unsigned char *cert;
    size_t cert_len;
    size_t nchain;
    const unsigned char *chain[PROTO_CHAIN_MAX];
    size_t chain_len[PROTO_CHAIN_MAX];
} proto_key_entry;

/* proto_token_entry.flags */
#define PROTO_TOKEN_OPTIONAL 0x01u
#define PROTO_TOKEN_DISCOVERY 0x02u
#define PROTO_TOKEN_FLAGS 0x03u

/* One token, in a STATE reply. reason is "" exactly when the state is
 * ready or busy. */
typedef struct proto_token_entry {
    char name[PROTO_TOKEN_MAX + 1];
    uint8_t state; /* proto_token_state */
    uint8_t flags;
    char reason[PROTO_REASON_MAX + 1];
    uint64_t since; /* Unix time of the last state change */
    uint64_t ops_sign, ops_decrypt, busy, unavailable, faults, retries,
        recoveries;
    uint32_t in_flight, waiting, max_sessions;
} proto_token_entry;

/* Every reply: status, retry_after (seconds, for busy and unavailable),
 * the directory's epoch (a new one means the worker's copy is stale), a
 * message (required unless ok, "" when ok) and, only when ok, the payload
 * of its type. Arrays are allocated by proto_reply_decode (free them with
 * proto_reply_clear) and borrowed by proto_reply_encode. */
typedef struct proto_reply {
    uint16_t type; /* request type | PROTO_REPLY, PROTO_ERROR, PROTO_NOTICE */
    uint32_t id;   /* the request's; 0 for PROTO_NOTICE */
    uint8_t status;
    uint32_t retry_after;
    uint64_t epoch;
    char message[PROTO_MESSAGE_MAX + 1];
    union {
        /* a page of the directory: entries start (the request's) to
         * next - 1 of total; next is total on the last page */
        struct {
            uint32_t total, next;
            size_t nkeys;
            proto_key_entry *keys;
        } keys;
        struct {
            uint32_t total, next;
            size_t ntokens;
            proto_token_entry *tokens;
        } state;
        /* SIGN: the signature; DECRYPT: the plaintext; DERIVE: Z */
        struct {
            const unsigned char *data;
            size_t len;
        } bytes;
    } u;
} proto_reply;

typedef struct proto_error {
    char message[160];
} proto_error;

/* The header alone, for an answer to a message refused later: 0 and
 * *type, *id when at least PROTO_HEADER_LEN bytes came, else -1. */
int proto_peek(const unsigned char *buf, size_t len, uint16_t *type,
               uint32_t *id);

/* Each returns 0, or -1 with err saying which field broke which rule.
 * Encoders write at most cap bytes (PROTO_MSG_MAX is always enough for a
 * request) and refuse what the decoder would. */
int proto_request_encode(const proto_request *req, unsigned char *buf,
                         size_t cap, size_t *len, proto_error *err);
int proto_request_decode(const unsigned char *buf, size_t len,
                         proto_request *req, proto_error *err);
int proto_reply_encode(const proto_reply *rep, unsigned char *buf, size_t cap,
                       size_t *len, proto_error *err);
/* rep's byte strings point into buf; the arrays are rep's own. */
int proto_reply_decode(const unsigned char *buf, size_t len, proto_reply *rep,
                       proto_error *err);
void proto_reply_clear(proto_reply *rep);

/* Bytes a KEYS reply spends on one entry, and on everything but its
 * entries: how the key process fills a page. */
size_t proto_key_entry_size(const proto_key_entry *key);
size_t proto_keys_reply_overhead(void);

/* 1 when s (NUL-terminated) may travel as a name: UTF-8, no control
 * characters, 1 to max bytes. What the fields of a request are checked
 * with, for callers that build one from outside input. */
int proto_name_is_valid(const char *s, size_t max);

#endif
