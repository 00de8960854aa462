#!/usr/bin/env python3
"""The benchmark behind script/bench (which builds and makes the demo token).

    python3 tests/bench/bench.py BUILD_DIR DEMO_DIR RESULTS_JSON

Measures, prints a table and writes RESULTS_JSON:
  ceiling   the token's own rate through libp11 (BUILD_DIR/p11bench): sign
            at 1, 2 and 8 threads; RSA decrypt and ECDH derive
  hop       the process wall's cost per private-key operation: a key
            process (--role=key) and the worker's client (rkeytool
            parallel: ECDSA signatures, each with its FINISH, one at a
            time), their CPU time per operation less the token's own
            through libp11 (p11bench, one thread); median of 3 rounds
  sign      the daemon's POST /v1/sign of a 1 KiB text message, from wrk
            over keep-alive loopback HTTP, at 1..128 connections
  large     raw-mode sign of 1 MiB and 10 MiB messages against
            `openssl dgst -sha256` on the same file
  memory    peak memory of one sign request above the idle daemon, raw and
            JSON, detached and opaque, 10 and 60 MiB (a fresh daemon per
            measurement); 8 concurrent 60 MiB raw signs; a multipart one
  decrypt   the daemon's POST /v1/decrypt of a small message, RSA and ECDH
  openssl   what users replace: one `openssl cms -sign -engine pkcs11`
            process per message, same token and key
Every section also records VmHWM where it runs the daemon; idle VmRSS and
start-up-to-ready time come from the daemons started.

Environment knobs: BENCH_SECONDS (per measurement, default 5),
BENCH_CONNECTIONS (default "1,2,8,32,128"), BENCH_THREADS (default "1,2,8"),
BENCH_SKIP (comma list of sections to leave out: ceiling, sign, large,
memory, decrypt, openssl, hop), BENCH_ONLY (comma list of the sections to run,
e.g. BENCH_ONLY=memory: about half a minute). Loopback only; every step is
bounded in time. The ceiling is measured before and after the daemon
sweep, the better kept.
"""

import datetime
import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEYS = [("demo-rsa", "rsa-2048"), ("demo-ec", "ec-p256")]
LARGE_SIZES = [1 << 20, 10 << 20]
WRK_TIMEOUT_S = 10


def env_list(name, default):
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


SECS = float(os.environ.get("BENCH_SECONDS", "5"))
CONNS = env_list("BENCH_CONNECTIONS", "1,2,8,32,128")
THREADS = env_list("BENCH_THREADS", "1,2,8")
SKIP = set(x.strip() for x in os.environ.get("BENCH_SKIP", "").split(",") if x.strip())
ONLY = set(x.strip() for x in os.environ.get("BENCH_ONLY", "").split(",") if x.strip())
SECTIONS = ("ceiling", "hop", "sign", "large", "memory", "decrypt", "openssl")
if ONLY:
    SKIP |= set(SECTIONS) - ONLY
MEMORY_SIZES = [10 << 20, 60 << 20]
# the case: so many 60 MiB raw signs at once
MEMORY_CONCURRENT = 8


def log(msg):
    print(msg, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tree(pid):
    """pid and its children: the daemon is the supervisor, its key process
    and its workers."""
    out = [pid]
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def proc_status(pid):
    """VmRSS and VmHWM of the daemon (pid and its children, summed) in KiB:
    a request changes one worker's and the key process's, the others' stay
    as they were."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] += int(line.split()[1])
        except OSError:
            pass
    return out


class Daemon:
    """A fresh build/smimed on a free loopback port, ready when /readyz is."""

    def __init__(self, build, demo, logf, config="bench.conf"):
        self.port = free_port()
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(build / "smimed"), "--config", str(demo / config),
             "--listen", "127.0.0.1:%d" % self.port],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = start + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited with %d; see %s"
                                   % (self.proc.returncode, logf.name))
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                status = c.getresponse().status
                c.close()
                if status == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("daemon not ready after 20 s")
            time.sleep(0.002)
        self.ready_ms = (time.perf_counter() - start) * 1e3
        self.idle = proc_status(self.proc.pid)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def request(self, method, path, body, ctype):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        c.request(method, path, body, dict(AUTH, **{"Content-Type": ctype}))
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError("%s %s: %d %s" % (method, path, r.status, data[:300]))
        return data

    def status(self):
        return proc_status(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_seconds(pid):
    """User plus system CPU time of the daemon (pid and its children) so
    far."""
    ticks = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# "Authorization: Bearer ..." of the demo's all-rights client, when the demo
# has client authentication on (set by main)
AUTH = {}


def run_wrk(work, url, body_path, ctype, conns, secs, pid=None):
    """wrk with one thread (it is C and light; the daemon keeps the cores)
    and a Lua done() that prints the figures as one JSON line. With the
    daemon's pid, also the CPU time it and wrk spent per request, which,
    unlike the rate, other load on the machine hardly changes."""
    script = work / "wrk.lua"
    script.write_text("""
wrk.method = "POST"
wrk.headers["Content-Type"] = "%s"
%s
local f = assert(io.open("%s", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(s, lat, req)
  local e = s.errors
  io.write(string.format(
    'BENCH {"requests":%%d,"bytes":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    s.requests, s.bytes, s.duration, e.connect, e.read, e.write, e.status,
    e.timeout, lat:percentile(50), lat:percentile(99), lat.max))
end
""" % (ctype, "".join('wrk.headers["%s"] = "%s"\n' % kv for kv in AUTH.items()), body_path))
    cpu0 = cpu_seconds(pid) if pid else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", "-c%d" % conns, "-d%gs" % secs,
         "--timeout", "%ds" % WRK_TIMEOUT_S, "-s", str(script), url],
        capture_output=True, text=True, timeout=secs + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = cpu_seconds(pid) if pid else None
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            r = json.loads(line[6:])
            secs_run = r["duration_us"] / 1e6
            errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
            done = max(r["requests"], 1)
            wrk_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
            return {
                "daemon_cpu_us_per_req": round((cpu1 - cpu0) * 1e6 / done, 1) if pid else None,
                "wrk_cpu_us_per_req": round(wrk_cpu * 1e6 / done, 1),
                "connections": conns,
                "requests": r["requests"],
                "rate": round((r["requests"] - r["status"]) / secs_run, 1),
                "p50_ms": round(r["p50_us"] / 1e3, 2),
                "p99_ms": round(r["p99_us"] / 1e3, 2),
                "max_ms": round(r["max_us"] / 1e3, 2),
                "errors": errors,
                "errors_detail": {k: r[k] for k in ("connect", "read", "write", "status", "timeout")},
                "mb_per_s": round(r["bytes"] / secs_run / 1e6, 2),
            }
    raise RuntimeError("wrk printed no figures: %s %s" % (out.stdout, out.stderr))


def p11bench(build, demo, key, threads, op):
    out = subprocess.run(
        [str(build / "p11bench"), str(demo / "smimed.conf"), key, str(threads),
         "%g" % SECS, op], capture_output=True, text=True, timeout=SECS + 60)
    if out.returncode != 0:
        raise RuntimeError("p11bench %s %s: %s" % (key, op, out.stderr.strip()))
    rate = float(out.stdout.split("rate=")[1].split("/")[0])
    cpu = float(out.stdout.split("cpu_us_per_op=")[1].split()[0])
    return {"threads": threads, "rate": rate, "cpu_us_per_op": cpu}


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HOP_OPS = 10000
HOP_THREADS = 1
HOP_ROUNDS = 3


def hop_round(build, demo, logf, K):
    """One key process and HOP_OPS signatures from rkeytool: the CPU time
    per operation of each, and the rate."""
    kp = K.KeyProcess(build / "smimed", demo / "bench.conf", logf.name)
    try:
        kp.wait_ready()
        conn = kp.connect(1)
        fd = conn.sock.fileno()
        cpu0 = proc_cpu_seconds(kp.proc.pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([str(build / "tests" / "rkeytool"), str(fd), "parallel",
                              "demo-ec", str(HOP_OPS), str(HOP_THREADS)],
                             pass_fds=[fd], capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = proc_cpu_seconds(kp.proc.pid)
        conn.close()
    finally:
        kp.stop()
    if out.returncode != 0:
        raise RuntimeError("rkeytool parallel: %s %s" % (out.stdout, out.stderr))
    tool = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return (cpu1 - cpu0) * 1e6 / HOP_OPS, tool * 1e6 / HOP_OPS, HOP_OPS / wall


def hop(build, demo, logf, res):
    """The key process and the worker's client on one socket pair, as the
    supervisor sets them up: the CPU time both spend per ECDSA signature and
    its FINISH, one at a time (each message finds the other side asleep:
    the hop's whole cost), less what the token takes for the signature
    through libp11 directly (one thread). The median of HOP_ROUNDS rounds,
    each against the token's figure measured just after it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
    import keyproto as K
    rounds = []
    for _ in range(HOP_ROUNDS):
        key_us, tool_us, rate = hop_round(build, demo, logf, K)
        token_us = p11bench(build, demo, "demo-ec", HOP_THREADS, "sign")["cpu_us_per_op"]
        rounds.append((key_us + tool_us - token_us, key_us, tool_us, token_us, rate))
    hop_us, key_us, tool_us, token_us, rate = sorted(rounds)[len(rounds) // 2]
    res["hop"] = {"operations": HOP_OPS, "threads": HOP_THREADS, "rounds": HOP_ROUNDS,
                  "rate": round(rate, 1),
                  "key_process_cpu_us_per_op": round(key_us, 1),
                  "client_cpu_us_per_op": round(tool_us, 1),
                  "token_cpu_us_per_op": token_us,
                  "hop_cpu_us_per_op": round(hop_us, 1),
                  "hop_all_rounds": [round(r[0], 1) for r in rounds]}
    log("  hop      demo-ec  key process %.1f us + client %.1f us per signature and FINISH,"
        " token alone %.1f us: the hop %.1f us (%.0f/s; rounds %s)"
        % (key_us, tool_us, token_us, hop_us, rate, res["hop"]["hop_all_rounds"]))


def text_message(size):
    """A 7-bit text message of about size bytes with top-level headers."""
    head = ("From: bench@demo.smimed.test\r\nTo: someone@example.org\r\n"
            "Subject: benchmark\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = "benchmark line of text, 7-bit clean, CRLF ended: 0123456789\r\n"
    return (head + line * max(1, (size - len(head)) // len(line))).encode()


def best(rows):
    return max(rows, key=lambda r: r["rate"]) if rows else None


def ceiling(build, demo, res):
    res["ceiling"] = {}
    for key, alg in KEYS:
        rows = [p11bench(build, demo, key, n, "sign") for n in THREADS]
        res["ceiling"][key] = {"algorithm": alg, "sign": rows}
        for r in rows:
            log("  ceiling  %-8s sign    %d threads  %9.1f/s" % (key, r["threads"], r["rate"]))
        op = "decrypt" if alg.startswith("rsa") else "derive"
        rows = [p11bench(build, demo, key, n, op) for n in (1, 2)]
        res["ceiling"][key][op] = rows
        for r in rows:
            log("  ceiling  %-8s %-7s %d threads  %9.1f/s" % (key, op, r["threads"], r["rate"]))


def ceiling_again(build, demo, res):
    """The ceiling once more, after the daemon's sweep: the machine's
    other load changes over a run, and each thread count keeps the better of
    its two figures (a higher ceiling only lowers the ratio)."""
    if "sign" in SKIP:
        return
    for key, alg in KEYS:
        for op in ("sign", "decrypt" if alg.startswith("rsa") else "derive"):
            for r in res["ceiling"][key][op]:
                again = p11bench(build, demo, key, r["threads"], op)["rate"]
                r["passes"] = [r["rate"], again]
                r["rate"] = max(r["rate"], again)
                log("  ceiling  %-8s %-7s %d threads  %9.1f/s (first pass %.1f/s)"
                    % (key, op, r["threads"], again, r["passes"][0]))


def bench_config(demo):
    """The demo config as the benchmark runs it, next to it (its paths are
    relative to its folder): wrk connects from one address, so that address
    may hold as many connections as the daemon takes."""
    conf = json.loads((demo / "smimed.conf").read_text())
    conf["max_connections_per_ip"] = conf.get("max_connections", 1024)
    (demo / "bench.conf").write_text(json.dumps(conf, indent=2) + "\n")
    return conf


def tuned_config(demo):
    """The benchmark's config with max_sessions = the core count."""
    conf = bench_config(demo)
    for t in conf["tokens"]:
        t["max_sessions"] = os.cpu_count()
    (demo / "bench-tuned.conf").write_text(json.dumps(conf, indent=2) + "\n")
    return "bench-tuned.conf"


def sign_body(work, key):
    """The request body of the sign measurements: a 1 KiB text message."""
    body = work / ("sign-%s.json" % key)
    mime = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            + "benchmark line of text\r\n" * 43)
    body.write_text(json.dumps({"key": key, "mime": mime}))
    return body


def sign_sweep(build, demo, logf, work, res):
    res["sign"] = {}
    for key, _ in KEYS:
        body = sign_body(work, key)
        rows = []
        for c in CONNS:
            d = Daemon(build, demo, logf)
            try:
                r = run_wrk(work, d.url("/v1/sign"), body, "application/json", c, SECS,
                            d.proc.pid)
                r["vmhwm_kib"] = d.status()["VmHWM"]
                r["ready_ms"] = round(d.ready_ms, 1)
                r["idle_rss_kib"] = d.idle["VmRSS"]
            finally:
                d.stop()
            rows.append(r)
            log("  daemon   %-8s sign  %3d conns  %9.1f/s  p50 %7.2f ms  p99 %7.2f ms  errors %d  VmHWM %d KiB"
                % (key, c, r["rate"], r["p50_ms"], r["p99_ms"], r["errors"], r["vmhwm_kib"]))
        res["sign"][key] = rows
        # The same at 32 connections with max_sessions = the core count: a
        # software token is CPU-bound, and more operations in flight than
        # cores only lengthen the tail (README, Performance)
        d = Daemon(build, demo, logf, tuned_config(demo))
        try:
            r = run_wrk(work, d.url("/v1/sign"), body, "application/json", 32, SECS)
        finally:
            d.stop()
        r["max_sessions"] = os.cpu_count()
        res.setdefault("sign_tuned", {})[key] = r
        log("  daemon   %-8s sign   32 conns  %9.1f/s  p50 %7.2f ms  p99 %7.2f ms  errors %d  (max_sessions %d)"
            % (key, r["rate"], r["p50_ms"], r["p99_ms"], r["errors"], r["max_sessions"]))


def sha256_rate(path, size):
    copies = max(3, (64 << 20) // size)
    best_t = None
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(["openssl", "dgst", "-sha256"] + [str(path)] * copies,
                       check=True, stdout=subprocess.DEVNULL)
        t = time.perf_counter() - t0
        best_t = t if best_t is None else min(best_t, t)
    return copies * size / best_t / 1e6


def large(build, demo, logf, work, res):
    res["large"] = []
    key = "demo-ec"
    for size in LARGE_SIZES:
        path = work / ("large-%d.eml" % size)
        msg = text_message(size)
        path.write_bytes(msg)
        d = Daemon(build, demo, logf)
        try:
            idle = d.status()["VmRSS"]
            t0 = time.perf_counter()
            d.request("POST", "/v1/sign?key=%s" % key, msg, "message/rfc822")
            one_s = time.perf_counter() - t0
            peak_one = d.status()["VmHWM"]
            r = run_wrk(work, d.url("/v1/sign?key=%s" % key), path,
                        "message/rfc822", 1, SECS)
            peak = d.status()["VmHWM"]
        finally:
            d.stop()
        limit = sha256_rate(path, len(msg))
        rate = r["rate"] * len(msg) / 1e6
        row = {"size": size, "bytes": len(msg), "key": key, "requests": r["requests"],
               "errors": r["errors"], "mb_per_s": round(rate, 1),
               "first_request_s": round(one_s, 3),
               "sha256_mb_per_s": round(limit, 1),
               "ratio": round(rate / limit, 3),
               "idle_rss_kib": idle, "vmhwm_one_request_kib": peak_one,
               "vmhwm_kib": peak,
               "peak_over_idle_per_size": round((peak_one - idle) * 1024 / len(msg), 2)}
        res["large"].append(row)
        log("  large    %5.1f MiB raw sign  %7.1f MB/s  sha256 %7.1f MB/s  ratio %.2f  one request: VmHWM %d KiB, idle %d KiB (%.2f x size above idle)"
            % (len(msg) / 1048576, rate, limit, rate / limit, peak_one, idle,
               row["peak_over_idle_per_size"]))


def multipart_message(size):
    """A multipart/mixed message of about size bytes: a short text part and
    a base64 attachment, 7-bit clean (GMime walks it; nothing is
    re-encoded)."""
    head = ("From: bench@demo.smimed.test\r\nTo: someone@example.org\r\n"
            "Subject: benchmark attachment\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"bench-boundary\"\r\n\r\n"
            "--bench-boundary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "See the attachment.\r\n"
            "--bench-boundary\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=data.bin\r\n\r\n")
    tail = "--bench-boundary--\r\n"
    line = "QmVuY2htYXJrIGF0dGFjaG1lbnQsIGJhc2U2NCBlbmNvZGVkLCA3LWJpdCBjbGVhbiEh\r\n"
    n = max(1, (size - len(head) - len(tail)) // len(line))
    return (head + line * n + tail).encode()


def memory_one(build, demo, logf, key, path, body, ctype, copies=1):
    """VmRSS of a fresh daemon once ready, then VmHWM after `copies` equal
    requests at once (each its own connection), in KiB."""
    d = Daemon(build, demo, logf)
    try:
        idle = d.status()["VmRSS"]
        errors = []

        def one():
            try:
                d.request("POST", path, body, ctype)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(copies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        if errors:
            raise RuntimeError("memory: %s" % errors[0])
        return idle, d.status()["VmHWM"]
    finally:
        d.stop()


def memory(build, demo, logf, work, res):
    """Peak memory above idle per request: (VmHWM after the request - VmRSS
    of the ready daemon) / size. The size is the entity's (the message);
    the JSON body is larger by its escapes (3% for these CRLF text lines),
    so per entity is the stricter figure, and the one the targets use."""
    res["memory"] = []
    key = "demo-ec"
    scenarios = []
    for size in MEMORY_SIZES:
        msg = text_message(size)
        for kind in ("raw", "json"):
            for mode in ("detached", "opaque"):
                scenarios.append((kind, mode, size, msg, 1, "text"))
    scenarios.append(("raw", "detached", 60 << 20, text_message(60 << 20),
                      MEMORY_CONCURRENT, "text"))
    scenarios.append(("raw", "detached", 10 << 20, multipart_message(10 << 20), 1,
                      "multipart"))
    for kind, mode, size, msg, copies, shape in scenarios:
        if kind == "raw":
            path = "/v1/sign?key=%s&mode=%s" % (key, mode)
            body, ctype = msg, "message/rfc822"
        else:
            path = "/v1/sign"
            body = json.dumps({"key": key, "mode": mode, "mime": msg.decode()}).encode()
            ctype = "application/json"
        idle, peak = memory_one(build, demo, logf, key, path, body, ctype, copies)
        row = {"kind": kind, "mode": mode, "size": size, "shape": shape,
               "concurrent": copies, "entity_bytes": len(msg), "body_bytes": len(body),
               "idle_rss_kib": idle, "vmhwm_kib": peak,
               "over_entity": round((peak - idle) * 1024 / (copies * len(msg)), 2),
               "over_body": round((peak - idle) * 1024 / (copies * len(body)), 2)}
        res["memory"].append(row)
        log("  memory   %-4s %-8s %2d MiB %-9s x%d  VmHWM %7d KiB, idle %6d KiB: "
            "%.2f x entity, %.2f x body above idle"
            % (kind, mode, size >> 20, shape, copies, peak, idle, row["over_entity"],
               row["over_body"]))


def decrypt(build, demo, logf, work, res):
    res["decrypt"] = {}
    inner = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
             + "a small secret message\r\n" * 8)
    for key, alg in KEYS:
        d = Daemon(build, demo, logf)
        rows = []
        try:
            enc = json.loads(d.request(
                "POST", "/v1/encrypt",
                json.dumps({"mime": inner, "recipients": [key]}).encode(),
                "application/json"))["mime"]
            body = work / ("decrypt-%s.json" % key)
            body.write_text(json.dumps({"mime": enc, "key": key}))
            for c in (2, 8):
                r = run_wrk(work, d.url("/v1/decrypt"), body, "application/json", c, SECS,
                            d.proc.pid)
                rows.append(r)
                log("  daemon   %-8s decrypt %2d conns  %9.1f/s  p50 %7.2f ms  p99 %7.2f ms  errors %d"
                    % (key, c, r["rate"], r["p50_ms"], r["p99_ms"], r["errors"]))
            hwm = d.status()["VmHWM"]
        finally:
            d.stop()
        res["decrypt"][key] = {"algorithm": alg, "rows": rows, "vmhwm_kib": hwm}


def openssl_baseline(demo, work, res):
    """One `openssl cms -sign -engine pkcs11` process per message. The PIN
    reaches the engine through an OpenSSL config file (mode 0600, removed
    afterwards), never through argv."""
    module = json.loads((demo / "smimed.conf").read_text())["tokens"][0]["module"]
    engine = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
    if not engine.exists():
        raise RuntimeError("no %s (install libengine-pkcs11-openssl)" % engine)
    pin = (demo / "pin").read_text().splitlines()[0]
    cnf = work / "engine.cnf"
    fd = os.open(cnf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n"
                "[engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\n"
                "engine_id = pkcs11\ndynamic_path = %s\nMODULE_PATH = %s\nPIN = %s\ninit = 0\n"
                % (engine, module, pin))
    msg = work / "openssl-msg.txt"
    msg.write_text("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
                   + "benchmark line of text\r\n" * 43)
    env = dict(os.environ, OPENSSL_CONF=str(cnf))
    res["openssl"] = {}
    try:
        for key, _ in KEYS:
            out = work / ("openssl-%s.eml" % key)
            argv = ["openssl", "cms", "-sign", "-engine", "pkcs11", "-keyform", "engine",
                    "-inkey", "pkcs11:token=smimed-demo;object=%s;type=private" % key,
                    "-signer", str(demo / ("%s.pem" % key)), "-md", "sha256",
                    "-binary", "-in", str(msg), "-out", str(out)]
            subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                           capture_output=True)
            # the output is a real signature
            subprocess.run(["openssl", "cms", "-verify", "-CAfile", str(demo / "ca.pem"),
                            "-in", str(out), "-out", os.devnull],
                           check=True, capture_output=True)
            # one after the other, as a mail script would. SoftHSM's file
            # store now and then answers a process's slot listing or login
            # with CKR_GENERAL_ERROR (more often with several in parallel):
            # such runs are counted as failures, not messages
            argv[-1] = os.devnull
            procs, count, failed, last_err = [], 0, 0, ""
            par = 1
            end = time.perf_counter() + SECS
            t0 = time.perf_counter()
            while time.perf_counter() < end or procs:
                while len(procs) < par and time.perf_counter() < end:
                    procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.PIPE))
                p = procs.pop(0)
                _, err = p.communicate()
                if p.returncode != 0:
                    failed += 1
                    last_err = err.decode(errors="replace")
                else:
                    count += 1
            if failed > count / 10:
                raise RuntimeError("openssl cms -sign failed %d times: %s" % (failed, last_err))
            rate = count / (time.perf_counter() - t0)
            res["openssl"][key] = {"messages": count, "failed": failed,
                                   "rate": round(rate, 1)}
            log("  openssl  %-8s cms -sign -engine pkcs11, one process per message  %9.1f/s  (%d failed)" % (key, rate, failed))
    finally:
        cnf.unlink()


def compute_ratios(res):
    """Per key: the daemon's best rate over the connection counts divided by
    the ceiling's best over the thread counts (sign), likewise decrypt, and
    the speed-up over one openssl process per message."""
    res["ratios"] = {}
    for key, alg in KEYS:
        ceil = best(res.get("ceiling", {}).get(key, {}).get("sign", []))
        dmn = best(res.get("sign", {}).get(key, []))
        ossl = res.get("openssl", {}).get(key)
        op = "decrypt" if alg.startswith("rsa") else "derive"
        dceil = best(res.get("ceiling", {}).get(key, {}).get(op, []))
        ddmn = best(res.get("decrypt", {}).get(key, {}).get("rows", []))
        cpu_rows = [r for r in res.get("ceiling", {}).get(key, {}).get("sign", [])]
        token_cpu = min((r["cpu_us_per_op"] for r in cpu_rows), default=None)
        daemon_cpu = dmn.get("daemon_cpu_us_per_req") if dmn else None
        res["ratios"][key] = {
            "token_cpu_us_per_sign": token_cpu,
            "daemon_cpu_us_per_sign": daemon_cpu,
            "wrk_cpu_us_per_sign": dmn.get("wrk_cpu_us_per_req") if dmn else None,
            "cpu_share_of_token": round(token_cpu / daemon_cpu, 3)
            if token_cpu and daemon_cpu else None,
            "sign": round(dmn["rate"] / ceil["rate"], 3) if ceil and dmn else None,
            "decrypt": round(ddmn["rate"] / dceil["rate"], 3) if dceil and ddmn else None,
            "speedup_vs_openssl": round(dmn["rate"] / ossl["rate"], 1) if ossl and dmn else None,
        }


def fmt(v, spec="%.1f"):
    return "-" if v is None else spec % v


def summary(res):
    lines = []
    lines.append("")
    lines.append("== summary (%s, %d cores, %g s per measurement)"
                 % (res["date"], res["cpus"], SECS))
    lines.append("%-9s %-9s %12s %12s %7s %10s %8s" % ("key", "op", "ceiling/s", "daemon/s", "ratio", "openssl/s", "speed-up"))
    for key, alg in KEYS:
        ceil = best(res.get("ceiling", {}).get(key, {}).get("sign", []))
        dmn = best(res.get("sign", {}).get(key, []))
        ossl = res.get("openssl", {}).get(key)
        ratio = res["ratios"][key]["sign"]
        speed = res["ratios"][key]["speedup_vs_openssl"]
        lines.append("%-9s %-9s %12s %12s %7s %10s %8s" % (
            key, "sign", fmt(ceil and ceil["rate"]), fmt(dmn and dmn["rate"]),
            fmt(ratio, "%.2f"), fmt(ossl and ossl["rate"]), fmt(speed, "%.0fx")))
        op = "decrypt" if alg.startswith("rsa") else "derive"
        ceil = best(res.get("ceiling", {}).get(key, {}).get(op, []))
        dmn = best(res.get("decrypt", {}).get(key, {}).get("rows", []))
        ratio = res["ratios"][key]["decrypt"]
        lines.append("%-9s %-9s %12s %12s %7s" % (
            key, "decrypt", fmt(ceil and ceil["rate"]), fmt(dmn and dmn["rate"]), fmt(ratio, "%.2f")))
    lines.append("")
    if res.get("hop"):
        h = res["hop"]
        lines.append("the hop to the key process: %.1f us of CPU per private-key operation "
                     "(key process %.1f + client %.1f, less the token's %.1f)"
                     % (h["hop_cpu_us_per_op"], h["key_process_cpu_us_per_op"],
                        h["client_cpu_us_per_op"], h["token_cpu_us_per_op"]))
    for key, _ in KEYS:
        r = res["ratios"][key]
        if r.get("cpu_share_of_token") is not None:
            lines.append("%-9s CPU per signature: token %.0f us; daemon %.0f us per request "
                         "(wrk %.0f us more): the token's share %.2f"
                         % (key, r["token_cpu_us_per_sign"], r["daemon_cpu_us_per_sign"],
                            r["wrk_cpu_us_per_sign"], r["cpu_share_of_token"]))
    if res.get("sign"):
        lines.append("")
        lines.append("%-9s %6s %10s %9s %9s %7s %10s" % ("key", "conns", "req/s", "p50 ms", "p99 ms", "errors", "VmHWM KiB"))
        for key, _ in KEYS:
            for r in res["sign"].get(key, []):
                lines.append("%-9s %6d %10.1f %9.2f %9.2f %7d %10d" % (
                    key, r["connections"], r["rate"], r["p50_ms"], r["p99_ms"], r["errors"], r["vmhwm_kib"]))
    for key, r in res.get("sign_tuned", {}).items():
        lines.append("%-9s %6s %10.1f %9.2f %9.2f %7d %10s" % (
            key, "32*", r["rate"], r["p50_ms"], r["p99_ms"], r["errors"], "-"))
    if res.get("sign_tuned"):
        lines.append("(* max_sessions = %d, the core count; the rows above use the defaults)"
                     % os.cpu_count())
    if res.get("large"):
        lines.append("")
        lines.append("%-10s %9s %12s %7s %16s" % ("raw sign", "MB/s", "sha256 MB/s", "ratio", "peak-idle/size"))
        for r in res["large"]:
            lines.append("%-10s %9.1f %12.1f %7.2f %16.2f" % (
                "%d MiB" % (r["size"] >> 20), r["mb_per_s"], r["sha256_mb_per_s"],
                r["ratio"], r["peak_over_idle_per_size"]))
    if res.get("memory"):
        lines.append("")
        lines.append("%-34s %10s %10s %9s %9s" % ("peak memory of sign requests", "VmHWM KiB",
                                                    "idle KiB", "x entity", "x body"))
        for r in res["memory"]:
            what = "%s %s %d MiB%s%s" % (
                r["kind"], r["mode"], r["size"] >> 20,
                " %s" % r["shape"] if r["shape"] != "text" else "",
                " x%d at once" % r["concurrent"] if r["concurrent"] > 1 else "")
            lines.append("%-34s %10d %10d %9.2f %9.2f" % (
                what, r["vmhwm_kib"], r["idle_rss_kib"], r["over_entity"], r["over_body"]))
        lines.append("(peak above idle: VmHWM after the request(s) minus VmRSS of the ready "
                     "daemon, over the entity's or the request body's size, per request)")
    lines.append("")
    lines.append("idle RSS %s KiB; start-up to ready %s ms (median of %d starts)" % (
        fmt(res.get("idle_rss_kib"), "%d"), fmt(res.get("ready_ms"), "%.0f"), len(res.get("ready_ms_all", []))))
    return lines


def targets(res):
    t = []

    def add(name, value, ok):
        t.append({"target": name, "value": value, "met": ok})

    for key, need in (("demo-rsa", 0.85), ("demo-ec", 0.60)):
        r = res.get("ratios", {}).get(key, {}).get("sign")
        add("%s sign >= %.0f%% of ceiling" % (key, need * 100), r, r is not None and r >= need)
    for key, _ in KEYS:
        rows = [r for r in res.get("sign", {}).get(key, []) if r["connections"] == 32]
        if rows:
            r = rows[0]
            add("%s p99 <= 3 x p50 at 32 connections" % key,
                round(r["p99_ms"] / r["p50_ms"], 2), r["p99_ms"] <= 3 * r["p50_ms"])
        r = res.get("sign_tuned", {}).get(key)
        if r:
            add("%s p99 <= 3 x p50 at 32 conns, max_sessions %d" % (key, r["max_sessions"]),
                round(r["p99_ms"] / r["p50_ms"], 2), r["p99_ms"] <= 3 * r["p50_ms"])
        errs = sum(r["errors"] for r in res.get("sign", {}).get(key, []))
        add("%s no errors up to %d connections" % (key, max(CONNS)), errs, errs == 0)
    for r in res.get("large", []):
        if r["size"] == 10 << 20:
            add("10 MiB raw sign >= 40% of sha256", r["ratio"], r["ratio"] >= 0.40)
    for r in res.get("memory", []):
        if r["concurrent"] == 1 and r["shape"] == "text":
            need = 3 if r["kind"] == "raw" else 4
            add("%s %s %d MiB sign peak <= %d x entity above idle"
                % (r["kind"], r["mode"], r["size"] >> 20, need),
                r["over_entity"], r["over_entity"] <= need)
    idle = res.get("idle_rss_kib")
    add("idle RSS < 20 MiB", idle, idle is not None and idle < 20 * 1024)
    ready = res.get("ready_ms")
    add("start-up to ready < 300 ms", ready, ready is not None and ready < 300)
    return t


def main():
    build, demo, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), Path(sys.argv[3])
    if (demo / "api-token").exists():
        AUTH["Authorization"] = "Bearer " + (demo / "api-token").read_text().strip()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
           "seconds_per_measurement": SECS}
    os.environ["SOFTHSM2_CONF"] = str(demo / "softhsm2.conf")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smimed-bench.") as w, \
            open(build / "bench-daemon.log", "w") as logf:
        work = Path(w)
        bench_config(demo)
        d = Daemon(build, demo, logf)
        res["idle_rss_kib"] = d.idle["VmRSS"]
        starts = [d.ready_ms]
        d.stop()
        sections = [("ceiling", lambda: ceiling(build, demo, res)),
                    ("hop", lambda: hop(build, demo, logf, res)),
                    ("sign", lambda: sign_sweep(build, demo, logf, work, res)),
                    ("ceiling", lambda: ceiling_again(build, demo, res)),
                    ("large", lambda: large(build, demo, logf, work, res)),
                    ("memory", lambda: memory(build, demo, logf, work, res)),
                    ("decrypt", lambda: decrypt(build, demo, logf, work, res)),
                    ("openssl", lambda: openssl_baseline(demo, work, res))]
        for name, fn in sections:
            if name in SKIP:
                continue
            log("== %s" % name)
            fn()
        for rows in res.get("sign", {}).values():
            starts += [r["ready_ms"] for r in rows]
        res["ready_ms_all"] = starts
        res["ready_ms"] = round(statistics.median(starts), 1)
    compute_ratios(res)
    res["targets"] = targets(res)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    for line in summary(res):
        log(line)
    log("")
    log("targets:")
    for t in res["targets"]:
        log("  %-4s %-54s %s" % ("met" if t["met"] else "NOT", t["target"], t["value"]))
    log("(the load generator, wrk, runs on the same cores as the daemon)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    log("results: %s (%.0f s)" % (out, res["wall_seconds"]))


if __name__ == "__main__":
    main()
