/*
 * What libmicrohttpd 0.9.75 leaves of a request's bytes (service/wire.h).
 *
 * The header block sits in the connection's memory pool, from the request
 * line's first byte (the method) for header_size bytes; a folded line is
 * the one thing copied out of it (and refused). Each
 * line's CR and LF were overwritten with NUL, each name cut at its colon,
 * and each value recorded as the string after the colon's white space, so
 * the bytes from a value's recorded end to the next line's name are the
 * NULs of that line's end: one or two. More, or anything but NUL, means
 * the value held a NUL and what follows it was dropped. After the last
 * value come its line end and the blank line: two to four NULs.
 */
#include <string.h>
#include <strings.h>

#include "service/wire.h"

/* What the pool gives each header, query parameter and cookie recorded
 * (struct MHD_HTTP_Header, 56 bytes, rounded up to its 16-byte unit). */
#define WIRE_PER_VALUE 64
#define WIRE_ROUND(n) (((n) + 15) & ~(size_t)15)

typedef struct scan_state {
    wire_scan *out;
    const char *block, *block_end;
    /* the previous line's name and value as recorded */
    const char *name, *value;
    size_t value_len;
    int is_auth;
    unsigned n_te, n_cl, n_ctype, n_auth, n_host;
    const char *te;
    size_t cookies;
    api_error framing, other;
} scan_state;

/* The first problem of its kind is the one answered. */
#define note(slot, code, ...)                                                  \
    do {                                                                       \
        if ((slot)->status == 0)                                               \
            api_fail((slot), 400, (code), __VA_ARGS__);                        \
    } while (0)

/* Closes the previous line, which ends where next begins (the next name,
 * or the end of the block with at most max_nul NULs of line ends). */
static void close_line(scan_state *st, const char *next, size_t max_nul)
{
    const char *end = st->value + st->value_len, *last = end, *p;

    if (next < end || next > st->block_end)
        return;
    for (p = end; p < next; p++)
        if (*p != '\0')
            last = p + 1;
    /* NULs past the line end's own belong to the value */
    if ((size_t)(next - end) > max_nul && end + (next - end - max_nul) > last)
        last = end + (next - end - max_nul);
    if (last > end)
        note(&st->other, "invalid_header", "header \"%s\" holds a NUL byte",
             st->name);
    if (st->is_auth)
        st->out->authorization_len = (size_t)(last - st->value);
}

static int is_header(const char *key, const char *name)
{
    return strcasecmp(key, name) == 0;
}

static enum MHD_Result on_header(void *cls, enum MHD_ValueKind kind,
                                 const char *key, size_t key_size,
                                 const char *value, size_t value_size)
{
    scan_state *st = cls;
    size_t i;

    /* a folded line was moved elsewhere in the pool, out of the block */
    if (key < st->block || key >= st->block_end) {
        note(&st->other, "invalid_header", "header \"%s\" is folded over lines",
             key);
        st->value = NULL;
        return MHD_YES;
    }
    if (st->value != NULL)
        close_line(st, key, 2);
    st->name = key;
    st->value = value;
    st->value_len = value_size;
    /* the first Authorization is the one libmicrohttpd's lookup finds */
    st->is_auth =
        is_header(key, MHD_HTTP_HEADER_AUTHORIZATION) && st->n_auth++ == 0;
    for (i = 0; i < key_size; i++) {
        unsigned char c = (unsigned char)key[i];

        if (c <= 0x20 || c == 0x7f)
            note(&st->other, "invalid_header",
                 "header \"%s\" has white space or a control character in "
                 "its name",
                 key);
    }
    for (i = 0; i < value_size; i++) {
        unsigned char c = (unsigned char)value[i];

        if ((c < 0x20 && c != '\t') || c == 0x7f)
            note(&st->other, "invalid_header",
                 "header \"%s\" holds a control character", key);
    }
    if (st->is_auth) {
        st->out->authorization = value;
        st->out->authorization_len = value_size;
    }
    if (is_header(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) && st->n_te++ == 0)
        st->te = value;
    st->n_cl += is_header(key, MHD_HTTP_HEADER_CONTENT_LENGTH);
    st->n_ctype += is_header(key, MHD_HTTP_HEADER_CONTENT_TYPE);
    st->n_host += is_header(key, MHD_HTTP_HEADER_HOST);
    if (is_header(key, MHD_HTTP_HEADER_COOKIE))
        st->cookies += WIRE_ROUND(value_size + 1);
    return MHD_YES;
}

/* libmicrohttpd reads a body by Transfer-Encoding when there is one and
 * knows only "chunked": with any other coding it would read the body until
 * the connection closes. */
static void check_framing(scan_state *st)
{
    if (st->n_te > 1)
        note(&st->framing, "unsupported_transfer_encoding", "%s is given twice",
             MHD_HTTP_HEADER_TRANSFER_ENCODING);
    else if (st->n_te == 1 && strcasecmp(st->te, "chunked") != 0)
        note(&st->framing, "unsupported_transfer_encoding",
             "Transfer-Encoding \"%s\" is not supported: only chunked", st->te);
    else if (st->n_te == 1 && st->n_cl > 0)
        note(&st->framing, "invalid_header",
             "%s and Content-Length are both given",
             MHD_HTTP_HEADER_TRANSFER_ENCODING);
    else if (st->n_cl > 1)
        note(&st->framing, "invalid_header", "%s is given twice",
             MHD_HTTP_HEADER_CONTENT_LENGTH);
    st->out->chunked = st->n_te == 1 && st->framing.status == 0;
    if (st->n_auth > 1)
        note(&st->other, "invalid_header", "%s is given twice",
             MHD_HTTP_HEADER_AUTHORIZATION);
    if (st->n_ctype > 1)
        note(&st->other, "invalid_header", "%s is given twice",
             MHD_HTTP_HEADER_CONTENT_TYPE);
    if (st->n_host > 1)
        note(&st->other, "invalid_header", "%s is given twice",
             MHD_HTTP_HEADER_HOST);
}

/*
 * What the pool has left for the response head. Taken from it already:
 * the header block and a record per value. While a block arrives the read
 * buffer may have grown by up to an eighth of what was free past it; the
 * response is built once the buffer is cut back to the bytes read ahead,
 * which are none after a body unless the client pipelines its next
 * request behind it (the one case left to libmicrohttpd: README).
 */
static size_t pool_room(struct MHD_Connection *conn, const scan_state *st)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    size_t block = ci != NULL ? ci->header_size : WIRE_POOL_SIZE;
    int nvalues =
        MHD_get_connection_values(conn,
                                  MHD_HEADER_KIND | MHD_COOKIE_KIND |
                                      MHD_GET_ARGUMENT_KIND | MHD_FOOTER_KIND,
                                  NULL, NULL);
    size_t used = WIRE_ROUND(block) + WIRE_POOL_SIZE / 8 + st->cookies +
                  (size_t)(nvalues > 0 ? nvalues : 0) * WIRE_PER_VALUE;

    return used < WIRE_POOL_SIZE ? WIRE_POOL_SIZE - used : 0;
}

void wire_scan_headers(struct MHD_Connection *conn, const char *method,
                       const char *version, wire_scan *out)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    scan_state st = {0};

    memset(out, 0, sizeof(*out));
    st.out = out;
    st.block = method;
    st.block_end = method + (ci != NULL ? ci->header_size : 0);
    /* the request line ends with the version, as the header lines end
     * with their values */
    st.name = "HTTP version";
    st.value = version;
    st.value_len = strlen(version);
    MHD_get_connection_values_n(conn, MHD_HEADER_KIND, on_header, &st);
    if (st.value != NULL)
        close_line(&st, st.block_end, 4);
    check_framing(&st);
    out->room = pool_room(conn, &st);
    if (out->room < WIRE_HEAD_MAX)
        api_fail(&out->too_large, 431, "headers_too_large",
                 "the request's header block and query take too much of "
                 "the connection's %zu bytes of memory to leave room for "
                 "the answer",
                 WIRE_POOL_SIZE);
    out->framing = st.framing.status != 0;
    out->problem = out->framing ? st.framing : st.other;
}

int wire_target_has_nul(const char *uri)
{
    /* the target was cut at its end by a NUL written over the space
     * before the version, which follows it: anything else there means
     * the target held a NUL of its own */
    return uri != NULL && strncmp(uri + strlen(uri) + 1, "HTTP/", 5) != 0;
}

size_t wire_head_frame(unsigned status)
{
    size_t reason = MHD_get_reason_phrase_len_for(status);

    /* "HTTP/1.1 NNN reason", or "Non-Standard Status" */
    return 13 + (reason > 0 ? reason : 19) + 2 +
           /* Date: ... GMT, with the byte it writes past it */
           38 +
           /* Connection: close or Keep-Alive */
           24 +
           /* Content-Length: up to 20 digits */
           16 + 20 + 2 +
           /* the blank line */
           2;
}

size_t wire_header_line(const char *name, const char *value)
{
    return strlen(name) + 2 + strlen(value) + 2;
}
