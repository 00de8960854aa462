"""The key protocol (proto/proto.h) written again in Python, from its
description rather than from the C code, so that the tests and the seed
corpus (tests/fuzz/make-seeds) do not share the C encoder's mistakes; and
a key process (smimed --role=key) started with this process as its
supervisor.

A message is one SOCK_SEQPACKET datagram: {u16 version, u16 type, u32 id,
u32 length} (big-endian) and the fields; a byte string or text is a u32
length and the bytes.
"""

import os
import socket
import struct
import subprocess
import time

VERSION = 1
KEYS, SIGN, DECRYPT, DERIVE, STATE, AUDIT, FINISH = range(1, 8)
REPLY, ERROR, NOTICE = 0x80, 0xfe, 0xff
STATUS = ["ok", "busy", "unavailable", "not_found", "unsupported", "failed",
          "audit_failed", "bad_request", "internal"]
MD_NONE, MD_SHA1, MD_SHA224, MD_SHA256, MD_SHA384, MD_SHA512 = range(6)
PKCS1, PSS, ECDSA = 1, 2, 3
PAD_PKCS1, PAD_OAEP = 1, 2
MSG_MAX = 65536

# control messages (service/proc.h)
CTL_KEY_SOCKET, CTL_PIN, CTL_OPEN, CTL_RELOAD, CTL_REOPEN, CTL_STOP, \
    CTL_READY, CTL_WANT_RELOAD = range(1, 9)


def u8(v):
    return struct.pack(">B", v)


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v)


def blob(b):
    if isinstance(b, str):
        b = b.encode()
    return u32(len(b)) + b


def message(mtype, mid, body, version=VERSION, length=None):
    return u16(version) + u16(mtype) + u32(mid) + \
        u32(len(body) if length is None else length) + body


def claims(rid="0123456789abcdef", client="tests", remote="127.0.0.1",
           sha=""):
    return blob(rid) + blob(client) + blob(remote) + blob(sha)


def sign_body(key, mech, md, digest, mgf1=MD_NONE, salt=0, cl=None):
    return blob(key) + u8(mech) + u8(md) + u8(mgf1) + u32(salt) + \
        blob(digest) + (cl if cl is not None else claims())


def decrypt_body(key, padding, ciphertext, oaep_md=MD_NONE, mgf1=MD_NONE,
                 label=b"", cl=None):
    return blob(key) + u8(padding) + u8(oaep_md) + u8(mgf1) + blob(label) + \
        blob(ciphertext) + (cl if cl is not None else claims())


def derive_body(key, point, cl=None):
    return blob(key) + blob(point) + (cl if cl is not None else claims())


def audit_body(operation, key, result, error, cl=None):
    return (cl if cl is not None else claims()) + blob(operation) + \
        blob(key) + u16(result) + blob(error)


def finish_body(rid, result, error="", latency_us=1000):
    return blob(rid) + u16(result) + blob(error) + u32(latency_us)


class Reader:
    def __init__(self, data):
        self.d = data
        self.o = 0

    def take(self, n):
        if self.o + n > len(self.d):
            raise ValueError("short reply")
        b = self.d[self.o:self.o + n]
        self.o += n
        return b

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def blob(self):
        return self.take(self.u32())

    def text(self):
        return self.blob().decode("utf-8")


class Reply:
    def __init__(self, data):
        r = Reader(data)
        self.version, self.type, self.id, length = r.u16(), r.u16(), r.u32(), r.u32()
        if length != len(data) - 12:
            raise ValueError("length %d of %d" % (length, len(data)))
        self.status = STATUS[r.u8()]
        self.retry_after = r.u32()
        self.epoch = r.u64()
        self.message = r.text()
        self.keys, self.tokens, self.data = [], [], None
        req = self.type & ~REPLY
        if self.status == "ok" and self.type not in (ERROR, NOTICE):
            if req == KEYS:
                self.total, self.next = r.u32(), r.u32()
                for _ in range(r.u16()):
                    k = {"name": r.text(), "token": r.text(), "algorithm": r.text(),
                         "flags": r.u8(), "reason_sign": r.text(),
                         "reason_decrypt": r.text(), "cert": r.blob()}
                    k["chain"] = [r.blob() for _ in range(r.u8())]
                    self.keys.append(k)
            elif req == STATE:
                self.total, self.next = r.u32(), r.u32()
                for _ in range(r.u16()):
                    t = {"name": r.text(), "state": r.u8(), "flags": r.u8(),
                         "reason": r.text(), "since": r.u64()}
                    for f in ("ops_sign", "ops_decrypt", "busy", "unavailable",
                              "faults", "retries", "recoveries"):
                        t[f] = r.u64()
                    for f in ("in_flight", "waiting", "max_sessions"):
                        t[f] = r.u32()
                    self.tokens.append(t)
            elif req in (SIGN, DECRYPT, DERIVE):
                self.data = r.blob()
        if r.o != len(data):
            raise ValueError("%d bytes after the reply" % (len(data) - r.o))

    def __repr__(self):
        return "<reply type %#x id %d %s %r>" % (self.type, self.id, self.status,
                                                 self.message)


class Conn:
    """A worker's end of a key-protocol socket."""

    def __init__(self, sock):
        self.sock = sock
        self.next_id = 1
        self.notices = []

    def send_raw(self, data, fds=()):
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv(self, want_id, timeout=30):
        """The reply to want_id; notices on the way are kept."""
        deadline = time.time() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.time()))
            data = self.sock.recv(MSG_MAX + 1)
            if not data:
                raise EOFError("the key process closed the socket")
            rep = Reply(data)
            if rep.type == NOTICE:
                self.notices.append(rep)
                continue
            if rep.id == want_id:
                return rep

    def send(self, mtype, body):
        """A message without a reply (FINISH)."""
        mid = self.next_id
        self.next_id += 1
        self.send_raw(message(mtype, mid, body))

    def call(self, mtype, body, timeout=30):
        mid = self.next_id
        self.next_id += 1
        self.send_raw(message(mtype, mid, body))
        return self.recv(mid, timeout)

    def keys(self):
        out, start = [], 0
        while True:
            rep = self.call(KEYS, u32(start))
            if rep.status != "ok":
                raise AssertionError("KEYS: %r" % rep)
            out += rep.keys
            start = rep.next
            if start >= rep.total:
                return out

    def state(self):
        rep = self.call(STATE, u32(0))
        if rep.status != "ok":
            raise AssertionError("STATE: %r" % rep)
        return rep.tokens

    def close(self):
        self.sock.close()


def ctl_message(mtype, arg=0, data=b""):
    return u16(mtype) + u16(len(data)) + u32(arg) + data


def ctl_parse(data):
    mtype, length, arg = struct.unpack(">HHI", data[:8])
    return mtype, arg, data[8:8 + length]


class KeyProcess:
    """smimed --role=key with this process as its supervisor: the control
    socket is its descriptor 3, worker sockets go over it."""

    def __init__(self, binary, config, log_path, env=None, pins=()):
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update(env or {})

        def at_three():
            if child.fileno() == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(child.fileno(), 3)
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(binary), "--role=key", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env=full_env, preexec_fn=at_three, close_fds=False)
        child.close()
        for name, pin in pins:
            self.ctl.send(ctl_message(CTL_PIN, 0, name.encode() + b"\0" +
                                      pin.encode() + b"\0"))
        self.ctl.send(ctl_message(CTL_OPEN))

    def wait_ready(self, timeout=60):
        self.ctl.settimeout(timeout)
        while True:
            data = self.ctl.recv(1024)
            if not data:
                raise AssertionError("the key process went before it was ready")
            mtype, _, _ = ctl_parse(data)
            if mtype == CTL_READY:
                return self

    def connect(self, slot):
        """A new worker socket; the key process gets the other end."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(self.ctl, [ctl_message(CTL_KEY_SOCKET, slot)],
                        [theirs.fileno()])
        theirs.close()
        return Conn(mine)

    def control(self, mtype, timeout=60):
        """Sends a control message; for RELOAD, waits for its answer."""
        self.ctl.send(ctl_message(mtype))
        if mtype != CTL_RELOAD:
            return None
        self.ctl.settimeout(timeout)
        while True:
            got, arg, _ = ctl_parse(self.ctl.recv(1024))
            if got == CTL_RELOAD:
                return arg

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            try:
                self.ctl.send(ctl_message(CTL_STOP))
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ctl.close()
        self.log.close()
        return self.proc.returncode
