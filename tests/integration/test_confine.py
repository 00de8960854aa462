#!/usr/bin/env python3
"""Worker confinement, checked from outside (service/confine.c): the
process tree started as root (smimed --config), each worker's
/proc/PID/status (the configured user, NoNewPrivs 1, Seccomp 2, no
capabilities) and its start line naming what took effect; the key process
and the supervisor unconfined (the key process opens the token store); a
replaced worker and the workers a reload starts confined the same way;
root still reads a worker's memory (the PIN scan), and the PIN is not in
it; clean exits; `user` checked at load.

What a confined worker can and cannot open or call is proved from inside
by the unit test tests/unit/test_confine.c."""

import base64
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("confine")
DEMO = F.ensure_demo()
WORK = F.workdir("confine")
WORK.chmod(0o755)  # the workers' user reads the trust directory
PIN = F.read_pin(DEMO)
PIN_VAR = "SMIMED_CONFINE_PIN"
ROOT = os.geteuid() == 0
NOBODY = 65534
CONFINED = re.compile(r"worker (\d+) confined: (.*)$", re.M)
COMPLETE = re.compile(r"(user \S+|user \d+ \(not started as root: stays\)), no_new_privs, "
                      r"landlock abi (\d+), seccomp \((\d+) rules\)")


def config(path, **top):
    tok = F.token_config(DEMO)
    del tok["pin_file"]
    tok["pin_env"] = PIN_VAR
    trust = WORK / "trust"
    trust.mkdir(exist_ok=True)
    h = F.run(["openssl", "x509", "-noout", "-subject_hash", "-in",
               str(DEMO / "ca.pem")]).stdout.decode().strip()
    (trust / ("%s.0" % h)).write_bytes((DEMO / "ca.pem").read_bytes())
    top.setdefault("workers", 2)
    return F.write_config(path, [tok], trust=str(trust), **top)


CONF = config(WORK / "confine.conf", user="nobody")


D = None  # the daemon: its supervisor, key process and workers


def log_text():
    return D.stderr_text()


def confined():
    """{pid: match} of every worker start line so far."""
    return {int(m.group(1)): m for m in CONFINED.finditer(log_text())}


def wait_workers(n=2, exclude=(), timeout=30):
    """The key process and n workers, each of which logged its line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        check(D.running(), "the supervisor exited: %s" % D.tail(15))
        keys = D.children("smimed-key")
        ws = [p for p in D.children("smimed-worker") if p not in exclude]
        lines = confined()
        if len(keys) == 1 and len(ws) == n and all(w in lines for w in ws):
            return keys[0], ws
        time.sleep(0.05)
    raise AssertionError("workers not confined in %ds: %r; %s" % (
        timeout, D.children(), D.tail(15)))


def status(pid):
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.split()
    return fields


def tree_starts():
    global D
    D = S.daemon(CONF, "confine-tree", env=dict(F.softhsm_env(DEMO), **{PIN_VAR: PIN}))
    key, workers = wait_workers()
    lines = confined()
    for w in workers:
        m = COMPLETE.fullmatch(lines[w].group(2))
        check(m, "worker %d's line names not every confinement: %s" % (w, lines[w].group(0)))
        eq(m.group(1), "user nobody" if ROOT else "user %d (not started as root: stays)"
           % os.geteuid(), "worker %d's user" % w)
        check(int(m.group(2)) >= 1, "landlock abi %s" % m.group(2))
        check(int(m.group(3)) > 50, "seccomp rules %s" % m.group(3))
    check(" warn worker_main: " not in log_text(),
          "a part of the confinement did not take effect: %s" % D.tail(15))


def workers_status():
    key, workers = wait_workers()
    uid = NOBODY if ROOT else os.geteuid()
    for w in workers:
        st = status(w)
        eq(st["Uid"], [str(uid)] * 4, "worker %d's Uid" % w)
        if ROOT:
            eq(st["Gid"], [str(NOBODY)] * 4, "worker %d's Gid" % w)
            eq(st.get("Groups", []), [], "worker %d's supplementary groups" % w)
        eq(st["NoNewPrivs"], ["1"], "worker %d's NoNewPrivs" % w)
        eq(st["Seccomp"], ["2"], "worker %d's Seccomp" % w)
        eq(st["CapEff"], ["0000000000000000"], "worker %d's effective capabilities" % w)
        eq(st["CapPrm"], ["0000000000000000"], "worker %d's permitted capabilities" % w)


def others_unconfined():
    key, workers = wait_workers()
    for pid, what in ((key, "the key process"), (D.proc.pid, "the supervisor")):
        st = status(pid)
        eq(st["Seccomp"], ["0"], "%s's Seccomp" % what)
        eq(st["Uid"][0], str(os.geteuid()), "%s's Uid" % what)
    check(D.proc.pid not in confined() and key not in confined(),
          "only workers log a confinement")


LATIN1 = (b"Content-Type: text/plain; charset=iso-8859-1\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n\r\n"
          b"Caf\xe9 cr\xe8me, na\xefve fa\xe7ade.\r\nFrom the start of a line\r\n")


def workers_serve():
    """Every kind of request, answered by confined workers: what a worker
    needs after it confined itself (the trust directory, iconv, the key
    process over its socket) is there."""
    wait_workers()
    eq(D.request("GET", "/readyz").status, 200, "/readyz")
    r = D.request("GET", "/v1/keys")
    eq(r.status, 200, "/v1/keys")
    eq(sorted(k["name"] for k in r.json()["keys"]), ["demo-ec", "demo-rsa"], "keys")
    for key in ("demo-rsa", "demo-ec"):
        r = D.request("POST", "/v1/sign?key=%s&mode=opaque" % key, body=LATIN1,
                      headers={"Content-Type": "message/rfc822"})
        eq(r.status, 200, "raw 8-bit Latin-1 sign with %s: %s" % (key, r.body[:200]))
        content = F.openssl_verify(r.body, DEMO / "ca.pem", WORK)
        check(b"=E9" in content or b"\xe9" in content, "the signed content lost its text")
        r = D.post_json("/v1/verify", {"mime_base64": base64.b64encode(r.body).decode()})
        eq(r.status, 200, "verify")
        check(r.json()["valid"], "not valid against the trust directory: %r" % r.json())
    r = D.post_json("/v1/encrypt", {"mime": "Content-Type: text/plain\r\n\r\nsecret\r\n",
                                    "recipients": ["demo-rsa", "demo-ec"]})
    eq(r.status, 200, "encrypt")
    sealed = F.mime_of(r.json())
    for key in ("demo-rsa", "demo-ec"):
        r = D.post_json("/v1/decrypt", {"mime": sealed.decode(), "key": key})
        eq(r.status, 200, "decrypt with %s: %s" % (key, r.body[:200]))
        check(b"secret" in F.mime_of(r.json()), "decrypt with %s: the plaintext" % key)
    check("Bad system call" not in log_text(), "a worker was killed by the filter")


def readable_regions(pid):
    for line in Path("/proc/%d/maps" % pid).read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5] if len(parts) > 5 else ""
        if "r" in parts[1] and not path.startswith("[v") and hi - lo < (1 << 30):
            yield lo, hi


def memory_scan():
    """root reads /proc/PID/mem of a confined, non-dumpable worker (the PIN
    scan of the process wall needs it), and the PIN is not there."""
    key, workers = wait_workers()
    for w in workers:
        total = 0
        with open("/proc/%d/mem" % w, "rb", buffering=0) as mem:
            for lo, hi in readable_regions(w):
                try:
                    mem.seek(lo)
                    chunk = mem.read(hi - lo)
                except OSError:
                    continue
                total += len(chunk)
                check(PIN.encode() not in chunk, "the PIN is in worker %d's memory" % w)
        check(total > 1 << 20, "read only %d bytes of worker %d's memory" % (total, w))


def replaced_worker_confined():
    key, workers = wait_workers()
    os.kill(workers[0], signal.SIGKILL)
    key, now = wait_workers(exclude=(workers[0],))
    fresh = [w for w in now if w not in workers]
    eq(len(fresh), 1, "replacement workers")
    eq(status(fresh[0])["Seccomp"], ["2"], "the replacement's Seccomp")


def reload_workers_confined():
    key, workers = wait_workers()
    D.send_signal(signal.SIGHUP)
    deadline = time.time() + 30
    while time.time() < deadline:
        ws = D.children("smimed-worker")
        if ws and not set(ws) & set(workers) and len(ws) == 2 and \
                all(w in confined() for w in ws):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the reload's workers: %r; %s" % (D.children(), D.tail(15)))
    for w in ws:
        eq(status(w)["Seccomp"], ["2"], "worker %d's Seccomp after the reload" % w)


def clean_stop():
    rc = D.stop()
    text = log_text()
    findings = D.sanitizer_findings()
    check(not findings, "sanitizer report: %s" % "; ".join(findings[:3]))
    eq(rc, 0, "the supervisor's exit status")
    after = text.split("begin_stop:", 1)[-1]
    check(not re.search(r"worker \d+ \(pid \d+\) (killed|exited with status)", after),
          "a worker died at stop: %s" % D.tail(15))
    eq(len(re.findall(r"worker \d+ \(pid \d+\) exited$", after, re.M)), 2,
       "workers that exited 0 at stop")
    check(PIN not in text, "the PIN is in the log")
    check("Bad system call" not in text, "a worker was killed by the filter: %s" % D.tail(15))


def log_rotation():
    """A confined worker cannot open the log file again (another user, no
    write under Landlock): at SIGUSR1 the supervisor reopens it and hands
    each worker the new file."""
    log = WORK / "smimed.log"
    conf = config(WORK / "log.conf", user="nobody", log_file=str(log))
    d = S.daemon(conf, "confine-log", env=dict(F.softhsm_env(DEMO), **{PIN_VAR: PIN}))
    try:
        r = d.sign(key="demo-ec", mime="Content-Type: text/plain\r\n\r\nbefore\r\n")
        eq(r.status, 200, "sign before the rotation")
        deadline = time.time() + 10
        while "POST /v1/sign 200" not in log.read_text(errors="replace"):
            check(time.time() < deadline, "no access line in %s" % log)
            time.sleep(0.05)
        check("confined: user nobody" in log.read_text(), "the workers' lines are not in the file")
        old = WORK / "smimed.log.1"
        log.rename(old)
        d.send_signal(signal.SIGUSR1)
        deadline = time.time() + 10
        while not log.exists():
            check(time.time() < deadline, "SIGUSR1 made no new log file")
            time.sleep(0.05)
        time.sleep(0.5)  # the workers take the file after the supervisor made it
        before = old.read_text(errors="replace").count("POST /v1/sign 200")
        for _ in range(4):
            eq(d.sign(key="demo-rsa", mime="Content-Type: text/plain\r\n\r\nafter\r\n").status,
               200, "sign after the rotation")
        deadline = time.time() + 10
        while log.read_text(errors="replace").count("POST /v1/sign 200") < 4:
            check(time.time() < deadline, "the workers do not log to the new file: %s" %
                  log.read_text(errors="replace")[-600:])
            time.sleep(0.05)
        eq(old.read_text(errors="replace").count("POST /v1/sign 200"), before,
           "access lines written to the rotated file")
        check("cannot reopen" not in log.read_text(errors="replace"), "a reopen failed")
    finally:
        rc = d.stop()
    eq(rc, 0, "exit status")


def user_option():
    env = dict(F.softhsm_env(DEMO), **{PIN_VAR: PIN})
    for value, good, say in (("nobody", True, None), ("daemon", True, None),
                             ("smimed-no-such-user", False, "no user"),
                             ("root", False, "root's privileges"), (7, False, "user")):
        conf = config(WORK / "u.conf", user=value)
        p = F.run([F.BINARY, "--config", conf, "--check-config"], check=False, env=env)
        eq(p.returncode == 0, good, "--check-config with user %r (%s)" % (
            value, p.stderr.decode().strip()[-200:]))
        if say:
            check(say.encode() in p.stderr, "the problem does not say %r: %s" % (
                say, p.stderr.decode()[-200:]))


def syscall_groups():
    """{"@group": [members]} as this systemd knows them."""
    out = F.run(["systemd-analyze", "syscall-filter"]).stdout.decode()
    groups, cur = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = groups.setdefault(line.strip(), [])
        elif cur is not None and line.strip() and not line.strip().startswith("#"):
            cur.append(line.strip())
    return groups


def expand(names, groups, seen=None):
    seen = set() if seen is None else seen
    out = set()
    for n in names:
        if n.startswith("@"):
            if n not in seen:
                seen.add(n)
                out |= expand(groups.get(n, []), groups, seen)
        else:
            out.add(n)
    return out


def systemd_lets_confinement_through():
    """SystemCallFilter= lines in order (systemd.exec(5)): the first list
    allows, a later ~list takes away, a later list gives back."""
    groups = syscall_groups()
    unit = (F.REPO / "systemd" / "smimed.service").read_text()
    allowed = set()
    for line in unit.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1].strip()
        if value.startswith("~"):
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed |= expand(value.split(), groups)
    need = ["landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
            "seccomp", "prctl"]
    check(not set(need[:4]) & expand(["@system-service"], groups),
          "@system-service now has the confinement calls; the unit's line is redundant")
    missing = [n for n in need if n not in allowed]
    check(not missing, "the unit's SystemCallFilter refuses %s" % missing)


def main():
    S.case("the tree starts; each worker logs user, no_new_privs, landlock, seccomp",
           tree_starts)
    if D is not None and D.running():
        S.case("from outside: each worker's Uid/Gid, NoNewPrivs 1, Seccomp 2, "
               "no capabilities", workers_status)
        S.case("the key process and the supervisor are not confined", others_unconfined)
        S.case("confined workers serve: /readyz, keys, raw Latin-1 sign (RSA, EC), verify "
               "against the trust directory, encrypt, decrypt", workers_serve)
        S.case("root reads a confined worker's memory after those requests; the PIN is "
               "not in it", memory_scan)
        S.case("a worker killed and replaced: the new one is confined", replaced_worker_confined)
        S.case("SIGHUP: the new workers are confined", reload_workers_confined)
        S.case("SIGTERM: exit 0, confined workers exit cleanly, no sanitizer report",
               clean_stop)
    S.case("log_file: after rotation and SIGUSR1 the confined workers write the new file",
           log_rotation)
    S.case("user: unknown and root are refused at load", user_option)
    S.case("systemd unit: SystemCallFilter lets landlock_* and seccomp through",
           systemd_lets_confinement_through)
    S.finish()


main()
