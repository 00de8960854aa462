#!/usr/bin/env python3
"""GET /v1/keys, /healthz, /readyz, key discovery, a token with a wrong PIN,
and --check-config."""

import calendar
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

UNAVAILABLE_CODES = ("token_unavailable", "key_unavailable")
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

S = F.Suite("keys")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("keys")
D = None


def start():
    global D
    D = S.daemon(DEMO / "smimed.conf", "keys-daemon", env=F.softhsm_env(DEMO))


def openssl_field(pem, opt):
    out = F.run(["openssl", "x509", "-in", pem, "-noout", opt]).stdout.decode().strip()
    return out.split("=", 1)[1]


def openssl_time(pem, opt):
    t = time.strptime(openssl_field(pem, opt), "%b %d %H:%M:%S %Y GMT")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(calendar.timegm(t)))


def keys_by_name(d):
    r = d.request("GET", "/v1/keys")
    eq(r.status, 200, "GET /v1/keys status")
    check((r.header("Content-Type") or "").startswith("application/json"),
          "Content-Type %r" % r.header("Content-Type"))
    j = r.json()
    check(isinstance(j.get("keys"), list), "keys is not a list: %r" % j)
    out = {}
    for k in j["keys"]:
        check(isinstance(k, dict) and isinstance(k.get("name"), str), "bad key entry %r" % k)
        check(k["name"] not in out, "key %s listed twice" % k["name"])
        out[k["name"]] = k
    return out


def healthz():
    r = D.request("GET", "/healthz")
    eq(r.status, 200, "status")


def readyz_ok():
    r = D.request("GET", "/readyz")
    eq(r.status, 200, "status (%r)" % r.body[:300])
    check("demo" in r.body.decode(errors="replace"), "/readyz body does not list the token: %r" % r.body)


def key_entry(name):
    want = F.KEYS[name]
    pem = DEMO / ("%s.pem" % name)
    k = keys_by_name(D).get(name)
    check(k is not None, "%s not listed" % name)
    eq(k.get("algorithm"), want["algorithm"], "algorithm")
    eq(k.get("usable"), True, "usable (reason %r)" % k.get("reason"))
    eq(k.get("token"), "demo", "token")
    c = k.get("certificate")
    check(isinstance(c, dict), "certificate missing: %r" % k)
    eq(F.cert_der(c.get("pem", "")), F.cert_der(pem.read_bytes()), "certificate pem")
    serial = c.get("serial", "")
    check(re.fullmatch(r"[0-9A-F]+", serial or ""), "serial %r is not uppercase hex" % serial)
    eq(serial.lstrip("0"), openssl_field(pem, "-serial").upper().lstrip("0"), "serial")
    for field, opt in (("not_before", "-startdate"), ("not_after", "-enddate")):
        check(RFC3339_Z.match(c.get(field) or ""), "%s %r is not RFC 3339 UTC" % (field, c.get(field)))
        eq(c[field], openssl_time(pem, opt), field)
    eq(c.get("emails"), [want["email"]], "emails")
    check(name in (c.get("subject") or ""), "subject %r does not name %s" % (c.get("subject"), name))
    check("smimed demo CA" in (c.get("issuer") or ""), "issuer %r" % c.get("issuer"))


def keys_only_demo():
    names = set(keys_by_name(D))
    eq(names, set(F.KEYS), "served keys")


# ------------------------------------------------------------------ discovery

def discovery():
    d = F.copy_token_dir(DEMO, WORK / "disc")
    pem = F.add_token_key(d, "demo-p384", "03", "EC:secp384r1", "p384@demo.smimed.test",
                          "digitalSignature")
    # a key pair with no certificate is not served
    F.p11tool(d, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "04",
              "--label", "no-cert", "--usage-sign")
    dd = S.daemon(d / "smimed.conf", "discovery-daemon", env=F.softhsm_env(d))
    try:
        keys = keys_by_name(dd)
        check("demo-p384" in keys, "new key not discovered; listed: %s" % sorted(keys))
        eq(keys["demo-p384"].get("algorithm"), "ec-p384", "algorithm")
        eq(keys["demo-p384"].get("usable"), True, "usable")
        check("no-cert" not in keys, "a key without certificate is listed")
        eq(set(keys), set(F.KEYS) | {"demo-p384"}, "served keys")
        msg = "Content-Type: text/plain\r\n\r\nsigned with P-384\r\n"
        r = dd.sign(key="demo-p384", mime=msg, digest="sha384")
        eq(r.status, 200, "sign with the discovered key (%r)" % r.body[:200])
        F.openssl_verify(r.json()["mime"].encode(), CA, WORK)
        certs = F.cms_certs(F.split_multipart_signed(r.json()["mime"].encode())[2], WORK)
        check(any(F.cert_der(c) == F.cert_der(pem.read_bytes()) for c in certs),
              "the P-384 certificate is not the signer")
    finally:
        rc = dd.stop()
    F.check_exit(dd, rc)


# ------------------------------------------------------------------ wrong PIN

def bad_pin_setup(optional):
    d = F.copy_token_dir(DEMO, WORK / ("badpin-%s" % optional))
    (d / "wrong-pin").write_text("0000000000000000\n")
    (d / "wrong-pin").chmod(0o600)
    tok = F.token_config(d, name="bad", pin_file=str(d / "wrong-pin"), discovery=False,
                         keys=[{"name": "bad-rsa", "uri": "pkcs11:object=demo-rsa",
                                "certificate": str(d / "demo-rsa.pem")}])
    if optional:
        tok["optional"] = True
    conf = F.write_config(d / "bad.conf", [tok])
    return d, conf


def wrong_pin():
    d, conf = bad_pin_setup(False)
    dd = S.daemon(conf, "wrong-pin-daemon", env=F.softhsm_env(d))
    try:
        eq(dd.request("GET", "/healthz").status, 200, "/healthz")
        r = dd.request("GET", "/readyz")
        eq(r.status, 503, "/readyz with the token down (%r)" % r.body[:300])
        check("bad" in r.body.decode(errors="replace"), "/readyz body does not name the token: %r" % r.body)
        keys = keys_by_name(dd)
        if "bad-rsa" in keys:
            eq(keys["bad-rsa"].get("usable"), False, "bad-rsa usable")
            check(keys["bad-rsa"].get("reason"), "no reason given for the unusable key")
        r = dd.sign(key="bad-rsa", mime="Content-Type: text/plain\r\n\r\nx\r\n")
        expect_error(r, 503, UNAVAILABLE_CODES)
        check(r.header("Retry-After"), "503 without Retry-After")
    finally:
        rc = dd.stop()
    check(not dd.sanitizer_findings(), "sanitizer report: %s" % dd.sanitizer_findings()[:3])
    check("0000000000000000" not in dd.stderr_text(), "the (wrong) PIN appears in the log")
    eq(rc, 0, "exit status")


def wrong_pin_optional():
    d, conf = bad_pin_setup(True)
    dd = S.daemon(conf, "optional-daemon", env=F.softhsm_env(d))
    try:
        r = dd.request("GET", "/readyz")
        eq(r.status, 200, "/readyz when only an optional token is down (%r)" % r.body[:300])
    finally:
        rc = dd.stop()
    F.check_exit(dd, rc)


# ------------------------------------------------------------------ command line

def run_daemon(*args):
    env = F.sanitizer_env()
    env.update(F.softhsm_env(DEMO))
    p = F.run([F.BINARY] + list(args), env=env, check=False, timeout=60)
    out = (p.stdout + p.stderr).decode(errors="replace")
    findings = [l for l in out.splitlines() if any(m in l for m in F.SANITIZER_MARKERS)]
    check(not findings, "sanitizer report: %s" % findings[:3])
    return p.returncode, out


def check_config_ok():
    rc, out = run_daemon("--config", DEMO / "smimed.conf", "--check-config")
    eq(rc, 0, "exit status (output %r)" % out[-500:])


def bad_config(name, mutate, mention):
    base = {"listen": "127.0.0.1:8080", "max_body_bytes": 65536, "log_level": "info",
            "tokens": [F.token_config(DEMO, keys=[{"name": "alias", "uri": "pkcs11:object=demo-rsa"}])]}
    mutate(base)
    path = WORK / ("bad-%s.conf" % name)
    if isinstance(base, dict):
        import json
        path.write_text(json.dumps(base, indent=2))
    rc, out = run_daemon("--config", path, "--check-config")
    check(rc != 0, "--check-config exited 0 on a bad config")
    for m in mention:
        check(m in out, "output does not mention %r: %r" % (m, out[-400:]))


BAD_CONFIGS = [
    ("unknown top-level key", lambda c: c.update(listne="x"), ["listne"]),
    ("unknown token key", lambda c: c["tokens"][0].update(pin_fil="pin"), ["pin_fil"]),
    ("unknown key-entry key", lambda c: c["tokens"][0]["keys"][0].update(certficate="x.pem"),
     ["certficate"]),
    ("wrong type", lambda c: c.update(max_body_bytes="big"), ["max_body_bytes"]),
    ("wrong type in a token", lambda c: c["tokens"][0].update(discovery="yes"), ["discovery"]),
    ("missing PIN file", lambda c: c["tokens"][0].update(pin_file="no-such-pin-file"),
     ["no-such-pin-file"]),
    ("missing certificate file", lambda c: c["tokens"][0]["keys"][0].update(certificate="no-such.pem"),
     ["no-such.pem"]),
    ("missing module", lambda c: c["tokens"][0].update(module="/nonexistent/libp11mod.so"),
     ["/nonexistent/libp11mod.so"]),
    ("bad token URI", lambda c: c["tokens"][0].update(uri="pkcs11:tokn=smimed-demo"), ["uri"]),
    ("not a pkcs11 URI", lambda c: c["tokens"][0].update(uri="http://example.test/"), ["uri"]),
    ("bad key URI", lambda c: c["tokens"][0]["keys"][0].update(uri="pkcs11:object=a;bogus=1"), ["uri"]),
    ("max_sessions out of range", lambda c: c["tokens"][0].update(max_sessions=99), ["max_sessions"]),
    ("no tokens", lambda c: c.pop("tokens"), ["tokens"]),
]


def invalid_json_config():
    path = WORK / "broken.conf"
    path.write_text('{"listen": "127.0.0.1:8080",\n  "tokens": [\n')
    rc, out = run_daemon("--config", path, "--check-config")
    check(rc != 0, "exit 0 on invalid JSON")
    check("broken.conf" in out, "output does not name the file: %r" % out[-300:])


def missing_config_file():
    rc, out = run_daemon("--config", WORK / "does-not-exist.conf", "--check-config")
    check(rc != 0, "exit 0 on a missing config file")
    check("does-not-exist.conf" in out, "output does not name the file: %r" % out[-300:])


def bad_config_at_startup():
    path = WORK / "bad-start.conf"
    path.write_text('{"tokens": [], "listne": 1}')
    t0 = time.time()
    rc, out = run_daemon("--config", path, "--listen", "127.0.0.1:%d" % F.free_port())
    check(rc != 0, "daemon started on a bad config")
    check(time.time() - t0 < 30, "took %.0fs to refuse" % (time.time() - t0))


def help_and_version():
    rc, out = run_daemon("--help")
    eq(rc, 0, "--help exit status")
    check("--config" in out, "--help does not mention --config")
    rc, out = run_daemon("--version")
    eq(rc, 0, "--version exit status")
    check(re.search(r"\d+\.\d+", out), "--version prints no version: %r" % out)
    rc, out = run_daemon("--no-such-option")
    check(rc != 0, "unknown option accepted")


def main():
    if not S.case("daemon starts on the demo token", start):
        S.finish()
    S.case("/healthz -> 200", healthz)
    S.case("/readyz -> 200 listing the token", readyz_ok)
    S.case("exactly the two demo keys are served", keys_only_demo)
    for name in F.KEYS:
        S.case("%s entry and certificate fields" % name, key_entry, name)
    S.case("discovery serves a new key pair with a certificate", discovery)
    S.case("wrong PIN: starts, /readyz 503, signing 503", wrong_pin)
    S.case("wrong PIN on an optional token: /readyz 200", wrong_pin_optional)
    S.case("--check-config accepts the demo config", check_config_ok)
    for name, mutate, mention in BAD_CONFIGS:
        S.case("--check-config rejects: %s" % name, bad_config, name.replace(" ", "-"), mutate, mention)
    S.case("--check-config rejects invalid JSON, naming the file", invalid_json_config)
    S.case("--check-config rejects a missing file", missing_config_file)
    S.case("daemon refuses to start on a bad config", bad_config_at_startup)
    S.case("--help, --version, unknown option", help_and_version)
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
