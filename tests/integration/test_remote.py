#!/usr/bin/env python3
"""A remote token: keys on a custody host behind `p11-kit server`, the
daemon loading p11-kit-client.so (p11-kit 0.24's PKCS#11 remoting over a
Unix socket). Signing (RSA and ECDSA) and RSA decryption work through it,
checked with the openssl CLI; ECDH is not carried (the client does not
list CKM_ECDH1_DERIVE; C_DeriveKey would fail with CKR_MECHANISM_INVALID),
so decrypting for the EC key is a 422 operation_unsupported that says why.
When the custody side restarts, the daemon's context is rebuilt (the client
reconnects in C_Initialize) and the token serves again without a restart.
The PIN travels over the socket at login: the daemon reads it from its own
file, never from the server's side."""

import base64
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

S = F.Suite("remote")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("remote")
SOCK = WORK / "p11.sock"
CLIENTS = glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so")
TOKEN = "custody"
RECOVER_S = 20

D = None
TOK = None
SERVER = None
ENV = {}


def msg(tag):
    return "Content-Type: text/plain; charset=us-ascii\r\n\r\nremote: %s\r\n" % tag


def plain(tag):
    return ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "secret through p11-kit: %s\r\n" % tag).encode()


def wait_for(pred, what, limit, period=0.1):
    return F.wait_until(pred, what, limit, period)


def start_server():
    """p11-kit server for the token copy, in the foreground, on SOCK."""
    global SERVER
    if SOCK.exists():
        SOCK.unlink()
    env = dict(os.environ)
    env.update(F.softhsm_env(TOK))
    SERVER = subprocess.Popen(
        ["p11-kit", "server", "-f", "-n", str(SOCK), "--provider", F.softhsm_module(),
         "pkcs11:token=smimed-demo"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(WORK / "server.stderr", "ab"), env=env, start_new_session=True)
    wait_for(SOCK.exists, "p11-kit server socket", 30)


def stop_server():
    """Stops the server and the per-connection processes it forked (its own
    process group): the custody host going away, connections included."""
    if SERVER is None:
        return
    try:
        os.killpg(SERVER.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    SERVER.wait(30)


def sign_ok(key, tag):
    r = D.sign(key=key, mime=msg(tag))
    eq(r.status, 200, "sign with %s through p11-kit (%r)" % (key, r.body[:300]))
    content = F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
    check(("remote: %s" % tag).encode() in content, "verified content: %r" % content[:200])


def decrypt(raw, **fields):
    fields["mime"] = raw.decode("ascii")
    return D.post_json("/v1/decrypt", fields)


def state():
    r = D.request("GET", "/readyz")
    return [t for t in r.json()["tokens"] if t["name"] == TOKEN][0]["state"]


def start():
    global D, TOK
    check(CLIENTS, "p11-kit-client.so is not installed (package p11-kit-modules, in "
          "script/packages.txt): run script/bootstrap")
    TOK = F.copy_token_dir(DEMO, WORK / "token")
    start_server()
    tok = F.token_config(TOK, name=TOKEN, module=CLIENTS[0])
    conf = F.write_config(WORK / "remote.conf", [tok])
    # the daemon sees only the socket, not the token store
    D = S.daemon(conf, "remote-daemon",
                 env={"P11_KIT_SERVER_ADDRESS": "unix:path=%s" % SOCK})
    for key in F.KEYS:
        want = plain(key)
        ENV[key] = (F.openssl_encrypt(want, [TOK / ("%s.pem" % key)], WORK, "-aes256"), want)


def signing():
    eq(state(), "ready", "state")
    for key in F.KEYS:
        sign_ok(key, "sign %s" % key)


def rsa_decrypt():
    raw, want = ENV["demo-rsa"]
    for fields in ({}, {"key": "demo-rsa"}):
        r = decrypt(raw, **fields)
        eq(r.status, 200, "RSA decrypt through p11-kit %r (%r)" % (fields, r.body[:300]))
        eq(r.json().get("key"), "demo-rsa", "key")
        F.same_entity(F.mime_of(r.json()), want, "decrypted entity")


def ecdh_refused():
    raw, _ = ENV["demo-ec"]
    for fields in ({}, {"key": "demo-ec"}):
        r = decrypt(raw, **fields)
        expect_error(r, 422, "operation_unsupported")
        check("ECDH" in r.json()["error"]["message"], "message %r" % r.json()["error"])
    keys = {k["name"]: k for k in D.request("GET", "/v1/keys").json()["keys"]}
    eq(keys["demo-ec"].get("usable"), True, "demo-ec still usable for signing")
    check("decrypt" not in (keys["demo-ec"].get("usable_for") or []),
          "demo-ec listed as able to decrypt: %r" % keys["demo-ec"])
    sign_ok("demo-ec", "still signs")
    eq(state(), "ready", "the refusal does not take the token down")


def custody_restart():
    """The custody host's server restarts: requests fail fast meanwhile,
    the context is rebuilt once it is back, and signing resumes."""
    stop_server()
    r = D.sign(key="demo-rsa", mime=msg("server gone"))
    expect_error(r, 503, "token_unavailable")
    check(state() in ("down", "recovering"), "state while the server is gone")
    start_server()
    took = wait_for(lambda: state() == "ready", "ready after the server came back", RECOVER_S)
    print("# ready %.1f s after the server came back" % took, flush=True)
    sign_ok("demo-rsa", "after the server restart")
    rsa_decrypt()


def other_module_down():
    """A local token behind faulty_p11 goes away while the remote one (another
    module, in another process) keeps serving; marked optional, the local
    token's absence leaves /readyz 200 while it names it down."""
    faulty = F.BUILD / "tests" / "faulty_p11.so"
    flag = WORK / "flag"
    local = F.copy_token_dir(DEMO, WORK / "local")
    toks = [F.token_config(local, name="local", module=str(faulty), optional=True),
            F.token_config(TOK, name=TOKEN, module=CLIENTS[0], discovery=False,
                           keys=[{"name": "remote-rsa", "uri": "pkcs11:object=demo-rsa"},
                                 {"name": "remote-ec", "uri": "pkcs11:object=demo-ec"}])]
    conf = F.write_config(WORK / "two.conf", toks)
    env = F.softhsm_env(local)
    env.update({"P11_KIT_SERVER_ADDRESS": "unix:path=%s" % SOCK,
                "FAULTY_P11_REAL": F.softhsm_module(), "FAULTY_P11_FLAG": str(flag)})
    d = S.daemon(conf, "two-modules-daemon", env=env)

    def states():
        return {t["name"]: t["state"] for t in d.request("GET", "/readyz").json()["tokens"]}

    def sign(key, tag):
        r = d.sign(key=key, mime=msg(tag))
        eq(r.status, 200, "sign with %s (%r)" % (key, r.body[:300]))
        content = F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
        check(("remote: %s" % tag).encode() in content, "verified content")
    eq(states(), {"local": "ready", TOKEN: "ready"}, "states at start")
    tmp = flag.with_suffix(".tmp")
    tmp.write_text("removed\n")
    tmp.replace(flag)
    try:
        expect_error(d.sign(key="demo-rsa", mime=msg("local gone")), 503, "token_unavailable")
        t0 = time.monotonic()
        # across several recovery attempts of the local module
        while time.monotonic() - t0 < 3.5:
            check(states()["local"] in ("down", "recovering"), "local state while removed")
            eq(d.request("GET", "/readyz").status, 200, "/readyz: the down token is optional")
            sign("remote-rsa", "remote while local is down")
            sign("remote-ec", "remote ec while local is down")
            time.sleep(0.3)
    finally:
        flag.unlink()
    wait_for(lambda: states()["local"] == "ready", "local back", 20)
    sign("demo-ec", "local back")
    sign("remote-rsa", "remote after")
    S.stop_case(d, pins=[F.read_pin(TOK)])


def main():
    try:
        if not S.case("p11-kit server on a demo token copy; daemon on p11-kit-client.so",
                      start):
            S.finish()
        S.case("sign RSA and ECDSA through p11-kit: openssl verifies", signing)
        S.case("RSA decrypt through p11-kit (picked and forced key)", rsa_decrypt)
        S.case("ECDH through p11-kit: 422 operation_unsupported, token stays ready",
               ecdh_refused)
        S.case("a local token on another module goes down: the remote one keeps "
               "serving, /readyz 200 (optional), the local one comes back",
               other_module_down)
        S.case("custody server restarts: 503 meanwhile, rebuilt and serving within %d s"
               % RECOVER_S, custody_restart)
        S.stop_running(pins=[F.read_pin(TOK)])
    finally:
        stop_server()
    S.finish()


if __name__ == "__main__":
    main()
