/*
 * The raw-mode query parser (api/query.c) against its own rules. For any
 * input: a refusal is a 400 invalid_field; an acceptance holds only what
 * the rules allow (no more than API_QUERY_MAX_PARAMS pairs, distinct
 * non-empty names, nothing with a NUL), looks every name up to its own
 * value, came from text with no byte RFC 3986 keeps out of a query and no
 * bad escape, and reads back the same once written out again with every
 * byte escaped.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/query.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int is_hex(uint8_t c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
           (c >= 'A' && c <= 'F');
}

/* 1 when every byte may stand in a query as it is, and every '%' starts
 * an escape: what an accepted text must satisfy. */
static int text_is_clean(const uint8_t *t, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (t[i] == '%') {
            if (i + 2 >= n || !is_hex(t[i + 1]) || !is_hex(t[i + 2]))
                return 0;
            i += 2;
        } else if (!((t[i] >= 'a' && t[i] <= 'z') ||
                     (t[i] >= 'A' && t[i] <= 'Z') ||
                     (t[i] >= '0' && t[i] <= '9') ||
                     (t[i] != '\0' && strchr("-._~!$'()*+,;:@/?&=", t[i])))) {
            return 0;
        }
    }
    return 1;
}

static size_t escape_all(const char *s, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    for (; *s != '\0'; s++) {
        out[o++] = '%';
        out[o++] = hex[(unsigned char)*s >> 4];
        out[o++] = hex[(unsigned char)*s & 15];
    }
    return o;
}

static void check_accepted(const uint8_t *data, size_t size, const api_query *q)
{
    size_t n = api_query_count(q), i, j, o = 0;
    api_query *again = NULL;
    api_error err = {0};
    char *text;

    if (size > API_QUERY_MAX_BYTES || n > API_QUERY_MAX_PARAMS ||
        !text_is_clean(data, size) || (size > 0 && n == 0))
        abort();
    for (i = 0; i < n; i++) {
        const char *name = api_query_name_at(q, i);

        if (name[0] == '\0' ||
            api_query_get(q, name) != api_query_value_at(q, i))
            abort();
        for (j = 0; j < i; j++)
            if (strcmp(api_query_name_at(q, j), name) == 0)
                abort();
    }
    /* each decoded byte escaped: three bytes for each, and two separators
     * per pair at most */
    text = malloc(3 * size + 2 * n + 1);
    if (text == NULL)
        return;
    for (i = 0; i < n; i++) {
        if (i > 0)
            text[o++] = '&';
        o += escape_all(api_query_name_at(q, i), text + o);
        text[o++] = '=';
        o += escape_all(api_query_value_at(q, i), text + o);
    }
    /* the escaped form may be longer than the limit; it must read back
     * whenever it fits */
    if (o <= API_QUERY_MAX_BYTES) {
        if (api_query_parse(text, o, &again, &err) != 0 ||
            api_query_count(again) != n)
            abort();
        for (i = 0; i < n; i++)
            if (strcmp(api_query_name_at(again, i), api_query_name_at(q, i)) ||
                strcmp(api_query_value_at(again, i), api_query_value_at(q, i)))
                abort();
        api_query_free(again);
    }
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    api_query *q = NULL;
    api_error err = {0};

    if (api_query_parse((const char *)data, size, &q, &err) != 0) {
        if (q != NULL || err.status == 0 ||
            (err.status == 400 && strcmp(err.code, "invalid_field") != 0) ||
            (err.status != 400 && err.status != 500))
            abort();
        return 0;
    }
    check_accepted(data, size, q);
    api_query_free(q);
    return 0;
}
