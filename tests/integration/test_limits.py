#!/usr/bin/env python3
"""Limits against greedy and slow clients: the budget of request body bytes
in flight (503 server_busy, decided on the headers), the deadline for a
complete request header (keep-alive connections idle between requests
excepted), and connection admission under a slow-header attack from many
addresses."""

import json
import re
import resource
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("limits")
DEMO = F.ensure_demo()
WORK = F.workdir("limits")
LIM = F.copy_token_dir(DEMO, WORK / "demo")
BASE = json.loads((LIM / "smimed.conf").read_text())
CA = LIM / "ca.pem"
LIMITED = (LIM / "api-token-limited").read_text().splitlines()[0]
MIB = 1 << 20


def config(name, **options):
    return F.config_variant(BASE, LIM / ("%s.conf" % name), **options)


def message(size, tag):
    """A raw-mode message of exactly size bytes."""
    head = ("Content-Type: text/plain\r\n\r\nmessage %s\r\n" % tag).encode()
    line = b"a" * 70 + b"\r\n"
    n, rest = divmod(size - len(head), len(line))
    check(rest >= 2 or rest == 0, "message size %d" % size)
    tail = b"b" * (rest - 2) + b"\r\n" if rest else b""
    body = head + line * n + tail
    eq(len(body), size, "message size")
    return body


def connect(d, source=None, timeout=30):
    return F.connect_from(d, source, timeout)


def head(d, method, path, length=None, ctype="message/rfc822", chunked=False,
         auth=True, extra=b""):
    h = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), path.encode())
    if auth:
        h += d.auth_line()
    if ctype is not None:
        h += b"Content-Type: %s\r\n" % ctype.encode()
    if length is not None:
        h += b"Content-Length: %d\r\n" % length
    if chunked:
        h += b"Transfer-Encoding: chunked\r\n"
    return h + extra + b"\r\n"


def read_response(s):
    """One HTTP response from s (Content-Length or until close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError("connection closed before a response: %r" % data[:200])
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
    check(m, "bad status line %r" % lines[0])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    r = F.Response(int(m.group(1)), m.group(2), headers, b"")
    length = r.header("Content-Length")
    if length is None:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        while len(body) < int(length):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        body = body[:int(length)]
    r.body = body
    return r


def headers_only(d, path, length, **kw):
    """Sends a request's headers and no body; returns the answer."""
    s = connect(d, timeout=15)
    try:
        s.sendall(head(d, "POST", path, length, **kw))
        return read_response(s)
    finally:
        s.close()


def sign_raw(d, body, key="demo-ec"):
    s = connect(d, timeout=60)
    try:
        s.sendall(head(d, "POST", "/v1/sign?key=%s" % key, len(body)) + body)
        return read_response(s)
    finally:
        s.close()


def verified(r, tag, what):
    eq(r.status, 200, "%s (%r)" % (what, r.body[:200]))
    w = F.workdir("lim")
    content = F.openssl_verify(r.body, CA, w)
    check(("message %s" % tag).encode() in content, "%s: signed another message" % what)


def metric(d, name):
    r = d.request("GET", "/metrics", timeout=30)
    eq(r.status, 200, "/metrics")
    m = re.search(r"^%s (\d+)$" % re.escape(name), r.body.decode(), re.M)
    check(m, "no %s in /metrics" % name)
    return int(m.group(1))


def wait_metric(d, name, want, timeout=20):
    deadline = time.time() + timeout
    while True:
        got = metric(d, name)
        if got == want:
            return
        check(time.time() < deadline, "%s is %d, want %d" % (name, got, want))
        time.sleep(0.05)


# ------------------------------------------------------------ body budget

BUDGET = None


def budget_start():
    global BUDGET
    BUDGET = S.daemon(config("budget", max_body_bytes=MIB,
                             max_inflight_body_bytes=3 * MIB // 2),
                      "budget-daemon", env=F.softhsm_env(LIM))
    eq(metric(BUDGET, "smimed_body_bytes_limit"), 3 * MIB // 2, "the budget in /metrics")
    eq(metric(BUDGET, "smimed_body_bytes_in_flight"), 0, "bytes in flight at rest")


def budget_held():
    """A body still arriving holds its Content-Length; a second request
    that would pass the budget gets 503 server_busy on its headers, one that
    fits is served meanwhile, and the refused one succeeds once the first
    is done."""
    d = BUDGET
    busy = metric(d, "smimed_server_busy_total")
    big = message(1000000, "held")
    second = message(800000, "second")
    s1 = connect(d, timeout=60)
    try:
        s1.sendall(head(d, "POST", "/v1/sign?key=demo-ec", len(big)) + big[:len(big) // 2])
        wait_metric(d, "smimed_body_bytes_in_flight", 1000000)
        r = headers_only(d, "/v1/sign?key=demo-ec", len(second))
        expect_error(r, 503, "server_busy")
        check((r.header("Retry-After") or "").isdigit(), "Retry-After: %r" % r.header("Retry-After"))
        eq(metric(d, "smimed_server_busy_total"), busy + 1, "smimed_server_busy_total")
        # what the contract checks first still comes first
        for what, r, status, code in (
                ("no credentials", headers_only(d, "/v1/sign?key=demo-ec", len(second), auth=False),
                 401, "unauthorized"),
                ("unknown path", headers_only(d, "/v1/nothing", len(second)), 404, "not_found"),
                ("wrong method", headers_only(d, "/v1/keys", len(second)), 405, "method_not_allowed"),
                ("too large", headers_only(d, "/v1/sign?key=demo-ec", 2 * MIB), 413, "body_too_large"),
                ("media type", headers_only(d, "/v1/sign?key=demo-ec", len(second), ctype="text/plain"),
                 415, "unsupported_media_type")):
            expect_error(r, status, code)
        # ... and the checks of the body come after
        s = connect(d, timeout=15)
        s.sendall(head(d, "POST", "/v1/sign?key=demo-rsa", len(second), auth=False,
                       extra=b"Authorization: Bearer %s\r\n" % LIMITED.encode()))
        expect_error(read_response(s), 503, "server_busy")
        s.close()
        r = sign_raw(d, message(2000, "small"))
        verified(r, "small", "a request that fits, while the first is held")
        # the small one's bytes are given back once its answer is sent
        wait_metric(d, "smimed_body_bytes_in_flight", 1000000)  # the first's, still held
        s1.sendall(big[len(big) // 2:])
        verified(read_response(s1), "held", "the held request")
    finally:
        s1.close()
    wait_metric(d, "smimed_body_bytes_in_flight", 0)
    verified(sign_raw(d, second), "second", "the refused request, sent again")


def send_chunk(s, data):
    s.sendall(b"%x\r\n" % len(data) + data + b"\r\n")


def budget_chunked():
    """A chunked upload reserves max_body_bytes for as long as it runs."""
    d = BUDGET
    body = message(300000, "chunked")
    s = connect(d, timeout=60)
    try:
        s.sendall(head(d, "POST", "/v1/sign?key=demo-ec", chunked=True))
        send_chunk(s, body[:1000])
        wait_metric(d, "smimed_body_bytes_in_flight", MIB)
        expect_error(headers_only(d, "/v1/sign?key=demo-ec", 600000), 503, "server_busy")
        verified(sign_raw(d, message(400000, "beside")), "beside", "a request that fits beside it")
        for i in range(1000, len(body), 65536):
            send_chunk(s, body[i:i + 65536])
        s.sendall(b"0\r\n\r\n")
        verified(read_response(s), "chunked", "the chunked upload")
    finally:
        s.close()
    wait_metric(d, "smimed_body_bytes_in_flight", 0)


def budget_released():
    """The reservation goes back whichever way a request ends: client gone
    mid-body, refused mid-body (chunked past the cap), answered with an
    error after its body."""
    d = BUDGET
    s = connect(d)
    s.sendall(head(d, "POST", "/v1/sign?key=demo-ec", 1000000) + b"x" * 1000)
    wait_metric(d, "smimed_body_bytes_in_flight", 1000000)
    s.close()
    wait_metric(d, "smimed_body_bytes_in_flight", 0)
    s = connect(d)
    try:
        s.sendall(head(d, "POST", "/v1/sign?key=demo-ec", chunked=True))
        for _ in range(17):
            send_chunk(s, b"y" * 65536)
        s.sendall(b"0\r\n\r\n")
        expect_error(read_response(s), 413, "body_too_large")
    finally:
        s.close()
    wait_metric(d, "smimed_body_bytes_in_flight", 0)
    s = connect(d)
    try:
        bad = b"{not json"
        s.sendall(head(d, "POST", "/v1/sign", len(bad), ctype="application/json") + bad)
        expect_error(read_response(s), 400, "invalid_json")
    finally:
        s.close()
    wait_metric(d, "smimed_body_bytes_in_flight", 0)
    verified(sign_raw(d, message(1400000 // 2, "after")), "after", "served after all that")


def budget_config_error():
    conf = config("budget-bad", max_body_bytes=2 * MIB, max_inflight_body_bytes=MIB)
    p = F.run([F.BINARY, "--config", conf, "--check-config"], check=False, env=F.softhsm_env(LIM))
    check(p.returncode != 0, "--check-config accepted a budget below max_body_bytes")
    check(b"max_inflight_body_bytes" in p.stderr and b"below max_body_bytes" in p.stderr,
          "no clear message: %r" % p.stderr[-300:])
    conf = config("budget-big", max_body_bytes=2 * MIB)
    p = F.run([F.BINARY, "--config", conf, "--check-config"], check=False, env=F.softhsm_env(LIM))
    eq(p.returncode, 0, "--check-config of a default budget (%r)" % p.stderr[-300:])


# ------------------------------------------------------------ header deadline

HEADER_TIMEOUT = 2
SLOW = None


def slow_start():
    global SLOW
    SLOW = S.daemon(config("slow", header_timeout_s=HEADER_TIMEOUT), "header-deadline-daemon",
                    env=F.softhsm_env(LIM))


def closed_after(s, trickle=None, limit=30):
    """Seconds until the server closes s; sends a byte of trickle every 0.5 s
    meanwhile."""
    t0 = time.time()
    s.settimeout(0.5)
    sent = 0
    while time.time() - t0 < limit:
        try:
            if s.recv(4096) == b"":
                return time.time() - t0
        except socket.timeout:
            if trickle is not None and sent < len(trickle):
                try:
                    s.send(trickle[sent:sent + 1])
                    sent += 1
                except OSError:
                    return time.time() - t0
        except OSError:
            return time.time() - t0
    raise AssertionError("still open after %ds" % limit)


def healthz_on(s):
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(15)
    return read_response(s)


def deadline_silent():
    """A connection that never sends its header is shut down at the
    deadline; one whose header is slow but complete in time is served."""
    s = connect(SLOW)
    try:
        t = closed_after(s)
    finally:
        s.close()
    check(HEADER_TIMEOUT - 0.5 <= t <= HEADER_TIMEOUT + 1.5, "closed after %.2fs" % t)
    s = connect(SLOW)
    try:
        for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: yes\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(HEADER_TIMEOUT / 5)
        s.settimeout(15)
        eq(read_response(s).status, 200, "a slow header complete in time")
    finally:
        s.close()


def deadline_trickle():
    """The deadline counts from the first byte, however slowly the rest
    comes: a byte every 0.5 s does not keep the connection."""
    s = connect(SLOW)
    try:
        t = closed_after(s, trickle=b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    finally:
        s.close()
    check(HEADER_TIMEOUT - 0.5 <= t <= HEADER_TIMEOUT + 1.5, "closed after %.2fs" % t)


def keepalive_idle():
    """Idle between requests is not a slow header: a keep-alive connection
    silent for longer than the deadline still serves its next request."""
    s = connect(SLOW)
    try:
        eq(healthz_on(s).status, 200, "first request")
        time.sleep(HEADER_TIMEOUT * 2 + 1)
        eq(healthz_on(s).status, 200, "a request after %ds idle" % (HEADER_TIMEOUT * 2 + 1))
        time.sleep(HEADER_TIMEOUT + 1)
        r = SLOW.request("GET", "/healthz")
        eq(r.status, 200, "another connection meanwhile")
        eq(healthz_on(s).status, 200, "a third request, same connection")
    finally:
        s.close()


def keepalive_trickle():
    """After a request, the next header trickled in is held to the deadline
    from its first byte (seen through TCP_INFO's byte count)."""
    s = connect(SLOW)
    try:
        eq(healthz_on(s).status, 200, "first request")
        time.sleep(HEADER_TIMEOUT + 1)
        t = closed_after(s, trickle=b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    finally:
        s.close()
    # the watchdog looks at idle connections once a second
    check(HEADER_TIMEOUT - 0.5 <= t <= HEADER_TIMEOUT + 2.5, "closed after %.2fs" % t)
    check(metric(SLOW, "smimed_header_timeouts_total") >= 3, "smimed_header_timeouts_total")


# ------------------------------------------------------------ the attack

ATTACKERS = ["127.0.0.%d" % i for i in range(2, 34)]  # 32 addresses
CLIENT = "127.0.0.34"                                  # the 33rd
PER_ADDRESS = 20                                       # 640 > max_connections
ATTACK_TIMEOUT = 3
ATTACK_SECONDS = 13


class Attack:
    """Connections that each send a request line and then one header byte
    per second, reconnecting when closed: the slow-header attack."""

    def __init__(self, port):
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.lifetimes = []   # accepted and held, then closed by the server
        self.refused = 0      # closed right away
        self.attempts = 0
        self.peak = 0
        self.stop = threading.Event()
        self.error = None
        self.retry_at = {}

    def open(self, key):
        addr = ATTACKERS[key[0]]
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((addr, 0))
        s.connect_ex(("127.0.0.1", self.port))
        self.attempts += 1
        self.sel.register(s, selectors.EVENT_WRITE, {"key": key, "state": "connecting"})

    def closed(self, s, info, now):
        self.sel.unregister(s)
        s.close()
        if info["state"] == "trickle":
            life = now - info["since"]
            if life < 0.5:
                self.refused += 1
            else:
                self.lifetimes.append(life)
        self.retry_at[info["key"]] = now + 0.2

    def run(self):
        try:
            self._run()
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            for k in list(self.sel.get_map().values()):
                k.fileobj.close()
            self.sel.close()

    def _run(self):
        for a in range(len(ATTACKERS)):
            for i in range(PER_ADDRESS):
                self.retry_at[(a, i)] = 0
        while not self.stop.is_set():
            now = time.time()
            for key, at in list(self.retry_at.items()):
                if at <= now:
                    del self.retry_at[key]
                    self.open(key)
            for k, ev in self.sel.select(timeout=0.05):
                s, info = k.fileobj, k.data
                now = time.time()
                if info["state"] == "connecting":
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        self.sel.unregister(s)
                        s.close()
                        self.retry_at[info["key"]] = now + 0.2
                        continue
                    try:
                        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    except OSError:
                        pass
                    info.update(state="trickle", since=now, next=now + 1)
                    self.sel.modify(s, selectors.EVENT_READ, info)
                    continue
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data == b"":
                    self.closed(s, info, now)
            now = time.time()
            held = 0
            for k in list(self.sel.get_map().values()):
                info = k.data
                if info["state"] != "trickle":
                    continue
                if now - info["since"] >= 0.5:
                    held += 1
                if info["next"] <= now:
                    info["next"] = now + 1
                    try:
                        k.fileobj.send(b"a")
                    except OSError:
                        self.closed(k.fileobj, info, now)
            self.peak = max(self.peak, held)


def attack():
    """Slow headers from 32 addresses, 640 connections for 512 slots: a 33rd
    address is served within a second all along, and the header deadline is
    what frees the slots the attackers hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    d = S.daemon(config("attack", max_connections=512, header_timeout_s=ATTACK_TIMEOUT),
                 "attack-daemon", env=F.softhsm_env(LIM))
    a = Attack(d.port)
    t = threading.Thread(target=a.run)
    t.start()
    worst, served, slow = 0.0, 0, []
    try:
        t0 = time.time()
        time.sleep(1.0)
        while time.time() - t0 < ATTACK_SECONDS:
            start = time.time()
            try:
                s = connect(d, source=CLIENT, timeout=1.0)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                r = read_response(s)
                s.close()
                ok = r.status == 200
            except (OSError, AssertionError) as e:
                ok = False
                slow.append("%.1fs: %s" % (start - t0, e))
            took = time.time() - start
            worst = max(worst, took)
            if ok and took <= 1.0:
                served += 1
            elif ok:
                slow.append("%.1fs: took %.2fs" % (start - t0, took))
            time.sleep(0.25)
        r = d.sign(key="demo-ec", mime="Content-Type: text/plain\r\n\r\nunder attack\r\n", timeout=10)
        eq(r.status, 200, "a signature under attack")
    finally:
        a.stop.set()
        t.join(30)
    check(a.error is None, "attack thread: %r" % a.error)
    lifetimes = sorted(a.lifetimes)
    print("#   attack: %d connection attempts, at most %d held at once, %d closed at the "
          "deadline (%.2f-%.2fs), %d refused at once; the 33rd address served %d times, "
          "slowest %.2fs" % (a.attempts, a.peak, len(lifetimes),
                              lifetimes[0] if lifetimes else 0, lifetimes[-1] if lifetimes else 0,
                              a.refused, served, worst), flush=True)
    check(not slow, "the 33rd address was not served within a second: %s" % slow[:5])
    check(served >= 20, "the 33rd address was served %d times" % served)
    check(a.peak >= 400, "the attack held only %d connections at once" % a.peak)
    # every held connection was closed at the deadline, and the slots freed
    # went round again: more were held over the run than there are slots
    check(len(lifetimes) > 512, "only %d attack connections were closed" % len(lifetimes))
    early = [x for x in lifetimes if x < ATTACK_TIMEOUT - 0.5]
    late = [x for x in lifetimes if x > ATTACK_TIMEOUT + 1.5]
    check(not early and not late, "closed before %.1fs: %d, after %.1fs: %d (%s)" % (
        ATTACK_TIMEOUT - 0.5, len(early), ATTACK_TIMEOUT + 1.5, len(late), (early + late)[:5]))
    check(metric(d, "smimed_header_timeouts_total") >= len(lifetimes),
          "smimed_header_timeouts_total below what the clients saw")
    # once the attack is gone, its connections are too
    wait_metric(d, "smimed_connections", 1, timeout=ATTACK_TIMEOUT + 10)  # /metrics' own
    F.check_exit(d, d.stop())


def main():
    if S.case("budget: daemon with 1.5 MiB for 1 MiB bodies", budget_start):
        S.case("budget: a body in flight holds its share; 503 server_busy past it, after "
               "401/404/405/413/415, before 403", budget_held)
        S.case("budget: chunked uploads reserve max_body_bytes", budget_chunked)
        S.case("budget: given back when the client goes, on 413 mid-body, on 400", budget_released)
    S.case("budget: below max_body_bytes is a config error", budget_config_error)
    if S.case("header deadline: daemon with header_timeout_s=%d" % HEADER_TIMEOUT, slow_start):
        S.case("header deadline: a silent connection is shut down; a slow complete header "
               "is served", deadline_silent)
        S.case("header deadline: a trickled header is shut down at the deadline", deadline_trickle)
        S.case("header deadline: keep-alive connections idle between requests stay", keepalive_idle)
        S.case("header deadline: a keep-alive request trickled in is shut down", keepalive_trickle)
    S.case("slow-header attack from 32 addresses: a 33rd is served within a second", attack)
    S.stop_running()
    S.finish()


if __name__ == "__main__":
    main()
