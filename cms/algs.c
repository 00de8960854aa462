/*
 * The algorithm identifiers of an envelope or a signed message, checked
 * against what smimed accepts before OpenSSL parses the structure, let
 * alone decrypts or verifies it. OpenSSL's CMS code acts on whatever
 * algorithm its providers know, and the code paths behind rarely used ones
 * have bugs of their own: OpenSSL 3.0.19's unwrap with padding
 * (id-aes*-wrap-pad, reachable through a KeyAgreeRecipientInfo) writes past
 * its buffer when the key does not unwrap. An allow-list keeps every such
 * path out of reach.
 *
 * The walker reads BER (definite and indefinite lengths, constructed
 * strings) without copying: a cursor moves over the input, and an element
 * of indefinite length ends where its content's end-of-contents marker is
 * found, so every octet is looked at about once. Elements it has no use for
 * (certificates, attributes, the encrypted content) are stepped over by
 * their length, or walked to their end when it is indefinite; it never
 * reads past the input, and nesting stops at MAX_DEPTH levels. It reads the
 * first element of the input only: what follows is for cms_der_read to
 * judge. What it has no use for is not validated either: that is OpenSSL's
 * parse, which comes next.
 *
 * What is checked, and why not more, is in docs/DESIGN.md ("Allow-lists
 * before OpenSSL"); the lists themselves are in the README.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/objects.h>

#include "cms/internal.h"

/* Deeper than any CMS structure (a certificate inside a SignedData is
 * about 12 levels down) and shallow enough for the recursion that skips
 * elements of indefinite length. */
#define MAX_DEPTH 64

#define TAG_INTEGER 2
#define TAG_BIT_STRING 3
#define TAG_OCTET_STRING 4
#define TAG_NULL 5
#define TAG_OID 6
#define TAG_SEQUENCE 16
#define TAG_SET 17

#define UNIVERSAL 0x00
#define CONTEXT 0x80

typedef struct walk {
    const unsigned char *base; /* the input, for offsets in messages */
    cms_error *err;
    unsigned long icv; /* the GCMParameters' ICV length, once read */
} walk;

/* A position inside the content of a constructed element (or the input). */
typedef struct ber {
    const unsigned char *p;   /* the next element */
    const unsigned char *end; /* definite: the content's end; else a bound */
    int indef;                /* the content ends with an end-of-contents */
    int depth;                /* of the elements read from here */
} ber;

/* An element: its identifier and its content, which a constructed one's
 * cursor walks. */
typedef struct tlv {
    unsigned char cls; /* UNIVERSAL, CONTEXT, ... */
    unsigned char cons;
    unsigned long tag;
    const unsigned char *at;
    ber in;
} tlv;

typedef struct oid {
    const unsigned char *der; /* content octets */
    size_t len;
    char text[96]; /* dotted; "..." ends one too long to show */
} oid;

/* An AlgorithmIdentifier; params is its second field when present, its
 * cursor at the start of its content. */
typedef struct algid {
    oid alg;
    int has_params;
    tlv params;
} algid;

/* ---- reading BER -------------------------------------------------------- */

static int unreadable(walk *w, const unsigned char *at, const char *why)
{
    cms_set_error(w->err, CMS_ERR_INPUT,
                  "the body is not a CMS structure: %s (octet %zu)", why,
                  (size_t)(at - w->base));
    return -1;
}

/* Reads the identifier and length of the next element of c into t, without
 * moving c (ber_done does): 1, or 0 at the end of c's content, or -1. */
static int ber_next(walk *w, const ber *c, tlv *t)
{
    const unsigned char *p = c->p;
    size_t avail = (size_t)(c->end - p), len, n, i;

    if (!c->indef && avail == 0)
        return 0;
    if (c->indef && avail >= 2 && p[0] == 0 && p[1] == 0)
        return 0;
    if (avail < 2)
        return unreadable(w, p, "the data ends inside an element");
    if (c->depth >= MAX_DEPTH)
        return unreadable(w, p, "elements nest more than 64 levels deep");
    t->at = p;
    t->cls = p[0] & 0xc0;
    t->cons = (p[0] & 0x20) != 0;
    t->tag = p[0] & 0x1f;
    p++;
    if (t->tag == 0x1f) {
        /* a high tag number, base 128: four octets are plenty for any */
        t->tag = 0;
        for (i = 0;; i++) {
            if (p == c->end)
                return unreadable(w, t->at, "the data ends inside an element");
            if (i == 4 || (i == 0 && *p == 0x80))
                return unreadable(w, t->at, "a tag is malformed");
            t->tag = t->tag << 7 | (*p & 0x7f);
            if ((*p++ & 0x80) == 0)
                break;
        }
    } else if (t->tag == 0 && t->cls == UNIVERSAL) {
        return unreadable(w, t->at,
                          "an end-of-contents marker where an element belongs");
    }
    if (p == c->end)
        return unreadable(w, t->at, "the data ends inside an element");
    n = *p++;
    if (n == 0x80) {
        if (!t->cons)
            return unreadable(w, t->at,
                              "a primitive element has an indefinite length");
        t->in = (ber){p, c->end, 1, c->depth + 1};
        return 1;
    }
    if (n < 0x80) {
        len = n;
    } else {
        n &= 0x7f;
        if (n == 0x7f || n > (size_t)(c->end - p))
            return unreadable(w, t->at, "a length is malformed");
        for (len = 0, i = 0; i < n; i++) {
            if (len > SIZE_MAX >> 8)
                return unreadable(w, t->at, "a length is too large");
            len = len << 8 | *p++;
        }
    }
    if (len > (size_t)(c->end - p))
        return unreadable(w, t->at, "an element runs past the end of the data");
    t->in = (ber){p, p + len, 0, c->depth + 1};
    return 1;
}

static int ber_skip(walk *w, ber *c);

/* Moves c past t, the element ber_next read from it. An element of
 * indefinite length is walked from where t's cursor stands to its
 * end-of-contents marker. */
static int ber_done(walk *w, ber *c, tlv *t)
{
    int r;

    if (!t->in.indef) {
        c->p = t->in.end;
        return 0;
    }
    while ((r = ber_skip(w, &t->in)) > 0)
        ;
    if (r < 0)
        return -1;
    c->p = t->in.p + 2;
    return 0;
}

/* Steps over the next element of c: 1, or 0 at the end of c, or -1. */
static int ber_skip(walk *w, ber *c)
{
    tlv t;
    int r = ber_next(w, c, &t);

    if (r <= 0)
        return r;
    return ber_done(w, c, &t) == 0 ? 1 : -1;
}

static int is(const tlv *t, unsigned char cls, int cons, unsigned long tag)
{
    return t->cls == cls && t->cons == cons && t->tag == tag;
}

/* Reads the next element of c, which must be there with this identifier;
 * what names it in the message. c does not move (ber_done does). */
static int expect(walk *w, const ber *c, tlv *t, unsigned char cls, int cons,
                  unsigned long tag, const char *what)
{
    char why[96];
    int r = ber_next(w, c, t);

    if (r < 0)
        return -1;
    if (r == 0 || !is(t, cls, cons, tag)) {
        snprintf(why, sizeof(why), "%s expected", what);
        return unreadable(w, r == 0 ? c->p : t->at, why);
    }
    return 0;
}

/* Whether the next element of c has this identifier; then it is in t. */
static int peek(walk *w, const ber *c, tlv *t, unsigned char cls, int cons,
                unsigned long tag)
{
    int r = ber_next(w, c, t);

    if (r <= 0)
        return r;
    return is(t, cls, cons, tag);
}

/* The number of octets of the OCTET STRING t, primitive or constructed; t's
 * cursor is used up. */
static int string_len(walk *w, tlv *t, size_t *len)
{
    tlv chunk;
    size_t n;
    int r;

    if (!t->cons) {
        *len = (size_t)(t->in.end - t->in.p);
        return 0;
    }
    *len = 0;
    while ((r = ber_next(w, &t->in, &chunk)) > 0) {
        if (!is(&chunk, UNIVERSAL, chunk.cons, TAG_OCTET_STRING))
            return unreadable(w, chunk.at,
                              "a constructed OCTET STRING holds something "
                              "else");
        if (string_len(w, &chunk, &n) || ber_done(w, &t->in, &chunk))
            return -1;
        *len += n;
    }
    return r;
}

/* Writes the dotted form of the object identifier content p[0..n); -1 when
 * it is not a well-formed one (empty, a non-minimal or an unterminated
 * subidentifier, an arc past 64 bits). */
static int oid_format(const unsigned char *p, size_t n, char *buf, size_t size)
{
    uint64_t v = 0;
    size_t used = 0, i;
    int fresh = 1, first = 1, k;

    if (n == 0 || (p[n - 1] & 0x80) != 0)
        return -1;
    buf[0] = '\0';
    for (i = 0; i < n; i++) {
        if (fresh && p[i] == 0x80)
            return -1;
        if (v > UINT64_MAX >> 7)
            return -1;
        v = v << 7 | (p[i] & 0x7f);
        fresh = (p[i] & 0x80) == 0;
        if (!fresh)
            continue;
        if (used < size) {
            if (first)
                k = v < 80 ? snprintf(buf, size, "%u.%u", (unsigned)(v / 40),
                                      (unsigned)(v % 40))
                           : snprintf(buf, size, "2.%llu",
                                      (unsigned long long)(v - 80));
            else
                k = snprintf(buf + used, size - used, ".%llu",
                             (unsigned long long)v);
            used += (size_t)k;
        }
        first = 0;
        v = 0;
    }
    if (used >= size)
        memcpy(buf + size - 4, "...", 4);
    return 0;
}

static int read_oid(walk *w, ber *c, oid *o, const char *what)
{
    tlv t;

    if (expect(w, c, &t, UNIVERSAL, 0, TAG_OID, what))
        return -1;
    o->der = t.in.p;
    o->len = (size_t)(t.in.end - t.in.p);
    if (oid_format(o->der, o->len, o->text, sizeof(o->text)))
        return unreadable(w, t.at, "an object identifier is malformed");
    return ber_done(w, c, &t);
}

/* The AlgorithmIdentifier in the SEQUENCE seq, whose cursor is used up. */
static int algid_parse(walk *w, tlv *seq, algid *a)
{
    tlv params, extra;
    int r;

    if (read_oid(w, &seq->in, &a->alg, "an algorithm's object identifier"))
        return -1;
    r = ber_next(w, &seq->in, &a->params);
    if (r <= 0) {
        a->has_params = 0;
        return r;
    }
    a->has_params = 1;
    /* params keeps its cursor at the start for the checks */
    params = a->params;
    if (ber_done(w, &seq->in, &params))
        return -1;
    r = ber_next(w, &seq->in, &extra);
    if (r > 0)
        return unreadable(w, extra.at,
                          "an AlgorithmIdentifier has more than two fields");
    return r;
}

static int read_algid(walk *w, ber *c, algid *a, const char *what)
{
    tlv seq;

    if (expect(w, c, &seq, UNIVERSAL, 1, TAG_SEQUENCE, what) ||
        algid_parse(w, &seq, a))
        return -1;
    return ber_done(w, c, &seq);
}

/* ---- the lists -------------------------------------------------------- */

typedef enum {
    PARAMS_NONE,   /* absent or NULL */
    PARAMS_OCTETS, /* an OCTET STRING of arg octets (an IV, a label) */
    PARAMS_GCM,    /* GCMParameters (RFC 5084) */
    PARAMS_OAEP,   /* RSAES-OAEP-params (RFC 8017) */
    PARAMS_PSS,    /* RSASSA-PSS-params */
    PARAMS_EC,     /* absent, NULL, or an accepted namedCurve */
    PARAMS_WRAP,   /* an accepted key-wrap AlgorithmIdentifier */
    PARAMS_HASH,   /* an accepted digest AlgorithmIdentifier (MGF1) */
} params_rule;

typedef struct accepted {
    const char *oid;
    params_rule params;
    int arg;
} accepted;

typedef struct alg_list {
    const char *what;  /* for messages: "key wrap" */
    const char *shown; /* the accepted ones, for people */
    const accepted *algs;
    size_t n;
} alg_list;

#define LIST(what, shown, algs)                                                \
    {                                                                          \
        what, shown, algs, sizeof(algs) / sizeof(algs[0])                      \
    }

static const accepted cbc_algs[] = {
    {"2.16.840.1.101.3.4.1.2", PARAMS_OCTETS, 16},  /* aes-128-cbc */
    {"2.16.840.1.101.3.4.1.22", PARAMS_OCTETS, 16}, /* aes-192-cbc */
    {"2.16.840.1.101.3.4.1.42", PARAMS_OCTETS, 16}, /* aes-256-cbc */
    {"1.2.840.113549.3.7", PARAMS_OCTETS, 8},       /* des-ede3-cbc */
};
static const accepted gcm_algs[] = {
    {"2.16.840.1.101.3.4.1.6", PARAMS_GCM, 0},  /* aes-128-gcm */
    {"2.16.840.1.101.3.4.1.26", PARAMS_GCM, 0}, /* aes-192-gcm */
    {"2.16.840.1.101.3.4.1.46", PARAMS_GCM, 0}, /* aes-256-gcm */
};
static const accepted transport_algs[] = {
    {"1.2.840.113549.1.1.1", PARAMS_NONE, 0}, /* rsaEncryption */
    {"1.2.840.113549.1.1.7", PARAMS_OAEP, 0}, /* id-RSAES-OAEP */
};
/* RFC 5753 §7.1.4: ephemeral-static ECDH, standard or cofactor, and the
 * X9.63 KDF with SHA-1 ... SHA-512 */
static const accepted agreement_algs[] = {
    {"1.3.133.16.840.63.0.2", PARAMS_WRAP, 0}, /* stdDH-sha1kdf */
    {"1.3.132.1.11.0", PARAMS_WRAP, 0},        /* stdDH-sha224kdf */
    {"1.3.132.1.11.1", PARAMS_WRAP, 0},        /* stdDH-sha256kdf */
    {"1.3.132.1.11.2", PARAMS_WRAP, 0},        /* stdDH-sha384kdf */
    {"1.3.132.1.11.3", PARAMS_WRAP, 0},        /* stdDH-sha512kdf */
    {"1.3.133.16.840.63.0.3", PARAMS_WRAP, 0}, /* cofactorDH-sha1kdf */
    {"1.3.132.1.14.0", PARAMS_WRAP, 0},        /* cofactorDH-sha224kdf */
    {"1.3.132.1.14.1", PARAMS_WRAP, 0},        /* cofactorDH-sha256kdf */
    {"1.3.132.1.14.2", PARAMS_WRAP, 0},        /* cofactorDH-sha384kdf */
    {"1.3.132.1.14.3", PARAMS_WRAP, 0},        /* cofactorDH-sha512kdf */
};
static const accepted wrap_algs[] = {
    {"2.16.840.1.101.3.4.1.5", PARAMS_NONE, 0},  /* id-aes128-wrap */
    {"2.16.840.1.101.3.4.1.25", PARAMS_NONE, 0}, /* id-aes192-wrap */
    {"2.16.840.1.101.3.4.1.45", PARAMS_NONE, 0}, /* id-aes256-wrap */
};
static const accepted originator_algs[] = {
    {"1.2.840.10045.2.1", PARAMS_EC, 0}, /* id-ecPublicKey */
};
static const accepted curve_algs[] = {
    {"1.2.840.10045.3.1.7", PARAMS_NONE, 0}, /* prime256v1 */
    {"1.3.132.0.34", PARAMS_NONE, 0},        /* secp384r1 */
    {"1.3.132.0.35", PARAMS_NONE, 0},        /* secp521r1 */
};
static const accepted digest_algs[] = {
    {"1.3.14.3.2.26", PARAMS_NONE, 0},          /* sha1 */
    {"2.16.840.1.101.3.4.2.4", PARAMS_NONE, 0}, /* sha224 */
    {"2.16.840.1.101.3.4.2.1", PARAMS_NONE, 0}, /* sha256 */
    {"2.16.840.1.101.3.4.2.2", PARAMS_NONE, 0}, /* sha384 */
    {"2.16.840.1.101.3.4.2.3", PARAMS_NONE, 0}, /* sha512 */
};
static const accepted signature_algs[] = {
    {"1.2.840.113549.1.1.1", PARAMS_NONE, 0},  /* rsaEncryption */
    {"1.2.840.113549.1.1.5", PARAMS_NONE, 0},  /* sha1WithRSAEncryption */
    {"1.2.840.113549.1.1.14", PARAMS_NONE, 0}, /* sha224WithRSAEncryption */
    {"1.2.840.113549.1.1.11", PARAMS_NONE, 0}, /* sha256WithRSAEncryption */
    {"1.2.840.113549.1.1.12", PARAMS_NONE, 0}, /* sha384WithRSAEncryption */
    {"1.2.840.113549.1.1.13", PARAMS_NONE, 0}, /* sha512WithRSAEncryption */
    {"1.2.840.113549.1.1.10", PARAMS_PSS, 0},  /* RSASSA-PSS */
    {"1.2.840.10045.4.1", PARAMS_NONE, 0},     /* ecdsa-with-SHA1 */
    {"1.2.840.10045.4.3.1", PARAMS_NONE, 0},   /* ecdsa-with-SHA224 */
    {"1.2.840.10045.4.3.2", PARAMS_NONE, 0},   /* ecdsa-with-SHA256 */
    {"1.2.840.10045.4.3.3", PARAMS_NONE, 0},   /* ecdsa-with-SHA384 */
    {"1.2.840.10045.4.3.4", PARAMS_NONE, 0},   /* ecdsa-with-SHA512 */
    /* what some implementations write for ECDSA; the digest is the
     * SignerInfo's */
    {"1.2.840.10045.2.1", PARAMS_EC, 0}, /* id-ecPublicKey */
};
static const accepted mgf_algs[] = {
    {"1.2.840.113549.1.1.8", PARAMS_HASH, 0}, /* id-mgf1 */
};
static const accepted psource_algs[] = {
    {"1.2.840.113549.1.1.9", PARAMS_OCTETS, 0}, /* id-pSpecified */
};

#define DIGESTS_SHOWN "sha1, sha224, sha256, sha384, sha512"

static const alg_list cbc_list =
    LIST("content encryption of EnvelopedData",
         "aes-128-cbc, aes-192-cbc, aes-256-cbc, des-ede3-cbc", cbc_algs);
static const alg_list gcm_list =
    LIST("content encryption of AuthEnvelopedData",
         "aes-128-gcm, aes-192-gcm, aes-256-gcm", gcm_algs);
static const alg_list transport_list =
    LIST("key transport", "rsaEncryption, id-RSAES-OAEP", transport_algs);
static const alg_list agreement_list =
    LIST("key agreement",
         "dhSinglePass-stdDH-* and dhSinglePass-cofactorDH-* with the "
         "sha1, sha224, sha256, sha384 or sha512 KDF",
         agreement_algs);
static const alg_list wrap_list = LIST(
    "key wrap", "id-aes128-wrap, id-aes192-wrap, id-aes256-wrap", wrap_algs);
static const alg_list originator_list =
    LIST("originator key", "id-ecPublicKey", originator_algs);
static const alg_list curve_list =
    LIST("curve", "prime256v1, secp384r1, secp521r1", curve_algs);
static const alg_list digest_list = LIST("digest", DIGESTS_SHOWN, digest_algs);
static const alg_list signature_list =
    LIST("signature",
         "rsaEncryption, sha1/224/256/384/512WithRSAEncryption, RSASSA-PSS, "
         "ecdsa-with-SHA1/224/256/384/512, id-ecPublicKey",
         signature_algs);
static const alg_list oaep_hash_list =
    LIST("OAEP hash", DIGESTS_SHOWN, digest_algs);
static const alg_list pss_hash_list =
    LIST("PSS hash", DIGESTS_SHOWN, digest_algs);
static const alg_list mgf1_hash_list =
    LIST("MGF1 hash", DIGESTS_SHOWN, digest_algs);
static const alg_list mgf_list =
    LIST("mask generation function", "MGF1", mgf_algs);
static const alg_list psource_list =
    LIST("OAEP label source", "pSpecified, empty", psource_algs);

/* ---- checking ----------------------------------------------------------- */

/* The OpenSSL NID of o, NID_undef when it has none. */
static int oid_nid(const oid *o)
{
    ASN1_OBJECT *obj = NULL;
    int nid = NID_undef;

    if (o->len <= INT_MAX)
        obj = ASN1_OBJECT_create(NID_undef, (unsigned char *)o->der,
                                 (int)o->len, NULL, NULL);
    if (obj != NULL)
        nid = OBJ_obj2nid(obj);
    ASN1_OBJECT_free(obj);
    ERR_clear_error();
    return nid;
}

/* " (SHORT-NAME)" of o when OpenSSL has one, else "". */
static void oid_name(const oid *o, char *buf, size_t size)
{
    int nid = oid_nid(o);
    const char *sn = nid != NID_undef ? OBJ_nid2sn(nid) : NULL;

    if (sn != NULL)
        snprintf(buf, size, " (%s)", sn);
    else
        buf[0] = '\0';
}

static int refuse(walk *w, const alg_list *list, const oid *o)
{
    char name[64];

    oid_name(o, name, sizeof(name));
    cms_set_error(w->err, CMS_ERR_ALGORITHM,
                  "%s %s%s is not supported (accepted: %s)", list->what,
                  o->text, name, list->shown);
    return -1;
}

static int refuse_params(walk *w, const alg_list *list, const oid *o,
                         const char *why)
{
    char name[64];

    oid_name(o, name, sizeof(name));
    cms_set_error(w->err, CMS_ERR_ALGORITHM,
                  "%s %s%s is not supported with these parameters: %s",
                  list->what, o->text, name, why);
    return -1;
}

static const accepted *find(const alg_list *list, const oid *o)
{
    size_t i;

    for (i = 0; i < list->n; i++)
        if (strcmp(list->algs[i].oid, o->text) == 0)
            return &list->algs[i];
    return NULL;
}

static int params_null(const algid *a)
{
    return is(&a->params, UNIVERSAL, 0, TAG_NULL) &&
           a->params.in.p == a->params.in.end;
}

static int check_algid(walk *w, const algid *a, const alg_list *list,
                       oid *hash);

/* The one AlgorithmIdentifier inside the EXPLICIT [n] t, checked. */
static int check_explicit(walk *w, tlv *t, const alg_list *list, oid *hash)
{
    tlv seq;
    algid a;

    if (expect(w, &t->in, &seq, UNIVERSAL, 1, TAG_SEQUENCE,
               "an AlgorithmIdentifier") ||
        algid_parse(w, &seq, &a) || ber_done(w, &t->in, &seq))
        return -1;
    if (ber_next(w, &t->in, &seq) != 0)
        return unreadable(w, t->at,
                          "an explicit tag holds more than one element");
    return check_algid(w, &a, list, hash);
}

/* The INTEGER t, minimal and from 0 to 0xffffff, into *v; -1 when it is
 * not one. */
static int small_int(const tlv *t, unsigned long *v)
{
    const unsigned char *p = t->in.p;
    size_t n = (size_t)(t->in.end - p), i;

    if (!is(t, UNIVERSAL, 0, TAG_INTEGER) || n == 0 || n > 3 ||
        (p[0] & 0x80) != 0 || (n > 1 && p[0] == 0 && (p[1] & 0x80) == 0))
        return -1;
    for (*v = 0, i = 0; i < n; i++)
        *v = *v << 8 | p[i];
    return 0;
}

/* The INTEGER inside the EXPLICIT [n] t into *v: 0, or 1 when it is not a
 * small INTEGER alone, or -1 when the BER cannot be read. */
static int explicit_int(walk *w, tlv *t, unsigned long *v)
{
    tlv val;
    int r = ber_next(w, &t->in, &val);

    if (r <= 0)
        return r < 0 ? -1 : 1;
    if (small_int(&val, v) || ber_done(w, &t->in, &val))
        return 1;
    r = ber_next(w, &t->in, &val);
    return r < 0 ? -1 : r > 0;
}

/* The fields of RSASSA-PSS-params (pss) or RSAES-OAEP-params, all optional
 * and EXPLICIT [0] [1] [2] ([3]) in this order. The hashes default to
 * sha1, the salt length to 20, the trailer field to 1, the label to an
 * empty one. */
static int check_rsa_params(walk *w, const algid *a, const alg_list *list,
                            int pss)
{
    static const oid sha1 = {NULL, 0, "1.3.14.3.2.26"};
    oid hash = sha1, mgf_hash = sha1;
    tlv seq = a->params, f;
    unsigned long v, next = 0;
    int r;

    if (!a->has_params && !pss)
        return 0;
    if (!a->has_params || !is(&seq, UNIVERSAL, 1, TAG_SEQUENCE))
        return refuse_params(w, list, &a->alg,
                             "they are not a SEQUENCE of parameters");
    while ((r = ber_next(w, &seq.in, &f)) > 0) {
        if (f.cls != CONTEXT || !f.cons || f.tag < next ||
            f.tag > (pss ? 3u : 2u))
            return refuse_params(w, list, &a->alg,
                                 "a field is unknown or out of order");
        next = f.tag + 1;
        if (f.tag == 0) {
            r = check_explicit(w, &f, pss ? &pss_hash_list : &oaep_hash_list,
                               &hash);
        } else if (f.tag == 1) {
            r = check_explicit(w, &f, &mgf_list, &mgf_hash);
        } else if (!pss) {
            r = check_explicit(w, &f, &psource_list, NULL);
        } else {
            r = explicit_int(w, &f, &v);
            if (r > 0 || (r == 0 && f.tag == 2 && v > 1024) ||
                (r == 0 && f.tag == 3 && v != 1))
                return refuse_params(w, list, &a->alg,
                                     f.tag == 2
                                         ? "the salt length is not 0 to 1024"
                                         : "the trailer field is not 1");
        }
        if (r < 0 || ber_done(w, &seq.in, &f))
            return -1;
    }
    if (r < 0)
        return -1;
    if (pss && strcmp(hash.text, mgf_hash.text) != 0)
        return refuse_params(w, list, &a->alg,
                             "MGF1 uses another hash than the signature");
    return 0;
}

/* Whether t is an OCTET STRING of n octets: 1 or 0, or -1 when the BER
 * cannot be read. */
static int octets_of(walk *w, const tlv *t, size_t n)
{
    tlv s = *t;
    size_t len;

    if (!is(&s, UNIVERSAL, s.cons, TAG_OCTET_STRING))
        return 0;
    if (string_len(w, &s, &len))
        return -1;
    return len == n;
}

/* GCMParameters: a 12-octet nonce, then an ICV length of 12 to 16 octets
 * (12 when absent). */
static int check_gcm(walk *w, const algid *a, const alg_list *list)
{
    tlv seq = a->params, f;
    unsigned long icv;
    int r;

    if (!a->has_params || !is(&seq, UNIVERSAL, 1, TAG_SEQUENCE))
        return refuse_params(w, list, &a->alg, "they are not GCMParameters");
    r = ber_next(w, &seq.in, &f);
    if (r > 0)
        r = octets_of(w, &f, 12);
    if (r < 0)
        return -1;
    if (r == 0)
        return refuse_params(w, list, &a->alg,
                             "the nonce must be an OCTET STRING of 12 octets");
    if (ber_done(w, &seq.in, &f))
        return -1;
    w->icv = 12;
    r = ber_next(w, &seq.in, &f);
    if (r <= 0)
        return r;
    if (small_int(&f, &icv) || icv < 12 || icv > 16)
        return refuse_params(w, list, &a->alg,
                             "the ICV length must be 12 to 16 octets");
    w->icv = icv;
    if (ber_done(w, &seq.in, &f))
        return -1;
    r = ber_next(w, &seq.in, &f);
    if (r > 0)
        return refuse_params(w, list, &a->alg,
                             "they have more than two fields");
    return r;
}

/*
 * Checks a against list and its parameters against the rule of its entry.
 * hash, when not NULL, receives the OID checked (the hash of OAEP or PSS
 * parameters, the hash MGF1 names).
 */
static int check_algid(walk *w, const algid *a, const alg_list *list, oid *hash)
{
    const accepted *ok = find(list, &a->alg);
    tlv p = a->params, inner;
    algid wrap;
    oid named;
    char why[64];
    int r;

    if (ok == NULL)
        return refuse(w, list, &a->alg);
    if (hash != NULL)
        *hash = a->alg;
    switch (ok->params) {
    case PARAMS_NONE:
        if (a->has_params && !params_null(a))
            return refuse_params(w, list, &a->alg,
                                 "they must be absent or NULL");
        return 0;
    case PARAMS_OCTETS:
        r = a->has_params ? octets_of(w, &p, (size_t)ok->arg) : 0;
        if (r < 0)
            return -1;
        if (r == 0) {
            if (ok->arg == 0)
                snprintf(why, sizeof(why),
                         "the label must be an empty OCTET STRING");
            else
                snprintf(why, sizeof(why),
                         "the IV must be an OCTET STRING of %d octets",
                         ok->arg);
            return refuse_params(w, list, &a->alg, why);
        }
        return 0;
    case PARAMS_GCM:
        return check_gcm(w, a, list);
    case PARAMS_OAEP:
        return check_rsa_params(w, a, list, 0);
    case PARAMS_PSS:
        return check_rsa_params(w, a, list, 1);
    case PARAMS_EC:
        if (!a->has_params || params_null(a))
            return 0;
        if (!is(&p, UNIVERSAL, 0, TAG_OID))
            return refuse_params(w, list, &a->alg,
                                 "only a named curve is accepted");
        named.der = p.in.p;
        named.len = (size_t)(p.in.end - p.in.p);
        if (oid_format(named.der, named.len, named.text, sizeof(named.text)))
            return unreadable(w, p.at, "an object identifier is malformed");
        return find(&curve_list, &named) ? 0 : refuse(w, &curve_list, &named);
    case PARAMS_WRAP:
    case PARAMS_HASH:
        if (!a->has_params || !is(&p, UNIVERSAL, 1, TAG_SEQUENCE))
            return refuse_params(w, list, &a->alg,
                                 ok->params == PARAMS_WRAP
                                     ? "they must name the key wrap"
                                     : "they must name the hash");
        inner = p;
        if (algid_parse(w, &inner, &wrap))
            return -1;
        return check_algid(
            w, &wrap, ok->params == PARAMS_WRAP ? &wrap_list : &mgf1_hash_list,
            hash);
    }
    return refuse(w, list, &a->alg);
}

static int read_check(walk *w, ber *c, const alg_list *list, const char *what)
{
    algid a;

    if (read_algid(w, c, &a, what))
        return -1;
    return check_algid(w, &a, list, NULL);
}

/* ---- the structures ---------------------------------------------------- */

#define OID_SIGNED_DATA "1.2.840.113549.1.7.2"
#define OID_ENVELOPED_DATA "1.2.840.113549.1.7.3"
#define OID_AUTH_ENVELOPED_DATA "1.2.840.113549.1.9.16.1.23"

/* The ContentInfo at the start of the input: ci, its type, and ex, the
 * [0] EXPLICIT around its content. */
static int read_content_info(walk *w, ber *top, tlv *ci, tlv *ex, oid *type)
{
    if (top->p == top->end) {
        cms_set_error(w->err, CMS_ERR_INPUT, "the body holds no CMS structure");
        return -1;
    }
    if (expect(w, top, ci, UNIVERSAL, 1, TAG_SEQUENCE, "a ContentInfo") ||
        read_oid(w, &ci->in, type, "a content type") ||
        expect(w, &ci->in, ex, CONTEXT, 1, 0, "content"))
        return -1;
    return 0;
}

/* "the CMS structure is X, not Y", as OpenSSL names X. */
static int wrong_type(walk *w, const oid *type, const char *want)
{
    int nid = oid_nid(type);

    cms_set_error(w->err, CMS_ERR_INPUT, "the CMS structure is %s, not %s",
                  nid != NID_undef ? OBJ_nid2ln(nid) : "of unknown type", want);
    return -1;
}

/* KeyTransRecipientInfo: version, rid, keyEncryptionAlgorithm, ... */
static int check_ktri(walk *w, tlv *ri)
{
    tlv t;
    int r;

    if (expect(w, &ri->in, &t, UNIVERSAL, 0, TAG_INTEGER, "a version") ||
        ber_done(w, &ri->in, &t))
        return -1;
    r = ber_skip(w, &ri->in);
    if (r <= 0)
        return r < 0 ? -1
                     : unreadable(w, ri->at,
                                  "a KeyTransRecipientInfo is incomplete");
    return read_check(w, &ri->in, &transport_list,
                      "a key encryption AlgorithmIdentifier");
}

/* KeyAgreeRecipientInfo: version, [0] originator, [1] ukm OPTIONAL,
 * keyEncryptionAlgorithm, ... The originator must be an ephemeral key
 * (originatorKey [1]): smimed does not do static-static agreement. */
static int check_kari(walk *w, tlv *ri)
{
    tlv t, orig, key;
    algid a;
    int r;

    if (expect(w, &ri->in, &t, UNIVERSAL, 0, TAG_INTEGER, "a version") ||
        ber_done(w, &ri->in, &t) ||
        expect(w, &ri->in, &orig, CONTEXT, 1, 0, "an originator"))
        return -1;
    r = ber_next(w, &orig.in, &key);
    if (r < 0)
        return -1;
    if (r == 0)
        return unreadable(w, orig.at, "the originator is empty");
    if (!is(&key, CONTEXT, 1, 1)) {
        cms_set_error(w->err, CMS_ERR_ALGORITHM,
                      "key agreement with an originator named by its "
                      "certificate (static-static) is not supported "
                      "(accepted: an ephemeral originatorKey, "
                      "id-ecPublicKey)");
        return -1;
    }
    if (read_algid(w, &key.in, &a, "an originator key AlgorithmIdentifier") ||
        check_algid(w, &a, &originator_list, NULL) ||
        ber_done(w, &orig.in, &key) || ber_done(w, &ri->in, &orig))
        return -1;
    r = peek(w, &ri->in, &t, CONTEXT, 1, 1);
    if (r < 0 || (r > 0 && ber_done(w, &ri->in, &t)))
        return -1;
    return read_check(w, &ri->in, &agreement_list,
                      "a key encryption AlgorithmIdentifier");
}

/*
 * RecipientInfos. Only key transport and key agreement are checked: with a
 * private key, OpenSSL's CMS_decrypt_set1_pkey_and_peer passes over every
 * RecipientInfo whose type the key cannot serve, and an RSA or EC key
 * serves only these two (docs/DESIGN.md). KEKRecipientInfo [2],
 * PasswordRecipientInfo [3] and OtherRecipientInfo [4] are for other
 * recipients.
 */
static int check_recipients(walk *w, tlv *set)
{
    tlv ri;
    int r;

    while ((r = ber_next(w, &set->in, &ri)) > 0) {
        if (is(&ri, UNIVERSAL, 1, TAG_SEQUENCE))
            r = check_ktri(w, &ri);
        else if (is(&ri, CONTEXT, 1, 1))
            r = check_kari(w, &ri);
        else if (ri.cls == CONTEXT && ri.cons && ri.tag >= 2 && ri.tag <= 4)
            r = 0;
        else
            return unreadable(w, ri.at, "a RecipientInfo of no known kind");
        if (r < 0 || ber_done(w, &set->in, &ri))
            return -1;
    }
    return r;
}

/* AuthEnvelopedData's mac must be as long as the ICV its GCMParameters
 * name: OpenSSL 3.0 sets whatever length it finds as the GCM tag length and
 * checks only that many octets, so a MAC cut to one octet would let a
 * changed ciphertext through once in 256 tries. t is the
 * EncryptedContentInfo; authAttrs [1] may sit between it and the mac. */
static int check_mac(walk *w, tlv *env, tlv *t)
{
    tlv m;
    size_t len;
    int r;

    if (ber_done(w, &env->in, t))
        return -1;
    r = ber_next(w, &env->in, &m);
    if (r > 0 && is(&m, CONTEXT, 1, 1)) {
        if (ber_done(w, &env->in, &m))
            return -1;
        r = ber_next(w, &env->in, &m);
    }
    if (r < 0)
        return -1;
    if (r == 0 || !is(&m, UNIVERSAL, m.cons, TAG_OCTET_STRING))
        return unreadable(w, r == 0 ? env->in.p : m.at, "a MAC expected");
    if (string_len(w, &m, &len))
        return -1;
    if (len != w->icv) {
        cms_set_error(w->err, CMS_ERR_INPUT,
                      "the MAC is %zu octets, and its GCMParameters say %lu",
                      len, w->icv);
        return -1;
    }
    return 0;
}

int cms_algs_check_enveloped(const unsigned char *der, size_t len,
                             cms_error *err)
{
    walk w = {der, err, 0};
    /* no arithmetic on NULL, not even + 0 (an empty body) */
    ber top = {der, der != NULL ? der + len : der, 0, 0};
    tlv ci, ex, env, t;
    oid type;
    int auth, r;

    if (read_content_info(&w, &top, &ci, &ex, &type))
        return -1;
    auth = strcmp(type.text, OID_AUTH_ENVELOPED_DATA) == 0;
    if (!auth && strcmp(type.text, OID_ENVELOPED_DATA) != 0)
        return wrong_type(&w, &type, "enveloped data");
    if (expect(&w, &ex.in, &env, UNIVERSAL, 1, TAG_SEQUENCE,
               auth ? "an AuthEnvelopedData" : "an EnvelopedData") ||
        expect(&w, &env.in, &t, UNIVERSAL, 0, TAG_INTEGER, "a version") ||
        ber_done(&w, &env.in, &t))
        return -1;
    /* originatorInfo [0]: certificates and CRLs, nothing OpenSSL acts on */
    r = peek(&w, &env.in, &t, CONTEXT, 1, 0);
    if (r < 0 || (r > 0 && ber_done(&w, &env.in, &t)))
        return -1;
    if (expect(&w, &env.in, &t, UNIVERSAL, 1, TAG_SET, "RecipientInfos") ||
        check_recipients(&w, &t) || ber_done(&w, &env.in, &t))
        return -1;
    /* EncryptedContentInfo: contentType, contentEncryptionAlgorithm, ... */
    if (expect(&w, &env.in, &t, UNIVERSAL, 1, TAG_SEQUENCE,
               "an EncryptedContentInfo") ||
        read_oid(&w, &t.in, &type, "a content type"))
        return -1;
    /* The rest (the content, attributes) names no algorithm. */
    if (read_check(&w, &t.in, auth ? &gcm_list : &cbc_list,
                   "a content encryption AlgorithmIdentifier"))
        return -1;
    return auth ? check_mac(&w, &env, &t) : 0;
}

/* SignerInfo: version, sid, digestAlgorithm, [0] signedAttrs OPTIONAL,
 * signatureAlgorithm, ... */
static int check_signer(walk *w, tlv *si)
{
    tlv t;
    int r;

    if (expect(w, &si->in, &t, UNIVERSAL, 0, TAG_INTEGER, "a version") ||
        ber_done(w, &si->in, &t))
        return -1;
    r = ber_skip(w, &si->in);
    if (r <= 0)
        return r < 0 ? -1 : unreadable(w, si->at, "a SignerInfo is incomplete");
    if (read_check(w, &si->in, &digest_list, "a digest AlgorithmIdentifier"))
        return -1;
    r = peek(w, &si->in, &t, CONTEXT, 1, 0);
    if (r < 0 || (r > 0 && ber_done(w, &si->in, &t)))
        return -1;
    return read_check(w, &si->in, &signature_list,
                      "a signature AlgorithmIdentifier");
}

/* OpenSSL builds every element of a SignedData's sets before verify can
 * refuse them: 40,000 copies of a certificate (28 MB) took 5.4 s and far
 * more memory than the body. So they are counted first. */
static int too_many(walk *w, int max, const char *what)
{
    cms_set_error(w->err, CMS_ERR_INPUT, "the signed data has more than %d %s",
                  max, what);
    return -1;
}

/* Refuses the constructed t past max elements; t's cursor is used up. */
static int count_max(walk *w, tlv *t, int max, const char *what)
{
    tlv e;
    int n, r;

    for (n = 0; (r = ber_next(w, &t->in, &e)) > 0; n++) {
        if (n == max)
            return too_many(w, max, what);
        if (ber_done(w, &t->in, &e))
            return -1;
    }
    return r < 0 ? -1 : 0;
}

int cms_algs_check_signed(const unsigned char *der, size_t len, cms_error *err)
{
    walk w = {der, err, 0};
    /* no arithmetic on NULL, not even + 0 (an empty body) */
    ber top = {der, der != NULL ? der + len : der, 0, 0};
    tlv ci, ex, sd, t, si;
    oid type;
    size_t n;
    int r, k;

    if (read_content_info(&w, &top, &ci, &ex, &type))
        return -1;
    if (strcmp(type.text, OID_SIGNED_DATA) != 0)
        return wrong_type(&w, &type, "signed data");
    if (expect(&w, &ex.in, &sd, UNIVERSAL, 1, TAG_SEQUENCE, "a SignedData") ||
        expect(&w, &sd.in, &t, UNIVERSAL, 0, TAG_INTEGER, "a version") ||
        ber_done(&w, &sd.in, &t) ||
        expect(&w, &sd.in, &t, UNIVERSAL, 1, TAG_SET, "DigestAlgorithms"))
        return -1;
    for (n = 0; (r = ber_next(&w, &t.in, &si)) > 0; n++) {
        algid a;

        if (n == CMS_MAX_SIGNERS)
            return too_many(&w, CMS_MAX_SIGNERS, "digest algorithms");
        if (!is(&si, UNIVERSAL, 1, TAG_SEQUENCE))
            return unreadable(&w, si.at, "an AlgorithmIdentifier expected");
        if (algid_parse(&w, &si, &a) ||
            check_algid(&w, &a, &digest_list, NULL) || ber_done(&w, &t.in, &si))
            return -1;
    }
    if (r < 0 || ber_done(&w, &sd.in, &t) ||
        expect(&w, &sd.in, &t, UNIVERSAL, 1, TAG_SEQUENCE,
               "an EncapsulatedContentInfo") ||
        ber_done(&w, &sd.in, &t))
        return -1;
    /* certificates [0] and crls [1]: OpenSSL's X.509 code parses them,
     * only counted here */
    for (k = 0; k < 2; k++) {
        r = peek(&w, &sd.in, &t, CONTEXT, 1, (unsigned long)k);
        if (r < 0 || (r > 0 && (count_max(&w, &t, CMS_MAX_CERTS,
                                          k == 0 ? "certificates" : "CRLs") ||
                                ber_done(&w, &sd.in, &t))))
            return -1;
    }
    if (expect(&w, &sd.in, &t, UNIVERSAL, 1, TAG_SET, "SignerInfos"))
        return -1;
    for (n = 0; (r = ber_next(&w, &t.in, &si)) > 0; n++) {
        if (n == CMS_MAX_SIGNERS)
            return too_many(&w, CMS_MAX_SIGNERS, "signers");
        if (!is(&si, UNIVERSAL, 1, TAG_SEQUENCE))
            return unreadable(&w, si.at, "a SignerInfo expected");
        if (check_signer(&w, &si) || ber_done(&w, &t.in, &si))
            return -1;
    }
    return r < 0 ? -1 : 0;
}
