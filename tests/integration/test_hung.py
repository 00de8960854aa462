#!/usr/bin/env python3
"""A module hung inside a call stalls only its own tokens (issue 12). The
real daemon with two modules: tests/unit/faulty_p11.c in front of a copy
of the demo token, and SoftHSMv2 directly for another token. faulty_p11
forwards to its own copy of libsofthsm2.so, so the two modules are two
SoftHSM instances and a rebuild of one (C_Finalize) never touches the
other's sessions, as with two real modules.

- the faulty module blocked inside C_Sign (a request held there), and
- the faulty module blocked inside a recovery (block_probe: C_GetTokenInfo,
  C_OpenSession and C_GetSessionInfo held while its context is rebuilt
  after a fault):

in both, a signature with the other module's key, /readyz, /v1/keys and a
SIGHUP reload (its log lines, and the token's new name from the new file
in /readyz) complete within seconds; once the block is lifted the faulty
token serves again (the held request completes; the rebuilt module's token
is found and opened without anyone's SIGHUP)."""

import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("hung")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("hung")
FAULTY = F.BUILD / "tests" / "faulty_p11.so"
FLAG = WORK / "flag"
P11LOG = WORK / "p11.log"
TOKEN = "faulty"
OTHER = "other"
QUICK_S = 3.0    # a request that must not wait for the hung module
RELOAD_S = 10.0  # a reload: the key process gives a hung module 2 s
RECOVER_S = 20.0

D = None
TOK = None
CONF = None
NAMES = [OTHER]  # the other token's name in each configuration written


def msg(tag):
    return "Content-Type: text/plain; charset=us-ascii\r\n\r\nhung: %s\r\n" % tag


def set_flag(text):
    F.set_fault_flag(FLAG, text)


def p11log():
    return F.p11_log_lines(P11LOG)


def wait_for(pred, what, limit, period=0.05):
    return F.wait_until(pred, what, limit, period)


def write_conf(other_name):
    toks = [F.token_config(TOK, name=TOKEN, module=str(FAULTY), max_sessions=1,
                           wait_ms=400, optional=True),
            F.token_config(TOK, name=other_name, uri="pkcs11:token=%s" % OTHER)]
    NAMES.append(other_name)
    return F.write_config(WORK / "hung.conf", toks, workers=2)


def states():
    r = D.request("GET", "/readyz", timeout=QUICK_S)
    return {t["name"]: t.get("state") for t in r.json().get("tokens", [])}


def sign_ok(key, tag):
    r = D.sign(key=key, mime=msg(tag), timeout=30)
    eq(r.status, 200, "sign with %s: status (%r)" % (key, r.body[:300]))
    content = F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
    check(("hung: %s" % tag).encode() in content, "the signed content")


def quick(what, fn):
    t0 = time.monotonic()
    out = fn()
    dt = time.monotonic() - t0
    print("# %s: %.2f s" % (what, dt), flush=True)
    check(dt < QUICK_S, "%s took %.2f s while the module is hung" % (what, dt))
    return out


def the_rest_goes_on(tag):
    """What must not wait for the hung module, each timed."""
    quick("sign with the other module's key", lambda: sign_ok("other-rsa", tag))
    r = quick("/readyz", lambda: D.request("GET", "/readyz", timeout=QUICK_S))
    eq(r.status, 200, "/readyz (the faulty token is optional)")
    got = {t["name"]: t.get("state") for t in r.json()["tokens"]}
    eq(got.get(NAMES[-1]), "ready", "the other token in /readyz (%r)" % got)
    r = quick("/v1/keys", lambda: D.request("GET", "/v1/keys", timeout=QUICK_S))
    eq(r.status, 200, "/v1/keys")
    names = {k.get("name") for k in r.json().get("keys", [])}
    check({"demo-rsa", "other-rsa"} <= names, "/v1/keys lists %r" % sorted(names))
    # a reload with a changed value: the other token gets a new name
    old = NAMES[-1]
    new = "%s-%d" % (OTHER, len(NAMES))
    write_conf(new)
    n_key = D.stderr_text().count("the key process serves the tokens of")
    n_sup = D.stderr_text().count("in service")
    t0 = time.monotonic()
    D.send_signal(signal.SIGHUP)
    wait_for(lambda: D.stderr_text().count("in service") > n_sup,
             "the reload's \"in service\" line", RELOAD_S)
    dt = time.monotonic() - t0
    print("# reload: %.2f s" % dt, flush=True)
    check(D.stderr_text().count("the key process serves the tokens of") > n_key,
          "the key process did not log that it serves the new tokens")
    got = quick("/readyz after the reload", states)
    check(new in got and old not in got, "/readyz after the reload names %r" % got)
    eq(got[new], "ready", "the renamed token after the reload")
    quick("sign with the other module's key after the reload",
          lambda: sign_ok("other-rsa", tag + " after reload"))


# ------------------------------------------------------------------ cases

def start():
    global D, TOK, CONF
    check(FAULTY.exists(), "%s is missing (run ninja -C %s)" % (FAULTY, F.BUILD))
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
    # a file of its own is a module instance of its own (dlopen goes by file)
    real = WORK / "softhsm-for-faulty.so"
    shutil.copyfile(F.softhsm_module(), real)
    CONF = write_conf(OTHER)
    env = F.softhsm_env(TOK)
    env.update({"FAULTY_P11_REAL": str(real), "FAULTY_P11_FLAG": str(FLAG),
                "FAULTY_P11_LOG": str(P11LOG)})
    D = S.daemon(CONF, "hung-daemon", env=env)
    eq(states(), {TOKEN: "ready", OTHER: "ready"}, "token states at start")
    sign_ok("demo-rsa", "start")
    sign_ok("other-rsa", "start")


def hung_in_sign():
    held = {}

    def hold():
        held["r"] = D.sign(key="demo-rsa", mime=msg("held"), timeout=90)
    set_flag("block")
    th = threading.Thread(target=hold)
    try:
        th.start()
        # max_sessions 1: busy means the held request is inside C_SignInit
        wait_for(lambda: states().get(TOKEN) == "busy", "the held request in flight", 10)
        the_rest_goes_on("sign hung")
        check(th.is_alive(), "the held request ended while the module was blocked")
    finally:
        set_flag(None)
    th.join(60)
    check(not th.is_alive(), "the held request never finished")
    eq(held["r"].status, 200, "the held request once released (%r)" % held["r"].body[:200])
    sign_ok("demo-rsa", "after the block in C_Sign")


def hung_in_recovery():
    set_flag("removed")
    try:
        expect_error(D.sign(key="demo-rsa", mime=msg("removed"), timeout=30), 503,
                     "token_unavailable")
    finally:
        # the recovery's first attempt comes 1 s after the fault
        set_flag("block_probe")
    try:
        held = lambda: any(l.startswith("block_probe") for l in p11log())  # noqa: E731
        took = wait_for(held, "the recovery held inside the module", 15)
        print("# the recovery is held inside the module %.2f s after the fault" % took,
              flush=True)
        got = states()
        eq(got.get(TOKEN), "recovering", "the faulty token while its rebuild is held")
        the_rest_goes_on("recovery hung")
        check(any(l.startswith("block_probe") for l in p11log()), "nothing held")
        eq(states().get(TOKEN), "down", "the faulty token of the new configuration, "
           "not opened while its module is held")
    finally:
        set_flag(None)
    took = wait_for(lambda: states().get(TOKEN) == "ready",
                    "the faulty token ready once the module answers", RECOVER_S, 0.2)
    print("# ready %.2f s after the block was lifted" % took, flush=True)
    check("answers now" in D.stderr_text(), "no log line for the reload that opens it")
    sign_ok("demo-rsa", "after the block in the recovery")
    sign_ok("demo-ec", "after the block in the recovery, ec")
    sign_ok("other-rsa", "after the block in the recovery, other")


def main():
    if S.case("daemon on two modules: faulty_p11 (own SoftHSM copy) and SoftHSM", start):
        S.case("a module blocked inside C_Sign: the other module's key, /readyz, "
               "/v1/keys and a SIGHUP reload complete; the held request completes",
               hung_in_sign)
        S.case("a module blocked inside a recovery (probe calls held): the other "
               "module's key, /readyz, /v1/keys and a SIGHUP reload complete; the "
               "token serves again once the block is lifted", hung_in_recovery)
    set_flag(None)
    S.stop_running(pins=[F.read_pin(TOK) if TOK is not None else F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
