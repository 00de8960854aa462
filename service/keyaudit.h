/*
 * keyaudit: the key process's audit records of one worker's requests. A
 * private-key operation is recorded ("stage": "key") before its result
 * leaves; the request's end ("finish") comes with the worker's FINISH, or
 * as "error": "worker_lost" when none came within KEYAUDIT_FINISH_MS of
 * its last answer or the worker's socket closed; a 401 or 403 the worker
 * reports is a "refusal". What the worker says about the request is marked
 * "asserted_by": "worker".
 */
#ifndef SMIMED_KEYAUDIT_H
#define SMIMED_KEYAUDIT_H

#include "proto/proto.h"

#define KEYAUDIT_FINISH_MS 5000
/* Requests with key operations and no end yet, per worker. */
#define KEYAUDIT_PENDING_MAX 4096

/* The requests of one worker connection that wait for their end. */
typedef struct keyaudit keyaudit;

keyaudit *keyaudit_new(unsigned slot);
/* Ends (as lost) whatever still waits. */
void keyaudit_free(keyaudit *a);

/* An operation of request claims on key (of token) starts: -1 when the
 * worker has KEYAUDIT_PENDING_MAX requests open already. */
int keyaudit_begin(keyaudit *a, const proto_claims *claims,
                   const char *operation, const char *key, const char *token);
/* The record of the operation, written before its result is sent: 0, or
 * -1 when it could not be written (the result must not leave). */
int keyaudit_key(const proto_claims *claims, const char *operation,
                 const char *key, const char *token, const char *error,
                 double latency_ms);
/* The operation of request_id was answered: its end is due within
 * KEYAUDIT_FINISH_MS. A request whose worker went meanwhile is written as
 * lost here. */
void keyaudit_end(keyaudit *a, const char *request_id);
/* FINISH: 1 when written, 0 when no operation of the request waits for
 * its end, -1 when the record could not be written. */
int keyaudit_finish(keyaudit *a, const proto_finish_req *m);
/* AUDIT: 0, or -1 when the record could not be written. */
int keyaudit_refusal(const proto_audit_req *m);
/* Writes the requests whose end is overdue as lost (every one, those still
 * running once they end, when gone is set: the worker's socket closed);
 * returns the ms until the next is due, -1 for none. */
int keyaudit_expire(keyaudit *a, int gone);

#endif
