/*
 * audit: the append-only trail of key use, one JSON object per line: every
 * private-key operation and every refused request. Never content, PINs or
 * tokens. A record that cannot be written is an error the caller must act
 * on: no signature leaves the daemon unaudited.
 */
#ifndef SMIMED_AUDIT_H
#define SMIMED_AUDIT_H

typedef struct audit_record {
    const char *request_id;
    const char *client;         /* NULL or "": none authenticated */
    const char *remote;         /* peer address */
    const char *operation;      /* "sign", "decrypt", or the refused path */
    const char *key;            /* NULL or "": none */
    const char *content_sha256; /* hex; NULL or "": content not read */
    int result;                 /* HTTP status; 0: none yet (null) */
    const char *error;          /* error code; NULL on success */
    double latency_ms;
    /* Records of the key process only (each key written when set): which
     * record of a request this is, "key" (a private-key operation, written
     * before its result leaves), "finish" (the request's final status) or
     * "refusal" (a 401 or 403); the token of a key operation; and whether
     * the request's identity (request_id, client, remote, content_sha256,
     * and a finish's result, error and latency) is only what the worker
     * said: "asserted_by": "worker". */
    const char *stage;
    const char *token;
    int asserted;
} audit_record;

/* NULL path: no audit trail. -1 (errno set) when the file cannot be
 * opened; the trail in use, if any, stays. */
int audit_open(const char *path);
/* A reload's trail, in three steps so that a configuration refused after
 * its audit log was opened leaves the running trail as it was:
 * audit_stage opens path (NULL: no trail) and keeps it aside, -1 (errno
 * set, nothing staged) when it cannot; audit_swap makes the staged trail
 * the one in use and stages the one it replaced (a second swap goes back);
 * audit_discard closes whatever is staged. The trail in use is never
 * closed by the first two. */
int audit_stage(const char *path);
void audit_swap(void);
void audit_discard(void);
/* Reopens the same path after rotation (SIGUSR1); -1 keeps the old file. */
int audit_reopen(void);
void audit_close(void);
/* 0 when written (or no trail is configured), -1 when the write failed. */
int audit_write(const audit_record *r);

#endif
