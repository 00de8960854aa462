/*
 * The whole-message split and the header restore (cms/internal.h):
 * cms_entity_parse (what sign and encrypt put inside, and the mail headers
 * that stay outside), cms_outer_read (the outside of a received S/MIME
 * entity) and cms_outer_restore (putting it back on what was inside).
 * Invariants, on input either accepts:
 *   - the inside is canonical (CRLF only) and 7-bit transport safe: no NUL
 *     or 8-bit octet, no line over 998 octets, none ending in a blank or
 *     starting "From ";
 *   - the outside is header fields only, CRLF, none of them Content-* or
 *     MIME-Version, and cms_outer_read of the input finds the same;
 *   - re-encoded parts are listed as "PART-NUMBER ENCODING";
 *   - the inside is a fixed point: parsed again it is unchanged, with
 *     nothing outside and nothing re-encoded;
 *   - restoring the outside onto the inside and parsing that gives both
 *     back.
 */
#include <ctype.h>
#include <stdint.h>

#include "cms/internal.h"
#include "fuzz.h"

/* The outside is a cms_buf, the inside a cms_bytes: both have data and
 * len. */
#define SAME(a, b)                                                             \
    ((a).len == (b).len &&                                                     \
     ((a).len == 0 || memcmp((a).data, (b).data, (a).len) == 0))

static void check_canonical(const char *what, const cms_bytes *b)
{
    size_t i;

    for (i = 0; i < b->len; i++) {
        if (b->data[i] == '\r')
            FUZZ_CHECK(i + 1 < b->len && b->data[i + 1] == '\n',
                       "%s: bare CR at %zu", what, i);
        if (b->data[i] == '\n')
            FUZZ_CHECK(i > 0 && b->data[i - 1] == '\r', "%s: bare LF at %zu",
                       what, i);
    }
}

static void check_transport_safe(const cms_bytes *b)
{
    size_t i, start = 0, n;

    for (i = 0; i < b->len; i++) {
        FUZZ_CHECK(b->data[i] != 0 && b->data[i] < 0x80,
                   "inside: octet 0x%02x at %zu", b->data[i], i);
        if (b->data[i] != '\n' && i + 1 < b->len)
            continue;
        /* the line b[start..i] */
        n = i + 1 - start;
        if (b->data[i] == '\n')
            n -= 2;
        FUZZ_CHECK(n <= 998, "inside: a line of %zu octets at %zu", n, start);
        FUZZ_CHECK(n == 0 || (b->data[start + n - 1] != ' ' &&
                              b->data[start + n - 1] != '\t'),
                   "inside: a line ending in a blank at %zu", start);
        FUZZ_CHECK(n < 5 || memcmp(b->data + start, "From ", 5) != 0,
                   "inside: a line starting \"From \" at %zu", start);
        start = i + 1;
    }
}

static int name_starts(const unsigned char *s, size_t n, const char *prefix)
{
    size_t i, k = strlen(prefix);

    if (n < k)
        return 0;
    for (i = 0; i < k; i++)
        if (tolower(s[i]) != tolower((unsigned char)prefix[i]))
            return 0;
    return 1;
}

/* Header fields only, none of them a MIME field. */
static void check_outer(const char *what, const cms_buf *buf)
{
    cms_bytes view = {buf->data, buf->len}, *b = &view;
    size_t pos = 0, end, k;
    const unsigned char *lf;

    check_canonical(what, b);
    FUZZ_CHECK(b->len == 0 || b->data[b->len - 1] == '\n',
               "%s: does not end in CRLF", what);
    while (pos < b->len) {
        lf = memchr(b->data + pos, '\n', b->len - pos);
        end = (size_t)(lf - b->data) + 1;
        FUZZ_CHECK(end - pos > 2, "%s: an empty line at %zu", what, pos);
        if (pos == 0)
            FUZZ_CHECK(b->data[0] != ' ' && b->data[0] != '\t',
                       "%s: starts with a continuation line", what);
        if (b->data[pos] != ' ' && b->data[pos] != '\t') {
            for (k = pos; k < end && b->data[k] != ':'; k++)
                ;
            FUZZ_CHECK(k < end, "%s: a line without a colon at %zu", what, pos);
            while (k > pos && (b->data[k - 1] == ' ' || b->data[k - 1] == '\t'))
                k--;
            FUZZ_CHECK(
                !(k - pos > 8 &&
                  name_starts(b->data + pos, k - pos, "Content-")) &&
                    !(k - pos == 12 &&
                      name_starts(b->data + pos, k - pos, "MIME-Version")),
                "%s: a MIME field at %zu", what, pos);
        }
        pos = end;
    }
}

static void check_reencoded(const cms_entity *ent)
{
    size_t i, k;
    const char *s, *sp;

    for (i = 0; i < ent->n_reencoded; i++) {
        s = ent->reencoded[i];
        sp = strchr(s, ' ');
        FUZZ_CHECK(sp != NULL && sp > s, "re-encoded part \"%s\"", s);
        for (k = 0; s + k < sp; k++)
            FUZZ_CHECK(
                isdigit((unsigned char)s[k]) ||
                    (s[k] == '.' && k > 0 && s[k - 1] != '.' && s + k + 1 < sp),
                "re-encoded part number \"%s\"", s);
        FUZZ_CHECK(strcmp(sp + 1, "quoted-printable") == 0 ||
                       strcmp(sp + 1, "base64") == 0,
                   "re-encoded part encoding \"%s\"", s);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cms_entity ent = {0}, again = {0}, back = {0};
    cms_buf outer = {0}, restored = {0};
    cms_error err = {0};
    int parsed, read;

    cms_init();
    parsed = cms_entity_parse(data, size, &ent, &err) == 0;
    FUZZ_CHECK(fuzz_text_valid(err.message), "message is not UTF-8");
    if (!parsed)
        FUZZ_CHECK(fuzz_refusal(err.status), "status %d: %s", err.status,
                   err.message);
    memset(&err, 0, sizeof(err));
    read = cms_outer_read(data, size, &outer, &err) == 0;
    FUZZ_CHECK(fuzz_text_valid(err.message), "message is not UTF-8");
    if (read)
        check_outer("cms_outer_read", &outer);
    if (!parsed)
        goto out;

    check_canonical("inside", &ent.content);
    check_transport_safe(&ent.content);
    check_outer("outside", &ent.outer);
    check_reencoded(&ent);
    if (read)
        FUZZ_CHECK(SAME(outer, ent.outer),
                   "cms_outer_read and cms_entity_parse disagree");

    FUZZ_CHECK(
        cms_entity_parse(ent.content.data, ent.content.len, &again, &err) == 0,
        "the inside does not parse again: %s", err.message);
    FUZZ_CHECK(SAME(again.content, ent.content) && again.outer.len == 0 &&
                   again.n_reencoded == 0,
               "the inside is no fixed point (%zu re-encoded)",
               again.n_reencoded);

    if (cms_buf_add(&restored, ent.content.data, ent.content.len) != 0 ||
        cms_outer_restore(&ent.outer, &restored, &err) != 0)
        fuzz_die("out of memory");
    FUZZ_CHECK(cms_entity_parse(restored.data, restored.len, &back, &err) == 0,
               "the restored entity does not parse: %s", err.message);
    FUZZ_CHECK(SAME(back.outer, ent.outer) && SAME(back.content, ent.content) &&
                   back.n_reencoded == 0,
               "restoring the outside lost or changed something");
out:
    cms_entity_release(&ent);
    cms_entity_release(&again);
    cms_entity_release(&back);
    cms_buf_release(&outer);
    cms_buf_release(&restored);
    return 0;
}
