/*
 * api_flat_json_read, the quick reader for flat request objects, against
 * jansson: whatever it returns must be the object jansson builds
 * (json_equal), and whatever it declines must be left to jansson (it
 * returns NULL, never a different answer). api_flat_json_read_inplace
 * must decide the same, give the same "mime" (decoded in place), and
 * leave a body it declines untouched. Hand-picked bodies on both
 * sides of each rule, then many random mutations of real request bodies.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"
#include "tap.h"

/* The in-place reader on a copy of body: the same decision as the copying
 * one, and with "mime" put back (as a string of what it left in place)
 * the same object; body unchanged when it declines. */
static int inplace_agrees(const char *body, size_t len, const json_t *quick)
{
    unsigned char *buf = malloc(len + 1);
    const unsigned char *mime = (const unsigned char *)"";
    json_t *obj;
    size_t mime_len = 7;
    int r;

    if (buf == NULL)
        return 0;
    memcpy(buf, body, len);
    obj = api_flat_json_read_inplace(buf, len, "mime", &mime, &mime_len);
    if (obj == NULL) {
        r = quick == NULL && memcmp(buf, body, len) == 0;
    } else {
        if (mime != NULL)
            json_object_set_new(obj, "mime",
                                json_stringn((const char *)mime, mime_len));
        r = quick != NULL && json_equal(obj, quick) &&
            (mime == NULL) == (json_object_get(quick, "mime") == NULL ||
                               !json_is_string(json_object_get(quick, "mime")));
    }
    json_decref(obj);
    free(buf);
    return r;
}

/* 1: taken and equal to jansson's; 0: declined; -1: taken but different,
 * or taken where jansson refuses, or the in-place reader disagrees. */
static int compare(const char *body, size_t len)
{
    json_error_t jerr;
    json_t *quick = api_flat_json_read((const unsigned char *)body, len);
    json_t *ref =
        json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    int r;

    if (quick == NULL)
        r = 0;
    else
        r = ref != NULL && json_equal(quick, ref) ? 1 : -1;
    if (!inplace_agrees(body, len, quick))
        r = -1;
    json_decref(quick);
    json_decref(ref);
    return r;
}

static const struct {
    const char *name;
    const char *body;
    int want; /* 1 taken, 0 declined */
} cases[] = {
    {"mime with every short escape",
     "{\"mime\":\"a\\\"\\\\\\/\\b\\f\\n\\r\\tz\",\"key\":\"k\"}", 1},
    {"mime not a string", "{\"mime\":true}", 1},
    {"mime twice", "{\"mime\":\"a\",\"mime\":\"b\"}", 0},
    {"mime twice, the first not a string", "{\"mime\":null,\"mime\":\"b\"}", 0},
    {"mime twice, the second not a string", "{\"mime\":\"a\",\"mime\":null}",
     0},
    {"mime with a \\u escape", "{\"mime\":\"\\u0041\"}", 0},
    {"a sign request",
     "{\"key\":\"demo-ec\",\"mime\":\"Content-Type: "
     "text/plain\\r\\n\\r\\nhi\\r\\n\"}",
     1},
    {"blanks everywhere", " \t\r\n{ \"key\" : \"k\" , \"verify\" : true }\n",
     1},
    {"every short escape", "{\"m\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"}", 1},
    {"false and null", "{\"a\":false,\"b\":null}", 1},
    {"empty object", "{}", 1},
    {"empty string", "{\"a\":\"\"}", 1},
    {"UTF-8 text", "{\"m\":\"caf\xc3\xa9 \xe2\x82\xac\"}", 1},
    {"a \\u escape", "{\"m\":\"\\u00e9\"}", 0},
    {"\\u0000", "{\"m\":\"a\\u0000b\"}", 0},
    {"a number", "{\"n\":1}", 0},
    {"an array", "{\"r\":[\"a\"]}", 0},
    {"a nested object", "{\"o\":{}}", 0},
    {"a duplicate name", "{\"a\":\"1\",\"a\":\"2\"}", 0},
    {"invalid UTF-8", "{\"m\":\"\xc3\x28\"}", 0},
    {"an overlong form", "{\"m\":\"\xc0\xaf\"}", 0},
    {"a raw control character", "{\"m\":\"a\tb\"}", 0},
    {"a bad escape", "{\"m\":\"\\x\"}", 0},
    {"trailing data", "{\"a\":\"b\"} x", 0},
    {"two objects", "{}{}", 0},
    {"a trailing comma", "{\"a\":\"b\",}", 0},
    {"a missing colon", "{\"a\" \"b\"}", 0},
    {"an unterminated string", "{\"a\":\"b", 0},
    {"no closing brace", "{\"a\":\"b\"", 0},
    {"a bare word", "{\"a\":truex}", 0},
    {"not an object", "[\"a\"]", 0},
    {"empty body", "", 0},
    {"a single quote", "{'a':'b'}", 0},
};

static void test_cases(void)
{
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int got = compare(cases[i].body, strlen(cases[i].body));

        tap_ok(got == cases[i].want, "%s: %s", cases[i].name,
               cases[i].want ? "read as jansson reads it" : "left to jansson");
    }
}

/* Random edits of request bodies (a character changed, dropped or
 * doubled): each result is either declined or read as jansson reads it. */
static void test_mutations(void)
{
    static const char *const seeds[] = {
        "{\"key\":\"demo-rsa\",\"mime\":\"Content-Type: text/plain\\r\\n\\r\\n"
        "hello \\\"world\\\" \\\\ / caf\xc3\xa9\\r\\n\",\"mode\":\"opaque\","
        "\"digest\":\"sha512\"}",
        "{ \"mime\" : \"Subject: x\\n\\nbody\\n\", \"verify\" : false, "
        "\"key\" : null }",
    };
    static const char alphabet[] = "{}[]:,\"\\ \tntfu0e1\xc3\xa9\x80\x01x";
    unsigned seed = 11;
    char buf[512];
    size_t k, n, at, taken = 0, wrong = 0, runs = 4000;

    for (k = 0; k < runs; k++) {
        const char *src = seeds[k % 2];

        n = strlen(src);
        memcpy(buf, src, n);
        seed = seed * 1103515245u + 12345u;
        at = (seed >> 16) % n;
        switch ((seed >> 8) % 3) {
        case 0:
            buf[at] = alphabet[(seed >> 20) % (sizeof(alphabet) - 1)];
            break;
        case 1:
            memmove(buf + at, buf + at + 1, n - at - 1);
            n--;
            break;
        default:
            memmove(buf + at + 1, buf + at, n - at);
            n++;
        }
        switch (compare(buf, n)) {
        case 1:
            taken++;
            break;
        case -1:
            if (wrong++ == 0)
                printf("# first wrong answer for: %.*s\n", (int)n, buf);
            break;
        }
    }
    tap_ok(wrong == 0,
           "%zu mutated bodies: none read differently (%zu read, "
           "%zu wrong)",
           runs, taken, wrong);
    tap_ok(taken > runs / 10, "the quick reader took a share of them (%zu)",
           taken);
}

int main(void)
{
    test_cases();
    test_mutations();
    return tap_done();
}
