/*
 * cms_entity_parse skips GMime's walk (and the canonicalising copy) when
 * it can tell the walk would change nothing. These checks hold it to that:
 * for hand-picked entities on both sides of every condition of the
 * shortcut, and for many random ones built from the same pieces, the
 * result with the shortcut (outer headers, inner entity, re-encoded parts,
 * or the error) is byte for byte the one GMime's walk gives.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cms/internal.h"
#include "tap.h"

static int same_bytes(const unsigned char *a, size_t alen,
                      const unsigned char *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

/* Parses s[0..len) both ways; 1 when the results are the same. */
static int same_both_ways(const unsigned char *s, size_t len, char *why,
                          size_t whylen)
{
    cms_entity fast = {0}, walk = {0};
    cms_error ferr = {0}, werr = {0};
    int rf, rw, same = 0;
    size_t i;

    rf = cms_entity_parse_walk(s, len, &fast, 0, &ferr);
    rw = cms_entity_parse_walk(s, len, &walk, 1, &werr);
    if (rf != rw) {
        snprintf(why, whylen, "shortcut %d (%s), walk %d (%s)", rf,
                 ferr.message, rw, werr.message);
    } else if (rf != 0) {
        same = ferr.status == werr.status &&
               strcmp(ferr.message, werr.message) == 0;
        snprintf(why, whylen, "errors: \"%s\" / \"%s\"", ferr.message,
                 werr.message);
    } else if (!same_bytes(fast.outer.data, fast.outer.len, walk.outer.data,
                           walk.outer.len) ||
               !same_bytes(fast.content.data, fast.content.len,
                           walk.content.data, walk.content.len)) {
        snprintf(why, whylen, "different bytes");
    } else if (fast.n_reencoded != walk.n_reencoded) {
        snprintf(why, whylen, "%zu / %zu re-encoded parts", fast.n_reencoded,
                 walk.n_reencoded);
    } else {
        same = 1;
        for (i = 0; i < fast.n_reencoded; i++)
            same = same && strcmp(fast.reencoded[i], walk.reencoded[i]) == 0;
        snprintf(why, whylen, "%s",
                 same ? "identical" : "re-encoded parts differ");
    }
    cms_entity_release(&fast);
    cms_entity_release(&walk);
    return same;
}

/* Whether s takes the shortcut at all: parsed without the walk, a part that
 * needs re-encoding would come out unchanged, so "reencoded" stays empty. */
static int reencoded_count(const char *s)
{
    cms_entity ent = {0};
    cms_error err = {0};
    size_t n;

    if (cms_entity_parse((const unsigned char *)s, strlen(s), &ent, &err) != 0)
        return -1;
    n = ent.n_reencoded;
    cms_entity_release(&ent);
    return (int)n;
}

static const struct {
    const char *name;
    const char *mime;
} cases[] = {
    {"clean text, CRLF", "From: a@example.org\r\nContent-Type: text/plain\r\n"
                         "\r\nHello\r\nworld\r\n"},
    {"clean text, LF", "Subject: x\nContent-Type: text/plain\n\nHello\n"},
    {"clean text, bare CR", "Content-Type: text/plain\r\rHello\rthere\r"},
    {"a bare CR inside a line", "Content-Type: text/plain\r\n\r\na\rb\r\n"},
    {"8-bit text", "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                   "caf\xc3\xa9\r\n"},
    {"a From line", "Content-Type: text/plain\r\n\r\nhi\r\nFrom here\r\n"},
    {"From at the body's start", "Content-Type: text/plain\r\n\r\nFrom x\r\n"},
    {"CTE 8bit, clean body", "Content-Type: text/plain\r\n"
                             "Content-Transfer-Encoding: 8bit\r\n\r\nok\r\n"},
    {"CTE 8-BIT, clean body", "Content-Type: text/plain\r\n"
                              "Content-Transfer-Encoding: 8-BIT\r\n\r\nok\r\n"},
    {"CTE binary, clean body", "Content-Type: application/octet-stream\r\n"
                               "Content-Transfer-Encoding: binary\r\n\r\n"
                               "abc\r\n"},
    {"CTE base64", "Content-Type: application/octet-stream\r\n"
                   "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n"},
    {"CTE quoted-printable", "Content-Type: text/plain\r\n"
                             "Content-Transfer-Encoding: quoted-printable\r\n"
                             "\r\ncaf=C3=A9\r\n"},
    {"clean multipart", "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                        "--b\r\nContent-Type: text/plain\r\n\r\none\r\n"
                        "--b\r\nContent-Type: text/plain\r\n\r\ntwo\r\n"
                        "--b--\r\n"},
    {"multipart, 8bit part", "Content-Type: multipart/mixed; boundary=b\r\n"
                             "\r\n--b\r\nContent-Type: text/plain\r\n"
                             "Content-Transfer-Encoding: 8bit\r\n\r\none\r\n"
                             "--b--\r\n"},
    {"multipart without boundary", "Content-Type: multipart/mixed\r\n\r\n"
                                   "text\r\n"},
    {"message/rfc822", "Content-Type: message/rfc822\r\n\r\nSubject: in\r\n"
                       "Content-Type: text/plain\r\n"
                       "Content-Transfer-Encoding: 8bit\r\n\r\nbody\r\n"},
    {"multipart named in a parameter", "Content-Type: text/plain; "
                                       "name=\"multipart.txt\"\r\n\r\nx\r\n"},
    {"no Content-Type", "Subject: s\r\n\r\nplain\r\n"},
    {"headers only", "Content-Type: text/plain\r\n"},
    {"empty body", "Content-Type: text/plain\r\n\r\n"},
    {"a NUL in the body", "Content-Type: text/plain\r\n\r\na\0b\r\n"},
    {"8-bit in an inner header", "Content-Type: text/plain; name=\"\xc3\xa9\""
                                 "\r\n\r\nx\r\n"},
    {"no blank line after headers", "Content-Type: text/plain\r\nnot a "
                                    "header\r\n"},
};

static void test_cases(void)
{
    char why[600];
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        /* the NUL case is the only one whose length strlen cannot give */
        size_t len = strcmp(cases[i].name, "a NUL in the body") == 0
                         ? strlen(cases[i].mime) + 4
                         : strlen(cases[i].mime);

        tap_ok(same_both_ways((const unsigned char *)cases[i].mime, len, why,
                              sizeof(why)),
               "%s: the shortcut gives what the walk gives (%s)", cases[i].name,
               why);
    }
    tap_ok(reencoded_count(cases[7].mime) == 1 &&
               reencoded_count(cases[4].mime) == 1,
           "a declared 8bit part and an 8-bit body are still re-encoded");
}

/* Line lengths at the 998-octet limit, on both sides, and LF vs CRLF. */
static void test_long_lines(void)
{
    static const size_t lens[] = {997, 998, 999};
    char why[600], *s;
    size_t i, k, n;
    const char *eol[] = {"\r\n", "\n"};

    for (k = 0; k < 2; k++) {
        for (i = 0; i < 3; i++) {
            s = malloc(64 + lens[i]);
            n = (size_t)sprintf(s, "Content-Type: text/plain%s%s", eol[k],
                                eol[k]);
            memset(s + n, 'x', lens[i]);
            n += lens[i];
            n += (size_t)sprintf(s + n, "%s", eol[k]);
            tap_ok(same_both_ways((unsigned char *)s, n, why, sizeof(why)),
                   "a line of %zu octets, %s: the same both ways (%s)", lens[i],
                   k ? "LF" : "CRLF", why);
            free(s);
        }
    }
}

/* Appends fewer than most pieces picked at random to buf[n..]; the new
 * length. */
static size_t add_random(char *buf, size_t n, const char *const *pieces,
                         size_t count, unsigned most, unsigned *seed)
{
    unsigned i, k;

    *seed = *seed * 1103515245u + 12345u;
    k = (*seed >> 16) % most;
    for (i = 0; i < k; i++) {
        *seed = *seed * 1103515245u + 12345u;
        n += (size_t)sprintf(buf + n, "%s", pieces[(*seed >> 16) % count]);
    }
    return n;
}

/* Random entities from the pieces the shortcut's conditions look at. */
static void test_random(void)
{
    static const char *const headers[] = {
        "Content-Type: text/plain\r\n",
        "Content-Type: text/html; charset=us-ascii\n",
        "Content-Type: application/octet-stream\r\n",
        "Content-Type: multipart/mixed; boundary=zz\r\n",
        "Content-Type: message/rfc822\r\n",
        "Content-Transfer-Encoding: 7bit\r\n",
        "Content-Transfer-Encoding: 8bit\r\n",
        "Content-Transfer-Encoding: binary\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "Content-Disposition: attachment; filename=BINARY.dat\r\n",
        "MIME-Version: 1.0\r\n",
        "Subject: hello\r\n",
        "From: a@example.org\n",
        " folded continuation\r\n",
    };
    static const char *const lines[] = {
        "plain text\r\n",
        "lf only\n",
        "bare cr\r",
        "From the start\r\n",
        "caf\xc3\xa9\r\n",
        "--zz\r\n",
        "--zz--\r\n",
        "Content-Type: text/plain\r\n",
        "\r\n",
        "AAECAwQF\r\n",
        ">From quoted\r\n",
        "tab\there\r\n",
        "trailing space \r\n",
    };
    unsigned seed = 7;
    char buf[4096], why[600];
    size_t n, k, bad = 0, runs = 600;

    for (k = 0; k < runs; k++) {
        n = add_random(buf, 0, headers, sizeof(headers) / sizeof(*headers), 4,
                       &seed);
        n += (size_t)sprintf(buf + n, "%s", (seed >> 20) & 1 ? "\r\n" : "\n");
        n = add_random(buf, n, lines, sizeof(lines) / sizeof(*lines), 12,
                       &seed);
        if (!same_both_ways((unsigned char *)buf, n, why, sizeof(why))) {
            if (bad++ == 0)
                printf("# first difference: %s\n# input: %.*s\n", why, (int)n,
                       buf);
        }
    }
    tap_ok(bad == 0, "%zu random entities: the same both ways (%zu differ)",
           runs, bad);
}

/* Where the inner entity of s lives: 1 inside s itself, at the octet
 * where want starts, with exactly want's octets; 0 in a buffer of its
 * own, with want's octets; -1 for wrong octets or a parse error. */
static int content_place(const char *s, const char *want)
{
    cms_entity ent = {0};
    cms_error err = {0};
    const unsigned char *in = (const unsigned char *)s;
    size_t len = strlen(s), n = strlen(want);
    int r = -1;

    if (cms_entity_parse(in, len, &ent, &err) != 0)
        return -1;
    if (ent.content.len == n && memcmp(ent.content.data, want, n) == 0) {
        if (ent.content.data == in + len - n)
            r = 1;
        else if (ent.content.data < in || ent.content.data >= in + len)
            r = 0;
    }
    cms_entity_release(&ent);
    return r;
}

static void test_content_view(void)
{
    tap_ok(content_place("Subject: s\r\nMIME-Version: 1.0\r\n"
                         "Content-Type: text/plain\r\n\r\nbody\r\n",
                         "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
                         "\r\nbody\r\n") == 1,
           "Content-* fields ending the header block: the inner entity is "
           "the input's own octets, not a copy");
    tap_ok(content_place("Subject: s\r\n\r\nbody\r\n", "\r\nbody\r\n") == 1,
           "no Content-* field: the blank line and the body, not a copy");
    tap_ok(content_place("Content-Type: text/plain\r\nSubject: s\r\n\r\n"
                         "body\r\n",
                         "Content-Type: text/plain\r\n\r\nbody\r\n") == 0,
           "an outer field after them: a copy");
    tap_ok(content_place("Subject: s\nContent-Type: text/plain\n\nbody\n",
                         "Content-Type: text/plain\r\n\r\nbody\r\n") == 0,
           "LF line ends: the canonical copy");
    tap_ok(content_place("Subject: s\r\nContent-Type: text/plain; "
                         "charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n",
                         "Content-Type: text/plain; charset=utf-8\r\n"
                         "Content-Transfer-Encoding: quoted-printable\r\n"
                         "\r\ncaf=C3=A9\r\n") == 0,
           "re-encoded: a copy");
    tap_ok(content_place("Subject: s\r\nContent-Type: text/plain\r\n", "") ==
                   -1 &&
               content_place("Subject: s\r\nContent-Type: text/plain\r\n",
                             "Content-Type: text/plain\r\n\r\n") == 0,
           "a header block without a blank line: the blank line is added "
           "(a copy)");
}

int main(void)
{
    cms_init();
    test_cases();
    test_long_lines();
    test_random();
    test_content_view();
    return tap_done();
}
