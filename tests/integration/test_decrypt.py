#!/usr/bin/env python3
"""POST /v1/decrypt against the real daemon and the demo token: what openssl
cms and gpgsm encrypted to the demo keys decrypts; every decryption failure
looks the same (no padding oracle); bad input gets its 4xx."""

import base64
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq, expect_error  # noqa: E402

PLAIN = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
         "secret {tag}\r\nsecond line\r\n\r\nlast line\r\n")
MAIL_HEADERS = ("From: Alice <alice@file.smimed.test>\r\nTo: rsa@demo.smimed.test\r\n"
                "Subject: encrypted {tag}\r\n")

S = F.Suite("decrypt")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
DEMO_RSA = DEMO / "demo-rsa.pem"
DEMO_EC = DEMO / "demo-ec.pem"
WORK = F.workdir("decrypt")
M = F.Matrix()
D = None
GPG = None
PKI = None       # test CA with file keys
FRSA = None      # file RSA recipient (not on the token)
FEC = None       # file EC recipient
RNG = random.Random(int.from_bytes(os.urandom(8), "big"))


def plain(tag):
    return PLAIN.format(tag=tag).encode()


def post_entity(raw, timeout=120, **fields):
    """POST /v1/decrypt with the entity as "mime" (UTF-8) or "mime_base64"."""
    try:
        fields["mime"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        fields["mime_base64"] = base64.b64encode(raw).decode()
    return D.post_json("/v1/decrypt", fields, timeout=timeout)


def decrypt_ok(raw, want_key, want, use_b64=False, inner_only=False, **fields):
    if use_b64:
        r = D.post_json("/v1/decrypt", dict(fields, mime_base64=base64.b64encode(raw).decode()))
    else:
        r = post_entity(raw, **fields)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    eq(j.get("key"), want_key, "key")
    check(j.get("signed") is False, "signed %r, want false" % j.get("signed"))
    got = F.mime_of(j)
    if inner_only:
        F.same_inner(got, want, "decrypted entity")
    else:
        F.same_entity(got, want, "decrypted entity")
    return j


# ------------------------------------------------------------------ setup

def start():
    global D, GPG, PKI, FRSA, FEC
    D = S.daemon(DEMO / "smimed.conf", "decrypt-daemon", env=F.softhsm_env(DEMO))
    PKI = F.TestCA(WORK, "pki", "smimed decrypt test CA")
    FRSA = PKI.issue("file-rsa", "rsa")
    FEC = PKI.issue("file-ec", "ec")


def gpgsm_setup():
    global GPG
    GPG = F.Gpgsm(CA, PKI.pem)
    GPG.import_cert(DEMO_RSA)


def still_serving():
    msg = plain("still serving")
    env = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes128")
    decrypt_ok(env, "demo-ec", msg)


# ------------------------------------------------------------------ interop: openssl → smimed

def openssl_to_demo(key, cipher, keyopts=(), extra=()):
    msg = plain("openssl %s %s %s" % (key, cipher, " ".join(keyopts)))
    env = F.openssl_encrypt(msg, [DEMO / ("%s.pem" % key)], WORK, cipher, keyopts, extra)
    ctype, stype = F.smime_type(env)
    check(stype in ("enveloped-data", "authenveloped-data"), "openssl wrote smime-type %r" % stype)
    decrypt_ok(env, key, msg)


def several_recipients(recips, want_key):
    msg = plain("several %s" % want_key)
    env = F.openssl_encrypt(msg, recips, WORK, "-aes256")
    decrypt_ok(env, want_key, msg)


def both_demo_keys():
    msg = plain("both demo keys")
    env = F.openssl_encrypt(msg, [DEMO_RSA, DEMO_EC], WORK, "-aes-256-gcm")
    r = post_entity(env)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    check(r.json().get("key") in ("demo-rsa", "demo-ec"), "key %r" % r.json().get("key"))
    F.same_entity(F.mime_of(r.json()), msg)
    for key in ("demo-rsa", "demo-ec"):
        decrypt_ok(env, key, msg, key=key)


def stream_ber():
    msg = plain("stream")
    env = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes128", extra=["-stream"])
    der = F.smime_der(env)
    eq(F.der_header(der, 0)[2], None, "outer length (want BER indefinite)")
    decrypt_ok(env, "demo-rsa", msg)


def der_as_base64(indef):
    """-outform DER (or BER with -indef), wrapped into a hand-built entity,
    sent as mime_base64."""
    msg = plain("der indef=%s" % indef)
    der = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes192", outform="DER",
                            extra=["-indef"] if indef else [])
    eq(F.der_header(der, 0)[2] is None, indef, "indefinite outer length")
    decrypt_ok(F.pkcs7_mime(der), "demo-ec", msg, use_b64=True)


def base64_one_line():
    msg = plain("one line")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes256", outform="DER")
    decrypt_ok(F.pkcs7_mime(der, width=0), "demo-rsa", msg)


def x_pkcs7_mime():
    msg = plain("x-pkcs7-mime")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes128", outform="DER")
    decrypt_ok(F.pkcs7_mime(der, ctype="application/x-pkcs7-mime"), "demo-rsa", msg)


def no_smime_type():
    msg = plain("no smime-type")
    der = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes-128-gcm", outform="DER")
    decrypt_ok(F.pkcs7_mime(der, smime_type=None), "demo-ec", msg)


def binary_transfer_encoding():
    msg = plain("binary cte")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes256", outform="DER")
    raw = (b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n" + der)
    decrypt_ok(raw, "demo-rsa", msg, use_b64=True)


def lf_line_ends():
    msg = plain("lf")
    env = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes128")
    decrypt_ok(env.replace(b"\r\n", b"\n"), "demo-rsa", msg)


def with_mail_headers():
    msg = plain("mail headers")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes256", outform="DER")
    outer = F.pkcs7_mime(der, headers=MAIL_HEADERS.format(tag="x").encode())
    decrypt_ok(outer, "demo-rsa", msg, inner_only=True)


def mail_plain_8bit():
    """A plaintext with mail headers, LF line ends and 8-bit UTF-8 comes back
    as encrypted (CRLF aside)."""
    msg = ("From: a@b.test\nSubject: umlaut\nMIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           "Grüße aus Zürich\n").encode("utf-8")
    env = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes256")
    decrypt_ok(env, "demo-ec", msg)


# ------------------------------------------------------------------ interop: gpgsm → smimed

def gpgsm_to_demo(cipher_algo, armor):
    check(GPG is not None, "gpgsm setup failed (see that case), so this interop case "
          "cannot run; CI installs every peer")
    msg = plain("gpgsm %s armor=%s" % (cipher_algo, armor))
    out = GPG.encrypt(msg, "rsa@demo.smimed.test", WORK, cipher_algo, armor)
    if armor:
        text = out.decode()
        check("-----BEGIN ENCRYPTED MESSAGE-----" in text, "gpgsm armor header missing")
        body = text.split("-----", 2)[2].split("-----END", 1)[0]
        der = base64.b64decode("".join(body.split()))
    else:
        der = out
    eq(F.der_header(der, 0)[2], None, "gpgsm outer length (BER indefinite)")
    decrypt_ok(F.pkcs7_mime(der), "demo-rsa", msg)


# ------------------------------------------------------------------ raw mode, forced key

def raw_mode(query, key):
    msg = plain("raw %s" % query)
    env = F.openssl_encrypt(msg, [DEMO_RSA, DEMO_EC], WORK, "-aes128")
    r = D.request("POST", "/v1/decrypt" + query, body=env,
                  headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq((r.header("Content-Type") or "").split(";")[0].strip().lower(), "message/rfc822",
       "Content-Type")
    if key:
        eq(r.header("X-Smimed-Key"), key, "X-Smimed-Key")
    else:
        check(r.header("X-Smimed-Key") in ("demo-rsa", "demo-ec"),
              "X-Smimed-Key %r" % r.header("X-Smimed-Key"))
    eq((r.header("X-Smimed-Signed") or "").lower(), "false", "X-Smimed-Signed")
    F.same_entity(r.body, msg)


def raw_mode_no_recipient():
    env = F.openssl_encrypt(plain("raw nobody"), [FRSA.pem], WORK, "-aes128")
    r = D.request("POST", "/v1/decrypt", body=env, headers={"Content-Type": "message/rfc822"})
    expect_error(r, 422, "no_matching_recipient")
    still_serving()


def forced_key_not_recipient():
    env = F.openssl_encrypt(plain("forced"), [DEMO_RSA], WORK, "-aes128")
    expect_error(post_entity(env, key="demo-ec"), 422, "no_matching_recipient")
    still_serving()


def forced_unknown_key():
    env = F.openssl_encrypt(plain("forced unknown"), [DEMO_RSA], WORK, "-aes128")
    expect_error(post_entity(env, key="no-such-key"), 404, "unknown_key")
    still_serving()


# ------------------------------------------------------------------ signed inside

def signed_inside(signer, trust, want_valid, want_reason=None):
    inner_msg = plain("signed then encrypted")
    if signer == "daemon":
        r = D.sign(key="demo-rsa", mime=inner_msg.decode(), mode="detached")
        eq(r.status, 200, "sign status (%r)" % r.body[:300])
        signed = F.mime_of(r.json())
    else:
        signed = F.openssl_sign(inner_msg, FRSA.pem, FRSA.key, WORK, "sha256",
                                detached=signer != "openssl-opaque")
    env = F.openssl_encrypt(signed, [DEMO_EC], WORK, "-aes256", extra=["-binary"])
    fields = {"verify": True}
    if trust:
        fields["trust"] = [PKI.pem.read_text()]
    r = post_entity(env, **fields)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    eq(j.get("key"), "demo-ec", "key")
    check(j.get("signed") is True, "signed %r, want true" % j.get("signed"))
    F.same_entity(F.mime_of(j), signed, "decrypted signed entity")
    v = j.get("verification")
    check(isinstance(v, dict), "no verification object: %r" % j)
    eq(v.get("valid"), want_valid, "verification.valid (%r)" % v)
    if want_reason:
        eq(v.get("reason"), want_reason, "verification.reason")
    check(isinstance(v.get("signers"), list) and len(v["signers"]) == 1,
          "verification.signers %r" % v.get("signers"))
    F.same_entity(F.mime_of(v), inner_msg, "verified content")
    # without verify: signed is reported, no verification
    r = post_entity(env)
    eq(r.status, 200, "status without verify")
    check(r.json().get("signed") is True, "signed without verify")
    check("verification" not in r.json(), "verification present although not asked for")


def subject_key_id(key, cipher):
    """RecipientInfos naming the recipient by subjectKeyIdentifier (-keyid)."""
    msg = plain("keyid %s" % key)
    env = F.openssl_encrypt(msg, [DEMO / ("%s.pem" % key)], WORK, cipher, extra=["-keyid"])
    check("subjectKeyIdentifier" in F.cms_print(F.smime_der(env), WORK) or "d.rKeyId" in
          F.cms_print(F.smime_der(env), WORK), "openssl did not use a key identifier")
    decrypt_ok(env, key, msg)


def password_only():
    env = F.openssl_encrypt(plain("pwri"), [], WORK, "-aes256", extra=["-pwri_password", "secret"])
    expect_error(post_entity(env), 422, "no_matching_recipient")
    still_serving()


def not_utf8():
    """A plaintext that is not UTF-8 comes back as mime_base64."""
    msg = (b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Gr\xfc\xdfe aus Z\xfcrich\r\n")
    env = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes128", extra=["-binary"])
    r = post_entity(env)
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    check("mime_base64" in j and "mime" not in j, "response fields %r" % sorted(j))
    F.same_entity(base64.b64decode(j["mime_base64"]), msg)


def concurrent():
    import threading
    jobs = []
    for i in range(24):
        key = "demo-rsa" if i % 2 else "demo-ec"
        msg = plain("concurrent %d" % i)
        env = F.openssl_encrypt(msg, [DEMO / ("%s.pem" % key)], WORK,
                                "-aes-128-gcm" if i % 3 else "-aes256")
        jobs.append((key, msg, env))
    errors = []

    def worker(chunk):
        for key, msg, env in chunk:
            try:
                decrypt_ok(env, key, msg)
            except Exception as e:  # noqa: BLE001
                errors.append("%s: %s" % (key, e))

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check(not errors, "%d of %d failed: %s" % (len(errors), len(jobs), errors[:3]))


def verify_unsigned():
    msg = plain("verify unsigned")
    env = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes128")
    j = decrypt_ok(env, "demo-rsa", msg, verify=True)
    v = j.get("verification")
    check(isinstance(v, dict), "no verification object: %r" % j)
    eq(v.get("valid"), False, "verification.valid")
    eq(v.get("reason"), "not_signed", "verification.reason")


def raw_mode_signed():
    signed = F.openssl_sign(plain("raw signed"), FRSA.pem, FRSA.key, WORK)
    env = F.openssl_encrypt(signed, [DEMO_RSA], WORK, "-aes256", extra=["-binary"])
    r = D.request("POST", "/v1/decrypt", body=env, headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq(r.header("X-Smimed-Key"), "demo-rsa", "X-Smimed-Key")
    eq((r.header("X-Smimed-Signed") or "").lower(), "true", "X-Smimed-Signed")
    F.same_entity(r.body, signed)


def large():
    line = "0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
    msg = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n" + line * 16000).encode()
    env = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes-256-gcm")
    decrypt_ok(env, "demo-ec", msg)


# ------------------------------------------------------------------ padding oracle

def rsa_encrypt_raw(block, n, e):
    k = (n.bit_length() + 7) // 8
    return pow(int.from_bytes(block, "big"), e, n).to_bytes(k, "big")


def pkcs1_block(k, payload, bt=2, sep=True, ps_len=None):
    ps_len = k - 3 - len(payload) if ps_len is None else ps_len
    ps = bytes(RNG.randrange(1, 256) for _ in range(ps_len))
    block = b"\x00" + bytes([bt]) + ps + (b"\x00" if sep else b"\x01") + payload
    block = block[:k] if len(block) > k else block + bytes(RNG.randrange(1, 256) for _ in range(k - len(block)))
    return block


def cbc_layout(der, oid_hex):
    """Offsets of the IV and the encrypted content of a DER EnvelopedData."""
    i = F.find_after(der, bytes.fromhex(oid_hex), "content encryption OID")
    tag, hl, ln = F.der_header(der, i)
    check(tag == 0x04 and ln == 16, "no 16-byte IV after the cipher OID")
    iv = der[i + hl:i + hl + ln]
    j = i + hl + ln
    tag, hl, ln = F.der_header(der, j)
    check(tag == 0x80 and ln is not None, "no primitive [0] encryptedContent")
    return iv, j + hl, ln


def aes_cbc_encrypt(key, iv, data):
    p = F.run(["openssl", "enc", "-aes-%d-cbc" % (len(key) * 8), "-e", "-K", key.hex(),
               "-iv", iv.hex()], input=data)
    return p.stdout


ORACLE = {"responses": [], "times": {}}


def oracle_send(klass, der):
    t0 = time.time()
    r = post_entity(F.pkcs7_mime(der))
    ORACLE["times"].setdefault(klass, []).append(time.time() - t0)
    ORACLE["responses"].append((klass, r.status, r.body))
    return r


def oracle_check(klass_prefix=None):
    msgs = set()
    bad = []
    for klass, status, body in ORACLE["responses"]:
        if klass_prefix and not klass.startswith(klass_prefix):
            continue
        try:
            j = json.loads(body.decode())
            code, msg = j["error"]["code"], j["error"]["message"]
        except Exception:
            code, msg = None, None
        if status != 422 or code != "decryption_failed":
            bad.append("%s: %d %r" % (klass, status, body[:160]))
        msgs.add(msg)
    check(not bad, "%d of %d responses were not 422 decryption_failed: %s" % (
        len(bad), len(ORACLE["responses"]), "; ".join(bad[:5])))
    check(len(msgs) == 1, "decryption_failed messages differ: %r" % sorted(map(str, msgs))[:5])


def oracle_rsa_pkcs1():
    n, e = F.rsa_public_numbers(DEMO_RSA)
    k = (n.bit_length() + 7) // 8
    eq(k, 256, "demo-rsa modulus bytes")
    msg = plain("oracle control")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes256", outform="DER")
    off, ln = F.ktri_encrypted_key(der)
    eq(ln, 256, "encryptedKey length")
    iv, c_off, c_len = cbc_layout(der, "060960864801650304012a")  # aes-256-cbc

    def with_key_block(block):
        return F.replace_at(der, off, rsa_encrypt_raw(block, n, e))

    # positive control: a key we chose, wrapped with PKCS#1 v1.5 by hand, and
    # the content encrypted under it: the construction below is sound
    ck = os.urandom(32)
    ctl = F.replace_at(with_key_block(pkcs1_block(k, ck)), c_off, aes_cbc_encrypt(ck, iv, msg))
    eq(len(aes_cbc_encrypt(ck, iv, msg)), c_len, "re-encrypted content length")
    decrypt_ok(F.pkcs7_mime(ctl), "demo-rsa", msg)

    # 1. random encryptedKey
    for _ in range(150):
        oracle_send("random-key", F.replace_at(der, off, os.urandom(256)))
    # 2. single flipped byte in the real encryptedKey
    orig = der[off:off + 256]
    for _ in range(50):
        b = bytearray(orig)
        b[RNG.randrange(256)] ^= RNG.randrange(1, 256)
        oracle_send("flipped-byte", F.replace_at(der, off, bytes(b)))
    # 3. well-formed PKCS#1 v1.5 with a random 32-byte key: CBC under a random
    # key (about 1 in 256 passes the CBC padding check and yields garbage)
    for _ in range(80):
        oracle_send("good-padding-random-key", with_key_block(pkcs1_block(k, os.urandom(32))))
    # 4. well-formed padding, right key, content that is not MIME (garbage
    # after a successful decryption)
    for _ in range(8):
        garbage = os.urandom(len(msg))
        oracle_send("garbage-plaintext", F.replace_at(with_key_block(pkcs1_block(k, ck)), c_off,
                                                      aes_cbc_encrypt(ck, iv, garbage)))
    # 5. malformed padding of every kind (a damaged last content block is not
    # here: about 1 in 256 passes the CBC padding check and decrypts fine
    # up to that block, which is no failure at all)
    for _ in range(4):
        oracle_send("bad-padding-bt1", with_key_block(pkcs1_block(k, os.urandom(32), bt=1)))
        oracle_send("bad-padding-bt0", with_key_block(pkcs1_block(k, os.urandom(32), bt=0)))
        oracle_send("bad-padding-nosep", with_key_block(pkcs1_block(k, os.urandom(32), sep=False)))
        oracle_send("bad-padding-shortps", with_key_block(
            pkcs1_block(k, os.urandom(k - 3 - 4), ps_len=4)))
        oracle_send("wrong-key-length-16", with_key_block(pkcs1_block(k, os.urandom(16))))
        oracle_send("wrong-key-length-24", with_key_block(pkcs1_block(k, os.urandom(24))))
        oracle_send("empty-key", with_key_block(pkcs1_block(k, b"")))
    # 6. a valid envelope for the file RSA key, its encryptedKey moved into an
    # envelope that names demo-rsa
    other = F.openssl_encrypt(msg, [FRSA.pem], WORK, "-aes256", outform="DER")
    o_off, o_len = F.ktri_encrypted_key(other)
    eq(o_len, 256, "file key encryptedKey length")
    for _ in range(3):
        oracle_send("other-rsa-key", F.replace_at(der, off, other[o_off:o_off + 256]))
    oracle_check()
    check(len(ORACLE["responses"]) >= 300, "only %d oracle requests" % len(ORACLE["responses"]))
    still_serving()


def oracle_oaep_gcm_ec():
    """OAEP, GCM and ECDH envelopes, corrupted: the same single answer."""
    msg = plain("oracle oaep")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes-128-gcm", outform="DER",
                            keyopts=["rsa_padding_mode:oaep", "rsa_oaep_md:sha256"])
    off, ln = F.ktri_encrypted_key(der, F.OID_RSAES_OAEP)
    eq(ln, 256, "OAEP encryptedKey length")
    for _ in range(20):
        b = bytearray(der[off:off + ln])
        b[RNG.randrange(ln)] ^= RNG.randrange(1, 256)
        oracle_send("oaep-flipped", F.replace_at(der, off, bytes(b)))
        oracle_send("oaep-random", F.replace_at(der, off, os.urandom(ln)))
    # GCM: flip a byte of the tag, then of the ciphertext
    for where in ("tag", "ciphertext"):
        g = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes-256-gcm", outform="DER")
        i = F.find_after(g, bytes.fromhex("060960864801650304012e"), "aes-256-gcm OID")
        tag, hl, ln2 = F.der_header(g, i)       # GCMParameters SEQUENCE
        j = i + hl + ln2
        tag, hl, ln2 = F.der_header(g, j)       # [0] encryptedContent
        check(tag == 0x80, "no primitive encryptedContent in the GCM envelope")
        mac_hdr = j + hl + ln2
        if where == "tag":
            tag, hl, ln2 = F.der_header(g, mac_hdr)
            check(tag == 0x04 and ln2 == 16, "no 16-byte mac after the content")
            pos = mac_hdr + hl + RNG.randrange(16)
        else:
            pos = j + hl + RNG.randrange(ln2)
        b = bytearray(g)
        b[pos] ^= 0x01
        oracle_send("gcm-%s" % where, bytes(b))
    # ECDH: the wrapped key and the ephemeral point
    for _ in range(5):
        ec = F.openssl_encrypt(msg, [DEMO_EC], WORK, "-aes256", outform="DER")
        wrap = F.find_after(ec, bytes.fromhex("060960864801650304012d"), "aes256-wrap OID")
        data = ec.find(bytes.fromhex("06092a864886f70d010701"), wrap)
        k = ec.rfind(b"\x04\x28", wrap, data)
        check(k > 0, "no 40-byte wrapped key")
        b = bytearray(ec)
        b[k + 2 + RNG.randrange(40)] ^= RNG.randrange(1, 256)
        oracle_send("ecdh-wrapped-key", bytes(b))
        # the originator's public point: BIT STRING 03 42 00 04 <64 bytes>
        p = ec.find(b"\x03\x42\x00\x04")
        check(p > 0, "no ephemeral public key")
        b = bytearray(ec)
        b[p + 4 + RNG.randrange(64)] ^= 0x01
        oracle_send("ecdh-point", bytes(b))
    oracle_check()
    for klass in sorted(ORACLE["times"]):
        t = ORACLE["times"][klass]
        print("#   oracle timing %-30s n=%3d median %.1f ms" % (
            klass, len(t), 1000 * statistics.median(t)), flush=True)
    still_serving()


# ------------------------------------------------------------------ allow-lists

OID_AES192_WRAP = bytes.fromhex("0609608648016503040119")
OID_AES192_WRAP_PAD = bytes.fromhex("060960864801650304011c")


def replaced_oid(der, old, new):
    eq(der.count(old), 1, "occurrences of %s" % old.hex())
    return der.replace(old, new)


def wrap_pad_envelope(tag):
    """The issue's reproducer: an EC envelope whose key wrap is
    id-aes192-wrap-pad, its wrapped key (made for id-aes192-wrap) not
    unwrapping under it. OpenSSL 3.0.19 writes past its buffer on that."""
    der = F.openssl_encrypt(plain(tag), [DEMO_EC], WORK, "-aes-192-cbc", outform="DER")
    return replaced_oid(der, OID_AES192_WRAP, OID_AES192_WRAP_PAD)


def refused_wrap_pad():
    bad = wrap_pad_envelope("wrap-pad")
    mime = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + F.b64_lines(bad))
    for _ in range(3):
        r = D.request("POST", "/v1/decrypt", body=mime, headers={"Content-Type": "message/rfc822"})
        j = F.expect_unsupported(r, "2.16.840.1.101.3.4.1.28")
        check("id-aes192-wrap-pad" in j["error"]["message"], "message %r" % j["error"]["message"])
        check(D.running(), "the daemon died")
    F.expect_unsupported(post_entity(mime), "2.16.840.1.101.3.4.1.28")
    F.expect_unsupported(post_entity(mime, key="demo-ec"), "2.16.840.1.101.3.4.1.28")
    still_serving()
    r = D.sign(key="demo-ec", mime=plain("signed after the reproducer").decode())
    eq(r.status, 200, "sign after the reproducer (%r)" % r.body[:200])
    check(D.running(), "the daemon died")


def refused_ecdh_des3():
    env = F.openssl_encrypt(plain("ecdh des3"), [DEMO_EC], WORK, "-des3")
    F.expect_unsupported(post_entity(env), "1.2.840.113549.1.9.16.3.6")
    still_serving()


def refused_rc2():
    der = F.openssl_encrypt(plain("rc2"), [DEMO_RSA], WORK, "-des3", outform="DER")
    # des-ede3-cbc (1.2.840.113549.3.7) becomes rc2-cbc (...3.2), same length
    der = replaced_oid(der, bytes.fromhex("06082a864886f70d0307"), bytes.fromhex("06082a864886f70d0302"))
    F.expect_unsupported(post_entity(F.pkcs7_mime(der)), "1.2.840.113549.3.2")
    still_serving()


def refused_oaep_md5():
    env = F.openssl_encrypt(plain("oaep md5"), [DEMO_RSA], WORK, "-aes256",
                            ["rsa_padding_mode:oaep", "rsa_oaep_md:md5"])
    j = F.expect_unsupported(post_entity(env), "1.2.840.113549.2.5")
    check("OAEP hash" in j["error"]["message"], "message %r" % j["error"]["message"])
    still_serving()


def refused_kdf():
    der = F.openssl_encrypt(plain("mqv"), [DEMO_EC], WORK, "-aes128", outform="DER")
    # dhSinglePass-stdDH-sha1kdf-scheme becomes mqvSinglePass-sha1kdf-scheme
    der = replaced_oid(der, bytes.fromhex("06092b81051086483f0002"), bytes.fromhex("06092b81051086483f0010"))
    F.expect_unsupported(post_entity(F.pkcs7_mime(der)), "1.3.133.16.840.63.0.16")
    still_serving()


def refused_gcm_in_enveloped():
    der = F.openssl_encrypt(plain("gcm in enveloped"), [DEMO_RSA], WORK, "-aes128", outform="DER")
    der = replaced_oid(der, bytes.fromhex("0609608648016503040102"), bytes.fromhex("0609608648016503040106"))
    F.expect_unsupported(post_entity(F.pkcs7_mime(der)), "2.16.840.1.101.3.4.1.6")
    still_serving()


def der_length(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def with_mac(der, mac):
    """The AuthEnvelopedData DER (definite lengths, the MAC last, as openssl
    writes it) with its MAC replaced, the enclosing lengths fixed."""
    tag, ci_hl, ci_len = F.der_header(der, 0)
    _, oid_hl, oid_len = F.der_header(der, ci_hl)
    ex_at = ci_hl + oid_hl + oid_len
    _, ex_hl, _ = F.der_header(der, ex_at)
    env_at = ex_at + ex_hl
    _, env_hl, env_len = F.der_header(der, env_at)
    body = der[env_at + env_hl:env_at + env_hl + env_len]
    _, mac_hl, mac_len = F.der_header(der, len(der) - 18)
    check(der[-18:-16] == b"\x04\x10", "the GCM envelope does not end with a 16-octet MAC")
    body = body[:-18] + b"\x04" + der_length(len(mac)) + mac
    env = b"\x30" + der_length(len(body)) + body
    ex = b"\xa0" + der_length(len(env)) + env
    ci = der[ci_hl:ci_hl + oid_hl + oid_len] + ex
    return b"\x30" + der_length(len(ci)) + ci


def gcm_mac_of_icv_length():
    """AuthEnvelopedData's MAC must be as long as its ICV: OpenSSL takes a
    MAC cut to one octet as a one-octet tag (a changed ciphertext would pass
    once in 256 tries). Cut, grown, or unlike the ICV the parameters name:
    422 invalid_smime; the envelope as written still decrypts."""
    msg = plain("gcm mac length")
    der = F.openssl_encrypt(msg, [DEMO_RSA], WORK, "-aes-256-gcm", outform="DER")
    mac = der[-16:]
    decrypt_ok(F.pkcs7_mime(with_mac(der, mac)), "demo-rsa", msg)
    for what, m in (("one octet", mac[:1]), ("four octets", mac[:4]),
                    ("twelve octets", mac[:12]), ("seventeen octets", mac + b"\0")):
        r = post_entity(F.pkcs7_mime(with_mac(der, m)))
        try:
            j = F.expect_error(r, 422, "invalid_smime")
        except AssertionError as e:
            raise AssertionError("a MAC of %s: %s" % (what, e))
        check("MAC is %d octets" % len(m) in j["error"]["message"], "message %r" % j["error"]["message"])
    # the ICV named as 12 (INTEGER 16 -> 12, same length) with the 16-octet MAC
    i = F.find_after(der, bytes.fromhex("060960864801650304012e"), "aes-256-gcm OID")
    tag, hl, ln = F.der_header(der, i)
    icv = i + hl + ln - 3
    eq(der[icv:icv + 3], b"\x02\x01\x10", "the ICV length field")
    r = post_entity(F.pkcs7_mime(F.replace_at(der, icv, b"\x02\x01\x0c")))
    F.expect_error(r, 422, "invalid_smime")
    still_serving()


def signed_md5_inside():
    """A decrypted entity signed with MD5: the plaintext comes back, signed,
    with a negative verification; /v1/verify refuses the same entity."""
    inner_msg = plain("md5 signed then encrypted")
    signed = F.openssl_sign(inner_msg, FRSA.pem, FRSA.key, WORK, "md5")
    env = F.openssl_encrypt(signed, [DEMO_EC], WORK, "-aes256", extra=["-binary"])
    r = post_entity(env, verify=True, trust=[PKI.pem.read_text()])
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = r.json()
    check(j.get("signed") is True, "signed %r, want true" % j.get("signed"))
    F.same_entity(F.mime_of(j), signed, "decrypted signed entity")
    v = j.get("verification")
    check(isinstance(v, dict), "no verification object: %r" % j)
    eq(v.get("valid"), False, "verification.valid")
    eq(v.get("reason"), "unsupported_algorithm", "verification.reason")
    check("1.2.840.113549.2.5" in (v.get("detail") or ""), "detail %r" % v.get("detail"))
    eq(v.get("signers"), [], "verification.signers")
    r = D.request("POST", "/v1/decrypt", body=env, headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "raw status (%r)" % r.body[:300])
    eq((r.header("X-Smimed-Signed") or "").lower(), "true", "X-Smimed-Signed")
    F.expect_unsupported(D.post_json("/v1/verify", {"mime": signed.decode()}), "1.2.840.113549.2.5")
    still_serving()


# ------------------------------------------------------------------ bad input

def wrapped(der, **kw):
    return F.pkcs7_mime(der, **kw)


def bad_entity(raw, status, code, **fields):
    if raw is not None:
        r = post_entity(raw, **fields)
    else:
        r = D.post_json("/v1/decrypt", fields)
    j = expect_error(r, status, code)
    still_serving()
    return j


def bad_truncated():
    der = F.openssl_encrypt(plain("trunc"), [DEMO_RSA], WORK, "-aes256", outform="DER")
    for cut in (len(der) // 2, len(der) - 1, 40):
        bad_entity(wrapped(der[:cut]), 422, "invalid_smime")


def bad_garbage_base64():
    raw = (b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n!!!! this is *** not base64 @@@@\r\n")
    bad_entity(raw, 422, "invalid_smime")


def bad_random_der():
    for _ in range(3):
        bad_entity(wrapped(os.urandom(RNG.randrange(1, 2000))), 422, "invalid_smime")


def bad_text_plain():
    bad_entity(plain("not encrypted"), 422, "invalid_smime")


def bad_certs_only():
    p7 = WORK / "certs.p7"
    F.run(["openssl", "crl2pkcs7", "-nocrl", "-certfile", DEMO_RSA, "-outform", "DER",
           "-out", p7])
    bad_entity(wrapped(p7.read_bytes(), smime_type="certs-only"), 422, "invalid_smime")
    bad_entity(wrapped(p7.read_bytes()), 422, "invalid_smime")


def bad_signed_data():
    r = D.sign(key="demo-ec", mime=plain("opaque signed").decode(), mode="opaque")
    eq(r.status, 200, "sign status")
    bad_entity(F.mime_of(r.json()), 422, "invalid_smime")
    r = D.sign(key="demo-ec", mime=plain("detached signed").decode())
    eq(r.status, 200, "sign status")
    bad_entity(F.mime_of(r.json()), 422, "invalid_smime")


def bad_nobody():
    env = F.openssl_encrypt(plain("nobody"), [FRSA.pem, FEC.pem], WORK, "-aes256")
    bad_entity(env, 422, "no_matching_recipient")


def nested(definite, depth=10000):
    if definite:
        inner = b""
        for _ in range(depth):
            inner = F._der(0x30, inner)
        return inner
    return b"\x30\x80" * depth + b"\x00\x00" * depth


def bad_nested():
    for definite in (True, False):
        junk = nested(definite)
        for der in (junk, F._der(0x30, F.OID_ENVELOPED_DATA + F._der(0xA0, junk))):
            r = post_entity(wrapped(der))
            check(400 <= r.status < 500, "status %d for nested junk (%r)" % (r.status, r.body[:200]))
            expect_error(r, r.status, r.error_code())
            still_serving()


def bad_request_fields():
    env = F.openssl_encrypt(plain("fields"), [DEMO_RSA], WORK, "-aes128").decode()
    cases = [
        ({}, "missing_field"),
        ({"mime": 42}, "invalid_field"),
        ({"mime": env, "verify": "yes"}, "invalid_field"),
        ({"mime": env, "key": 7}, "invalid_field"),
        ({"mime": env, "trust": "not a list"}, "invalid_field"),
        ({"mime": env, "trust": ["-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"]},
         "invalid_field"),
        ({"mime": env, "no_such_option": 1}, "invalid_field"),
        ({"mime_base64": "%%%% not base64"}, "invalid_base64"),
    ]
    # the same checks with a signed entity inside and verify asked for
    signed = F.openssl_sign(plain("signed fields"), FRSA.pem, FRSA.key, WORK)
    senv = F.openssl_encrypt(signed, [DEMO_EC], WORK, "-aes128", extra=["-binary"]).decode()
    cases += [(dict(f, mime=senv, verify=True), c) for f, c in (
        ({"trust": "not a list"}, "invalid_field"),
        ({"trust": [42]}, "invalid_field"),
        ({"trust": ["not PEM"]}, "invalid_field"),
        ({"crls": ["not PEM"]}, "invalid_field"))]
    problems = []
    for fields, code in cases:
        try:
            expect_error(D.post_json("/v1/decrypt", fields), 400, code)
        except AssertionError as e:
            shown = {k: "<entity>" if k == "mime" else v for k, v in fields.items()}
            problems.append("%s: %s" % (json.dumps(shown)[:160], str(e)[:200]))
    expect_error(D.post_json("/v1/decrypt", b"{not json"), 400, "invalid_json")
    still_serving()
    check(not problems, "%d of %d: %s" % (len(problems), len(cases), " | ".join(problems)))


# ------------------------------------------------------------------ keys

def keys_usable_for():
    r = D.request("GET", "/v1/keys")
    eq(r.status, 200, "status")
    keys = {k["name"]: k for k in r.json()["keys"]}
    for name in ("demo-rsa", "demo-ec"):
        uf = keys[name].get("usable_for")
        check(isinstance(uf, list), "%s usable_for %r" % (name, uf))
        eq(sorted(uf), ["decrypt", "sign"], "%s usable_for" % name)


def expired_key_decrypts():
    """A token key whose certificate has expired: decrypt only."""
    tok = F.copy_token_dir(DEMO, WORK / "token-expired")
    old = PKI.issue("old-rsa", "rsa", start="20200101000000Z", end="20210101000000Z")
    old_ec = PKI.issue("old-ec", "ec", start="20200101000000Z", end="20210101000000Z")
    F.import_token_key(tok, "old-rsa", "09", old)
    F.import_token_key(tok, "old-ec", "0a", old_ec)
    conf = F.write_config(WORK / "expired.conf", [F.token_config(tok)])
    d = S.daemon(conf, "decrypt-expired-key", env=F.softhsm_env(tok))
    r = d.request("GET", "/v1/keys")
    eq(r.status, 200, "GET /v1/keys")
    keys = {k["name"]: k for k in r.json()["keys"]}
    for name in ("old-rsa", "old-ec"):
        check(name in keys, "%s not served: %r" % (name, sorted(keys)))
        eq(keys[name].get("usable_for"), ["decrypt"], "%s usable_for" % name)
    eq(sorted(keys["demo-rsa"].get("usable_for") or []), ["decrypt", "sign"], "demo-rsa usable_for")
    for name, cert, cipher in (("old-rsa", old, "-aes256"), ("old-ec", old_ec, "-aes-128-gcm")):
        msg = plain("old mail for %s" % name)
        env = F.openssl_encrypt(msg, [cert.pem], WORK, cipher)
        r = d.post_json("/v1/decrypt", {"mime": env.decode()})
        eq(r.status, 200, "decrypt with %s (%r)" % (name, r.body[:300]))
        eq(r.json().get("key"), name, "key")
        F.same_entity(F.mime_of(r.json()), msg)
    r = d.sign(key="old-rsa", mime=plain("sign with expired").decode())
    check(r.status in (422, 503), "signing with an expired certificate: status %d" % r.status)
    expect_error(r, r.status, r.error_code())
    rc = d.stop()
    F.check_exit(d, rc)


def main():
    if not S.case("daemon starts on the demo token, test PKI", start):
        S.finish()
    S.case("gpgsm home with the demo key imported", gpgsm_setup)
    S.case("GET /v1/keys usable_for sign and decrypt", keys_usable_for)

    for cipher in ("-aes128", "-aes192", "-aes256", "-aes-128-gcm", "-aes-256-gcm", "-des3"):
        M.run(S, "openssl", "->smimed-decrypt", "rsa-pkcs1 %s" % cipher[1:], openssl_to_demo,
              "demo-rsa", cipher)
    for md in ("sha1", "sha256"):
        for cipher in ("-aes256", "-aes-128-gcm"):
            M.run(S, "openssl", "->smimed-decrypt", "rsa-oaep-%s %s" % (md, cipher[1:]), openssl_to_demo,
                  "demo-rsa", cipher, ["rsa_padding_mode:oaep", "rsa_oaep_md:%s" % md])
    # -des3 to an EC key makes openssl wrap with id-alg-CMS3DESwrap, which
    # the allow-lists refuse (see refused_ecdh_des3)
    for cipher in ("-aes128", "-aes256", "-aes-256-gcm"):
        M.run(S, "openssl", "->smimed-decrypt", "ecdh-p256 %s" % cipher[1:], openssl_to_demo,
              "demo-ec", cipher)
    M.run(S, "openssl", "->smimed-decrypt", "ecdh-p256-sha256kdf aes-128-gcm", openssl_to_demo,
          "demo-ec", "-aes-128-gcm", ["ecdh_kdf_md:sha256"])
    M.run(S, "openssl", "->smimed-decrypt", "rsa-pkcs1 aes128 -stream (BER)", stream_ber)
    M.run(S, "openssl", "->smimed-decrypt", "ecdh aes192 DER via mime_base64", der_as_base64, False)
    M.run(S, "openssl", "->smimed-decrypt", "ecdh aes192 BER (-indef) via mime_base64", der_as_base64, True)
    S.case("base64 without line breaks", base64_one_line)
    S.case("application/x-pkcs7-mime", x_pkcs7_mime)
    S.case("pkcs7-mime without smime-type", no_smime_type)
    S.case("Content-Transfer-Encoding: binary", binary_transfer_encoding)
    S.case("LF line ends in the envelope", lf_line_ends)
    S.case("outer mail headers", with_mail_headers)
    S.case("8-bit plaintext with mail headers comes back unchanged", mail_plain_8bit)
    S.case("demo-rsa among other recipients", several_recipients, [FRSA.pem, DEMO_RSA], "demo-rsa")
    S.case("demo-ec among other recipients", several_recipients, [FEC.pem, FRSA.pem, DEMO_EC],
           "demo-ec")
    S.case("both demo keys: either, and each when forced", both_demo_keys)

    for algo, armor in (("AES128", False), ("AES256", False), ("AES", True)):
        M.run(S, "gpgsm", "->smimed-decrypt", "rsa-pkcs1 %s%s (BER)" % (algo.lower(), " armored" if armor else ""),
              gpgsm_to_demo, algo, armor)

    S.case("raw message/rfc822, recipient chosen", raw_mode, "", None)
    S.case("raw message/rfc822 ?key=demo-ec", raw_mode, "?key=demo-ec", "demo-ec")
    S.case("raw message/rfc822, nobody we hold: 422", raw_mode_no_recipient)
    S.case("forced key not among the recipients: 422 no_matching_recipient", forced_key_not_recipient)
    S.case("forced unknown key: 404 unknown_key", forced_unknown_key)
    S.case("raw message/rfc822, signed inside: X-Smimed-Signed true", raw_mode_signed)
    M.run(S, "openssl", "->smimed-decrypt", "rsa-pkcs1 aes128 subjectKeyIdentifier rid", subject_key_id,
          "demo-rsa", "-aes128")
    M.run(S, "openssl", "->smimed-decrypt", "ecdh-p256 aes-128-gcm subjectKeyIdentifier rid",
          subject_key_id, "demo-ec", "-aes-128-gcm")
    S.case("password (PWRI) recipient only: 422 no_matching_recipient", password_only)
    S.case("non-UTF-8 plaintext comes back as mime_base64", not_utf8)
    S.case("24 decryptions from 8 threads", concurrent)
    S.case("1 MiB AES-GCM envelope", large)

    S.case("signed (smimed) inside, verify: valid with configured trust", signed_inside,
           "daemon", False, True)
    S.case("signed (openssl, test CA) inside, verify: untrusted_signer", signed_inside,
           "openssl", False, False, "untrusted_signer")
    S.case("signed (openssl, test CA) inside, verify with request trust: valid", signed_inside,
           "openssl", True, True)
    S.case("unsigned inside, verify: valid false, not_signed", verify_unsigned)
    S.case("opaque signed (openssl) inside, verify with request trust: valid", signed_inside,
           "openssl-opaque", True, True)

    S.case("padding oracle: >=300 corrupted RSA PKCS#1 envelopes, one answer", oracle_rsa_pkcs1)
    S.case("corrupted OAEP, GCM and ECDH envelopes, same answer", oracle_oaep_gcm_ec)

    S.case("the issue's reproducer (ECDH with id-aes192-wrap-pad): 422 unsupported_algorithm, "
           "the daemon still decrypts and signs", refused_wrap_pad)
    S.case("ecdh-p256 des3 (id-alg-CMS3DESwrap): 422 unsupported_algorithm", refused_ecdh_des3)
    S.case("RC2-CBC content encryption: 422 unsupported_algorithm", refused_rc2)
    S.case("RSA-OAEP with MD5: 422 unsupported_algorithm", refused_oaep_md5)
    S.case("ECMQV key agreement: 422 unsupported_algorithm", refused_kdf)
    S.case("AES-GCM inside EnvelopedData: 422 unsupported_algorithm", refused_gcm_in_enveloped)
    S.case("AuthEnvelopedData: a MAC shorter or longer than its ICV is 422", gcm_mac_of_icv_length)
    S.case("MD5-signed inside, verify: plaintext, signed, unsupported_algorithm", signed_md5_inside)
    S.case("truncated CMS: 422 invalid_smime", bad_truncated)
    S.case("garbage base64 body: 422 invalid_smime", bad_garbage_base64)
    S.case("random bytes as DER: 422 invalid_smime", bad_random_der)
    S.case("text/plain entity: 422 invalid_smime", bad_text_plain)
    S.case("certificate-only SignedData: 422 invalid_smime", bad_certs_only)
    S.case("signed entities: 422 invalid_smime", bad_signed_data)
    S.case("EnvelopedData for nobody we hold: 422 no_matching_recipient", bad_nobody)
    S.case("10,000 nested SEQUENCEs (DER and BER): 4xx", bad_nested)
    S.case("request field errors: 400", bad_request_fields)
    S.case("token keys with expired certificates: usable_for decrypt, still decrypt",
           expired_key_decrypts)

    if GPG is not None:
        GPG.close()
    S.stop_running(pins=[F.read_pin(DEMO)])
    M.print()
    S.finish()


if __name__ == "__main__":
    main()
