#!/usr/bin/env python3
"""The paths script/bench made faster, checked for meaning with openssl and
python's json and quopri: the JSON writer for the signed entity (every
character that needs an escape), raw mode handing over its result buffer,
and the MIME shortcut for 7-bit entities next to the walk for the rest
(large CRLF, LF and 8-bit bodies)."""

import json
import quopri
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture as F  # noqa: E402
from fixture import check, eq  # noqa: E402

S = F.Suite("fast_paths")
DEMO = F.ensure_demo()
CA = DEMO / "ca.pem"
WORK = F.workdir("fast_paths")
D = None


def start():
    global D
    D = S.daemon(DEMO / "smimed.conf", "fast-paths-daemon", env=F.softhsm_env(DEMO))


def verify(raw):
    """openssl's view of the signed content of a detached signature."""
    return F.openssl_verify(raw, CA, WORK)


def json_escapes():
    # every control character that stays 7-bit safe, quotes, backslashes,
    # a slash and DEL: what the entity's JSON writer must escape, or not
    controls = "".join(chr(c) for c in range(1, 32) if c not in (10, 13))
    body = ("quote \" backslash \\ slash / del \x7f\r\n"
            "controls " + controls + "\r\n\\u0041 stays text\r\n")
    inner = "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body
    r = D.post_json("/v1/sign", {"key": "demo-ec", "mime": inner})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    j = json.loads(r.body.decode("utf-8"))
    eq(set(j), {"mime", "key", "digest", "mode", "reencoded"}, "response fields")
    eq(j["reencoded"], [], "reencoded")
    eq(verify(j["mime"].encode()), inner.encode(), "signed content")


def json_escapes_copied():
    # the same characters through the writer's copying path: a decrypted
    # entity is answered from a buffer the response does not take
    controls = "".join(chr(c) for c in range(1, 32) if c not in (10, 13))
    inner = ("Content-Type: text/plain; charset=us-ascii\r\n\r\n"
             "quote \" backslash \\ slash / del \x7f\r\ncontrols " + controls + "\r\n")
    r = D.post_json("/v1/encrypt", {"mime": inner, "recipients": ["demo-ec"]})
    eq(r.status, 200, "encrypt status (%r)" % r.body[:300])
    r = D.post_json("/v1/decrypt", {"mime": r.json()["mime"]})
    eq(r.status, 200, "decrypt status (%r)" % r.body[:300])
    eq(json.loads(r.body.decode("utf-8"))["mime"], inner, "decrypted entity")


def raw_body(name, inner_text, line_end, want_reencoded):
    """Signs a multi-MiB message in raw mode; openssl sees the submitted
    entity, canonical (and quoted-printable where it was 8-bit)."""
    head = ("From: bench@demo.smimed.test\nSubject: %s\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n\n" % name)
    msg = (head + inner_text).replace("\n", line_end).encode("utf-8")
    r = D.request("POST", "/v1/sign?key=demo-rsa", body=msg,
                  headers={"Content-Type": "message/rfc822"})
    eq(r.status, 200, "status (%r)" % r.body[:300])
    eq(r.header("X-Smimed-Reencoded"), want_reencoded, "X-Smimed-Reencoded")
    content = verify(r.body)
    fields, body = F.split_entity(content)
    canon = inner_text.replace("\n", "\r\n").encode("utf-8")
    if want_reencoded == "none":
        eq(body, canon, "signed body")
    else:
        eq(F.get_field(fields, "Content-Transfer-Encoding"), "quoted-printable", "new encoding")
        eq(quopri.decodestring(body).replace(b"\r\n", b"\n"),
           canon.replace(b"\r\n", b"\n"), "decoded body")


LINE = "a line of 7-bit text for a large body, 0123456789 !\"#$%&'()*+,-./\n"


def main():
    if not S.case("daemon starts on the demo token", start):
        S.finish()
    S.case("JSON escapes in the signed entity round-trip", json_escapes)
    S.case("JSON escapes in a decrypted entity round-trip", json_escapes_copied)
    S.case("3 MiB 7-bit CRLF body in raw mode verifies",
           raw_body, "crlf", LINE * 48000, "\r\n", "none")
    S.case("3 MiB 7-bit LF body in raw mode verifies",
           raw_body, "lf", LINE * 48000, "\n", "none")
    S.case("2 MiB 8-bit body in raw mode is re-encoded and verifies",
           raw_body, "8bit", "caf\u00e9 " + LINE * 32000, "\r\n", "1 quoted-printable")
    S.stop_running(pins=[F.read_pin(DEMO)])
    S.finish()


if __name__ == "__main__":
    main()
