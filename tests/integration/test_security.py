#!/usr/bin/env python3
"""Key custody security: bearer tokens and client certificates, per-key and
per-operation rights, the audit trail, PIN handling, connection limits, the
loopback rule, --hash-token, module loading and the systemd unit."""

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("security")
DEMO = F.ensure_demo()
WORK = F.workdir("security")
# a private copy of the demo token: its own audit log and tokens
SEC = F.copy_token_dir(DEMO, WORK / "demo")
for stale in ("audit.log",):
    if (SEC / stale).exists():
        (SEC / stale).unlink()
AUDIT = SEC / "audit.log"
TOKEN = (SEC / "api-token").read_text().splitlines()[0]
LIMITED = (SEC / "api-token-limited").read_text().splitlines()[0]
PIN = F.read_pin(SEC)
CA = SEC / "ca.pem"
D = None

RECORD_FIELDS = ["time", "request_id", "client", "remote", "operation", "key",
                 "content_sha256", "result", "error", "latency_ms"]
# The key process writes them: a key operation's record ("key", before its
# result goes back) and its answer's ("finish"), each with the token; a
# refusal's ("refusal"). What the worker said is marked as such.
STAGE_FIELDS = {"key": RECORD_FIELDS + ["stage", "token", "asserted_by"],
                "finish": RECORD_FIELDS + ["stage", "token", "asserted_by"],
                "refusal": RECORD_FIELDS + ["stage", "asserted_by"]}
TIME_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def msg(text="Hello"):
    return "Content-Type: text/plain\r\n\r\n%s\r\n" % text


def bearer(tok):
    return {"Authorization": "Bearer " + tok}


def audit_records(path=AUDIT):
    if not Path(path).exists():
        return []
    recs = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        try:
            recs.append(json.loads(line))
        except ValueError as e:
            raise AssertionError("audit line %d is not JSON (%s): %r" % (n + 1, e, line[:200]))
    return recs


def record_of(r, path=AUDIT):
    """The one audit record of response r's answer (by X-Request-Id): its
    finish or refusal; a finish follows the record of its key operation."""
    rid = r.header("X-Request-Id")
    check(rid, "no X-Request-Id on the response")
    found = [x for x in audit_records(path) if x.get("request_id") == rid]
    answers = [x for x in found if x.get("stage") in ("finish", "refusal")]
    eq(len(answers), 1, "audit records of the answer to request %s" % rid)
    if answers[0]["stage"] == "finish":
        eq([x.get("stage") for x in found], ["key", "finish"],
           "audit records of request %s" % rid)
    else:
        eq(len(found), 1, "audit records of request %s" % rid)
    return answers[0]


def no_record(r, path=AUDIT):
    rid = r.header("X-Request-Id")
    check(rid, "no X-Request-Id on the response")
    check(not [x for x in audit_records(path) if x.get("request_id") == rid],
          "request %s has an audit record" % rid)


def start():
    global D
    # one worker: the per-IP limit is each worker's own until the counters
    # are shared across workers (per_ip_default counts on this daemon)
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["workers"] = 1
    conf = SEC / "security.conf"
    conf.write_text(json.dumps(cfg))
    D = S.daemon(conf, "security-daemon", env=F.softhsm_env(SEC))
    eq(D.bearer, TOKEN, "the fixture's default token")


def encrypted_for(key, text="secret"):
    r = D.post_json("/v1/encrypt", {"recipients": [key], "mime": msg(text)})
    eq(r.status, 200, "encrypt status")
    return r.json()["mime"]


# ------------------------------------------------------------ authentication

def refused_401(r):
    expect_error(r, 401, "unauthorized")
    check((r.header("WWW-Authenticate") or "").startswith("Bearer"),
          "WWW-Authenticate: %r" % r.header("WWW-Authenticate"))


def missing_token():
    before = [x for x in audit_records() if x["result"] == 200]
    sign = {"key": "demo-rsa", "mime": msg()}
    for r in (D.post_json("/v1/sign", sign, auth=False),
              D.post_json("/v1/decrypt", {"mime": "x"}, auth=False),
              D.post_json("/v1/encrypt", {"recipients": ["demo-ec"], "mime": msg()}, auth=False),
              D.post_json("/v1/verify", {"mime": "x"}, auth=False),
              D.request("GET", "/v1/keys", auth=False)):
        refused_401(r)
        rec = record_of(r)
        eq(rec["result"], 401, "audit result")
        eq(rec["client"], None, "audit client")
        eq(rec["content_sha256"], None, "digest of content never read")
    after = [x for x in audit_records() if x["result"] == 200]
    eq(len(after), len(before), "successful key operations during refused requests")


def wrong_token():
    for h in (bearer("not-the-token-" + "x" * 40), bearer(TOKEN + "x"), bearer(TOKEN[:-1]),
              {"Authorization": "Basic " + base64.b64encode(b"demo:" + TOKEN.encode()).decode()},
              {"Authorization": "Bearer"}, {"Authorization": TOKEN}):
        r = D.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, headers=h)
        refused_401(r)
        rec = record_of(r)
        eq((rec["result"], rec["key"]), (401, None), "audit of a wrong token")


def scheme_case_insensitive():
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()},
                    headers={"Authorization": "bearer  " + TOKEN})
    eq(r.status, 200, "lower-case scheme, two spaces")


def raw_sign_with(auth_lines):
    """A JSON sign request written by hand, with the Authorization lines as
    given (bytes); the response as a fixture Response, or None."""
    body = json.dumps({"key": "demo-ec", "mime": msg("NUL")}).encode()
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    try:
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth_lines +
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    headers = [(k.strip().decode(), v.strip().decode()) for k, _, v in
               (line.partition(b":") for line in lines[1:])]
    return F.Response(int(lines[0].split()[1]), "", headers, rest)


def nul_in_token():
    """A NUL cuts a header value in libmicrohttpd: what follows it must not
    be ignored, a token with a NUL is no token."""
    tok = TOKEN.encode()
    for line, what in ((b"Authorization: Bearer " + tok + b"\x00junk\r\n", "NUL then more"),
                       (b"Authorization: Bearer " + tok + b"\x00\r\n", "a NUL at the end"),
                       (b"Authorization: Bearer " + tok[:8] + b"\x00" + tok[8:] + b"\r\n",
                        "a NUL inside")):
        r = raw_sign_with(line)
        check(r is not None, "%s: no answer" % what)
        try:
            refused_401(r)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (what, e))
        eq(record_of(r)["result"], 401, "%s: audit result" % what)
    # two Authorization headers: whichever one would be read, refused
    for lines in (b"Authorization: Bearer " + tok + b"\r\nAuthorization: Bearer x\r\n",
                  b"Authorization: Bearer x\r\nAuthorization: Bearer " + tok + b"\r\n"):
        r = raw_sign_with(lines)
        check(r is not None and r.status in (400, 401), "two Authorization headers: %r" % r)
        expect_error(r, r.status, "invalid_header" if r.status == 400 else "unauthorized")
    r = raw_sign_with(b"Authorization: Bearer " + tok + b"\r\n")
    eq(r.status, 200, "the same request with the token alone")


def order_401_first():
    """401 comes before 404, 405, 413 and 415."""
    refused_401(D.request("GET", "/no/such/path", auth=False))
    refused_401(D.request("GET", "/v1/sign", auth=False))
    refused_401(D.request("POST", "/v1/sign", body=b"x", headers={"Content-Type": "text/plain"}, auth=False))
    refused_401(D.request("POST", "/v1/sign", body=b"x",
                          headers={"Content-Type": "application/json",
                                   "Content-Length": str(1 << 40)}, auth=False))
    expect_error(D.request("GET", "/no/such/path"), 404, "not_found")
    expect_error(D.request("GET", "/v1/sign"), 405, "method_not_allowed")


def probes_open():
    r = D.request("GET", "/healthz", auth=False)
    eq(r.status, 200, "/healthz without a token")
    r = D.request("GET", "/readyz", auth=False)
    eq(r.status, 200, "/readyz without a token")
    eq(sorted(r.json().keys()), ["status", "tokens"], "/readyz fields")
    for t in r.json()["tokens"]:
        check(set(t) <= {"name", "state", "optional", "reason", "since"}, "/readyz token fields: %r" % t)


def limited_client():
    lim = bearer(LIMITED)
    n200 = len([x for x in audit_records() if x["result"] == 200])
    r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}, headers=lim)
    expect_error(r, 403, "forbidden")
    rec = record_of(r)
    eq((rec["client"], rec["key"], rec["operation"], rec["result"]),
       ("demo-limited", "demo-rsa", "sign", 403), "audit of the refusal")
    # a key it may not use is 403 whether or not it exists
    expect_error(D.post_json("/v1/sign", {"key": "no-such-key", "mime": msg()}, headers=lim), 403, "forbidden")
    expect_error(D.post_json("/v1/sign", {"key": "no-such-key", "mime": msg()}), 404, "unknown_key")
    # syntax (400) comes before rights (403)
    expect_error(D.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg(), "digets": "x"}, headers=lim),
                 400, "invalid_field")
    # decryption is not among its operations, with a forced key or without
    env = encrypted_for("demo-ec")
    expect_error(D.post_json("/v1/decrypt", {"mime": env}, headers=lim), 403, "forbidden")
    expect_error(D.post_json("/v1/decrypt", {"mime": env, "key": "demo-ec"}, headers=lim), 403, "forbidden")
    eq(len([x for x in audit_records() if x["result"] == 200]), n200,
       "key operations performed for refused requests")
    # what it may do
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, headers=lim)
    eq(r.status, 200, "limited client signs with demo-ec")
    F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
    eq(record_of(r)["client"], "demo-limited", "audit client")
    r = D.post_json("/v1/encrypt", {"recipients": ["demo-rsa"], "mime": msg()}, headers=lim)
    eq(r.status, 200, "encrypt needs a client, no key right")
    no_record(r)
    signed = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}).json()["mime"]
    r = D.post_json("/v1/verify", {"mime": signed}, headers=lim)
    eq((r.status, r.json().get("valid")), (200, True), "verify needs a client, no key right")
    eq(D.request("GET", "/v1/keys", headers=lim).status, 200, "keys with the limited token")
    # raw mode: the same rights
    r = D.request("POST", "/v1/sign?key=demo-rsa", body=msg().encode(),
                  headers=dict(lim, **{"Content-Type": "message/rfc822"}))
    expect_error(r, 403, "forbidden")


def decrypt_choice_respects_rights():
    """Without a forced key, decrypt picks only among keys the client may
    use; an envelope for keys it may not use is 403."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["clients"].append({"name": "ec-decrypt", "token_sha256": hashlib.sha256(b"ec-decrypt-token-0123456789").hexdigest(),
                           "keys": ["demo-ec"], "operations": ["decrypt"]})
    conf = SEC / "rights.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "rights-daemon", env=F.softhsm_env(SEC))
    h = bearer("ec-decrypt-token-0123456789")
    both = d.post_json("/v1/encrypt", {"recipients": ["demo-rsa", "demo-ec"], "mime": msg("both")}).json()["mime"]
    r = d.post_json("/v1/decrypt", {"mime": both}, headers=h)
    eq((r.status, r.json().get("key")), (200, "demo-ec"), "decrypt with the allowed recipient key")
    rsa_only = d.post_json("/v1/encrypt", {"recipients": ["demo-rsa"], "mime": msg("rsa")}).json()["mime"]
    r = d.post_json("/v1/decrypt", {"mime": rsa_only}, headers=h)
    expect_error(r, 403, "forbidden")
    expect_error(d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, headers=h), 403, "forbidden")
    check(d.stop() == 0, "rights daemon exit")


# ------------------------------------------------------------ audit trail

def audit_mixed_run():
    start_n = len(audit_records())
    expected = []  # (response, client, operation, key, sha256 of the bytes sent)

    def note(r, client, op, key, sent):
        expected.append((r, client, op, key, hashlib.sha256(sent).hexdigest() if sent is not None else None))

    m1 = msg("audit one")
    r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": m1})
    eq(r.status, 200, "sign rsa")
    note(r, "demo", "sign", "demo-rsa", m1.encode())
    m2 = b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\xfe binary\r\n"
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime_base64": base64.b64encode(m2).decode(), "mode": "opaque"})
    eq(r.status, 200, "sign ec base64")
    note(r, "demo", "sign", "demo-ec", m2)
    m3 = "Content-Type: text/plain\n\nLF only, not canonical\n".encode()
    r = D.request("POST", "/v1/sign?key=demo-ec", body=m3, headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "sign raw")
    note(r, "demo", "sign", "demo-ec", m3)
    # large entities have their digest taken on a thread of its own
    # (api_authorize): granted, refused, and refused after the digest began
    m4 = b"Content-Type: text/plain\n\n" + b"large, LF only, over 256 KiB\n" * 12000
    r = D.request("POST", "/v1/sign?key=demo-ec", body=m4, headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "sign raw, large")
    note(r, "demo", "sign", "demo-ec", m4)
    m5 = msg("large and refused " * 20000)
    r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": m5}, headers=bearer(LIMITED))
    eq(r.status, 403, "refused, large")
    note(r, "demo-limited", "sign", "demo-rsa", m5.encode())
    env = encrypted_for("demo-rsa", "audit decrypt")
    r = D.post_json("/v1/decrypt", {"mime": env})
    eq(r.status, 200, "decrypt")
    note(r, "demo", "decrypt", "demo-rsa", env.encode())
    env2 = encrypted_for("demo-ec", "audit forced")
    r = D.post_json("/v1/decrypt", {"mime": env2, "key": "demo-ec"})
    eq(r.status, 200, "decrypt forced")
    note(r, "demo", "decrypt", "demo-ec", env2.encode())
    r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}, headers=bearer(LIMITED))
    eq(r.status, 403, "refused")
    note(r, "demo-limited", "sign", "demo-rsa", msg().encode())
    r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}, auth=False)
    eq(r.status, 401, "unauthenticated")
    note(r, None, "/v1/sign", None, None)
    # no record: no key used, nothing refused
    quiet = [D.post_json("/v1/encrypt", {"recipients": ["demo-ec"], "mime": msg()}),
             D.post_json("/v1/sign", {"key": "no-such", "mime": msg()}),
             D.post_json("/v1/sign", {"key": "demo-rsa"}),
             D.request("GET", "/v1/keys")]
    recs = audit_records()[start_n:]
    eq(len(recs), sum(2 if r.status == 200 else 1 for r, *_ in expected),
       "audit records written (two per key operation, one per refusal)")
    for rec in recs:
        eq(list(rec.keys()), STAGE_FIELDS.get(rec.get("stage"), RECORD_FIELDS),
           "fields of a %s record" % rec.get("stage"))
        eq(rec["asserted_by"], "worker", "asserted_by")
    for r, client, op, key, digest in expected:
        rec = record_of(r)
        eq(rec["stage"], "finish" if r.status == 200 else "refusal", "stage")
        if r.status == 200:
            eq(rec["token"], "demo", "token")
        check(TIME_MS.match(rec["time"]), "time %r" % rec["time"])
        t = time.mktime(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        check(abs(t - time.time()) < 600, "time %s is not now (UTC)" % rec["time"])
        eq(rec["client"], client, "client")
        eq(rec["remote"], "127.0.0.1", "remote")
        eq(rec["operation"], op, "operation")
        eq(rec["key"], key, "key")
        eq(rec["content_sha256"], digest, "content digest (bytes as received)")
        eq(rec["result"], r.status, "result")
        eq(rec["error"], None if r.status == 200 else r.error_code(), "error code")
        check(isinstance(rec["latency_ms"], (int, float)) and 0 <= rec["latency_ms"] < 60000,
              "latency %r" % rec["latency_ms"])
    for r in quiet:
        no_record(r)


def no_secrets_in_logs():
    secrets = {"PIN": PIN, "token": TOKEN, "limited token": LIMITED}
    logs = [AUDIT] + [d.log_path for d in S.daemons]
    check(AUDIT.exists() and AUDIT.stat().st_size > 0, "the audit log is empty")
    for path in logs:
        text = Path(path).read_bytes()
        for what, s in secrets.items():
            check(s.encode() not in text, "the %s appears in %s" % (what, path))
    eq(AUDIT.stat().st_mode & 0o077, 0, "audit log mode is private")


def audit_write_failure():
    """An audit trail that cannot be written (/dev/full: ENOSPC on every
    write) fails every key operation; the daemon keeps serving."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["audit_log"] = "/dev/full"
    conf = SEC / "full.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "audit-full-daemon", env=F.softhsm_env(SEC))
    r = d.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()})
    expect_error(r, 500, "audit_failed")
    check(b"pkcs7" not in r.body.lower() and b"BEGIN" not in r.body, "a signature leaked: %r" % r.body[:200])
    r = d.request("POST", "/v1/sign?key=demo-ec", body=msg().encode(), headers={"Content-Type": "message/rfc822"})
    expect_error(r, 500, "audit_failed")
    env = encrypted_for("demo-ec")
    expect_error(d.post_json("/v1/decrypt", {"mime": env}), 500, "audit_failed")
    eq(d.post_json("/v1/encrypt", {"recipients": ["demo-ec"], "mime": msg()}).status, 200,
       "encrypt (no key operation) still served")
    eq(d.request("GET", "/healthz").status, 200, "still serving")
    check("cannot write the audit record" in d.stderr_text(), "the failure is not logged")
    F.check_exit(d, d.stop())


def audit_unopenable():
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["audit_log"] = str(WORK / "no-such-dir" / "audit.log")
    conf = SEC / "noaudit.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "audit-unopenable-daemon", env=F.softhsm_env(SEC), start=False)
    try:
        d.start(timeout=30)
        raise AssertionError("started without its audit log")
    except AssertionError as e:
        check("exited with" in str(e), str(e)[:200])
    check("cannot open the audit log" in d.stderr_text(), "no clear message: %s" % d.tail(5))


def audit_reopen():
    rotated = SEC / "audit.log.1"
    if rotated.exists():
        rotated.unlink()
    AUDIT.rename(rotated)
    D.send_signal(signal.SIGUSR1)
    deadline = time.time() + 30
    while not AUDIT.exists():
        check(time.time() < deadline, "SIGUSR1 did not reopen the audit log")
        # records keep going to the renamed file until the signal is handled
        D.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("rotation")})
        time.sleep(0.05)
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("after rotation")})
    eq(r.status, 200, "sign after rotation")
    record_of(r, AUDIT)
    rid = r.header("X-Request-Id")
    check(not [x for x in audit_records(rotated) if x["request_id"] == rid], "record in the rotated file")
    check(len(audit_records(rotated)) > 0, "the rotated file lost its records")


def reload_and_wait(d):
    done = d.stderr_text().count("in service")
    d.send_signal(signal.SIGHUP)
    deadline = time.time() + 30
    while d.stderr_text().count("in service") == done:
        check(time.time() < deadline, "reload not done: %s" % d.tail(5))
        time.sleep(0.1)


def reload_revokes():
    """Revoking a client is removing its entry and SIGHUP; the audit log
    follows the configuration."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["audit_log"] = "audit-a.log"
    conf = SEC / "revoke.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "revoke-daemon", env=F.softhsm_env(SEC))
    r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, headers=bearer(LIMITED))
    eq(r.status, 200, "limited client before the reload")
    record_of(r, SEC / "audit-a.log")
    cfg["clients"] = [c for c in cfg["clients"] if c["name"] != "demo-limited"]
    cfg["audit_log"] = "audit-b.log"
    conf.write_text(json.dumps(cfg))
    reload_and_wait(d)
    r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, headers=bearer(LIMITED))
    refused_401(r)
    record_of(r, SEC / "audit-b.log")
    r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()})
    eq(r.status, 200, "the other client still signs")
    record_of(r, SEC / "audit-b.log")
    F.check_exit(d, d.stop())


def reload_refused_keeps_audit():
    """A reload that changes or drops audit_log and is then refused (its
    token would go down: a wrong PIN file) leaves the running trail as it
    was; an accepted one moves the records to the new file."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    one, two = SEC / "audit-keep-1.log", SEC / "audit-keep-2.log"
    for f in (one, two):
        if f.exists():
            f.unlink()
    wrong = SEC / "wrong-pin"
    wrong.write_text("wrong-pin-0000000000\n")
    wrong.chmod(0o600)
    cfg["audit_log"] = one.name
    conf = SEC / "audit-keep.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "audit-keep-daemon", env=F.softhsm_env(SEC))
    r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("before")})
    eq(r.status, 200, "sign before the reloads")
    record_of(r, one)
    for what, change in (("changed", lambda c: c.update(audit_log=two.name)),
                         ("dropped", lambda c: c.pop("audit_log"))):
        bad = json.loads(json.dumps(cfg))
        change(bad)
        bad["tokens"][0]["pin_file"] = str(wrong)
        conf.write_text(json.dumps(bad))
        refused = d.stderr_text().count("keeping the running configuration")
        d.send_signal(signal.SIGHUP)
        deadline = time.time() + 30
        while d.stderr_text().count("keeping the running configuration") == refused:
            check(time.time() < deadline, "reload with audit_log %s not refused: %s" % (what, d.tail(5)))
            time.sleep(0.1)
        check("would go down" in d.stderr_text(), "refused for another reason: %s" % d.tail(5))
        r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("refused " + what)})
        eq(r.status, 200, "sign after the refused reload (audit_log %s)" % what)
        record_of(r, one)
        check(not two.exists() or not audit_records(two), "records in %s" % two.name)
    conf.write_text(json.dumps(dict(cfg, audit_log=two.name)))
    reload_and_wait(d)
    r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("accepted")})
    eq(r.status, 200, "sign after the accepted reload")
    record_of(r, two)
    no_record(r, one)
    F.check_exit(d, d.stop())


# ------------------------------------------------------------ TLS

def openssl(*args):
    return F.run(["openssl"] + [str(a) for a in args])


def make_ca(d, name):
    openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
            "-keyout", d / (name + ".key"), "-out", d / (name + ".pem"),
            "-subj", "/O=smimed test/CN=" + name,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def issue(d, ca, name, subj, ext):
    (d / (name + ".ext")).write_text(ext)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", d / (name + ".key"), "-out", d / (name + ".csr"), "-subj", subj)
    openssl("x509", "-req", "-in", d / (name + ".csr"), "-CA", d / (ca + ".pem"), "-CAkey", d / (ca + ".key"),
            "-set_serial", "0x" + os.urandom(8).hex(), "-days", "30", "-sha256",
            "-extfile", d / (name + ".ext"), "-out", d / (name + ".pem"))
    (d / (name + ".key")).chmod(0o600)


class TlsDaemon(F.Daemon):
    """A daemon speaking HTTPS; requests use the client certificate set in
    self.client (None: none)."""

    def __init__(self, config, name, env, ca):
        super().__init__(config, name=name, env=env)
        self.ca = ca
        self.client = None

    def request(self, method, path, body=None, headers=None, timeout=60, auth=True):
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.client:
            ctx.load_cert_chain(str(self.client[0]), str(self.client[1]))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=ctx)
        try:
            conn.request(method, path, body=body, headers=self.auth_headers(headers, auth))
            r = conn.getresponse()
            return F.Response(r.status, r.reason, r.getheaders(), r.read())
        finally:
            conn.close()


TLS = {}


def tls_setup():
    d = WORK / "tls"
    d.mkdir()
    make_ca(d, "server-ca")
    make_ca(d, "client-ca")
    make_ca(d, "rogue-ca")
    issue(d, "server-ca", "server", "/CN=127.0.0.1",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    issue(d, "client-ca", "webmail", "/O=smimed test/CN=webmail",
          "subjectAltName=DNS:webmail.smimed.test\nextendedKeyUsage=clientAuth\n")
    issue(d, "client-ca", "batch", "/O=smimed test/CN=batch",
          "extendedKeyUsage=clientAuth\n")
    issue(d, "client-ca", "stranger", "/O=smimed test/CN=stranger",
          "extendedKeyUsage=clientAuth\n")
    # the same names as webmail's, from a CA the daemon does not trust
    issue(d, "rogue-ca", "rogue", "/O=smimed test/CN=webmail",
          "subjectAltName=DNS:webmail.smimed.test\nextendedKeyUsage=clientAuth\n")
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg["tls"] = {"certificate": str(d / "server.pem"), "key": str(d / "server.key"),
                  "client_ca": str(d / "client-ca.pem")}
    cfg["audit_log"] = str(d / "audit.log")
    cfg["clients"] += [
        {"name": "webmail", "certificate_san": "webmail.smimed.test", "keys": ["demo-ec"], "operations": ["sign"]},
        {"name": "batch", "certificate_subject": "CN=batch,O=smimed test", "keys": ["*"], "operations": ["sign"]},
    ]
    conf = SEC / "tls.conf"
    conf.write_text(json.dumps(cfg))
    td = TlsDaemon(conf, "tls-daemon", F.softhsm_env(SEC), d / "server-ca.pem")
    S.daemons.append(td)
    td.start()
    TLS.update(dir=d, daemon=td)


def tls_client(name):
    d = TLS["dir"]
    return (d / (name + ".pem"), d / (name + ".key")) if name else None


def mtls_good():
    td = TLS["daemon"]
    td.client = tls_client("webmail")
    r = td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("over mTLS")}, auth=False)
    eq(r.status, 200, "sign with the webmail certificate (SAN)")
    F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
    rec = record_of(r, TLS["dir"] / "audit.log")
    eq((rec["client"], rec["key"]), ("webmail", "demo-ec"), "audit client from the certificate")
    expect_error(td.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}, auth=False), 403, "forbidden")
    td.client = tls_client("batch")
    r = td.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()}, auth=False)
    eq(r.status, 200, "sign with the batch certificate (subject)")
    eq(record_of(r, TLS["dir"] / "audit.log")["client"], "batch", "client by subject")


def mtls_unknown():
    td = TLS["daemon"]
    td.client = tls_client("rogue")
    refused_401(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, auth=False))
    # an unverified certificate is refused even with a valid token
    refused_401(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}))
    # verified, but no client has its names: a token may still say who it is
    td.client = tls_client("stranger")
    refused_401(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, auth=False))
    eq(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}).status, 200, "stranger with a token")


def mtls_none():
    td = TLS["daemon"]
    td.client = None
    refused_401(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}, auth=False))
    eq(td.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}).status, 200, "token over TLS")
    eq(td.request("GET", "/healthz", auth=False).status, 200, "/healthz over TLS")
    # plain HTTP on the TLS port gets no HTTP answer
    s = socket.create_connection(("127.0.0.1", td.port), timeout=10)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            data = s.recv(100)
        except OSError:
            pass
        check(not data.startswith(b"HTTP/"), "plain HTTP answered: %r" % data[:40])
    finally:
        s.close()


def curl_mtls():
    """An independent client: curl (GnuTLS build) with the certificate."""
    td = TLS["daemon"]
    d = TLS["dir"]
    p = F.run(["curl", "-s", "--cacert", d / "server-ca.pem", "--cert", d / "webmail.pem",
               "--key", d / "webmail.key", "-H", "Content-Type: application/json",
               "-d", json.dumps({"key": "demo-ec", "mime": msg("curl")}),
               "-w", "\n%{http_code}", "https://127.0.0.1:%d/v1/sign" % td.port])
    body, _, code = p.stdout.decode().rpartition("\n")
    eq(code, "200", "curl status (%s)" % body[:200])


def tls_versions():
    """TLS 1.2 and 1.3 only: gnutls-cli limited to one version at a time."""
    td = TLS["daemon"]
    d = TLS["dir"]

    def handshake(version):
        p = F.run(["gnutls-cli", "--x509cafile", d / "server-ca.pem", "--port", td.port,
                   "--priority", "NORMAL:-VERS-ALL:+VERS-" + version, "127.0.0.1"],
                  input=b"GET /healthz HTTP/1.0\r\n\r\n", check=False, timeout=30)
        return p.returncode == 0 and b" 200 OK" in p.stdout + p.stderr

    check(handshake("TLS1.3"), "TLS 1.3 refused")
    check(handshake("TLS1.2"), "TLS 1.2 refused")
    check(not handshake("TLS1.1"), "TLS 1.1 accepted")
    check(not handshake("TLS1.0"), "TLS 1.0 accepted")


# ------------------------------------------------------------ PINs and process

def pin_file_mode():
    d = F.copy_token_dir(SEC, WORK / "pinmode")
    (d / "pin").chmod(0o640)
    p = F.run([F.BINARY, "--config", d / "smimed.conf", "--check-config"], check=False,
              env=F.softhsm_env(d))
    check(p.returncode != 0, "--check-config accepted a 0640 PIN file")
    check(b"chmod 600" in p.stderr, "no clear message: %r" % p.stderr[-300:])
    dd = S.daemon(d / "smimed.conf", "pin-mode-daemon", env=F.softhsm_env(d), start=False)
    try:
        dd.start(timeout=30)
        raise AssertionError("started with a 0640 PIN file")
    except AssertionError as e:
        check("exited with" in str(e), str(e)[:200])
    check("open to group or others" in dd.stderr_text(), "no clear message: %s" % dd.tail(5))


def pin_env():
    """A PIN from the environment serves, and is gone from the process's
    environment (/proc/PID/environ shows the original block)."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    del cfg["tokens"][0]["pin_file"]
    cfg["tokens"][0]["pin_env"] = "SMIMED_SECURITY_PIN"
    conf = SEC / "pinenv.conf"
    conf.write_text(json.dumps(cfg))
    env = F.softhsm_env(SEC)
    env["SMIMED_SECURITY_PIN"] = PIN
    d = S.daemon(conf, "pin-env-daemon", env=env)
    eq(d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}).status, 200, "sign with the env PIN")
    environ = Path("/proc/%d/environ" % d.proc.pid).read_bytes()
    check(PIN.encode() not in environ, "the PIN is still in /proc/PID/environ")
    check(b"SOFTHSM2_CONF=" in environ, "environ unreadable?")
    limits = Path("/proc/%d/limits" % d.proc.pid).read_text()
    check(re.search(r"Max core file size\s+0\s+0", limits), "core dumps not off:\n%s" % limits)
    reload_and_wait(d)  # a reload reads the PIN again, from locked memory
    eq(d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg()}).status, 200, "sign after reload")
    F.check_exit(d, d.stop())


def modules_only_from_config():
    """OPENSSL_CONF is ignored (it would make SHA-256 unavailable here), and
    the only PKCS#11 module mapped (by the key process, the one process that
    maps any) is the configured one."""
    bad = WORK / "openssl.cnf"
    bad.write_text("openssl_conf = init\n[init]\nalg_section = algs\n[algs]\ndefault_properties = fips=yes\n")
    env = F.softhsm_env(SEC)
    env["OPENSSL_CONF"] = str(bad)
    d = S.daemon(SEC / "smimed.conf", "openssl-conf-daemon", env=env)
    r = d.post_json("/v1/sign", {"key": "demo-rsa", "mime": msg()})
    eq(r.status, 200, "sign with a hostile OPENSSL_CONF")
    keys = d.children("smimed-key")
    eq(len(keys), 1, "key processes")
    maps = Path("/proc/%d/maps" % keys[0]).read_text()
    libs = set(l.split()[-1] for l in maps.splitlines() if ".so" in l.split()[-1])
    module = F.softhsm_module()
    check(module in libs, "the configured module is not mapped")
    # libp11-kit.so is a library GnuTLS links; modules are what p11-kit,
    # OpenSSL or an environment variable could add
    others = [l for l in libs if l != module and
              ("/pkcs11/" in l or "-pkcs11" in l or "p11-kit-" in l or "softhsm" in l
               or "/engines-" in l or "/ossl-modules/" in l)]
    check(not others, "modules loaded from elsewhere: %s" % others)
    F.check_exit(d, d.stop())


# ------------------------------------------------------------ limits

def idle_connections():
    """500 idle connections from one address (a webmail back end, with
    max_connections_per_ip raised to 512) are accepted and do not keep a
    normal request from being served."""
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg.update(max_connections_per_ip=512)
    conf = SEC / "webmail.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "webmail-daemon", env=F.softhsm_env(SEC))
    socks = []
    try:
        for _ in range(500):
            socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=30))
        r = d.post_json("/v1/sign", {"key": "demo-ec", "mime": msg("past 500 idle")}, timeout=30)
        eq(r.status, 200, "sign with 500 idle connections open")
        # the last idle connection was accepted, not dropped at the limit
        socks[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        check(socks[-1].recv(64).startswith(b"HTTP/1.1 200"), "the 500th connection was not served")
    finally:
        for s in socks:
            s.close()
    F.check_exit(d, d.stop())


def per_ip_default():
    """By default one address holds at most 64 connections."""
    socks = []
    try:
        for _ in range(64):
            socks.append(socket.create_connection(("127.0.0.1", D.port), timeout=30))
        socks[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        check(socks[-1].recv(64).startswith(b"HTTP/1.1 200"), "the 64th connection was not served")
        refused = False
        try:
            r = D.request("GET", "/healthz", timeout=10)
            refused = r.status != 200
        except (OSError, http.client.HTTPException):
            refused = True
        check(refused, "a 65th connection from one address was served")
    finally:
        for s in socks:
            s.close()
    deadline = time.time() + 20
    while True:
        try:
            if D.request("GET", "/healthz", timeout=5).status == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        check(time.time() < deadline, "not served again after the connections went")
        time.sleep(0.1)


def per_ip_limit_and_timeout():
    cfg = json.loads((SEC / "smimed.conf").read_text())
    cfg.update(max_connections_per_ip=4, request_timeout_s=2)
    conf = SEC / "limits.conf"
    conf.write_text(json.dumps(cfg))
    d = S.daemon(conf, "limits-daemon", env=F.softhsm_env(SEC))
    socks = [socket.create_connection(("127.0.0.1", d.port), timeout=30) for _ in range(4)]
    try:
        refused = False
        try:
            r = d.request("GET", "/healthz", timeout=10)
            refused = r.status != 200
        except (OSError, http.client.HTTPException):
            refused = True
        check(refused, "a fifth connection from one address was served")
        # the server closes idle connections after request_timeout_s
        deadline = time.time() + 20
        for s in socks:
            s.settimeout(max(1, deadline - time.time()))
            try:
                check(s.recv(1) == b"", "data on an idle connection")
            except ConnectionResetError:
                pass
        check(time.time() < deadline, "idle connections not closed")
    finally:
        for s in socks:
            s.close()
    deadline = time.time() + 20
    while True:
        try:
            if d.request("GET", "/healthz", timeout=5).status == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        check(time.time() < deadline, "not served again after the idle connections went")
        time.sleep(0.1)
    F.check_exit(d, d.stop())


# ------------------------------------------------------------ exposure

def run_listen(conf, listen, env):
    """Starts the daemon on listen; returns (process, port or None)."""
    log = WORK / ("listen-%s.log" % re.sub(r"\W", "_", listen + conf.name))
    full = dict(os.environ)
    full.update(F.sanitizer_env())
    full.update(env)
    with open(log, "wb") as f:
        p = subprocess.Popen([str(F.BINARY), "--config", str(conf), "--listen", listen],
                             stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=full)
    deadline = time.time() + 60
    while True:
        text = log.read_text(errors="replace")
        m = re.search(r"listening on \S+ \(port (\d+)\)", text)
        if m:
            return p, int(m.group(1)), text
        if p.poll() is not None:
            return p, None, text
        check(time.time() < deadline, "neither listening nor exited:\n%s" % text[-500:])
        time.sleep(0.1)


def stop_proc(p):
    p.send_signal(signal.SIGTERM)
    eq(p.wait(timeout=60), 0, "exit status")


def non_loopback():
    open_conf = F.write_config(WORK / "open" / "smimed.conf", [F.token_config(SEC)])
    env = F.softhsm_env(SEC)
    p, port, text = run_listen(open_conf, "0.0.0.0:0", env)
    check(port is None and p.returncode not in (None, 0), "listened on 0.0.0.0 without clients")
    check("refusing to listen" in text and "allow_insecure_unauthenticated_listen" in text,
          "no clear message: %s" % text[-300:])
    p, port, text = run_listen(open_conf, "[::]:0", env)
    check(port is None and p.returncode not in (None, 0), "listened on :: without clients")
    # loopback stays open without clients (the tests' own daemons rely on it)
    p, port, text = run_listen(open_conf, "127.0.0.1:0", env)
    check(port, "loopback refused: %s" % text[-300:])
    stop_proc(p)
    insecure = F.write_config(WORK / "insecure" / "smimed.conf", [F.token_config(SEC)],
                              allow_insecure_unauthenticated_listen=True)
    p, port, text = run_listen(insecure, "0.0.0.0:0", env)
    check(port, "the insecure override did not start: %s" % text[-300:])
    check("allow_insecure_unauthenticated_listen" in text, "no warning logged")
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/sign", body=json.dumps({"key": "demo-ec", "mime": msg()}),
              headers={"Content-Type": "application/json"})
    eq(c.getresponse().status, 200, "unauthenticated sign with the override")
    c.close()
    stop_proc(p)
    # with clients, any address is fine
    p, port, text = run_listen(SEC / "smimed.conf", "0.0.0.0:0", env)
    check(port, "refused with clients: %s" % text[-300:])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/keys")
    eq(c.getresponse().status, 401, "keys without a token")
    c.close()
    stop_proc(p)


# ------------------------------------------------------------ tools

def hash_token():
    p = F.run([F.BINARY, "--hash-token"], input=(TOKEN + "\n").encode())
    line = p.stdout.decode().strip()
    eq(line, '"token_sha256": "%s"' % hashlib.sha256(TOKEN.encode()).hexdigest(), "--hash-token output")
    cfg = json.loads((SEC / "smimed.conf").read_text())
    check(json.loads("{%s}" % line)["token_sha256"] == cfg["clients"][0]["token_sha256"],
          "the demo config holds the hash of DIR/api-token")
    check(TOKEN not in (SEC / "smimed.conf").read_text(), "the token is in the config")
    p = F.run([F.BINARY, "--hash-token"], input=b"short\n", check=False)
    check(p.returncode != 0 and b"shorter" in p.stderr, "a short token was hashed")
    for f in ("api-token", "api-token-limited", "pin"):
        eq((SEC / f).stat().st_mode & 0o777, 0o600, "%s mode" % f)


def config_problems():
    base = json.loads((SEC / "smimed.conf").read_text())
    cases = [
        ("bad hash", {"name": "x", "token_sha256": "abc", "keys": ["*"], "operations": ["sign"]}, "64 hex"),
        ("bad operation", {"name": "x", "token_sha256": "a" * 64, "keys": ["*"], "operations": ["encrypt"]},
         "operations"),
        ("no credential", {"name": "x", "keys": ["*"], "operations": ["sign"]}, "token_sha256"),
        ("certificate without client_ca", {"name": "x", "certificate_san": "a", "keys": ["*"],
                                           "operations": ["sign"]}, "client_ca"),
        ("same token twice", dict(base["clients"][0], name="again"), "same token"),
        ("same name twice", {"name": "demo", "token_sha256": "b" * 64}, "used twice"),
    ]
    for name, client, mention in cases:
        cfg = json.loads(json.dumps(base))
        cfg["clients"].append(client)
        conf = SEC / "bad.conf"
        conf.write_text(json.dumps(cfg))
        p = F.run([F.BINARY, "--config", conf, "--check-config"], check=False, env=F.softhsm_env(SEC))
        check(p.returncode != 0 and mention.encode() in p.stderr,
              "%s: %d %r" % (name, p.returncode, p.stderr[-300:]))


def systemd_unit():
    unit = F.REPO / "systemd" / "smimed.service"
    p = F.run(["systemd-analyze", "security", "--offline=true", unit], check=False)
    out = (p.stdout + p.stderr).decode(errors="replace")
    m = re.search(r"Overall exposure level for smimed.service: (\d+\.\d+)", out)
    check(m, "no score: %s" % out[-500:])
    check(float(m.group(1)) <= 2.0, "exposure %s > 2.0" % m.group(1))
    readme = (F.REPO / "README.md").read_text()
    check(("exposure %s" % m.group(1)) in readme, "README does not record the score %s" % m.group(1))


def main():
    if not S.case("daemon starts on a copy of the demo token", start):
        S.finish()
    S.case("no token: 401 with WWW-Authenticate, no key operation", missing_token)
    S.case("wrong token: 401", wrong_token)
    S.case("Bearer scheme is case-insensitive", scheme_case_insensitive)
    S.case("a NUL in the bearer token: 401, audited; two Authorization headers refused", nul_in_token)
    S.case("401 comes before 404, 405, 413, 415", order_401_first)
    S.case("/healthz and /readyz need no token", probes_open)
    S.case("limited token: 403 for other keys and operations, no key operation", limited_client)
    S.case("decrypt chooses only keys the client may use", decrypt_choice_respects_rights)
    S.case("audit: a mixed run, one valid record per operation or refusal", audit_mixed_run)
    S.case("audit: SIGUSR1 reopens the audit log", audit_reopen)
    S.case("reload: a removed client gets 401, the audit log follows", reload_revokes)
    S.case("reload: refused after a new audit_log, the running trail stays; accepted, it moves",
           reload_refused_keeps_audit)
    S.case("audit: a failed write fails the operation", audit_write_failure)
    S.case("audit: an audit log that cannot be opened stops the start", audit_unopenable)
    if S.case("TLS: server and CAs", tls_setup):
        S.case("mTLS: good client certificates (SAN, subject)", mtls_good)
        S.case("mTLS: unknown and unverified client certificates", mtls_unknown)
        S.case("mTLS: no client certificate", mtls_none)
        S.case("mTLS: curl as the client", curl_mtls)
        S.case("TLS: versions 1.2 and 1.3 only", tls_versions)
    S.case("PIN file open to the group: refused", pin_file_mode)
    S.case("PIN from the environment: served, gone from /proc/PID/environ, no core dumps", pin_env)
    S.case("modules: OPENSSL_CONF ignored, only the configured PKCS#11 module", modules_only_from_config)
    S.case("500 idle connections from one address; a request is still served", idle_connections)
    S.case("per-IP connection limit and idle timeout", per_ip_limit_and_timeout)
    S.case("per-IP connection limit: 64 by default", per_ip_default)
    S.case("non-loopback listen refused without clients; insecure override", non_loopback)
    S.case("--hash-token and the demo's tokens", hash_token)
    S.case("--check-config: client problems", config_problems)
    S.case("systemd unit: exposure <= 2.0, recorded in README", systemd_unit)
    S.case("no PIN or token in any log", no_secrets_in_logs)
    S.stop_running(pins=[PIN, TOKEN, LIMITED])
    S.finish()


if __name__ == "__main__":
    main()
