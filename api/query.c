/*
 * The raw-mode query string parser (api/query.h). One allocation holds
 * the parameter table and every decoded name and value.
 */
#include <stdlib.h>
#include <string.h>

#include "api/query.h"

typedef struct query_param {
    const char *name;
    const char *value;
} query_param;

struct api_query {
    size_t count;
    query_param params[API_QUERY_MAX_PARAMS];
    char text[]; /* name, NUL, value, NUL for each parameter */
};

/* What RFC 3986 allows in a query without an escape: unreserved,
 * sub-delims, ':', '@', '/' and '?'. '&' and '=' delimit, '%' escapes. */
static int query_char_plain(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9'))
        return 1;
    return c != '\0' && strchr("-._~!$'()*+,;:@/?", c) != NULL;
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes text[start..end) into out (NUL-terminated); returns the decoded
 * length, or -1 with err set. A decoded NUL is left for the caller, which
 * can name the parameter. */
static long decode(const char *text, size_t start, size_t end, char *out,
                   api_error *err)
{
    size_t i, o = 0;
    int hi, lo;

    for (i = start; i < end; i++) {
        unsigned char c = (unsigned char)text[i];

        if (c == '%') {
            hi = i + 2 < end ? hex_value((unsigned char)text[i + 1]) : -1;
            lo = hi >= 0 ? hex_value((unsigned char)text[i + 2]) : -1;
            if (lo < 0)
                return api_fail(err, 400, "invalid_field",
                                "the query string has an invalid percent "
                                "escape at byte %zu",
                                i);
            out[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else if (c == '+') {
            out[o++] = ' ';
        } else if (c == '=' || query_char_plain(c)) {
            out[o++] = (char)c;
        } else {
            return api_fail(err, 400, "invalid_field",
                            "the query string has byte 0x%02x at byte %zu; "
                            "percent-encode it",
                            c, i);
        }
    }
    out[o] = '\0';
    return (long)o;
}

int api_query_parse(const char *text, size_t len, api_query **out,
                    api_error *err)
{
    api_query *q = NULL;
    size_t start = 0, end, eq, i, n;
    long nlen, vlen;
    char *w;
    int ret = -1;

    if (len > API_QUERY_MAX_BYTES)
        return api_fail(err, 400, "invalid_field",
                        "the query string is over %d bytes",
                        API_QUERY_MAX_BYTES);
    /* each parameter's text decodes to at most its own length, plus two
     * terminators, and takes at least two bytes with its '&' */
    q = calloc(1, sizeof(*q) + 2 * len + 2);
    if (q == NULL)
        return api_fail(err, 500, "internal_error", "out of memory");
    w = q->text;
    for (start = 0; len > 0; start = end + 1) {
        for (end = start; end < len && text[end] != '&'; end++)
            ;
        n = q->count + 1;
        /* a leading, doubled or trailing '&' */
        if (end == start) {
            api_fail(err, 400, "invalid_field", "query parameter %zu is empty",
                     n);
            goto out;
        }
        if (q->count == API_QUERY_MAX_PARAMS) {
            api_fail(err, 400, "invalid_field",
                     "the query string has more than %d parameters",
                     API_QUERY_MAX_PARAMS);
            goto out;
        }
        for (eq = start; eq < end && text[eq] != '='; eq++)
            ;
        nlen = decode(text, start, eq, w, err);
        if (nlen < 0)
            goto out;
        if (nlen == 0) {
            api_fail(err, 400, "invalid_field",
                     "query parameter %zu has no name", n);
            goto out;
        }
        if ((size_t)nlen != strlen(w)) {
            api_fail(err, 400, "invalid_field",
                     "the name of query parameter %zu contains NUL", n);
            goto out;
        }
        q->params[q->count].name = w;
        w += nlen + 1;
        vlen = 0;
        *w = '\0';
        if (eq < end && (vlen = decode(text, eq + 1, end, w, err)) < 0)
            goto out;
        if ((size_t)vlen != strlen(w)) {
            api_fail(err, 400, "invalid_field",
                     "query parameter \"%s\" contains NUL",
                     q->params[q->count].name);
            goto out;
        }
        q->params[q->count].value = w;
        w += vlen + 1;
        for (i = 0; i < q->count; i++) {
            if (strcmp(q->params[i].name, q->params[q->count].name) == 0) {
                api_fail(err, 400, "invalid_field",
                         "query parameter \"%s\" is given twice",
                         q->params[i].name);
                goto out;
            }
        }
        q->count++;
        if (end == len)
            break;
    }
    *out = q;
    q = NULL;
    ret = 0;
out:
    free(q);
    return ret;
}

void api_query_free(api_query *q)
{
    free(q);
}

size_t api_query_count(const api_query *q)
{
    return q != NULL ? q->count : 0;
}

const char *api_query_name_at(const api_query *q, size_t i)
{
    return q->params[i].name;
}

const char *api_query_value_at(const api_query *q, size_t i)
{
    return q->params[i].value;
}

const char *api_query_get(const api_query *q, const char *name)
{
    size_t i;

    for (i = 0; q != NULL && i < q->count; i++)
        if (strcmp(q->params[i].name, name) == 0)
            return q->params[i].value;
    return NULL;
}
