/*
 * A quick reader for the request bodies most clients send: one JSON object
 * whose values are strings, true, false or null. jansson reads a character
 * at a time through a callback, with a UTF-8 check per character, which
 * was an eighth of a small signing request's CPU (callgrind,
 * script/bench); here a string is scanned with memchr-like loops and
 * checked for UTF-8 once.
 *
 * It never decides alone: anything outside that subset (numbers, arrays,
 * nested objects, \u escapes, duplicate names, raw control characters,
 * invalid UTF-8, trailing data, any syntax error) makes it return NULL,
 * and the caller parses with jansson, which gives the answer and the
 * error message. What it does return is the object jansson would build
 * (tests/unit/test_flatjson.c compares the two).
 */
#include <string.h>

#include "api/internal.h"

typedef struct reader {
    const unsigned char *p, *end;
    size_t cap; /* of each string buffer: the body's length */
} reader;

static void skip_space(reader *r)
{
    while (r->p < r->end &&
           (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

/* The string at r->p (at its opening quote) into out (r->cap octets);
 * its length, or -1 for anything the quick reader leaves to jansson. */
static long read_string(reader *r, unsigned char *out)
{
    const unsigned char *s;
    size_t n = 0, run;
    unsigned char c;

    if (r->p >= r->end || *r->p != '"')
        return -1;
    s = ++r->p;
    /* unescaped, the string is never longer than the rest of the body */
    if ((size_t)(r->end - s) > r->cap)
        return -1;
    for (;;) {
        for (run = 0; s + run < r->end && s[run] != '"' && s[run] != '\\' &&
                      s[run] >= 0x20;
             run++)
            ;
        memcpy(out + n, s, run);
        n += run;
        s += run;
        if (s >= r->end || *s < 0x20)
            return -1;
        if (*s == '"')
            break;
        if (s + 1 >= r->end)
            return -1;
        switch (s[1]) {
        case '"':
        case '\\':
        case '/':
            c = s[1];
            break;
        case 'b':
            c = '\b';
            break;
        case 'f':
            c = '\f';
            break;
        case 'n':
            c = '\n';
            break;
        case 'r':
            c = '\r';
            break;
        case 't':
            c = '\t';
            break;
        default: /* \u and anything invalid */
            return -1;
        }
        out[n++] = c;
        s += 2;
    }
    r->p = s + 1;
    if (!api_utf8_valid(out, n))
        return -1;
    return (long)n;
}

static int read_literal(reader *r, const char *word, size_t len)
{
    if ((size_t)(r->end - r->p) < len || memcmp(r->p, word, len) != 0)
        return 0;
    r->p += len;
    return 1;
}

/* A value: a string, true, false or null; NULL for anything else. */
static json_t *read_value(reader *r, unsigned char *buf)
{
    long n;

    if (r->p >= r->end)
        return NULL;
    switch (*r->p) {
    case '"':
        n = read_string(r, buf);
        return n < 0 ? NULL : json_stringn_nocheck((char *)buf, (size_t)n);
    case 't':
        return read_literal(r, "true", 4) ? json_true() : NULL;
    case 'f':
        return read_literal(r, "false", 5) ? json_false() : NULL;
    case 'n':
        return read_literal(r, "null", 4) ? json_null() : NULL;
    }
    return NULL;
}

json_t *api_flat_json_read(const unsigned char *body, size_t len)
{
    reader r = {body, body + len, len};
    unsigned char *name = malloc(len + 1), *value = malloc(len + 1);
    json_t *obj = NULL, *v;
    long n;

    if (name == NULL || value == NULL)
        goto fail;
    skip_space(&r);
    if (r.p >= r.end || *r.p++ != '{')
        goto fail;
    obj = json_object();
    if (obj == NULL)
        goto fail;
    skip_space(&r);
    if (r.p < r.end && *r.p == '}') {
        r.p++;
        goto end;
    }
    for (;;) {
        skip_space(&r);
        n = read_string(&r, name);
        if (n < 0 || memchr(name, '\0', (size_t)n) != NULL)
            goto fail;
        name[n] = '\0';
        /* a duplicate name is jansson's to refuse */
        if (json_object_get(obj, (char *)name) != NULL)
            goto fail;
        skip_space(&r);
        if (r.p >= r.end || *r.p++ != ':')
            goto fail;
        skip_space(&r);
        v = read_value(&r, value);
        if (v == NULL || json_object_set_new_nocheck(obj, (char *)name, v) != 0)
            goto fail;
        skip_space(&r);
        if (r.p < r.end && *r.p == ',') {
            r.p++;
            continue;
        }
        if (r.p < r.end && *r.p == '}') {
            r.p++;
            break;
        }
        goto fail;
    }
end:
    skip_space(&r);
    if (r.p != r.end)
        goto fail;
    free(name);
    free(value);
    return obj;
fail:
    json_decref(obj);
    free(name);
    free(value);
    return NULL;
}
