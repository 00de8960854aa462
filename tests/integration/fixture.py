"""Shared fixture for the smimed integration suites (Python 3 stdlib only).

Real parts only: a real SoftHSMv2 token made by script/demo-token, the real
daemon binary (the sanitizer build in build-test/) over real HTTP, and
independent verifiers (openssl cms, gpgsm).

Environment:
  SMIMED_BUILD   build directory (default: <repo>/build-test)
  SMIMED_BINARY  daemon binary (default: $SMIMED_BUILD/smimed)
  SMIMED_IT_DIR  scratch directory (default: $SMIMED_BUILD/it)

Each suite prints one line per case, "ok - suite: name",
"ok - suite: name # SKIP reason" or "not ok - suite: name: reason", with
failure details as "#" lines right after, and exits 1 if any case failed.
"""

import base64
import email
import email.message
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("SMIMED_BUILD", REPO / "build-test")).resolve()
BINARY = Path(os.environ.get("SMIMED_BINARY", BUILD / "smimed")).resolve()
IT = Path(os.environ.get("SMIMED_IT_DIR", BUILD / "it")).resolve()
DEMO = IT / "demo"
DEMO_TOKEN = REPO / "script" / "demo-token"
LSAN_SUPP = REPO / "tests" / "lsan.supp"

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                     "UndefinedBehaviorSanitizer", "ThreadSanitizer")

KEYS = {
    "demo-rsa": {"algorithm": "rsa-2048", "email": "rsa@demo.smimed.test", "id": "01"},
    "demo-ec": {"algorithm": "ec-p256", "email": "ec@demo.smimed.test", "id": "02"},
}
DIGESTS = ("sha256", "sha384", "sha512")
MODES = ("detached", "opaque")
MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}


def softhsm_module():
    for p in ("/usr/lib/softhsm/libsofthsm2.so",
              "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"):
        if os.path.exists(p):
            return os.path.realpath(p)
    raise RuntimeError("SoftHSMv2 module not found")


# ---------------------------------------------------------------- processes

def run(cmd, input=None, env=None, timeout=120, check=True, cwd=None):
    """Runs cmd (list), returns CompletedProcess with bytes stdout/stderr."""
    cmd = [str(c) for c in cmd]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.run(cmd, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=full_env, timeout=timeout,
                       cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError("command failed (%d): %s\n%s%s" % (
            p.returncode, " ".join(cmd), p.stdout.decode(errors="replace")[-2000:],
            p.stderr.decode(errors="replace")[-2000:]))
    return p


def sanitizer_env():
    env = {
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    if LSAN_SUPP.exists():
        env["LSAN_OPTIONS"] = "suppressions=%s" % LSAN_SUPP
    return env


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- tokens

def ensure_demo():
    """The shared demo token, created once per run in $SMIMED_IT_DIR/demo."""
    if not (DEMO / "smimed.conf").exists():
        IT.mkdir(parents=True, exist_ok=True)
        run([DEMO_TOKEN, DEMO], timeout=300)
    return DEMO


def read_pin(d=None):
    return Path(d or DEMO).joinpath("pin").read_text().splitlines()[0]


def softhsm_env(d):
    return {"SOFTHSM2_CONF": str(Path(d) / "softhsm2.conf")}


def copy_token_dir(src, dst):
    """Copies a demo directory (token store included) and points the copy's
    softhsm2.conf at its own token store."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    conf = dst / "softhsm2.conf"
    lines = []
    for line in conf.read_text().splitlines():
        if line.strip().startswith("directories.tokendir"):
            line = "directories.tokendir = %s" % (dst / "tokens")
        lines.append(line)
    conf.write_text("\n".join(lines) + "\n")
    return dst


def token_config(d, **overrides):
    """A token entry for the demo token in directory d (absolute paths)."""
    t = {
        "name": "demo",
        "module": softhsm_module(),
        "uri": "pkcs11:token=smimed-demo",
        "pin_file": str(Path(d) / "pin"),
        "discovery": True,
    }
    t.update(overrides)
    return t


def write_config(path, tokens, **top):
    cfg = {"listen": "127.0.0.1:8080", "max_body_bytes": 67108864,
           "log_level": "info", "tokens": tokens}
    cfg.update(top)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def p11tool(d, *args, login=True):
    """pkcs11-tool on the demo token in directory d; PIN through the env."""
    env = softhsm_env(d)
    env["SMIMED_TEST_PIN"] = read_pin(d)
    cmd = ["pkcs11-tool", "--module", softhsm_module(), "--token-label", "smimed-demo"]
    if login:
        cmd += ["--login", "--pin", "env:SMIMED_TEST_PIN"]
    return run(cmd + list(args), env=env)


def _der(tag, content):
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(nb)]) + nb
    return bytes([tag]) + length + content


def ec_spki_from_token(d, key_id):
    """SubjectPublicKeyInfo DER of the EC public key with CKA_ID key_id,
    from the EC_POINT and EC_PARAMS that `pkcs11-tool -O` prints."""
    out = p11tool(d, "-O", login=False).stdout.decode()
    for block in out.split("Public Key Object")[1:]:
        if not re.search(r"^\s*ID:\s*%s\s*$" % re.escape(key_id), block, re.M | re.I):
            continue
        point = bytes.fromhex(re.search(r"EC_POINT:\s*([0-9a-fA-F]+)", block).group(1))
        params = bytes.fromhex(re.search(r"EC_PARAMS:\s*([0-9a-fA-F]+)", block).group(1))
        if point[0] == 0x04 and point[1] + 2 == len(point):  # DER OCTET STRING
            point = point[2:]
        elif point[0] == 0x04 and point[1] == 0x81:
            point = point[3:]
        alg = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0201")) + params)
        return _der(0x30, alg + _der(0x03, b"\x00" + point))
    raise AssertionError("no EC public key with ID %s on the token" % key_id)


def add_token_key(d, label, key_id, key_type, email_addr, key_usage):
    """Generates a key pair on the token in d and stores a CA-issued
    certificate next to it (same CKA_ID), as script/demo-token does."""
    d = Path(d)
    work = Path(tempfile.mkdtemp(prefix="addkey", dir=str(IT)))
    try:
        p11tool(d, "--keypairgen", "--key-type", key_type, "--id", key_id,
                "--label", label, "--usage-sign")
        if key_type.upper().startswith("EC:"):
            # pkcs11-tool 0.23 cannot export P-384 public keys ("cannot
            # create EVP_PKEY"): build the SubjectPublicKeyInfo ourselves
            (work / "pub.der").write_bytes(ec_spki_from_token(d, key_id))
        else:
            p11tool(d, "--read-object", "--type", "pubkey", "--id", key_id,
                    "-o", work / "pub.der", login=False)
        run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", work / "pub.der",
             "-out", work / "pub.pem"])
        run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
             work / "tmp.key", "-subj", "/CN=%s/emailAddress=%s" % (label, email_addr),
             "-out", work / "req.csr"])
        (work / "ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,%s\n"
            "extendedKeyUsage=emailProtection\nsubjectAltName=email:%s\n"
            % (key_usage, email_addr))
        pem = d / ("%s.pem" % label)
        run(["openssl", "x509", "-req", "-in", work / "req.csr", "-force_pubkey",
             work / "pub.pem", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
             "-set_serial", "0x" + os.urandom(8).hex(), "-days", "30", "-sha256",
             "-extfile", work / "ext", "-out", pem])
        run(["openssl", "x509", "-in", pem, "-outform", "DER", "-out", work / "cert.der"])
        p11tool(d, "--write-object", work / "cert.der", "--type", "cert",
                "--id", key_id, "--label", label)
        return pem
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- HTTP

class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value)
        self.body = body
        self._json = None

    def header(self, name, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def json(self):
        if self._json is None:
            try:
                self._json = json.loads(self.body.decode("utf-8"))
            except Exception as e:
                raise AssertionError("response is not JSON (%s): %r" % (e, self.body[:300]))
        return self._json

    def error_code(self):
        j = self.json()
        if not isinstance(j, dict) or not isinstance(j.get("error"), dict):
            raise AssertionError("no error object in %r" % self.body[:300])
        return j["error"].get("code")

    def __repr__(self):
        return "<%d %s %r>" % (self.status, self.reason, self.body[:300])


class Daemon:
    """One smimed process on a free loopback port."""

    serial = 0

    def __init__(self, config, name="daemon", env=None, args=()):
        Daemon.serial += 1
        self.config = Path(config)
        self.name = name
        self.env = dict(env or {})
        self.args = list(args)
        self.proc = None
        self.port = None
        self.returncode = None
        logs = IT / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / ("%02d-%s.stderr" % (Daemon.serial, re.sub(r"\W", "_", name)))

    def start(self, timeout=60):
        if not BINARY.exists():
            raise AssertionError("daemon binary %s is missing" % BINARY)
        self.port = free_port()
        env = dict(os.environ)
        env.update(sanitizer_env())
        env.update(self.env)
        self.returncode = None
        with open(self.log_path, "ab") as errf:
            self.proc = subprocess.Popen(
                [str(BINARY), "--config", str(self.config),
                 "--listen", "127.0.0.1:%d" % self.port] + self.args,
                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, env=env)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise AssertionError("%s exited with %d during start-up:\n%s" % (
                    self.name, self.proc.returncode, self.tail()))
            try:
                r = self.request("GET", "/healthz", timeout=2)
                if r.status == 200:
                    return self
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("%s: /healthz not ready after %ds:\n%s" % (
                    self.name, timeout, self.tail()))
            time.sleep(0.1)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def request(self, method, path, body=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return Response(r.status, r.reason, r.getheaders(), data)
        finally:
            conn.close()

    def post_json(self, path, obj, headers=None, timeout=120):
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        body = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        if isinstance(body, str):
            body = body.encode("utf-8")
        return self.request("POST", path, body=body, headers=h, timeout=timeout)

    def sign(self, timeout=120, **fields):
        return self.post_json("/v1/sign", fields, timeout=timeout)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Signals the daemon and waits; returns its exit status."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "killed after %ds without exiting" % timeout
                self.proc = None
                return self.returncode
        self.returncode = self.proc.returncode
        self.proc = None
        return self.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stderr_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n=30):
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def sanitizer_findings(self):
        return [l for l in self.stderr_text().splitlines()
                if any(m in l for m in SANITIZER_MARKERS)]


# ---------------------------------------------------------------- MIME / CMS

def crlf(b):
    """CRLF canonicalisation."""
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def split_entity(raw):
    """Splits an entity into ([(name, value)] unfolded, body bytes)."""
    raw = crlf(raw)
    idx = raw.find(b"\r\n\r\n")
    if raw.startswith(b"\r\n"):
        head, body = b"", raw[2:]
    elif idx < 0:
        head, body = raw, b""
    else:
        head, body = raw[:idx], raw[idx + 4:]
    fields = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b" " + line.strip()
            continue
        name, _, value = line.partition(b":")
        fields.append([name.strip().decode("latin-1"), value.strip()])
    return [(n, v.decode("latin-1")) for n, v in fields], body


def norm_value(v):
    return re.sub(r"\s+", " ", v).strip().rstrip(";").lower()


def content_headers(fields):
    return sorted((n.lower(), norm_value(v)) for n, v in fields
                  if n.lower().startswith("content-"))


def header_params(value):
    """Parses a Content-Type value: (type lowercased, {param: value})."""
    m = email.message.Message()
    m["Content-Type"] = value
    params = {k.lower(): v for k, v in (m.get_params() or [])[1:]}
    return m.get_content_type(), params


def get_field(fields, name):
    for n, v in fields:
        if n.lower() == name.lower():
            return v
    return None


def split_multipart_signed(raw):
    """multipart/signed → (top fields, signed content bytes, signature DER)."""
    raw = crlf(raw)
    fields, body = split_entity(raw)
    ctype, params = header_params(get_field(fields, "Content-Type") or "")
    if ctype != "multipart/signed":
        raise AssertionError("not multipart/signed: %r" % get_field(fields, "Content-Type"))
    boundary = params.get("boundary")
    if not boundary:
        raise AssertionError("multipart/signed without boundary")
    delim = b"--" + boundary.encode("latin-1")
    text = b"\r\n" + body
    parts = text.split(b"\r\n" + delim)
    # parts[0] = preamble, then "\r\n<part>" ..., last starts with "--"
    bodies = []
    for p in parts[1:]:
        if p.startswith(b"--"):
            break
        nl = p.find(b"\r\n")
        bodies.append(p[nl + 2:] if nl >= 0 else b"")
    if len(bodies) != 2:
        raise AssertionError("multipart/signed with %d parts" % len(bodies))
    sig_fields, sig_body = split_entity(bodies[1])
    sig_type, _ = header_params(get_field(sig_fields, "Content-Type") or "")
    if sig_type not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
        raise AssertionError("second part is %s" % sig_type)
    der = base64.b64decode(b"".join(sig_body.split()))
    return fields, bodies[0], der


def opaque_der(raw):
    fields, body = split_entity(raw)
    ctype, params = header_params(get_field(fields, "Content-Type") or "")
    if ctype not in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        raise AssertionError("not application/pkcs7-mime: %s" % ctype)
    cte = (get_field(fields, "Content-Transfer-Encoding") or "").lower()
    if cte != "base64":
        raise AssertionError("pkcs7-mime with transfer encoding %r" % cte)
    return fields, base64.b64decode(b"".join(body.split()))


def openssl_verify(raw, ca, workdir, inform="SMIME", extra=()):
    """Verifies with `openssl cms -verify`; returns the signed content."""
    workdir = Path(workdir)
    src = workdir / "in.msg"
    out = workdir / "content.out"
    src.write_bytes(raw)
    if out.exists():
        out.unlink()
    p = run(["openssl", "cms", "-verify", "-CAfile", ca, "-inform", inform,
             "-in", src, "-out", out, "-purpose", "smimesign"] + list(extra), check=False)
    if p.returncode != 0 or b"Verification successful" not in p.stderr:
        raise AssertionError("openssl cms -verify failed (%d): %s" % (
            p.returncode, p.stderr.decode(errors="replace")[-1500:]))
    return out.read_bytes()


def cms_print(der, workdir):
    f = Path(workdir) / "sig.der"
    f.write_bytes(der)
    return run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", f]
               ).stdout.decode(errors="replace")


def cms_certs(der, workdir):
    """PEM certificates carried in a CMS SignedData."""
    f = Path(workdir) / "sig-certs.der"
    f.write_bytes(der)
    out = run(["openssl", "pkcs7", "-inform", "DER", "-in", f, "-print_certs"]).stdout
    return re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)


def cert_der(pem):
    if isinstance(pem, str):
        pem = pem.encode()
    b64 = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    if not b64:
        raise AssertionError("no PEM certificate in %r" % pem[:100])
    return base64.b64decode(b"".join(b64.group(1).split()))


class Gpgsm:
    """A throw-away gpgsm home that trusts the demo CA."""

    HASH_ALGO = {"sha256": "8", "sha384": "9", "sha512": "10"}

    def __init__(self, ca):
        self.home = tempfile.mkdtemp(prefix="/tmp/g")
        os.chmod(self.home, 0o700)
        Path(self.home, "gpgsm.conf").write_text("disable-crl-checks\n")
        Path(self.home, "gpg-agent.conf").write_text("")
        run(["gpgsm", "--homedir", self.home, "--batch", "--import", ca])
        out = run(["gpgsm", "--homedir", self.home, "--with-colons", "--list-keys"]).stdout
        fpr = None
        for line in out.decode().splitlines():
            if line.startswith("fpr:"):
                fpr = line.split(":")[9]
                break
        if not fpr:
            raise AssertionError("gpgsm did not import the CA")
        colons = ":".join(fpr[i:i + 2] for i in range(0, len(fpr), 2))
        Path(self.home, "trustlist.txt").write_text("%s S relax\n" % colons)

    def _check(self, p, digest):
        status = p.stdout.decode(errors="replace")
        err = p.stderr.decode(errors="replace")
        problems = []
        if p.returncode != 0:
            problems.append("exit %d" % p.returncode)
        for tag in ("GOODSIG", "VALIDSIG", "TRUST_FULLY"):
            if "[GNUPG:] %s" % tag not in status:
                problems.append("no %s" % tag)
        if digest:
            m = re.search(r"\[GNUPG:\] VALIDSIG (\S+ ){7}(\d+)", status)
            if not m or m.group(2) != self.HASH_ALGO[digest]:
                problems.append("hash algo %s, expected %s" % (
                    m.group(2) if m else "?", self.HASH_ALGO[digest]))
        if problems:
            raise AssertionError("gpgsm: %s\n%s\n%s" % (", ".join(problems), status[-800:], err[-800:]))

    def verify_detached(self, sig_der, content, workdir, digest=None):
        s = Path(workdir) / "g.sig"
        c = Path(workdir) / "g.content"
        s.write_bytes(sig_der)
        c.write_bytes(content)
        p = run(["gpgsm", "--homedir", self.home, "--batch", "--status-fd", "1",
                 "--verify", s, c], check=False)
        self._check(p, digest)

    def verify_opaque(self, der, workdir, digest=None):
        s = Path(workdir) / "g.p7m"
        o = Path(workdir) / "g.out"
        s.write_bytes(der)
        if o.exists():
            o.unlink()
        p = run(["gpgsm", "--homedir", self.home, "--batch", "--status-fd", "1",
                 "--output", o, "--verify", s], check=False)
        self._check(p, digest)
        return o.read_bytes()

    def close(self):
        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "all"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------- cases

class Skip(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def expect_error(r, status, code):
    """Asserts an error response: status, JSON body {"error":{code,message}}."""
    if r.status != status:
        raise AssertionError("status %d, want %d (%s); body %r" % (r.status, status, code, r.body[:300]))
    ctype = (r.header("Content-Type") or "").split(";")[0].strip().lower()
    check(ctype == "application/json", "error Content-Type %r" % r.header("Content-Type"))
    j = r.json()
    check(isinstance(j, dict) and isinstance(j.get("error"), dict), "no error object: %r" % j)
    codes = code if isinstance(code, (tuple, list, set)) else (code,)
    check(j["error"].get("code") in codes, "error code %r, want %s" % (j["error"].get("code"), "/".join(codes)))
    check(isinstance(j["error"].get("message"), str) and j["error"]["message"],
          "error message missing: %r" % j)
    return j


class Suite:
    def __init__(self, name):
        self.name = name
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.daemons = []
        self.failures = []

    def daemon(self, config, name, env=None, args=(), start=True):
        d = Daemon(config, name=name, env=env, args=args)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def case(self, name, fn, *args, **kw):
        t0 = time.time()
        try:
            fn(*args, **kw)
        except Skip as e:
            self.skipped += 1
            print("ok - %s: %s # SKIP %s" % (self.name, name, e), flush=True)
            return True
        except Exception as e:
            self.failed += 1
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print("not ok - %s: %s: %s" % (self.name, name, reason[:300]), flush=True)
            detail = traceback.format_exc()
            for d in self.daemons:
                if d.proc is not None or d.returncode is not None:
                    detail += "\n--- %s stderr (tail) ---\n%s" % (d.name, d.tail(15))
            for line in detail.rstrip().splitlines():
                print("#   " + line, flush=True)
            self.failures.append(name)
            return False
        self.passed += 1
        print("ok - %s: %s (%.1fs)" % (self.name, name, time.time() - t0), flush=True)
        return True

    def stop_case(self, d, sig=signal.SIGTERM, pins=()):
        """Stops d and checks the exit: status 0, no sanitizer report, no PIN."""
        def body():
            rc = d.stop(sig)
            findings = d.sanitizer_findings()
            check(not findings, "sanitizer report: %s" % "; ".join(findings[:3]))
            check(rc == 0, "exit status %r" % rc)
            text = d.stderr_text()
            for pin in pins:
                check(pin not in text, "the PIN appears in the log")
        return self.case("%s exits 0 on %s, no sanitizer report" % (
            d.name, signal.Signals(sig).name), body)

    def finish(self):
        for d in self.daemons:
            d.kill()
        print("# %s: %d passed, %d failed, %d skipped" % (
            self.name, self.passed, self.failed, self.skipped), flush=True)
        sys.exit(1 if self.failed else 0)


def workdir(prefix):
    IT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=str(IT)))
