#!/usr/bin/env python3
"""Token faults met inside the key process (smimed --role=key), through
tests/unit/faulty_p11.c in front of a copy of the demo token, and a second
token on SoftHSM directly (another module):

- a token reset or stale handles under a SIGN, a DECRYPT or a DERIVE: the
  key process rebuilds the module's context and retries once (the retry
  api/ does in the single-process daemon), one new C_Login, the result is
  right, STATE counts the retry;
- a token hung inside an operation: its other operations are answered
  busy after wait_ms, while KEYS, STATE, keys on the other module and a
  reload all complete; the held operation finishes once released;
- a token that refuses every operation: SIGN is 'unavailable' (the token,
  not the input, is to blame) and DECRYPT the same, never 'failed'."""

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
import keyproto as K  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("keyfaults")
DEMO = F.ensure_demo()
WORK = F.workdir("keyfaults")
FAULTY = F.BUILD / "tests" / "faulty_p11.so"
FLAG = WORK / "flag"
P11LOG = WORK / "p11.log"
OTHER = "other"
TOK = None
KP = None
C = None


def set_flag(text):
    F.set_fault_flag(FLAG, text)


def logins():
    return F.p11_log_count(P11LOG, "C_Login")


def token(conn, name):
    for t in conn.state():
        if t["name"] == name:
            return t
    raise AssertionError("no token %s in STATE" % name)


def verify(pem, digest, sig):
    d, s = WORK / "d.bin", WORK / "s.bin"
    d.write_bytes(digest)
    s.write_bytes(sig)
    p = F.run(["openssl", "pkeyutl", "-verify", "-certin", "-inkey", pem, "-in", d,
               "-sigfile", s, "-pkeyopt", "digest:sha256"], check=False)
    return p.returncode == 0


def sign(conn, key, tag, mech=K.ECDSA):
    d = hashlib.sha256(tag.encode()).digest()
    return d, conn.call(K.SIGN, K.sign_body(key, mech, K.MD_SHA256, d,
                                            cl=K.claims(os.urandom(8).hex())), timeout=60)


def start():
    global TOK, KP, C
    check(FAULTY.exists(), "%s is missing" % FAULTY)
    set_flag(None)
    TOK = F.copy_token_dir(DEMO, WORK / "token")
    env = F.softhsm_env(TOK)
    env["SMIMED_TEST_PIN"] = F.read_pin(TOK)
    env["SMIMED_TEST_SO_PIN"] = (TOK / "so-pin").read_text().splitlines()[0]
    F.run(["pkcs11-tool", "--module", F.softhsm_module(), "--slot-index", "1",
           "--init-token", "--label", OTHER, "--so-pin", "env:SMIMED_TEST_SO_PIN"], env=env)
    F.run(["pkcs11-tool", "--module", F.softhsm_module(), "--token-label", OTHER,
           "--login", "--login-type", "so", "--so-pin", "env:SMIMED_TEST_SO_PIN",
           "--init-pin", "--new-pin", "env:SMIMED_TEST_PIN"], env=env)
    F.add_token_key(TOK, "other-rsa", "b1", "rsa:2048", "other@demo.smimed.test",
                    "digitalSignature", token=OTHER)
    toks = [F.token_config(TOK, name="faulty", module=str(FAULTY), max_sessions=1,
                           wait_ms=400),
            F.token_config(TOK, name=OTHER, uri="pkcs11:token=%s" % OTHER)]
    conf = F.write_config(WORK / "key.conf", toks, audit_log=str(WORK / "audit.log"))
    env = dict(F.softhsm_env(TOK), **F.sanitizer_env())
    env.update({"FAULTY_P11_REAL": F.softhsm_module(), "FAULTY_P11_FLAG": str(FLAG),
                "FAULTY_P11_LOG": str(P11LOG)})
    KP = K.KeyProcess(F.BINARY, conf, WORK / "key.stderr", env=env)
    KP.wait_ready()
    C = KP.connect(1)
    eq(logins(), 1, "C_Login calls at start")


def reset_retried():
    pem = TOK / "demo-rsa.pem"
    for word in ("session_invalid", "stale"):
        before, t0 = logins(), token(C, "faulty")
        set_flag(word)
        try:
            d, rep = sign(C, "demo-rsa", word, K.PKCS1)
        finally:
            set_flag(None)
        eq(rep.status, "ok", "SIGN after %s (%r)" % (word, rep))
        check(verify(pem, d, rep.data), "the signature after %s does not verify" % word)
        eq(logins(), before + 1, "C_Login calls after %s" % word)
        t1 = token(C, "faulty")
        eq((t1["state"], t1["retries"], t1["recoveries"]),
           (0, t0["retries"] + 1, t0["recoveries"] + 1), "state, retries, recoveries")


def reset_decrypt_derive_retried():
    secret = os.urandom(32)
    ct = F.run(["openssl", "pkeyutl", "-encrypt", "-certin", "-inkey",
                TOK / "demo-rsa.pem"], input=secret).stdout
    before = logins()
    set_flag("stale")
    try:
        rep = C.call(K.DECRYPT, K.decrypt_body("demo-rsa", K.PAD_PKCS1, ct), timeout=60)
    finally:
        set_flag(None)
    eq((rep.status, rep.data), ("ok", secret), "DECRYPT after stale handles")
    eq(logins(), before + 1, "C_Login calls after the DECRYPT")
    eph = WORK / "eph.pem"
    F.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
           "ec_paramgen_curve:P-256", "-out", eph])
    pub = F.run(["openssl", "pkey", "-in", eph, "-pubout", "-outform", "DER"]).stdout
    peer = WORK / "ec-pub.pem"
    peer.write_bytes(F.run(["openssl", "x509", "-in", TOK / "demo-ec.pem", "-pubkey",
                            "-noout"]).stdout)
    want = F.run(["openssl", "pkeyutl", "-derive", "-inkey", eph, "-peerkey", peer]).stdout
    before = logins()
    set_flag("session_invalid")
    try:
        rep = C.call(K.DERIVE, K.derive_body("demo-ec", pub[-65:]), timeout=60)
    finally:
        set_flag(None)
    eq((rep.status, rep.data), ("ok", want), "DERIVE after a reset")
    eq(logins(), before + 1, "C_Login calls after the DERIVE")


def refused_is_the_token():
    set_flag("refuse")
    try:
        _, rep = sign(C, "demo-ec", "refused")
        drep = C.call(K.DECRYPT, K.decrypt_body("demo-rsa", K.PAD_PKCS1, os.urandom(256)),
                      timeout=60)
    finally:
        set_flag(None)
    eq(rep.status, "unavailable", "SIGN on a token that refuses every operation")
    check(rep.retry_after > 0, "no retry_after")
    eq(drep.status, "unavailable", "DECRYPT on a token that refuses every operation")
    eq(token(C, "faulty")["state"], 0, "the token stays up")
    _, rep = sign(C, "demo-ec", "after refuse")
    eq(rep.status, "ok", "SIGN once it no longer refuses")


def hung_token():
    held = {}
    conn2 = KP.connect(2)

    def hold():
        held["rep"] = sign(conn2, "demo-rsa", "held", K.PKCS1)[1]
    set_flag("block")
    th = threading.Thread(target=hold)
    try:
        th.start()
        deadline = time.time() + 10
        while time.time() < deadline and token(C, "faulty")["in_flight"] != 1:
            time.sleep(0.05)
        eq(token(C, "faulty")["in_flight"], 1, "the held operation in flight")
        t0 = time.monotonic()
        _, rep = sign(C, "demo-ec", "excess")
        dt = time.monotonic() - t0
        eq(rep.status, "busy", "an excess operation on the hung token")
        check(0.35 <= dt < 3.0, "busy after %.2f s, want about wait_ms (0.4 s)" % dt)
        for what, call in (("KEYS", lambda: C.call(K.KEYS, K.u32(0))),
                           ("STATE", lambda: C.call(K.STATE, K.u32(0))),
                           ("SIGN other-rsa", lambda: sign(C, "other-rsa", "other",
                                                           K.PKCS1)[1])):
            t0 = time.monotonic()
            rep = call()
            eq(rep.status, "ok", "%s while the token is hung" % what)
            check(time.monotonic() - t0 < 2.0, "%s waited for the hung token" % what)
        t0 = time.monotonic()
        eq(KP.control(K.CTL_RELOAD, timeout=20), 1, "a reload while the token is hung")
        check(time.monotonic() - t0 < 10, "the reload took %.1f s" % (time.monotonic() - t0))
        check(th.is_alive(), "the held operation ended while the token was hung")
    finally:
        set_flag(None)
    th.join(60)
    eq(held["rep"].status, "ok", "the held operation once released")
    _, rep = sign(C, "demo-ec", "after release")
    eq(rep.status, "ok", "SIGN after the release")
    conn2.close()


def stop():
    C.close()
    eq(KP.stop(), 0, "exit status")
    text = Path(KP.log_path).read_text(errors="replace")
    findings = [l for l in text.splitlines() if any(m in l for m in F.SANITIZER_MARKERS)]
    check(not findings, "sanitizer report: %s" % findings[:3])


def main():
    if S.case("a key process on the faulty token and another module", start):
        S.case("a reset or stale handles under SIGN: rebuilt, retried once, one C_Login",
               reset_retried)
        S.case("the same under DECRYPT and DERIVE", reset_decrypt_derive_retried)
        S.case("a token that refuses every operation: unavailable, never failed",
               refused_is_the_token)
        S.case("a hung token: busy after wait_ms; KEYS, STATE, the other module and a "
               "reload complete", hung_token)
        S.case("STOP: exit 0, no sanitizer report", stop)
    if KP is not None and KP.proc.poll() is None:
        KP.proc.kill()
    S.finish()


main()
