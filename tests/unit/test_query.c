/*
 * The raw-mode query parser: hand-picked strings on both sides of each
 * rule, then random parameter lists written with random escapes, which
 * must read back exactly.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/query.h"
#include "tap.h"

static const struct {
    const char *name;
    const char *text;
    /* NULL: refused; else the pairs read, "name=value;..." */
    const char *want;
} cases[] = {
    {"nothing", "", ""},
    {"one pair", "key=demo-ec", "key=demo-ec;"},
    {"three pairs", "key=demo-ec&mode=opaque&digest=sha384",
     "key=demo-ec;mode=opaque;digest=sha384;"},
    {"an escape in a value", "key=demo%2Dec", "key=demo-ec;"},
    {"an escape in a name", "k%65y=v", "key=v;"},
    {"lower-case hex", "k=%c3%a9", "k=\xc3\xa9;"},
    {"'+' is a space", "k=a+b", "k=a b;"},
    {"%2B is a '+'", "k=a%2Bb", "k=a+b;"},
    {"no '='", "verify", "verify=;"},
    {"an empty value", "key=", "key=;"},
    {"'=' inside a value", "k=a=b", "k=a=b;"},
    {"sub-delims, ':', '@', '/', '?'", "k=!$'()*,;:@/?", "k=!$'()*,;:@/?;"},
    {"a repeated name", "key=a&key=b", NULL},
    {"a repeated name, same value", "key=a&key=a", NULL},
    {"a name repeated through an escape", "key=a&k%65y=b", NULL},
    {"a decoded NUL in a value", "key=demo-ec%00x", NULL},
    {"a decoded NUL at a value's end", "key=demo-ec%00", NULL},
    {"a decoded NUL in a name", "k%00=v", NULL},
    {"an empty name", "=v", NULL},
    {"an empty name, no value", "=", NULL},
    {"a trailing '&'", "key=v&", NULL},
    {"a leading '&'", "&key=v", NULL},
    {"a doubled '&'", "a=1&&b=2", NULL},
    {"a lone '&'", "&", NULL},
    {"a bad escape", "k=%zz", NULL},
    {"half an escape", "k=%4", NULL},
    {"a '%' at the end", "k=v%", NULL},
    {"a '%' before '&'", "k=%&j=1", NULL},
    {"a raw space", "k=a b", NULL},
    {"a raw '#'", "k=v#f", NULL},
    {"a raw quote", "k=\"v\"", NULL},
    {"a raw control character", "k=a\tb", NULL},
    {"a raw 8-bit byte", "k=\xc3\xa9", NULL},
    {"a raw '['", "k=[", NULL},
    {"a raw '|'", "k=a|b", NULL},
};

/* The pairs of q as "name=value;...", for comparing. */
static void pairs(const api_query *q, char *out, size_t size)
{
    size_t i, o = 0;

    out[0] = '\0';
    for (i = 0; i < api_query_count(q) && o < size; i++)
        o +=
            (size_t)snprintf(out + o, size - o, "%s=%s;",
                             api_query_name_at(q, i), api_query_value_at(q, i));
}

static void test_cases(void)
{
    char got[512];
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        api_query *q = NULL;
        api_error err = {0};
        int rc =
            api_query_parse(cases[i].text, strlen(cases[i].text), &q, &err);

        if (cases[i].want == NULL) {
            tap_ok(rc != 0 && err.status == 400 &&
                       strcmp(err.code, "invalid_field") == 0,
                   "%s: refused (%s)", cases[i].name, err.message);
            continue;
        }
        pairs(q, got, sizeof(got));
        tap_ok(rc == 0 && strcmp(got, cases[i].want) == 0, "%s: read as %s",
               cases[i].name, rc == 0 ? got : err.message);
        api_query_free(q);
    }
}

static void test_limits(void)
{
    char *text = malloc(API_QUERY_MAX_BYTES + 16);
    api_query *q = NULL;
    api_error err = {0};
    size_t n, i;
    int rc;

    n = (size_t)snprintf(text, 16, "k=");
    memset(text + n, 'v', API_QUERY_MAX_BYTES - n);
    rc = api_query_parse(text, API_QUERY_MAX_BYTES, &q, &err);
    tap_ok(rc == 0 && strlen(api_query_get(q, "k")) == API_QUERY_MAX_BYTES - 2,
           "a query of %d bytes is read", API_QUERY_MAX_BYTES);
    api_query_free(q);
    q = NULL;
    text[API_QUERY_MAX_BYTES] = 'v';
    rc = api_query_parse(text, API_QUERY_MAX_BYTES + 1, &q, &err);
    tap_ok(rc != 0 && strstr(err.message, "over") != NULL,
           "one byte more is refused (%s)", err.message);
    for (n = 0, i = 0; i <= API_QUERY_MAX_PARAMS; i++)
        n += (size_t)sprintf(text + n, "%sp%zu=1", i > 0 ? "&" : "", i);
    rc = api_query_parse(text, n, &q, &err);
    tap_ok(rc != 0 && strstr(err.message, "more than") != NULL,
           "%d parameters are refused (%s)", API_QUERY_MAX_PARAMS + 1,
           err.message);
    n -= strlen("&p64=1");
    rc = api_query_parse(text, n, &q, &err);
    tap_ok(rc == 0 && api_query_count(q) == API_QUERY_MAX_PARAMS &&
               strcmp(api_query_get(q, "p63"), "1") == 0,
           "%d parameters are read", API_QUERY_MAX_PARAMS);
    api_query_free(q);
    tap_ok(api_query_get(NULL, "k") == NULL && api_query_count(NULL) == 0,
           "no query: nothing is found");
    free(text);
}

static unsigned long rnd_state = 20261202;

static unsigned rnd(unsigned n)
{
    rnd_state = rnd_state * 6364136223846793005UL + 1442695040888963407UL;
    return (unsigned)(rnd_state >> 33) % n;
}

/* Writes s[0..len) for a query: each byte plain when it may be, else (or
 * by chance) as %XX in either case, a space as '+' or %20. */
static size_t encode(const unsigned char *s, size_t len, char *out)
{
    static const char *const hex[] = {"0123456789ABCDEF", "0123456789abcdef"};
    size_t i, o = 0;

    for (i = 0; i < len; i++) {
        int plain = (s[i] >= 'a' && s[i] <= 'z') ||
                    (s[i] >= '0' && s[i] <= '9') ||
                    strchr("-._~!$'()*,;:@/?", s[i]) != NULL;

        if (s[i] == ' ' && rnd(2) == 0) {
            out[o++] = '+';
        } else if (plain && rnd(4) != 0) {
            out[o++] = (char)s[i];
        } else {
            const char *h = hex[rnd(2)];

            out[o++] = '%';
            out[o++] = h[s[i] >> 4];
            out[o++] = h[s[i] & 15];
        }
    }
    return o;
}

/* Random lists of distinct names with values of any bytes but NUL (and
 * some with a NUL, which must be refused) read back exactly. */
static void test_round_trip(void)
{
    unsigned char names[8][12], values[8][40];
    size_t vlen[8];
    char text[2048];
    unsigned round, bad = 0, refused_right = 0, read_back = 0, nul_rounds = 0;

    for (round = 0; round < 4000; round++) {
        unsigned n = 1 + rnd(8), i, j, with_nul = rnd(10) == 0;
        api_query *q = NULL;
        api_error err = {0};
        size_t o = 0;
        int rc, same = 1;

        for (i = 0; i < n; i++) {
            /* distinct names: the index first */
            size_t nl = 1 + rnd(10);

            names[i][0] = (unsigned char)('a' + i);
            for (j = 1; j < nl; j++)
                names[i][j] = (unsigned char)(1 + rnd(255));
            names[i][nl] = '\0';
            vlen[i] = rnd(40);
            for (j = 0; j < vlen[i]; j++)
                values[i][j] = (unsigned char)(1 + rnd(255));
            if (with_nul && i == n - 1 && vlen[i] > 0)
                values[i][rnd((unsigned)vlen[i])] = '\0';
            if (i > 0)
                text[o++] = '&';
            o += encode(names[i], strlen((char *)names[i]), text + o);
            if (vlen[i] > 0 || rnd(2) == 0) {
                text[o++] = '=';
                o += encode(values[i], vlen[i], text + o);
            }
        }
        with_nul = with_nul && vlen[n - 1] > 0;
        nul_rounds += with_nul;
        rc = api_query_parse(text, o, &q, &err);
        if (with_nul) {
            refused_right += rc != 0;
            bad += rc == 0;
            api_query_free(q);
            continue;
        }
        for (i = 0; rc == 0 && i < n; i++) {
            const char *v = api_query_get(q, (char *)names[i]);

            same = same && v != NULL && strlen(v) == vlen[i] &&
                   memcmp(v, values[i], vlen[i]) == 0;
        }
        same = same && rc == 0 && api_query_count(q) == n;
        read_back += same;
        bad += !same;
        api_query_free(q);
    }
    tap_ok(bad == 0 && read_back > 0 && refused_right == nul_rounds,
           "random lists read back exactly (%u), with a NUL refused (%u), "
           "%u wrong",
           read_back, refused_right, bad);
}

int main(void)
{
    test_cases();
    test_limits();
    test_round_trip();
    return tap_done();
}
