#!/usr/bin/env python3
"""Token faults end to end: the real daemon on a copy of the demo token
reached through tests/unit/faulty_p11.c (built as <build>/tests/faulty_p11.so),
which wraps SoftHSMv2 and fails on demand while a flag file says so:
"removed" (C_OpenSession and the start of every private-key operation fail
with CKR_DEVICE_REMOVED, as a pulled token) or "refuse" (only the key
operations fail, the token answers everything else).

What the README and DESIGN promise ("A token that stops answering...",
"Login, PINs and token faults"): a failed operation followed by a failing
probe marks the token down, requests for its keys then get 503
token_unavailable at once with Retry-After, /readyz says why, /healthz and
/v1/keys keep answering; decrypt against a dead token is 503, not 422; the
module's context is rebuilt after 1 s, doubling to 30 s, and the token
serves again once it answers, logged in again (one C_Login per rebuild). An operation that fails while the
token still answers leaves the token up; it is a 503 for sign and for
decrypt alike, because the token fails an operation of smimed's own on the
same key too (a known-answer check, independent of the ciphertext, which is
how a decryption learns what OpenSSL's CMS hides), while a damaged message
on a healthy token stays 422."""

import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("faults")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("faults")
FAULTY = F.BUILD / "tests" / "faulty_p11.so"
FLAG = WORK / "fault-flag"
P11LOG = WORK / "faulty-p11.log"
TOKEN = "faulty"
WAIT_MS = 8000
FAST_S = 1.0           # "at once": far below WAIT_MS
RECOVERY_S = 40        # back-off 1 s doubling to 30 s, plus slack

D = None
TOK = None              # the copy of the demo token
ENV = {}                # envelopes made while the token was healthy


def msg(tag):
    return "Content-Type: text/plain; charset=us-ascii\r\n\r\nfaults: %s\r\n" % tag


def plain(tag):
    return ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "secret for the faults suite: %s\r\n" % tag).encode()


def set_flag(word):
    F.set_fault_flag(FLAG, word)


def log_count(name):
    return F.p11_log_count(P11LOG, name)


# ------------------------------------------------------------------ helpers

def timed(fn, *args, **kw):
    t0 = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - t0


def sign_ok(key, tag):
    r = D.sign(key=key, mime=msg(tag))
    eq(r.status, 200, "sign with %s: status (%r)" % (key, r.body[:300]))
    j = r.json()
    eq(j.get("key"), key, "key")
    content = F.openssl_verify(j["mime"].encode(), CA, WORK)
    check(("faults: %s" % tag).encode() in content,
          "verified content does not hold the message: %r" % content[:200])


def decrypt(raw, timeout=120, **fields):
    try:
        fields["mime"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        fields["mime_base64"] = base64.b64encode(raw).decode()
    return D.post_json("/v1/decrypt", fields, timeout=timeout)


def decrypt_ok(key):
    raw, want = ENV[key]
    r = decrypt(raw)
    eq(r.status, 200, "decrypt for %s: status (%r)" % (key, r.body[:300]))
    j = r.json()
    eq(j.get("key"), key, "key")
    F.same_entity(F.mime_of(j), want, "decrypted entity")


def unavailable(r, what):
    """503 token_unavailable with a positive integer Retry-After."""
    try:
        expect_error(r, 503, "token_unavailable")
    except AssertionError as e:
        raise AssertionError("%s: %s" % (what, e))
    ra = r.header("Retry-After")
    check(ra is not None and ra.strip().isdigit() and int(ra) > 0,
          "%s: Retry-After %r, want a positive number of seconds" % (what, ra))
    return r.json()["error"]["message"]


def readyz():
    r = D.request("GET", "/readyz")
    j = r.json()
    toks = j.get("tokens")
    check(isinstance(toks, list), "/readyz: tokens is not a list: %r" % j)
    mine = [t for t in toks if isinstance(t, dict) and t.get("name") == TOKEN]
    eq(len(mine), 1, "/readyz entries named %s (%r)" % (TOKEN, j))
    return r, mine[0]


def readyz_ready():
    r, t = readyz()
    eq(r.status, 200, "/readyz status (%r)" % r.body[:300])
    eq(t.get("state"), "ready", "/readyz state of %s" % TOKEN)


def readyz_down():
    r, t = readyz()
    eq(r.status, 503, "/readyz status (%r)" % r.body[:300])
    eq(t.get("state"), "down", "/readyz state of %s" % TOKEN)
    check(isinstance(t.get("reason"), str) and t["reason"].strip(),
          "/readyz gives no reason for the token being down: %r" % t)
    return t["reason"]


def wait_ready(limit=RECOVERY_S):
    """Polls /readyz until it answers 200; returns the seconds it took."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < limit:
        r, t = readyz()
        last = (r.status, t)
        if r.status == 200:
            eq(t.get("state"), "ready", "/readyz state once 200")
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError("/readyz still not 200 %ds after the fault cleared: %r" % (limit, last))


def keys_state():
    r = D.request("GET", "/v1/keys")
    eq(r.status, 200, "/v1/keys status (%r)" % r.body[:300])
    return {k["name"]: k for k in r.json().get("keys", [])}


# ------------------------------------------------------------------ cases

def start():
    global D, TOK
    check(FAULTY.exists(), "%s is missing (run ninja -C %s)" % (FAULTY, F.BUILD))
    set_flag(None)
    if P11LOG.exists():
        P11LOG.unlink()
    TOK = F.copy_token_dir(DEMO, WORK / "token")
    tok = F.token_config(TOK, name=TOKEN, module=str(FAULTY), wait_ms=WAIT_MS)
    conf = F.write_config(TOK / "faults.conf", [tok])
    env = F.softhsm_env(TOK)
    env.update({"FAULTY_P11_REAL": F.softhsm_module(), "FAULTY_P11_FLAG": str(FLAG),
                "FAULTY_P11_LOG": str(P11LOG)})
    D = S.daemon(conf, "faults-daemon", env=env)
    for key in F.KEYS:
        want = plain("envelope for %s" % key)
        ENV[key] = (F.openssl_encrypt(want, [TOK / ("%s.pem" % key)], WORK, "-aes256"), want)


def healthy():
    readyz_ready()
    # the daemon really went through the wrapper
    check(log_count("C_OpenSession") > 0, "faulty_p11 logged no C_OpenSession: not loaded?")
    eq(log_count("C_Login"), 1, "C_Login calls at start-up")
    for key in F.KEYS:
        sign_ok(key, "healthy %s" % key)
    for key in F.KEYS:
        decrypt_ok(key)
    eq(set(keys_state()), set(F.KEYS), "served keys")


def removed_sign():
    set_flag("removed")
    r, dt = timed(D.sign, key="demo-rsa", mime=msg("removed"))
    unavailable(r, "sign right after the device went away")
    # the token is now down: every request fails at once
    for i, key in enumerate(("demo-rsa", "demo-ec", "demo-rsa", "demo-ec")):
        r, dt = timed(D.sign, key=key, mime=msg("removed %d" % i))
        unavailable(r, "sign #%d with %s while down" % (i, key))
        check(dt < FAST_S, "sign #%d took %.2fs while the token is down (wait_ms %d)"
              % (i, dt, WAIT_MS))
    readyz_down()
    print("# /readyz while removed: %s" % D.request("GET", "/readyz").body.decode(errors="replace"),
          flush=True)
    eq(D.request("GET", "/healthz").status, 200, "/healthz while the token is down")
    keys = keys_state()
    eq(set(keys), set(F.KEYS), "keys listed while the token is down")
    for name, k in keys.items():
        eq(k.get("usable"), False, "%s usable while the token is down" % name)
        check(k.get("reason"), "%s: no reason while the token is down" % name)


def removed_decrypt():
    for key in F.KEYS:
        r, dt = timed(decrypt, ENV[key][0])
        unavailable(r, "decrypt for %s while the device is removed" % key)
        check(dt < FAST_S, "decrypt took %.2fs while the token is down" % dt)
        r = decrypt(ENV[key][0], key=key)
        unavailable(r, "decrypt with forced key %s while the device is removed" % key)
    readyz_down()


def recovery():
    set_flag(None)
    took = wait_ready()
    print("# /readyz 200 again %.1fs after the flag was removed" % took, flush=True)
    for key in F.KEYS:
        sign_ok(key, "recovered %s" % key)
    for key in F.KEYS:
        decrypt_ok(key)
    keys = keys_state()
    for name, k in keys.items():
        eq(k.get("usable"), True, "%s usable after recovery (reason %r)" % (name, k.get("reason")))
    # recovery rebuilt the module's context: one new login, with the PIN
    # read again from its file
    eq(log_count("C_Login"), 2, "C_Login calls after recovery")


def refused():
    set_flag("refuse")
    try:
        for key in F.KEYS:
            r, dt = timed(D.sign, key=key, mime=msg("refused %s" % key))
            unavailable(r, "sign with %s while the token refuses the operation" % key)
            check(dt < FAST_S * 3, "refused sign took %.2fs" % dt)
            readyz_ready()
        for key in F.KEYS:
            r = decrypt(ENV[key][0])
            why = unavailable(r, "decrypt for %s while the token refuses the operation" % key)
            check("CKR_KEY_FUNCTION_NOT_PERMITTED" in why,
                  "the 503 does not give the token's refusal: %r" % why)
            readyz_ready()
        for name, k in keys_state().items():
            eq(k.get("usable"), True, "%s usable while operations are refused" % name)
    finally:
        set_flag(None)
    for key in F.KEYS:
        sign_ok(key, "after refusal %s" % key)
    decrypt_ok("demo-rsa")


def removed_decrypt_first(key):
    """The failed decryption itself (not an earlier signature) meets the
    removed device: the probe, independent of the ciphertext, makes it 503."""
    readyz_ready()
    set_flag("removed")
    try:
        r = decrypt(ENV[key][0])
        unavailable(r, "decrypt for %s as the first operation after removal" % key)
        readyz_down()
    finally:
        set_flag(None)
    wait_ready()
    decrypt_ok(key)


def backoff():
    """While down and polled every 0.1 s, the token is probed (one
    C_OpenSession each) only 1 s after the fault, then 2 s after that, then
    4 s after that; a token that answers again serves only once the next
    probe is due, not at the next request."""
    readyz_ready()
    set_flag("removed")
    try:
        r = D.sign(key="demo-ec", mime=msg("backoff"))
        t0 = time.monotonic()
        unavailable(r, "sign right after the device went away")
        n = log_count("C_OpenSession")
        probes = []
        cleared = None
        ready_at = None
        while time.monotonic() - t0 < 10.5:
            now = time.monotonic() - t0
            if cleared is None and now >= 5.0:
                set_flag(None)
                cleared = now
            r, t = readyz()
            c = log_count("C_OpenSession")
            if c != n:
                probes.append(round(time.monotonic() - t0, 2))
                n = c
            if r.status == 200:
                ready_at = time.monotonic() - t0
                break
            check(t.get("state") in ("down", "recovering"),
                  "/readyz state while down: %r" % t.get("state"))
            time.sleep(0.1)
    finally:
        set_flag(None)
    print("# probes at %s s after the fault, flag cleared at %.1f s, ready at %s s"
          % (probes, cleared or -1, "%.2f" % ready_at if ready_at else "-"), flush=True)
    # lower bounds: the fault is marked just before t0; upper: poll period
    # plus slack for a loaded sanitizer build
    check(len(probes) >= 2 and 0.9 <= probes[0] <= 2.0 and 2.9 <= probes[1] <= 4.0,
          "probes at %s s, want about 1 and 3 s after the fault" % probes)
    check(ready_at is not None, "not ready 10.5 s after the fault (5.5 s after clearing)")
    check(6.9 <= ready_at <= 8.5, "ready again %.2f s after the fault, want about 7 s "
          "(the third probe, 4 s after the second)" % ready_at)
    # the attempt that succeeds opens several sessions (probe, login, libp11),
    # which a poll may see in two steps; no attempt comes in between
    check(len(probes) >= 3 and all(p - probes[2] < 0.5 for p in probes[3:]),
          "probes while polled for %.1f s: %s, want three attempts" % (ready_at, probes))
    sign_ok("demo-ec", "after backoff")


def main():
    if not S.case("daemon starts on a demo token copy behind faulty_p11", start):
        S.finish()
    ok = S.case("healthy through the wrapper: /readyz 200, sign and decrypt with both keys",
                healthy)
    if ok:
        S.case("device removed: sign 503 token_unavailable + Retry-After, then 503 at once; "
               "/readyz 503 with reason, /healthz 200, /v1/keys usable false", removed_sign)
        S.case("device removed: decrypt 503 token_unavailable, not 422", removed_decrypt)
        S.case("flag cleared: /readyz 200 within %ds, sign and decrypt verify again, no new login"
               % RECOVERY_S, recovery)
        S.case("operations refused, token alive: sign and decrypt 503, /readyz stays 200",
               refused)
        for key in F.KEYS:
            S.case("device removed under a first decrypt (%s): 503, down, recovers" % key,
                   removed_decrypt_first, key)
        S.case("back-off: re-probed 1 s, then 3 s, then 7 s after the fault, "
               "however often asked; serves only after a passing probe", backoff)
    set_flag(None)
    S.stop_running(pins=[F.read_pin(TOK) if TOK is not None else F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
