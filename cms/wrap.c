/*
 * Writing S/MIME entities: the outer headers, then multipart/signed around
 * the signed entity and its detached signature, or application/pkcs7-mime
 * around a whole CMS structure in base64 lines of 76 characters.
 *
 * The output is allocated once, at its final size (growing by doubling
 * copies a large entity several times), and the DER comes in pieces: an
 * opaque signature's eContent is the signed entity itself (cms/sign.c
 * encodes the rest of the SignedData around it), so the content goes from
 * the entity straight into the base64 text instead of through a DER buffer
 * of its own.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "cms/internal.h"

#define BOUNDARY_PREFIX "----=_smimed_"
/* Prefix, 32 hex digits, NUL. */
#define BOUNDARY_SIZE (sizeof(BOUNDARY_PREFIX) + 32)
/* EVP_EncodeBlock turns 57 octets into one 76-character line. */
#define B64_LINE_OCTETS 57
#define B64_LINE_LEN 78 /* with its CRLF */
/* Room for every fixed header and delimiter line around the entity. */
#define WRAP_TEXT_MAX 1024

static const char *micalg_name(cms_digest digest)
{
    switch (digest) {
    case CMS_DIGEST_SHA256:
        return "sha-256";
    case CMS_DIGEST_SHA384:
        return "sha-384";
    case CMS_DIGEST_SHA512:
        return "sha-512";
    }
    return NULL;
}

static size_t pieces_len(const cms_bytes *p, size_t n)
{
    size_t i, len = 0;

    for (i = 0; i < n; i++)
        len += p[i].len;
    return len;
}

/* What add_base64 writes for len octets. */
static size_t base64_len(size_t len)
{
    size_t rest = len % B64_LINE_OCTETS;

    return len / B64_LINE_OCTETS * B64_LINE_LEN +
           (rest > 0 ? (rest + 2) / 3 * 4 + 2 : 0);
}

/* Encodes in[0..n) as one line at the end of out, which has room for it. */
static void add_base64_line(cms_buf *out, const unsigned char *in, size_t n)
{
    int k = EVP_EncodeBlock(out->data + out->len, in, (int)n);

    /* EVP_EncodeBlock's terminating NUL goes where the CR goes */
    out->data[out->len + (size_t)k] = '\r';
    out->data[out->len + (size_t)k + 1] = '\n';
    out->len += (size_t)k + 2;
}

/* The pieces p[0..n), one after the other, as base64 in 76-character
 * lines, each ending in CRLF. A line that spans two pieces is gathered in
 * a small buffer; the others are encoded from the pieces themselves. */
static int add_base64(cms_buf *out, const cms_bytes *p, size_t n)
{
    unsigned char carry[B64_LINE_OCTETS];
    size_t i, off, take, have = 0;

    if (cms_buf_reserve(out, base64_len(pieces_len(p, n))))
        return -1;
    for (i = 0; i < n; i++) {
        for (off = 0; off < p[i].len; off += take) {
            if (have == 0 && p[i].len - off >= B64_LINE_OCTETS) {
                take = B64_LINE_OCTETS;
                add_base64_line(out, p[i].data + off, take);
                continue;
            }
            take = B64_LINE_OCTETS - have;
            if (take > p[i].len - off)
                take = p[i].len - off;
            memcpy(carry + have, p[i].data + off, take);
            have += take;
            if (have == B64_LINE_OCTETS) {
                add_base64_line(out, carry, have);
                have = 0;
            }
        }
    }
    if (have > 0)
        add_base64_line(out, carry, have);
    return 0;
}

/* A boundary that does not occur in the content (RFC 2046 §5.1.1): random,
 * and "=_" cannot appear in quoted-printable or base64 text. */
static int make_boundary(const cms_bytes *content, char *boundary,
                         cms_error *err)
{
    unsigned char rnd[16];
    size_t i;
    int attempt;

    for (attempt = 0; attempt < 4; attempt++) {
        if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
            cms_set_ssl_error(err, CMS_ERR_INTERNAL,
                              "cannot generate a MIME boundary");
            return -1;
        }
        memcpy(boundary, BOUNDARY_PREFIX, sizeof(BOUNDARY_PREFIX) - 1);
        for (i = 0; i < sizeof(rnd); i++)
            snprintf(boundary + sizeof(BOUNDARY_PREFIX) - 1 + 2 * i, 3, "%02x",
                     rnd[i]);
        if (memmem(content->data, content->len, boundary, BOUNDARY_SIZE - 1) ==
            NULL)
            return 0;
    }
    cms_set_error(err, CMS_ERR_INTERNAL,
                  "cannot find a MIME boundary absent from the content");
    return -1;
}

static int wrap_detached(const cms_entity *ent, cms_digest digest,
                         const cms_bytes *sig, size_t n, cms_buf *out,
                         cms_error *err)
{
    char boundary[BOUNDARY_SIZE];
    const char *micalg = micalg_name(digest);

    if (micalg == NULL) {
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown digest %d", digest);
        return -1;
    }
    if (make_boundary(&ent->content, boundary, err))
        return -1;
    if (cms_buf_add_str(out, "Content-Type: multipart/signed;\r\n"
                             "\tprotocol=\"application/pkcs7-signature\";\r\n"
                             "\tmicalg=") ||
        cms_buf_add_str(out, micalg) ||
        cms_buf_add_str(out, ";\r\n\tboundary=\"") ||
        cms_buf_add_str(out, boundary) || cms_buf_add_str(out, "\"\r\n\r\n") ||
        cms_buf_add_str(out, "This is an S/MIME signed message\r\n\r\n--") ||
        cms_buf_add_str(out, boundary) || cms_buf_add_str(out, "\r\n") ||
        cms_buf_add(out, ent->content.data, ent->content.len) ||
        cms_buf_add_str(out, "\r\n--") || cms_buf_add_str(out, boundary) ||
        cms_buf_add_str(out, "\r\n"
                             "Content-Type: application/pkcs7-signature; "
                             "name=smime.p7s\r\n"
                             "Content-Transfer-Encoding: base64\r\n"
                             "Content-Disposition: attachment; "
                             "filename=smime.p7s\r\n"
                             "\r\n") ||
        add_base64(out, sig, n) ||
        /* The last base64 line's CRLF is part of the closing delimiter. */
        cms_buf_add_str(out, "--") || cms_buf_add_str(out, boundary) ||
        cms_buf_add_str(out, "--\r\n")) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

static int wrap_p7m(const char *smime_type, const cms_bytes *der, size_t n,
                    cms_buf *out, cms_error *err)
{
    if (cms_buf_add_str(out,
                        "Content-Type: application/pkcs7-mime; smime-type=") ||
        cms_buf_add_str(out, smime_type) ||
        cms_buf_add_str(out, ";\r\n"
                             "\tname=smime.p7m\r\n"
                             "Content-Transfer-Encoding: base64\r\n"
                             "Content-Disposition: attachment; "
                             "filename=smime.p7m\r\n"
                             "\r\n") ||
        add_base64(out, der, n)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

/* Reserves the whole output (the outer headers, extra octets copied as
 * they are, the base64 of der_len octets and the fixed text) and writes
 * the outer headers. */
static int wrap_begin(const cms_entity *ent, size_t extra, size_t der_len,
                      cms_buf *out, cms_error *err)
{
    if (cms_buf_reserve(out, ent->outer.len + extra + base64_len(der_len) +
                                 WRAP_TEXT_MAX) ||
        cms_buf_add(out, ent->outer.data, ent->outer.len) ||
        cms_buf_add_str(out, "MIME-Version: 1.0\r\n")) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

int cms_entity_wrap(const cms_entity *ent, cms_mode mode, cms_digest digest,
                    const cms_bytes *der, size_t n, cms_buf *out,
                    cms_error *err)
{
    cms_buf buf = {0};
    int r = -1;

    switch (mode) {
    case CMS_MODE_DETACHED:
        if (wrap_begin(ent, ent->content.len, pieces_len(der, n), &buf, err) ||
            wrap_detached(ent, digest, der, n, &buf, err))
            goto out;
        break;
    case CMS_MODE_OPAQUE:
        if (wrap_begin(ent, 0, pieces_len(der, n), &buf, err) ||
            wrap_p7m("signed-data", der, n, &buf, err))
            goto out;
        break;
    default:
        cms_set_error(err, CMS_ERR_INTERNAL, "unknown mode %d", mode);
        goto out;
    }
    *out = buf;
    memset(&buf, 0, sizeof(buf));
    r = 0;
out:
    cms_buf_release(&buf);
    return r;
}

int cms_entity_wrap_enveloped(const cms_entity *ent, int auth,
                              const unsigned char *der, size_t der_len,
                              cms_buf *out, cms_error *err)
{
    cms_bytes piece = {der, der_len};
    cms_buf buf = {0};

    if (wrap_begin(ent, 0, der_len, &buf, err) ||
        wrap_p7m(auth ? "authEnveloped-data" : "enveloped-data", &piece, 1,
                 &buf, err)) {
        cms_buf_release(&buf);
        return -1;
    }
    *out = buf;
    return 0;
}
