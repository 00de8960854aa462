#!/usr/bin/env python3
"""POST /v1/verify against the real daemon: what openssl cms, gpgsm and the
daemon itself signed verifies; tampering, untrusted, expired and revoked
signers are reported with their reason; bad input gets its 4xx."""

import base64
import calendar
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

PLAIN = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
         "signed text {tag}\r\nsecond line\r\n")
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
PASS = "p12-test-passphrase"

S = F.Suite("verify")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("verify")
M = F.Matrix()
V = None        # trusts the demo CA and the test CA (PEM bundle)
VDEMO = None    # the demo config as script/demo-token writes it
VDIR = None     # hashed directory of the test CA, its CRL configured
GPG = None
PKI = None      # trusted test CA
PKI2 = None     # a CA nobody trusts
R = {}


def plain(tag):
    return PLAIN.format(tag=tag).encode()


def post_verify(raw, d=None, **fields):
    d = d or V
    try:
        fields["mime"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        fields["mime_base64"] = base64.b64encode(raw).decode()
    return d.post_json("/v1/verify", fields)


def verify_json(raw, d=None, **fields):
    r = post_verify(raw, d, **fields)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    check(isinstance(j.get("valid"), bool), "valid %r" % j.get("valid"))
    check(isinstance(j.get("signers"), list), "signers %r" % j.get("signers"))
    if j["valid"]:
        check("reason" not in j or j["reason"] is None, "reason %r on a valid signature" % j.get("reason"))
    else:
        check(isinstance(j.get("reason"), str) and j["reason"], "no reason on an invalid result")
        if "detail" in j:
            check(isinstance(j["detail"], str), "detail %r" % j["detail"])
    return j


def check_signer(s, pem, email_addr, digest):
    F.check_serial(s.get("serial"), F.cert_serial(pem), "signer serial")
    for f in ("subject", "issuer"):
        check(isinstance(s.get(f), str) and s[f], "signer %s %r" % (f, s.get(f)))
    subj = F.run(["openssl", "x509", "-in", pem, "-noout", "-subject", "-nameopt", "RFC2253"]
                 ).stdout.decode().split("=", 1)[1].strip()
    cn = re.search(r"CN=([^,]+)", subj).group(1)
    check(cn in s["subject"], "signer subject %r lacks CN %s" % (s["subject"], cn))
    check(isinstance(s.get("emails"), list) and email_addr in s["emails"],
          "signer emails %r lack %s" % (s.get("emails"), email_addr))
    eq(s.get("digest"), digest, "signer digest")
    st = s.get("signing_time")
    check(isinstance(st, str) and RFC3339_Z.match(st), "signing_time %r" % st)
    t = calendar.timegm(time.strptime(st, "%Y-%m-%dT%H:%M:%SZ"))
    check(abs(t - time.time()) < 3600, "signing_time %s is not now" % st)


def valid(raw, signer_pem, email_addr, digest, content, d=None, **fields):
    j = verify_json(raw, d, **fields)
    check(j["valid"] is True, "valid false: %s (%s)" % (j.get("reason"), j.get("detail")))
    eq(len(j["signers"]), 1, "number of signers")
    check_signer(j["signers"][0], signer_pem, email_addr, digest)
    F.same_entity(F.mime_of(j), content, "signed content")
    return j


def invalid(raw, reasons, d=None, **fields):
    j = verify_json(raw, d, **fields)
    reasons = reasons if isinstance(reasons, tuple) else (reasons,)
    check(j["valid"] is False, "valid true, want %s" % "/".join(reasons))
    check(j.get("reason") in reasons, "reason %r, want %s (detail %r)" % (
        j.get("reason"), "/".join(reasons), j.get("detail")))
    return j


# ------------------------------------------------------------------ setup

def start():
    global V, PKI, PKI2
    PKI = F.TestCA(WORK, "pki", "smimed verify test CA")
    PKI2 = F.TestCA(WORK, "pki2", "smimed untrusted CA")
    R["rsa"] = PKI.issue("signer-rsa", "rsa")
    R["ec"] = PKI.issue("signer-ec", "ec")
    R["expired"] = PKI.issue("signer-expired", "rsa", start="20200101000000Z",
                             end="20210101000000Z")
    R["revoked"] = PKI.issue("signer-revoked", "ec")
    R["other"] = PKI2.issue("signer-other", "rsa")
    R["encrypt-only"] = PKI.issue("signer-encrypt-only", "rsa", ku="keyEncipherment")
    R["serverauth"] = PKI.issue("signer-serverauth", "ec", eku="serverAuth")
    PKI.revoke(R["revoked"])
    R["crl"] = PKI.crl()
    bundle = WORK / "trust.pem"
    bundle.write_bytes(CA.read_bytes() + PKI.pem.read_bytes())
    conf = F.write_config(WORK / "smimed.conf", [F.token_config(DEMO)], trust=str(bundle))
    V = S.daemon(conf, "verify-daemon", env=F.softhsm_env(DEMO))


def gpgsm_setup():
    global GPG
    GPG = F.Gpgsm(PKI.pem)
    GPG.import_p12(R["rsa"].p12(PASS), PASS)


def still_serving():
    msg = plain("still serving")
    valid(F.openssl_sign(msg, R["ec"].pem, R["ec"].key, WORK), R["ec"].pem, R["ec"].email,
          "sha256", msg)


# ------------------------------------------------------------------ interop

def openssl_signed(kind, digest, detached):
    c = R[kind]
    msg = plain("openssl %s %s %s" % (kind, digest, detached))
    raw = F.openssl_sign(msg, c.pem, c.key, WORK, digest, detached)
    ctype, stype = F.smime_type(raw)
    eq(ctype, "multipart/signed" if detached else ctype, "openssl output type")
    valid(raw, c.pem, c.email, digest, msg)


def gpgsm_signed(detached):
    check(GPG is not None, "gpgsm setup failed (see that case), so this interop case "
          "cannot run; CI installs every peer")
    c = R["rsa"]
    msg = plain("gpgsm detached=%s" % detached)
    der = GPG.sign(msg, c.email, WORK, detached)
    if detached:
        raw = F.multipart_signed(msg, der, "sha-256")
    else:
        raw = F.pkcs7_mime(der, smime_type="signed-data")
    valid(raw, c.pem, c.email, "sha256", msg)


def daemon_signed(key, mode, digest, d=None):
    msg = plain("smimed %s %s" % (key, mode))
    r = V.sign(key=key, mime=msg.decode(), mode=mode, digest=digest)
    eq(r.status, 200, "sign status (%r)" % r.body[:300])
    raw = F.mime_of(r.json())
    email_addr = F.KEYS[key]["email"]
    valid(raw, DEMO / ("%s.pem" % key), email_addr, digest, msg, d)
    return raw


def raw_mode():
    msg = plain("raw verify")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha384", False)
    r = V.request("POST", "/v1/verify", body=raw, headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    check((r.header("Content-Type") or "").startswith("application/json"),
          "Content-Type %r (verify answers JSON)" % r.header("Content-Type"))
    check(r.json().get("valid") is True, "valid %r" % r.json())


def base64_input():
    msg = plain("b64 verify")
    raw = F.openssl_sign(msg, R["ec"].pem, R["ec"].key, WORK, "sha512", True)
    r = V.post_json("/v1/verify", {"mime_base64": base64.b64encode(raw).decode()})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    check(r.json().get("valid") is True, "valid %r" % r.json())


def x_pkcs7_and_one_line():
    msg = plain("x-pkcs7 one line")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", False,
                         extra=["-outform", "DER"])
    valid(F.pkcs7_mime(raw, smime_type="signed-data", ctype="application/x-pkcs7-mime", width=0),
          R["rsa"].pem, R["rsa"].email, "sha256", msg)


# ------------------------------------------------------------------ failures

def tampered_detached(kind):
    c = R[kind]
    msg = plain("tamper detached %s" % kind)
    raw = F.openssl_sign(msg, c.pem, c.key, WORK)
    i = raw.find(b"signed text")
    check(i > 0, "content not found")
    bad = raw[:i] + b"S" + raw[i + 1:]
    invalid(bad, ("content_modified", "bad_signature"))


def tampered_opaque_content():
    msg = plain("tamper opaque")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", False,
                         extra=["-outform", "DER"])
    i = raw.find(b"signed text")
    check(i > 0, "content not found in the DER")
    bad = raw[:i] + b"S" + raw[i + 1:]
    invalid(F.pkcs7_mime(bad, smime_type="signed-data"), ("content_modified", "bad_signature"))


def tampered_signature(kind):
    c = R[kind]
    msg = plain("tamper signature %s" % kind)
    der = F.openssl_sign(msg, c.pem, c.key, WORK, "sha256", False, extra=["-outform", "DER"])
    # the signature value is the last element of the only SignerInfo
    b = bytearray(der)
    b[-3] ^= 0x01
    invalid(F.pkcs7_mime(bytes(b), smime_type="signed-data"), "bad_signature")


def lf_line_ends():
    """A detached signature whose message travelled with LF line ends."""
    msg = plain("lf line ends")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK)
    valid(raw.replace(b"\r\n", b"\n"), R["rsa"].pem, R["rsa"].email, "sha256", msg)


def no_signed_attributes():
    msg = plain("noattr")
    raw = F.openssl_sign(msg, R["ec"].pem, R["ec"].key, WORK, "sha256", True, extra=["-noattr"])
    j = verify_json(raw)
    check(j["valid"] is True, "valid false: %s (%s)" % (j.get("reason"), j.get("detail")))
    eq(len(j["signers"]), 1, "number of signers")
    check(j["signers"][0].get("signing_time") in (None, ""), "signing_time %r without signed attributes"
          % j["signers"][0].get("signing_time"))
    F.same_entity(F.mime_of(j), msg, "signed content")


def rsa_pss():
    msg = plain("pss")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", True,
                         extra=["-keyopt", "rsa_padding_mode:pss"])
    valid(raw, R["rsa"].pem, R["rsa"].email, "sha256", msg)


def two_signers():
    msg = plain("two signers")
    for detached in (True, False):
        raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", detached,
                             extra=["-signer", R["ec"].pem, "-inkey", R["ec"].key])
        j = verify_json(raw)
        check(j["valid"] is True, "valid false: %s (%s)" % (j.get("reason"), j.get("detail")))
        eq(len(j["signers"]), 2, "number of signers")
        got = sorted(int(x["serial"], 16) for x in j["signers"])
        eq(got, sorted([R["rsa"].serial(), R["ec"].serial()]), "signer serials")
        F.same_entity(F.mime_of(j), msg, "signed content")


def unfit_signer(name):
    c = R[name]
    raw = F.openssl_sign(plain("unfit %s" % name), c.pem, c.key, WORK)
    invalid(raw, "unfit_certificate")


def untrusted():
    c = R["other"]
    msg = plain("untrusted")
    raw = F.openssl_sign(msg, c.pem, c.key, WORK)
    j = invalid(raw, "untrusted_signer")
    check(len(j["signers"]) == 1, "signers reported for an untrusted signature: %r" % j["signers"])
    F.check_serial(j["signers"][0].get("serial"), F.cert_serial(c.pem), "signer serial")
    valid(raw, c.pem, c.email, "sha256", msg, trust=[PKI2.pem.read_text()])
    # several certificates in one PEM string
    valid(raw, c.pem, c.email, "sha256", msg, trust=[PKI.pem.read_text() + PKI2.pem.read_text()])


def hostile_certificate_text():
    # a signer certificate whose e-mail address is not UTF-8: the answer is
    # still a verify result, never a 500 or a broken JSON body
    key, pem = WORK / "hostile.key", WORK / "hostile.pem"
    F.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
           "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(pem),
           "-days", "30", "-subj", "/CN=hostile",
           "-addext", "subjectAltName=DER:30:05:81:03:ff:40:78",
           "-addext", "extendedKeyUsage=emailProtection"])
    raw = F.openssl_sign(plain("hostile"), pem, key, WORK)
    j = invalid(raw, "untrusted_signer")
    check(len(j["signers"]) == 1, "signers %r" % j["signers"])
    for e in j["signers"][0].get("emails", []):
        check(isinstance(e, str), "email %r" % e)
    j = verify_json(raw, trust=[pem.read_text()])
    check(isinstance(j["signers"][0].get("subject"), str), "subject %r" % j["signers"])


def old_x_pkcs7_signature():
    msg = plain("x-pkcs7-signature")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK)
    raw = raw.replace(b"application/pkcs7-signature", b"application/x-pkcs7-signature")
    check(raw.count(b"application/x-pkcs7-signature") == 2, "protocol and part type not both replaced")
    valid(raw, R["rsa"].pem, R["rsa"].email, "sha256", msg)


def expired():
    c = R["expired"]
    raw = F.openssl_sign(plain("expired"), c.pem, c.key, WORK)
    invalid(raw, "certificate_expired")


def revoked():
    c = R["revoked"]
    crl = R["crl"].read_text()
    raw = F.openssl_sign(plain("revoked"), c.pem, c.key, WORK, "sha256", False)
    # without CRLs there is no revocation check
    valid(raw, c.pem, c.email, "sha256", plain("revoked"))
    invalid(raw, "certificate_revoked", crls=[crl])
    # a good signer of the same CA stays valid with the CRL
    msg = plain("not revoked")
    good = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK)
    valid(good, R["rsa"].pem, R["rsa"].email, "sha256", msg, crls=[crl])


def no_signers():
    """A detached signature that is a certificate-only SignedData."""
    p7 = WORK / "certs-only.der"
    F.run(["openssl", "crl2pkcs7", "-nocrl", "-certfile", R["rsa"].pem, "-outform", "DER",
           "-out", p7])
    invalid(F.multipart_signed(plain("no signers"), p7.read_bytes()), "no_signers")


def no_signer_cert():
    msg = plain("nocerts")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, extra=["-nocerts"])
    invalid(raw, ("signer_certificate_missing", "untrusted_signer"))


def bad_input():
    sig = F.openssl_sign(plain("bad"), R["rsa"].pem, R["rsa"].key, WORK, "sha256", False,
                         extra=["-outform", "DER"])
    bodies = [
        b"garbage, not even MIME \x00\x01\x02",
        plain("just text/plain"),
        F.pkcs7_mime(sig[:len(sig) // 2], smime_type="signed-data"),
        F.pkcs7_mime(b"\x30\x80" * 5000 + b"\x00\x00" * 5000, smime_type="signed-data"),
        F.multipart_signed(plain("garbage signature"), b"\x30\x03\x02\x01\x01" + b"\xff" * 50),
        (b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; "
         b"micalg=sha-256; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nonly one part\r\n--x--\r\n"),
    ]
    for raw in bodies:
        expect_error(post_verify(raw), 422, "invalid_smime")
        still_serving()


def sha1_still_verifies():
    msg = plain("old mail, sha1")
    for detached in (True, False):
        raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha1", detached)
        valid(raw, R["rsa"].pem, R["rsa"].email, "sha1", msg)


def refused_algorithms():
    """Digests and signatures outside the lists: 422 unsupported_algorithm
    naming the OID, in both forms, and the daemon carries on."""
    msg = plain("refused")
    for detached in (True, False):
        raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "md5", detached)
        j = F.expect_unsupported(post_verify(raw), "1.2.840.113549.2.5")
        check("digest" in j["error"]["message"], "message %r" % j["error"]["message"])
        F.expect_unsupported(V.request("POST", "/v1/verify", body=raw,
                                       headers={"Content-Type": "message/rfc822"}),
                             "1.2.840.113549.2.5")
    # RSASSA-PSS whose MGF1 hash is not the signature's
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", True,
                         extra=["-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_mgf1_md:sha1"])
    j = F.expect_unsupported(post_verify(raw), "1.2.840.113549.1.1.10")
    check("MGF1" in j["error"]["message"], "message %r" % j["error"]["message"])
    # an RSA signature whose SignerInfo says md5WithRSAEncryption (the last
    # rsaEncryption OID: the certificates come before the SignerInfo)
    der = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK, "sha256", False,
                         extra=["-outform", "DER"])
    i = der.rfind(F.OID_RSA_ENCRYPTION)
    check(i > 0, "no rsaEncryption OID")
    der = F.replace_at(der, i, bytes.fromhex("06092a864886f70d010104"))
    F.expect_unsupported(post_verify(F.pkcs7_mime(der, smime_type="signed-data")),
                         "1.2.840.113549.1.1.4")
    still_serving()


def bad_fields():
    raw = F.openssl_sign(plain("fields"), R["rsa"].pem, R["rsa"].key, WORK).decode()
    broken = "-----BEGIN CERTIFICATE-----\nMIIBbroken\n-----END CERTIFICATE-----\n"
    broken_crl = "-----BEGIN X509 CRL-----\nMIIBbroken\n-----END X509 CRL-----\n"
    cases = [
        ({}, "missing_field"),
        ({"mime": raw, "trust": [broken]}, "invalid_field"),
        ({"mime": raw, "trust": ["not PEM at all"]}, "invalid_field"),
        ({"mime": raw, "trust": PKI.pem.read_text()}, "invalid_field"),
        ({"mime": raw, "crls": [broken_crl]}, "invalid_field"),
        ({"mime": raw, "crls": [PKI.pem.read_text()]}, "invalid_field"),
        ({"mime": raw, "unknown": True}, "invalid_field"),
        ({"mime_base64": "!!!"}, "invalid_base64"),
    ]
    for fields, code in cases:
        try:
            expect_error(V.post_json("/v1/verify", fields), 400, code)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (json.dumps(fields)[:120], e))
    still_serving()


# ------------------------------------------------------------------ configured trust

def demo_config_trust():
    global VDEMO
    conf = json.loads((DEMO / "smimed.conf").read_text())
    check("trust" in conf, "script/demo-token's smimed.conf has no \"trust\"")
    p = Path(conf["trust"])
    p = p if p.is_absolute() else DEMO / p
    eq(p.resolve(), CA.resolve(), "demo config trust path")
    VDEMO = S.daemon(DEMO / "smimed.conf", "verify-demo-config", env=F.softhsm_env(DEMO))
    daemon_signed("demo-ec", "detached", "sha256", VDEMO)
    msg = plain("test CA under the demo config")
    raw = F.openssl_sign(msg, R["rsa"].pem, R["rsa"].key, WORK)
    invalid(raw, "untrusted_signer", VDEMO)
    valid(raw, R["rsa"].pem, R["rsa"].email, "sha256", msg, VDEMO, trust=[PKI.pem.read_text()])


def hashed_dir_and_crls():
    global VDIR
    # OpenSSL reads the directory at each verification, in the workers: as
    # their user (nobody when the suite runs as root), so outside WORK (0700)
    top = F.workdir("verify-trust")
    top.chmod(0o755)
    hdir = top / "hashed"
    hdir.mkdir()
    shutil.copy(PKI.pem, hdir / "test-ca.pem")
    F.run(["openssl", "rehash", hdir])
    check(any(re.match(r"^[0-9a-f]{8}\.0$", p.name) for p in hdir.iterdir()), "openssl rehash made no link")
    conf = F.write_config(WORK / "smimed-dir.conf", [F.token_config(DEMO)], trust=str(hdir),
                          crls=str(R["crl"]))
    VDIR = S.daemon(conf, "verify-hashed-dir", env=F.softhsm_env(DEMO))
    msg = plain("hashed dir")
    raw = F.openssl_sign(msg, R["ec"].pem, R["ec"].key, WORK, "sha384", False)
    valid(raw, R["ec"].pem, R["ec"].email, "sha384", msg, VDIR)
    invalid(F.openssl_sign(plain("revoked"), R["revoked"].pem, R["revoked"].key, WORK),
            "certificate_revoked", VDIR)
    # the demo CA is not in this daemon's trust
    r = VDIR.sign(key="demo-rsa", mime=plain("demo under dir").decode())
    eq(r.status, 200, "sign status")
    invalid(F.mime_of(r.json()), "untrusted_signer", VDIR)


def main():
    if not S.case("daemon starts with a trust bundle, test PKI", start):
        S.finish()
    S.case("gpgsm home with the file RSA signer (PKCS#12) imported", gpgsm_setup)

    for kind in ("rsa", "ec"):
        for digest in F.DIGESTS:
            for detached in (True, False):
                alg = "%s %s %s" % ("rsa-pkcs1" if kind == "rsa" else "ecdsa-p256", digest,
                                    "detached" if detached else "opaque")
                M.run(S, "openssl", "->smimed-verify", alg, openssl_signed, kind, digest, detached)
    M.run(S, "gpgsm", "->smimed-verify", "rsa-pkcs1 sha256 detached", gpgsm_signed, True)
    M.run(S, "gpgsm", "->smimed-verify", "rsa-pkcs1 sha256 opaque", gpgsm_signed, False)
    for key, mode, digest in (("demo-rsa", "detached", "sha256"), ("demo-rsa", "opaque", "sha512"),
                              ("demo-ec", "detached", "sha384"), ("demo-ec", "opaque", "sha256")):
        M.run(S, "smimed", "->smimed-verify", "%s %s %s" % (key, digest, mode), daemon_signed, key, mode, digest)
    M.run(S, "openssl", "->smimed-verify", "rsa-pss sha256 detached", rsa_pss)
    M.run(S, "openssl", "->smimed-verify", "ecdsa-p256 sha256 detached, no signed attributes",
          no_signed_attributes)
    S.case("detached signature, message with LF line ends", lf_line_ends)
    S.case("application/x-pkcs7-signature (old clients)", old_x_pkcs7_signature)
    S.case("raw message/rfc822 answers JSON", raw_mode)
    S.case("mime_base64 input", base64_input)
    S.case("application/x-pkcs7-mime, base64 in one line", x_pkcs7_and_one_line)

    S.case("tampered detached content (rsa)", tampered_detached, "rsa")
    S.case("tampered detached content (ec)", tampered_detached, "ec")
    S.case("tampered opaque content", tampered_opaque_content)
    S.case("tampered signature value (rsa): bad_signature", tampered_signature, "rsa")
    S.case("tampered signature value (ec): bad_signature", tampered_signature, "ec")
    S.case("signer from an untrusted CA: untrusted_signer; request trust: valid", untrusted)
    S.case("signer certificate with a non-UTF-8 e-mail: still a JSON result", hostile_certificate_text)
    S.case("expired signer: certificate_expired", expired)
    S.case("two signers (detached, opaque)", two_signers)
    S.case("signer with key usage keyEncipherment only: unfit_certificate", unfit_signer,
           "encrypt-only")
    S.case("signer with extended key usage serverAuth: unfit_certificate", unfit_signer,
           "serverauth")
    S.case("revoked signer with request crls: certificate_revoked", revoked)
    S.case("certificate-only signature: no_signers", no_signers)
    S.case("signer certificate not included", no_signer_cert)
    S.case("unparseable entities: 422 invalid_smime", bad_input)
    S.case("SHA-1 signatures (old mail) still verify", sha1_still_verifies)
    S.case("MD5, RSASSA-PSS with another MGF1 hash, md5WithRSAEncryption: 422 "
           "unsupported_algorithm",
           refused_algorithms)
    S.case("bad fields, bad trust/crl PEM: 400", bad_fields)

    S.case("demo-token config trusts the demo CA", demo_config_trust)
    S.case("trust as a hashed directory, crls in the config", hashed_dir_and_crls)

    if GPG is not None:
        GPG.close()
    S.stop_running(pins=[F.read_pin(DEMO)])
    M.print()
    S.finish()


if __name__ == "__main__":
    main()
