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
 *
 * Requests carry the entity as one string, most of the body: the daemon
 * reads it with api_flat_json_read_inplace, which decodes that string
 * inside the body itself instead of copying it (twice: into a buffer, and
 * into a jansson string), and leaves the body as it was when it declines.
 */
#include <string.h>

#include "api/internal.h"

typedef struct reader {
    const unsigned char *p, *end;
} reader;

static void skip_space(reader *r)
{
    while (r->p < r->end &&
           (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

/*
 * The string at r->p (at its opening quote): its decoded length, or -1 for
 * anything the quick reader leaves to jansson; r->p ends past the closing
 * quote. With out, decodes it into out, which may be the string's own
 * first octet (decoding in place: an escape is never shorter than what it
 * stands for, so the writes stay behind the reads). check_utf8 checks the
 * octets as read; escapes decode to ASCII, so that is the same as
 * checking the decoded string, and a string decoded in place is checked
 * before its octets change.
 */
static long read_string(reader *r, unsigned char *out, int check_utf8)
{
    const unsigned char *s, *start;
    size_t n = 0, run;
    unsigned char c;

    if (r->p >= r->end || *r->p != '"')
        return -1;
    start = s = r->p + 1;
    for (;;) {
        for (run = 0; s + run < r->end && s[run] != '"' && s[run] != '\\' &&
                      s[run] >= 0x20;
             run++)
            ;
        if (out != NULL)
            memmove(out + n, s, run);
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
        if (out != NULL)
            out[n] = c;
        n++;
        s += 2;
    }
    if (check_utf8 && !api_utf8_valid(start, (size_t)(s - start)))
        return -1;
    r->p = s + 1;
    return (long)n;
}

/* The string at r->p in a buffer of its own, NUL-terminated; NULL for
 * anything left to jansson. */
static unsigned char *read_string_copy(reader *r, size_t *len)
{
    reader again = *r;
    unsigned char *buf;
    long n = read_string(r, NULL, 1);

    if (n < 0 || (buf = malloc((size_t)n + 1)) == NULL)
        return NULL;
    read_string(&again, buf, 0);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

static int read_literal(reader *r, const char *word, size_t len)
{
    if ((size_t)(r->end - r->p) < len || memcmp(r->p, word, len) != 0)
        return 0;
    r->p += len;
    return 1;
}

/* A value: a string, true, false or null; NULL for anything else. */
static json_t *read_value(reader *r)
{
    unsigned char *buf;
    json_t *v;
    size_t n;

    if (r->p >= r->end)
        return NULL;
    switch (*r->p) {
    case '"':
        buf = read_string_copy(r, &n);
        if (buf == NULL)
            return NULL;
        v = json_stringn_nocheck((char *)buf, n);
        free(buf);
        return v;
    case 't':
        return read_literal(r, "true", 4) ? json_true() : NULL;
    case 'f':
        return read_literal(r, "false", 5) ? json_false() : NULL;
    case 'n':
        return read_literal(r, "null", 4) ? json_null() : NULL;
    }
    return NULL;
}

/* Both readers: with inplace (body itself, writable), the string value of
 * the field big is decoded there at the end and left out of the object. */
static json_t *read_object(const unsigned char *body, size_t len,
                           unsigned char *inplace, const char *big,
                           const unsigned char **big_value, size_t *big_len)
{
    reader r = {body, body + len};
    const unsigned char *big_at = NULL;
    unsigned char *name = NULL;
    json_t *obj = NULL, *v;
    size_t n;
    long vn = 0;

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
        name = read_string_copy(&r, &n);
        if (name == NULL || memchr(name, '\0', n) != NULL)
            goto fail;
        /* a duplicate name is jansson's to refuse */
        if (json_object_get(obj, (char *)name) != NULL ||
            (big_at != NULL && strcmp((char *)name, big) == 0))
            goto fail;
        skip_space(&r);
        if (r.p >= r.end || *r.p++ != ':')
            goto fail;
        skip_space(&r);
        if (inplace != NULL && strcmp((char *)name, big) == 0 && r.p < r.end &&
            *r.p == '"') {
            big_at = r.p;
            vn = read_string(&r, NULL, 1);
            if (vn < 0)
                goto fail;
        } else {
            v = read_value(&r);
            if (v == NULL ||
                json_object_set_new_nocheck(obj, (char *)name, v) != 0)
                goto fail;
        }
        free(name);
        name = NULL;
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
    if (inplace != NULL) {
        *big_value = NULL;
        *big_len = 0;
    }
    if (big_at != NULL) {
        /* all checked: only now may body change */
        r.p = big_at;
        *big_value = inplace + (big_at + 1 - body);
        read_string(&r, inplace + (big_at + 1 - body), 0);
        *big_len = (size_t)vn;
    }
    return obj;
fail:
    free(name);
    json_decref(obj);
    return NULL;
}

json_t *api_flat_json_read(const unsigned char *body, size_t len)
{
    return read_object(body, len, NULL, NULL, NULL, NULL);
}

json_t *api_flat_json_read_inplace(unsigned char *body, size_t len,
                                   const char *big,
                                   const unsigned char **big_value,
                                   size_t *big_len)
{
    return read_object(body, len, body, big, big_value, big_len);
}
