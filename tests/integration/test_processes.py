#!/usr/bin/env python3
"""The process tree (smimed --config): one smimed-key and `workers`
smimed-worker children started by fork and exec, the key process the only
one that maps the PKCS#11 module, no PIN in any environment (a pin_env PIN
goes to the key process over its control socket), a worker's descriptors
(the listening socket the supervisor opened among them), a killed worker
or key process replaced, SIGHUP, SIGTERM, and children that go when the
supervisor is killed (PR_SET_PDEATHSIG). test_wall.py puts the tree under
load."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("processes")
DEMO = F.ensure_demo()
WORK = F.workdir("processes")
PIN = F.read_pin(DEMO)
PIN_VAR = "SMIMED_PROC_PIN"


def config(path, workers=2, **top):
    tok = F.token_config(DEMO)
    del tok["pin_file"]
    tok["pin_env"] = PIN_VAR
    return F.write_config(path, [tok], workers=workers,
                          audit_log=str(WORK / "audit.log"), **top)


CONF = config(WORK / "tree.conf")


class Tree:
    serial = 0

    def __init__(self, conf, name):
        Tree.serial += 1
        self.log_path = WORK / ("%02d-%s.stderr" % (Tree.serial, name))
        env = dict(os.environ, **F.softhsm_env(DEMO), **F.sanitizer_env())
        env[PIN_VAR] = PIN
        self.log = open(self.log_path, "ab")
        self.port = F.free_port()
        self.proc = subprocess.Popen([str(F.BINARY), "--config", str(conf), "--listen",
                                      "127.0.0.1:%d" % self.port],
                                     stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, env=env)

    def text(self):
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern, count=1, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.findall(pattern, self.text(), re.M)
            if len(found) >= count:
                return found
            check(self.proc.poll() is None, "the supervisor exited: %s" % self.tail())
            time.sleep(0.05)
        raise AssertionError("%d of %r not logged in %ds: %s" % (count, pattern, timeout,
                                                                  self.tail()))

    def tail(self, n=15):
        return "\n".join(self.text().splitlines()[-n:])

    def children(self):
        """{pid: comm} of the supervisor's direct children."""
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path("/proc/%s/stat" % d).read_text()
                comm = Path("/proc/%s/comm" % d).read_text().strip()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                out[int(d)] = comm
        return out

    def of(self, comm):
        return sorted(p for p, c in self.children().items() if c == comm)

    def wait_children(self, workers, timeout=15, exclude=()):
        deadline = time.time() + timeout
        while time.time() < deadline:
            kids = self.children()
            keys = [p for p, c in kids.items() if c == "smimed-key" and p not in exclude]
            ws = [p for p, c in kids.items() if c == "smimed-worker" and p not in exclude]
            if len(keys) == 1 and len(ws) == workers and len(kids) == workers + 1:
                return keys[0], sorted(ws)
            time.sleep(0.05)
        raise AssertionError("children: %r" % self.children())

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


T = None


def tree_starts():
    global T
    T = Tree(CONF, "tree")
    T.wait_log(r"worker \d+ \(pid \d+\) ready", 2)
    key, workers = T.wait_children(2)
    eq(len(workers), 2, "workers")
    eq(len(T.wait_log(r"worker \d+: 2 keys on 1 tokens from the key process", 2)), 2,
       "workers that read the key directory")
    check("key demo-rsa (rsa-2048) on demo usable" in T.text(),
          "the key process did not log in with the PIN from the control socket")


def module_only_in_key_process():
    key, workers = T.wait_children(2)
    module = os.path.basename(F.softhsm_module())
    maps = {p: Path("/proc/%d/maps" % p).read_text() for p in [key] + workers}
    check(module in maps[key], "the key process does not map %s" % module)
    for w in workers:
        check(module not in maps[w], "worker %d maps %s" % (w, module))
        check("libsofthsm" not in maps[w], "worker %d maps a SoftHSM library" % w)
    check(module not in Path("/proc/%d/maps" % T.proc.pid).read_text(),
          "the supervisor maps %s" % module)


def no_pin_in_environments():
    key, workers = T.wait_children(2)
    for p in [T.proc.pid, key] + workers:
        env = Path("/proc/%d/environ" % p).read_bytes()
        check(PIN.encode() not in env, "the PIN is in the environment of %d" % p)
        check(PIN_VAR.encode() + b"=" not in env or p == T.proc.pid,
              "%s is in the environment of child %d" % (PIN_VAR, p))
    check(b"SOFTHSM2_CONF=" in Path("/proc/%d/environ" % key).read_bytes(),
          "the key process lost SOFTHSM2_CONF")
    check(PIN not in T.text(), "the PIN is in the log")


def worker_descriptors():
    key, workers = T.wait_children(2)
    for w in workers:
        fds = {int(fd): os.readlink("/proc/%d/fd/%s" % (w, fd))
               for fd in os.listdir("/proc/%d/fd" % w)}
        # libmicrohttpd's own (its inter-thread channel, connections)
        # come after the ones the supervisor gave
        given = {fd: t for fd, t in fds.items() if fd <= 5}
        eq(sorted(given), [0, 1, 2, 3, 4, 5], "worker %d's descriptors" % w)
        check(all(given[fd].startswith("socket:") for fd in (3, 4, 5)),
              "worker %d: 3, 4 and 5 are not sockets: %r" % (w, fds))
        eq(fds[0], "/dev/null", "worker %d's stdin" % w)
    # all of them share the supervisor's one listening socket
    listening = {os.readlink("/proc/%d/fd/5" % w) for w in workers}
    eq(len(listening), 1, "listening sockets of the workers")


def worker_killed():
    key, workers = T.wait_children(2)
    ready = len(T.wait_log(r"worker \d+ \(pid \d+\) ready", 2))
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.time()
    key2, now = T.wait_children(2, timeout=5, exclude=[workers[0]])
    took = time.time() - t0
    eq(key2, key, "the key process")
    check(workers[0] not in now and workers[1] in now, "workers %r after the kill" % now)
    check(took < 1.0, "the replacement took %.2f s" % took)
    T.wait_log(r"worker \d+ \(pid \d+\) ready", ready + 1, timeout=5)
    T.wait_log(r"worker 0 \(pid %d\) killed by signal 9" % workers[0])


def key_process_killed():
    key, workers = T.wait_children(2)
    dirs = len(re.findall(r"keys on 1 tokens from the key process", T.text()))
    os.kill(key, signal.SIGKILL)
    key2, now = T.wait_children(2, timeout=10, exclude=[key])
    eq(now, workers, "the workers are the same processes")
    check(key2 != key, "the key process was not replaced")
    # every worker reads the directory again from the new one
    T.wait_log(r"keys on 1 tokens from the key process", dirs + 2, timeout=15)
    T.wait_log(r"key process %d killed by signal 9" % key)


def reload_on_sighup():
    """The key process reloads its tokens, then the workers are replaced:
    new ones start on the new configuration, the old ones stop."""
    key, old = T.wait_children(2)
    n = len(re.findall(r"configuration \S+ in service", T.text()))
    ready = len(re.findall(r"worker \d+ \(pid \d+\) ready", T.text()))
    T.proc.send_signal(signal.SIGHUP)
    T.wait_log(r"configuration \S+ in service", n + 1)
    T.wait_log(r"replacing the workers: 2 start on the new configuration")
    T.wait_log(r"worker \d+ \(pid \d+\) ready", ready + 2)
    key2, new = T.wait_children(2, exclude=old)
    eq(key2, key, "the key process stays")
    check(not set(new) & set(old), "workers after the reload: %r, before %r" % (new, old))
    for p in old:
        T.wait_log(r"worker \d+ \(pid %d\) exited$" % p)
    # a configuration with a problem: logged, nothing replaced
    good = CONF.read_text()
    CONF.write_text(good.replace('"workers": 2', '"workers": 0'))
    try:
        T.proc.send_signal(signal.SIGHUP)
        T.wait_log(r"keeping the running configuration")
    finally:
        CONF.write_text(good)
    eq(T.wait_children(2), (key, new), "processes after a refused reload")


def reloads_in_turn():
    """Two SIGHUPs, the file changed once the key process took the first:
    each reload puts in service the configuration it checked (3 workers,
    then 2), one after the other, and says so once each. (A SIGHUP before
    the first was read would merge with it: signals do not queue.)"""
    def write(text):  # a new inode: a reader never sees half a file
        tmp = CONF.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(CONF)

    good = CONF.read_text()
    n = len(re.findall(r"configuration \S+ in service", T.text()))
    starts = len(re.findall(r"replacing the workers: \d+ start", T.text()))
    took = len(re.findall(r"the key process serves the tokens", T.text()))
    try:
        write(good.replace('"workers": 2', '"workers": 3'))
        T.proc.send_signal(signal.SIGHUP)
        T.wait_log(r"the key process serves the tokens", took + 1)
        write(good)
        T.proc.send_signal(signal.SIGHUP)
        T.wait_log(r"configuration \S+ in service", n + 2)
    finally:
        write(good)
    said = re.findall(r"replacing the workers: (\d+) start", T.text())[starts:]
    eq(said, ["3", "2"], "workers started by the two reloads")
    key, workers = T.wait_children(2)
    eq(len(workers), 2, "workers in the end")


def alive(pid):
    """1 while pid runs (a zombie has ended)."""
    try:
        return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sigterm_stops_all():
    key, workers = T.wait_children(2)
    rc = T.stop()
    eq(rc, 0, "the supervisor's exit status")
    for p in [key] + workers:
        check(not alive(p), "child %d outlived the supervisor" % p)
    text = T.text()
    check(text.index("stopping the workers") < text.rindex("key process stopped"),
          "the key process stopped before the workers")
    findings = [l for l in text.splitlines() if any(m in l for m in F.SANITIZER_MARKERS)]
    check(not findings, "sanitizer report: %s" % findings[:3])


def supervisor_killed():
    t = Tree(CONF, "killed")
    try:
        t.wait_log(r"worker \d+ \(pid \d+\) ready", 2)
        key, workers = t.wait_children(2)
        t.proc.kill()
        t.proc.wait()
        deadline = time.time() + 5
        left = [key] + workers
        while left and time.time() < deadline:
            left = [p for p in left if alive(p)]
            time.sleep(0.05)
        eq(left, [], "children alive 5 s after the supervisor was killed")
    finally:
        t.stop()


def workers_option():
    for value, good in ((1, True), (256, True), (0, False), (257, False), ("2", False)):
        conf = config(WORK / "w.conf", workers=value)
        p = F.run([F.BINARY, "--config", conf, "--check-config"], check=False,
                  env=dict(F.softhsm_env(DEMO), **{PIN_VAR: PIN}))
        eq(p.returncode == 0, good, "--check-config with workers %r (%s)" % (
            value, p.stderr.decode().strip()[-200:]))
        if not good:
            check(b"workers" in p.stderr, "the problem does not name workers")


def main():
    S.case("the supervisor starts one smimed-key and 2 smimed-worker children",
           tree_starts)
    if T is not None and T.proc.poll() is None:
        S.case("only the key process maps the PKCS#11 module", module_only_in_key_process)
        S.case("no PIN in any environment; the key process keeps SOFTHSM2_CONF",
               no_pin_in_environments)
        S.case("a worker gets stdin, stdout, stderr, its control and key sockets and "
               "the shared listening socket", worker_descriptors)
        S.case("a worker killed with SIGKILL is replaced within a second", worker_killed)
        S.case("the key process killed: replaced, every worker gets a new socket",
               key_process_killed)
        S.case("SIGHUP: the key process reloads", reload_on_sighup)
        S.case("two SIGHUPs: each reload serves the configuration it checked, in turn",
               reloads_in_turn)
        S.case("SIGTERM: workers, then the key process; exit 0", sigterm_stops_all)
    S.case("the supervisor killed: its children go too", supervisor_killed)
    S.case("workers is 1 to 256", workers_option)
    if T is not None and T.proc.poll() is None:
        T.proc.kill()
    S.finish()


main()
