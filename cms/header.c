/*
 * Header blocks (mime.c has the decisions): the strict reading of a block
 * that decrypt and verify read back, the checks on each line of the
 * entity to sign and of its parts, the split into the fields that stay
 * outside and the Content-* fields that go inside, and putting the outside
 * ones back in front of what was signed or encrypted.
 */
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>

#include "cms/internal.h"

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

int cms_field_is(const unsigned char *line, size_t n, const char *name)
{
    size_t k = strlen(name);

    if (n < k || !name_is(line, k, name))
        return 0;
    while (k < n && cms_is_blank(line[k]))
        k++;
    return k < n && line[k] == ':';
}

static int is_content_field(const unsigned char *name, size_t n)
{
    return (n > 8 && name_is(name, 8, "Content-")) ||
           name_is(name, n, "MIME-Version");
}

long cms_header_line_check(const unsigned char *s, size_t pos, size_t n,
                           size_t lineno, int continued, cms_error *err)
{
    const unsigned char *colon;
    size_t k, i;

    if (memchr(s + pos, '\0', n) != NULL) {
        cms_set_error(err, CMS_ERR_INPUT,
                      "header line %zu contains a NUL octet", lineno);
        return -1;
    }
    if (cms_is_blank(s[pos])) {
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
    while (k > 0 && cms_is_blank(s[pos + k - 1]))
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

int cms_field_repeats(int *seen, const unsigned char *line, size_t n,
                      const char *name)
{
    return name_is(line, n, name) && (*seen)++ > 0;
}

int cms_headers_split(const unsigned char *s, size_t len, cms_buf *outer,
                      cms_buf *inner, size_t *body, cms_error *err)
{
    cms_buf *dst = NULL;
    size_t pos = 0, end, n, lineno = 0;
    int types = 0, encodings = 0;
    long k;

    while (pos < len) {
        end = cms_line_end(s, len, pos);
        n = cms_line_text_len(s, pos, end);
        if (n == 0) {
            *body = end;
            return 0;
        }
        k = cms_header_line_check(s, pos, n, ++lineno, dst != NULL, err);
        if (k < 0)
            return -1;
        if (k > 0 &&
            (cms_field_repeats(&types, s + pos, (size_t)k, "Content-Type") ||
             cms_field_repeats(&encodings, s + pos, (size_t)k,
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
    if (cms_buf_add_canonical(&canon, s, hb.body)) {
        cms_set_error(err, CMS_ERR_INTERNAL, "out of memory");
        goto out;
    }
    if (cms_headers_split(canon.data, canon.len, &fields, &inner, &body, err))
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
        end = cms_line_end(s, len, pos);
        if (s[pos] == '\n' || cms_line_text_len(s, pos, end) == 0)
            break;
        for (n = 0; pos + n < end && cms_is_ftext(s[pos + n]); n++)
            ;
        if (n > 0 && !cms_is_blank(s[pos]))
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
    end = cms_line_end(content->data, content->len, 0);
    lf = end > 0 && content->data[end - 1] == '\n' &&
         (end < 2 || content->data[end - 2] != '\r');
    for (pos = 0; pos < outer->len; pos = end) {
        end = cms_line_end(outer->data, outer->len, pos);
        if (!cms_is_blank(outer->data[pos])) {
            for (n = 0; cms_is_ftext(outer->data[pos + n]); n++)
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
    while (k < n && cms_is_blank(s[pos + k]))
        k++;
    if (k != n)
        return 0;
    *close = closing;
    return 1;
}

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
    while (n > 0 && cms_is_blank((unsigned char)v[n - 1]))
        n--;
    while (skip < n && cms_is_blank((unsigned char)v[skip]))
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
        end = cms_line_end(s, len, pos);
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
        if (n == 0 || !cms_is_blank(s[pos])) {
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
        if (cms_is_blank(s[pos])) {
            if (h.n_fields == 0) {
                cms_set_error(err, CMS_ERR_INPUT,
                              "header line %zu continues a field, but no "
                              "field precedes it",
                              lineno);
                goto out;
            }
        } else {
            for (k = 0; k < n && cms_is_ftext(s[pos + k]); k++)
                ;
            name_len = k;
            while (k < n && cms_is_blank(s[pos + k]))
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
