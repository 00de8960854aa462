/*
 * The MIME side: split the submitted entity into the top-level mail
 * headers, which stay outside the signature or encryption, and the entity
 * to sign or encrypt; make that entity CRLF-canonical and 7-bit safe (RFC
 * 8551 §3.1); wrap the CMS structure around it as S/MIME (wrap.c). And the
 * way back: read a header block, undo a transfer encoding, read the CMS
 * structure. This file is the walk that re-encodes the parts that are not
 * 7-bit safe and names what cannot be made so; header.c reads, checks and
 * splits header blocks; encoding.c holds the buffers, CRLF
 * canonicalisation and the transfer encodings.
 *
 * Decisions:
 * - The signed entity is the submitted Content-* and MIME-Version fields, in
 *   their order and folding, a blank line and the body. An entity without
 *   Content-Type is signed as given, without one: RFC 2045 already makes it
 *   text/plain; charset=us-ascii for every reader, and adding the field would
 *   sign bytes the client did not send. The result's own headers are the
 *   other fields, then "MIME-Version: 1.0" and the new Content-Type.
 * - A part that is already 7-bit safe keeps its exact bytes; only the CRLF
 *   canonicalisation (bare LF and bare CR become CRLF) touches it. Safe
 *   means no 8-bit octets, NULs or lines over 998 octets, no
 *   Content-Transfer-Encoding 8bit or binary, no line starting "From "
 *   (GMime judges so too: mbox-style transports mangle such lines) and no
 *   white space ending a line (gateways strip it; format=flowed text keeps
 *   its soft breaks as QP's "=20"). A part
 *   that is not safe gets its Content-Transfer-Encoding fields replaced by
 *   one naming the new encoding and its body re-encoded in place:
 *   quoted-printable for any text type, base64 otherwise (and for text that
 *   was base64 already, say with over-long lines). GMime parses the tree and
 *   encodes, but never writes the entity, so its formatting cannot change
 *   the bytes of parts that needed nothing.
 * - Non-text bodies are re-encoded from the submitted octets, not the
 *   canonicalised ones: a Content-Transfer-Encoding: binary image keeps its
 *   bare CR and LF octets.
 * - Nothing inside multipart/signed or multipart/encrypted is rewritten: that
 *   would break the inner signature. Header fields, preambles and epilogues
 *   are not rewritten either: a preamble has no transfer encoding, and RFC
 *   2047/2231 encoding a field would be guessing at what the client meant.
 *   Empty bodies are left as they are. The one exception is white space
 *   ending a line of a header field, a preamble, an epilogue or a
 *   delimiter (RFC 2046's transport padding): it only pads, and gateways
 *   strip it, so it goes before signing; a line of white space alone goes
 *   with it (a whitespace-only continuation adds nothing else).
 * - After re-encoding, the whole inner entity must pass the check a body
 *   does. What still fails it (8-bit octets in a header field inside or a
 *   preamble, anything inside a multipart/signed, the lines after a header
 *   block that no blank line ends, which GMime drops from its tree) is
 *   CMS_ERR_INPUT naming the part: a signature over it would not survive
 *   7-bit transport. The top-level fields that stay outside may have 8-bit
 *   octets (RFC 6532).
 * - The GMime walk is skipped when it could change nothing: the inner
 *   entity is 7-bit safe as a whole and its header fields mention neither
 *   "multipart" nor "message" (so GMime would see one leaf) nor "8bit",
 *   "8-bit" or "binary" (the declared encodings it would re-encode even
 *   when the octets are safe). That entity is signed as submitted, as the
 *   walk would leave it; input that already has CRLF line ends is not
 *   copied to canonicalise it. Large bodies cost little more than their
 *   digest then (script/bench). tests/unit/test_cms.c checks that both
 *   ways give the same bytes.
 * - Re-encoded parts are reported as "PART-NUMBER ENCODING": IMAP part
 *   numbers ("1" for a single-part entity, "2.1" for the first child of the
 *   second part, "2.1" also for the body of a message/rfc822 part 2) and
 *   GMime's encoding names ("quoted-printable", "base64").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>

#include "cms/internal.h"

/* RFC 5322 §2.1.1, without the CRLF. */
#define LINE_MAX_OCTETS 998
/* Real mail nests a handful of levels. GMime stops parsing at 1024 and
 * leaves deeper parts unparsed, so they could not be made 7-bit safe. */
#define MAX_DEPTH 64

/*
 * A quick look for transport_fault: 1 only when it would find nothing (a
 * CR inside a line or a blank ending one makes it say 0, and
 * transport_fault looks closer). Line by
 * line with memchr, and an OR over each line's octets that compilers
 * vectorise, instead of a branch per octet.
 */
static int looks_transport_safe(const unsigned char *s, size_t len)
{
    const unsigned char *p = s, *end = s + len, *lf, *q;
    unsigned char high, nul;
    size_t n;

    while (p < end) {
        lf = memchr(p, '\n', (size_t)(end - p));
        q = lf != NULL ? lf : end;
        n = (size_t)(q - p);
        if (n > 0 && q[-1] == '\r')
            n--;
        if (n > LINE_MAX_OCTETS || memchr(p, '\r', n) != NULL ||
            (n > 0 && cms_is_blank(p[n - 1])) ||
            ((size_t)(end - p) >= 5 && memcmp(p, "From ", 5) == 0))
            return 0;
        high = 0;
        nul = 0;
        for (; p < q; p++) {
            high |= *p;
            nul |= *p == 0;
        }
        if ((high & 0x80) != 0 || nul)
            return 0;
        p = lf != NULL ? lf + 1 : end;
    }
    return 1;
}

/*
 * What in the canonical text s[0..len) cannot travel unchanged over 7-bit
 * transport, and where (*at): an 8-bit octet or a NUL, a line over 998
 * octets, white space ending a line (gateways strip it), or (as GMime's
 * best encoding also judges) a line starting "From ", which mbox-style
 * transports turn into ">From " and so break the signature. NULL when there
 * is nothing.
 */
static const char *transport_fault(const unsigned char *s, size_t len,
                                   size_t *at)
{
    size_t i, line = 0;

    if (looks_transport_safe(s, len))
        return NULL;
    for (i = 0; i < len; i++) {
        *at = i;
        if (s[i] == 0)
            return "a NUL octet";
        if (s[i] >= 0x80)
            return "8-bit octets";
        if (cms_is_blank(s[i]) &&
            (i + 1 == len || s[i + 1] == '\r' || s[i + 1] == '\n'))
            return "white space at the end of a line";
        if (s[i] == '\n') {
            line = 0;
            continue;
        }
        if (s[i] == '\r')
            continue;
        if (line == 0 && len - i >= 5 && memcmp(s + i, "From ", 5) == 0)
            return "a line starting \"From \"";
        if (++line > LINE_MAX_OCTETS)
            return "a line over 998 octets";
    }
    return NULL;
}

static int is_transport_safe(const unsigned char *s, size_t len)
{
    size_t at;

    return transport_fault(s, len, &at) == NULL;
}

/* State while walking the parsed tree of the entity to sign. */
struct recoder {
    const unsigned char *raw; /* as submitted */
    size_t raw_len;
    const unsigned char *text; /* the canonical entity to sign */
    size_t text_len;
    size_t text_body;  /* where its body starts in text ... */
    size_t canon_body; /* ... and in the canonicalised submission */
    size_t map_raw;    /* a position in raw ... */
    size_t map_canon;  /* ... and where canonicalisation put it */
    cms_buf out;       /* the rewritten entity, once a part changed */
    size_t copied;     /* text[0..copied) has gone to out */
    char **parts;
    size_t n_parts;
    size_t (*frozen)[2]; /* multipart/signed or encrypted, in out's terms */
    size_t n_frozen;
    const char *bound; /* of the multipart being walked; NULL at the top */
    struct enclosing *enclosing; /* every multipart around the walk */
    cms_error *err;
};

/* A multipart the walk is inside, linked to the one around it. */
struct enclosing {
    const char *boundary;
    struct enclosing *up;
};

/*
 * Offset in the submitted octets of the body offset off in text. Leaves are
 * visited in order, so the scan resumes where the last one stopped. Bodies
 * start and end on line boundaries, which canonicalisation never splits.
 */
static size_t raw_offset(struct recoder *rc, size_t off)
{
    size_t target = off - rc->text_body + rc->canon_body;
    size_t r = rc->map_raw, c = rc->map_canon;

    if (c > target) {
        r = 0;
        c = 0;
    }
    while (c < target && r < rc->raw_len) {
        if (rc->raw[r] == '\r' && r + 1 < rc->raw_len &&
            rc->raw[r + 1] == '\n') {
            r += 2;
            c += 2;
        } else if (rc->raw[r] == '\r' || rc->raw[r] == '\n') {
            r++;
            c += 2;
        } else {
            r++;
            c++;
        }
    }
    rc->map_raw = r;
    rc->map_canon = c;
    return r;
}

/* Appends the header lines text[from..to) minus any
 * Content-Transfer-Encoding field (with its continuation lines). */
static int add_headers_without_cte(cms_buf *out, const unsigned char *text,
                                   size_t from, size_t to)
{
    size_t pos, end;
    int dropping = 0;

    for (pos = from; pos < to; pos = end) {
        end = cms_line_end(text, to, pos);
        if (!cms_is_blank(text[pos]))
            dropping = cms_field_is(text + pos, end - pos,
                                    "Content-Transfer-Encoding");
        if (!dropping && cms_buf_add(out, text + pos, end - pos))
            return -1;
    }
    return 0;
}

/* The body of part, decoded from the transfer encoding it declares. */
static GByteArray *decode_content(GMimeDataWrapper *wrapper)
{
    GMimeStream *mem = g_mime_stream_mem_new();
    GByteArray *bytes = NULL;

    if (g_mime_data_wrapper_write_to_stream(wrapper, mem) >= 0) {
        /* Keep the array when the stream goes. */
        g_mime_stream_mem_set_owner(GMIME_STREAM_MEM(mem), FALSE);
        bytes = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(mem));
    }
    g_object_unref(mem);
    return bytes;
}

static int record_part(struct recoder *rc, const char *num,
                       GMimeContentEncoding encoding)
{
    char **parts, *s;

    parts = realloc(rc->parts, (rc->n_parts + 1) * sizeof(*parts));
    if (parts == NULL)
        return -1;
    rc->parts = parts;
    if (asprintf(&s, "%s %s", num,
                 g_mime_content_encoding_to_string(encoding)) < 0)
        return -1;
    rc->parts[rc->n_parts++] = s;
    return 0;
}

static int recode_leaf(struct recoder *rc, GMimePart *part, const char *num,
                       int is_root)
{
    GMimeObject *obj = GMIME_OBJECT(part);
    GMimeDataWrapper *wrapper = g_mime_part_get_content(part);
    GMimeContentType *ctype = g_mime_object_get_content_type(obj);
    GMimeContentEncoding declared, encoding;
    GMimeHeaderList *headers;
    GMimeStream *stream;
    GByteArray *decoded = NULL;
    const unsigned char *src;
    gint64 start, length, off;
    size_t b, e, h, src_len, rb;
    int i, text, r = -1;

    if (wrapper == NULL ||
        (stream = g_mime_data_wrapper_get_stream(wrapper)) == NULL)
        return 0;
    /* The parser persists the stream, so a body is a window on text. */
    if (g_mime_stream_reset(stream) < 0 ||
        (start = g_mime_stream_tell(stream)) < 0 ||
        (length = g_mime_stream_length(stream)) < 0 ||
        (guint64)start > rc->text_len ||
        (guint64)length > rc->text_len - (guint64)start) {
        cms_set_error(rc->err, CMS_ERR_INTERNAL,
                      "part %s: cannot locate its body", num);
        return -1;
    }
    b = (size_t)start;
    e = b + (size_t)length;
    /* GMime cuts the line break before a delimiter as long as the
     * delimiter's own; a last delimiter without one leaves the CR of the
     * CRLF before it in the body. A canonical body never ends in a CR. */
    if (e > b && rc->text[e - 1] == '\r')
        e--;
    declared = g_mime_data_wrapper_get_encoding(wrapper);
    if (b == e || (declared != GMIME_CONTENT_ENCODING_8BIT &&
                   declared != GMIME_CONTENT_ENCODING_BINARY &&
                   is_transport_safe(rc->text + b, e - b)))
        return 0;

    /* A non-empty body follows the blank line ending its header block. */
    if (b < 2 || b < rc->text_body || memcmp(rc->text + b - 2, "\r\n", 2)) {
        cms_set_error(rc->err, CMS_ERR_INPUT,
                      "part %s: no blank line before its body", num);
        return -1;
    }
    h = b - 2;
    if (is_root) {
        h = 0;
    } else {
        headers = g_mime_object_get_header_list(obj);
        for (i = 0; i < g_mime_header_list_get_count(headers); i++) {
            off = g_mime_header_get_offset(
                g_mime_header_list_get_header_at(headers, i));
            if (off >= 0 && (guint64)off < h)
                h = (size_t)off;
        }
    }
    if (h < rc->copied) {
        cms_set_error(rc->err, CMS_ERR_INTERNAL,
                      "part %s: overlaps the part before it", num);
        return -1;
    }

    text = ctype != NULL && g_mime_content_type_is_type(ctype, "text", "*");
    /* Base64 text only needs new lines; as QP its line ends would become
     * CRLF. */
    encoding = text && declared != GMIME_CONTENT_ENCODING_BASE64
                   ? GMIME_CONTENT_ENCODING_QUOTEDPRINTABLE
                   : GMIME_CONTENT_ENCODING_BASE64;
    switch (declared) {
    case GMIME_CONTENT_ENCODING_QUOTEDPRINTABLE:
    case GMIME_CONTENT_ENCODING_BASE64:
    case GMIME_CONTENT_ENCODING_UUENCODE:
        decoded = decode_content(wrapper);
        if (decoded == NULL) {
            cms_set_error(rc->err, CMS_ERR_INPUT,
                          "part %s: cannot decode its %s body", num,
                          g_mime_content_encoding_to_string(declared));
            return -1;
        }
        src = decoded->data;
        src_len = decoded->len;
        break;
    default:
        if (text) {
            /* Text is lines; canonical line ends are what QP encodes. */
            src = rc->text + b;
            src_len = e - b;
        } else {
            rb = raw_offset(rc, b);
            src = rc->raw + rb;
            src_len = raw_offset(rc, e) - rb;
        }
        break;
    }

    /* Room for the whole entity and some growth at once: growing from
     * nothing by doubling copies a large one several times. */
    if ((rc->out.cap == 0 &&
         cms_buf_reserve(&rc->out, rc->text_len + rc->text_len / 4 + 256)) ||
        cms_buf_add(&rc->out, rc->text + rc->copied, h - rc->copied) ||
        add_headers_without_cte(&rc->out, rc->text, h, b - 2) ||
        cms_buf_add_str(&rc->out, "Content-Transfer-Encoding: ") ||
        cms_buf_add_str(&rc->out,
                        g_mime_content_encoding_to_string(encoding)) ||
        cms_buf_add_str(&rc->out, "\r\n\r\n") ||
        cms_buf_add_encoded(&rc->out, src, src_len, encoding) ||
        record_part(rc, num, encoding)) {
        cms_set_error(rc->err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    rc->copied = e;
    r = 0;
out:
    if (decoded != NULL)
        g_byte_array_unref(decoded);
    return r;
}

/* Offset in rc->text where obj's header block starts. */
static size_t object_start(const struct recoder *rc, GMimeObject *obj)
{
    GMimeHeaderList *headers = g_mime_object_get_header_list(obj);
    gint64 off;

    if (headers == NULL || g_mime_header_list_get_count(headers) == 0)
        return 0;
    off =
        g_mime_header_get_offset(g_mime_header_list_get_header_at(headers, 0));
    return off >= 0 && (guint64)off < rc->text_len ? (size_t)off : 0;
}

/* Where the first delimiter line of boundary in rc->text[from..to) starts
 * (a close delimiter only, with close_only); to when there is none. */
static size_t find_delimiter(const struct recoder *rc, size_t from, size_t to,
                             const char *boundary, int close_only)
{
    size_t blen = strlen(boundary), pos = from, end;
    const unsigned char *p;
    int close;

    if (blen == 0)
        return to;
    while (pos < to &&
           (p = memmem(rc->text + pos, to - pos, boundary, blen)) != NULL) {
        pos = (size_t)(p - rc->text);
        if (pos >= 2 && (pos == 2 || rc->text[pos - 3] == '\n')) {
            end = cms_line_end(rc->text, rc->text_len, pos - 2);
            if (cms_is_delimiter(rc->text, pos - 2,
                                 cms_line_text_len(rc->text, pos - 2, end),
                                 boundary, blen, &close) &&
                (close || !close_only))
                return pos - 2;
        }
        pos += blen;
    }
    return to;
}

/* Where the close delimiter of boundary that follows rc->text[from..)
 * ends; 0 when there is none before a delimiter of the enclosing
 * multipart (rc->bound), which is where GMime ends it. GMime takes a
 * multipart that ends that way, or with the data, as complete; it was cut
 * short (in transit, or built wrong), a signature would vouch for a
 * fragment, and a close delimiter further on (in a later part's body,
 * which re-encoding may hide) is not its own. */
static size_t close_delimiter_end(const struct recoder *rc, size_t from,
                                  const char *boundary)
{
    size_t at;

    if (boundary[0] == '\0')
        return 0;
    at = find_delimiter(rc, from, rc->text_len, boundary, 1);
    if (at == rc->text_len ||
        (rc->bound != NULL && find_delimiter(rc, from, at, rc->bound, 0) < at))
        return 0;
    return cms_line_end(rc->text, rc->text_len, at);
}

/*
 * Holds the header block of a multipart's part to the rules of the top
 * level: GMime ends a part's headers at the first line without a colon and
 * takes the rest as its body, so a broken field would be signed as text.
 * start is where its header block begins (part_start); 0 when not known,
 * and then there is nothing to hold.
 */
static int check_part_headers(const struct recoder *rc, size_t start,
                              const char *num)
{
    size_t pos = start, end, n, lineno;
    cms_error lerr = {0};
    int types = 0, encodings = 0;
    long k;

    for (lineno = 1; start > 0 && pos < rc->text_len; lineno++) {
        end = cms_line_end(rc->text, rc->text_len, pos);
        n = cms_line_text_len(rc->text, pos, end);
        if (n == 0)
            break;
        k = cms_header_line_check(rc->text, pos, n, lineno, lineno > 1, &lerr);
        if (k < 0) {
            cms_set_error(rc->err, CMS_ERR_INPUT, "part %s: %s", num,
                          lerr.message);
            return -1;
        }
        /* Readers differ on which of two fields counts: the part one
         * recipient's client shows would not be another's. */
        if (k > 0 && (cms_field_repeats(&types, rc->text + pos, (size_t)k,
                                        "Content-Type") ||
                      cms_field_repeats(&encodings, rc->text + pos, (size_t)k,
                                        "Content-Transfer-Encoding"))) {
            cms_set_error(rc->err, CMS_ERR_INPUT,
                          "part %s: header line %zu repeats the %.*s field",
                          num, lineno, (int)k, (const char *)rc->text + pos);
            return -1;
        }
        pos = end;
    }
    return 0;
}

/*
 * Where the header block of part, a part of a multipart with boundary
 * whose own header block starts at floor, starts: just after the delimiter
 * line before it. GMime drops lines it cannot read as fields before the
 * first one it keeps (and keeps none of a part with no good field), so its
 * first field's offset (object_start) can be past lines that would be
 * signed as headers. object_start when the delimiter is not found.
 */
static size_t part_start(const struct recoder *rc, GMimeObject *part,
                         const char *boundary, size_t floor)
{
    GMimeDataWrapper *wrapper;
    GMimeStream *stream;
    size_t first = object_start(rc, part), pos = first, prev;
    size_t blen = strlen(boundary);
    gint64 body;
    int close;

    if (pos == 0 && GMIME_IS_PART(part) &&
        (wrapper = g_mime_part_get_content(GMIME_PART(part))) != NULL &&
        (stream = g_mime_data_wrapper_get_stream(wrapper)) != NULL &&
        g_mime_stream_reset(stream) == 0 &&
        (body = g_mime_stream_tell(stream)) >= 2 &&
        (guint64)body <= rc->text_len)
        pos = (size_t)body - 2; /* the blank line ending no fields */
    while (pos > floor && rc->text[pos - 1] == '\n') {
        for (prev = pos - 1; prev > floor && rc->text[prev - 1] != '\n'; prev--)
            ;
        if (cms_is_delimiter(rc->text, prev,
                             cms_line_text_len(rc->text, prev, pos), boundary,
                             blen, &close))
            return pos;
        pos = prev;
    }
    return first;
}

/* Notes obj, a multipart/signed or multipart/encrypted, as a range of the
 * result that nothing may change. Parts before it may have been
 * re-encoded; nothing inside it is. */
static int add_frozen(struct recoder *rc, GMimeObject *obj)
{
    size_t start = object_start(rc, obj), end, (*f)[2];
    const char *boundary =
        g_mime_object_get_content_type_parameter(obj, "boundary");

    end = boundary != NULL ? close_delimiter_end(rc, start, boundary) : 0;
    if (end == 0)
        end = rc->text_len;
    f = realloc(rc->frozen, (rc->n_frozen + 1) * sizeof(*f));
    if (f == NULL) {
        cms_set_error(rc->err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    rc->frozen = f;
    f[rc->n_frozen][0] = rc->out.len + (start - rc->copied);
    f[rc->n_frozen][1] = rc->out.len + (end - rc->copied);
    rc->n_frozen++;
    return 0;
}

/* num is the IMAP part number of obj, "" for the root. */
static int recode_object(struct recoder *rc, GMimeObject *obj, const char *num,
                         int depth)
{
    GMimeMultipart *mp;
    GMimeMessage *msg;
    GMimeObject *body, *part;
    const char *own = *num ? num : "1", *boundary, *outer_bound;
    const struct enclosing *up;
    struct enclosing here;
    char *sub, shown[80];
    int i, r;

    if (depth > MAX_DEPTH) {
        cms_set_error(rc->err, CMS_ERR_INPUT,
                      "parts are nested deeper than %d levels", MAX_DEPTH);
        return -1;
    }
    if (GMIME_IS_MULTIPART(obj)) {
        if (GMIME_IS_MULTIPART_SIGNED(obj) || GMIME_IS_MULTIPART_ENCRYPTED(obj))
            return add_frozen(rc, obj);
        mp = GMIME_MULTIPART(obj);
        /* g_mime_multipart_get_boundary would make one up. */
        boundary = g_mime_object_get_content_type_parameter(obj, "boundary");
        if (boundary == NULL || *boundary == '\0') {
            cms_set_error(rc->err, CMS_ERR_INPUT,
                          "%s%s is a multipart without a boundary",
                          *num ? "part " : "the entity", num);
            return -1;
        }
        /* RFC 2046 5.1.1: a delimiter must not appear inside an
         * encapsulated part. An inner multipart with the boundary of one
         * around it ends where one reader thinks and not another (the
         * fuzzer found two walks of one text that disagreed). */
        for (up = rc->enclosing; up != NULL; up = up->up) {
            if (strcmp(up->boundary, boundary) == 0) {
                cms_text_escape(shown, sizeof(shown), boundary,
                                strlen(boundary));
                cms_set_error(rc->err, CMS_ERR_INPUT,
                              "part %s reuses the boundary \"%s\" of a "
                              "multipart around it",
                              own, shown);
                return -1;
            }
        }
        if (close_delimiter_end(rc, object_start(rc, obj), boundary) == 0) {
            cms_text_escape(shown, sizeof(shown), boundary, strlen(boundary));
            cms_set_error(rc->err, CMS_ERR_INPUT,
                          "%s%s is a multipart without its close delimiter "
                          "\"--%s--\" (truncated?)",
                          *num ? "part " : "the entity", num, shown);
            return -1;
        }
        here.boundary = boundary;
        here.up = rc->enclosing;
        rc->enclosing = &here;
        outer_bound = rc->bound;
        rc->bound = boundary;
        r = 0;
        for (i = 0; i < g_mime_multipart_get_count(mp) && r == 0; i++) {
            if (asprintf(&sub, *num ? "%s.%d" : "%s%d", num, i + 1) < 0) {
                cms_set_error(rc->err, CMS_ERR_INTERNAL, "out of memory");
                r = -1;
                break;
            }
            part = g_mime_multipart_get_part(mp, i);
            r = check_part_headers(
                rc, part_start(rc, part, boundary, object_start(rc, obj)), sub);
            if (r == 0)
                r = recode_object(rc, part, sub, depth + 1);
            free(sub);
        }
        rc->bound = outer_bound;
        rc->enclosing = here.up;
        return r;
    }
    if (GMIME_IS_MESSAGE_PART(obj)) {
        msg = g_mime_message_part_get_message(GMIME_MESSAGE_PART(obj));
        body = msg != NULL ? g_mime_message_get_mime_part(msg) : NULL;
        if (body == NULL)
            return 0;
        /* The children of an encapsulated multipart are own.1, own.2, ...;
         * a single-part body is own.1 itself. */
        if (GMIME_IS_MULTIPART(body))
            return recode_object(rc, body, own, depth + 1);
        if (asprintf(&sub, "%s.1", own) < 0) {
            cms_set_error(rc->err, CMS_ERR_INTERNAL, "out of memory");
            return -1;
        }
        r = recode_object(rc, body, sub, depth + 1);
        free(sub);
        return r;
    }
    if (GMIME_IS_PART(obj))
        return recode_leaf(rc, GMIME_PART(obj), own, depth == 0);
    return 0;
}

/* GMime keeps about 2 KiB per part it parses: 100,000 empty parts in a
 * 3.8 MB body took 218 MB. A part needs a line that starts with "--" (its
 * delimiter), so counting those lines before GMime sees the text bounds
 * what it builds to about twice the body, whatever the boundaries are
 * (a boundary may be dashes only, so no such line is left out). */
#define MAX_PARTS_BASE 2000
#define PART_PER_BYTES 1024

static int too_many_parts(struct recoder *rc)
{
    const unsigned char *p = rc->text, *end = rc->text + rc->text_len;
    size_t lines = 0, max = MAX_PARTS_BASE + rc->text_len / PART_PER_BYTES;

    while (p < end) {
        if (end - p >= 2 && p[0] == '-' && p[1] == '-' && ++lines > max) {
            cms_set_error(rc->err, CMS_ERR_INPUT,
                          "the entity has more than %zu lines that start with "
                          "\"--\" (%d, and one per KiB; each part needs one)",
                          max, MAX_PARTS_BASE);
            return 1;
        }
        p = memchr(p, '\n', (size_t)(end - p));
        if (p == NULL)
            break;
        p++;
    }
    return 0;
}

/* Rewrites the parts of rc->text that are not 7-bit safe into rc->out. */
static int recode(struct recoder *rc)
{
    GMimeStream *stream;
    GMimeParser *parser;
    GMimeObject *root;
    int r = -1;

    /* GMime keeps a memory stream in a GByteArray, whose length is a guint. */
    if (rc->text_len > G_MAXUINT) {
        cms_set_error(rc->err, CMS_ERR_INPUT, "the entity is too large");
        return -1;
    }
    if (too_many_parts(rc))
        return -1;
    stream =
        g_mime_stream_mem_new_with_buffer((const char *)rc->text, rc->text_len);
    parser = g_mime_parser_new_with_stream(stream);
    g_mime_parser_set_persist_stream(parser, TRUE);
    root = g_mime_parser_construct_part(parser, NULL);
    if (root == NULL) {
        cms_set_error(rc->err, CMS_ERR_INPUT, "GMime cannot parse the entity");
    } else {
        r = recode_object(rc, root, "", 0);
        g_object_unref(root);
    }
    g_object_unref(parser);
    g_object_unref(stream);
    if (r == 0 && rc->n_parts > 0 &&
        cms_buf_add(&rc->out, rc->text + rc->copied,
                    rc->text_len - rc->copied)) {
        cms_set_error(rc->err, CMS_ERR_INTERNAL, "out of memory");
        r = -1;
    }
    return r;
}

/*
 * Naming where an entity is not 7-bit safe. GMime's tree cannot say: it
 * leaves out text it cannot place (the lines after a part's header block
 * that no blank line ends, a part that starts with such a line), which is
 * just where such faults hide. So a small reader of its own follows the
 * header blocks and delimiters down to the fault; it only words the
 * message, the decision is transport_fault's.
 */
struct locator {
    const unsigned char *s;
    size_t at;        /* the fault */
    const char *what; /* and what it is */
    cms_error *err;
};

/* Whether the line s[0..n) starts a header field: "name:" with blanks
 * allowed before the colon. */
static int is_field_line(const unsigned char *s, size_t n)
{
    size_t k = 0;

    while (k < n && cms_is_ftext(s[k]))
        k++;
    if (k == 0)
        return 0;
    while (k < n && cms_is_blank(s[k]))
        k++;
    return k < n && s[k] == ':';
}

/* "part NUM", or "the entity" for the root (num ""). */
static void part_label(const char *num, char *buf, size_t size)
{
    if (*num)
        snprintf(buf, size, "part %s", num);
    else
        snprintf(buf, size, "the entity");
}

/* The error for a fault in a region of the part labelled num: "part 2:
 * REGION 8-bit octets, which cannot be made 7-bit safe", then why.
 * frozen names the multipart/signed or multipart/encrypted around the
 * part, if any, and is the reason then. */
static void fault_error(const struct locator *lc, const char *num,
                        const char *region, const char *why, const char *frozen)
{
    char label[128], inside[64] = "";

    part_label(num, label, sizeof(label));
    if (frozen != NULL) {
        snprintf(inside, sizeof(inside), " inside a multipart/%s", frozen);
        why = " (re-encoding would break it)";
    }
    cms_set_error(lc->err, CMS_ERR_INPUT,
                  "%s: %s %s, which cannot be made 7-bit safe%s%s", label,
                  region, lc->what, inside, why);
}

static void locate(const struct locator *lc, size_t start, size_t end,
                   const char *num, const char *leaf_num, const char *frozen,
                   int depth);

/* Sub-part n of base, IMAP style ("" + 2 is "2", "3" + 2 is "3.2"); NULL
 * with err set when out of memory. */
static char *sub_number(const struct locator *lc, const char *base, int n)
{
    char *sub;

    if (asprintf(&sub, *base ? "%s.%d" : "%s%d", base, n) < 0) {
        cms_set_error(lc->err, CMS_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    return sub;
}

/* Locates the fault in the body s[body..end) of the multipart labelled
 * num with the given boundary. */
static void locate_in_multipart(const struct locator *lc, size_t body,
                                size_t end, const char *num,
                                const char *boundary, const char *frozen,
                                int depth)
{
    size_t blen = strlen(boundary), pos, next, part_start = body;
    int parts = 0, close = 0;
    char *sub;

    for (pos = body; pos < end; pos = next) {
        next = cms_line_end(lc->s, end, pos);
        if (!cms_is_delimiter(lc->s, pos, cms_line_text_len(lc->s, pos, next),
                              boundary, blen, &close))
            continue;
        if (lc->at < pos)
            break;
        if (lc->at < next) {
            fault_error(lc, num, "a delimiter line has", "", frozen);
            return;
        }
        if (close) {
            fault_error(lc, num, "the multipart epilogue has", "", frozen);
            return;
        }
        parts++;
        part_start = next;
    }
    if (parts == 0) {
        fault_error(lc, num, "the multipart preamble has", "", frozen);
        return;
    }
    /* The CRLF before a delimiter belongs to the delimiter. */
    if (pos < end && pos >= part_start + 2)
        pos -= 2;
    sub = sub_number(lc, num, parts);
    if (sub != NULL)
        locate(lc, part_start, pos, sub, sub, frozen, depth + 1);
    free(sub);
}

/* Locates the fault in the entity s[start..end), labelled num; leaf_num
 * labels it when it is neither a multipart nor a message ("1" for a
 * single-part root) and is the base of the numbers inside an
 * encapsulated message. */
static void locate(const struct locator *lc, size_t start, size_t end,
                   const char *num, const char *leaf_num, const char *frozen,
                   int depth)
{
    cms_header_block hb = {0};
    GMimeContentType *ct = NULL;
    const char *boundary = NULL, *inner = frozen;
    size_t pos, next, n, body = end;
    char *sub = NULL;
    int stray = 0;

    for (pos = start; pos < end; pos = next) {
        next = cms_line_end(lc->s, end, pos);
        n = cms_line_text_len(lc->s, pos, next);
        if (n == 0) {
            body = next;
            break;
        }
        if (!cms_is_blank(lc->s[pos]) && !is_field_line(lc->s + pos, n)) {
            stray = 1;
            break;
        }
    }
    if (lc->at < pos) {
        fault_error(lc, num, "a header field has",
                    " (header fields are not re-encoded)", frozen);
        goto out;
    }
    if (stray) {
        fault_error(lc, num,
                    "its header block does not end in a blank line, and the "
                    "lines after it have",
                    "", frozen);
        goto out;
    }
    if (depth < MAX_DEPTH &&
        cms_header_block_read(lc->s + start, body - start, &hb, NULL) == 0 &&
        hb.content_type != NULL) {
        ct = g_mime_content_type_parse(NULL, hb.content_type);
        boundary = g_mime_content_type_get_parameter(ct, "boundary");
    }
    if (boundary != NULL && g_mime_content_type_is_type(ct, "multipart", "*")) {
        if (inner == NULL &&
            g_mime_content_type_is_type(ct, "multipart", "signed"))
            inner = "signed";
        else if (inner == NULL &&
                 g_mime_content_type_is_type(ct, "multipart", "encrypted"))
            inner = "encrypted";
        locate_in_multipart(lc, body, end, num, boundary, inner, depth);
    } else if (ct != NULL &&
               g_mime_content_type_is_type(ct, "message", "rfc822")) {
        /* As recode_object numbers them: the encapsulated header block is
         * the part's, its children or body are leaf_num.1, ... */
        sub = sub_number(lc, leaf_num, 1);
        if (sub != NULL)
            locate(lc, body, end, leaf_num, sub, frozen, depth + 1);
    } else {
        fault_error(lc, leaf_num, "its body has", "", frozen);
    }
out:
    free(sub);
    if (ct != NULL)
        g_object_unref(ct);
    cms_header_block_release(&hb);
}

/* Drops the white space ending each line of s[0..len) outside the frozen
 * ranges, and lines of white space alone, into *out: 1 when that changed
 * anything, 0 when s stays as it is (out untouched). After re-encoding,
 * such lines can only be header fields, preambles, epilogues and
 * delimiters. */
static int strip_line_ends(const unsigned char *s, size_t len,
                           size_t (*frozen)[2], size_t n_frozen, cms_buf *out,
                           cms_error *err)
{
    cms_buf buf = {0};
    size_t pos, end, n, m, k = 0, copied = 0;

    for (pos = 0; pos < len; pos = end) {
        end = cms_line_end(s, len, pos);
        while (k < n_frozen && frozen[k][1] <= pos)
            k++;
        if (k < n_frozen && frozen[k][0] <= pos)
            continue;
        n = cms_line_text_len(s, pos, end);
        for (m = n; m > 0 && cms_is_blank(s[pos + m - 1]); m--)
            ;
        if (m == n)
            continue;
        if ((copied == 0 && cms_buf_reserve(&buf, len)) ||
            cms_buf_add(&buf, s + copied, pos + m - copied) ||
            (m > 0 && cms_buf_add(&buf, s + pos + n, end - pos - n)))
            goto oom;
        copied = end;
    }
    if (copied == 0)
        return 0;
    if (cms_buf_add(&buf, s + copied, len - copied))
        goto oom;
    *out = buf;
    return 1;
oom:
    cms_buf_release(&buf);
    cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
    return -1;
}

/* Refuses the inner entity s[0..len) when it is still not 7-bit safe after
 * re-encoding: what is left is what re-encoding does not touch (header
 * fields, preambles and epilogues, parts inside multipart/signed), and
 * signing it would give a signature that 7-bit transport breaks. */
static int check_transport_safe(const unsigned char *s, size_t len,
                                cms_error *err)
{
    struct locator lc = {s, 0, NULL, err};

    lc.what = transport_fault(s, len, &lc.at);
    if (lc.what == NULL)
        return 0;
    locate(&lc, 0, len, "", "1", NULL, 0);
    return -1;
}

/* Whether the header fields s[0..len) name a multipart or message type, or
 * an 8-bit or binary encoding: the cases where GMime's walk might change
 * a 7-bit safe entity (see the decisions above). Any mention counts,
 * parameters and comments included: a false alarm only costs the walk. */
static int headers_need_walk(const unsigned char *s, size_t len)
{
    static const char *const words[] = {"multipart", "message", "8bit", "8-bit",
                                        "binary"};
    char *lower = malloc(len + 1);
    size_t i;
    int r = 0;

    if (lower == NULL)
        return 1;
    for (i = 0; i < len; i++)
        lower[i] = g_ascii_tolower(s[i]);
    for (i = 0; i < sizeof(words) / sizeof(words[0]) && !r; i++)
        r = memmem(lower, len, words[i], strlen(words[i])) != NULL;
    free(lower);
    return r;
}

int cms_entity_parse_walk(const unsigned char *mime, size_t len,
                          cms_entity *ent, int always_walk, cms_error *err)
{
    cms_buf canon = {0}, outer = {0}, inner = {0}, own = {0}, stripped = {0};
    const unsigned char *text = mime, *content;
    size_t text_len = len, content_len, start, at;
    struct recoder rc;
    size_t body, i;
    int r = -1, changed;

    memset(&rc, 0, sizeof(rc));
    if (mime == NULL || len == 0) {
        cms_set_error(err, CMS_ERR_INPUT, "the MIME entity is empty");
        goto out;
    }
    if (!cms_is_canonical(mime, len)) {
        if (cms_buf_reserve(&canon, len + len / 32 + 2) ||
            cms_buf_add_canonical(&canon, mime, len)) {
            cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
            goto out;
        }
        text = canon.data;
        text_len = canon.len;
    }
    if (cms_headers_split(text, text_len, &outer, &inner, &body, err))
        goto out;
    rc.text_body = inner.len + 2;
    /* The inner fields, a blank line and the body. When the fields end
     * the header block, those are the octets from the first of them on
     * (the same octets, whatever the reason): no copy of the body. */
    start = body >= inner.len + 2 ? body - 2 - inner.len : 0;
    if (body >= inner.len + 2 && memcmp(text + body - 2, "\r\n", 2) == 0 &&
        (inner.len == 0 || memcmp(text + start, inner.data, inner.len) == 0)) {
        content = text + start;
        content_len = text_len - start;
        own = canon;
        memset(&canon, 0, sizeof(canon));
    } else {
        if (cms_buf_reserve(&inner, 2 + text_len - body) ||
            cms_buf_add(&inner, "\r\n", 2) ||
            cms_buf_add(&inner, text + body, text_len - body)) {
            cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
            goto out;
        }
        own = inner;
        memset(&inner, 0, sizeof(inner));
        content = own.data;
        content_len = own.len;
    }
    cms_buf_release(&canon);

    if (always_walk || headers_need_walk(content, rc.text_body) ||
        transport_fault(content, content_len, &at) != NULL) {
        rc.raw = mime;
        rc.raw_len = len;
        rc.text = content;
        rc.text_len = content_len;
        rc.canon_body = body;
        rc.err = err;
        if (recode(&rc))
            goto out;
        if (rc.n_parts > 0) {
            cms_buf_release(&own);
            own = rc.out;
            memset(&rc.out, 0, sizeof(rc.out));
            content = own.data;
            content_len = own.len;
        }
        changed = strip_line_ends(content, content_len, rc.frozen, rc.n_frozen,
                                  &stripped, err);
        if (changed < 0)
            goto out;
        if (changed) {
            cms_buf_release(&own);
            own = stripped;
            memset(&stripped, 0, sizeof(stripped));
            content = own.data;
            content_len = own.len;
        }
        if (check_transport_safe(content, content_len, err))
            goto out;
    }

    ent->outer = outer;
    ent->own = own;
    ent->content.data = content;
    ent->content.len = content_len;
    ent->reencoded = rc.parts;
    ent->n_reencoded = rc.n_parts;
    memset(&outer, 0, sizeof(outer));
    memset(&own, 0, sizeof(own));
    rc.parts = NULL;
    rc.n_parts = 0;
    r = 0;
out:
    for (i = 0; i < rc.n_parts; i++)
        free(rc.parts[i]);
    free(rc.parts);
    free(rc.frozen);
    cms_buf_release(&rc.out);
    cms_buf_release(&canon);
    cms_buf_release(&outer);
    cms_buf_release(&inner);
    cms_buf_release(&own);
    cms_buf_release(&stripped);
    return r;
}

int cms_entity_parse(const unsigned char *mime, size_t len, cms_entity *ent,
                     cms_error *err)
{
    return cms_entity_parse_walk(mime, len, ent, 0, err);
}
