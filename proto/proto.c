/*
 * The key protocol's encoders and decoders. Each message has one pair
 * (a put_ and a get_ function below) built from the same field helpers,
 * and each field is checked by one function that both sides call: a
 * writer refuses what a reader would, and a reader accepts only what a
 * writer can produce, so an accepted message has exactly one encoding.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"

/* ---- field rules ---- */

/* The kinds of text; every kind is UTF-8 without control characters. */
enum text_kind {
    TEXT_ANY,  /* names, reasons, messages */
    TEXT_ID,   /* request ids: [0-9A-Za-z._:-] */
    TEXT_HEX,  /* a SHA-256 in lowercase hex: exactly 64 or empty */
    TEXT_CODE, /* API error codes: [a-z0-9_] */
    TEXT_ALG,  /* algorithm names: [a-z0-9-] */
};

/* RFC 3629: no overlong forms, no surrogates, nothing past U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0, n, k;
    unsigned char lo, hi;

    while (i < len) {
        unsigned char c = s[i];

        lo = 0x80;
        hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            return 0;
        }
        if (len - i <= n)
            return 0;
        for (k = 1; k <= n; k++) {
            if (s[i + k] < (k == 1 ? lo : 0x80) ||
                s[i + k] > (k == 1 ? hi : 0xbf))
                return 0;
        }
        i += n + 1;
    }
    return 1;
}

static int char_fits(enum text_kind kind, unsigned char c)
{
    switch (kind) {
    case TEXT_ID:
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
               (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == ':' ||
               c == '-';
    case TEXT_HEX:
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    case TEXT_CODE:
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
    case TEXT_ALG:
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
    default:
        /* NUL and the other C0 controls, and DEL: text ends up in log
         * lines and response headers */
        return c >= 0x20 && c != 0x7f;
    }
}

static int text_valid(enum text_kind kind, const unsigned char *s, size_t len,
                      size_t min, size_t max)
{
    size_t i;

    if (len < min || len > max)
        return 0;
    if (kind == TEXT_HEX && len != 0 && len != PROTO_SHA256_HEX)
        return 0;
    for (i = 0; i < len; i++)
        if (!char_fits(kind, s[i]))
            return 0;
    return utf8_valid(s, len);
}

int proto_name_is_valid(const char *s, size_t max)
{
    return s != NULL &&
           text_valid(TEXT_ANY, (const unsigned char *)s, strlen(s), 1, max);
}

const char *proto_status_name(proto_status status)
{
    static const char *const names[PROTO_STATUS_COUNT] = {
        "ok",     "busy",         "unavailable", "not_found", "unsupported",
        "failed", "audit_failed", "bad_request", "internal",
    };

    return (unsigned)status < PROTO_STATUS_COUNT ? names[status] : "unknown";
}

const char *proto_token_state_name(unsigned state)
{
    static const char *const names[PROTO_TOKEN_STATE_COUNT] = {
        "ready", "down", "busy", "pin_rejected", "recovering",
    };

    return state < PROTO_TOKEN_STATE_COUNT ? names[state] : "down";
}

size_t proto_md_size(unsigned md)
{
    static const size_t sizes[PROTO_MD_COUNT] = {0, 20, 28, 32, 48, 64};

    return md < PROTO_MD_COUNT ? sizes[md] : 0;
}

__attribute__((format(printf, 2, 3))) static void fail(proto_error *err,
                                                       const char *fmt, ...)
{
    va_list ap;

    if (err == NULL)
        return;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

/* ---- writer ---- */

typedef struct writer {
    unsigned char *buf;
    size_t cap, len;
    int bad; /* a field broke its rule, or the buffer is full */
    proto_error *err;
} writer;

static void w_raw(writer *w, const void *p, size_t n)
{
    if (w->bad)
        return;
    if (n > w->cap - w->len) {
        w->bad = 1;
        fail(w->err, "message too long at %s", "the end");
        return;
    }
    if (n > 0)
        memcpy(w->buf + w->len, p, n);
    w->len += n;
}

static void w_uint(writer *w, uint64_t v, size_t n)
{
    unsigned char b[8];
    size_t i;

    for (i = 0; i < n; i++)
        b[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
    w_raw(w, b, n);
}

static void w_u8(writer *w, unsigned v)
{
    w_uint(w, v, 1);
}

static void w_u16(writer *w, unsigned v)
{
    w_uint(w, v, 2);
}

static void w_u32(writer *w, uint32_t v)
{
    w_uint(w, v, 4);
}

static void w_u64(writer *w, uint64_t v)
{
    w_uint(w, v, 8);
}

static void w_refuse(writer *w, const char *field)
{
    if (!w->bad)
        fail(w->err, "%s is out of range", field);
    w->bad = 1;
}

static void w_bytes(writer *w, const char *field, const unsigned char *p,
                    size_t n, size_t min, size_t max)
{
    if (n < min || n > max || (n > 0 && p == NULL)) {
        w_refuse(w, field);
        return;
    }
    w_u32(w, (uint32_t)n);
    w_raw(w, p, n);
}

static void w_text(writer *w, const char *field, const char *s,
                   enum text_kind kind, size_t min, size_t max)
{
    size_t n = strnlen(s, max + 1);

    if (!text_valid(kind, (const unsigned char *)s, n, min, max)) {
        w_refuse(w, field);
        return;
    }
    w_u32(w, (uint32_t)n);
    w_raw(w, s, n);
}

/* ---- reader ---- */

typedef struct reader {
    const unsigned char *p;
    size_t left;
    int bad;
    proto_error *err;
} reader;

__attribute__((format(printf, 2, 3))) static int r_refuse(reader *r,
                                                          const char *fmt, ...)
{
    va_list ap;

    if (!r->bad && r->err != NULL) {
        va_start(ap, fmt);
        vsnprintf(r->err->message, sizeof(r->err->message), fmt, ap);
        va_end(ap);
    }
    r->bad = 1;
    return -1;
}

static uint64_t r_uint(reader *r, const char *field, size_t n)
{
    uint64_t v = 0;
    size_t i;

    if (r->bad)
        return 0;
    if (r->left < n) {
        r_refuse(r, "message ends inside %s", field);
        return 0;
    }
    for (i = 0; i < n; i++)
        v = (v << 8) | r->p[i];
    r->p += n;
    r->left -= n;
    return v;
}

static unsigned r_u8(reader *r, const char *field)
{
    return (unsigned)r_uint(r, field, 1);
}

static unsigned r_u16(reader *r, const char *field)
{
    return (unsigned)r_uint(r, field, 2);
}

static uint32_t r_u32(reader *r, const char *field)
{
    return (uint32_t)r_uint(r, field, 4);
}

static uint64_t r_u64(reader *r, const char *field)
{
    return r_uint(r, field, 8);
}

/* A length-prefixed byte string, checked against max before the bytes
 * left, so an oversized length is named as such. */
static const unsigned char *r_bytes(reader *r, const char *field, size_t *len,
                                    size_t min, size_t max)
{
    const unsigned char *p;
    uint32_t n = r_u32(r, field);

    *len = 0;
    if (r->bad)
        return NULL;
    if (n < min || n > max) {
        r_refuse(r, "%s has a length out of range", field);
        return NULL;
    }
    if (n > r->left) {
        r_refuse(r, "message ends inside %s", field);
        return NULL;
    }
    p = r->p;
    r->p += n;
    r->left -= n;
    *len = n;
    return p;
}

/* Text into out (max + 1 bytes), NUL-terminated. */
static void r_text(reader *r, const char *field, char *out, enum text_kind kind,
                   size_t min, size_t max)
{
    size_t n;
    const unsigned char *p = r_bytes(r, field, &n, min, max);

    out[0] = '\0';
    if (p == NULL)
        return;
    if (!text_valid(kind, p, n, min, max)) {
        r_refuse(r, "%s is not valid text", field);
        return;
    }
    memcpy(out, p, n);
    out[n] = '\0';
}

/* ---- the header ---- */

int proto_peek(const unsigned char *buf, size_t len, uint16_t *type,
               uint32_t *id)
{
    reader r = {buf, len, 0, NULL};

    if (len < PROTO_HEADER_LEN)
        return -1;
    r_u16(&r, "version");
    *type = (uint16_t)r_u16(&r, "type");
    *id = r_u32(&r, "id");
    return 0;
}

static void put_header(writer *w, unsigned type, uint32_t id)
{
    w_u16(w, PROTO_VERSION);
    w_u16(w, type);
    w_u32(w, id);
    w_u32(w, 0); /* the length, once known */
}

static int finish_message(writer *w, size_t *len)
{
    size_t body = w->len - PROTO_HEADER_LEN;

    if (w->bad)
        return -1;
    w->buf[8] = (unsigned char)(body >> 24);
    w->buf[9] = (unsigned char)(body >> 16);
    w->buf[10] = (unsigned char)(body >> 8);
    w->buf[11] = (unsigned char)body;
    *len = w->len;
    return 0;
}

static int start_writer(writer *w, unsigned char *buf, size_t cap,
                        proto_error *err)
{
    w->buf = buf;
    w->cap = cap < PROTO_MSG_MAX ? cap : PROTO_MSG_MAX;
    w->len = 0;
    w->bad = 0;
    w->err = err;
    if (w->cap < PROTO_HEADER_LEN) {
        fail(err, "%s is too small for a header", "the buffer");
        return -1;
    }
    return 0;
}

/* Reads the header into *type and *id and leaves r on the body. */
static int get_header(reader *r, const unsigned char *buf, size_t len,
                      uint16_t *type, uint32_t *id)
{
    uint32_t body;

    r->p = buf;
    r->left = len;
    if (len > PROTO_MSG_MAX)
        return r_refuse(r, "%s is longer than the protocol allows",
                        "the message");
    if (len < PROTO_HEADER_LEN)
        return r_refuse(r, "%s is shorter than a header", "the message");
    if (r_u16(r, "version") != PROTO_VERSION)
        return r_refuse(r, "%s is not the protocol's", "the version");
    *type = (uint16_t)r_u16(r, "type");
    *id = r_u32(r, "id");
    body = r_u32(r, "length");
    if (body != r->left)
        return r_refuse(r, "%s does not match the message", "the length");
    return 0;
}

static int end_reader(reader *r)
{
    if (!r->bad && r->left != 0)
        r_refuse(r, "%s follow the last field", "bytes");
    return r->bad ? -1 : 0;
}

/* ---- shared fields ---- */

static void put_claims(writer *w, const proto_claims *c)
{
    w_text(w, "request_id", c->request_id, TEXT_ID, 1, PROTO_REQUEST_ID_MAX);
    w_text(w, "client", c->client, TEXT_ANY, 0, PROTO_CLIENT_MAX);
    w_text(w, "remote", c->remote, TEXT_ANY, 0, PROTO_REMOTE_MAX);
    w_text(w, "content_sha256", c->content_sha256, TEXT_HEX, 0,
           PROTO_SHA256_HEX);
}

static void get_claims(reader *r, proto_claims *c)
{
    r_text(r, "request_id", c->request_id, TEXT_ID, 1, PROTO_REQUEST_ID_MAX);
    r_text(r, "client", c->client, TEXT_ANY, 0, PROTO_CLIENT_MAX);
    r_text(r, "remote", c->remote, TEXT_ANY, 0, PROTO_REMOTE_MAX);
    r_text(r, "content_sha256", c->content_sha256, TEXT_HEX, 0,
           PROTO_SHA256_HEX);
}

static int md_valid(unsigned md)
{
    return md > PROTO_MD_NONE && md < PROTO_MD_COUNT;
}

/* ---- requests: one put_ and one get_ per message ---- */

static void put_page(writer *w, const proto_page_req *m)
{
    w_u32(w, m->start);
}

static void get_page(reader *r, proto_page_req *m)
{
    m->start = r_u32(r, "start");
}

/* The rules of a SIGN's mechanism fields; NULL when they hold, else the
 * field that breaks them. */
static const char *sign_rule(const proto_sign_req *m)
{
    switch (m->mech) {
    case PROTO_SIGN_RSA_PKCS1:
        if (m->md != PROTO_MD_NONE && !md_valid(m->md))
            return "md";
        if (m->mgf1_md != PROTO_MD_NONE)
            return "mgf1_md";
        if (m->salt_len != 0)
            return "salt_len";
        break;
    case PROTO_SIGN_RSA_PSS:
        if (!md_valid(m->md))
            return "md";
        if (!md_valid(m->mgf1_md))
            return "mgf1_md";
        if (m->salt_len > PROTO_RSA_MAX)
            return "salt_len";
        break;
    case PROTO_SIGN_ECDSA:
        if (!md_valid(m->md))
            return "md";
        if (m->mgf1_md != PROTO_MD_NONE)
            return "mgf1_md";
        if (m->salt_len != 0)
            return "salt_len";
        break;
    default:
        return "mech";
    }
    if (m->md != PROTO_MD_NONE && m->digest_len != proto_md_size(m->md))
        return "digest";
    return NULL;
}

static void put_sign(writer *w, const proto_sign_req *m)
{
    const char *broken = sign_rule(m);

    if (broken != NULL)
        w_refuse(w, broken);
    w_text(w, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    w_u8(w, m->mech);
    w_u8(w, m->md);
    w_u8(w, m->mgf1_md);
    w_u32(w, m->salt_len);
    w_bytes(w, "digest", m->digest, m->digest_len, 1, PROTO_DIGEST_MAX);
    put_claims(w, &m->claims);
}

static void get_sign(reader *r, proto_sign_req *m)
{
    const char *broken;

    r_text(r, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    m->mech = (uint8_t)r_u8(r, "mech");
    m->md = (uint8_t)r_u8(r, "md");
    m->mgf1_md = (uint8_t)r_u8(r, "mgf1_md");
    m->salt_len = r_u32(r, "salt_len");
    m->digest = r_bytes(r, "digest", &m->digest_len, 1, PROTO_DIGEST_MAX);
    get_claims(r, &m->claims);
    if (!r->bad && (broken = sign_rule(m)) != NULL)
        r_refuse(r, "%s does not fit the mechanism", broken);
}

static const char *decrypt_rule(const proto_decrypt_req *m)
{
    switch (m->padding) {
    case PROTO_PAD_PKCS1:
        if (m->oaep_md != PROTO_MD_NONE)
            return "oaep_md";
        if (m->mgf1_md != PROTO_MD_NONE)
            return "mgf1_md";
        if (m->label_len != 0)
            return "label";
        return NULL;
    case PROTO_PAD_OAEP:
        if (!md_valid(m->oaep_md))
            return "oaep_md";
        if (!md_valid(m->mgf1_md))
            return "mgf1_md";
        return NULL;
    default:
        return "padding";
    }
}

static void put_decrypt(writer *w, const proto_decrypt_req *m)
{
    const char *broken = decrypt_rule(m);

    if (broken != NULL)
        w_refuse(w, broken);
    w_text(w, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    w_u8(w, m->padding);
    w_u8(w, m->oaep_md);
    w_u8(w, m->mgf1_md);
    w_bytes(w, "label", m->label, m->label_len, 0, PROTO_LABEL_MAX);
    w_bytes(w, "ciphertext", m->ciphertext, m->ciphertext_len, 1,
            PROTO_RSA_MAX);
    put_claims(w, &m->claims);
}

static void get_decrypt(reader *r, proto_decrypt_req *m)
{
    const char *broken;

    r_text(r, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    m->padding = (uint8_t)r_u8(r, "padding");
    m->oaep_md = (uint8_t)r_u8(r, "oaep_md");
    m->mgf1_md = (uint8_t)r_u8(r, "mgf1_md");
    m->label = r_bytes(r, "label", &m->label_len, 0, PROTO_LABEL_MAX);
    m->ciphertext =
        r_bytes(r, "ciphertext", &m->ciphertext_len, 1, PROTO_RSA_MAX);
    get_claims(r, &m->claims);
    if (!r->bad && (broken = decrypt_rule(m)) != NULL)
        r_refuse(r, "%s does not fit the padding", broken);
}

/* An uncompressed point of P-256, P-384 or P-521. */
static int point_valid(const unsigned char *p, size_t n)
{
    return (n == 65 || n == 97 || n == 133) && p != NULL && p[0] == 0x04;
}

static void put_derive(writer *w, const proto_derive_req *m)
{
    if (!point_valid(m->point, m->point_len))
        w_refuse(w, "point");
    w_text(w, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    w_bytes(w, "point", m->point, m->point_len, 1, PROTO_POINT_MAX);
    put_claims(w, &m->claims);
}

static void get_derive(reader *r, proto_derive_req *m)
{
    r_text(r, "key", m->key, TEXT_ANY, 1, PROTO_NAME_MAX);
    m->point = r_bytes(r, "point", &m->point_len, 1, PROTO_POINT_MAX);
    get_claims(r, &m->claims);
    if (!r->bad && !point_valid(m->point, m->point_len))
        r_refuse(r, "%s is not an uncompressed P-256/384/521 point", "point");
}

static int status_valid(unsigned result)
{
    return result >= 100 && result <= 599;
}

/* How a request ended: its HTTP status and API error code (AUDIT,
 * FINISH). */
static void put_outcome(writer *w, unsigned result, const char *error)
{
    if (!status_valid(result))
        w_refuse(w, "result");
    w_u16(w, result);
    w_text(w, "error", error, TEXT_CODE, 0, PROTO_CODE_MAX);
}

static void get_outcome(reader *r, uint16_t *result, char *error)
{
    *result = (uint16_t)r_u16(r, "result");
    if (!r->bad && !status_valid(*result))
        r_refuse(r, "%s is not an HTTP status", "result");
    r_text(r, "error", error, TEXT_CODE, 0, PROTO_CODE_MAX);
}

static void put_audit(writer *w, const proto_audit_req *m)
{
    put_claims(w, &m->claims);
    w_text(w, "operation", m->operation, TEXT_ANY, 1, PROTO_OPERATION_MAX);
    w_text(w, "key", m->key, TEXT_ANY, 0, PROTO_NAME_MAX);
    put_outcome(w, m->result, m->error);
}

static void get_audit(reader *r, proto_audit_req *m)
{
    get_claims(r, &m->claims);
    r_text(r, "operation", m->operation, TEXT_ANY, 1, PROTO_OPERATION_MAX);
    r_text(r, "key", m->key, TEXT_ANY, 0, PROTO_NAME_MAX);
    get_outcome(r, &m->result, m->error);
}

static void put_finish(writer *w, const proto_finish_req *m)
{
    w_text(w, "request_id", m->request_id, TEXT_ID, 1, PROTO_REQUEST_ID_MAX);
    put_outcome(w, m->result, m->error);
    w_u32(w, m->latency_us);
}

static void get_finish(reader *r, proto_finish_req *m)
{
    r_text(r, "request_id", m->request_id, TEXT_ID, 1, PROTO_REQUEST_ID_MAX);
    get_outcome(r, &m->result, m->error);
    m->latency_us = r_u32(r, "latency_us");
}

int proto_request_encode(const proto_request *req, unsigned char *buf,
                         size_t cap, size_t *len, proto_error *err)
{
    writer w;

    if (start_writer(&w, buf, cap, err) != 0)
        return -1;
    if (req->id == 0) {
        fail(err, "%s must not be 0", "the id");
        return -1;
    }
    put_header(&w, req->type, req->id);
    switch (req->type) {
    case PROTO_KEYS:
    case PROTO_STATE:
        put_page(&w, &req->u.page);
        break;
    case PROTO_SIGN:
        put_sign(&w, &req->u.sign);
        break;
    case PROTO_DECRYPT:
        put_decrypt(&w, &req->u.decrypt);
        break;
    case PROTO_DERIVE:
        put_derive(&w, &req->u.derive);
        break;
    case PROTO_AUDIT:
        put_audit(&w, &req->u.audit);
        break;
    case PROTO_FINISH:
        put_finish(&w, &req->u.finish);
        break;
    default:
        fail(err, "%s is not a request", "the type");
        return -1;
    }
    return finish_message(&w, len);
}

int proto_request_decode(const unsigned char *buf, size_t len,
                         proto_request *req, proto_error *err)
{
    reader r = {NULL, 0, 0, err};

    memset(req, 0, sizeof(*req));
    if (get_header(&r, buf, len, &req->type, &req->id) != 0)
        return -1;
    if (req->id == 0)
        return r_refuse(&r, "%s must not be 0", "the id");
    switch (req->type) {
    case PROTO_KEYS:
    case PROTO_STATE:
        get_page(&r, &req->u.page);
        break;
    case PROTO_SIGN:
        get_sign(&r, &req->u.sign);
        break;
    case PROTO_DECRYPT:
        get_decrypt(&r, &req->u.decrypt);
        break;
    case PROTO_DERIVE:
        get_derive(&r, &req->u.derive);
        break;
    case PROTO_AUDIT:
        get_audit(&r, &req->u.audit);
        break;
    case PROTO_FINISH:
        get_finish(&r, &req->u.finish);
        break;
    default:
        return r_refuse(&r, "%s is not a request", "the type");
    }
    return end_reader(&r);
}

/* ---- replies ---- */

/* A reason is there exactly when the thing it explains is not so. */
static int reason_fits(const char *reason, int explained)
{
    return (reason[0] != '\0') == explained;
}

static int token_state_up(unsigned state)
{
    return state == PROTO_TOKEN_READY || state == PROTO_TOKEN_BUSY;
}

/* A u8 of flags with no bits outside known. */
static void w_flags(writer *w, const char *field, unsigned flags,
                    unsigned known)
{
    if (flags & ~known)
        w_refuse(w, field);
    w_u8(w, flags);
}

static uint8_t r_flags(reader *r, const char *field, unsigned known)
{
    uint8_t flags = (uint8_t)r_u8(r, field);

    if (!r->bad && (flags & ~known))
        r_refuse(r, "%s has unknown bits", field);
    return flags;
}

/* A reason, there exactly when explained (reason_fits); on the way in,
 * explained follows from what, a field read before. */
static void w_reason(writer *w, const char *field, const char *reason,
                     int explained)
{
    if (!reason_fits(reason, explained))
        w_refuse(w, field);
    w_text(w, field, reason, TEXT_ANY, 0, PROTO_REASON_MAX);
}

static void r_reason(reader *r, const char *field, char *reason, int explained,
                     const char *what)
{
    r_text(r, field, reason, TEXT_ANY, 0, PROTO_REASON_MAX);
    if (!r->bad && !reason_fits(reason, explained))
        r_refuse(r, "%s does not fit %s", field, what);
}

static void put_token(writer *w, const proto_token_entry *t)
{
    w_text(w, "token.name", t->name, TEXT_ANY, 1, PROTO_TOKEN_MAX);
    if (t->state >= PROTO_TOKEN_STATE_COUNT)
        w_refuse(w, "token.state");
    w_u8(w, t->state);
    w_flags(w, "token.flags", t->flags, PROTO_TOKEN_FLAGS);
    w_reason(w, "token.reason", t->reason, !token_state_up(t->state));
    w_u64(w, t->since);
    w_u64(w, t->ops_sign);
    w_u64(w, t->ops_decrypt);
    w_u64(w, t->busy);
    w_u64(w, t->unavailable);
    w_u64(w, t->faults);
    w_u64(w, t->retries);
    w_u64(w, t->recoveries);
    w_u32(w, t->in_flight);
    w_u32(w, t->waiting);
    w_u32(w, t->max_sessions);
}

static void get_token(reader *r, proto_token_entry *t)
{
    r_text(r, "token.name", t->name, TEXT_ANY, 1, PROTO_TOKEN_MAX);
    t->state = (uint8_t)r_u8(r, "token.state");
    if (!r->bad && t->state >= PROTO_TOKEN_STATE_COUNT)
        r_refuse(r, "%s is not a token state", "token.state");
    t->flags = r_flags(r, "token.flags", PROTO_TOKEN_FLAGS);
    r_reason(r, "token.reason", t->reason, !token_state_up(t->state),
             "the state");
    t->since = r_u64(r, "token.since");
    t->ops_sign = r_u64(r, "token.ops_sign");
    t->ops_decrypt = r_u64(r, "token.ops_decrypt");
    t->busy = r_u64(r, "token.busy");
    t->unavailable = r_u64(r, "token.unavailable");
    t->faults = r_u64(r, "token.faults");
    t->retries = r_u64(r, "token.retries");
    t->recoveries = r_u64(r, "token.recoveries");
    t->in_flight = r_u32(r, "token.in_flight");
    t->waiting = r_u32(r, "token.waiting");
    t->max_sessions = r_u32(r, "token.max_sessions");
}

static void put_key(writer *w, const proto_key_entry *k)
{
    size_t i;

    w_text(w, "key.name", k->name, TEXT_ANY, 1, PROTO_NAME_MAX);
    w_text(w, "key.token", k->token, TEXT_ANY, 1, PROTO_TOKEN_MAX);
    w_text(w, "key.algorithm", k->algorithm, TEXT_ALG, 0, PROTO_ALGORITHM_MAX);
    w_flags(w, "key.flags", k->flags, PROTO_KEY_FLAGS);
    w_reason(w, "key.reason_sign", k->reason_sign,
             !(k->flags & PROTO_KEY_SIGN_USABLE));
    w_reason(w, "key.reason_decrypt", k->reason_decrypt,
             !(k->flags & PROTO_KEY_DECRYPT_USABLE));
    w_bytes(w, "key.cert", k->cert, k->cert_len, 0, PROTO_CERT_MAX);
    if (k->nchain > PROTO_CHAIN_MAX)
        w_refuse(w, "key.chain");
    w_u8(w, (unsigned)k->nchain);
    for (i = 0; i < k->nchain && i < PROTO_CHAIN_MAX; i++)
        w_bytes(w, "key.chain", k->chain[i], k->chain_len[i], 1,
                PROTO_CERT_MAX);
}

static void get_key(reader *r, proto_key_entry *k)
{
    size_t i;

    r_text(r, "key.name", k->name, TEXT_ANY, 1, PROTO_NAME_MAX);
    r_text(r, "key.token", k->token, TEXT_ANY, 1, PROTO_TOKEN_MAX);
    r_text(r, "key.algorithm", k->algorithm, TEXT_ALG, 0, PROTO_ALGORITHM_MAX);
    k->flags = r_flags(r, "key.flags", PROTO_KEY_FLAGS);
    r_reason(r, "key.reason_sign", k->reason_sign,
             !(k->flags & PROTO_KEY_SIGN_USABLE), "the flags");
    r_reason(r, "key.reason_decrypt", k->reason_decrypt,
             !(k->flags & PROTO_KEY_DECRYPT_USABLE), "the flags");
    k->cert = r_bytes(r, "key.cert", &k->cert_len, 0, PROTO_CERT_MAX);
    k->nchain = r_u8(r, "key.chain");
    if (!r->bad && k->nchain > PROTO_CHAIN_MAX)
        r_refuse(r, "%s holds too many certificates", "key.chain");
    for (i = 0; !r->bad && i < k->nchain; i++)
        k->chain[i] =
            r_bytes(r, "key.chain", &k->chain_len[i], 1, PROTO_CERT_MAX);
}

/* A count of array entries that follow, each at least min_bytes long:
 * checked against the bytes left before anything is allocated. */
static size_t r_count(reader *r, const char *field, size_t max,
                      size_t min_bytes)
{
    size_t n = r_u16(r, field);

    if (r->bad)
        return 0;
    if (n > max) {
        r_refuse(r, "%s has too many entries", field);
        return 0;
    }
    if (n * min_bytes > r->left) {
        r_refuse(r, "message ends inside %s", field);
        return 0;
    }
    return n;
}

static void *r_array(reader *r, size_t n, size_t size)
{
    void *p;

    if (r->bad || n == 0)
        return NULL;
    p = calloc(n, size);
    if (p == NULL)
        r_refuse(r, "out of memory for %s", "an array");
    return p;
}

/* The smallest encodings of a token entry (a name of one byte, two u8,
 * an empty reason, the numbers) and of a key entry. */
#define MIN_TOKEN (4 + 1 + 1 + 1 + 4 + 8 * 8 + 3 * 4)
#define MIN_KEY (4 + 1 + 4 + 1 + 4 + 1 + 4 + 4 + 4 + 1)

/* The head of a page of the directory or of the tokens: total, next and
 * the count n (at most max) of the entries that follow, called field. */
static void put_page_head(writer *w, uint32_t total, uint32_t next, size_t n,
                          const char *field, size_t max)
{
    if (next > total || n > total)
        w_refuse(w, "next");
    w_u32(w, total);
    w_u32(w, next);
    if (n > max)
        w_refuse(w, field);
    w_u16(w, (unsigned)n);
}

/* The count of entries, each at least min_bytes long. */
static size_t get_page_head(reader *r, uint32_t *total, uint32_t *next,
                            const char *field, size_t max, size_t min_bytes)
{
    size_t n;

    *total = r_u32(r, "total");
    *next = r_u32(r, "next");
    if (!r->bad && *next > *total)
        r_refuse(r, "%s is past the total", "next");
    n = r_count(r, field, max, min_bytes);
    if (!r->bad && n > *total)
        r_refuse(r, "%s are more than the total", field);
    return n;
}

static void put_keys_payload(writer *w, const proto_reply *m)
{
    size_t i;

    put_page_head(w, m->u.keys.total, m->u.keys.next, m->u.keys.nkeys, "keys",
                  PROTO_PAGE_KEYS_MAX);
    for (i = 0; !w->bad && i < m->u.keys.nkeys; i++)
        put_key(w, &m->u.keys.keys[i]);
}

static void get_keys_payload(reader *r, proto_reply *m)
{
    size_t i;

    m->u.keys.nkeys = get_page_head(r, &m->u.keys.total, &m->u.keys.next,
                                    "keys", PROTO_PAGE_KEYS_MAX, MIN_KEY);
    m->u.keys.keys = r_array(r, m->u.keys.nkeys, sizeof(*m->u.keys.keys));
    for (i = 0; !r->bad && i < m->u.keys.nkeys; i++)
        get_key(r, &m->u.keys.keys[i]);
}

static void put_state_payload(writer *w, const proto_reply *m)
{
    size_t i;

    put_page_head(w, m->u.state.total, m->u.state.next, m->u.state.ntokens,
                  "tokens", PROTO_PAGE_TOKENS_MAX);
    for (i = 0; !w->bad && i < m->u.state.ntokens; i++)
        put_token(w, &m->u.state.tokens[i]);
}

static void get_state_payload(reader *r, proto_reply *m)
{
    size_t i;

    m->u.state.ntokens =
        get_page_head(r, &m->u.state.total, &m->u.state.next, "tokens",
                      PROTO_PAGE_TOKENS_MAX, MIN_TOKEN);
    m->u.state.tokens =
        r_array(r, m->u.state.ntokens, sizeof(*m->u.state.tokens));
    for (i = 0; !r->bad && i < m->u.state.ntokens; i++)
        get_token(r, &m->u.state.tokens[i]);
}

/* The most a result can hold, by the type of its request. */
static size_t result_max(unsigned request)
{
    switch (request) {
    case PROTO_SIGN:
    case PROTO_DECRYPT:
        return PROTO_RSA_MAX;
    case PROTO_DERIVE:
        return PROTO_SECRET_MAX;
    default:
        return 0;
    }
}

static int reply_type_valid(unsigned type)
{
    return type == PROTO_ERROR || type == PROTO_NOTICE ||
           (type > PROTO_REPLY && type <= (PROTO_REPLY | PROTO_FINISH));
}

/* The fields every reply has, with their rules. */
static const char *reply_rule(const proto_reply *m)
{
    if (!reply_type_valid(m->type))
        return "type";
    if ((m->type == PROTO_NOTICE) != (m->id == 0))
        return "id";
    if (m->status >= PROTO_STATUS_COUNT ||
        (m->type == PROTO_ERROR && m->status != PROTO_BAD_REQUEST) ||
        (m->type == PROTO_NOTICE && m->status != PROTO_OK))
        return "status";
    if (m->retry_after != 0 && m->status != PROTO_BUSY &&
        m->status != PROTO_UNAVAILABLE)
        return "retry_after";
    if (!reason_fits(m->message, m->status != PROTO_OK))
        return "message";
    return NULL;
}

int proto_reply_encode(const proto_reply *rep, unsigned char *buf, size_t cap,
                       size_t *len, proto_error *err)
{
    const char *broken = reply_rule(rep);
    unsigned request = rep->type & ~PROTO_REPLY;
    writer w;

    if (start_writer(&w, buf, cap, err) != 0)
        return -1;
    if (broken != NULL) {
        fail(err, "%s is out of range", broken);
        return -1;
    }
    put_header(&w, rep->type, rep->id);
    w_u8(&w, rep->status);
    w_u32(&w, rep->retry_after);
    w_u64(&w, rep->epoch);
    w_text(&w, "message", rep->message, TEXT_ANY, 0, PROTO_MESSAGE_MAX);
    if (rep->status != PROTO_OK || rep->type == PROTO_ERROR ||
        rep->type == PROTO_NOTICE)
        return finish_message(&w, len);
    switch (request) {
    case PROTO_KEYS:
        put_keys_payload(&w, rep);
        break;
    case PROTO_STATE:
        put_state_payload(&w, rep);
        break;
    case PROTO_SIGN:
    case PROTO_DECRYPT:
    case PROTO_DERIVE:
        w_bytes(&w, "result", rep->u.bytes.data, rep->u.bytes.len, 1,
                result_max(request));
        break;
    default: /* AUDIT, FINISH: nothing but the status */
        break;
    }
    return finish_message(&w, len);
}

int proto_reply_decode(const unsigned char *buf, size_t len, proto_reply *rep,
                       proto_error *err)
{
    reader r = {NULL, 0, 0, err};
    const char *broken;
    unsigned request;

    memset(rep, 0, sizeof(*rep));
    if (get_header(&r, buf, len, &rep->type, &rep->id) != 0)
        return -1;
    request = rep->type & ~PROTO_REPLY;
    rep->status = (uint8_t)r_u8(&r, "status");
    rep->retry_after = r_u32(&r, "retry_after");
    rep->epoch = r_u64(&r, "epoch");
    r_text(&r, "message", rep->message, TEXT_ANY, 0, PROTO_MESSAGE_MAX);
    if (!r.bad && (broken = reply_rule(rep)) != NULL)
        return r_refuse(&r, "%s is out of range", broken);
    if (!r.bad && rep->status == PROTO_OK && rep->type != PROTO_ERROR &&
        rep->type != PROTO_NOTICE) {
        switch (request) {
        case PROTO_KEYS:
            get_keys_payload(&r, rep);
            break;
        case PROTO_STATE:
            get_state_payload(&r, rep);
            break;
        case PROTO_SIGN:
        case PROTO_DECRYPT:
        case PROTO_DERIVE:
            rep->u.bytes.data = r_bytes(&r, "result", &rep->u.bytes.len, 1,
                                        result_max(request));
            break;
        default:
            break;
        }
    }
    if (end_reader(&r) != 0) {
        proto_reply_clear(rep);
        return -1;
    }
    return 0;
}

void proto_reply_clear(proto_reply *rep)
{
    unsigned request = rep->type & ~PROTO_REPLY;

    if (rep->type != PROTO_ERROR && rep->type != PROTO_NOTICE &&
        request == PROTO_KEYS) {
        free(rep->u.keys.keys);
    } else if (rep->type != PROTO_ERROR && rep->type != PROTO_NOTICE &&
               request == PROTO_STATE) {
        free(rep->u.state.tokens);
    }
    memset(&rep->u, 0, sizeof(rep->u));
}

/* ---- page sizes ---- */

size_t proto_key_entry_size(const proto_key_entry *k)
{
    size_t n = 4 + strlen(k->name) + 4 + strlen(k->token) + 4 +
               strlen(k->algorithm) + 1 + 4 + strlen(k->reason_sign) + 4 +
               strlen(k->reason_decrypt) + 4 + k->cert_len + 1;
    size_t i;

    for (i = 0; i < k->nchain && i < PROTO_CHAIN_MAX; i++)
        n += 4 + k->chain_len[i];
    return n;
}

size_t proto_keys_reply_overhead(void)
{
    /* header, status, retry_after, epoch, an empty message, total, next,
     * the count */
    return PROTO_HEADER_LEN + 1 + 4 + 8 + 4 + 4 + 4 + 2;
}
