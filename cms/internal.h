/*
 * Private to cms/: what the MIME side (mime.c, header.c, encoding.c:
 * entities in and out) and the CMS side (sign.c, encrypt.c, decrypt.c,
 * verify.c) share.
 */
#ifndef SMIMED_CMS_INTERNAL_H
#define SMIMED_CMS_INTERNAL_H

#include <stddef.h>
#include <string.h>

#include <openssl/cms.h>

#include <gmime/gmime.h>

#include "cms/cms.h"

/* Bounds on the work one signed entity can ask for (every signer costs a
 * signature check, a path and a pass over the certificates; every
 * certificate a place in each path search); mail has one signer, rarely
 * two, and a chain or two of a few certificates. cms_algs_check_signed
 * counts them before OpenSSL parses the SignedData. */
#define CMS_MAX_SIGNERS 16
#define CMS_MAX_CERTS 256

typedef struct cms_buf {
    unsigned char *data;
    size_t len;
    size_t cap;
} cms_buf;

/* -1 when out of memory; buf is left as it was. */
int cms_buf_add(cms_buf *buf, const void *data, size_t len);
int cms_buf_add_str(cms_buf *buf, const char *s);
/* Room for len more octets without another allocation; -1 when out of
 * memory. */
int cms_buf_reserve(cms_buf *buf, size_t len);
/* Appends in[0..len) with every bare CR and bare LF turned into CRLF. */
int cms_buf_add_canonical(cms_buf *buf, const unsigned char *in, size_t len);
void cms_buf_release(cms_buf *buf);
/* Appends in[0..len) encoded as quoted-printable or base64, with CRLF line
 * ends (encoding.c has what quoted-printable also armours). */
int cms_buf_add_encoded(cms_buf *out, const unsigned char *in, size_t len,
                        GMimeContentEncoding encoding);
/* Whether s[0..len) has CRLF line ends only, no bare CR or LF: what
 * cms_buf_add_canonical would copy unchanged. */
int cms_is_canonical(const unsigned char *s, size_t len);

/* Lines and header fields, for the MIME files; inline because the 7-bit
 * checks call them once an octet or a line. */
static inline int cms_is_blank(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* RFC 5322 ftext: printable US-ASCII except the colon. */
static inline int cms_is_ftext(unsigned char c)
{
    return c > ' ' && c < 127 && c != ':';
}

/* End of the line starting at pos: just past its LF, or len. */
static inline size_t cms_line_end(const unsigned char *s, size_t len,
                                  size_t pos)
{
    const unsigned char *lf;

    /* an empty buffer may have no storage: no arithmetic on NULL */
    if (pos >= len)
        return len;
    lf = memchr(s + pos, '\n', len - pos);
    return lf ? (size_t)(lf - s) + 1 : len;
}

/* Length of the canonical line s[pos..end) without its CRLF. */
static inline size_t cms_line_text_len(const unsigned char *s, size_t pos,
                                       size_t end)
{
    size_t n = end - pos;

    if (n >= 2 && s[end - 1] == '\n' && s[end - 2] == '\r')
        n -= 2;
    return n;
}

/* Whether the field starting line[0..n) is called name (any case); RFC
 * 5322's obsolete syntax allows blanks before the colon. */
int cms_field_is(const unsigned char *line, size_t n, const char *name);
/*
 * Checks the header line s[pos..pos+n) (lineno counts from 1; continued: a
 * field precedes it, so a line starting with a blank continues it). The
 * length of its field name, 0 for a continuation line, or -1 with err set.
 */
long cms_header_line_check(const unsigned char *s, size_t pos, size_t n,
                           size_t lineno, int continued, cms_error *err);
/* Counts the field line[0..n) when it is called name; 1 when one was
 * counted before. */
int cms_field_repeats(int *seen, const unsigned char *line, size_t n,
                      const char *name);
/*
 * Splits the header block of the canonical entity s[0..len): Content-* and
 * MIME-Version fields go to inner, the others to outer, each line CRLF
 * terminated. *body is where the body starts (len when there is none).
 * Two Content-Type or Content-Transfer-Encoding fields are refused, as by
 * cms_header_block_read, which reads the entity back after decryption and
 * verification.
 */
int cms_headers_split(const unsigned char *s, size_t len, cms_buf *outer,
                      cms_buf *inner, size_t *body, cms_error *err);

/* Octets someone else owns. */
typedef struct cms_bytes {
    const unsigned char *data;
    size_t len;
} cms_bytes;

/* An entity split into what stays outside the signature or encryption and
 * what goes inside. */
typedef struct cms_entity {
    cms_buf outer; /* top-level mail headers, CRLF line ends */
    /* The inner entity: CRLF line ends, 7-bit safe. It points into the
     * input of cms_entity_parse when that held it as it is to be signed
     * (not copied: the input must outlive the entity), else into own. */
    cms_bytes content;
    cms_buf own;
    char **reencoded; /* "PART-NUMBER ENCODING", malloc'd */
    size_t n_reencoded;
} cms_entity;

/* The inner entity is the Content-* and MIME-Version fields, a blank line
 * and the body: when the input is canonical, nothing needs re-encoding
 * and those fields end its header block, that is a range of the input, and
 * ent->content points into mime instead of copying it. */
int cms_entity_parse(const unsigned char *mime, size_t len, cms_entity *ent,
                     cms_error *err);
/* Makes buf (taken, left empty) the inner entity. */
void cms_entity_set_content(cms_entity *ent, cms_buf *buf);
/* cms_entity_parse, with always_walk 1 taking GMime's walk even where it
 * is known to change nothing (for tests of that shortcut). */
int cms_entity_parse_walk(const unsigned char *mime, size_t len,
                          cms_entity *ent, int always_walk, cms_error *err);
void cms_entity_release(cms_entity *ent);

/* The way back, for decrypt and verify: the fields of the S/MIME entity
 * s[0..len)'s header block that stayed outside (all but Content-* and
 * MIME-Version), as submitted with CRLF line ends, into *outer. */
int cms_outer_read(const unsigned char *s, size_t len, cms_buf *outer,
                   cms_error *err);
/* Puts the fields of outer in front of the entity in content, except those
 * whose name its own header block has (the inner copy is the protected
 * one, RFC 8551 §3.1). */
int cms_outer_restore(const cms_buf *outer, cms_buf *content, cms_error *err);

/* Writes the outer headers and the S/MIME entity around the DER that the
 * pieces der[0..n) make one after the other: the detached signature
 * (CMS_MODE_DETACHED) or the whole SignedData (CMS_MODE_OPAQUE, whose
 * eContent can then be ent->content itself, never copied into a DER
 * buffer). out is allocated once, at its final size. */
int cms_entity_wrap(const cms_entity *ent, cms_mode mode, cms_digest digest,
                    const cms_bytes *der, size_t n, cms_buf *out,
                    cms_error *err);
/* Likewise for EnvelopedData (auth 0) or AuthEnvelopedData (auth 1). */
int cms_entity_wrap_enveloped(const cms_entity *ent, int auth,
                              const unsigned char *der, size_t der_len,
                              cms_buf *out, cms_error *err);

/*
 * The header block at the start of s[0..len), read strictly: every line
 * ends in LF or CRLF and is a field ("name:" with a name of printable
 * US-ASCII other than the colon, blanks allowed before the colon) or the
 * continuation of one; no NUL or bare CR; the block ends at an empty line
 * or with the data. Values may hold 8-bit octets (RFC 6532).
 */
typedef struct cms_header_block {
    size_t n_fields;
    size_t n_mime_fields;    /* of them, Content-* and MIME-Version */
    size_t body;             /* where the body starts; len when none */
    char *content_type;      /* unfolded value, NULL when absent */
    char *transfer_encoding; /* likewise Content-Transfer-Encoding */
} cms_header_block;

/* On failure hb is untouched and err (which may be NULL) says which line is
 * wrong. Two Content-Type or two Content-Transfer-Encoding fields are
 * refused: readers would disagree about which one counts. */
int cms_header_block_read(const unsigned char *s, size_t len,
                          cms_header_block *hb, cms_error *err);
void cms_header_block_release(cms_header_block *hb);

/* The start every S/MIME reader shares: a non-empty entity, a strict header
 * block and a Content-Type, parsed into *ct (the caller unrefs it). */
int cms_smime_header_read(const unsigned char *mime, size_t len,
                          cms_header_block *hb, GMimeContentType **ct,
                          cms_error *err);
/* application/pkcs7-mime, or the old application/x-pkcs7-mime. */
int cms_is_pkcs7_mime(GMimeContentType *ct);
/* "type/subtype" of ct for a message, escaped as by cms_text_escape. */
void cms_content_type_text(GMimeContentType *ct, char *buf, size_t size);

/* Undoes the Content-Transfer-Encoding cte (NULL: none) of body[0..len):
 * base64, with any line breaks and blanks, or 7bit, 8bit and binary as
 * they are. Appends to out. */
int cms_body_decode(const unsigned char *body, size_t len, const char *cte,
                    cms_buf *out, cms_error *err);

/* A ContentInfo filling der[0..len) (DER or BER; blanks and line breaks may
 * follow). NULL with CMS_ERR_INPUT naming the fault, the error queue
 * cleared. */
CMS_ContentInfo *cms_der_read(const unsigned char *der, size_t len,
                              cms_error *err);

/*
 * The allow-lists (algs.c), checked on the BER ContentInfo at the start of
 * der[0..len) before OpenSSL parses it; what follows that ContentInfo is
 * not read. CMS_ERR_ALGORITHM names the first algorithm identifier (or
 * parameters) outside the lists, with its OID; CMS_ERR_INPUT says what
 * cannot be read, or that the structure is of the wrong type. For
 * EnvelopedData and AuthEnvelopedData: the content encryption and every
 * KeyTransRecipientInfo and KeyAgreeRecipientInfo; for SignedData: the
 * digest algorithms and each SignerInfo's digest and signature.
 */
int cms_algs_check_enveloped(const unsigned char *der, size_t len,
                             cms_error *err);
int cms_algs_check_signed(const unsigned char *der, size_t len, cms_error *err);

/* A signed S/MIME entity taken apart, before any cryptography. */
typedef struct cms_signed {
    CMS_ContentInfo *cms; /* SignedData */
    int detached;
    cms_buf content; /* detached: the first part, CRLF; else empty */
} cms_signed;

/* Reads a multipart/signed or an application/(x-)pkcs7-mime signed-data
 * entity; CMS_ERR_INPUT for anything else, CMS_ERR_ALGORITHM for a
 * SignedData that cms_algs_check_signed refuses. */
int cms_signed_read(const unsigned char *mime, size_t len, cms_signed *sd,
                    cms_error *err);
void cms_signed_release(cms_signed *sd);

/* Whether the canonical line s[pos..pos+n) is a delimiter of boundary
 * (RFC 2046 §5.1.1: "--boundary", "--" more for the closing one, then
 * optional blanks); if so, *close says which. */
int cms_is_delimiter(const unsigned char *s, size_t pos, size_t n,
                     const char *boundary, size_t blen, int *close);

/* A result holding data, taken over on success, and a copy of the
 * re-encoded parts of ent when not NULL. */
int cms_result_new(cms_buf *data, const cms_entity *ent, cms_result **out,
                   cms_error *err);

/* Who a certificate is for, in messages: its first e-mail address, else
 * its subject's common name, else its whole subject; escaped as by
 * cms_text_escape. Leaves OpenSSL's error queue as it was. */
void cms_cert_label(X509 *cert, char *buf, size_t size);
/* RFC 3339 UTC ("2025-01-01T00:00:00Z"); -1 if t does not read as a time. */
int cms_time_format(const ASN1_TIME *t, char *buf, size_t size);

/*
 * Messages end up in JSON and logs, so they must be valid UTF-8. Text from
 * the input (header values, certificate names) goes in through
 * cms_text_escape; cms_format_text then only has to mend a cut made by its
 * buffer size.
 */

/* Copies s[0..len) into buf[0..size) (size > 0) for a message: valid UTF-8
 * sequences stay, control characters and octets that are not valid UTF-8
 * become "\xNN". Copies as many whole characters and escapes as fit;
 * always terminates buf. */
void cms_text_escape(char *buf, size_t size, const char *s, size_t len);
/* snprintf whose result is valid UTF-8: a character cut off at the end of
 * buf is dropped, and any other invalid octet becomes '?'. */
__attribute__((format(printf, 3, 4))) void
cms_format_text(char *buf, size_t size, const char *fmt, ...);
/* Sets err's status and message, formatted as by cms_format_text. */
__attribute__((format(printf, 3, 4))) void
cms_set_error(cms_error *err, cms_status status, const char *fmt, ...);
/* Adds OpenSSL's queued errors to the message: the last one, and the first
 * (usually the cause) when it differs. */
void cms_set_ssl_error(cms_error *err, cms_status status, const char *what);

#endif
