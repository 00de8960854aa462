#!/usr/bin/env python3
"""POST /v1/encrypt (and /v1/sign with encrypt_for) against the real daemon:
the result decrypts with openssl cms and gpgsm using file keys, and with the
daemon itself for the demo keys; recipient checks and bad input."""

import base64
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

PLAIN = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
         "for your eyes only: {tag}\r\nsecond line\r\n")
MAIL = ("From: Alice <alice@demo.smimed.test>\r\nTo: bob@file.smimed.test\r\n"
        "Subject: encrypted {tag}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\nbody of {tag}\r\n")
KEY_ENC_OID = {"pkcs1": "rsaEncryption (1.2.840.113549.1.1.1)",
               "oaep": "rsaesOaep (1.2.840.113549.1.1.7)"}
# dhSinglePass-stdDH-sha1kdf-scheme (1.3.133.16.840.63.0.2), -sha*kdf-scheme
# (1.3.132.1.11.*), and their cofactorDH variants (RFC 5753)
ECDH_KEA = re.compile(r"algorithm: dhSinglePass-(std|cofactor)DH-sha\d*kdf-scheme \("
                      r"(1\.3\.133\.16\.840\.63\.0\.[23]|1\.3\.132\.1\.1[14]\.\d)\)")
PASS = "p12-test-passphrase"

S = F.Suite("encrypt")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("encrypt")
M = F.Matrix()
D = None
GPG = None
PKI = None
R = {}   # name -> F.Cert


def plain(tag):
    return PLAIN.format(tag=tag)


def encrypt_ok(mime, recipients, **fields):
    r = D.post_json("/v1/encrypt", dict(fields, mime=mime, recipients=recipients))
    eq(r.status, 200, "status (%r)" % r.body[:300])
    return r.json()


def check_envelope(out, cipher, padding=None, kinds=()):
    """Content type, smime-type, cipher and key encryption of a result."""
    check(all(b < 128 for b in out), "output is not 7-bit")
    ctype, stype = F.smime_type(out)
    check(ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"), "Content-Type %s" % ctype)
    want = "authenveloped-data" if cipher.endswith("gcm") else "enveloped-data"
    eq(stype, want, "smime-type")
    der = F.smime_der(out)
    printed = F.cms_print(der, WORK)
    check(F.CIPHER_OIDS[cipher] in printed, "content encryption is not %s" % cipher)
    want_ct = ("id-smime-ct-authEnvelopedData" if cipher.endswith("gcm") else "pkcs7-envelopedData")
    check(want_ct in printed.split("\n", 2)[1], "content type is not %s" % want_ct)
    for kind in kinds:
        if kind == "rsa":
            check(KEY_ENC_OID[padding or "pkcs1"] in printed,
                  "RSA key transport is not %s" % (padding or "pkcs1"))
            other = "oaep" if (padding or "pkcs1") == "pkcs1" else "pkcs1"
            check(KEY_ENC_OID[other] not in printed, "RSA key transport also uses %s" % other)
        elif kind.startswith("ec"):
            check("d.kari:" in printed and ECDH_KEA.search(printed),
                  "no ECDH KeyAgreeRecipientInfo")
    return printed


def check_recipients(j, certs):
    """The response's recipients describe certs, in the request's order."""
    rs = j.get("recipients")
    check(isinstance(rs, list) and len(rs) == len(certs), "recipients %r" % rs)
    check([int(g["serial"], 16) for g in rs] == [F.cert_serial(p) for p in certs],
          "recipients not in the request's order: %r" % [g.get("serial") for g in rs])
    by_serial = {}
    for got in rs:
        check(isinstance(got, dict) and isinstance(got.get("serial"), str),
              "recipient entry %r" % got)
        by_serial[int(got["serial"], 16)] = got
    for pem in certs:
        got = by_serial.get(F.cert_serial(pem))
        check(got is not None, "no recipient entry for serial %X in %r" % (
            F.cert_serial(pem), [g.get("serial") for g in rs]))
        check(isinstance(got, dict), "recipient entry %r" % got)
        F.check_serial(got.get("serial"), F.cert_serial(pem), "recipient serial")
        for f in ("subject", "issuer"):
            check(isinstance(got.get(f), str) and got[f], "recipient %s %r" % (f, got.get(f)))
        emails = got.get("emails")
        check(isinstance(emails, list), "recipient emails %r" % emails)
        text = F.run(["openssl", "x509", "-in", pem, "-noout", "-ext", "subjectAltName"],
                     check=False).stdout.decode()
        for e in emails:
            check(e in text, "email %s not in the certificate" % e)
        check(emails, "recipient emails empty")


def decrypted_matches(dec, msg):
    F.same_inner(dec, msg.encode(), "decrypted entity")
    fields, _ = F.split_entity(dec)
    for n, _ in fields:
        check(n.lower().startswith("content-") or n.lower() == "mime-version",
              "header %s inside the encrypted part" % n)


# ------------------------------------------------------------------ setup

def start():
    global D, PKI
    D = S.daemon(DEMO / "smimed.conf", "encrypt-daemon", env=F.softhsm_env(DEMO))
    PKI = F.TestCA(WORK, "pki", "smimed encrypt test CA")
    R["rsa"] = PKI.issue("file-rsa", "rsa")
    R["ec"] = PKI.issue("file-ec", "ec")
    R["rsa-signonly"] = PKI.issue("rsa-signonly", "rsa", ku="digitalSignature")
    R["ec-signonly"] = PKI.issue("ec-signonly", "ec", ku="digitalSignature")
    R["rsa-expired"] = PKI.issue("rsa-expired", "rsa", start="20200101000000Z",
                                 end="20210101000000Z")
    R["ec-notyet"] = PKI.issue("ec-notyet", "ec", start="20400101000000Z",
                               end="20410101000000Z")
    R["rsa-serverauth"] = PKI.issue("rsa-serverauth", "rsa", eku="serverAuth")
    R["rsa-noku"] = PKI.issue("rsa-noku", "rsa", ku="", eku="")
    R["ec384"] = PKI.issue("file-ec384", "ec384")
    R["k256"] = PKI.issue("file-k256", "k256")
    R["ed25519"] = PKI.issue("file-ed25519", "ed25519", ku="digitalSignature")
    # a self-signed recipient with the right key usage: chains are not checked
    d = WORK / "selfsigned"
    d.mkdir()
    F.run(["openssl", "req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-days", "30",
           "-keyout", d / "ss.key", "-out", d / "ss.pem", "-subj", "/CN=self signed recipient",
           "-addext", "keyUsage=critical,keyEncipherment",
           "-addext", "subjectAltName=email:self@file.smimed.test"])
    R["self-signed"] = F.Cert("self-signed", "rsa", "self@file.smimed.test", d / "ss.pem",
                              d / "ss.key")


def gpgsm_setup():
    global GPG
    GPG = F.Gpgsm(CA, PKI.pem)
    GPG.import_p12(R["rsa"].p12(PASS), PASS)


def still_serving():
    msg = plain("still serving")
    j = encrypt_ok(msg, [R["ec"].pem_text()])
    decrypted_matches(F.openssl_decrypt(F.mime_of(j), R["ec"].pem, R["ec"].key, WORK), msg)


# ------------------------------------------------------------------ interop

def to_file_key(cipher, kind, padding):
    c = R[kind]
    msg = plain("%s %s %s" % (cipher, kind, padding))
    fields = {"cipher": cipher}
    if padding:
        fields["rsa_padding"] = padding
    j = encrypt_ok(msg, [c.pem_text()], **fields)
    eq(j.get("cipher"), cipher, "cipher in the response")
    check_recipients(j, [c.pem])
    out = F.mime_of(j)
    check_envelope(out, cipher, padding, [kind])
    decrypted_matches(F.openssl_decrypt(out, c.pem, c.key, WORK), msg)


def gpgsm_decrypts(cipher):
    check(GPG is not None, "gpgsm setup failed (see that case), so this interop case "
          "cannot run; CI installs every peer")
    msg = plain("gpgsm %s" % cipher)
    j = encrypt_ok(msg, [R["rsa"].pem_text()], cipher=cipher)
    out = F.mime_of(j)
    check_envelope(out, cipher, "pkcs1", ["rsa"])
    decrypted_matches(GPG.decrypt(F.smime_der(out), WORK), msg)


def defaults():
    msg = plain("defaults")
    j = encrypt_ok(msg, [R["rsa"].pem_text()])
    eq(j.get("cipher"), "aes-256-cbc", "default cipher")
    out = F.mime_of(j)
    check_envelope(out, "aes-256-cbc", "pkcs1", ["rsa"])
    decrypted_matches(F.openssl_decrypt(out, R["rsa"].pem, R["rsa"].key, WORK), msg)


def to_key_names(cipher):
    msg = plain("key names %s" % cipher)
    j = encrypt_ok(msg, ["demo-rsa", "demo-ec"], cipher=cipher)
    check_recipients(j, [DEMO / "demo-rsa.pem", DEMO / "demo-ec.pem"])
    out = F.mime_of(j)
    check_envelope(out, cipher, "pkcs1", ["rsa", "ec"])
    for key in (None, "demo-rsa", "demo-ec"):
        fields = {"mime": out.decode()}
        if key:
            fields["key"] = key
        r = D.post_json("/v1/decrypt", fields)
        eq(r.status, 200, "decrypt (key %s) status (%r)" % (key, r.body[:300]))
        if key:
            eq(r.json().get("key"), key, "key used")
        decrypted_matches(F.mime_of(r.json()), msg)


def mixed_recipients():
    msg = plain("mixed")
    j = encrypt_ok(msg, [R["rsa"].pem_text(), "demo-ec", R["ec"].pem_text()],
                   cipher="aes-128-gcm", rsa_padding="oaep")
    check_recipients(j, [R["rsa"].pem, DEMO / "demo-ec.pem", R["ec"].pem])
    out = F.mime_of(j)
    check_envelope(out, "aes-128-gcm", "oaep", ["rsa", "ec"])
    for c in (R["rsa"], R["ec"]):
        decrypted_matches(F.openssl_decrypt(out, c.pem, c.key, WORK), msg)
    r = D.post_json("/v1/decrypt", {"mime": out.decode()})
    eq(r.status, 200, "daemon decrypt status (%r)" % r.body[:300])
    eq(r.json().get("key"), "demo-ec", "key used")
    decrypted_matches(F.mime_of(r.json()), msg)


def oaep_to_demo_rsa():
    msg = plain("oaep demo")
    j = encrypt_ok(msg, ["demo-rsa"], cipher="aes-256-gcm", rsa_padding="oaep")
    out = F.mime_of(j)
    check_envelope(out, "aes-256-gcm", "oaep", ["rsa"])
    r = D.post_json("/v1/decrypt", {"mime": out.decode()})
    eq(r.status, 200, "daemon decrypt status (%r)" % r.body[:300])
    decrypted_matches(F.mime_of(r.json()), msg)


def mail_headers_outside():
    msg = MAIL.format(tag="headers")
    j = encrypt_ok(msg, [R["rsa"].pem_text()])
    out = F.mime_of(j)
    top = [(n.lower(), F.norm_value(v)) for n, v in F.split_entity(out)[0]]
    for name in ("from", "to", "subject"):
        want = [f for f in F.split_entity(msg.encode())[0] if f[0].lower() == name][0]
        check((name, F.norm_value(want[1])) in top, "%s header missing outside" % name)
    dec = F.openssl_decrypt(out, R["rsa"].pem, R["rsa"].key, WORK)
    decrypted_matches(dec, msg)


def eight_bit():
    text = "Grüße aus Zürich — ½ €\r\n"
    msg = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
    j = encrypt_ok(msg, [R["ec"].pem_text()])
    dec = F.openssl_decrypt(F.mime_of(j), R["ec"].pem, R["ec"].key, WORK)
    part = F.email.message_from_bytes(dec)
    eq(part.get_payload(decode=True).replace(b"\r\n", b"\n"), text.encode().replace(b"\r\n", b"\n"),
       "decoded body")


def base64_input():
    msg = plain("base64 in")
    r = D.post_json("/v1/encrypt", {"mime_base64": base64.b64encode(msg.encode()).decode(),
                                    "recipients": [R["rsa"].pem_text()]})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    decrypted_matches(F.openssl_decrypt(F.mime_of(r.json()), R["rsa"].pem, R["rsa"].key, WORK), msg)


def raw_mode():
    msg = MAIL.format(tag="raw")
    r = D.request("POST", "/v1/encrypt?recipients=demo-rsa,demo-ec&cipher=aes-128-gcm",
                  body=msg.encode(), headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq((r.header("Content-Type") or "").split(";")[0].strip().lower(), "message/rfc822",
       "Content-Type")
    eq(r.header("X-Smimed-Cipher"), "aes-128-gcm", "X-Smimed-Cipher")
    check_envelope(r.body, "aes-128-gcm", "pkcs1", ["rsa", "ec"])
    r2 = D.request("POST", "/v1/decrypt?key=demo-ec", body=r.body,
                   headers={"Content-Type": "message/rfc822"})
    eq(r2.status, 200, "decrypt status (%r)" % r2.body[:300])
    # decrypt puts the mail headers that stayed outside back on the result
    F.same_entity(r2.body, msg.encode(), "decrypted message")


# ------------------------------------------------------------------ sign + encrypt

def sign_encrypt_for(mode, cipher=None, padding=None):
    msg = MAIL.format(tag="sign+encrypt %s" % mode)
    fields = {}
    if cipher:
        fields["cipher"] = cipher
    if padding:
        fields["rsa_padding"] = padding
    r = D.sign(key="demo-rsa", mime=msg, mode=mode, encrypt_for=[R["rsa"].pem_text(), "demo-ec"],
               **fields)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq(r.json().get("cipher"), cipher or "aes-256-cbc", "cipher in the response")
    check_recipients(r.json(), [R["rsa"].pem, DEMO / "demo-ec.pem"])
    out = F.mime_of(r.json())
    check_envelope(out, cipher or "aes-256-cbc", padding or "pkcs1", ["rsa", "ec"])
    # openssl: decrypt with the file key, verify with the demo CA
    signed = F.openssl_decrypt(out, R["rsa"].pem, R["rsa"].key, WORK)
    content = F.openssl_verify(signed, CA, WORK)
    F.same_inner(content, msg.encode(), "signed content")
    # the daemon: decrypt with demo-ec and verify
    r = D.post_json("/v1/decrypt", {"mime": out.decode(), "key": "demo-ec", "verify": True})
    eq(r.status, 200, "decrypt status (%r)" % r.body[:300])
    j = r.json()
    check(j.get("signed") is True, "signed %r" % j.get("signed"))
    v = j.get("verification") or {}
    check(v.get("valid") is True, "verification %r" % v)
    signers = v.get("signers") or []
    check(len(signers) == 1, "signers %r" % signers)
    F.check_serial(signers[0].get("serial"), F.cert_serial(DEMO / "demo-rsa.pem"), "signer serial")
    F.same_inner(F.mime_of(v), msg.encode(), "verified content")
    # gpgsm decrypts the RSA recipient's copy too (CBC and PKCS#1 only)
    if GPG is not None and not cipher and not padding:
        g = GPG.decrypt(F.smime_der(out), WORK)
        F.same_entity(g, signed, "gpgsm's decryption vs openssl's")


# ------------------------------------------------------------------ recipient checks

UNFIT = {
    "rsa-signonly": ("usage",),
    "ec-signonly": ("usage",),
    "rsa-expired": ("expired",),
    "ec-notyet": ("not yet valid", "not valid yet", "not valid before", "not_before", "future"),
    "rsa-serverauth": ("usage", "emailprotection"),
}


def unfit(name):
    c = R[name]
    msg = plain("unfit %s" % name)
    r = D.post_json("/v1/encrypt", {"mime": msg, "recipients": [c.pem_text()]})
    j = expect_error(r, 422, "unfit_recipient")
    text = j["error"]["message"].lower()
    check(any(w in text for w in UNFIT[name]),
          "message %r does not name the reason (%s)" % (j["error"]["message"], "/".join(UNFIT[name])))
    # together with a good recipient it is still refused
    r = D.post_json("/v1/encrypt", {"mime": msg, "recipients": [R["rsa"].pem_text(), c.pem_text()]})
    expect_error(r, 422, "unfit_recipient")
    # accepted when asked for
    j = encrypt_ok(msg, [c.pem_text()], allow_unfit_recipients=True)
    decrypted_matches(F.openssl_decrypt(F.mime_of(j), c.pem, c.key, WORK), msg)
    still_serving()


def fit_without_extensions(name):
    c = R[name]
    msg = plain("fit %s" % name)
    j = encrypt_ok(msg, [c.pem_text()])
    decrypted_matches(F.openssl_decrypt(F.mime_of(j), c.pem, c.key, WORK), msg)


def unsupported_key(name):
    r = D.post_json("/v1/encrypt", {"mime": plain("unsupported"), "recipients": [R[name].pem_text()]})
    expect_error(r, 422, "unfit_recipient")
    still_serving()


def bad_requests():
    good = [R["rsa"].pem_text()]
    msg = plain("bad")
    key_pem = R["rsa"].key.read_text()
    broken = "-----BEGIN CERTIFICATE-----\nMIIBbroken\n-----END CERTIFICATE-----\n"
    cases = [
        ({"recipients": good}, 400, "missing_field"),
        ({"mime": msg}, 400, "missing_field"),
        ({"mime": msg, "recipients": []}, 400, ("invalid_field", "missing_field")),
        ({"mime": msg, "recipients": "demo-rsa"}, 400, "invalid_field"),
        ({"mime": msg, "recipients": [42]}, 400, "invalid_field"),
        ({"mime": msg, "recipients": good, "cipher": "des-ede3-cbc"}, 400, "invalid_field"),
        ({"mime": msg, "recipients": good, "cipher": "AES-256-CBC-nope"}, 400, "invalid_field"),
        ({"mime": msg, "recipients": good, "rsa_padding": "pss"}, 400, "invalid_field"),
        ({"mime": msg, "recipients": good, "allow_unfit_recipients": "yes"}, 400, "invalid_field"),
        ({"mime": msg, "recipients": good, "nonsense": 1}, 400, "invalid_field"),
        ({"mime": msg, "recipients": [broken]}, 400, "invalid_certificate"),
        ({"mime": msg, "recipients": good + [broken]}, 400, "invalid_certificate"),
        ({"mime": msg, "recipients": [key_pem]}, 400, "invalid_certificate"),
        ({"mime": msg, "recipients": ["no-such-key"]}, 404, "unknown_key"),
        ({"mime": msg, "recipients": good + ["no-such-key"]}, 404, "unknown_key"),
    ]
    for fields, status, code in cases:
        try:
            expect_error(D.post_json("/v1/encrypt", fields), status, code)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (json.dumps(fields)[:160], e))
    for q in ("recipients=demo-rsa&cipher=rot13", "recipients=no-such-key", ""):
        r = D.request("POST", "/v1/encrypt?" + q, body=msg.encode(),
                      headers={"Content-Type": "message/rfc822"})
        check(r.status in (400, 404), "raw ?%s: status %d" % (q, r.status))
        expect_error(r, r.status, r.error_code())
    still_serving()


def sign_encrypt_for_bad():
    msg = plain("sign bad encrypt_for")
    expect_error(D.sign(key="demo-rsa", mime=msg, encrypt_for=["no-such-key"]), 404, "unknown_key")
    expect_error(D.sign(key="demo-rsa", mime=msg, encrypt_for=[R["rsa-signonly"].pem_text()]),
                 422, "unfit_recipient")
    expect_error(D.sign(key="demo-rsa", mime=msg, encrypt_for="demo-ec"), 400, "invalid_field")
    expect_error(D.sign(key="demo-rsa", mime=msg, cipher="aes-128-gcm"), 400, "invalid_field")
    expect_error(D.sign(key="demo-rsa", mime=msg, encrypt_for=["demo-ec"], cipher="rot13"),
                 400, "invalid_field")
    still_serving()


def main():
    if not S.case("daemon starts on the demo token, test PKI", start):
        S.finish()
    S.case("gpgsm home with the file RSA key (PKCS#12) imported", gpgsm_setup)

    for cipher in F.CIPHERS:
        for kind, padding in (("rsa", "pkcs1"), ("rsa", "oaep"), ("ec", None)):
            alg = "rsa-%s" % padding if kind == "rsa" else "ecdh-p256"
            M.run(S, "openssl", "<-smimed-encrypt", "%s %s" % (alg, cipher), to_file_key, cipher, kind, padding)
    for cipher in ("aes-128-cbc", "aes-192-cbc", "aes-256-cbc"):
        M.run(S, "gpgsm", "<-smimed-encrypt", "rsa-pkcs1 %s" % cipher, gpgsm_decrypts, cipher)
    M.note("gpgsm", "<-smimed-encrypt", "aes-*-gcm, rsa-oaep, ecdh",
           "not tried (gpgsm 2.2.40: no AuthEnvelopedData, no OAEP, EC PKCS#12 import crashes)")
    for cipher in ("aes-256-cbc", "aes-128-gcm"):
        M.run(S, "smimed", "<-smimed-encrypt", "demo-rsa+demo-ec by name %s" % cipher, to_key_names, cipher)
    M.run(S, "smimed", "<-smimed-encrypt", "demo-rsa rsa-oaep aes-256-gcm", oaep_to_demo_rsa)
    S.case("defaults: aes-256-cbc, PKCS#1 v1.5", defaults)
    S.case("PEM and key-name recipients mixed, oaep + gcm", mixed_recipients)
    S.case("mail headers stay outside the envelope", mail_headers_outside)
    S.case("8-bit body", eight_bit)
    S.case("mime_base64 input", base64_input)
    S.case("raw message/rfc822 with recipients and cipher in the query", raw_mode)
    for mode in ("detached", "opaque"):
        M.run(S, "openssl+gpgsm+smimed", "<-smimed-sign+encrypt",
              "sign %s + encrypt_for aes-256-cbc rsa-pkcs1/ecdh" % mode, sign_encrypt_for, mode)
    M.run(S, "openssl+smimed", "<-smimed-sign+encrypt",
          "sign detached + encrypt_for aes-128-gcm rsa-oaep/ecdh",
          sign_encrypt_for, "detached", "aes-128-gcm", "oaep")
    for name in UNFIT:
        S.case("unfit recipient %s: 422, 200 with allow_unfit_recipients" % name, unfit, name)
    S.case("recipient without key usage extensions is fit", fit_without_extensions, "rsa-noku")
    M.run(S, "openssl", "<-smimed-encrypt", "ecdh-p384 aes-256-gcm", to_file_key, "aes-256-gcm", "ec384", None)
    S.case("secp256k1 recipient: 422 unfit_recipient", unsupported_key, "k256")
    S.case("Ed25519 recipient: 422 unfit_recipient", unsupported_key, "ed25519")
    S.case("self-signed recipient is fit (chains not checked)", fit_without_extensions, "self-signed")
    S.case("bad requests: 400 / 404", bad_requests)
    S.case("sign with a bad encrypt_for: 404 / 422 / 400", sign_encrypt_for_bad)

    if GPG is not None:
        GPG.close()
    S.stop_running(pins=[F.read_pin(DEMO)])
    M.print()
    S.finish()


if __name__ == "__main__":
    main()
