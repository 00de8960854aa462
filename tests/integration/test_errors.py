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
    "invalid_header": (400, "invalid_header"),
    "unsupported_transfer_encoding": (400, "unsupported_transfer_encoding"),
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
    forged = "\n2026-01-01T00:00:00.000Z error main: forged"
    D.request("GET", "/x%0a2026-01-01T00:00:00.000Z%20error%20main:%20forged")
    # the key name of a 404 is the client's text too, in JSON and raw mode
    expect_error(D.post_json("/v1/sign", {"key": "x" + forged, "mime": GOOD["mime"]}),
                 *ERR["unknown_key"])
    expect_error(D.request("POST", "/v1/sign?key=x%0a2026-01-01T00:00:00.000Z%20error%20main:"
                           "%20forged", body=GOOD["mime"].encode(),
                           headers={"Content-Type": "message/rfc822"}), *ERR["unknown_key"])
    still_serving()
    check(not any(l.startswith("2026-01-01T00:00:00.000Z error main: forged")
                  for l in D.tail(10000).splitlines()),
          "a request path or key name forged a log line")


def error_bodies_are_clean():
    r = D.request("GET", "/nope")
    j = r.json()
    eq(sorted(j), ["error"], "top-level members of an error body")
    eq(sorted(j["error"]), ["code", "message"], "members of the error object")


def health_endpoints_method():
    r = D.request("POST", "/healthz", body=b"{}", headers={"Content-Type": "application/json"})
    expect(r, "method_not_allowed")


# ------------------------------------------------------------------ strict input

def raw_exchange(data, timeout=10, shut=False):
    """Sends data on a fresh connection (then half-closes it when shut);
    returns (status, headers with lower-case names, body), or None when the
    connection ends without an answer."""
    s = socket.create_connection(("127.0.0.1", D.port), timeout=timeout)
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        head, body = read_response(s, timeout=timeout)
        # an interim 100 Continue: the answer follows
        while head.startswith(b"HTTP/1.1 100 "):
            rest = body
            if b"\r\n\r\n" not in rest:
                more_head, more_body = read_response(s, timeout=timeout)
                rest += more_head + (b"\r\n\r\n" + more_body if more_head else b"")
            head, _, body = rest.partition(b"\r\n\r\n")
    finally:
        s.close()
    if not head:
        return None
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode(errors="replace")
    return raw_status(head), headers, body


def raw_sign(query, extra=b"", body=None, ctype=b"message/rfc822"):
    body = GOOD["mime"].encode() if body is None else body
    return (b"POST /v1/sign%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: %s\r\n%sContent-Length: %d\r\n\r\n" % (query, ctype, extra, len(body))
            + body)


def expect_raw(data, which, what, shut=False):
    got = raw_exchange(data, shut=shut)
    check(got is not None, "%s: no answer" % what)
    status, headers, body = got
    want_status, want_code = ERR[which] if which in ERR else which
    try:
        r = F.Response(status, "", list(headers.items()), body)
        j = expect_error(r, want_status, want_code)
    except AssertionError as e:
        raise AssertionError("%s: %s" % (what, e))
    return headers, j


def strict_query():
    refused = [
        (b"?key=demo-ec&key=demo-rsa", "twice", "a repeated parameter (first would win)"),
        (b"?key=demo-ec&key=demo-ec", "twice", "a repeated parameter, same value"),
        (b"?key=demo-ec&k%65y=demo-rsa", "twice", "a repeated parameter through an escape"),
        (b"?key=demo-ec%00x", "NUL", "a NUL in a value (it would cut the value)"),
        (b"?key=demo-ec%00", "NUL", "a NUL ending a value"),
        (b"?key%00x=demo-ec", "NUL", "a NUL in a name"),
        (b"?key=demo-ec&", "empty", "a trailing '&'"),
        (b"?&key=demo-ec", "empty", "a leading '&'"),
        (b"?key=demo-ec&&mode=opaque", "empty", "a doubled '&'"),
        (b"?=demo-ec", "no name", "an empty name"),
        (b"?key=demo-ec&mode=%zz", "escape", "a bad escape"),
        (b"?key=demo-ec%2", "escape", "half an escape"),
        (b"?key=demo-ec&mode=opaque%", "escape", "a '%' at the end"),
        (b"?key=demo-ec&mode=\"opaque\"", "percent-encode", "a raw quote"),
        (b"?key=demo-ec&mode=opaque#x", "percent-encode", "a raw '#'"),
        (b"?key=demo-ec&mode=op\xc3\xa4que", "percent-encode", "a raw 8-bit byte"),
        (b"?key=" + b"k" * 8190, "over", "an overlong query string"),
        (b"?key=demo-ec&" + b"&".join(b"p%d=1" % i for i in range(70)), "more than",
         "too many parameters"),
    ]
    for query, word, what in refused:
        headers, j = expect_raw(raw_sign(query), "invalid_field", what)
        check(word in j["error"]["message"], "%s: message %r" % (what, j["error"]["message"]))
    # what the rules allow: escapes in names and values, an empty query,
    # '+' for a space
    for query, want in ((b"?k%65y=demo%2Dec", 200), (b"?key=demo-ec&mode=opaque&digest=sha384", 200),
                        (b"?key=demo+ec", "unknown_key"), (b"?key=demo%2Bec", "unknown_key"),
                        (b"?", "missing_field")):
        got = raw_exchange(raw_sign(query))
        check(got is not None, "%r: no answer" % query)
        if want == 200:
            eq(got[0], 200, "status for %r (%r)" % (query, got[2][:200]))
            F.openssl_verify(got[2], DEMO / "ca.pem", WORK)
        else:
            expect_raw(raw_sign(query), want, repr(query))
    r = D.request("POST", "/v1/sign?key=demo+ec", body=GOOD["mime"].encode(),
                  headers={"Content-Type": "message/rfc822"})
    check("demo ec" in r.json()["error"]["message"], "'+' read as a space: %r" % r.body)
    still_serving()


def key_name_length():
    longest = "k" * 127
    expect(D.post_json("/v1/sign", {"key": longest, "mime": GOOD["mime"]}), "unknown_key")
    for r in (D.post_json("/v1/sign", {"key": longest + "k", "mime": GOOD["mime"]}),
              D.post_json("/v1/decrypt", {"key": longest + "k", "mime": "x"}),
              D.request("POST", "/v1/sign?key=" + longest + "k", body=GOOD["mime"].encode(),
                        headers={"Content-Type": "message/rfc822"})):
        j = expect_error(r, *ERR["invalid_field"])
        check("127" in j["error"]["message"], "message %r" % j["error"]["message"])
    still_serving()


def header_block_checks():
    bad = [
        (b"X-Note: a\x00b\r\n", "NUL", "a NUL inside a header value"),
        (b"X-Note: ab\x00\r\n", "NUL", "a NUL ending a header value"),
        (b"X-Note: \x00ab\r\n", "NUL", "a NUL starting a header value"),
        (b"X-Note: a\x01b\r\n", "control", "a control character in a value"),
        (b"X-Note : ab\r\n", "white space", "a space before the colon"),
        (b"X-Note: a\r\n b\r\n", "folded", "a value folded over two lines"),
        (b"Content-Type: message/rfc822\r\n", "twice", "Content-Type twice"),
        (b"Host: other\r\n", "twice", "Host twice"),
    ]
    for extra, word, what in bad:
        headers, j = expect_raw(raw_sign(b"?key=demo-ec", extra=extra), "invalid_header", what)
        check(word in j["error"]["message"], "%s: message %r" % (what, j["error"]["message"]))
    # a NUL in the value of the header that picks the media type
    expect_raw(raw_sign(b"?key=demo-ec", ctype=b"message/rfc822\x00junk"), "invalid_header",
               "a NUL in Content-Type")
    # the same checks hold for requests without a body
    expect_raw(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\nConnection: close\r\n\r\n",
               "invalid_header", "a NUL in a header of GET /v1/keys")
    # tabs and 8-bit bytes in values, and bare LF line ends, are fine
    got = raw_exchange(raw_sign(b"?key=demo-ec", extra=b"X-Note: a\tb \xc3\xa9\r\n"))
    eq(got and got[0], 200, "a tab and UTF-8 in a header value")
    lf = raw_sign(b"?key=demo-ec").replace(b"\r\n\r\n", b"\n\n", 1)
    head, _, body = lf.partition(b"\n\n")
    got = raw_exchange(head.replace(b"\r\n", b"\n") + b"\n\n" + body)
    eq(got and got[0], 200, "a header block with bare LF line ends")
    still_serving()


def nul_in_target():
    expect_raw(b"POST /v1/sign?key=demo-ec\x00x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Content-Type: message/rfc822\r\nContent-Length: %d\r\n\r\n%s"
               % (len(GOOD["mime"]), GOOD["mime"].encode()), "invalid_field",
               "a raw NUL in the request target")
    still_serving()


def transfer_codings():
    msg = GOOD["mime"].encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(msg), msg)
    for te, code, what in ((b"xchunked", "unsupported_transfer_encoding", "xchunked"),
                           (b"gzip, chunked", "unsupported_transfer_encoding", "gzip, chunked"),
                           (b"identity", "unsupported_transfer_encoding", "identity"),
                           (b"chunked\r\nTransfer-Encoding: chunked", "unsupported_transfer_encoding",
                            "two Transfer-Encoding headers"),
                           (b"chunked\r\nContent-Length: %d" % len(chunked), "invalid_header",
                            "Transfer-Encoding with Content-Length")):
        data = (b"POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: message/rfc822\r\nTransfer-Encoding: %s\r\n\r\n" % te) + chunked
        t0 = time.time()
        headers, j = expect_raw(data, (400, code), what)
        check(time.time() - t0 < 5, "%s: answered after %.1fs" % (what, time.time() - t0))
        eq(headers.get("connection", "").lower(), "close", "%s: Connection" % what)
    data = (b"POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: message/rfc822\r\nTransfer-Encoding: Chunked\r\n\r\n") + chunked
    got = raw_exchange(data)
    eq(got and got[0], 200, "Transfer-Encoding: Chunked (any case) is read")
    still_serving()


def chunk_sizes():
    head = (b"POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: message/rfc822\r\nTransfer-Encoding: chunked\r\n\r\n")
    # over 64 bits: libmicrohttpd's own 413, at once
    got = raw_exchange(head + b"1ffffffffffffffff\r\nabc\r\n0\r\n\r\n")
    check(got is not None, "a chunk size over 64 bits: no answer")
    eq(got[0], 413, "status for a chunk size over 64 bits")
    # 2^64 - 1 fits: libmicrohttpd waits for that many bytes, and no answer
    # can be sent before the body ends; a client that gives up is closed
    # at once, and the daemon goes on
    t0 = time.time()
    got = raw_exchange(head + b"ffffffffffffffff\r\nabc\r\n0\r\n\r\n", timeout=10, shut=True)
    check(got is None and time.time() - t0 < 5,
          "a chunk of 2^64-1 bytes: %r after %.1fs" % (got, time.time() - t0))
    still_serving()


def no_body_announced():
    """A body route with no body announced is answered at once: with
    Expect: 100-continue and bytes behind the header block, libmicrohttpd
    0.9.75 calls the handler before the request's end, where no answer can
    be queued (the connection was closed without one)."""
    for extra, what in ((b"Expect: 100-continue\r\nContent-Length: 0\r\n", "Content-Length: 0"),
                        (b"Expect: 100-continue\r\n", "no Content-Length")):
        data = (b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\n" + extra + b"\r\n" + sign_body(GOOD))
        expect_raw(data, "invalid_json", "%s, Expect: 100-continue, bytes after" % what)
    still_serving()


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
        ("a request path or key name cannot forge a log line", log_lines_not_forged),
        ("raw-mode query: repeated, NUL, empty, bad escapes, raw bytes, too long -> 400",
         strict_query),
        ("key names over 127 bytes -> 400 invalid_field", key_name_length),
        ("NUL, control characters, folding, repeats in headers -> 400 invalid_header",
         header_block_checks),
        ("a raw NUL in the request target -> 400", nul_in_target),
        ("Transfer-Encoding other than chunked -> 400 at once, Connection: close",
         transfer_codings),
        ("chunk sizes of 2^64-1 and over: an answer or a bounded close", chunk_sizes),
        ("no body announced, Expect: 100-continue, bytes after: answered at once",
         no_body_announced),
    ]
    for name, fn in cases:
        S.case(name, fn)
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
