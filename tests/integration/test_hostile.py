#!/usr/bin/env python3
"""Every request gets an answer. A raw-mode sign whose list of re-encoded
parts would not fit a response head is answered in full, with the list cut
in the header and whole in the JSON form, and audited as answered; a header
block that leaves no room for the answer is a JSON 431; discovered key
labels that cannot be key names are not served. Then a few thousand
mutated requests on raw sockets (methods, paths, versions, headers,
Content-Length lies, chunked bodies, JSON and MIME mutations, raw-mode
queries): each complete one gets a complete HTTP response, every non-2xx
from smimed has a JSON error body, libmicrohttpd's own answers are only its
known pages, an incomplete one is answered or closed at once when the
client stops, and the daemon serves afterwards.

SMIMED_HOSTILE_N (default 4000) and SMIMED_HOSTILE_SEED change the run."""

import base64
import concurrent.futures
import json
import os
import random
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("hostile")
DEMO = F.ensure_demo()
WORK = F.workdir("hostile")
CA = DEMO / "ca.pem"
AUDIT = WORK / "audit.log"
N = int(os.environ.get("SMIMED_HOSTILE_N", "4000"))
SEED = int(os.environ.get("SMIMED_HOSTILE_SEED", "1102"))
RAW = {"Content-Type": "message/rfc822"}
D = None


def pool_size():
    """The connection memory the daemon is built with (service/wire.h)."""
    text = (F.REPO / "service" / "wire.h").read_text()
    m = re.search(r"#define WIRE_POOL_SIZE \(\(size_t\)(\d+) << 10\)", text)
    check(m, "WIRE_POOL_SIZE not found in service/wire.h")
    return int(m.group(1)) << 10


POOL = pool_size()


def start():
    global D
    conf = F.write_config(WORK / "smimed.conf", [F.token_config(DEMO)], audit_log=str(AUDIT),
                          max_body_bytes=1 << 20, request_timeout_s=30)
    D = S.daemon(conf, "hostile-daemon", env=F.softhsm_env(DEMO))


def audit_of(rid):
    return [json.loads(line) for line in AUDIT.read_text().splitlines()
            if json.loads(line).get("request_id") == rid]


# ------------------------------------------------------------------ raw HTTP

class Answer:
    def __init__(self, status, headers, body, raw):
        self.status = status
        self.headers = headers  # [(name, value)]
        self.body = body
        self.raw = raw

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def parse_answer(buf, head_request):
    """(Answer, rest) for the first complete final response in buf, or
    (None, buf) when more bytes are needed. 1xx responses are skipped."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None, buf
        lines = buf[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise AssertionError("not an HTTP status line: %r" % lines[0][:100])
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if not sep:
                raise AssertionError("a response header line without a colon: %r" % line[:100])
            headers.append((k.strip().decode("latin-1"), v.strip().decode("latin-1")))
        rest = buf[end + 4:]
        if 100 <= status < 200:
            buf = rest
            continue
        a = Answer(status, headers, b"", buf[:end])
        if head_request or status in (204, 304):
            return a, rest
        length = a.header("Content-Length")
        if length is None or not length.isdigit():
            raise AssertionError("a %d response without Content-Length" % status)
        if len(rest) < int(length):
            return None, buf
        a.body = rest[:int(length)]
        return a, rest[int(length):]


def exchange(data, complete=True, head_request=False, timeout=10.0):
    """Sends data while reading; returns (Answer or None, seconds, how it
    ended). A complete request waits for its answer; after an incomplete
    one the write side is shut, as a client that gives up does."""
    t0 = time.time()
    s = socket.create_connection(("127.0.0.1", D.port), timeout=timeout)
    s.setblocking(False)
    buf, sent, ended = b"", 0, "timeout"
    answer = None
    shut = False
    try:
        while time.time() - t0 < timeout:
            want_w = [s] if sent < len(data) else []
            r, w, _ = select.select([s], want_w, [], 0.5)
            if r:
                try:
                    chunk = s.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    chunk = None
                if chunk is None:
                    ended = "reset"
                    break
                if not chunk:
                    ended = "closed"
                    break
                buf += chunk
                answer, _ = parse_answer(buf, head_request)
                if answer is not None:
                    ended = "answered"
                    break
            if w:
                try:
                    sent += s.send(data[sent:sent + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    sent = len(data)  # the daemon stopped reading; read what it said
                except BlockingIOError:
                    pass
            if sent >= len(data) and not complete and not shut:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                shut = True
    finally:
        s.close()
    return answer, time.time() - t0, ended


MHD_PAGES = {
    b"<html><head><title>Request too big</title></head><body>Your HTTP header was too big for "
    b"the memory constraints of this webserver.</body></html>": "header block over the pool",
    b"<html><head><title>Request malformed</title></head><body>Your HTTP request was "
    b"syntactically incorrect.</body></html>": "malformed request or header line",
    b"<html><head><title>Request malformed</title></head><body>Your HTTP chunked encoding was "
    b"syntactically incorrect.</body></html>": "malformed chunked encoding",
    b"<html><head><title>Request content too large</title></head><body>The chunk size used in "
    b"your HTTP chunked encoded request is too large.</body></html>": "chunk size over 64 bits",
    b"<html><head><title>Request content too large</title></head><body>Your HTTP request has "
    b"too large value for <b>Content-Length</b> header.</body></html>": "Content-Length over 64 bits",
    b"<html><head><title>Request malformed</title></head><body>Your HTTP request has wrong value "
    b"for <b>Content-Length</b> header.</body></html>": "Content-Length not a number",
    b"<html><head><title>Requested HTTP version is not supported</title></head><body>Requested "
    b"HTTP version is not supported.</body></html>": "HTTP version not supported",
    b"<html><head><title>Requested HTTP version is not supported</title></head><body>Requested "
    b"HTTP version is too old and not supported.</body></html>": "HTTP version too old",
    b"<html><head><title>&quot;Host:&quot; header required</title></head><body>In HTTP 1.1, "
    b"requests must include a &quot;Host:&quot; header, and your HTTP 1.1 request lacked such a "
    b"header.</body></html>": "Host missing",
}


def count(counts, key):
    counts[key] = counts.get(key, 0) + 1


MHD_STATUSES = (400, 413, 414, 431, 500, 505)


def fills_pool(data):
    """1 when the request's header block, libmicrohttpd's record of each of
    its lines and query parameters (64 bytes each) and the body read along
    with it come within a few hundred bytes of the connection's memory:
    libmicrohttpd has parsed the block and has no room left to write any
    answer, its own or ours, so it closes."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    block = data[:end + 4]
    target = block.split(b"\r\n", 1)[0]
    records = block.count(b"\n") + target.count(b"&") + target.count(b"=")
    ahead = min(len(data) - end - 4, POOL // 2)
    if re.search(rb"\r?\n[ \t]", block):
        # a folded line is copied out of the read buffer, which then keeps
        # its whole first half of the pool
        return 2 * end + 64 * records > POOL // 2 - 1024
    return end + 64 * records + ahead > POOL - 1024


def judge(a, head_request, counts):
    """An answer is smimed's (JSON error for every non-2xx) or one of
    libmicrohttpd's own pages; returns None when fine, else what is wrong."""
    if a.status < 300:
        count(counts, "2xx")
        return None
    ctype = (a.header("Content-Type") or "").split(";")[0].strip().lower()
    if head_request:
        # no body to look at: smimed's say JSON, libmicrohttpd's nothing
        if ctype == "application/json" or (ctype == "" and a.status in MHD_STATUSES):
            count(counts, "%d to HEAD" % a.status)
            return None
        return "a %d answer to HEAD with Content-Type %r" % (a.status, ctype)
    if ctype == "application/json":
        try:
            j = json.loads(a.body)
            code, message = j["error"]["code"], j["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "a %d JSON answer without an error object: %r" % (a.status, a.body[:200])
        if not isinstance(code, str) or not re.match(r"^[a-z][a-z0-9_]*$", code) or \
                not isinstance(message, str) or not message:
            return "a %d error body with a bad code or message: %r" % (a.status, a.body[:200])
        key = "%d %s" % (a.status, code)
        counts[key] = counts.get(key, 0) + 1
        return None
    if a.body in MHD_PAGES:
        count(counts, "%d libmicrohttpd: %s" % (a.status, MHD_PAGES[a.body]))
        return None
    # libmicrohttpd 0.9.75 writes the head of the answers it decides on
    # Content-Length (parse_connection_headers) twice: the second copy and
    # the start of its page come as the body
    doubled = a.raw + b"\r\n\r\n"
    if a.body.startswith(doubled) and any(
            page.startswith(a.body[len(doubled):]) for page in MHD_PAGES):
        count(counts, "%d libmicrohttpd: Content-Length refused, head written twice" % a.status)
        return None
    return "a %d answer that is neither a JSON error nor libmicrohttpd's: %r %r" % (
        a.status, a.raw[:200], a.body[:200])


# ------------------------------------------------------------------ re-encoded parts

def multipart(nparts, eight_bit=True):
    text = "Gr\u00fc\u00dfe, part {i}\r\n" if eight_bit else "plain part {i}\r\n"
    parts = "".join("--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: 8bit\r\n\r\n" + text.format(i=i)
                    for i in range(nparts))
    return ("Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + "--b--\r\n").encode()


REENC = re.compile(r"^(\d+) parts, first (\d+):(?: (.*))?$")


def many_reencoded():
    """1,500 re-encoded parts: the list would be some 30 KiB of header."""
    msg = multipart(1500)
    data = (b"POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: message/rfc822\r\nContent-Length: %d\r\n\r\n" % len(msg)) + msg
    a, secs, ended = exchange(data, timeout=60)
    check(a is not None, "no answer (%s after %.1fs): %s" % (ended, secs, D.tail(5)))
    eq(a.status, 200, "status (%r)" % a.body[:200])
    value = a.header("X-Smimed-Reencoded")
    check(value is not None and len(value) <= 4096, "X-Smimed-Reencoded of %s bytes" % (
        value and len(value)))
    m = REENC.match(value)
    check(m, "X-Smimed-Reencoded is not 'N parts, first K: ...': %r" % value[:100])
    eq(int(m.group(1)), 1500, "count in X-Smimed-Reencoded")
    listed = m.group(3).split(", ")
    eq(len(listed), int(m.group(2)), "parts listed against the K given")
    check(len(listed) > 100, "only %d parts listed in 4 KiB" % len(listed))
    F.openssl_verify(a.body, CA, WORK)
    recs = F.wait_for(lambda: audit_of(a.header("X-Request-Id")), lambda r: len(r) >= 2)
    # the key process's record of the signature, then the answer's
    eq([(r["stage"], r["result"]) for r in recs], [("key", None), ("finish", 200)],
       "audit records of the answered request")
    # the JSON form lists them all, and the header's are its first ones
    r = D.sign(key="demo-ec", mime_base64=base64.b64encode(msg).decode(), timeout=60)
    eq(r.status, 200, "JSON status")
    full = r.json()["reencoded"]
    eq(len(full), 1500, "parts in the JSON form's reencoded")
    eq(full[:len(listed)], listed, "the header's parts are the JSON form's first")
    # a short list keeps its form
    r = D.request("POST", "/v1/sign?key=demo-ec", body=multipart(3), headers=RAW)
    eq(r.header("X-Smimed-Reencoded"), "1 quoted-printable, 2 quoted-printable, 3 quoted-printable",
       "a short list")
    r = D.request("POST", "/v1/sign?key=demo-ec", body=multipart(3, eight_bit=False), headers=RAW)
    eq(r.header("X-Smimed-Reencoded"), "1 quoted-printable, 2 quoted-printable, 3 quoted-printable",
       "8bit declared, 7-bit content")
    r = D.request("POST", "/v1/sign?key=demo-ec",
                  body=b"Content-Type: text/plain\r\n\r\nascii\r\n", headers=RAW)
    eq(r.header("X-Smimed-Reencoded"), "none", "nothing re-encoded")


def part_count_bound():
    """Every part costs GMime about 2 KiB, so parts are counted before GMime
    parses: at most 2,000 lines starting with "--" and one per KiB of the
    entity (100,000 empty parts in 3.8 MB took 218 MB before). Just within
    the bound is signed, past it is a 400 at once, whatever the boundary."""
    def parts(n, boundary="b", pad=0):
        body = "".join("--%s\r\nContent-Type: text/plain\r\n\r\nx\r\n" % boundary
                       for _ in range(n - 1))
        if pad:
            body += "--%s\r\nContent-Type: text/plain\r\n\r\n%s" % (
                boundary, ("p" * 74 + "\r\n") * (pad // 76))
        head = "Content-Type: multipart/mixed; boundary=\"%s\"\r\n" % boundary
        return (head + "\r\n" + body + "--%s--\r\n" % boundary).encode()

    for boundary in ("b", "-=-"):
        # n delimiter lines (n - 1 parts and the close delimiter)
        lo = parts(2000, boundary)
        r = D.request("POST", "/v1/sign?key=demo-ec", body=lo, headers=RAW, timeout=60)
        eq(r.status, 200, "2,000 delimiter lines, boundary %r (%r)" % (boundary, r.body[:200]))
        F.openssl_verify(r.body, CA, WORK)
        hi = parts(2000 + len(lo) // 1024 + 40, boundary)
        limit = 2000 + len(hi) // 1024
        t0 = time.monotonic()
        r = D.request("POST", "/v1/sign?key=demo-ec", body=hi, headers=RAW, timeout=60)
        j = expect_error(r, 400, "invalid_mime")
        check("more than %d lines" % limit in j["error"]["message"], "message %r" % j["error"]["message"])
        check(time.monotonic() - t0 < 5, "refused after %.1fs" % (time.monotonic() - t0))
    # a larger body earns more: 2,500 in one padded to 900 KiB (the suite's
    # max_body_bytes is 1 MiB)
    big = parts(2500, pad=900 << 10)
    r = D.request("POST", "/v1/sign?key=demo-ec", body=big, headers=RAW, timeout=120)
    eq(r.status, 200, "2,500 parts in %d bytes (%r)" % (len(big), r.body[:200]))
    r = D.request("POST", "/v1/sign?key=demo-ec", body=parts(20000), headers=RAW, timeout=60)
    expect_error(r, 400, "invalid_mime")


def nested_repeated_fields():
    """Two Content-Type or Content-Transfer-Encoding fields are refused in
    a nested part as at the top (readers differ on which counts); they were
    signed before."""
    cases = (
        ("Content-Type", "Content-Type: text/plain\r\nContent-Type: text/html\r\n"),
        ("Content-Transfer-Encoding", "Content-Type: text/plain\r\n"
         "Content-Transfer-Encoding: 8bit\r\nContent-Transfer-Encoding: base64\r\n"),
    )
    for field, head in cases:
        for depth in (1, 2):
            part = head + "\r\nx\r\n"
            for i in range(depth):
                part = ("Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n%s--b%d--\r\n"
                        % (i, i, part, i))
            r = D.request("POST", "/v1/sign?key=demo-ec", body=part.encode(), headers=RAW)
            j = expect_error(r, 400, "invalid_mime")
            check("repeats the %s field" % field in j["error"]["message"],
                  "depth %d: message %r" % (depth, j["error"]["message"]))
    ok = "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n"
    r = D.request("POST", "/v1/sign?key=demo-ec", body=ok.encode(), headers=RAW)
    eq(r.status, 200, "one field each (%r)" % r.body[:200])


def reused_boundary():
    """A multipart inside one with the same boundary is refused (RFC 2046
    5.1.1: a delimiter must not appear inside an encapsulated part): where
    it ends depends on the reader. The long fuzz run found two walks of one
    such text that disagreed; a different inner boundary is signed."""
    def nested(inner):
        return ("Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\n"
                "Content-Type: multipart/mixed; boundary=%s\r\n\r\n--%s\r\n"
                "Content-Type: text/plain\r\n\r\nx\r\n--%s--\r\n--m--\r\n"
                % (inner, inner, inner)).encode()
    r = D.request("POST", "/v1/sign?key=demo-ec", body=nested("m"), headers=RAW)
    j = expect_error(r, 400, "invalid_mime")
    check("reuses the boundary" in j["error"]["message"], "message %r" % j["error"]["message"])
    r = D.request("POST", "/v1/sign?key=demo-ec", body=nested("n"), headers=RAW)
    eq(r.status, 200, "another boundary inside (%r)" % r.body[:200])
    F.openssl_verify(r.body, CA, WORK)
    finding = (F.REPO / "tests/fuzz/corpus/entity/finding-reused-boundary").read_bytes()
    r = D.request("POST", "/v1/sign?key=demo-ec", body=finding, headers=RAW)
    expect_error(r, 400, "invalid_mime")


def room_for_the_answer():
    """A header block that leaves too little of the connection's memory
    for the answer is refused at once with a JSON 431; one just small
    enough is served, even with a 4 KiB X-Smimed-Reencoded."""
    msg = multipart(400)

    def request(pad):
        return (b"POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"X-Pad: " + b"p" * pad + b"\r\n"
                b"Content-Type: message/rfc822\r\nContent-Length: %d\r\n\r\n" % len(msg)) + msg
    big = POOL - POOL // 8 - 5 * 1024 + 512
    a, secs, ended = exchange(request(big), timeout=60)
    check(a is not None, "a %d-byte header: no answer (%s)" % (big, ended))
    r = F.Response(a.status, "", a.headers, a.body)
    expect_error(r, 431, "headers_too_large")
    eq(audit_of(a.header("X-Request-Id")), [], "audit records of a refused request")
    small = POOL - POOL // 8 - 5 * 1024 - 1536
    a, secs, ended = exchange(request(small), timeout=60)
    check(a is not None, "a %d-byte header: no answer (%s)" % (small, ended))
    eq(a.status, 200, "a %d-byte header block (%r)" % (small, a.body[:200]))
    check(len(a.header("X-Smimed-Reencoded")) > 3500, "a long X-Smimed-Reencoded")
    F.openssl_verify(a.body, CA, WORK)
    # many small headers take memory of their own
    many = b"".join(b"X-N%d: v\r\n" % i for i in range(POOL // 64 * 5 // 8))
    a, secs, ended = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    check(a is not None, "many headers: no answer (%s)" % ended)
    expect_error(F.Response(a.status, "", a.headers, a.body), 431, "headers_too_large")
    # over the whole pool: libmicrohttpd's own 431
    a, secs, ended = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * POOL +
                              b"\r\n\r\n")
    check(a is not None and a.status == 431 and a.body in MHD_PAGES,
          "a header over the pool: %r" % (a and a.raw[:200]))
    r = D.request("GET", "/healthz")
    eq(r.status, 200, "the daemon still serves")


def discovered_labels():
    """Discovery serves a key under its CKA_LABEL: a label longer than a key
    name may be, or with a control character, is not served, and the log
    says so."""
    d = F.copy_token_dir(DEMO, WORK / "labels")
    long_label = "L" * 130
    F.add_token_key(d, long_label, "c1", "EC:prime256v1", "long@demo.smimed.test",
                    "digitalSignature,keyAgreement", cn="long label")
    F.add_token_key(d, "bad\nlabel", "c2", "EC:prime256v1", "nl@demo.smimed.test",
                    "digitalSignature,keyAgreement", cn="newline label")
    conf = F.write_config(d / "labels.conf", [F.token_config(d)])
    dl = S.daemon(conf, "labels-daemon", env=F.softhsm_env(d))
    try:
        names = sorted(k["name"] for k in dl.request("GET", "/v1/keys").json()["keys"])
        eq(names, ["demo-ec", "demo-rsa"], "keys served")
        for key in (long_label, "bad\nlabel"):
            r = dl.post_json("/v1/sign", {"key": key, "mime": "Content-Type: text/plain\r\n\r\nx\r\n"})
            check(r.status in (400, 404), "sign with %r: %r" % (key[:20], r))
        log = dl.stderr_text()
        check(re.search(r"token demo: 2 discovered keys are not served", log),
              "no warning about the labels: %s" % dl.tail(8))
        check("bad\nlabel" not in log, "a label's newline reached the log")
    finally:
        rc = dl.stop()
        F.check_exit(dl, rc, "labels daemon exit")


def keep_alive():
    """Requests without a body are answered on the last call, as ones with a
    body are, so a keep-alive connection carries them (an answer queued on
    the header block makes libmicrohttpd 0.9.75 close the connection); one
    that sends a body to a route without one is answered without reading
    it, and closed."""
    body = json.dumps({"key": "demo-ec", "mime": MSG}).encode()
    reqs = [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
            b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"]
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    try:
        for n, req in enumerate(reqs):
            s.sendall(req)
            buf = b""
            while True:
                a, rest = parse_answer(buf, req.startswith(b"HEAD"))
                if a is not None:
                    break
                chunk = s.recv(65536)
                check(chunk, "request %d on the connection: closed" % n)
                buf += chunk
            eq(a.status, 200, "request %d on one connection" % n)
            check((a.header("Connection") or "").lower() != "close",
                  "request %d: Connection: close" % n)
    finally:
        s.close()
    a, secs, ended = exchange(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    check(a is not None and a.status == 200, "GET with a body: %r" % (a and a.raw[:100]))
    eq((a.header("Connection") or "").lower(), "close", "GET with a body: Connection")


def trickled():
    """A request that arrives a byte at a time, header block and body, is
    read and answered like any other (the header checks read
    libmicrohttpd's buffer as it was filled, piece by piece)."""
    msg = multipart(2)
    data = (b"POST /v1/sign?key=demo-ec&mode=opaque HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"X-Note: a\tb\r\nContent-Type: message/rfc822\r\nContent-Length: %d\r\n\r\n"
            % len(msg)) + msg
    for bad in (False, True):
        sent = data.replace(b"X-Note: a", b"X-Note: a\x00") if bad else data
        s = socket.create_connection(("127.0.0.1", D.port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(len(sent)):
                try:
                    s.send(sent[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break  # answered on the header block: the body is not read
                time.sleep(0.001)
            buf = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                buf += chunk
        finally:
            s.close()
        a, _ = parse_answer(buf, False)
        check(a is not None, "a trickled request: no answer")
        if bad:
            expect_error(F.Response(a.status, "", a.headers, a.body), 400, "invalid_header")
        else:
            eq(a.status, 200, "a trickled request (%r)" % a.body[:200])
            F.openssl_verify(a.body, CA, WORK, inform="SMIME")


# ------------------------------------------------------------------ mutation fuzz

MSG = "Content-Type: text/plain; charset=utf-8\r\n\r\nHallo, hostile world.\r\n"
ROUTES = ["/v1/sign", "/v1/encrypt", "/v1/decrypt", "/v1/verify", "/v1/keys", "/healthz",
          "/readyz", "/metrics"]


class Base:
    """Real request bodies the mutations start from."""

    def __init__(self):
        r = D.sign(key="demo-ec", mime=MSG)
        eq(r.status, 200, "sign for the corpus")
        self.signed = r.json()["mime"]
        r = D.post_json("/v1/encrypt", {"recipients": ["demo-ec"], "mime": MSG})
        eq(r.status, 200, "encrypt for the corpus")
        self.envelope = r.json()["mime"]
        self.json = {
            "/v1/sign": {"key": "demo-ec", "mime": MSG},
            "/v1/encrypt": {"recipients": ["demo-ec", "demo-rsa"], "mime": MSG},
            "/v1/decrypt": {"mime": self.envelope, "verify": True},
            "/v1/verify": {"mime": self.signed},
        }
        self.raw = {
            "/v1/sign": ("key=demo-ec&mode=opaque", MSG),
            "/v1/encrypt": ("recipients=demo-ec", MSG),
            "/v1/decrypt": ("key=demo-ec", self.envelope),
            "/v1/verify": ("", self.signed),
        }


def mutate_bytes(rng, b, n=None):
    b = bytearray(b)
    for _ in range(n or rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 2 and b:
            del b[pos:pos + rng.randint(1, 32)]
        elif op == 3:
            b[pos:pos] = rng.choice([b"\x00", b"\r\n", b"\n", b"\"", b"\\", b"\xff", b"%", b"--",
                                     b"\r\n\r\n", b"=\r\n", b"\x80\x80"])
        elif op == 4 and len(b) > 2:
            del b[rng.randrange(len(b)):]
        else:
            piece = bytes(b[pos:pos + rng.randint(1, 64)])
            b[pos:pos] = piece * rng.randint(1, 20)
    return bytes(b)


def mutate_json(rng, obj):
    obj = dict(obj)
    op = rng.randrange(9)
    if op == 0:
        obj[rng.choice(list(obj))] = rng.choice([None, 1, 1.5e308, True, [], {}, "", "x" * 5000,
                                                 [1, "a"], {"a": []}, "\u0000", "\ud7ff"])
    elif op == 1:
        obj[rng.choice(["mode", "digest", "cipher", "rsa_padding", "key", "trust", "crls",
                        "verify", "allow_unfit_recipients", "encrypt_for", "items",
                        "mime_base64", "bogus"])] = rng.choice(
            ["opaque", "sha512", "aes-128-gcm", "oaep", "demo-rsa", [], True, "x", 7, None,
             ["demo-rsa"], base64.b64encode(MSG.encode()).decode(), "!!!", {"k": 1}])
    elif op == 2 and "mime" in obj:
        obj["mime"] = mutate_bytes(rng, obj["mime"].encode()).decode("utf-8", "replace")
    elif op == 3 and "mime" in obj:
        obj["mime_base64"] = base64.b64encode(mutate_bytes(rng, obj.pop("mime").encode())).decode()
    elif op == 4:
        obj.pop(rng.choice(list(obj)))
    text = json.dumps(obj)
    if op == 5:
        text = "[" * rng.randint(1, 3000) + "]" * rng.randint(0, 3000)
    elif op == 6:
        text = text[:-1] + ', "key": "demo-rsa"}'
    elif op == 7:
        return mutate_bytes(rng, text.encode())
    elif op == 8:
        text = text.replace("\"", "'", rng.randint(1, 4))
    return text.encode("utf-8", "surrogatepass")


def mutate_mime(rng, text):
    b = text.encode() if isinstance(text, str) else text
    op = rng.randrange(5)
    if op == 0:
        return mutate_bytes(rng, b)
    if op == 1:
        n = rng.randint(1, 300)
        return multipart(n, eight_bit=rng.random() < 0.5)
    if op == 2:
        return b"Content-Type: multipart/mixed; boundary=" + b"b" * rng.randint(0, 200) + \
            b"\r\n\r\n" + b"--b\r\n" * rng.randint(0, 100)
    if op == 3:
        return b"Content-Type: text/plain\r\n\r\n" + bytes(rng.randrange(256)
                                                           for _ in range(rng.randint(0, 4000)))
    return b"X: " + b"y" * rng.randint(900, 5000) + b"\r\n\r\nbody\r\n"


def mutate_query(rng, q):
    ops = [
        lambda: q + "&" + q.split("&")[0] if q else "key=demo-ec&key=demo-rsa",
        lambda: q + "%00",
        lambda: q + "&",
        lambda: "&" + q,
        lambda: q.replace("=", "=%", 1),
        lambda: q.replace("=", "=%zz", 1),
        lambda: q.replace("-", "+"),
        lambda: q + "&=x",
        lambda: q + "&bogus=1",
        lambda: q + "&mode=" + rng.choice(["opaque", "detached", "sideways", ""]),
        lambda: q + "&digest=" + rng.choice(["sha384", "md5", "%73ha512"]),
        lambda: "key=" + "k" * rng.randint(100, 9000),
        lambda: "&".join("p%d=%d" % (i, i) for i in range(rng.randint(1, 100))),
        lambda: q.replace("demo-ec", "demo%2Dec"),
        lambda: "".join(rng.choice("ab=&%+01#\"") for _ in range(rng.randint(1, 40))),
        lambda: q + "&verify=" + rng.choice(["true", "false", "yes"]),
        lambda: q + "&encrypt_for=demo-rsa,demo-ec",
    ]
    return rng.choice(ops)()


def build(rng, base):
    """One mutated request: (bytes, complete, head_request)."""
    route = rng.choice(ROUTES)
    method = "POST" if route.startswith("/v1/") and route != "/v1/keys" else "GET"
    raw_mode = method == "POST" and rng.random() < 0.45
    query = ""
    if method == "POST":
        if raw_mode:
            query, mime = base.raw[route]
            body = mime.encode()
            ctype = "message/rfc822"
        else:
            body = json.dumps(base.json[route]).encode()
            ctype = "application/json"
    else:
        body, ctype = b"", None
    version = "HTTP/1.1"
    headers = [("Host", "127.0.0.1")]
    if ctype:
        headers.append(("Content-Type", ctype))
    if rng.random() < 0.5:
        headers.append(("Connection", "close"))
    framing = "length" if method == "POST" else "none"
    complete = True
    chunk_style = None
    path = route
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        if op == 0:
            method = rng.choice(["GET", "PUT", "DELETE", "OPTIONS", "PATCH", "post", "HEAD",
                                 "TRACE", "CONNECT", "X" * rng.randint(1, 40), "P\x00ST"])
        elif op == 1:
            path = rng.choice([
                "/", "/v1", "/v1/", "/v1/sign/", "//v1/sign", "/v1/%73ign", "/V1/SIGN",
                "/v1/sign;x", "/v1/sign%00", "/v1/sign\x00x", "/%ff%fe", "/" + "a" * rng.randint(
                    100, 6000), "*", "http://127.0.0.1/v1/sign", "/v1/sign/../keys",
                "/healthz?x=1", "/metrics?" + "m" * 300, "/v1/keys?%00"])
        elif op == 2 and raw_mode:
            query = mutate_query(rng, query)
        elif op == 3:
            version = rng.choice(["HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9",
                                  "HTTP/1.x", "http/1.1", "HTTP/1.1 ", "HTTP/11"])
        elif op == 4:
            # a header with hostile bytes in its value
            headers.insert(rng.randrange(len(headers) + 1), (
                rng.choice(["X-Note", "Authorization", "Content-Type", "Accept", "Cookie",
                            "Expect", "User-Agent"]),
                mutate_bytes(rng, b"Bearer some-value", 3).decode("latin-1")))
        elif op == 5:
            headers.append(rng.choice([("X-Note ", "space before colon"), ("X-Fold", "a\r\n b"),
                                       ("No colon here", None), ("", "empty name"),
                                       ("X-\x00Nul", "in the name"), ("X-Note", "\x00"),
                                       ("Expect", "100-continue"),
                                       ("Connection", "keep-alive"),
                                       ("Content-Type", "application/json"),
                                       ("Host", "second.example")]))
        elif op == 6:
            headers.append(("X-Pad", "p" * rng.randint(1000, POOL + 8000)))
        elif op == 7:
            headers += [("X-N%d" % i, "v") for i in range(rng.randint(10, 500))]
        elif op == 8 and framing == "length":
            # Content-Length lies and oddities
            framing = rng.choice(["short", "long", "nan", "negative", "huge", "u64", "twice",
                                  "zero", "spaces"])
        elif op == 9 and method == "POST":
            framing = "chunked"
            chunk_style = rng.choice(["ok", "ok", "ext", "trailer", "xchunked", "gzip",
                                      "with-length", "ffff", "17digits", "badhex", "no-end",
                                      "short-chunk", "many"])
        elif op == 10 and method == "POST" and not raw_mode:
            body = mutate_json(rng, base.json.get(route, {}))
        elif op == 11 and method == "POST" and raw_mode:
            body = mutate_mime(rng, body)
        elif op == 12 and method == "POST":
            ctype = rng.choice(["text/plain", "message/rfc822", "application/json",
                                "application/json; charset=utf-8", "message/rfc822;", "",
                                "application/json\x01", "multipart/form-data; boundary=x"])
            headers = [h for h in headers if h[0] != "Content-Type"] + [("Content-Type", ctype)]
        elif op == 13:
            headers = [h for h in headers if h[0] not in ("Host", "Content-Type")]
        elif op == 14 and method == "POST":
            body = mutate_bytes(rng, body)
        elif op == 15:
            headers.append(("Authorization", rng.choice(["Bearer", "Bearer x", "Basic eA==",
                                                         "Bearer " + "t" * 3000])))
    target = path + ("?" + query if query else "")
    head_request = method == "HEAD"
    lines = ["%s %s %s" % (method, target, version)]
    for k, v in headers:
        lines.append(k if v is None else "%s: %s" % (k, v))
    if framing in ("length", "short", "long", "twice", "zero", "spaces"):
        n = {"length": len(body), "short": max(0, len(body) - rng.randint(1, 20)),
             "long": len(body) + rng.randint(1, 100), "twice": len(body),
             "zero": 0, "spaces": len(body)}[framing]
        if framing == "spaces":
            lines.append("Content-Length:   %d  " % n)
        else:
            lines.append("Content-Length: %d" % n)
        if framing == "twice":
            lines.append("Content-Length: %d" % (n + rng.choice([0, 1])))
        if framing == "long":
            complete = False
    elif framing == "nan":
        lines.append("Content-Length: %s" % rng.choice(["abc", "12abc", "0x10", "1e3", ""]))
    elif framing == "negative":
        lines.append("Content-Length: -%d" % len(body))
    elif framing == "huge":
        lines.append("Content-Length: %d" % rng.choice([10 ** 30, 2 ** 64]))
    elif framing == "u64":
        lines.append("Content-Length: %d" % rng.choice([2 ** 63, 2 ** 64 - 1, 2 << 20]))
    elif framing == "chunked":
        te = {"xchunked": "xchunked", "gzip": "gzip, chunked"}.get(chunk_style, "chunked")
        lines.append("Transfer-Encoding: %s" % te)
        if chunk_style == "with-length":
            lines.append("Content-Length: %d" % len(body))
        enc = b""
        pos = 0
        while pos < len(body):
            n = rng.randint(1, 64 if chunk_style == "many" else 4096)
            piece = body[pos:pos + n]
            size = b"%x" % len(piece)
            if chunk_style == "ext":
                size += b";name=value"
            if chunk_style == "badhex" and rng.random() < 0.3:
                size = b"zz"
            if chunk_style == "short-chunk" and rng.random() < 0.3:
                size = b"%x" % (len(piece) + 5)
            enc += size + b"\r\n" + piece + b"\r\n"
            pos += n
        if chunk_style == "ffff":
            enc = b"ffffffffffffffff\r\n" + enc
            complete = False
        elif chunk_style == "17digits":
            enc = b"1ffffffffffffffff\r\n" + enc
        if chunk_style == "no-end":
            complete = False
        elif chunk_style == "trailer":
            enc += b"0\r\nX-Trailer: t\r\n\r\n"
        else:
            enc += b"0\r\n\r\n"
        if chunk_style == "short-chunk":
            complete = False  # its framing is the client's guess
        body = enc
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    # what the test cannot tell ends where: garbage request lines and
    # bodies sent with framing libmicrohttpd may read otherwise
    if framing in ("negative", "nan") or "\x00" in method or "\n" in target:
        complete = False
    return data, complete, head_request


def mutation_fuzz():
    """The mutated requests, made from one seed, sent four at a time."""
    rng = random.Random(SEED)
    base = Base()
    reqs = [build(rng, base) for _ in range(N)]
    counts = {}
    silent = []
    bad = []
    slow = [0]
    lock = threading.Lock()

    def one(i):
        data, complete, head_request = reqs[i]
        a, secs, ended = exchange(data, complete, head_request, timeout=15 if complete else 8)
        with lock:
            if a is None:
                if complete and fills_pool(data):
                    count(counts, "closed by libmicrohttpd: the header block fills its memory")
                elif complete:
                    silent.append((i, ended, secs, data[:160]))
                else:
                    count(counts, "incomplete, " + ended)
                    if ended == "timeout":
                        bad.append((i, "an incomplete request neither answered nor closed",
                                    data[:160]))
            else:
                problem = judge(a, head_request, counts)
                if problem:
                    bad.append((i, problem, data[:160]))
            if secs > 5:
                slow[0] += 1

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(N)))
    took = time.time() - t0
    for k in sorted(counts):
        print("# %6d  %s" % (counts[k], k))
    print("# %d requests (seed %d), 4 at a time, in %.1fs, %d over 5s" % (N, SEED, took, slow[0]))
    for i, ended, secs, head in sorted(silent)[:10]:
        print("# no answer to request %d (%s after %.1fs): %r" % (i, ended, secs, head))
    for i, problem, head in sorted(bad)[:10]:
        print("# request %d: %s: %r" % (i, problem, head))
    check(not silent, "%d complete requests got no answer" % len(silent))
    check(not bad, "%d bad answers" % len(bad))
    check(D.running(), "the daemon died: %s" % D.tail(10))
    r = D.sign(key="demo-rsa", mime=MSG)
    eq(r.status, 200, "a sign request after the fuzz")
    F.openssl_verify(r.json()["mime"].encode(), CA, WORK)


def main():
    if not S.case("daemon starts", start):
        S.finish()
    S.case("1,500 re-encoded parts: 200, the header list cut to 4 KiB, the JSON form whole, "
           "audited once", many_reencoded)
    S.case("a header block that leaves no room for the answer: JSON 431", room_for_the_answer)
    S.case("parts counted before GMime: 2,000 and one per KiB, then 400", part_count_bound)
    S.case("a nested part with two Content-Type or Content-Transfer-Encoding fields: 400",
           nested_repeated_fields)
    S.case("a multipart inside one with the same boundary: 400", reused_boundary)
    S.case("keep-alive carries requests without a body; a GET with one is answered", keep_alive)
    S.case("a request sent a byte at a time is answered, its NUL seen", trickled)
    S.case("%d mutated requests: each answered (JSON errors) or closed at once when incomplete"
           % N, mutation_fuzz)
    S.case("discovered labels that cannot be key names are not served, with a warning",
           discovered_labels)
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
