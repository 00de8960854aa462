#!/usr/bin/env python3
"""POST /v1/sign against the real daemon and the demo token, checked with
openssl cms and gpgsm."""

import base64
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

SIGNED_ATTRS = {
    "contentType": "1.2.840.113549.1.9.3",
    "messageDigest": "1.2.840.113549.1.9.4",
    "signingTime": "1.2.840.113549.1.9.5",
    "SMIMECapabilities": "1.2.840.113549.1.9.15",
    "signingCertificateV2": "1.2.840.113549.1.9.16.2.47",
}
DIGEST_OID = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2",
              "sha512": "2.16.840.1.101.3.4.2.3"}

# Plain 7-bit text, CRLF, no mail headers.
MSG_PLAIN = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
             "hello {tag}\r\nsecond line\r\n\r\nlast line\r\n")
# Bare LF line ends and top-level mail headers, which stay outside the signature.
MSG_MAIL = ("From: Alice <alice@demo.smimed.test>\nTo: bob@example.test\n"
            "Subject: test {tag}\nDate: Thu, 26 Nov 2026 10:00:00 +0000\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n"
            "hello {tag}\nwith LF line ends\n")
MSG_MULTI = ("From: alice@demo.smimed.test\r\nSubject: multipart\r\nMIME-Version: 1.0\r\n"
             "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
             "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nfirst part\r\n"
             "--b1\r\nContent-Type: application/octet-stream\r\n"
             "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n"
             "--b1--\r\n")

S = F.Suite("sign")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("sign")
D = None
GPG = None


def top_mail_fields(msg_bytes):
    fields, _ = F.split_entity(msg_bytes)
    return [(n.lower(), F.norm_value(v)) for n, v in fields
            if not n.lower().startswith("content-") and n.lower() != "mime-version"]


def check_signed(out, submitted, key, mode, digest, gpgsm=True, compare=True):
    """Verifies a signed entity every way we can; returns the signed content."""
    check(all(b < 128 for b in out), "output is not 7-bit")
    check(b"\r\n" in out and b"\n" not in out.replace(b"\r\n", b""),
          "output line ends are not CRLF throughout")
    fields, _ = F.split_entity(out)
    # top-level mail headers are repeated outside the signature
    out_top = [(n.lower(), F.norm_value(v)) for n, v in fields]
    for f in top_mail_fields(submitted):
        check(f in out_top, "top-level header %s missing from the result" % f[0])
    ctype, params = F.header_params(F.get_field(fields, "Content-Type") or "")
    if mode == "detached":
        eq(ctype, "multipart/signed", "Content-Type")
        eq(params.get("protocol"), "application/pkcs7-signature", "protocol parameter")
        eq((params.get("micalg") or "").lower(), F.MICALG[digest], "micalg parameter")
        _, part, der = F.split_multipart_signed(out)
    else:
        check(ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"),
              "Content-Type %s" % ctype)
        eq((params.get("smime-type") or "").lower(), "signed-data", "smime-type")
        _, der = F.opaque_der(out)
        part = None
    content = F.openssl_verify(out, CA, WORK)
    if part is not None:
        eq(content, part, "openssl's content vs the first part")
    # signer and digest
    certs = F.cms_certs(der, WORK)
    want = F.cert_der((DEMO / ("%s.pem" % key)).read_bytes())
    check(any(F.cert_der(c) == want for c in certs), "signer certificate not in the signature")
    printed = F.cms_print(der, WORK)
    check(DIGEST_OID[digest] in printed, "digest %s not used" % digest)
    if F.KEYS[key]["algorithm"].startswith("ec"):
        check("ecdsa-with-%s" % digest.upper() in printed, "signature is not ecdsa-with-%s" % digest.upper())
    # content = submitted entity minus top-level mail headers, CRLF
    in_fields, in_body = F.split_entity(submitted)
    c_fields, c_body = F.split_entity(content)
    for n, _ in c_fields:
        check(n.lower().startswith("content-") or n.lower() == "mime-version",
              "header %s inside the signed part" % n)
    if compare:
        eq(F.content_headers(c_fields), F.content_headers(in_fields), "signed Content-* headers")
        eq(c_body, F.crlf(in_body), "signed body")
    if gpgsm and GPG is not None:
        if mode == "detached":
            GPG.verify_detached(der, part, WORK, digest)
        else:
            g_content = GPG.verify_opaque(der, WORK, digest)
            eq(F.crlf(g_content), content, "gpgsm's content vs openssl's")
    return content, der


def sign_ok(**fields):
    r = D.sign(**fields)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    return j


# ------------------------------------------------------------------ cases

def start():
    global D, GPG
    D = S.daemon(DEMO / "smimed.conf", "sign-daemon", env=F.softhsm_env(DEMO))
    GPG = F.Gpgsm(CA)


def matrix_case(i, key, mode, digest):
    tag = "%s/%s/%s" % (key, mode, digest)
    msg = (MSG_PLAIN if i % 2 == 0 else MSG_MAIL).format(tag=tag)
    j = sign_ok(key=key, mime=msg, mode=mode, digest=digest)
    eq(j.get("key"), key, "key")
    eq(j.get("mode"), mode, "mode")
    eq(j.get("digest"), digest, "digest")
    check(isinstance(j.get("reencoded"), list), "reencoded is not a list: %r" % j.get("reencoded"))
    eq(j["reencoded"], [], "reencoded for a 7-bit entity")
    check_signed(F.mime_of(j), msg.encode(), key, mode, digest)


def defaults():
    msg = MSG_PLAIN.format(tag="defaults")
    j = sign_ok(key="demo-ec", mime=msg)
    eq(j.get("mode"), "detached", "default mode")
    eq(j.get("digest"), "sha256", "default digest")
    check_signed(F.mime_of(j), msg.encode(), "demo-ec", "detached", "sha256", gpgsm=False)


def signed_attributes(key):
    msg = MSG_PLAIN.format(tag="attrs")
    j = sign_ok(key=key, mime=msg, mode="opaque", digest="sha256")
    _, der = check_signed(F.mime_of(j), msg.encode(), key, "opaque", "sha256", gpgsm=False)
    printed = F.cms_print(der, WORK)
    missing = [n for n, oid in SIGNED_ATTRS.items() if oid not in printed]
    check(not missing, "signed attributes missing: %s" % ", ".join(missing))


def base64_input():
    msg = MSG_MAIL.format(tag="base64").encode()
    j = sign_ok(key="demo-rsa", mime_base64=base64.b64encode(msg).decode(), mode="detached")
    check_signed(F.mime_of(j), msg, "demo-rsa", "detached", "sha256")


def raw_mode(key, mode, digest):
    msg = MSG_MAIL.format(tag="raw %s" % mode).encode()
    r = D.request("POST", "/v1/sign?key=%s&mode=%s&digest=%s" % (key, mode, digest), body=msg,
                  headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq((r.header("Content-Type") or "").split(";")[0].strip().lower(), "message/rfc822", "Content-Type")
    eq(r.header("X-Smimed-Key"), key, "X-Smimed-Key")
    eq(r.header("X-Smimed-Digest"), digest, "X-Smimed-Digest")
    check(r.header("X-Smimed-Reencoded") is not None, "no X-Smimed-Reencoded header")
    check_signed(r.body, msg, key, mode, digest)


def raw_defaults():
    msg = MSG_PLAIN.format(tag="raw default").encode()
    r = D.request("POST", "/v1/sign?key=demo-rsa", body=msg,
                  headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    check_signed(r.body, msg, "demo-rsa", "detached", "sha256", gpgsm=False)


def eight_bit(via):
    text = "Grüße aus Zürich — ½ €\r\nzweite Zeile\r\n"
    if via == "mime":
        msg = ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               + text).encode("utf-8")
        j = sign_ok(key="demo-rsa", mime=msg.decode("utf-8"))
    else:
        msg = ("Content-Type: text/plain; charset=iso-8859-1\r\n\r\n").encode() + \
            text.replace("—", "-").replace("€", "EUR").encode("latin-1")
        j = sign_ok(key="demo-ec", mime_base64=base64.b64encode(msg).decode(), mode="opaque")
    check(isinstance(j.get("reencoded"), list) and j["reencoded"], "reencoded is empty for an 8-bit body")
    check(all(isinstance(x, str) and x.split(" ")[0] == "1" for x in j["reencoded"]),
          "reencoded entries %r (want part \"1\")" % j["reencoded"])
    mode = "detached" if via == "mime" else "opaque"
    key = "demo-rsa" if via == "mime" else "demo-ec"
    content, _ = check_signed(F.mime_of(j), msg, key, mode, "sha256", compare=False)
    # the signed part decodes back to the submitted text
    part = F.email.message_from_bytes(content)
    eq(part.get_payload(decode=True).replace(b"\r\n", b"\n"),
       F.split_entity(msg)[1].replace(b"\r\n", b"\n"), "decoded signed body")


def multipart():
    j = sign_ok(key="demo-ec", mime=MSG_MULTI, mode="detached", digest="sha384")
    eq(j["reencoded"], [], "reencoded")
    check_signed(F.mime_of(j), MSG_MULTI.encode(), "demo-ec", "detached", "sha384")


def multipart_8bit():
    msg = ("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b2\"\r\n\r\n"
           "--b2\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nascii part\r\n"
           "--b2\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           "naïve café\r\n--b2--\r\n")
    j = sign_ok(key="demo-rsa", mime=msg)
    check(any(x.split(" ")[0] == "2" for x in j.get("reencoded", [])),
          "reencoded %r does not name part 2" % j.get("reencoded"))
    check_signed(F.mime_of(j), msg.encode(), "demo-rsa", "detached", "sha256", compare=False)


def from_lines_and_spaces():
    msg = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
           "From here on\r\ntrailing space \r\ntrailing tab\t\r\n.\r\nend\r\n")
    j = sign_ok(key="demo-rsa", mime=msg)
    out = F.mime_of(j)
    check(not any(l.startswith(b"From ") for l in out.split(b"\r\n")),
          "a line of the result starts with 'From ' (mbox would mangle it)")
    content, _ = check_signed(out, msg.encode(), "demo-rsa", "detached", "sha256", compare=False)
    part = F.email.message_from_bytes(content)
    eq(part.get_payload(decode=True).replace(b"\r\n", b"\n"),
       F.split_entity(msg.encode())[1].replace(b"\r\n", b"\n"), "decoded signed body")


def empty_body():
    msg = "Content-Type: text/plain\r\n\r\n"
    j = sign_ok(key="demo-ec", mime=msg)
    check_signed(F.mime_of(j), msg.encode(), "demo-ec", "detached", "sha256", gpgsm=False,
                 compare=False)


def large_body():
    line = "0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
    msg = "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + line * 16000  # ~1 MiB
    j = sign_ok(key="demo-rsa", mime=msg, mode="opaque", digest="sha512")
    check_signed(F.mime_of(j), msg.encode(), "demo-rsa", "opaque", "sha512", gpgsm=False)


def chain_included():
    d2dir = F.workdir("chain")
    # an extra certificate from the demo CA stands in for an intermediate
    F.run(["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
           "ec_paramgen_curve:P-256", "-nodes", "-keyout", d2dir / "x.key", "-subj",
           "/CN=smimed chain marker", "-days", "30", "-out", d2dir / "x-self.pem"])
    F.run(["openssl", "x509", "-in", d2dir / "x-self.pem", "-CA", CA, "-CAkey", DEMO / "ca.key",
           "-set_serial", "77", "-days", "30", "-out", d2dir / "chain.pem"])
    conf = F.write_config(d2dir / "smimed.conf",
                          [F.token_config(DEMO, chain=str(d2dir / "chain.pem"))])
    d2 = S.daemon(conf, "chain-daemon", env=F.softhsm_env(DEMO))
    try:
        msg = MSG_PLAIN.format(tag="chain")
        r = d2.sign(key="demo-rsa", mime=msg, mode="detached")
        eq(r.status, 200, "status (%r)" % r.body[:300])
        _, der = check_signed(F.mime_of(r.json()), msg.encode(), "demo-rsa", "detached",
                              "sha256", gpgsm=False)
        want = F.cert_der((d2dir / "chain.pem").read_bytes())
        check(any(F.cert_der(c) == want for c in F.cms_certs(der, WORK)),
              "configured chain certificate not in the signature")
    finally:
        rc = d2.stop()
    F.check_exit(d2, rc, "chain daemon exit status")


def main():
    if not S.case("daemon starts on the demo token", start):
        S.finish()
    combos = list(itertools.product(F.KEYS, F.MODES, F.DIGESTS))
    for i, (key, mode, digest) in enumerate(combos):
        S.case("%s %s %s verifies (openssl, gpgsm)" % (key, mode, digest),
               matrix_case, i, key, mode, digest)
    S.case("defaults are detached sha256", defaults)
    for key in F.KEYS:
        S.case("%s signed attributes present" % key, signed_attributes, key)
    S.case("mime_base64 input", base64_input)
    S.case("raw message/rfc822 detached", raw_mode, "demo-rsa", "detached", "sha384")
    S.case("raw message/rfc822 opaque", raw_mode, "demo-ec", "opaque", "sha512")
    S.case("raw message/rfc822 defaults", raw_defaults)
    S.case("8-bit UTF-8 body is re-encoded and verifies", eight_bit, "mime")
    S.case("8-bit latin-1 body via mime_base64 is re-encoded and verifies", eight_bit, "base64")
    S.case("multipart/mixed entity", multipart)
    S.case("multipart with an 8-bit part re-encodes part 2", multipart_8bit)
    S.case("'From ' lines and trailing whitespace survive", from_lines_and_spaces)
    S.case("empty body", empty_body)
    S.case("1 MiB body", large_body)
    S.case("configured chain is included", chain_included)
    if GPG is not None:
        GPG.close()
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
