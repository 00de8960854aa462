/*
 * The tests' own UTF-8 check, for the unit tests (testkeys.h) and the fuzz
 * harnesses (fuzz.h): the messages the modules make for people, and the
 * text proto decodes, must be valid UTF-8. It decodes code point by code
 * point rather than judging octets by ranges as the code under test does
 * (proto/proto.c, api/json.c), so that a bug there cannot hide itself
 * behind the same bug here.
 */
#ifndef SMIMED_TESTS_UTF8CHECK_H
#define SMIMED_TESTS_UTF8CHECK_H

#include <stddef.h>

/* Whether s[0..len) is UTF-8 (RFC 3629): no overlong forms, no
 * surrogates, nothing past U+10FFFF. */
static inline int test_utf8_valid(const unsigned char *s, size_t len)
{
    unsigned long cp, min;
    size_t i = 0, n, k;

    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        /* n continuation octets; min, the first code point needing them */
        if ((s[i] & 0xe0) == 0xc0) {
            n = 1;
            min = 0x80;
        } else if ((s[i] & 0xf0) == 0xe0) {
            n = 2;
            min = 0x800;
        } else if ((s[i] & 0xf8) == 0xf0) {
            n = 3;
            min = 0x10000;
        } else {
            return 0;
        }
        if (len - i - 1 < n)
            return 0;
        cp = s[i] & (0x3fu >> n);
        for (k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += n + 1;
    }
    return 1;
}

#endif
