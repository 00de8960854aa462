#!/usr/bin/env python3
"""The bad-input matrix: every error has its status, its code and a JSON
error body, nothing is ever a 500, and a normal request succeeds right
after each."""

import base64
import json
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

# One table of the error codes the tests expect (status, code).
ERR = {
    "not_found": (404, "not_found"),
    "method_not_allowed": (405, "method_not_allowed"),
    "body_too_large": (413, "body_too_large"),
    "unsupported_media_type": (415, "unsupported_media_type"),
    "invalid_json": (400, "invalid_json"),
    "missing_field": (400, "missing_field"),
    "invalid_field": (400, "invalid_field"),
    "invalid_base64": (400, "invalid_base64"),
    "unknown_key": (404, "unknown_key"),
    "invalid_mime": (400, "invalid_mime"),
}

CAP = 4096  # max_body_bytes of this suite's daemon
GOOD = {"key": "demo-ec", "mime": "Content-Type: text/plain\r\n\r\nafter an error\r\n"}

S = F.Suite("errors")
DEMO = F.ensure_demo()
WORK = F.workdir("errors")
D = None


def start():
    global D
    conf = F.write_config(WORK / "smimed.conf", [F.token_config(DEMO)], max_body_bytes=CAP)
    D = S.daemon(conf, "errors-daemon", env=F.softhsm_env(DEMO))


def still_serving():
    r = D.sign(**GOOD)
    eq(r.status, 200, "normal sign request after the error (%r)" % r.body[:200])
    F.openssl_verify(r.json()["mime"].encode(), DEMO / "ca.pem", WORK)


def expect(r, which):
    status, code = ERR[which]
    expect_error(r, status, code)
    still_serving()


def sign_body(obj):
    return json.dumps(obj).encode()


# ------------------------------------------------------------------ routing

def unknown_path():
    expect(D.request("GET", "/nope"), "not_found")
    expect(D.post_json("/v2/sign", GOOD), "not_found")


def wrong_method():
    r = D.request("GET", "/v1/sign")
    expect_error(r, *ERR["method_not_allowed"])
    check("POST" in (r.header("Allow") or ""), "Allow header %r" % r.header("Allow"))
    r = D.request("DELETE", "/v1/keys")
    expect_error(r, *ERR["method_not_allowed"])
    check("GET" in (r.header("Allow") or ""), "Allow header %r" % r.header("Allow"))
    still_serving()


def route_before_size():
    # 404 comes before 413: an unknown path with a huge body is still 404
    r = D.request("POST", "/nope", body=b"x" * (CAP + 100),
                  headers={"Content-Type": "application/json"})
    expect(r, "not_found")


# ------------------------------------------------------------------ size, media type

def too_large_content_length():
    body = sign_body({"key": "demo-ec", "mime": "Content-Type: text/plain\r\n\r\n" + "x" * CAP})
    check(len(body) > CAP, "test body not over the cap")
    expect(D.request("POST", "/v1/sign", body=body, headers={"Content-Type": "application/json"}),
           "body_too_large")


def at_cap_accepted():
    base = sign_body({"key": "demo-ec", "mime": "Content-Type: text/plain\r\n\r\n"})
    pad = CAP - len(base) - 2
    body = sign_body({"key": "demo-ec", "mime": "Content-Type: text/plain\r\n\r\n" + "y" * pad})
    eq(len(body), CAP - 2, "body length")
    r = D.request("POST", "/v1/sign", body=body, headers={"Content-Type": "application/json"})
    eq(r.status, 200, "status for a body just under the cap (%r)" % r.body[:200])


def read_response(sock, timeout=15):
    sock.settimeout(timeout)
    data = b""
    deadline = time.time() + timeout
    while b"\r\n\r\n" not in data and time.time() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    # read the body as far as Content-Length says
    head, _, rest = data.partition(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while length is not None and len(rest) < length and time.time() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        rest += chunk
    return head, rest


def raw_status(head):
    line = head.split(b"\r\n")[0]
    parts = line.split(b" ")
    check(len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), "no status line: %r" % line)
    return int(parts[1])


def too_large_refused_early():
    """Content-Length far over the cap: the daemon answers 413 without
    waiting for (or reading) the body."""
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    try:
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
                  + b"{" * 1000)
        t0 = time.time()
        head, body = read_response(s, timeout=15)
        check(head, "no response within 15s while 1 GB of body was pending")
        eq(raw_status(head), 413, "status")
        check(time.time() - t0 < 10, "413 took %.1fs" % (time.time() - t0))
        code = json.loads(body.decode()).get("error", {}).get("code")
        eq(code, ERR["body_too_large"][1], "error code")
    finally:
        s.close()
    still_serving()


def too_large_expect_continue():
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    try:
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head, body = read_response(s, timeout=15)
        check(head, "no response")
        eq(raw_status(head), 413, "status (must not be 100 Continue)")
    finally:
        s.close()
    still_serving()


def too_large_chunked():
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    try:
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"400\r\n" + b"[" * 1024 + b"\r\n"
        sent = 0
        for _ in range(64):  # 64 KiB in all, 16x the cap
            r, _, _ = select.select([s], [], [], 0)
            if r:
                break  # the daemon has answered
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += 1024
            time.sleep(0.005)
        else:
            try:
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass
        head, body = read_response(s, timeout=15)
        check(head, "no response after %d chunked bytes" % sent)
        eq(raw_status(head), 413, "status")
        code = json.loads(body.decode()).get("error", {}).get("code")
        eq(code, ERR["body_too_large"][1], "error code")
    finally:
        s.close()
    still_serving()


def endless_chunked_closed():
    # a client that keeps streaming past the cap is cut off, not drained
    # forever: the connection ends (413 or closed) long before 64 MiB
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    sent = 0
    try:
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"[" * 0x10000 + b"\r\n"
        while sent < 64 << 20:
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
    finally:
        s.close()
    check(sent < 16 << 20, "the daemon read %d bytes of a refused body" % sent)
    still_serving()


def chunked_small_ok():
    s = socket.create_connection(("127.0.0.1", D.port), timeout=30)
    try:
        body = sign_body(GOOD)
        half = len(body) // 2
        s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (body[:half], body[half:]):
            s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        head, rest = read_response(s, timeout=30)
        eq(raw_status(head), 200, "status for a small chunked request")
    finally:
        s.close()


def media_types():
    body = sign_body(GOOD)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        expect(D.request("POST", "/v1/sign", body=body, headers={"Content-Type": ctype}),
               "unsupported_media_type")
    expect(D.request("POST", "/v1/sign", body=body), "unsupported_media_type")


def media_type_params_ok():
    r = D.request("POST", "/v1/sign", body=sign_body(GOOD),
                  headers={"Content-Type": "Application/JSON; charset=utf-8"})
    eq(r.status, 200, "status with charset parameter (%r)" % r.body[:200])


# ------------------------------------------------------------------ request syntax

def malformed_json():
    for body in (b'{"key": "demo-ec", "mime": ', b"not json", b"", b'{"key":"demo-ec",}',
                 b'{"key":"a","key":"b","mime":"x"}', b"[1,2]", b'"just a string"',
                 b'{"key":"demo-ec","mime":"\xff\xfe"}'):
        r = D.request("POST", "/v1/sign", body=body, headers={"Content-Type": "application/json"})
        try:
            expect_error(r, *ERR["invalid_json"])
        except AssertionError as e:
            raise AssertionError("body %r: %s" % (body[:40], e))
    still_serving()


def missing_fields():
    for obj in ({"mime": GOOD["mime"]}, {"key": "demo-ec"}, {}):
        r = D.post_json("/v1/sign", obj)
        try:
            expect_error(r, *ERR["missing_field"])
        except AssertionError as e:
            raise AssertionError("%r: %s" % (obj, e))
    still_serving()


def invalid_fields():
    bad = [
        {"key": 123, "mime": GOOD["mime"]},
        {"key": None, "mime": GOOD["mime"]},
        {"key": "demo-ec", "mime": ["x"]},
        {"key": "demo-ec", "mime": 5},
        {"key": "demo-ec", "mime": GOOD["mime"], "mode": "sideways"},
        {"key": "demo-ec", "mime": GOOD["mime"], "mode": 1},
        {"key": "demo-ec", "mime": GOOD["mime"], "digest": "md5"},
        {"key": "demo-ec", "mime": GOOD["mime"], "digest": "sha1"},
        {"key": "demo-ec", "mime": GOOD["mime"], "digest": True},
        {"key": "demo-ec", "mime": GOOD["mime"], "mime_base64": "aGk="},
        {"key": "demo-ec", "mime_base64": 17},
        {"key": "demo-ec", "mime": GOOD["mime"], "digset": "sha256"},
    ]
    for obj in bad:
        r = D.post_json("/v1/sign", obj)
        try:
            expect_error(r, *ERR["invalid_field"])
        except AssertionError as e:
            raise AssertionError("%s: %s" % (json.dumps(obj)[:80], e))
    still_serving()


def invalid_base64():
    for b64 in ("!!!not base64!!!", "aGVs*bG8=", "a", "===="):
        r = D.post_json("/v1/sign", {"key": "demo-ec", "mime_base64": b64})
        try:
            expect_error(r, *ERR["invalid_base64"])
        except AssertionError as e:
            raise AssertionError("%r: %s" % (b64, e))
    still_serving()


def base64_with_newlines_ok():
    raw = GOOD["mime"].encode() * 20
    b64 = base64.encodebytes(raw).decode()  # lines of 76 characters
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime_base64": b64})
    eq(r.status, 200, "status for MIME-style base64 with line breaks (%r)" % r.body[:200])


def unknown_key():
    expect(D.post_json("/v1/sign", {"key": "no-such-key", "mime": GOOD["mime"]}), "unknown_key")
    expect(D.post_json("/v1/sign", {"key": "", "mime": GOOD["mime"]}), "unknown_key")


def syntax_before_key():
    # 400 (bad digest) wins over 404 (unknown key)
    r = D.post_json("/v1/sign", {"key": "no-such-key", "mime": GOOD["mime"], "digest": "md5"})
    expect(r, "invalid_field")
    # malformed MIME is request syntax too
    r = D.post_json("/v1/sign", {"key": "no-such-key",
                                 "mime": "Content-Type: multipart/mixed\r\n\r\nno boundary\r\n"})
    expect(r, "invalid_mime")


def raw_mode_errors():
    msg = GOOD["mime"].encode()
    h = {"Content-Type": "message/rfc822"}
    expect(D.request("POST", "/v1/sign", body=msg, headers=h), "missing_field")
    expect(D.request("POST", "/v1/sign?key=no-such-key", body=msg, headers=h), "unknown_key")
    expect(D.request("POST", "/v1/sign?key=demo-ec&mode=sideways", body=msg, headers=h),
           "invalid_field")
    expect(D.request("POST", "/v1/sign?key=demo-ec&digest=md2", body=msg, headers=h),
           "invalid_field")


# ------------------------------------------------------------------ content

def garbage_mime():
    samples = [
        ("empty", b""),
        ("no header", b"just some text without any header\r\n"),
        ("binary", bytes(range(256)) * 4),
        ("NULs", b"Content-Type: text/plain\r\n\r\n\x00\x00\x00\r\n"),
        ("broken multipart", b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nno end"),
        ("multipart without boundary", b"Content-Type: multipart/mixed\r\n\r\nbody\r\n"),
        ("header without colon", b"this is not a header\r\nContent-Type: text/plain\r\n\r\nx\r\n"),
        ("long header line", b"Content-Type: text/plain; x=" + b"a" * 3000 + b"\r\n\r\nx\r\n"),
        ("bad transfer encoding", b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!\r\n"),
        ("deep nesting", b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                                  for i in range(30))),
    ]
    for name, raw in samples:
        r = D.post_json("/v1/sign", {"key": "demo-rsa", "mime_base64": base64.b64encode(raw).decode()})
        check(r.status in (200, 400), "%s: status %d (%r)" % (name, r.status, r.body[:200]))
        if r.status == 400:
            try:
                expect_error(r, *ERR["invalid_mime"])
            except AssertionError as e:
                raise AssertionError("%s: %s" % (name, e))
        else:
            j = r.json()
            out = j["mime"].encode() if "mime" in j else base64.b64decode(j["mime_base64"])
            F.openssl_verify(out, DEMO / "ca.pem", WORK)
    still_serving()


def invalid_utf8_in_errors():
    # error messages quote the request; bytes that are not UTF-8 must still
    # give a JSON error body, not a dropped connection
    expect(D.request("GET", "/%ff"), "not_found")
    h = {"Content-Type": "message/rfc822"}
    msg = GOOD["mime"].encode()
    expect(D.request("POST", "/v1/sign?%ff=1", body=msg, headers=h), "invalid_field")
    expect(D.request("POST", "/v1/sign?key=%ff", body=msg, headers=h), "unknown_key")
    expect(D.request("POST", "/v1/sign", body=b"{}", headers={"Content-Type": "text/\xff"}),
           "unsupported_media_type")
    # a message cut at the 256-byte limit in the middle of a character
    for n in range(230, 245):
        expect(D.request("GET", "/" + "a" * n + "%C3%A9" * 10), "not_found")


def nul_in_options():
    # NUL is fine inside mime, but an option cut at it would mean something else
    expect(D.post_json("/v1/sign", {"key": "demo-ec\u0000evil", "mime": GOOD["mime"]}),
           "invalid_field")
    expect(D.post_json("/v1/sign", {"key": "demo-ec", "mode": "opaque\u0000x",
                                    "mime": GOOD["mime"]}), "invalid_field")


def key_before_recipients():
    # 404 (unknown signing key) comes before 422 (unfit recipient)
    bad = (DEMO / "ca.pem").read_text()  # a CA certificate cannot receive mail
    r = D.post_json("/v1/sign", {"key": "no-such-key", "mime": GOOD["mime"],
                                 "encrypt_for": [bad], "cipher": "aes-128-cbc"})
    expect(r, "unknown_key")
    r = D.post_json("/v1/decrypt", {"key": "no-such-key", "mime": "garbage"})
    expect(r, "unknown_key")


def log_lines_not_forged():
    D.request("GET", "/x%0a2026-01-01T00:00:00.000Z%20error%20main:%20forged")
    still_serving()
    check(not any(l.startswith("2026-01-01T00:00:00.000Z error main: forged")
                  for l in D.tail(10000).splitlines()),
          "a request path forged a log line")


def error_bodies_are_clean():
    r = D.request("GET", "/nope")
    j = r.json()
    eq(sorted(j), ["error"], "top-level members of an error body")
    eq(sorted(j["error"]), ["code", "message"], "members of the error object")


def health_endpoints_method():
    r = D.request("POST", "/healthz", body=b"{}", headers={"Content-Type": "application/json"})
    expect(r, "method_not_allowed")


def main():
    if not S.case("daemon starts with max_body_bytes=%d" % CAP, start):
        S.finish()
    cases = [
        ("unknown path -> 404 not_found", unknown_path),
        ("wrong method -> 405 with Allow", wrong_method),
        ("POST /healthz -> 405", health_endpoints_method),
        ("unknown path with an oversized body -> 404 first", route_before_size),
        ("Content-Length over the cap -> 413", too_large_content_length),
        ("body just under the cap is accepted", at_cap_accepted),
        ("1 GB Content-Length refused before the body is read", too_large_refused_early),
        ("Expect: 100-continue over the cap -> 413", too_large_expect_continue),
        ("chunked body over the cap -> 413", too_large_chunked),
        ("small chunked body is accepted", chunked_small_ok),
        ("endless chunked body is cut off", endless_chunked_closed),
        ("wrong or missing Content-Type -> 415", media_types),
        ("Content-Type with parameters and other case is accepted", media_type_params_ok),
        ("malformed JSON -> 400 invalid_json", malformed_json),
        ("missing key or mime -> 400 missing_field", missing_fields),
        ("wrong types, unknown mode/digest/field, both mimes -> 400 invalid_field", invalid_fields),
        ("bad base64 -> 400 invalid_base64", invalid_base64),
        ("base64 with line breaks is accepted", base64_with_newlines_ok),
        ("unknown key -> 404 unknown_key", unknown_key),
        ("400 is checked before 404 unknown key", syntax_before_key),
        ("raw mode errors", raw_mode_errors),
        ("garbage MIME -> 400 or a verifiable signature, never 500", garbage_mime),
        ("error body has exactly error.code and error.message", error_bodies_are_clean),
        ("bytes that are not UTF-8 in what errors quote -> still JSON", invalid_utf8_in_errors),
        ("NUL inside an option -> 400 invalid_field", nul_in_options),
        ("unknown signing key (404) before unfit recipient (422)", key_before_recipients),
        ("a request path cannot forge a log line", log_lines_not_forged),
    ]
    for name, fn in cases:
        S.case(name, fn)
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
