#!/usr/bin/env python3
"""The process wall under load, from outside: the daemon (smimed --config,
the supervisor) with 2 workers in front of tests/unit/faulty_p11.c (which
logs every C_Login) on a copy of the demo token, the PIN from pin_env.

- A worker killed with SIGKILL, and one with SIGSEGV, while clients sign:
  only requests on that worker fail, the others go on, a replacement
  serves within a second, and no token logs in again.
- The key process killed: the supervisor starts another (which logs in
  again) and signing resumes within seconds.
- No worker maps a PKCS#11 module (/proc/PID/maps).
- The PIN is nowhere in a worker's memory after a run of requests
  (/proc/PID/mem over every readable mapping), while the same scan finds
  it in the supervisor, which keeps it for a restarted key process: the
  scan can fail."""

import http.client
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("wall")
DEMO = F.ensure_demo()
WORK = F.workdir("wall")
FAULTY = F.BUILD / "tests" / "faulty_p11.so"
P11LOG = WORK / "p11.log"
PIN_VAR = "SMIMED_WALL_PIN"
MIME = "Content-Type: text/plain\r\n\r\nbehind the wall\r\n"
D = None
TOK = None
PIN = None


def logins():
    return F.p11_log_count(P11LOG, "C_Login")


def of(comm):
    return D.children(comm)


def wait_for(what, fn, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("%s: not within %.1f s" % (what, timeout))


def sign_once(key="demo-ec", timeout=30):
    """The status of one signing on a fresh connection; None when the
    connection broke (the worker serving it died)."""
    try:
        r = D.post_json("/v1/sign", {"key": key, "mime": MIME}, timeout=timeout)
        return r.status
    except (OSError, http.client.HTTPException):
        return None


class Load:
    """Clients signing in a loop until stopped; each result with its time."""

    def __init__(self, clients=4):
        self.results = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop.is_set():
            t0 = time.time()
            st = sign_once()
            with self.lock:
                self.results.append((t0, time.time(), st))

    def end(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return self.results


def start():
    global D, TOK, PIN
    check(FAULTY.exists(), "%s is missing" % FAULTY)
    TOK = F.copy_token_dir(DEMO, WORK / "token")
    PIN = F.read_pin(TOK)
    tok = F.token_config(TOK, module=str(FAULTY))
    del tok["pin_file"]
    tok["pin_env"] = PIN_VAR
    conf = F.write_config(WORK / "wall.conf", [tok], workers=2,
                          audit_log=str(WORK / "audit.log"))
    env = dict(F.softhsm_env(TOK))
    env.update({PIN_VAR: PIN, "FAULTY_P11_REAL": F.softhsm_module(),
                "FAULTY_P11_LOG": str(P11LOG)})
    # a SIGSEGV kills the worker as it would a release build, rather than
    # being the sanitizer's report and exit status 1
    env["ASAN_OPTIONS"] = F.sanitizer_env()["ASAN_OPTIONS"] + ":handle_segv=0"
    D = S.daemon(conf, "wall", env=env)
    wait_for("2 workers and a key process",
             lambda: len(of("smimed-worker")) == 2 and len(of("smimed-key")) == 1, 15)
    eq(sign_once(), 200, "a signature")
    eq(logins(), 1, "C_Login calls at start")


def worker_crash(sig):
    workers = of("smimed-worker")
    before = logins()
    load = Load()
    try:
        time.sleep(1.0)
        victim = workers[0]
        os.kill(victim, sig)
        t_kill = time.time()
        new = wait_for("a replacement worker",
                       lambda: [p for p in of("smimed-worker") if p not in workers], 5)
        # the replacement serves: its "ready" reaches the supervisor's log
        wait_for("the replacement's ready line",
                 lambda: "(pid %d) ready" % new[0] in D.stderr_text(), 5)
        took = time.time() - t_kill
        time.sleep(1.5)
    finally:
        results = load.end()
    check(took < 1.0, "the replacement took %.2f s to serve" % took)
    before_kill = [r for r in results if r[1] < t_kill]
    failed = [r for r in results if r[2] != 200]
    after = [r for r in results if r[0] > t_kill + 0.2]
    check(before_kill and after, "no requests around the kill: %d before, %d after" % (
        len(before_kill), len(after)))
    # at most the requests the victim held (one per client) fail, and only
    # as broken connections: nobody else answers an error
    check(len(failed) <= 4, "%d requests failed: %r" % (len(failed), failed[:8]))
    check(all(r[2] is None for r in failed), "failures other than the victim's "
          "broken connections: %r" % [r for r in failed if r[2] is not None][:5])
    check(all(t_start <= t_kill + 0.1 for t_start, _, st in failed),
          "a request that began after the kill failed")
    check(all(r[2] == 200 for r in after), "requests after the kill failed")
    eq(logins(), before, "C_Login calls (no token logged in again)")
    D_text = D.stderr_text()
    check("(pid %d) killed by signal %d" % (victim, sig) in D_text,
          "the supervisor did not log the signal")
    return len(results), len(failed)


def worker_sigkill():
    n, failed = worker_crash(signal.SIGKILL)
    print("# wall: SIGKILL: %d requests, %d failed" % (n, failed), flush=True)


def worker_sigsegv():
    n, failed = worker_crash(signal.SIGSEGV)
    print("# wall: SIGSEGV: %d requests, %d failed" % (n, failed), flush=True)


def key_process_killed():
    key = of("smimed-key")
    eq(len(key), 1, "key processes")
    before = logins()
    os.kill(key[0], signal.SIGKILL)
    t0 = time.time()
    wait_for("a new key process",
             lambda: [p for p in of("smimed-key") if p != key[0]], 10)
    wait_for("signing again", lambda: sign_once(timeout=10) == 200, 15)
    took = time.time() - t0
    check(took < 10, "signing resumed after %.1f s" % took)
    print("# wall: signing resumed %.2f s after the key process was killed" % took,
          flush=True)
    eq(logins(), before + 1, "C_Login calls (the new key process logs in once)")
    # both workers sign again, whichever the connection lands on
    ok = sum(sign_once() == 200 for _ in range(20))
    eq(ok, 20, "signatures after the key process came back")


def maps_of(pid):
    return Path("/proc/%d/maps" % pid).read_text()


def no_module_in_workers():
    module = os.path.realpath(F.softhsm_module())
    key = of("smimed-key")[0]
    check(str(FAULTY) in maps_of(key) and module in maps_of(key),
          "the key process maps neither module: the check would find nothing")
    for w in of("smimed-worker"):
        m = maps_of(w)
        for name in (str(FAULTY), module, "libsofthsm", "faulty_p11"):
            check(name not in m, "worker %d maps %s" % (w, name))
    check("libsofthsm" not in maps_of(D.proc.pid), "the supervisor maps SoftHSM")


def memory_holds(pid, needle):
    """1 when needle is in any readable mapping of pid (the sanitizer's
    shadow, terabytes of reserve, and other huge regions skipped)."""
    found = False
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for line in maps_of(pid).splitlines():
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if "r" not in fields[1] or name in ("[vvar]", "[vsyscall]") or \
                    hi - lo > (1 << 30):
                continue
            tail = b""
            for off in range(lo, hi, 1 << 20):
                try:
                    mem.seek(off)
                    chunk = mem.read(min(1 << 20, hi - off))
                except OSError:
                    break
                if needle in tail + chunk:
                    found = True
                    break
                tail = chunk[-len(needle):]
            if found:
                break
    return found


def pin_not_in_workers():
    for _ in range(40):
        eq(sign_once(key="demo-rsa"), 200, "a signature")
    pin = PIN.encode()
    check(memory_holds(D.proc.pid, pin),
          "the PIN is not in the supervisor's memory either: the scan finds nothing")
    workers = of("smimed-worker")
    eq(len(workers), 2, "workers")
    for w in workers:
        check(not memory_holds(w, pin), "the PIN is in worker %d's memory" % w)


def main():
    if S.case("the daemon: a supervisor, a key process on faulty_p11, 2 workers", start):
        S.case("no worker maps a PKCS#11 module", no_module_in_workers)
        S.case("a worker killed with SIGKILL under load: only its requests fail, a "
               "replacement serves within 1 s, no new C_Login", worker_sigkill)
        S.case("a worker killed with SIGSEGV under load: the same", worker_sigsegv)
        S.case("the key process killed: replaced, logs in once, signing resumes",
               key_process_killed)
        S.case("the PIN is in no worker's memory after a run of requests",
               pin_not_in_workers)
        S.stop_running(pins=[PIN])
    S.finish()


main()
