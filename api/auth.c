/*
 * Who is calling, and what it may do. The configuration holds only the
 * SHA-256 of each bearer token: a leaked config file does not let anyone
 * call the service. Tokens are compared digest against digest in constant
 * time and against every client, so neither timing nor the position of a
 * match tells an attacker anything. Permissions are default deny: a client
 * uses only the keys and operations its entry names.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "api/internal.h"

/* From this size of entity on, the audit digest has a thread of its own
 * (api_authorize): starting one costs tens of microseconds, the digest of
 * 256 KiB about a quarter of a millisecond. */
#define API_DIGEST_THREAD_MIN (256u << 10)

void api_set_clients(api *a, const api_client *clients, size_t nclients)
{
    a->clients = nclients > 0 ? clients : NULL;
    a->nclients = nclients;
}

int api_path_is_open(const char *path)
{
    return strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0;
}

int api_hash_token(const char *token, size_t len,
                   unsigned char out[API_TOKEN_SHA256_LEN])
{
    unsigned int n = 0;

    if (!EVP_Digest(token, len, out, &n, EVP_sha256(), NULL) ||
        n != API_TOKEN_SHA256_LEN)
        return -1;
    return 0;
}

/* The token of "Bearer TOKEN" (RFC 6750: the scheme is case-insensitive)
 * in authorization[0..len), or NULL. */
static const char *bearer_token(const char *authorization, size_t len,
                                size_t *tlen)
{
    const char *t, *end;

    if (authorization == NULL || len < 7 ||
        strncasecmp(authorization, "Bearer ", 7) != 0)
        return NULL;
    end = authorization + len;
    for (t = authorization + 7; t < end && *t == ' '; t++)
        ;
    *tlen = (size_t)(end - t);
    while (*tlen > 0 && (t[*tlen - 1] == ' ' || t[*tlen - 1] == '\t'))
        (*tlen)--;
    return *tlen > 0 ? t : NULL;
}

static const api_client *client_by_token(const api *a, const char *token,
                                         size_t len)
{
    unsigned char d[API_TOKEN_SHA256_LEN];
    const api_client *found = NULL;
    size_t i;

    if (api_hash_token(token, len, d) != 0)
        return NULL;
    /* no early exit: every client is compared */
    for (i = 0; i < a->nclients; i++) {
        if (a->clients[i].has_token &&
            CRYPTO_memcmp(d, a->clients[i].token_sha256, sizeof(d)) == 0)
            found = &a->clients[i];
    }
    OPENSSL_cleanse(d, sizeof(d));
    return found;
}

static const api_client *client_by_cert(const api *a, const api_peer *peer)
{
    size_t i, j;

    for (i = 0; i < a->nclients; i++) {
        const api_client *c = &a->clients[i];

        if (c->cert_subject != NULL && peer->subject != NULL &&
            strcmp(c->cert_subject, peer->subject) == 0)
            return c;
        for (j = 0; c->cert_san != NULL && j < peer->nsans; j++)
            if (strcmp(c->cert_san, peer->sans[j]) == 0)
                return c;
    }
    return NULL;
}

static int unauthorized(api_error *err, const char *why)
{
    api_fail(err, 401, "unauthorized", "%s", why);
    err->authenticate = 1;
    return -1;
}

int api_authenticate(const api *a, const api_request *req,
                     const api_client **client, api_error *err)
{
    const char *token;
    size_t len = 0;

    *client = NULL;
    if (a->clients == NULL)
        return 0;
    if (req->peer != NULL) {
        /* a certificate that does not verify is refused outright, token or
         * not: it is either a mistake or an attack */
        if (!req->peer->verified)
            return unauthorized(err, "the client certificate did not verify "
                                     "against the configured CA");
        *client = client_by_cert(a, req->peer);
        if (*client != NULL)
            return 0;
    }
    token = bearer_token(req->authorization, req->authorization_len, &len);
    if (token == NULL)
        return unauthorized(err, req->peer != NULL
                                     ? "the client certificate names no "
                                       "configured client and no bearer "
                                       "token was given"
                                     : "authentication required: "
                                       "Authorization: Bearer TOKEN");
    /* a token cut at a NUL would be checked without what follows it */
    if (memchr(token, '\0', len) != NULL)
        return unauthorized(err, "the bearer token contains NUL");
    *client = client_by_token(a, token, len);
    if (*client == NULL)
        return unauthorized(err, "the bearer token is not valid");
    return 0;
}

int api_client_may(const api_request *req, const char *key, api_op op)
{
    const api_client *c = req->client;
    size_t i;

    /* authentication off: every request is served as before */
    if (c == NULL)
        return 1;
    if ((c->ops & (unsigned)op) == 0)
        return 0;
    for (i = 0; i < c->nkeys; i++)
        if (strcmp(c->keys[i], "*") == 0 || strcmp(c->keys[i], key) == 0)
            return 1;
    return 0;
}

static void hex(const unsigned char *d, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;

    for (i = 0; i < n; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The hex SHA-256 of data[0..len) into out[65]; "" when OpenSSL fails. */
static void digest_hex(const unsigned char *data, size_t len, char *out)
{
    unsigned char d[32];
    unsigned int n = 0;

    out[0] = '\0';
    if (EVP_Digest(data, len, d, &n, EVP_sha256(), NULL) && n == sizeof(d))
        hex(d, sizeof(d), out);
}

static void *digest_thread(void *arg)
{
    api_input *in = arg;

    digest_hex(in->mime, in->mime_len, in->digest_hex);
    return NULL;
}

void api_digest_finish(api_input *in)
{
    if (in->digest_res == NULL)
        return;
    pthread_join(in->digest_thread, NULL);
    memcpy(in->digest_res->content_sha256, in->digest_hex,
           sizeof(in->digest_hex));
    in->digest_res = NULL;
}

void api_claims_set(const api_request *req, api_response *res, api_input *in)
{
    proto_claims c;

    memset(&c, 0, sizeof(c));
    api_digest_finish(in);
    snprintf(c.request_id, sizeof(c.request_id), "%s",
             req->request_id != NULL ? req->request_id : "");
    snprintf(c.client, sizeof(c.client), "%s", res->client);
    snprintf(c.remote, sizeof(c.remote), "%s",
             req->remote != NULL ? req->remote : "");
    snprintf(c.content_sha256, sizeof(c.content_sha256), "%s",
             res->content_sha256);
    rkey_claims_set(&c);
}

int api_authorize(const api_request *req, api_response *res, api_input *in,
                  const char *key, api_op op, api_error *err)
{
    res->operation = op == API_OP_SIGN ? "sign" : "decrypt";
    snprintf(res->key, sizeof(res->key), "%s", key);
    if (req->client != NULL)
        snprintf(res->client, sizeof(res->client), "%s", req->client->name);
    /* The bytes as received, before any canonicalisation. The operation
     * digests them again in another form (the canonical entity, the CMS
     * input): on a large entity the two passes are most of the work, so
     * this one runs on another core meanwhile (10 MiB: 10 ms less of 30),
     * and the entity stays unchanged until api_input_close waits for it.
     * Small ones are not worth a thread. */
    if (res->content_sha256[0] == '\0' && in->digest_res == NULL) {
        if (in->mime_len >= API_DIGEST_THREAD_MIN &&
            pthread_create(&in->digest_thread, NULL, digest_thread, in) == 0)
            in->digest_res = res;
        else
            digest_hex(in->mime, in->mime_len, res->content_sha256);
    }
    if (api_client_may(req, key, op))
        return 0;
    return api_fail(err, 403, "forbidden",
                    "client \"%s\" may not %s with key \"%s\"",
                    req->client->name, res->operation, key);
}
