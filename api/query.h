/*
 * query: the query string of a raw-mode request, read strictly. The text
 * is the request target's raw bytes after '?', before any unescaping:
 * name=value pairs joined by '&', '%XX' escapes, '+' for a space (as
 * HTML forms and urllib's urlencode write it; a '+' itself travels as
 * %2B). Refused, as the request's syntax: an empty or repeated name, an
 * empty pair ("a=1&&b=2", a trailing '&'), a bad escape, a byte RFC 3986
 * does not allow in a query unescaped, a NUL anywhere once decoded, and
 * more text or pairs than any request needs.
 */
#ifndef SMIMED_API_QUERY_H
#define SMIMED_API_QUERY_H

#include <stddef.h>

#include "api/api.h"

#define API_QUERY_MAX_BYTES 8192
#define API_QUERY_MAX_PARAMS 64

typedef struct api_query api_query;

/* 400 invalid_field for anything the rules above refuse, 500 without
 * memory; *out on success (no parameters for len 0). */
int api_query_parse(const char *text, size_t len, api_query **out,
                    api_error *err);
void api_query_free(api_query *q);
size_t api_query_count(const api_query *q);
/* Decoded, NUL-terminated, in the order given; neither contains NUL. */
const char *api_query_name_at(const api_query *q, size_t i);
const char *api_query_value_at(const api_query *q, size_t i);
/* The value of name, NULL when absent (or q is NULL); "" for "name" and
 * "name=". */
const char *api_query_get(const api_query *q, const char *name);

#endif
