/*
 * api: the HTTP/JSON endpoints, independent of the HTTP server library.
 * service/ feeds it requests in three steps that follow the contract's order
 * of checks (route → media type and size → content); every failure becomes
 * one api_error that is written as the JSON error body.
 */
#ifndef SMIMED_API_H
#define SMIMED_API_H

#include <stddef.h>

#include "rkey/client.h"

typedef struct api_error {
    int status;       /* HTTP status */
    const char *code; /* snake_case, static */
    char message[256];
    const char *allow; /* Allow header for 405, static; else NULL */
    int authenticate;  /* 401: add WWW-Authenticate: Bearer */
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
/* The longest response header value api builds: a response's whole head
 * must fit the connection's memory (service/http.c). A list that would be
 * longer (X-Smimed-Reencoded) is cut; the JSON form carries all of it. */
#define API_HEADER_VALUE_MAX 4096

typedef struct api_header {
    const char *name; /* static */
    char *value;      /* owned */
} api_header;

/* The longest client name, in bytes: the configuration refuses longer
 * ones, so the audit trail never holds a name cut short. */
#define API_CLIENT_NAME_MAX 63

typedef struct api_response {
    int status;
    const char *content_type; /* static */
    unsigned char *body;      /* owned, malloc'd */
    size_t body_len;
    api_header headers[API_MAX_HEADERS];
    size_t nheaders;
    char key[PROTO_NAME_MAX + 1]; /* key used; may be empty */
    const char *error;            /* error code of an error response, static */
    /* for the audit trail: operation is set (static: "sign", "decrypt")
     * once a private-key request passed its syntax checks; key_op once the
     * key is about to be used, when the record must be written before the
     * answer goes out */
    const char *operation;
    int key_op;
    char client[API_CLIENT_NAME_MAX + 1]; /* authenticated; "" when none */
    char content_sha256[65]; /* hex digest of the submitted entity */
} api_response;

void api_response_clear(api_response *res);
/* Replaces whatever res holds with the JSON error body of err. */
int api_response_set_error(api_response *res, const api_error *err);

/* What TLS says about the peer. subject is RFC 4514; sans are the
 * rfc822Name, dNSName and URI entries. */
typedef struct api_peer {
    int verified; /* presented a certificate that verified against the CA */
    const char *subject;
    const char *const *sans;
    size_t nsans;
} api_peer;

typedef struct api_client api_client;

/* A request body, malloc'd, handed to api_handle with its request: the api
 * decodes the entity's JSON string in place inside it and frees it as soon
 * as nothing points into it, before a large response is built (a body
 * and a response of a large entity at once would be one copy more of
 * it), at the latest when api_handle returns. */
typedef struct api_body {
    unsigned char *data;
    size_t len;
} api_body;

typedef struct api_request {
    /* what the key process records of the request (proto_claims): its id
     * and the peer's address */
    const char *request_id;
    const char *remote;
    const char *authorization; /* the Authorization header; may be NULL */
    size_t authorization_len;  /* its length, a NUL inside it counted */
    const api_peer *peer;      /* NULL without a client certificate */
    const api_client *client;  /* set by api_handle once authenticated */
    const api_route *route;
    api_body_kind kind;
    api_body *body; /* NULL without a body */
    /* raw mode's options: the request target's bytes after '?', not
     * unescaped (api/query.h reads them); NULL when it has no '?' */
    const char *query;
    size_t query_len;
} api_request;

typedef struct api api;

/* keys (the key process: its directory, its private-key operations,
 * its token states), trust and crls are borrowed and must outlive the
 * api; trust, trust_dir and crls (trust anchors and revocation lists for
 * verification) may be NULL. The calling threads' key-protocol claims are
 * set for each private-key operation (rkey_claims_set) and left set: the
 * caller reads rkey_claims_ops to know whether the request ends with
 * rkey_finish. */
api *api_new(rkey_client *keys, STACK_OF(X509) *trust, const char *trust_dir,
             STACK_OF(X509_CRL) *crls);
void api_free(api *a);

/* Private-key operations a client may be allowed, as bits. */
typedef enum {
    API_OP_SIGN = 1,
    API_OP_DECRYPT = 2,
} api_op;

#define API_TOKEN_SHA256_LEN 32

/* One API client, from the configuration (borrowed by the api). It is
 * recognised by the SHA-256 of its bearer token or by its TLS client
 * certificate (subject or subjectAltName); keys lists the key names it may
 * use ("*": every key) for the operations in ops. */
struct api_client {
    const char *name;
    int has_token;
    unsigned char token_sha256[API_TOKEN_SHA256_LEN];
    const char *cert_subject; /* NULL when not used */
    const char *cert_san;     /* NULL when not used */
    const char *const *keys;
    size_t nkeys;
    unsigned ops; /* api_op bits */
};

/* Turns client authentication on (nclients > 0) or off; clients is
 * borrowed. Without it every request is served anonymously. */
void api_set_clients(api *a, const api_client *clients, size_t nclients);
/* 1 for paths served without authentication (probes). */
int api_path_is_open(const char *path);
/* 401 (with authenticate set) unless the request carries valid
 * credentials; *client is NULL when authentication is off. */
int api_authenticate(const api *a, const api_request *req,
                     const api_client **client, api_error *err);
/* The hex SHA-256 of a bearer token, as the configuration holds it. */
int api_hash_token(const char *token, size_t len,
                   unsigned char out[API_TOKEN_SHA256_LEN]);

/* Always fills res (a success body or an error body); -1 on a failure that
 * left even the error body unbuilt (out of memory). Takes req->body's data
 * over on every path: frees it and sets it NULL. */
int api_handle(api *a, const api_request *req, api_response *res);

#endif
