/*
 * api: the HTTP/JSON endpoints, independent of the HTTP server library.
 * service/ feeds it requests in three steps that follow the contract's order
 * of checks (route → media type and size → content); every failure becomes
 * one api_error that is written as the JSON error body.
 */
#ifndef SMIMED_API_H
#define SMIMED_API_H

#include <stddef.h>

#include "token/token.h"

typedef struct api_error {
    int status;       /* HTTP status */
    const char *code; /* snake_case, static */
    char message[256];
    const char *allow; /* Allow header for 405, static; else NULL */
    int retry_after;   /* seconds for 503; 0 = no header */
} api_error;

/* Fills err (message made valid UTF-8) and returns -1, for
 * "return api_fail(...)". */
__attribute__((format(printf, 4, 5))) int
api_fail(api_error *err, int status, const char *code, const char *fmt, ...);

typedef enum {
    API_BODY_NONE,
    API_BODY_JSON,
    API_BODY_RAW, /* message/rfc822: the body is the message */
} api_body_kind;

typedef struct api_route api_route;

/* 404 not_found / 405 method_not_allowed, or the route. */
const api_route *api_route_find(const char *method, const char *path,
                                api_error *err);
/* 415 unless the route takes no body or the media type fits. */
int api_route_check_media(const api_route *route, const char *content_type,
                          api_body_kind *kind, api_error *err);
int api_route_has_body(const api_route *route);
/* The route's path, static: the endpoint label of its metrics. */
const char *api_route_path(const api_route *route);

#define API_MAX_HEADERS 8

typedef struct api_header {
    const char *name; /* static */
    char *value;      /* owned */
} api_header;

typedef struct api_response {
    int status;
    const char *content_type; /* static */
    unsigned char *body;      /* owned, malloc'd */
    size_t body_len;
    api_header headers[API_MAX_HEADERS];
    size_t nheaders;
    char key[128];     /* key used, for the access log; may be empty */
    const char *error; /* error code of an error response, static */
} api_response;

void api_response_clear(api_response *res);
/* Replaces whatever res holds with the JSON error body of err. */
int api_response_set_error(api_response *res, const api_error *err);

/* Looks up a query parameter of the request; NULL when absent. */
typedef const char *(*api_query_fn)(void *ctx, const char *name);
/* Calls fn for every query parameter name; stops at the first non-zero. */
typedef int (*api_query_each_fn)(void *ctx,
                                 int (*fn)(void *arg, const char *name),
                                 void *arg);

typedef struct api_request {
    const api_route *route;
    api_body_kind kind;
    const unsigned char *body;
    size_t body_len;
    api_query_fn query;
    api_query_each_fn query_each;
    void *query_ctx;
} api_request;

typedef struct api api;

/* tokens, trust and crls are borrowed and must outlive the api; trust,
 * trust_dir and crls (trust anchors and revocation lists for verification)
 * may be NULL. */
api *api_new(token_set *tokens, STACK_OF(X509) *trust, const char *trust_dir,
             STACK_OF(X509_CRL) *crls);
void api_free(api *a);
/* The token set the api serves, borrowed (for /metrics). */
token_set *api_tokens0(const api *a);

/* Always fills res (a success body or an error body); -1 on a failure that
 * left even the error body unbuilt (out of memory). */
int api_handle(api *a, const api_request *req, api_response *res);

#endif
