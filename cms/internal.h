/*
 * Private to cms/: what mime.c (entity in, S/MIME entity out) and sign.c
 * (the CMS structure and the public API) share.
 */
#ifndef SMIMED_CMS_INTERNAL_H
#define SMIMED_CMS_INTERNAL_H

#include <stddef.h>

#include "cms/cms.h"

typedef struct cms_buf {
    unsigned char *data;
    size_t len;
    size_t cap;
} cms_buf;

/* -1 when out of memory; buf is left as it was. */
int cms_buf_add(cms_buf *buf, const void *data, size_t len);
void cms_buf_release(cms_buf *buf);

/* An entity split into what stays outside the signature and what is
 * signed. */
typedef struct cms_entity {
    cms_buf outer;    /* top-level mail headers, CRLF line ends */
    cms_buf content;  /* the signed entity: CRLF line ends, 7-bit safe */
    char **reencoded; /* "PART-NUMBER ENCODING", malloc'd */
    size_t n_reencoded;
} cms_entity;

int cms_entity_parse(const unsigned char *mime, size_t len, cms_entity *ent,
                     cms_error *err);
void cms_entity_release(cms_entity *ent);

/* Writes the outer headers and the S/MIME entity around der: the detached
 * signature (CMS_MODE_DETACHED) or the whole SignedData (CMS_MODE_OPAQUE). */
int cms_entity_wrap(const cms_entity *ent, cms_mode mode, cms_digest digest,
                    const unsigned char *der, size_t der_len, cms_buf *out,
                    cms_error *err);

__attribute__((format(printf, 3, 4))) void
cms_set_error(cms_error *err, cms_status status, const char *fmt, ...);
/* Adds OpenSSL's queued errors to the message: the last one, and the first
 * (usually the cause) when it differs. */
void cms_set_ssl_error(cms_error *err, cms_status status, const char *what);

#endif
