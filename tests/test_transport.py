"""The message transport of the real runtime, in one process over 127.0.0.1: round trips,
and what a stranger, a forger or a silent peer can and cannot do to it."""

import hashlib
import hmac
import json
import os
import socket
import threading
import time

import pytest

from locotrain.errors import UserError
from locotrain.runtime import transport as tp
from locotrain.runtime.transport import Transport

SECRET = "a-secret-for-tests-only-0123456789"


class Store:
    """The part of torch's TCPStore a Transport uses; `get` waits for the key, as it does."""

    def __init__(self):
        self._data, self._cv = {}, threading.Condition()

    def set(self, key, value):
        with self._cv:
            self._data[key] = value.encode()
            self._cv.notify_all()

    def get(self, key):
        with self._cv:
            if not self._cv.wait_for(lambda: key in self._data, timeout=5):
                raise RuntimeError(f"timed out waiting for {key}")
            return self._data[key]


@pytest.fixture
def make():
    """make(rank, world, **options) -> a Transport on a shared store, closed after the test."""
    store, made = Store(), []

    def make(rank, world, **kw):
        options = {"secret": SECRET, "max_payload": 1 << 16, "timeout_s": 30.0, **kw}
        t = Transport(rank, store, "127.0.0.1", options.pop("timeout_s"), world=world, **options)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close(goodbye=False)


class Peer:
    """A hand-made peer that speaks the protocol, for doing what a real Transport never does."""

    def __init__(self, target: Transport, rank: int, secret: str = SECRET):
        self.sock = socket.create_connection(target._listener.getsockname(), timeout=10)
        magic, nonce = tp._HELLO.unpack(tp._read(self.sock, tp._HELLO.size))
        assert magic == tp._MAGIC
        mine = os.urandom(tp._NONCE)
        context = nonce + mine + tp._RANKS.pack(rank, target.rank)

        def mac(label):
            return hmac.new(secret.encode(), label + context, hashlib.sha256).digest()

        self.sock.sendall(tp._CLAIM.pack(rank, mine, mac(b"claim")))
        try:
            welcome = tp._read(self.sock, tp._TAG)
        except ConnectionError:
            self.conn = None  # refused
            return
        assert welcome == mac(b"welcome")
        self.conn = tp._Conn(self.sock, rank, target.rank, mac(b"session"))

    def frame(self, header: dict, payload: bytes = b"", key: bytes | None = None) -> bytes:
        """The bytes of this peer's next data frame (under another key: a forgery)."""
        class Tape:
            data = b""

            def sendall(self, b):
                self.data += bytes(b)

        conn = tp._Conn(Tape(), self.conn.rank, self.conn.peer, key or self.conn.key)
        conn.sent = self.conn.sent
        conn.write(tp._DATA, json.dumps(header).encode(), payload)
        self.conn.sent += 1
        return conn.sock.data

    def closed_within(self, seconds: float) -> bool:
        """Whether the other end closes this connection within `seconds` (anything it sends,
        such as heartbeats, is read and ignored)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False

    def close(self):
        self.sock.close()


def drain(t: Transport, seconds: float) -> list:
    frames, end = [], time.monotonic() + seconds
    while (frame := t.recv(max(0.0, end - time.monotonic()))) is not None:
        frames.append(frame)
    return frames


def test_messages_arrive_in_order_from_anyone_and_are_counted(make):
    a, b, c = make(0, 3), make(1, 3), make(2, 3)
    assert c._listener.getsockname()[0] == "127.0.0.1"
    for i in range(20):
        a.send(2, {"i": i}, bytes([i]) * 1000)
    b.send(2, {"from": "b"}, b"").wait(10)
    c.send(0, {"reply": True}, b"xyz").wait(10)  # on the connection a opened
    got = [c.recv(10) for _ in range(21)]
    from_a = [f for f in got if f.src == 0]
    assert [f.header["i"] for f in from_a] == list(range(20))
    assert all(f.payload == bytes([f.header["i"]]) * 1000 for f in from_a)
    assert [f.header for f in got if f.src == 1] == [{"from": "b"}]
    reply = a.recv(10)
    assert (reply.src, reply.header, bytes(reply.payload)) == (2, {"reply": True}, b"xyz")
    # framing (13 bytes), the JSON header, the payload and the 32-byte tag; no heartbeats
    assert a.bytes_sent == sum(13 + len(json.dumps({"i": i})) + 1000 + 32 for i in range(20))
    assert a.bytes_to == {2: a.bytes_sent}
    # a goodbye is not a death; a process that closes without one died
    a.close()
    b.close(goodbye=False)
    notices = drain(c, 3)
    assert [(f.src, f.failed) for f in notices] == [(1, True)]
    assert c.dead == {1}


def test_two_peers_that_connect_to_each_other_at_once_both_get_through(make, monkeypatch):
    """One end sends while the other's connection to it is being accepted: no message may go
    out on an accepted connection before its handshake is done (the peer reads the welcome
    there)."""
    register = Transport._register

    def slow_register(self, conn, inbound):  # widens the window between accept and welcome
        register(self, conn, inbound)
        if inbound:
            time.sleep(0.1)

    monkeypatch.setattr(Transport, "_register", slow_register)
    for world in range(5):  # a fresh pair each time: the race is in the first connect
        a, b = make(0, 2), make(1, 2)
        first = a.send(1, {"to": 1}, b"x")
        time.sleep(0.02)  # b sends while a's connection is accepted and not yet welcomed
        sent = [first, b.send(0, {"to": 0}, b"y")]
        assert all(e.wait(10) for e in sent)
        got = [a.recv(5), b.recv(5)]
        assert [(f.src, f.failed, f.header) for f in got] == [(1, False, {"to": 0}),
                                                              (0, False, {"to": 1})]
        a.close()
        b.close()


def test_no_secret_no_transport(make, monkeypatch):
    monkeypatch.delenv(tp.SECRET_ENV, raising=False)
    with pytest.raises(UserError, match="LOCOTRAIN_SECRET"):
        make(0, 2, secret="")
    with pytest.raises(UserError, match="at least 16"):
        make(0, 2, secret="short")
    monkeypatch.setenv(tp.SECRET_ENV, SECRET)
    assert tp.resolve_secret("") == SECRET


def test_a_wrong_secret_can_neither_connect_nor_accept(make, caplog):
    a, b = make(0, 2), make(1, 2, secret="another-secret-of-enough-length")
    a.send(1, {"x": 1}).wait(10)
    notice = a.recv(10)  # b refused a's handshake: b is unreachable for a
    assert notice.failed and notice.src == 1 and "refused" in notice.header["reason"]
    assert b.recv(1) is None
    assert "does not know the shared secret" in caplog.text
    assert Peer(b, 0, secret=SECRET).conn is None  # nor can anyone else with a's secret


def test_forged_and_replayed_frames_end_their_connection(make, caplog):
    listener = make(3, 4)
    forger = Peer(listener, 0)  # holds a session, as if it had hijacked the connection
    forger.sock.sendall(forger.frame({"evil": 1}, b"x", key=b"k" * 32))
    assert forger.closed_within(10)
    replayer = Peer(listener, 1)
    once = replayer.frame({"n": 1}, b"ok")
    replayer.sock.sendall(once + once)
    assert replayer.closed_within(10)
    frames = drain(listener, 1)
    assert [(f.src, f.failed, f.header.get("n")) for f in frames if not f.failed] == [(1, False, 1)]
    assert {f.src for f in frames if f.failed} == {0, 1}
    assert "failed authentication" in caplog.text
    # the listener is unharmed: a real peer connects and delivers
    make(2, 4).send(3, {"real": True}, b"data")
    frame = listener.recv(10)
    assert (frame.src, frame.header, bytes(frame.payload)) == (2, {"real": True}, b"data")


def test_claimed_ranks_must_be_real_and_unique(make, caplog):
    listener, real = make(2, 3), make(1, 3)
    real.send(2, {"hello": 1}).wait(10)
    assert listener.recv(10).header == {"hello": 1}
    assert Peer(listener, 1).conn is None  # rank 1 is already connected
    assert Peer(listener, 2).conn is None  # the listener itself
    assert Peer(listener, 7).conn is None  # no such rank
    assert Peer(listener, 0, secret="not-the-secret-but-long-enough").conn is None
    assert "already connected" in caplog.text and "not a peer in a world of 3" in caplog.text
    # none of that touched the real rank 1, nor kept the real rank 0 out
    real.send(2, {"still": 1}).wait(10)
    assert listener.recv(10).header == {"still": 1}
    zero = Peer(listener, 0)
    assert zero.conn is not None
    assert listener.recv(1) is None and listener.dead == set()


def test_oversized_frames_are_refused_before_reading_them(make):
    listener = make(3, 4, max_payload=1000)
    big_header = Peer(listener, 0)
    big_header.sock.sendall(tp._PREFIX.pack(tp._DATA, tp.MAX_HEADER + 1, 0))
    big_payload = Peer(listener, 1)
    big_payload.sock.sendall(tp._PREFIX.pack(tp._DATA, 2, 1001))
    # Nothing follows the lengths: a transport that tried to read that much would wait.
    assert big_header.closed_within(10) and big_payload.closed_within(10)
    fits = Peer(listener, 2)
    fits.sock.sendall(fits.frame({}, b"p" * 1000))
    frames = drain(listener, 2)
    assert [(f.src, len(f.payload)) for f in frames if not f.failed] == [(2, 1000)]
    assert {f.src for f in frames if f.failed} == {0, 1}


def test_bad_connections_do_not_hold_up_the_accept_loop(make):
    listener = make(1, 2, handshake_timeout_s=60)  # a stalled accept loop would stall 60 s
    address = listener._listener.getsockname()
    socket.create_connection(address).close()  # connect and close
    garbage = socket.create_connection(address)
    garbage.sendall(os.urandom(200))
    silent = [socket.create_connection(address) for _ in range(3)]
    make(0, 2).send(1, {"got": "through"})
    frame = listener.recv(15)
    assert frame is not None and frame.header == {"got": "through"}
    for s in [garbage, *silent]:
        s.close()


def test_a_silent_handshake_is_cut_off(make):
    listener = make(1, 2, handshake_timeout_s=0.5)
    sock = socket.create_connection(listener._listener.getsockname(), timeout=10)
    tp._read(sock, tp._HELLO.size)
    sock.settimeout(10)
    assert sock.recv(1) == b""  # closed by the listener, not by our timeout
    sock.close()


def test_a_peer_that_goes_silent_is_dead_within_the_timeout_and_a_quiet_one_is_not(make):
    listener, quiet = make(2, 3, timeout_s=3.0), make(0, 3, timeout_s=3.0)
    quiet.send(2, {"first": 1})
    assert listener.recv(10).header == {"first": 1}
    silent = Peer(listener, 1)  # a completed handshake, then nothing: a stopped process
    frames = drain(listener, 10)  # three timeouts: heartbeats must keep `quiet` alive
    assert [(f.src, f.failed) for f in frames] == [(1, True)]  # once
    assert "sent nothing" in frames[0].header["reason"]
    assert silent.closed_within(5)
    quiet.send(2, {"still": "here"})
    assert listener.recv(10).header == {"still": "here"}


def test_a_rejected_peer_is_dropped_once(make):
    a, b = make(0, 2), make(1, 2)
    for i in range(3):
        a.send(1, {"i": i})
    end = time.monotonic() + 10
    while b.inbox.qsize() < 3 and time.monotonic() < end:  # all three received, none taken
        time.sleep(0.01)
    assert b.recv(10).header == {"i": 0}
    b.reject(0, "its message made no sense")  # the caller reports this failure itself
    assert drain(b, 2) == [] and b.dead == {0}
    notice = a.recv(10)
    assert notice.failed and notice.src == 1  # a sees its connection closed


def test_invalid_message_headers_drop_the_sender_and_never_raise():
    import types

    import torch

    from locotrain.codecs import make_codec
    from locotrain.runtime.torchdist import DistRuntime

    rejected, logged = [], []
    rt = types.SimpleNamespace(
        procs=[types.SimpleNamespace(name="w0"), types.SimpleNamespace(name="ps")],
        spec=types.SimpleNamespace(name="ps"), t0=0.0, device=torch.device("cpu"),
        job=types.SimpleNamespace(param_shapes=[(4, 3), (3,), (3,)]),
        transport=types.SimpleNamespace(reject=lambda src, why: rejected.append(src)),
        log=logged.append)

    def message(header, payload):
        return DistRuntime._message(rt, tp.Frame(0, header, payload))

    def good(shapes, codec="int8", **changes):
        numel = sum(torch.Size(s).numel() for s in shapes)
        header = {"meta": {"version": 3, "stop": False, "note": "x"}, "codec": codec,
                  "block": 4, "numel": numel, "shapes": shapes, "sent_at": 1.5}
        c = make_codec(codec, 4)
        payload = c.encode(torch.arange(numel, dtype=torch.float32)).numpy().tobytes()
        return {**header, **changes}, payload

    for shapes in ([[4, 3], [3], [3]], [[3], [4, 3]], []):  # the model, a fragment, nothing
        msg = message(*good(shapes))
        assert not msg.failed and [list(t.shape) for t in msg.tensors] == shapes
    assert rejected == [] and msg.meta == {"version": 3, "stop": False, "note": "x"}

    header, payload = good([[4, 3], [3]])
    bad = [
        ({**header, "codec": "zip"}, payload),
        ({**header, "codec": None}, payload),
        ({**header, "block": 0}, payload),
        ({**header, "block": "4"}, payload),
        ({**header, "shapes": [[3], [3], [3]]}, payload),  # more (3,) than the model has
        ({**header, "shapes": [[5, 3]], "numel": 15}, payload),  # not a parameter's shape
        ({**header, "shapes": "[[4, 3]]"}, payload),
        ({**header, "shapes": [[[4]]]}, payload),
        ({**header, "numel": 14}, payload),
        ({**header, "numel": 15.0}, payload),
        (header, payload[:-1]),
        (header, payload + b"\0"),
        ({**header, "meta": {"nested": {"a": 1}}}, payload),
        ({**header, "meta": {"failed": True}}, payload),
        ({**header, "meta": ["version"]}, payload),
        ({**header, "sent_at": "now"}, payload),
        ({k: v for k, v in header.items() if k != "numel"}, payload),
    ]
    for h, p in bad:
        msg = message(h, p)
        assert msg.failed and msg.tensors == [], h
    assert rejected == [0] * len(bad)
    assert len(logged) == len(bad) and all("sent an invalid message" in line for line in logged)
