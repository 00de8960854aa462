"""Shared fixture for the smimed integration suites (Python 3 stdlib only).

Real parts only: a real SoftHSMv2 token made by script/demo-token, the real
daemon binary (the sanitizer build in build-test/) over real HTTP, and
independent verifiers (openssl cms, gpgsm).

Environment:
  SMIMED_BUILD   build directory (default: <repo>/build-test)
  SMIMED_BINARY  daemon binary (default: $SMIMED_BUILD/smimed)
  SMIMED_IT_DIR  scratch directory (default: $SMIMED_BUILD/it)

Each suite prints one line per case, "ok - suite: name" or
"not ok - suite: name: reason", with failure details as "#" lines right
after, and exits 1 if any case failed. There is no skip: script/bootstrap
installs every peer a case needs (gpgsm, p11-kit-client.so, ...), so a case
whose set-up fails fails, rather than passing untested.
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


def p11tool(d, *args, login=True, token="smimed-demo"):
    """pkcs11-tool on the demo token in directory d (or another token of its
    store, by label); PIN through the env."""
    env = softhsm_env(d)
    env["SMIMED_TEST_PIN"] = read_pin(d)
    cmd = ["pkcs11-tool", "--module", softhsm_module(), "--token-label", token]
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


def add_token_key(d, label, key_id, key_type, email_addr, key_usage,
                  token="smimed-demo", keygen=(), cn=None):
    """Generates a key pair on the token in d and stores a CA-issued
    certificate next to it (same CKA_ID), as script/demo-token does.
    keygen: more pkcs11-tool options for the key pair (--always-auth);
    cn: the certificate's common name when the label cannot be one."""
    d = Path(d)
    work = Path(tempfile.mkdtemp(prefix="addkey", dir=str(IT)))

    def tool(*args, login=True):
        return p11tool(d, *args, login=login, token=token)
    try:
        tool("--keypairgen", "--key-type", key_type, "--id", key_id,
                "--label", label, "--usage-sign", *keygen)
        if key_type.upper().startswith("EC:"):
            # pkcs11-tool 0.23 cannot export P-384 public keys ("cannot
            # create EVP_PKEY"): build the SubjectPublicKeyInfo ourselves
            (work / "pub.der").write_bytes(ec_spki_from_token(d, key_id))
        else:
            tool("--read-object", "--type", "pubkey", "--id", key_id,
                    "-o", work / "pub.der", login=False)
        run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", work / "pub.der",
             "-out", work / "pub.pem"])
        run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
             work / "tmp.key", "-subj", "/CN=%s/emailAddress=%s" % (cn or label, email_addr),
             "-out", work / "req.csr"])
        (work / "ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,%s\n"
            "extendedKeyUsage=emailProtection\nsubjectAltName=email:%s\n"
            % (key_usage, email_addr))
        pem = d / ("%s.pem" % (cn or label)).replace(" ", "-")
        run(["openssl", "x509", "-req", "-in", work / "req.csr", "-force_pubkey",
             work / "pub.pem", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
             "-set_serial", "0x" + os.urandom(8).hex(), "-days", "30", "-sha256",
             "-extfile", work / "ext", "-out", pem])
        run(["openssl", "x509", "-in", pem, "-outform", "DER", "-out", work / "cert.der"])
        tool("--write-object", work / "cert.der", "--type", "cert",
                "--id", key_id, "--label", label)
        return pem
    finally:
        shutil.rmtree(work, ignore_errors=True)


def import_token_key(d, label, key_id, cert):
    """Imports a file key pair (a Cert with .key and .pem) and its
    certificate into the token in d (a copy: never the shared demo token)."""
    d = Path(d)
    work = Path(tempfile.mkdtemp(prefix="impkey", dir=str(IT)))
    try:
        run(["openssl", "pkey", "-in", cert.key, "-outform", "DER", "-out", work / "key.der"])
        run(["openssl", "pkey", "-in", cert.key, "-pubout", "-outform", "DER",
             "-out", work / "pub.der"])
        run(["openssl", "x509", "-in", cert.pem, "-outform", "DER", "-out", work / "cert.der"])
        usage = ["--usage-decrypt", "--usage-sign"] if cert.kind == "rsa" else \
            ["--usage-derive", "--usage-sign"]
        p11tool(d, "--write-object", work / "key.der", "--type", "privkey", "--id", key_id,
                "--label", label, *usage)
        p11tool(d, "--write-object", work / "pub.der", "--type", "pubkey", "--id", key_id,
                "--label", label)
        p11tool(d, "--write-object", work / "cert.der", "--type", "cert", "--id", key_id,
                "--label", label)
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


def default_bearer(config):
    """The token a daemon's requests carry unless a test says otherwise: the
    all-powerful client's DIR/api-token (script/demo-token) when the config
    turns client authentication on; None when it does not."""
    try:
        cfg = json.loads(Path(config).read_text())
        tok = Path(config).parent / "api-token"
        if cfg.get("clients") and tok.exists():
            return tok.read_text().splitlines()[0]
    except (OSError, ValueError, IndexError):
        pass
    return None


class Daemon:
    """One smimed daemon (its supervisor, which starts the key process and
    the workers) on a free loopback port. Requests carry
    `Authorization: Bearer <bearer>` unless auth=False or the test gives its
    own Authorization header."""

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
        self.bearer = default_bearer(self.config)
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

    def children(self, comm=None):
        """The pids of the supervisor's direct children (the key process,
        smimed-key, and the workers, smimed-worker), of one comm if given."""
        pid = self.proc.pid
        out = []
        for child in Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split():
            try:
                name = Path("/proc/%s/comm" % child).read_text().strip()
            except OSError:
                continue
            if comm is None or name == comm:
                out.append(int(child))
        return sorted(out)

    def holders(self, socks, timeout=10):
        """Waits until a worker holds the connection of each socket (a
        connect returns once the kernel queued it, before any worker took
        it); the pids holding them. Connections made later then meet these
        in the daemon's counts, whichever worker accepts them."""
        deadline = time.time() + timeout
        while True:
            out = subprocess.run(["ss", "-tnpH", "state", "established",
                                  "( sport = :%d )" % self.port],
                                 capture_output=True, text=True, check=True).stdout
            held = {}
            for line in out.splitlines():
                m = re.search(r"\s\S+:%d\s+\S+:(\d+)\s.*pid=(\d+)" % self.port, line)
                if m:
                    held[int(m.group(1))] = int(m.group(2))
            pids = [held.get(s.getsockname()[1]) for s in socks]
            if all(pids) or time.time() > deadline:
                check(all(pids), "connections no worker took in %d s: %r" % (timeout, pids))
                return pids
            time.sleep(0.05)

    def auth_headers(self, headers=None, auth=True):
        h = dict(headers or {})
        if auth and self.bearer and not any(k.lower() == "authorization" for k in h):
            h["Authorization"] = "Bearer " + self.bearer
        return h

    def auth_line(self):
        """The Authorization header line for hand-written requests."""
        return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                        for k, v in self.auth_headers().items())

    def request(self, method, path, body=None, headers=None, timeout=120, auth=True):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=self.auth_headers(headers, auth))
            r = conn.getresponse()
            data = r.read()
            return Response(r.status, r.reason, r.getheaders(), data)
        finally:
            conn.close()

    def post_json(self, path, obj, headers=None, timeout=120, auth=True):
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        body = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        if isinstance(body, str):
            body = body.encode("utf-8")
        return self.request("POST", path, body=body, headers=h, timeout=timeout, auth=auth)

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

    def __init__(self, ca, *more_cas):
        self.home = tempfile.mkdtemp(prefix="/tmp/g")
        os.chmod(self.home, 0o700)
        Path(self.home, "gpgsm.conf").write_text("disable-crl-checks\n")
        Path(self.home, "gpg-agent.conf").write_text("")
        trust = []
        for c in (ca,) + more_cas:
            run(["gpgsm", "--homedir", self.home, "--batch", "--import", c])
            out = run(["openssl", "x509", "-in", c, "-noout", "-fingerprint", "-sha1"]).stdout
            fpr = out.decode().strip().split("=", 1)[1].replace(":", "")
            listed = run(["gpgsm", "--homedir", self.home, "--with-colons", "--list-keys"]).stdout
            if ("fpr:::::::::%s:" % fpr) not in listed.decode():
                raise AssertionError("gpgsm did not import the CA %s" % c)
            trust.append(":".join(fpr[i:i + 2] for i in range(0, len(fpr), 2)))
        Path(self.home, "trustlist.txt").write_text("".join("%s S relax\n" % t for t in trust))
        # an agent started by an import would not see the new trustlist
        subprocess.run(["gpgconf", "--homedir", self.home, "--reload", "gpg-agent"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    passphrase = None  # of the imported secret key, given to gpgsm on demand

    def _gpgsm(self, args, input=None, check=True):
        pre = []
        if input is None and self.passphrase is not None:
            pre = ["--passphrase-fd", "0"]
            input = (self.passphrase + "\n").encode()
        return run(["gpgsm", "--homedir", self.home, "--batch", "--status-fd", "1",
                    "--pinentry-mode", "loopback"] + pre + list(args),
                   input=input if input is not None else b"", check=check)

    def import_cert(self, pem):
        self._gpgsm(["--import", pem])

    def import_p12(self, p12, passphrase):
        """Imports a PKCS#12 (made with `openssl pkcs12 -legacy`)."""
        p = self._gpgsm(["--passphrase-fd", "0", "--import", p12],
                        input=(passphrase + "\n").encode(), check=False)
        if p.returncode != 0 or b"IMPORT_OK" not in p.stdout:
            raise AssertionError("gpgsm --import %s failed: %s" % (
                p12, (p.stdout + p.stderr).decode(errors="replace")[-1000:]))
        self.passphrase = passphrase

    def encrypt(self, data, recipient, workdir, cipher_algo=None, armor=False):
        """gpgsm --encrypt (BER output); returns the bytes."""
        i = Path(workdir) / "ge.in"
        o = Path(workdir) / "ge.out"
        i.write_bytes(data)
        if o.exists():
            o.unlink()
        args = ["--encrypt", "-r", recipient, "--output", o]
        if cipher_algo:
            args = ["--cipher-algo", cipher_algo] + args
        if armor:
            args = ["--armor"] + args
        self._gpgsm(args + [i])
        return o.read_bytes()

    def decrypt(self, der, workdir):
        """gpgsm --decrypt; returns the plaintext."""
        i = Path(workdir) / "gd.in"
        o = Path(workdir) / "gd.out"
        i.write_bytes(der)
        if o.exists():
            o.unlink()
        p = self._gpgsm(["--output", o, "--decrypt", i], check=False)
        if p.returncode != 0 or b"DECRYPTION_OKAY" not in p.stdout:
            raise AssertionError("gpgsm --decrypt failed (%d): %s" % (
                p.returncode, (p.stdout + p.stderr).decode(errors="replace")[-1200:]))
        return o.read_bytes()

    def sign(self, data, signer, workdir, detached=True):
        """gpgsm --sign / --detach-sign with an imported key; returns the DER."""
        i = Path(workdir) / "gs.in"
        o = Path(workdir) / "gs.out"
        i.write_bytes(data)
        if o.exists():
            o.unlink()
        self._gpgsm(["-u", signer, "--output", o,
                     "--detach-sign" if detached else "--sign", i])
        return o.read_bytes()

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

def wait_for(read, ready, timeout=5.0):
    """read() again every 10 ms until ready(what it returned) or timeout
    seconds passed; what it returned last. For what a process writes just
    after its answer: the key process's finish record (FINISH is one way)."""
    deadline = time.time() + timeout
    while True:
        got = read()
        if ready(got) or time.time() > deadline:
            return got
        time.sleep(0.01)


def config_variant(base, path, **options):
    """base (a loaded configuration) with options set, written to path."""
    cfg = json.loads(json.dumps(base))
    cfg.update(options)
    path.write_text(json.dumps(cfg))
    return path


def connect_from(d, source=None, timeout=30):
    """A TCP connection to daemon d, from the local address source (any
    127.0.0.x) when given."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", d.port))
    return s


def wait_until(pred, what, limit, period=0.05):
    """pred() again every period seconds until it is true; the seconds it
    took, or AssertionError naming what and pred's last answer."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < limit:
        last = pred()
        if last:
            return time.monotonic() - t0
        time.sleep(period)
    raise AssertionError("%s: not within %.1f s (last %r)" % (what, limit, last))


def set_fault_flag(flag, text):
    """What faulty_p11 does from now on (text, see tests/unit/faulty_p11.c),
    or nothing (None). Written as a new inode: the module never reads half
    a word, and a one-shot command sees a new write."""
    if text is None:
        try:
            flag.unlink()
        except FileNotFoundError:
            pass
        return
    tmp = flag.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(flag)


def p11_log_lines(log):
    """The calls faulty_p11 logged (FAULTY_P11_LOG), one a line."""
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


def p11_log_count(log, name):
    return sum(1 for l in p11_log_lines(log) if l.strip() == name)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    if got != want:
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


def check_exit(d, rc, what="exit status"):
    """d, stopped with exit status rc, made no sanitizer report and exited 0."""
    check(not d.sanitizer_findings(), "sanitizer report: %s" % d.sanitizer_findings()[:3])
    eq(rc, 0, what)


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


def expect_unsupported(r, oid):
    """A 422 unsupported_algorithm whose message names oid (dotted)."""
    j = expect_error(r, 422, "unsupported_algorithm")
    check(oid in j["error"]["message"], "message %r does not name %s" % (j["error"]["message"], oid))
    return j


class Suite:
    def __init__(self, name):
        self.name = name
        self.passed = 0
        self.failed = 0
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

    def stop_running(self, pins=()):
        """stop_case for each daemon of the suite still running."""
        for d in list(self.daemons):
            if d.running():
                self.stop_case(d, pins=pins)

    def finish(self):
        for d in self.daemons:
            d.kill()
        print("# %s: %d passed, %d failed" % (self.name, self.passed, self.failed), flush=True)
        sys.exit(1 if self.failed else 0)


def workdir(prefix):
    IT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=str(IT)))


# ---------------------------------------------------------------- test PKI
# File-key CAs and end-entity certificates for the decrypt / encrypt /
# verify suites (openssl CLI only), plus DER and S/MIME helpers.

CA_CNF = """[ ca ]
default_ca = CA_default
[ CA_default ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 365
default_crl_days = 30
policy = policy_any
unique_subject = no
[ policy_any ]
commonName = supplied
organizationName = optional
"""


class TestCA:
    """A file-key CA run with `openssl ca` (so it can back-date, revoke and
    issue CRLs) in its own directory."""

    def __init__(self, base, name, cn=None):
        self.dir = Path(base) / name
        self.dir.mkdir(parents=True)
        (self.dir / "newcerts").mkdir()
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("%08X\n" % (0x10000000 + int.from_bytes(os.urandom(3), "big")))
        (self.dir / "crlnumber").write_text("1000\n")
        self.cnf = self.dir / "ca.cnf"
        self.cnf.write_text(CA_CNF.format(dir=self.dir))
        self.pem = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        run(["openssl", "req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
             "-days", "3650", "-keyout", self.key, "-out", self.pem,
             "-subj", "/O=smimed tests/CN=%s" % (cn or name),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash"])

    def issue(self, name, kind="rsa", email_addr=None, ku=None, eku="emailProtection",
              start=None, end=None, days=30):
        """A key (kind "rsa" = RSA-2048, "ec" = P-256, "ec384", "k256" =
        secp256k1, "ed25519") and its certificate.
        Returns a Cert. start/end are openssl ca dates (YYYYMMDDHHMMSSZ)."""
        email_addr = email_addr or "%s@file.smimed.test" % name
        if ku is None:
            ku = "digitalSignature,keyEncipherment" if kind == "rsa" else \
                "digitalSignature,keyAgreement"
        key = self.dir / ("%s.key" % name)
        csr = self.dir / ("%s.csr" % name)
        pem = self.dir / ("%s.pem" % name)
        ext = self.dir / ("%s.ext" % name)
        newkey = {
            "rsa": ["-newkey", "rsa:2048"],
            "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "ec384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "k256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
            "ed25519": ["-newkey", "ed25519"],
        }[kind]
        run(["openssl", "req", "-new"] + newkey + ["-nodes", "-keyout", key, "-out", csr,
             "-subj", "/O=smimed tests/CN=%s" % name])
        lines = ["basicConstraints=critical,CA:FALSE", "subjectAltName=email:%s" % email_addr,
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
        if ku:
            lines.append("keyUsage=critical,%s" % ku)
        if eku:
            lines.append("extendedKeyUsage=%s" % eku)
        ext.write_text("\n".join(lines) + "\n")
        dates = ["-startdate", start, "-enddate", end] if start else ["-days", str(days)]
        run(["openssl", "ca", "-batch", "-config", self.cnf, "-in", csr, "-out", pem,
             "-extfile", ext, "-notext"] + dates)
        return Cert(name, kind, email_addr, pem, key)

    def revoke(self, cert):
        run(["openssl", "ca", "-config", self.cnf, "-revoke", cert.pem])

    def crl(self):
        out = self.dir / "crl.pem"
        run(["openssl", "ca", "-config", self.cnf, "-gencrl", "-out", out])
        return out


class Cert:
    def __init__(self, name, kind, email_addr, pem, key):
        self.name = name
        self.kind = kind
        self.email = email_addr
        self.pem = Path(pem)
        self.key = Path(key)

    def pem_text(self):
        return self.pem.read_text()

    def serial(self):
        return cert_serial(self.pem)

    def p12(self, passphrase):
        """PKCS#12 that gpgsm 2.2 can import (-legacy)."""
        out = self.pem.with_suffix(".p12")
        run(["openssl", "pkcs12", "-export", "-legacy", "-in", self.pem, "-inkey", self.key,
             "-out", out, "-passout", "pass:%s" % passphrase])
        return out


def cert_serial(pem):
    """Serial number of a PEM certificate file as an int."""
    out = run(["openssl", "x509", "-in", pem, "-noout", "-serial"]).stdout.decode()
    return int(out.strip().split("=", 1)[1], 16)


def rsa_public_numbers(pem):
    """(n, e) of the RSA key in a PEM certificate file."""
    out = run(["openssl", "x509", "-in", pem, "-noout", "-text"]).stdout.decode()
    m = re.search(r"Modulus:\s*((?:[0-9a-f]{2}:?\s*)+)", out)
    n = int(re.sub(r"[^0-9a-f]", "", m.group(1)), 16)
    e = int(re.search(r"Exponent:\s*(\d+)", out).group(1))
    return n, e


def check_serial(got, want_int, what="serial"):
    """A serial in the API format: uppercase hex without separators."""
    check(isinstance(got, str) and re.match(r"^[0-9A-F]+$", got or ""),
          "%s %r is not uppercase hex" % (what, got))
    eq(int(got, 16), want_int, what)


# ---------------------------------------------------------------- DER

def der_header(buf, off):
    """(tag, header length, content length or None for indefinite)."""
    tag = buf[off]
    b = buf[off + 1]
    if b < 0x80:
        return tag, 2, b
    if b == 0x80:
        return tag, 2, None
    n = b & 0x7F
    return tag, 2 + n, int.from_bytes(buf[off + 2:off + 2 + n], "big")


def find_after(buf, marker, what, start=0):
    i = buf.find(marker, start)
    if i < 0:
        raise AssertionError("%s not found in the DER" % what)
    return i + len(marker)


# DER bytes of some OIDs (tag + length + value)
OID_RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101")
OID_RSAES_OAEP = bytes.fromhex("06092a864886f70d010107")
OID_ENVELOPED_DATA = bytes.fromhex("06092a864886f70d010703")
OID_AUTH_ENVELOPED_DATA = bytes.fromhex("060b2a864886f70d0109100117")
CIPHER_OIDS = {
    "aes-128-cbc": "2.16.840.1.101.3.4.1.2", "aes-192-cbc": "2.16.840.1.101.3.4.1.22",
    "aes-256-cbc": "2.16.840.1.101.3.4.1.42", "aes-128-gcm": "2.16.840.1.101.3.4.1.6",
    "aes-256-gcm": "2.16.840.1.101.3.4.1.46",
}
CIPHERS = ("aes-128-cbc", "aes-192-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm")


def ktri_encrypted_key(der, alg_oid=OID_RSA_ENCRYPTION, start=0):
    """(offset, length) of the encryptedKey OCTET STRING content of the first
    KeyTransRecipientInfo using alg_oid at or after start."""
    i = find_after(der, alg_oid, "key encryption algorithm", start)
    # the AlgorithmIdentifier may continue with parameters (NULL, OAEP params)
    # inside its SEQUENCE; the OCTET STRING follows the SEQUENCE
    seq = i - len(alg_oid) - 2  # SEQUENCE header of a short AlgorithmIdentifier
    tag, hl, ln = der_header(der, seq)
    check(tag == 0x30 and ln is not None, "unexpected AlgorithmIdentifier encoding")
    j = seq + hl + ln
    tag, hl, ln = der_header(der, j)
    check(tag == 0x04 and ln is not None, "no encryptedKey OCTET STRING after the algorithm")
    return j + hl, ln


def replace_at(buf, off, new):
    return buf[:off] + new + buf[off + len(new):]


# ---------------------------------------------------------------- S/MIME

def mime_of(j):
    """The entity bytes of a JSON response ("mime" or "mime_base64")."""
    if "mime" in j:
        check(isinstance(j["mime"], str), "mime is not a string")
        return j["mime"].encode("utf-8")
    check("mime_base64" in j, "response has neither mime nor mime_base64: %r" % list(j))
    return base64.b64decode(j["mime_base64"])


def b64_lines(der, width=64):
    s = base64.b64encode(der)
    if not width:
        return s + b"\r\n"
    return b"".join(s[i:i + width] + b"\r\n" for i in range(0, len(s), width))


OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")


def pkcs7_mime(der, smime_type="auto", ctype="application/pkcs7-mime",
               width=64, headers=b""):
    """Wraps CMS DER/BER into an S/MIME entity (base64, CRLF). smime_type
    "auto" names the content type found at the start of der."""
    if smime_type == "auto":
        head = der[:24]
        smime_type = ("authEnveloped-data" if OID_AUTH_ENVELOPED_DATA in head else
                      "enveloped-data" if OID_ENVELOPED_DATA in head else
                      "signed-data" if OID_SIGNED_DATA in head else "enveloped-data")
    params = "; smime-type=%s" % smime_type if smime_type else ""
    return (headers + b"MIME-Version: 1.0\r\n"
            b"Content-Type: " + ("%s%s; name=\"smime.p7m\"" % (ctype, params)).encode() + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"smime.p7m\"\r\n\r\n" + b64_lines(der, width))


def multipart_signed(content, sig_der, micalg="sha-256", boundary="smimed-test-bnd"):
    content = crlf(content)
    return (b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
            b"protocol=\"application/pkcs7-signature\"; micalg=" + micalg.encode() +
            b"; boundary=\"" + boundary.encode() + b"\"\r\n\r\n"
            b"This is an S/MIME signed message\r\n\r\n--" + boundary.encode() + b"\r\n" +
            content + b"\r\n--" + boundary.encode() + b"\r\n"
            b"Content-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n" +
            b64_lines(sig_der) + b"\r\n--" + boundary.encode() + b"--\r\n")


def openssl_encrypt(plain, recips, workdir, cipher="-aes256", keyopts=(), extra=(),
                    outform="SMIME"):
    """`openssl cms -encrypt`; returns the output bytes (SMIME or DER/BER)."""
    workdir = Path(workdir)
    src = workdir / "enc.in"
    out = workdir / "enc.out"
    src.write_bytes(plain)
    cmd = ["openssl", "cms", "-encrypt", cipher, "-in", src, "-out", out, "-outform", outform]
    for r in recips:
        cmd += ["-recip", r]
        cmd += [x for ko in keyopts for x in ("-keyopt", ko)]
    run(cmd + list(extra))
    return out.read_bytes()


def openssl_decrypt(raw, cert, key, workdir, inform="SMIME"):
    """`openssl cms -decrypt` with a file key; returns the decrypted bytes."""
    workdir = Path(workdir)
    src = workdir / "dec.in"
    out = workdir / "dec.out"
    src.write_bytes(raw)
    if out.exists():
        out.unlink()
    p = run(["openssl", "cms", "-decrypt", "-inform", inform, "-in", src, "-out", out,
             "-recip", cert, "-inkey", key], check=False)
    if p.returncode != 0:
        raise AssertionError("openssl cms -decrypt failed (%d): %s" % (
            p.returncode, p.stderr.decode(errors="replace")[-1500:]))
    return out.read_bytes()


def openssl_sign(content, cert, key, workdir, digest="sha256", detached=True, extra=()):
    """`openssl cms -sign` → an S/MIME entity (multipart/signed or pkcs7-mime)."""
    workdir = Path(workdir)
    src = workdir / "sign.in"
    out = workdir / "sign.out"
    src.write_bytes(content)
    cmd = ["openssl", "cms", "-sign", "-in", src, "-out", out, "-signer", cert,
           "-inkey", key, "-md", digest]
    if not detached:
        cmd.append("-nodetach")
    run(cmd + list(extra))
    return out.read_bytes()


def smime_der(raw):
    """The CMS DER inside an application/pkcs7-mime entity (any base64)."""
    return opaque_der(raw)[1]


def smime_type(raw):
    fields, _ = split_entity(raw)
    ctype, params = header_params(get_field(fields, "Content-Type") or "")
    return ctype, (params.get("smime-type") or "").lower()


def same_entity(got, want, what="entity"):
    """Equal modulo CRLF canonicalisation (and a trailing line end)."""
    g, w = crlf(got), crlf(want)
    if g.rstrip(b"\r\n") != w.rstrip(b"\r\n"):
        raise AssertionError("%s differs:\n got %r\nwant %r" % (what, g[:400], w[:400]))


def same_inner(got, want, what="entity"):
    """Same Content-* headers and body (mail headers may differ), CRLF."""
    g_fields, g_body = split_entity(got)
    w_fields, w_body = split_entity(want)
    eq(content_headers(g_fields), content_headers(w_fields), "%s Content-* headers" % what)
    if crlf(g_body).rstrip(b"\r\n") != crlf(w_body).rstrip(b"\r\n"):
        raise AssertionError("%s body differs:\n got %r\nwant %r" % (what, g_body[:400], w_body[:400]))


class Matrix:
    """Interop results printed at the end of a suite as
    '# interop: <peer> <direction> <what> -> ok|FAIL'."""

    def __init__(self):
        self.rows = []

    def run(self, suite, peer, direction, what, fn, *args, **kw):
        ok = suite.case("%s %s %s" % (peer, direction, what), fn, *args, **kw)
        self.rows.append((peer, direction, what, "ok" if ok else "FAIL"))
        return ok

    def note(self, peer, direction, what, result):
        self.rows.append((peer, direction, what, result))

    def print(self):
        for peer, direction, what, result in self.rows:
            print("# interop: %s %s %s -> %s" % (peer, direction, what, result), flush=True)
