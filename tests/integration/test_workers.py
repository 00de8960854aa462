#!/usr/bin/env python3
"""One view across request workers (the shared region, service/shared.c):
max_connections_per_ip held across 2 workers whichever accepts, the body
budget one for the daemon, /metrics the sum of every worker's counts
whichever worker answers, and smimed_worker_restarts_total after a
worker is killed with SIGKILL, with what it held given back."""

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("workers")
DEMO = F.ensure_demo()
WORK = F.workdir("workers")
W = F.copy_token_dir(DEMO, WORK / "demo")
BASE = json.loads((W / "smimed.conf").read_text())
PER_IP = 6
MIB = 1 << 20


def config(name, **options):
    return F.config_variant(BASE, W / ("%s.conf" % name), **options)


def connect(d, source):
    return F.connect_from(d, source, timeout=10)


def refused(s, timeout=5):
    """True when the daemon closes s without an answer."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def metrics(d, source="127.0.0.9"):
    conn = F.http.client.HTTPConnection("127.0.0.1", d.port, timeout=30,
                                        source_address=(source, 0))
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    eq(r.status, 200, "/metrics")
    return body


def value(page, series):
    m = re.search(r"^%s (\d+)$" % re.escape(series), page, re.M)
    check(m, "no %s in /metrics" % series)
    return int(m.group(1))


def wait_value(series, want, timeout=10, base=0):
    """Waits until series - base reads want. The scrape that read it is
    the one judged: a scrape after it could count the connection of the
    one before, which the client closed but whose worker has not seen the
    close yet."""
    deadline = time.time() + timeout
    while True:
        got = value(metrics(D), series) - base
        if got == want or time.time() > deadline:
            break
        time.sleep(0.05)
    eq(got, want, series)


def get(d, path, source):
    conn = F.http.client.HTTPConnection("127.0.0.1", d.port, timeout=30,
                                        source_address=(source, 0))
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


def workers_of(d):
    kids = Path("/proc/%d/task/%d/children" % (d.proc.pid, d.proc.pid)).read_text().split()
    return [int(k) for k in kids
            if Path("/proc/%s/comm" % k).read_text().strip() == "smimed-worker"]


D = None


def start():
    global D
    D = S.daemon(config("two", workers=2, max_connections=64,
                        max_connections_per_ip=PER_IP, header_timeout_s=60,
                        max_body_bytes=MIB, max_inflight_body_bytes=2 * MIB),
                 "workers-daemon", env=F.softhsm_env(W))
    deadline = time.time() + 20
    while len(workers_of(D)) != 2 and time.time() < deadline:
        time.sleep(0.1)
    eq(len(workers_of(D)), 2, "workers")


def spread(source, n, tries=20):
    """n idle connections from source, held by both workers."""
    for _ in range(tries):
        socks = []
        for _ in range(n):
            socks.append(connect(D, source))
            time.sleep(0.02)
        pids = D.holders(socks)
        if len(set(pids)) == 2:
            return socks, pids
        for s in socks:
            s.close()
        time.sleep(0.5)
    raise AssertionError("%d connections all went to one worker %d times" % (n, tries))


def per_ip():
    socks, pids = spread("127.0.0.2", PER_IP)
    extra = connect(D, "127.0.0.2")
    check(refused(extra), "connection %d from one address was kept (per worker: %r)" % (
        PER_IP + 1, {p: pids.count(p) for p in set(pids)}))
    extra.close()
    eq(get(D, "/healthz", "127.0.0.3"), 200, "another address")
    # the idle ones and /metrics' own, once the other address's is closed
    wait_value("smimed_connections", PER_IP + 1)
    check(value(metrics(D), 'smimed_connections_refused_total{reason="per_ip"}') >= 1,
          "the refusal is not counted")
    for s in socks:
        s.close()
    wait_value("smimed_connections", 1)


def budget():
    """Uploads of half a MiB announced, on both workers, take the 2 MiB."""
    head = ("POST /v1/sign?key=demo-ec HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
            "Content-Length: %d\r\n%s\r\n" % (MIB // 2, D.auth_line().decode())).encode()
    # as many tries as spread(): the kernel wakes whichever worker it likes
    for _ in range(20):
        socks = []
        for i in range(4):
            s = connect(D, "127.0.0.%d" % (20 + i))
            s.sendall(head + b"x")
            socks.append(s)
            time.sleep(0.02)
        pids = D.holders(socks)
        if len(set(pids)) == 2:
            break
        for s in socks:
            s.close()
        wait_value("smimed_body_bytes_in_flight", 0)
    check(len(set(pids)) == 2, "the uploads went to one worker every time")
    wait_value("smimed_body_bytes_in_flight", 2 * MIB)
    third = D.request("POST", "/v1/sign?key=demo-ec", body=b"y" * 100,
                      headers={"Content-Type": "message/rfc822"})
    F.expect_error(third, 503, "server_busy")
    for s in socks:
        s.close()
    wait_value("smimed_body_bytes_in_flight", 0)


def sums():
    series = 'smimed_requests_total{endpoint="/healthz",status="200"}'
    before = value(metrics(D), series)
    for i in range(30):
        eq(get(D, "/healthz", "127.0.0.%d" % (30 + i % 5)), 200, "/healthz")
    # a request is counted once its answer is sent, so the last one may
    # still be on its way to the counter
    wait_value(series, 30, base=before)
    # each scrape is answered by whichever worker accepts it
    for _ in range(6):
        eq(value(metrics(D), series) - before, 30, "requests counted over both workers")


def restarts():
    wait_value("smimed_connections", 1)
    page = metrics(D)
    eq(value(page, "smimed_worker_restarts_total"), 0, "restarts before")
    total = value(page, 'smimed_requests_total{endpoint="/healthz",status="200"}')
    socks, pids = spread("127.0.0.4", 4)
    victim = pids[0]
    kept = sum(1 for p in pids if p != victim)
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        now = workers_of(D)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    check(victim not in workers_of(D) and len(workers_of(D)) == 2, "no replacement in 10 s")
    page = metrics(D)
    eq(value(page, "smimed_worker_restarts_total"), 1, "smimed_worker_restarts_total")
    # the killed worker's connections are given back; the other's are kept
    wait_value("smimed_connections", kept + 1)
    check(value(metrics(D), 'smimed_requests_total{endpoint="/healthz",status="200"}') >= total,
          "a counter went down with the worker")
    for s in socks:
        s.close()


def main():
    if S.case("daemon with 2 workers, max_connections_per_ip=%d" % PER_IP, start):
        S.case("max_connections_per_ip holds across the workers", per_ip)
        S.case("one body budget: uploads on both workers take it, the next is 503", budget)
        S.case("/metrics sums every worker's requests, whichever answers", sums)
        S.case("SIGKILL of a worker: smimed_worker_restarts_total, its connections given back",
               restarts)
    S.stop_running()
    S.finish()


if __name__ == "__main__":
    main()
