#!/usr/bin/env python3
"""Chaos under load: the real daemon on a copy of the demo token reached
through tests/unit/faulty_p11.c, serving mixed sign, decrypt, verify and
encrypt requests (JSON and raw mode, demo-rsa and demo-ec) from several
client threads, while the token is pulled out (removed), reset (every
session closed), logged out, left with stale sessions while still logged in,
slowed down (latency), held (block), and the configuration is reloaded
(SIGHUP), at intervals, for CHAOS_S seconds.

What must hold, whatever the interleaving:
- every answer is a 200 or a JSON 503 token_unavailable / token_busy /
  server_busy with a positive Retry-After; nothing else, and every request
  gets an answer;
- every 200 is right, checked independently: a signature verifies with
  `openssl cms -verify` against the demo CA and carries the content sent; a
  decryption gives back exactly what openssl encrypted; an encryption
  decrypts with `openssl cms -decrypt` and the file key of its recipient; a
  verification says valid, with the content openssl signed;
- the daemon never dies, serves again once the faults stop, and exits 0 on
  SIGTERM with no sanitizer report.

The clients' choices and the fault schedule come from seeded generators
(SMIMED_CHAOS_SEED, default below), so a run can be repeated; the
interleaving with the daemon's threads cannot be, which is the point. The
assertions are on correctness only, never on timing. The suite prints what
it did: requests by endpoint, mode and answer, faults injected, reloads."""

import collections
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("chaos")
DEMO = F.ensure_demo()
WORK = F.workdir("chaos")
FAULTY = F.BUILD / "tests" / "faulty_p11.so"
FLAG = WORK / "flag"
SEED = int(os.environ.get("SMIMED_CHAOS_SEED", "20261111"))
CHAOS_S = float(os.environ.get("SMIMED_CHAOS_SECONDS", "60"))
CLIENTS = 6
TOKEN = "chaos"
RAW = {"Content-Type": "message/rfc822"}
# Two sessions for six clients, so requests queue and a held token turns
# some of them into token_busy; wait_ms alternates with each reload, so a
# reload is a change of configuration.
MAX_SESSIONS = 2
WAIT_MS = (1500, 2000)
RECOVER_S = 45          # back-off 1, 2, 4, 8 s... after the longest fault
OVERTIME_S = 240        # how long the first round of faults may overrun CHAOS_S
ALLOWED_503 = ("token_unavailable", "token_busy", "server_busy")

D = None
TOK = None
CA = None               # the demo CA (signatures)
PKI = None              # file-key CA: encryption recipients, verify input
FILE = {}               # "rsa" / "ec" -> F.Cert, also imported as chaos-rsa / chaos-ec
ENVELOPES = {}          # key -> [(envelope, plaintext)]
SIGNED = []             # (signed entity, content) made by openssl with the file keys
STATS = collections.Counter()   # (endpoint, mode, answer) -> count
FAULTS = collections.Counter()
PROBLEMS = []           # what went wrong, with the request that showed it
LOCK = threading.Lock()
RELOADS = {"sent": 0}


def plain(tag):
    return ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "chaos: %s\r\n" % tag).encode()


def problem(text):
    with LOCK:
        PROBLEMS.append(text)


def count(endpoint, mode, answer):
    with LOCK:
        STATS[(endpoint, mode, answer)] += 1


def set_flag(text):
    F.set_fault_flag(FLAG, text)


def write_config(wait_ms):
    tok = F.token_config(TOK, name=TOKEN, module=str(FAULTY), wait_ms=wait_ms,
                         max_sessions=MAX_SESSIONS)
    return F.write_config(WORK / "chaos.conf", [tok], trust=str(WORK / "trust.pem"))


# ------------------------------------------------------------------ set-up

def start():
    global D, TOK, CA, PKI
    check(FAULTY.exists(), "%s is missing (run ninja -C %s)" % (FAULTY, F.BUILD))
    set_flag(None)
    TOK = F.copy_token_dir(DEMO, WORK / "token")
    CA = TOK / "ca.pem"
    PKI = F.TestCA(WORK, "chaos-ca")
    FILE["rsa"] = PKI.issue("chaos-rsa", "rsa")
    FILE["ec"] = PKI.issue("chaos-ec", "ec")
    # the file keys are also served (discovery), so raw-mode encryption can
    # name them; openssl decrypts what they receive with the file key
    F.import_token_key(TOK, "chaos-rsa", "c1", FILE["rsa"])
    F.import_token_key(TOK, "chaos-ec", "c2", FILE["ec"])
    (WORK / "trust.pem").write_bytes(CA.read_bytes() + PKI.pem.read_bytes())
    gen = random.Random(SEED)
    ciphers = ("-aes256", "-aes128", "-aes-256-gcm")
    for key in ("demo-rsa", "demo-ec"):
        ENVELOPES[key] = []
        for i in range(6):
            want = plain("envelope %d for %s" % (i, key))
            env = F.openssl_encrypt(want, [TOK / ("%s.pem" % key)], WORK, gen.choice(ciphers))
            ENVELOPES[key].append((env, want))
    for kind in ("rsa", "ec"):
        for detached in (True, False):
            content = plain("signed by openssl, %s, detached %s" % (kind, detached))
            c = FILE[kind]
            SIGNED.append((F.openssl_sign(content, c.pem, c.key, WORK, detached=detached),
                           content))
    D = S.daemon(write_config(WAIT_MS[0]), "chaos-daemon", env=faulty_env())


def faulty_env():
    env = F.softhsm_env(TOK)
    env.update({"FAULTY_P11_REAL": F.softhsm_module(), "FAULTY_P11_FLAG": str(FLAG)})
    return env


def ready():
    r = D.request("GET", "/readyz", timeout=30)
    return r.status == 200


def healthy():
    eq(ready(), True, "/readyz 200 before the chaos")
    work = F.workdir("chaos-healthy")
    for i, key in enumerate(("demo-rsa", "demo-ec")):
        ok, why = one_request(random.Random(i), work, "healthy", op=("sign", "json", key))
        check(ok is True, "sign with %s: %s" % (key, why))
        ok, why = one_request(random.Random(i), work, "healthy", op=("decrypt", "json", key))
        check(ok is True, "decrypt for %s: %s" % (key, why))


# ------------------------------------------------------------------ the clients

def answer_503(r):
    """None when r is the JSON 503 load or a token fault may give, else why not."""
    try:
        j = r.json()
        code = j["error"]["code"]
        msg = j["error"]["message"]
    except Exception:
        return "503 without a JSON error body: %r" % r.body[:200]
    if code not in ALLOWED_503:
        return "503 %s: %s" % (code, msg)
    ra = r.header("Retry-After")
    if ra is None or not ra.strip().isdigit() or int(ra) <= 0:
        return "503 %s with Retry-After %r" % (code, ra)
    ctype = (r.header("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return "503 %s with Content-Type %r" % (code, r.header("Content-Type"))
    return None


def signed_ok(raw, tag, work):
    content = F.openssl_verify(raw, CA, work)
    check(("chaos: %s" % tag).encode() in content,
          "the verified content does not hold the message sent: %r" % content[:200])


def one_request(gen, work, tag, op=None):
    """One request chosen by gen (or op: (endpoint, mode, key)), checked.
    (True, None) for a right 200, (False, code) for an allowed 503, and
    (None, why) for anything else."""
    endpoint, mode, key = op or (gen.choice(("sign", "decrypt", "verify", "encrypt")),
                                 gen.choice(("json", "raw")),
                                 gen.choice(("demo-rsa", "demo-ec")))
    what = "%s %s %s (%s)" % (endpoint, mode, key, tag)
    if endpoint == "sign":
        smode = gen.choice(("detached", "opaque"))
        msg = plain(tag)
        if mode == "json":
            r = D.post_json("/v1/sign", {"key": key, "mime": msg.decode(), "mode": smode},
                            timeout=60)
        else:
            r = D.request("POST", "/v1/sign?key=%s&mode=%s" % (key, smode), body=msg,
                          headers=RAW, timeout=60)
    elif endpoint == "decrypt":
        env, want = gen.choice(ENVELOPES[key])
        forced = gen.random() < 0.5
        if mode == "json":
            fields = {"mime": env.decode("ascii")}
            if forced:
                fields["key"] = key
            r = D.post_json("/v1/decrypt", fields, timeout=60)
        else:
            r = D.request("POST", "/v1/decrypt" + ("?key=%s" % key if forced else ""),
                          body=env, headers=RAW, timeout=60)
    elif endpoint == "verify":
        signed, content = gen.choice(SIGNED)
        if mode == "json":
            r = D.post_json("/v1/verify", {"mime": signed.decode("ascii")}, timeout=60)
        else:
            r = D.request("POST", "/v1/verify", body=signed, headers=RAW, timeout=60)
    else:
        kind = "rsa" if key == "demo-rsa" else "ec"
        msg = plain(tag)
        if mode == "json":
            rcpt = gen.choice((FILE[kind].pem_text(), "chaos-" + kind))
            r = D.post_json("/v1/encrypt", {"mime": msg.decode(), "recipients": [rcpt]},
                            timeout=60)
        else:
            r = D.request("POST", "/v1/encrypt?recipients=chaos-" + kind, body=msg,
                          headers=RAW, timeout=60)
    if r.status == 503:
        why = answer_503(r)
        if why is not None:
            count(endpoint, mode, "503 (wrong)")
            return None, "%s: %s" % (what, why)
        code = r.json()["error"]["code"]
        count(endpoint, mode, "503 " + code)
        return False, code
    if r.status != 200:
        count(endpoint, mode, "%d" % r.status)
        return None, "%s: status %d, body %r" % (what, r.status, r.body[:300])
    count(endpoint, mode, "200")
    try:
        body = F.mime_of(r.json()) if mode == "json" or endpoint == "verify" else r.body
        if endpoint == "sign":
            signed_ok(body, tag, work)
        elif endpoint == "decrypt":
            F.same_entity(body, want, "decrypted entity")
        elif endpoint == "verify":
            j = r.json()
            eq(j.get("valid"), True, "valid (%r)" % j)
            F.same_entity(body, content, "verified content")
        else:
            kind = "rsa" if key == "demo-rsa" else "ec"
            got = F.openssl_decrypt(body, FILE[kind].pem, FILE[kind].key, work)
            F.same_entity(got, msg, "what openssl decrypts")
    except AssertionError as e:
        count(endpoint, mode, "200 (wrong)")
        return None, "%s: a wrong 200: %s" % (what, str(e).splitlines()[0][:300])
    return True, None


def client(i, stop):
    gen = random.Random(SEED * 100 + i)
    work = F.workdir("chaos-client%d" % i)
    n = 0
    while not stop.is_set():
        n += 1
        tag = "client %d request %d" % (i, n)
        try:
            ok, why = one_request(gen, work, tag)
        except Exception as e:  # no answer at all, or a broken one
            count("?", "?", "no answer")
            problem("%s: %s: %s" % (tag, type(e).__name__, str(e)[:300]))
            ok, why = None, None
            if not D.running():
                return
        if ok is None and why is not None:
            problem(why)
        if ok is False:
            # a client that respects Retry-After, without waiting seconds
            stop.wait(0.05 + gen.random() * 0.2)


# ------------------------------------------------------------------ the faults

def wait_ready(stop_at):
    """Polls /readyz until 200; False when stop_at passes first."""
    while time.monotonic() < stop_at:
        try:
            if ready():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def reload():
    RELOADS["sent"] += 1
    write_config(WAIT_MS[RELOADS["sent"] % 2])
    D.send_signal(signal.SIGHUP)


# One round of faults, shuffled anew for each round so that every kind
# meets every other before and after it; stale sessions (the case that
# was a 422) and reloads come twice.
FAULT_ROUND = ("removed", "session_invalid", "stale", "not_logged_in", "latency", "block",
               "reload", "stale", "reload")


def injector(stop, deadline):
    """Faults until the deadline, and at least one whole round of them
    however long that takes on a busy machine (within a bound)."""
    gen = random.Random(SEED + 1)
    plan, rounds = [], 0
    while not stop.is_set():
        now = time.monotonic()
        if now >= deadline and (rounds > 1 or not plan) or now >= deadline + OVERTIME_S:
            break
        if not plan:
            plan = list(FAULT_ROUND)
            gen.shuffle(plan)
            rounds += 1
        stop.wait(0.5 + gen.random() * 1.5)
        if stop.is_set():
            break
        name = plan.pop()
        FAULTS[name] += 1
        if name == "reload":
            reload()
        elif name in ("session_invalid", "stale", "not_logged_in"):
            set_flag(name)       # one shot: carried out by the next call
        else:
            word, hold = {
                "removed": ("removed", 0.8 + gen.random() * 0.8),
                "latency": ("latency %d" % gen.choice((50, 200, 500)),
                            1.5 + gen.random() * 1.5),
                # held past wait_ms at times: queued requests get token_busy
                "block": ("block", 1.0 + gen.random() * 2.0),
            }[name]
            # half the time a reload meets the fault: one that would lose
            # a token (removed) is refused, the others build a new set
            # while the token is slow or held
            midway = gen.random() < 0.5
            set_flag(word)
            stop.wait(hold / 2)
            if midway:
                FAULTS["reload during " + name] += 1
                reload()
            stop.wait(hold / 2)
            set_flag(None)
        if not D.running():
            return
        # the next fault meets a token that serves (a removal is over once
        # the recovery loop's back-off lets it back)
        if not wait_ready(time.monotonic() + RECOVER_S):
            problem("/readyz not 200 within %d s after the fault %s ended" % (RECOVER_S, name))
            return


def chaos():
    stop = threading.Event()
    deadline = time.monotonic() + CHAOS_S
    errors = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except Exception:
            errors.append(traceback.format_exc())
            stop.set()
    clients = [threading.Thread(target=guarded, args=(client, i, stop)) for i in range(CLIENTS)]
    inj = threading.Thread(target=guarded, args=(injector, stop, deadline))
    t0 = time.monotonic()
    for t in clients + [inj]:
        t.start()
    # the clients keep going until the faults end and the token is back
    inj.join(CHAOS_S + OVERTIME_S + RECOVER_S + 30)
    stop.set()
    for t in clients:
        t.join(120)
    set_flag(None)
    took = time.monotonic() - t0
    report(took)
    check(not errors, "a test thread failed:\n%s" % "\n".join(errors)[:2000])
    check(D.running(), "the daemon died (exit %r):\n%s" % (D.proc and D.proc.poll(), D.tail()))
    check(not any(t.is_alive() for t in clients + [inj]), "a client is still waiting for an answer")
    check(not PROBLEMS, "%d wrong answers, the first: %s" % (len(PROBLEMS), "; ".join(PROBLEMS[:5])))
    # the run tested something: each kind of request was answered and
    # checked, and the faults reached requests
    for endpoint in ("sign", "decrypt", "verify", "encrypt"):
        for mode in ("json", "raw"):
            check(STATS[(endpoint, mode, "200")] > 0, "no %s %s request succeeded" % (endpoint, mode))
    check(sum(v for k, v in STATS.items() if k[2].startswith("503 ")) > 0,
          "no request met a fault: the faults were not injected")
    for name in FAULT_ROUND:
        check(FAULTS[name] > 0, "the fault %s was never injected (the run was too short)" % name)


def report(took):
    print("# chaos: seed %d, %.1f s, %d clients" % (SEED, took, CLIENTS), flush=True)
    total = collections.Counter()
    for (endpoint, mode, answer), n in sorted(STATS.items()):
        print("#   %-7s %-4s %-24s %6d" % (endpoint, mode, answer, n), flush=True)
        total[answer] += n
    print("#   all: %s" % ", ".join("%s %d" % kv for kv in sorted(total.items())), flush=True)
    print("#   faults: %s" % ", ".join("%s %d" % kv for kv in sorted(FAULTS.items())), flush=True)
    text = D.stderr_text()
    # from the log, so with the reloads smimed asks for itself when a token
    # absent at the last load comes back
    print("#   reloads: %d sent, %d in service, %d refused" % (
        RELOADS["sent"], len(re.findall(r"configuration \S+ in service", text)),
        text.count("keeping the running configuration")), flush=True)
    print("#   token events: %d down, %d ready" % (
        len(re.findall(r"token %s down" % TOKEN, text)),
        len(re.findall(r"token %s ready" % TOKEN, text))), flush=True)


def after():
    """The faults stopped: the token serves again, every kind of request is
    answered right."""
    check(wait_ready(time.monotonic() + RECOVER_S), "/readyz not 200 %d s after the chaos" % RECOVER_S)
    work = F.workdir("chaos-after")
    gen = random.Random(SEED + 2)
    for endpoint in ("sign", "decrypt", "verify", "encrypt"):
        for mode in ("json", "raw"):
            for key in ("demo-rsa", "demo-ec"):
                ok, why = one_request(gen, work, "after %s %s %s" % (endpoint, mode, key),
                                      op=(endpoint, mode, key))
                check(ok is True, "%s %s %s after the chaos: %s" % (endpoint, mode, key, why))


def main():
    if not S.case("daemon starts on a demo token copy behind faulty_p11", start):
        S.finish()
    if S.case("healthy: sign and decrypt with both keys", healthy):
        S.case("%d clients, mixed requests, faults and reloads for %d s: every answer a "
               "verified 200 or a JSON 503 with Retry-After" % (CLIENTS, CHAOS_S), chaos)
        S.case("after the chaos: ready again, every endpoint and mode right", after)
    set_flag(None)
    S.stop_running(pins=[F.read_pin(TOK) if TOK is not None else F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
