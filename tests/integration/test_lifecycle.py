#!/usr/bin/env python3
"""Process life: concurrency, SIGTERM with requests in flight, SIGINT,
SIGHUP reload, bounded token sessions, and the access log."""

import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("lifecycle")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
PIN = F.read_pin(DEMO)
WORK = F.workdir("lifecycle")
D = None


def msg(tag, size=0):
    filler = ("line of filler text for %s\r\n" % tag) * (size // 32)
    return "Content-Type: text/plain; charset=us-ascii\r\n\r\nmessage %s\r\n%s" % (tag, filler)


def start():
    global D
    D = S.daemon(DEMO / "smimed.conf", "lifecycle-daemon", env=F.softhsm_env(DEMO))


def run_threads(n, fn):
    results = [None] * n
    errors = [None] * n

    def worker(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # reported by the caller
            errors[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results, errors


def concurrent_32():
    combos = [(k, m, dg) for k in F.KEYS for m in F.MODES for dg in F.DIGESTS]
    barrier = threading.Barrier(32)

    def one(i):
        key, mode, digest = combos[i % len(combos)]
        body = msg("concurrent %d" % i, 2048)
        barrier.wait(30)
        r = D.sign(key=key, mime=body, mode=mode, digest=digest)
        return key, mode, digest, r

    results, errors = run_threads(32, one)
    failed = [str(e) for e in errors if e is not None]
    check(not failed, "%d requests raised: %s" % (len(failed), failed[:3]))
    for i, (key, mode, digest, r) in enumerate(results):
        eq(r.status, 200, "request %d status (%r)" % (i, r.body[:200]))
        j = r.json()
        eq((j["key"], j["mode"], j["digest"]), (key, mode, digest), "request %d echo" % i)
        w = F.workdir("c%02d" % i)
        content = F.openssl_verify(j["mime"].encode(), CA, w)
        check(("message concurrent %d\r\n" % i).encode() in content,
              "request %d: signed content of another request" % i)


def access_log():
    r = D.sign(key="demo-rsa", mime=msg("logged"))
    eq(r.status, 200, "sign status")
    D.request("GET", "/no-such-path")
    time.sleep(0.3)
    lines = D.stderr_text().splitlines()
    check(any("POST" in l and "/v1/sign" in l and "200" in l and "demo-rsa" in l for l in lines),
          "no access-log line with POST, /v1/sign, 200 and demo-rsa")
    check(any("GET" in l and "/no-such-path" in l and "404" in l for l in lines),
          "no access-log line for the 404")
    check(PIN not in D.stderr_text(), "the PIN appears in the log")


def health_during_load():
    stop = threading.Event()

    def load(i):
        n = 0
        while not stop.is_set() and n < 200:
            r = D.sign(key="demo-rsa", mime=msg("load %d" % i, 4096), digest="sha512")
            if r.status != 200:
                return r
            n += 1
        return None

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        worst = 0.0
        for _ in range(10):
            t0 = time.time()
            eq(D.request("GET", "/healthz", timeout=30).status, 200, "/healthz")
            eq(D.request("GET", "/v1/keys", timeout=30).status, 200, "/v1/keys")
            worst = max(worst, time.time() - t0)
            time.sleep(0.05)
        check(worst < 5.0, "/healthz + /v1/keys took %.1fs under signing load" % worst)
    finally:
        stop.set()
        for t in threads:
            t.join(120)


def sigterm_in_flight():
    """Requests whose bodies are still arriving when SIGTERM comes are
    finished, answered 200, and the daemon then exits 0."""
    d = S.daemon(DEMO / "smimed.conf", "sigterm-daemon", env=F.softhsm_env(DEMO))
    n = 6
    bodies = [json.dumps({"key": ("demo-rsa", "demo-ec")[i % 2], "mime": msg("inflight %d" % i, 65536),
                          "mode": ("detached", "opaque")[i % 2]}).encode() for i in range(n)]
    socks = []
    try:
        for b in bodies:
            s = socket.create_connection(("127.0.0.1", d.port), timeout=60)
            s.sendall(b"POST /v1/sign HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + d.auth_line() +
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(b))
            s.sendall(b[:len(b) // 2])
            socks.append(s)
        time.sleep(0.7)
        d.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        for s, b in zip(socks, bodies):
            s.sendall(b[len(b) // 2:])
        for i, s in enumerate(socks):
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            check(head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"),
                  "request %d: %r" % (i, head[:80] or b"connection closed without a response"))
            j = json.loads(body.decode())
            F.openssl_verify(j["mime"].encode(), CA, WORK)
    finally:
        for s in socks:
            s.close()
        rc = d.stop(timeout=60)
    F.check_exit(d, rc, "exit status after SIGTERM")


def sigterm_under_load():
    """SIGTERM during a stream of complete requests: every answered request
    is a 200 (refused connections are fine), and the daemon exits 0."""
    d = S.daemon(DEMO / "smimed.conf", "sigterm-load-daemon", env=F.softhsm_env(DEMO))
    answered = []
    bad = []
    lock = threading.Lock()
    go = threading.Event()

    def client(i):
        go.wait(10)
        for k in range(100):
            try:
                r = d.sign(key=("demo-ec", "demo-rsa")[i % 2], mime=msg("load %d/%d" % (i, k)))
            except OSError:
                return  # refused or reset once the daemon stops accepting
            except Exception as e:  # http.client.RemoteDisconnected etc.
                if isinstance(e, ConnectionError) or "Remote end closed" in str(e):
                    return
                with lock:
                    bad.append(repr(e))
                return
            with lock:
                (answered if r.status == 200 else bad).append(r.status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(1.0)
    d.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    rc = d.stop(timeout=60)
    check(not d.sanitizer_findings(), "sanitizer report: %s" % d.sanitizer_findings()[:3])
    check(answered, "no request was answered before SIGTERM")
    check(not bad, "non-200 answers or errors around SIGTERM: %s" % bad[:5])
    eq(rc, 0, "exit status after SIGTERM")


def sigint():
    d = S.daemon(DEMO / "smimed.conf", "sigint-daemon", env=F.softhsm_env(DEMO))
    eq(d.sign(key="demo-ec", mime=msg("sigint")).status, 200, "sign")
    rc = d.stop(signal.SIGINT, timeout=60)
    F.check_exit(d, rc, "exit status after SIGINT")


def wait_for(pred, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def keys_of(d):
    r = d.request("GET", "/v1/keys")
    return {k["name"] for k in r.json().get("keys", [])} if r.status == 200 else set()


def sighup_reload():
    conf = WORK / "reload.conf"
    F.write_config(conf, [F.token_config(DEMO)])
    d = S.daemon(conf, "reload-daemon", env=F.softhsm_env(DEMO))
    try:
        eq(keys_of(d), set(F.KEYS), "keys before reload")
        F.write_config(conf, [F.token_config(DEMO, discovery=False, keys=[
            {"name": "alias-rsa", "uri": "pkcs11:object=demo-rsa"}])])
        d.send_signal(signal.SIGHUP)
        check(wait_for(lambda: keys_of(d) == {"alias-rsa"}),
              "after SIGHUP the keys are %s, want {alias-rsa}" % sorted(keys_of(d)))
        r = d.sign(key="alias-rsa", mime=msg("alias"))
        eq(r.status, 200, "sign with the reloaded key (%r)" % r.body[:200])
        F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
        expect_error(d.sign(key="demo-ec", mime=msg("gone")), 404, "unknown_key")
        # a broken config is refused; the old one stays
        conf.write_text('{"tokens": [ {"name": "x", "bogus": 1} ]}')
        d.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        check(d.running(), "daemon died on a SIGHUP with a broken config")
        eq(keys_of(d), {"alias-rsa"}, "keys after a failed reload")
        eq(d.sign(key="alias-rsa", mime=msg("still")).status, 200, "sign after a failed reload")
    finally:
        rc = d.stop(timeout=60)
    F.check_exit(d, rc)


def bounded_sessions():
    conf = WORK / "busy.conf"
    F.write_config(conf, [F.token_config(DEMO, max_sessions=1, wait_ms=1)])
    d = S.daemon(conf, "busy-daemon", env=F.softhsm_env(DEMO))
    try:
        barrier = threading.Barrier(24)

        def one(i):
            barrier.wait(30)
            return d.sign(key="demo-rsa", mime=msg("busy %d" % i, 8192), digest="sha512")

        results, errors = run_threads(24, one)
        failed = [str(e) for e in errors if e is not None]
        check(not failed, "requests raised: %s" % failed[:3])
        ok = busy = 0
        for r in results:
            if r.status == 200:
                ok += 1
                F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
            else:
                expect_error(r, 503, "token_busy")
                check(r.header("Retry-After"), "503 token_busy without Retry-After")
                busy += 1
        check(ok > 0, "no request succeeded with max_sessions=1")
        print("#   bounded sessions: %d ok, %d token_busy" % (ok, busy), flush=True)
    finally:
        rc = d.stop(timeout=60)
    F.check_exit(d, rc)


def code_of(r):
    return None if r.status == 200 else r.error_code()


def session_not_held_by_digest():
    """The token session is held for the signature alone, not while a large
    entity is digested: with one session and a short wait_ms, small signs
    keep being served while large ones are in flight. (When the content was
    digested under the session, each 60 MiB SHA-512 sign held it about
    0.1 s, and small signs queued behind it got 503 token_busy.)"""
    conf = WORK / "digest.conf"
    F.write_config(conf, [F.token_config(DEMO, max_sessions=1, wait_ms=50)])
    d = S.daemon(conf, "digest-daemon", env=F.softhsm_env(DEMO))
    large = ("Subject: large\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
             + "a line of a large message, signed with SHA-512, 0123456789\r\n"
             * (60 * 1024 * 1024 // 61)).encode()
    lock = threading.Lock()
    state = {"in_flight": 0, "overlapping": 0}
    large_status, small_status, small_ms = [], [], []
    stop = threading.Event()

    def big(i):
        for n in range(2):
            with lock:
                state["in_flight"] += 1
            try:
                r = d.request("POST", "/v1/sign?key=demo-ec&digest=sha512", body=large,
                              headers={"Content-Type": "message/rfc822"}, timeout=300)
            finally:
                with lock:
                    state["in_flight"] -= 1
            with lock:
                large_status.append((r.status, code_of(r)))
            if i == 0 and n == 0 and r.status == 200:
                content = F.openssl_verify(r.body, CA, F.workdir("digest-large"))
                check(content == large[len("Subject: large\r\n"):],
                      "the large signed content differs from the message")

    def small():
        k = 0
        while not stop.is_set():
            with lock:
                overlapping = state["in_flight"] > 0
            t0 = time.time()
            r = d.sign(key="demo-ec", mime=msg("small %d" % k))
            small_ms.append((time.time() - t0) * 1e3)
            small_status.append((r.status, code_of(r)))
            if overlapping:
                with lock:
                    state["overlapping"] += 1
            if k == 0:
                eq(r.status, 200, "first small sign (%r)" % r.body[:200])
                F.openssl_verify(r.json()["mime"].encode(), CA, F.workdir("digest-small"))
            k += 1

    try:
        bigs = [threading.Thread(target=big, args=(i,)) for i in range(3)]
        s1 = threading.Thread(target=small)
        for t in bigs:
            t.start()
        s1.start()
        for t in bigs:
            t.join(600)
        stop.set()
        s1.join(120)
        busy = [s for s in small_status if s[1] == "token_busy"]
        others = [s for s in small_status if s[0] != 200 and s[1] != "token_busy"]
        print("#   small signs: %d (%d while a large one was in flight), %d token_busy, "
              "slowest %.0f ms; large: %s"
              % (len(small_status), state["overlapping"], len(busy),
                 max(small_ms or [0]), large_status), flush=True)
        check(state["overlapping"] >= 20,
              "only %d small signs ran while large ones were in flight" % state["overlapping"])
        check(not busy, "%d of %d small signs got 503 token_busy while large ones were "
              "digested" % (len(busy), len(small_status)))
        check(not others, "small signs failed otherwise: %s" % others[:3])
        eq([s for s in large_status if s[0] != 200], [], "large signs that failed")
        eq(len(large_status), 6, "large signs answered")
    finally:
        stop.set()
        rc = d.stop(timeout=60)
    F.check_exit(d, rc)


def main():
    if not S.case("daemon starts on the demo token", start):
        S.finish()
    S.case("32 concurrent sign requests all verify", concurrent_32)
    S.case("access log has method, path, status, key; never the PIN", access_log)
    S.case("/healthz and /v1/keys stay quick under signing load", health_during_load)
    S.case("SIGTERM with requests in flight: all 200, exit 0", sigterm_in_flight)
    S.case("SIGTERM under load: no failed answers, exit 0", sigterm_under_load)
    S.case("SIGINT: exit 0", sigint)
    S.case("SIGHUP reloads the config; a broken one is refused", sighup_reload)
    S.case("max_sessions=1: 200 or 503 token_busy with Retry-After", bounded_sessions)
    S.case("max_sessions=1: small signs are not busy while large ones are digested",
           session_not_held_by_digest)
    S.stop_running(pins=[PIN])
    # every daemon of this suite, stopped or not: no PIN in any log
    S.case("no daemon log contains the PIN",
           lambda: check(all(PIN not in d.stderr_text() for d in S.daemons), "PIN found in a log"))
    S.finish()


if __name__ == "__main__":
    main()
