/*
 * The MIME side: split the submitted entity into the top-level mail
 * headers, which stay outside the signature or encryption, and the entity
 * to sign or encrypt; make that entity CRLF-canonical and 7-bit safe (RFC
 * 8551 §3.1); wrap the CMS structure around it as S/MIME. And the way back:
 * read a header block, undo a transfer encoding, read the CMS structure.
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
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "cms/internal.h"

/* RFC 5322 §2.1.1, without the CRLF. */
#define LINE_MAX_OCTETS 998
/* Real mail nests a handful of levels. GMime stops parsing at 1024 and
 * leaves deeper parts unparsed, so they could not be made 7-bit safe. */
#define MAX_DEPTH 64

static pthread_once_t gmime_once = PTHREAD_ONCE_INIT;

/* g_mime_init registers every GType the parser creates, but GLib still
 * builds each class on its first instance, from whichever request thread
 * gets there first, behind a lock-free fast path that race detectors (and
 * readers of the memory model) cannot vouch for. Building every class we
 * reach here, before the daemon starts its threads, leaves nothing lazy. */
static void gmime_init_all(void)
{
    GType types[] = {
        GMIME_TYPE_PART,
        GMIME_TYPE_TEXT_PART,
        GMIME_TYPE_MULTIPART,
        GMIME_TYPE_MULTIPART_SIGNED,
        GMIME_TYPE_MULTIPART_ENCRYPTED,
        GMIME_TYPE_MESSAGE,
        GMIME_TYPE_MESSAGE_PART,
        GMIME_TYPE_MESSAGE_PARTIAL,
        GMIME_TYPE_APPLICATION_PKCS7_MIME,
        GMIME_TYPE_PARSER,
        GMIME_TYPE_STREAM_MEM,
        GMIME_TYPE_STREAM_FILTER,
        GMIME_TYPE_STREAM_NULL,
        GMIME_TYPE_DATA_WRAPPER,
        GMIME_TYPE_CONTENT_TYPE,
        GMIME_TYPE_CONTENT_DISPOSITION,
        GMIME_TYPE_PARAM,
        GMIME_TYPE_PARAM_LIST,
        GMIME_TYPE_HEADER,
        GMIME_TYPE_HEADER_LIST,
        GMIME_TYPE_FILTER_BASIC,
        GMIME_TYPE_FILTER_BEST,
        GMIME_TYPE_FILTER_CHARSET,
        GMIME_TYPE_FILTER_DOS2UNIX,
        GMIME_TYPE_FILTER_UNIX2DOS,
        GMIME_TYPE_FILTER_FROM,
    };
    size_t i;

    g_mime_init();
    for (i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (G_TYPE_IS_CLASSED(types[i]))
            g_type_class_ref(types[i]);
}

void cms_init(void)
{
    pthread_once(&gmime_once, gmime_init_all);
}

int cms_buf_add(cms_buf *buf, const void *data, size_t len)
{
    unsigned char *p;
    size_t need, cap;

    if (len == 0)
        return 0;
    if (len > SIZE_MAX - buf->len)
        return -1;
    need = buf->len + len;
    if (need > buf->cap) {
        cap = buf->cap ? buf->cap : 256;
        while (cap < need)
            cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        p = realloc(buf->data, cap);
        if (p == NULL)
            return -1;
        buf->data = p;
        buf->cap = cap;
    }
    memcpy(buf->data + buf->len, data, len);
    buf->len = need;
    return 0;
}

int cms_buf_reserve(cms_buf *buf, size_t len)
{
    unsigned char *p;

    if (len > SIZE_MAX - buf->len)
        return -1;
    if (buf->len + len <= buf->cap)
        return 0;
    p = realloc(buf->data, buf->len + len);
    if (p == NULL)
        return -1;
    buf->data = p;
    buf->cap = buf->len + len;
    return 0;
}

void cms_buf_release(cms_buf *buf)
{
    free(buf->data);
    buf->data = NULL;
    buf->len = 0;
    buf->cap = 0;
}

int cms_buf_add_str(cms_buf *buf, const char *s)
{
    return cms_buf_add(buf, s, strlen(s));
}

void cms_entity_release(cms_entity *ent)
{
    size_t i;

    cms_buf_release(&ent->outer);
    cms_buf_release(&ent->own);
    ent->content.data = NULL;
    ent->content.len = 0;
    for (i = 0; i < ent->n_reencoded; i++)
        free(ent->reencoded[i]);
    free(ent->reencoded);
    ent->reencoded = NULL;
    ent->n_reencoded = 0;
}

void cms_entity_set_content(cms_entity *ent, cms_buf *buf)
{
    cms_buf_release(&ent->own);
    ent->own = *buf;
    memset(buf, 0, sizeof(*buf));
    ent->content.data = ent->own.data;
    ent->content.len = ent->own.len;
}

/*
 * Appends in[0..len) with every bare CR and bare LF turned into CRLF. With
 * qp_armour (quoted-printable text only), a line starting "From " starts
 * "=46rom " (mbox-style transports mangle such lines) and one starting
 * "--" starts "=2D-": a soft line break can put a delimiter of an
 * enclosing multipart at the start of a line, where it would end the part.
 * Both make that line two octets longer than QP's 76. GMime's From filter is
 * not used: it allocates a stack node per "From " line in its input.
 */
static int add_crlf(cms_buf *out, const unsigned char *in, size_t len,
                    int qp_armour)
{
    size_t i, run = 0;
    int line_start = 1;

    for (i = 0; i < len; i++) {
        if (qp_armour && line_start &&
            ((len - i >= 5 && memcmp(in + i, "From ", 5) == 0) ||
             (len - i >= 2 && memcmp(in + i, "--", 2) == 0))) {
            if (cms_buf_add(out, in + run, i - run) ||
                cms_buf_add_str(out, in[i] == 'F' ? "=46" : "=2D"))
                return -1;
            run = i + 1;
        }
        line_start = 0;
        if (in[i] != '\r' && in[i] != '\n')
            continue;
        if (cms_buf_add(out, in + run, i - run) || cms_buf_add(out, "\r\n", 2))
            return -1;
        if (in[i] == '\r' && i + 1 < len && in[i + 1] == '\n')
            i++;
        run = i + 1;
        line_start = 1;
    }
    return cms_buf_add(out, in + run, len - run);
}

int cms_buf_add_canonical(cms_buf *buf, const unsigned char *in, size_t len)
{
    return add_crlf(buf, in, len, 0);
}

/* Whether s[0..len) has CRLF line ends only, no bare CR or LF: what
 * add_crlf would copy unchanged. memchr keeps it near memory speed. */
static int is_canonical(const unsigned char *s, size_t len)
{
    const unsigned char *p = s, *end = s + len, *lf;

    while (p < end) {
        lf = memchr(p, '\n', (size_t)(end - p));
        if (lf == NULL)
            return memchr(p, '\r', (size_t)(end - p)) == NULL;
        if (lf == p || lf[-1] != '\r' ||
            memchr(p, '\r', (size_t)(lf - 1 - p)) != NULL)
            return 0;
        p = lf + 1;
    }
    return 1;
}

/* End of the line starting at pos: just past its LF, or len. */
static size_t line_end(const unsigned char *s, size_t len, size_t pos)
{
    const unsigned char *lf = memchr(s + pos, '\n', len - pos);

    return lf ? (size_t)(lf - s) + 1 : len;
}

/* Length of the canonical line s[pos..end) without its CRLF. */
static size_t line_text_len(const unsigned char *s, size_t pos, size_t end)
{
    size_t n = end - pos;

    if (n >= 2 && s[end - 1] == '\n' && s[end - 2] == '\r')
        n -= 2;
    return n;
}

static int is_blank(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* RFC 5322 ftext: printable US-ASCII except the colon. */
static int is_ftext(unsigned char c)
{
    return c > ' ' && c < 127 && c != ':';
}

static int name_is(const unsigned char *s, size_t n, const char *name)
{
    size_t i;

    if (n != strlen(name))
        return 0;
    for (i = 0; i < n; i++) {
        if (g_ascii_tolower(s[i]) != g_ascii_tolower(name[i]))
            return 0;
    }
    return 1;
}

/* Whether the field starting line[0..n) is called name; RFC 5322's obsolete
 * syntax allows blanks before the colon. */
static int field_is(const unsigned char *line, size_t n, const char *name)
{
    size_t k = strlen(name);

    if (n < k || !name_is(line, k, name))
        return 0;
    while (k < n && is_blank(line[k]))
        k++;
    return k < n && line[k] == ':';
}

static int is_content_field(const unsigned char *name, size_t n)
{
    return (n > 8 && name_is(name, 8, "Content-")) ||
           name_is(name, n, "MIME-Version");
}

/*
 * Checks the header line s[pos..pos+n) (lineno counts from 1; continued: a
 * field precedes it, so a line starting with a blank continues it). The
 * length of its field name, 0 for a continuation line, or -1 with err set.
 */
static long check_header_line(const unsigned char *s, size_t pos, size_t n,
                              size_t lineno, int continued, cms_error *err)
{
    const unsigned char *colon;
    size_t k, i;

    if (memchr(s + pos, '\0', n) != NULL) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "header line %zu contains a NUL octet", lineno);
        return -1;
    }
    if (is_blank(s[pos])) {
        if (continued)
            return 0;
        cms_set_error(err, CMS_ERR_INPUT,
                      "header line %zu continues a field, but no field "
                      "precedes it",
                      lineno);
        return -1;
    }
    colon = memchr(s + pos, ':', n);
    if (colon == NULL) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "header line %zu has no colon (missing blank line "
                      "between headers and body?)",
                      lineno);
        return -1;
    }
    k = (size_t)(colon - (s + pos));
    while (k > 0 && is_blank(s[pos + k - 1]))
        k--;
    if (k == 0) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "header line %zu has an empty field name", lineno);
        return -1;
    }
    for (i = 0; i < k; i++) {
        if (s[pos + i] <= ' ' || s[pos + i] >= 127) {
            cms_set_error(err, CMS_ERR_INPUT,
                          "header line %zu has octet 0x%02x in its field name",
                          lineno, s[pos + i]);
            return -1;
        }
    }
    return (long)k;
}

/* Counts the field line[0..n) when it is called name; 1 when one was
 * counted before. */
static int repeats(int *seen, const unsigned char *line, size_t n,
                   const char *name)
{
    return name_is(line, n, name) && (*seen)++ > 0;
}

/*
 * Splits the header block of the canonical entity s[0..len): Content-* and
 * MIME-Version fields go to inner, the others to outer, each line CRLF
 * terminated. *body is where the body starts (len when there is none).
 * Two Content-Type or Content-Transfer-Encoding fields are refused, as by
 * cms_header_block_read, which reads the entity back after decryption and
 * verification.
 */
static int split_headers(const unsigned char *s, size_t len, cms_buf *outer,
                         cms_buf *inner, size_t *body, cms_error *err)
{
    cms_buf *dst = NULL;
    size_t pos = 0, end, n, lineno = 0;
    int types = 0, encodings = 0;
    long k;

    while (pos < len) {
        end = line_end(s, len, pos);
        n = line_text_len(s, pos, end);
        if (n == 0) {
            *body = end;
            return 0;
        }
        k = check_header_line(s, pos, n, ++lineno, dst != NULL, err);
        if (k < 0)
            return -1;
        if (k > 0 && (repeats(&types, s + pos, (size_t)k, "Content-Type") ||
                      repeats(&encodings, s + pos, (size_t)k,
                              "Content-Transfer-Encoding"))) {
            cms_set_error(err, CMS_ERR_INPUT,
                          "header line %zu repeats the %.*s field", lineno,
                          (int)k, (const char *)s + pos);
            return -1;
        }
        if (k > 0)
            dst = is_content_field(s + pos, (size_t)k) ? inner : outer;
        if (cms_buf_add(dst, s + pos, n) || cms_buf_add(dst, "\r\n", 2)) {
            cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
            return -1;
        }
        pos = end;
    }
    *body = len;
    return 0;
}

int cms_outer_read(const unsigned char *s, size_t len, cms_buf *outer,
                   cms_error *err)
{
    cms_header_block hb = {0};
    cms_buf canon = {0}, inner = {0}, fields = {0};
    size_t body;
    int r = -1;

    if (cms_header_block_read(s, len, &hb, err))
        goto out;
    if (add_crlf(&canon, s, hb.body, 0)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (split_headers(canon.data, canon.len, &fields, &inner, &body, err))
        goto out;
    *outer = fields;
    memset(&fields, 0, sizeof(fields));
    r = 0;
out:
    cms_buf_release(&fields);
    cms_buf_release(&inner);
    cms_buf_release(&canon);
    cms_header_block_release(&hb);
    return r;
}

/* The field names of the header block at the start of s[0..len),
 * lowercased, as the keys of a set: one lookup per outer field keeps
 * restoring linear in the number of fields on both sides. */
static GHashTable *field_names(const unsigned char *s, size_t len)
{
    GHashTable *names =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    size_t pos, end, n;

    for (pos = 0; pos < len; pos = end) {
        end = line_end(s, len, pos);
        if (s[pos] == '\n' || line_text_len(s, pos, end) == 0)
            break;
        for (n = 0; pos + n < end && is_ftext(s[pos + n]); n++)
            ;
        if (n > 0 && !is_blank(s[pos]))
            g_hash_table_add(names,
                             g_ascii_strdown((const char *)s + pos, (gssize)n));
    }
    return names;
}

int cms_outer_restore(const cms_buf *outer, cms_buf *content, cms_error *err)
{
    cms_header_block hb = {0};
    GHashTable *names;
    cms_buf out = {0};
    size_t pos, end, n;
    char *name;
    int keep = 0, lf, r = -1;

    /* Content without a header block (foreign signed data can be
     * anything) would take the fields as its first lines. */
    if (outer->len == 0 ||
        cms_header_block_read(content->data, content->len, &hb, NULL) != 0)
        return 0;
    cms_header_block_release(&hb);
    names = field_names(content->data, content->len);
    /* In the content's own line ends: a bare LF one does not get CRLF
     * fields. */
    end = line_end(content->data, content->len, 0);
    lf = end > 0 && content->data[end - 1] == '\n' &&
         (end < 2 || content->data[end - 2] != '\r');
    for (pos = 0; pos < outer->len; pos = end) {
        end = line_end(outer->data, outer->len, pos);
        if (!is_blank(outer->data[pos])) {
            for (n = 0; is_ftext(outer->data[pos + n]); n++)
                ;
            name = g_ascii_strdown((const char *)outer->data + pos, (gssize)n);
            keep = !g_hash_table_contains(names, name);
            g_free(name);
        }
        if (keep && (cms_buf_add(&out, outer->data + pos, end - pos - 2) ||
                     cms_buf_add_str(&out, lf ? "\n" : "\r\n")))
            goto oom;
    }
    if (cms_buf_add(&out, content->data, content->len))
        goto oom;
    cms_buf_release(content);
    *content = out;
    memset(&out, 0, sizeof(out));
    r = 0;
    goto done;
oom:
    cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
done:
    cms_buf_release(&out);
    g_hash_table_destroy(names);
    return r;
}

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
            (n > 0 && is_blank(p[n - 1])) ||
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
        if (is_blank(s[i]) &&
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
        end = line_end(text, to, pos);
        if (!is_blank(text[pos]))
            dropping =
                field_is(text + pos, end - pos, "Content-Transfer-Encoding");
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

static int add_encoded(cms_buf *out, const unsigned char *in, size_t len,
                       GMimeContentEncoding encoding)
{
    GMimeEncoding state;
    char *enc;
    size_t n;
    int r;

    g_mime_encoding_init_encode(&state, encoding);
    enc = g_malloc(g_mime_encoding_outlen(&state, len));
    n = g_mime_encoding_flush(&state, (const char *)in, len, enc);
    r = add_crlf(out, (const unsigned char *)enc, n,
                 encoding == GMIME_CONTENT_ENCODING_QUOTEDPRINTABLE);
    g_free(enc);
    return r;
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
        add_encoded(&rc->out, src, src_len, encoding) ||
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
            end = line_end(rc->text, rc->text_len, pos - 2);
            if (cms_is_delimiter(rc->text, pos - 2,
                                 line_text_len(rc->text, pos - 2, end),
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
    return line_end(rc->text, rc->text_len, at);
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
        end = line_end(rc->text, rc->text_len, pos);
        n = line_text_len(rc->text, pos, end);
        if (n == 0)
            break;
        k = check_header_line(rc->text, pos, n, lineno, lineno > 1, &lerr);
        if (k < 0) {
            cms_set_error(rc->err, CMS_ERR_INPUT, "part %s: %s", num,
                          lerr.message);
            return -1;
        }
        /* Readers differ on which of two fields counts: the part one
         * recipient's client shows would not be another's. */
        if (k > 0 &&
            (repeats(&types, rc->text + pos, (size_t)k, "Content-Type") ||
             repeats(&encodings, rc->text + pos, (size_t)k,
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
        if (cms_is_delimiter(rc->text, prev, line_text_len(rc->text, prev, pos),
                             boundary, blen, &close))
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

int cms_is_delimiter(const unsigned char *s, size_t pos, size_t n,
                     const char *boundary, size_t blen, int *close)
{
    size_t k;
    int closing;

    if (n < 2 + blen || s[pos] != '-' || s[pos + 1] != '-' ||
        memcmp(s + pos + 2, boundary, blen) != 0)
        return 0;
    k = 2 + blen;
    closing = n - k >= 2 && s[pos + k] == '-' && s[pos + k + 1] == '-';
    if (closing)
        k += 2;
    while (k < n && is_blank(s[pos + k]))
        k++;
    if (k != n)
        return 0;
    *close = closing;
    return 1;
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

    while (k < n && is_ftext(s[k]))
        k++;
    if (k == 0)
        return 0;
    while (k < n && is_blank(s[k]))
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
        next = line_end(lc->s, end, pos);
        if (!cms_is_delimiter(lc->s, pos, line_text_len(lc->s, pos, next),
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
        next = line_end(lc->s, end, pos);
        n = line_text_len(lc->s, pos, next);
        if (n == 0) {
            body = next;
            break;
        }
        if (!is_blank(lc->s[pos]) && !is_field_line(lc->s + pos, n)) {
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
        end = line_end(s, len, pos);
        while (k < n_frozen && frozen[k][1] <= pos)
            k++;
        if (k < n_frozen && frozen[k][0] <= pos)
            continue;
        n = line_text_len(s, pos, end);
        for (m = n; m > 0 && is_blank(s[pos + m - 1]); m--)
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
    if (!is_canonical(mime, len)) {
        if (cms_buf_reserve(&canon, len + len / 32 + 2) ||
            add_crlf(&canon, mime, len, 0)) {
            cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
            goto out;
        }
        text = canon.data;
        text_len = canon.len;
    }
    if (split_headers(text, text_len, &outer, &inner, &body, err))
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

/* ---- reading S/MIME entities ---------------------------------------- */

/* Stores the value of the field whose text after the colon is s[from..to),
 * unfolded (line breaks removed, RFC 5322 §2.2.3) and without surrounding
 * blanks. The block has no NUL octets, so the value is a C string. */
static int take_value(const unsigned char *s, size_t from, size_t to,
                      char **slot)
{
    char *v = malloc(to - from + 1);
    size_t i, n = 0, skip = 0;

    if (v == NULL)
        return -1;
    for (i = from; i < to; i++) {
        if (s[i] != '\r' && s[i] != '\n')
            v[n++] = (char)s[i];
    }
    while (n > 0 && is_blank((unsigned char)v[n - 1]))
        n--;
    while (skip < n && is_blank((unsigned char)v[skip]))
        skip++;
    memmove(v, v + skip, n - skip);
    v[n - skip] = '\0';
    *slot = v;
    return 0;
}

void cms_header_block_release(cms_header_block *hb)
{
    free(hb->content_type);
    free(hb->transfer_encoding);
    memset(hb, 0, sizeof(*hb));
}

int cms_header_block_read(const unsigned char *s, size_t len,
                          cms_header_block *hb, cms_error *err)
{
    cms_header_block h = {0};
    char **slot = NULL; /* where the value of the current field goes */
    size_t pos = 0, end, n, k, name_len, lineno = 0, value = 0, field_end = 0;
    int r = -1;

    h.body = len;
    while (pos < len) {
        end = line_end(s, len, pos);
        lineno++;
        if (s[end - 1] != '\n') {
            cms_set_error(err, CMS_ERR_INPUT,
                          "header line %zu does not end in a line break",
                          lineno);
            goto out;
        }
        n = end - 1 - pos;
        if (n > 0 && s[pos + n - 1] == '\r')
            n--;
        if (memchr(s + pos, '\0', n) != NULL ||
            memchr(s + pos, '\r', n) != NULL) {
            cms_set_error(err, CMS_ERR_INPUT,
                          "header line %zu contains a NUL or a bare CR",
                          lineno);
            goto out;
        }
        if (n == 0 || !is_blank(s[pos])) {
            if (slot != NULL && take_value(s, value, field_end, slot)) {
                cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
                goto out;
            }
            slot = NULL;
        }
        if (n == 0) {
            h.body = end;
            break;
        }
        if (is_blank(s[pos])) {
            if (h.n_fields == 0) {
                cms_set_error(err, CMS_ERR_INPUT,
                              "header line %zu continues a field, but no "
                              "field precedes it",
                              lineno);
                goto out;
            }
        } else {
            for (k = 0; k < n && is_ftext(s[pos + k]); k++)
                ;
            name_len = k;
            while (k < n && is_blank(s[pos + k]))
                k++;
            if (name_len == 0 || k == n || s[pos + k] != ':') {
                cms_set_error(err, CMS_ERR_INPUT,
                              "header line %zu is not a header field", lineno);
                goto out;
            }
            if (name_is(s + pos, name_len, "Content-Type"))
                slot = &h.content_type;
            else if (name_is(s + pos, name_len, "Content-Transfer-Encoding"))
                slot = &h.transfer_encoding;
            if (slot != NULL && *slot != NULL) {
                cms_set_error(err, CMS_ERR_INPUT,
                              "header line %zu repeats the %.*s field", lineno,
                              (int)name_len, (const char *)s + pos);
                goto out;
            }
            value = pos + k + 1;
            h.n_fields++;
            if (is_content_field(s + pos, name_len))
                h.n_mime_fields++;
        }
        field_end = end;
        pos = end;
    }
    if (slot != NULL && take_value(s, value, field_end, slot)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    *hb = h;
    memset(&h, 0, sizeof(h));
    r = 0;
out:
    cms_header_block_release(&h);
    return r;
}

static int base64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Strict about the alphabet and the padding, indifferent to line length and
 * blanks: gpgsm and others write unbroken base64, and a stray octet means
 * damage that a lenient decoder (GMime's, EVP_DecodeUpdate's) would turn
 * into a misleading CMS parse error. */
static int base64_decode(const unsigned char *in, size_t len, cms_buf *out,
                         cms_error *err)
{
    unsigned char chunk[3 * 256];
    size_t i, n = 0;
    unsigned long acc = 0;
    int k = 0, pad = 0, v;

    for (i = 0; i < len; i++) {
        if (in[i] == ' ' || in[i] == '\t' || in[i] == '\r' || in[i] == '\n')
            continue;
        if (in[i] == '=') {
            if (k < 2 || k + ++pad > 4) {
                cms_set_error(err, CMS_ERR_INPUT,
                              "the base64 body has misplaced padding at "
                              "offset %zu",
                              i);
                return -1;
            }
            continue;
        }
        v = base64_value(in[i]);
        if (v < 0 || pad > 0) {
            cms_set_error(err, CMS_ERR_INPUT,
                          "the base64 body has %s 0x%02x at offset %zu",
                          pad > 0 ? "data after the padding:" : "octet", in[i],
                          i);
            return -1;
        }
        acc = acc << 6 | (unsigned long)v;
        if (++k < 4)
            continue;
        chunk[n++] = (unsigned char)(acc >> 16);
        chunk[n++] = (unsigned char)(acc >> 8);
        chunk[n++] = (unsigned char)acc;
        acc = 0;
        k = 0;
        if (n == sizeof(chunk)) {
            if (cms_buf_add(out, chunk, n))
                goto oom;
            n = 0;
        }
    }
    if (k == 1 || (pad > 0 && k + pad != 4)) {
        cms_set_error(err, CMS_ERR_INPUT, "the base64 body is truncated");
        return -1;
    }
    /* Two or three leftover characters carry one or two octets, whether
     * or not the padding was written. */
    if (k == 2) {
        chunk[n++] = (unsigned char)(acc >> 4);
    } else if (k == 3) {
        chunk[n++] = (unsigned char)(acc >> 10);
        chunk[n++] = (unsigned char)(acc >> 2);
    }
    if (cms_buf_add(out, chunk, n))
        goto oom;
    return 0;
oom:
    cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
    return -1;
}

unsigned char *cms_base64_decode(const unsigned char *text, size_t len,
                                 size_t *out_len, cms_error *err)
{
    cms_buf b = {0};

    /* the reserve also makes empty input a buffer, not NULL */
    if (cms_buf_reserve(&b, len / 4 * 3 + 3) != 0) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return NULL;
    }
    if (base64_decode(text, len, &b, err) != 0) {
        cms_buf_release(&b);
        return NULL;
    }
    *out_len = b.len;
    return b.data;
}

int cms_smime_header_read(const unsigned char *mime, size_t len,
                          cms_header_block *hb, GMimeContentType **ct,
                          cms_error *err)
{
    cms_init();
    if (mime == NULL || len == 0) {
        cms_set_error(err, CMS_ERR_INPUT, "the entity is empty");
        return -1;
    }
    if (cms_header_block_read(mime, len, hb, err) != 0)
        return -1;
    if (hb->content_type == NULL) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "the entity has no Content-Type: not an S/MIME "
                      "entity");
        return -1;
    }
    *ct = g_mime_content_type_parse(NULL, hb->content_type);
    return 0;
}

int cms_is_pkcs7_mime(GMimeContentType *ct)
{
    return g_mime_content_type_is_type(ct, "application", "pkcs7-mime") ||
           g_mime_content_type_is_type(ct, "application", "x-pkcs7-mime");
}

void cms_content_type_text(GMimeContentType *ct, char *buf, size_t size)
{
    const char *type = g_mime_content_type_get_media_type(ct);
    const char *subtype = g_mime_content_type_get_media_subtype(ct);
    char *both = g_strdup_printf("%s/%s", type != NULL ? type : "",
                                 subtype != NULL ? subtype : "");

    cms_text_escape(buf, size, both, strlen(both));
    g_free(both);
}

int cms_body_decode(const unsigned char *body, size_t len, const char *cte,
                    cms_buf *out, cms_error *err)
{
    char shown[41];

    if (cte != NULL && g_ascii_strcasecmp(cte, "base64") == 0)
        return base64_decode(body, len, out, err);
    if (cte != NULL && g_ascii_strcasecmp(cte, "7bit") != 0 &&
        g_ascii_strcasecmp(cte, "8bit") != 0 &&
        g_ascii_strcasecmp(cte, "binary") != 0) {
        cms_text_escape(shown, sizeof(shown), cte, strlen(cte));
        cms_set_error(err, CMS_ERR_INPUT,
                      "Content-Transfer-Encoding \"%s\" cannot carry CMS "
                      "data",
                      shown);
        return -1;
    }
    if (cms_buf_add(out, body, len)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

CMS_ContentInfo *cms_der_read(const unsigned char *der, size_t len,
                              cms_error *err)
{
    const unsigned char *p = der;
    CMS_ContentInfo *cms = NULL;
    size_t i;

    if (len == 0) {
        cms_set_error(err, CMS_ERR_INPUT, "the body holds no CMS structure");
        return NULL;
    }
    if (len > LONG_MAX) {
        cms_set_error(err, CMS_ERR_INPUT, "the CMS structure is too large");
        return NULL;
    }
    /* OpenSSL's decoder reads BER (indefinite lengths, constructed
     * strings), checks every length against the data and stops nesting at
     * 30 levels. */
    cms = d2i_CMS_ContentInfo(NULL, &p, (long)len);
    if (cms == NULL) {
        cms_set_ssl_error(err, CMS_ERR_INPUT,
                          "the body is not a CMS structure");
        ERR_clear_error();
        return NULL;
    }
    for (i = (size_t)(p - der); i < len; i++) {
        if (der[i] != ' ' && der[i] != '\t' && der[i] != '\r' &&
            der[i] != '\n') {
            cms_set_error(err, CMS_ERR_INPUT,
                          "%zu octets follow the CMS structure", len - i);
            CMS_ContentInfo_free(cms);
            return NULL;
        }
    }
    return cms;
}
