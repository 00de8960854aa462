/* Shared inside api/; not part of its interface. */
#ifndef SMIMED_API_INTERNAL_H
#define SMIMED_API_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <jansson.h>
#include <openssl/x509.h>

#include "api/api.h"
#include "api/query.h"
#include "cms/cms.h"
#include "rkey/rkey.h"

/* Everything is borrowed from the service's configuration. */
struct api {
    rkey_client *keys;
    STACK_OF(X509) *trust;
    const char *trust_dir;
    STACK_OF(X509_CRL) *crls;
    const api_client *clients; /* NULL: authentication off */
    size_t nclients;
};

/* ---- errors and responses (api.c) ---- */

/* The answer to a private-key operation that failed in the key process
 * (rkey_last_error): 503 token_busy / token_unavailable with Retry-After
 * (a signature that failed on the token, too), 404 unknown_key (the key
 * went between the directory and the operation), 422
 * operation_unsupported, 500 audit_failed or internal_error. A decryption
 * that failed is the caller's 422. */
int api_fail_rkey(api_error *err, const rkey_error *e);
/* The status and code of a cms/ failure. */
int api_fail_cms(api_error *err, const cms_error *cerr);

/* Sets "mime" when the bytes are UTF-8 (so clients can use them as a JSON
 * string as they are), "mime_base64" otherwise. */
int api_set_mime_field(json_t *obj, const unsigned char *data, size_t len);
/* Takes ownership of body on every path. */
int api_respond_json(api_response *res, int status, json_t *body);
/* Answers 200 with an entity. JSON mode: fields plus "mime" (or
 * "mime_base64" when the bytes are not UTF-8). Raw mode: the entity itself
 * as message/rfc822, each field of fields as an X-Smimed-* header. Takes
 * ownership of fields on every path. */
int api_respond_entity(api_response *res, api_body_kind kind,
                       const unsigned char *data, size_t len, json_t *fields);
/* api_respond_entity with the data of result, taken from result (which
 * keeps the rest) instead of copied: in raw mode it is the body, and in
 * JSON mode it is escaped in place into the body where it can be. */
int api_respond_result(api_response *res, api_body_kind kind,
                       cms_result *result, json_t *fields);

/* ---- request input (api.c) ---- */

/* What every POST endpoint starts from: the JSON object (NULL in raw mode)
 * and the MIME entity it carries. */
typedef struct api_input {
    const api_request *req;
    json_t *root;
    api_query *query; /* raw mode */
    const unsigned char *mime;
    size_t mime_len;
    int mime_in_body; /* mime points into req->body */
    unsigned char *mime_owned;
    /* The audit digest of a large entity, computed on a thread of its own
     * (api_authorize); api_input_close waits for it and copies hex into
     * digest_res->content_sha256. */
    pthread_t digest_thread;
    api_response *digest_res; /* not NULL while the thread runs */
    char digest_hex[65];
} api_input;

/* The object in body[0..len) when it is a flat one (string, true, false
 * and null values, no \u escapes) and valid; NULL for anything else,
 * which the caller then reads with jansson (flatjson.c). */
json_t *api_flat_json_read(const unsigned char *body, size_t len);
/* The same for a body the caller lets it change: when the object is
 * returned, the string value of the field named big (if it has one) is
 * decoded in place inside body and left out of the object, *big_value
 * pointing to it (NULL when there is none); when NULL is returned, body is
 * as it was. */
json_t *api_flat_json_read_inplace(unsigned char *body, size_t len,
                                   const char *big,
                                   const unsigned char **big_value,
                                   size_t *big_len);

/* Parses the request and its entity; refuses fields (JSON) or query
 * parameters (raw mode) not listed in known (NULL-terminated; "mime" and
 * "mime_base64" are implied in JSON). */
int api_input_open(api_input *in, const api_request *req,
                   const char *const *known, api_error *err);
void api_input_close(api_input *in);
/* Frees the request body once the entity in it is used for the last time
 * (after the audit digest, which api_authorize may have left running):
 * in->mime is gone afterwards if it pointed into the body. */
void api_input_drop_body(api_input *in);
/* An optional string option; *out stays NULL when absent. */
int api_input_string(api_input *in, const char *name, const char **out,
                     api_error *err);
/* An optional key name (api_input_string); 400 when it is longer than any
 * served name can be, so no record ever holds it cut short. */
int api_input_key(api_input *in, const char *name, const char **out,
                  api_error *err);
/* An optional boolean option; *out stays as it was when absent. */
int api_input_bool(api_input *in, const char *name, int *out, api_error *err);

/* An optional list of strings: a JSON array, or a comma-separated query
 * parameter in raw mode. */
typedef struct api_strings {
    char **items;
    size_t count;
} api_strings;

int api_input_strings(api_input *in, const char *name, api_strings *out,
                      api_error *err);
void api_strings_clear(api_strings *s);

/* ---- keys (keys.c) ---- */

/* The key directory, a reference the caller drops with rkey_dir_free;
 * NULL with 503 token_unavailable when the key process cannot be reached. */
rkey_dir *api_dir_get1(api *a, api_error *err);
/* 503 token_unavailable (-1) when a discovery token is down: it may hold
 * what the request asks for (missing says what), and "unknown" would send
 * the caller looking in the wrong place. 0 otherwise. */
int api_fail_if_discovery_down(const rkey_dir *d, const char *missing,
                               api_error *err);
/* 404 unknown_key (503 when a discovery token that may hold it is down). */
rkey_key *api_lookup_key(rkey_dir *d, const char *name, api_error *err);
/* 503 key_unavailable when key cannot be used for use now. Checked after
 * everything about the request itself (422 comes before 503). */
int api_check_key(const rkey_dir *d, const rkey_key *key, rkey_use use,
                  api_error *err);

/* ---- authorisation (auth.c) ---- */

/* Records the operation, the client and the entity's digest for the audit
 * trail, then 403 unless the request's client may use key for op. Called
 * after the syntax checks and before the key is looked up, so a key the
 * client may not use is 403 whether or not it exists. */
int api_authorize(const api_request *req, api_response *res, api_input *in,
                  const char *key, api_op op, api_error *err);
/* Waits for the digest api_authorize left running, if any (api_input_close
 * does). */
void api_digest_finish(api_input *in);
/* 1 when the request's client may use key for op (no error). */
int api_client_may(const api_request *req, const char *key, api_op op);
/* The calling thread's key-protocol claims for the private-key operation
 * about to run: the request's id, client and remote, and the entity's
 * digest (waited for, when api_authorize left it running). */
void api_claims_set(const api_request *req, api_response *res, api_input *in);

/* ---- encryption (crypt.c) ---- */

/* Recipients named in a request. Read in two steps so errors come in the
 * contract's order around the caller's own checks: api_recipients_read
 * parses the list, the options and every PEM (400); api_recipients_resolve
 * looks up key names (404) and checks every certificate (422). */
typedef struct api_recipients {
    const char *field;
    api_strings names;
    X509 **slots; /* per name: its certificate, once known */
    int allow_unfit;
    STACK_OF(X509) *certs; /* after resolve, in the request's order */
    cms_cipher cipher;
    cms_rsa_padding padding;
} api_recipients;

/* 0 with out->names empty when field is absent and not required. */
int api_recipients_read(api_input *in, const char *field, int required,
                        api_recipients *out, api_error *err);
int api_recipients_resolve(api *a, api_recipients *r, api_error *err);
void api_recipients_clear(api_recipients *r);
/* {"subject","issuer","serial","emails"} of each recipient. */
json_t *api_recipients_json(const api_recipients *r);

/* ---- verification (verify.c) ---- */

/* The request's "trust" and "crls" fields (400 when those do not parse);
 * verification adds the configured anchors and CRLs. */
typedef struct api_trust {
    STACK_OF(X509) *anchors;
    STACK_OF(X509_CRL) *crls;
} api_trust;

int api_trust_read(api_input *in, api_trust *t, api_error *err);
void api_trust_clear(api_trust *t);

/* Verifies an entity; *out is the verify response body. */
int api_verify_entity(api *a, const api_trust *t, const unsigned char *mime,
                      size_t len, json_t **out, api_error *err);

/* ---- handlers ---- */

int api_handle_sign(api *a, const api_request *req, api_response *res,
                    api_error *err);
int api_handle_encrypt(api *a, const api_request *req, api_response *res,
                       api_error *err);
int api_handle_decrypt(api *a, const api_request *req, api_response *res,
                       api_error *err);
int api_handle_verify(api *a, const api_request *req, api_response *res,
                      api_error *err);
int api_handle_keys(api *a, const api_request *req, api_response *res,
                    api_error *err);
int api_handle_healthz(api *a, const api_request *req, api_response *res,
                       api_error *err);
int api_handle_readyz(api *a, const api_request *req, api_response *res,
                      api_error *err);

/* ---- encodings (json.c) ---- */

char *api_base64_encode(const unsigned char *data, size_t len);

int api_utf8_valid(const unsigned char *s, size_t len);
/* Replaces every byte of s that is not part of valid UTF-8 with '?', so text
 * from a request or a certificate can go into JSON. */
void api_utf8_sanitize(char *s);
/* A JSON string of s[0..len), sanitized when it is not valid UTF-8. */
json_t *api_json_text(const char *s, size_t len);

/* {"subject","issuer","serial","not_before","not_after","emails"}, plus
 * "expires_in_days" and "pem" when full is set. */
json_t *api_cert_json(X509 *cert, int full);

#endif
