/*
 * Octets (mime.c has the decisions): GMime's set-up, the growable buffer,
 * CRLF canonicalisation, and the transfer encodings: quoted-printable and
 * base64 out, a strict base64 in, the DER of a CMS structure.
 */
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>
#include <openssl/err.h>

#include "cms/internal.h"

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

/* memchr keeps it near memory speed. */
int cms_is_canonical(const unsigned char *s, size_t len)
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

int cms_buf_add_encoded(cms_buf *out, const unsigned char *in, size_t len,
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
