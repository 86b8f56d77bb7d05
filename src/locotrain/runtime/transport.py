"""Point-to-point messages for the real runtime, over authenticated TCP connections.

Why not torch.distributed's isend/irecv: a parameter server needs "receive from anyone, or
time out", and it must notice when a worker dies. NCCL has no any-source receive; gloo has
one, but a receive that times out tears down its connection, and a dead peer can leave it
waiting forever. So messages go over one TCP connection per pair of processes, read by a
background thread per connection into an inbox:

* `send` is non-blocking (a sender thread per destination keeps messages in order);
* `recv(timeout)` takes the next message from anyone;
* a peer whose connection closes without a goodbye frame, or that sends nothing at all (not
  even a heartbeat) for `timeout_s`, is dead: the inbox gets a failure notice, once per peer;
* data frames are counted in full (framing and tag included), so byte totals are what was
  sent; handshakes, heartbeats and goodbyes are bookkeeping and are not counted.

Nobody without the run's shared secret can connect, inject or alter a message:

* the listener binds to the address it is given (loopback unless `runtime.host` says
  otherwise), and addresses are exchanged through torch.distributed's key-value store;
* handshake: the listener sends a fresh random nonce; the connecting side answers with the
  rank it claims, a nonce of its own and HMAC-SHA256(secret, both nonces, both ranks); the
  listener answers with its own HMAC, so each side has proved it knows the secret, and a
  recorded handshake is useless later. The claimed rank must be in [0, world), not the
  listener's own, and not already connected to it or already dead;
* each frame then carries HMAC-SHA256, under a key derived from that handshake, over the
  sender's rank, a per-direction sequence number, the lengths, the header and the payload:
  a frame cannot be forged, altered, replayed, reordered or reflected back. A frame that
  fails the check, or whose lengths exceed the limits (1 MiB of header, `max_payload` bytes of
  payload, checked before anything is allocated), ends that connection and the peer is dead;
* handshakes run in a thread per connection with a deadline, never in the accept loop, so a
  connection that closes at once, sends garbage or stays silent holds up no one.

Frames: kind (1 byte), header length (4), payload length (8), a JSON header (an object), the
payload, a 32-byte tag.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger(__name__)

SECRET_ENV = "LOCOTRAIN_SECRET"
MIN_SECRET_CHARS = 16
MAX_HEADER = 1 << 20

_DATA, _HEARTBEAT, _BYE = 0, 1, 2
_PREFIX = struct.Struct("!BIQ")  # kind, header length, payload length
_TAG = 32  # HMAC-SHA256
_MAGIC = b"locotrn1"
_NONCE = 32
_HELLO = struct.Struct(f"!8s{_NONCE}s")  # listener -> connector: magic, nonce
_CLAIM = struct.Struct(f"!Q{_NONCE}s{_TAG}s")  # connector -> listener: rank, nonce, proof
_RANKS = struct.Struct("!QQ")
_CHUNK = 1 << 20
_MAX_HANDSHAKES = 64  # connections being vetted at once; more are closed unread
_STOP = object()  # in an outbox: no more messages


@dataclass
class Frame:
    src: int
    header: dict  # for a failure notice: {"reason": why the peer is considered dead}
    payload: bytes | bytearray
    failed: bool = False  # the peer `src` died; the payload is empty


class ProtocolError(Exception):
    """A frame or handshake that breaks the protocol: too large, malformed or forged."""


def resolve_secret(configured: str = "") -> str:
    """The run's shared secret: `runtime.secret`, else $LOCOTRAIN_SECRET; one line if unusable."""
    secret = configured or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise UserError(f"messages between ranks are authenticated with a shared secret and none "
                        f"is set: export {SECRET_ENV} (the same random string of "
                        f"{MIN_SECRET_CHARS}+ characters) on every rank; `loco launch` makes one up "
                        "itself when everything is on loopback")
    if len(secret) < MIN_SECRET_CHARS:
        raise UserError(f"the shared secret (runtime.secret or {SECRET_ENV}) has {len(secret)} "
                        f"characters; use at least {MIN_SECRET_CHARS} random ones, e.g. "
                        "`python -c 'import secrets; print(secrets.token_hex(16))'`")
    return secret


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Conn:
    """One authenticated connection: its session key, sequence numbers and write lock."""

    def __init__(self, sock: socket.socket, rank: int, peer: int, key: bytes):
        self.sock, self.rank, self.peer, self.key = sock, rank, peer, key
        self.sent = self.received = 0  # frames each way: the sequence numbers
        self.lock = threading.Lock()  # whole frames only: data and heartbeats share the socket
        self.closed = threading.Event()

    def _tag(self, sender: int, seq: int, prefix: bytes, header, payload) -> bytes:
        mac = hmac.new(self.key, _RANKS.pack(sender, seq) + prefix, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def write(self, kind: int, header: bytes = b"", payload=b"", wait: float = -1) -> int:
        """Send one frame; the bytes written, or 0 if the connection stayed busy for `wait` s."""
        if not self.lock.acquire(timeout=wait):
            return 0
        try:
            prefix = _PREFIX.pack(kind, len(header), len(payload))
            tag = self._tag(self.rank, self.sent, prefix, header, payload)
            self.sent += 1
            self.sock.sendall(prefix + header)
            view = memoryview(payload)
            # In chunks: the socket's timeout then bounds a stall, not a long transfer.
            for i in range(0, len(view), _CHUNK):
                self.sock.sendall(view[i:i + _CHUNK])
            self.sock.sendall(tag)
            return len(prefix) + len(header) + len(payload) + len(tag)
        finally:
            self.lock.release()

    def read(self, max_payload: int) -> tuple[int, bytearray, bytearray]:
        prefix = bytes(_read(self.sock, _PREFIX.size))
        kind, hlen, plen = _PREFIX.unpack(prefix)
        if kind not in (_DATA, _HEARTBEAT, _BYE) or (kind != _DATA and hlen + plen):
            raise ProtocolError(f"unknown frame (kind {kind})")
        if hlen > MAX_HEADER or plen > max_payload:  # before allocating anything
            raise ProtocolError(f"frame of {hlen} header and {plen} payload bytes exceeds the "
                                f"limits ({MAX_HEADER} and {max_payload})")
        header, payload, tag = _read(self.sock, hlen), _read(self.sock, plen), _read(self.sock, _TAG)
        if not hmac.compare_digest(tag, self._tag(self.peer, self.received, prefix, header, payload)):
            raise ProtocolError("frame failed authentication (forged, altered, replayed or reordered)")
        self.received += 1
        return kind, header, payload

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes this socket's reader
        except OSError:
            pass
        self.sock.close()


class Transport:
    """Messages between the ranks of one run.

    `secret` is the one every rank shares ("": $LOCOTRAIN_SECRET; none is a UserError);
    `max_payload` bounds what a peer can make this process allocate. Connections open on the
    first message either way, so failure notices only ever name peers one talks to."""

    def __init__(self, rank: int, store, host: str = "127.0.0.1", timeout_s: float = 60.0, *,
                 secret: str, world: int, max_payload: int,
                 handshake_timeout_s: float | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        secret = resolve_secret(secret)
        self.rank, self.store, self.timeout_s, self.world = rank, store, timeout_s, world
        self.max_payload = max_payload
        self.handshake_timeout_s = handshake_timeout_s or min(10.0, timeout_s)
        self._secret = secret.encode()
        self.inbox: queue.Queue[Frame] = queue.Queue()
        self.bytes_sent = 0
        self.bytes_to: dict[int, int] = {}
        self._lock = threading.Lock()
        self._conns: dict[int, list[_Conn]] = {}  # live connections per peer (two at most)
        self._send_conn: dict[int, _Conn] = {}  # the one messages to that peer go on
        self._inbound: set[int] = set()  # peers that connected to us: one connection each
        self._outboxes: dict[int, queue.Queue] = {}
        self._senders: dict[int, threading.Thread] = {}
        self._said_bye: set[int] = set()
        self._dead: set[int] = set()
        self._reported: set[int] = set()  # failures handed to the caller (its thread only)
        self._handshakes = threading.BoundedSemaphore(_MAX_HANDSHAKES)
        self._closing = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        port = self._listener.getsockname()[1]
        store.set(f"locotrain/addr/{rank}", f"{host}:{port}")
        threading.Thread(target=self._accept, daemon=True).start()

    # -- sending ------------------------------------------------------------------------
    def send(self, dst: int, header: dict, payload: bytes | memoryview = b"") -> threading.Event:
        """Queue a message; the returned event is set once it is written (or failed)."""
        data = json.dumps(header).encode()
        if len(data) > MAX_HEADER or len(payload) > self.max_payload:  # the receiver would refuse
            raise ValueError(f"message of {len(data)} header and {len(payload)} payload bytes "
                             f"exceeds the limits ({MAX_HEADER} and {self.max_payload})")
        done = threading.Event()
        self._outbox(dst).put((data, payload, done))
        return done

    def _outbox(self, dst: int) -> queue.Queue:
        with self._lock:
            box = self._outboxes.get(dst)
            if box is None:
                box = self._outboxes[dst] = queue.Queue()
                thread = threading.Thread(target=self._sender, args=(dst, box), daemon=True)
                self._senders[dst] = thread
                thread.start()
        return box

    def _sender(self, dst: int, box: queue.Queue) -> None:
        conn = None
        while True:
            header, payload, done = box.get()
            if header is _STOP:  # close(): every earlier message is out
                return
            try:
                conn = conn or self._conn_to(dst)
                n = conn.write(_DATA, header, payload)
                with self._lock:
                    self.bytes_sent += n
                    self.bytes_to[dst] = self.bytes_to.get(dst, 0) + n
            except Exception as e:  # whatever it is, dst is unreachable
                # (a socket error, a refused handshake, the store not giving its address in
                # time); the thread must live on so that `done` is always set.
                self._lost(dst, f"sending to it failed ({e})")
            done.set()

    def _conn_to(self, dst: int) -> _Conn:
        with self._lock:
            if dst in self._dead or dst in self._said_bye:
                raise ConnectionError(f"rank {dst} is gone")
            if dst in self._send_conn:  # it connected to us first: share that connection
                return self._send_conn[dst]
        addr = self.store.get(f"locotrain/addr/{dst}").decode()
        host, port = addr.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=self.handshake_timeout_s)
        try:
            magic, nonce = _HELLO.unpack(_read(sock, _HELLO.size))
            if magic != _MAGIC:
                raise ProtocolError(f"{addr} does not speak locotrain's protocol")
            mine = os.urandom(_NONCE)
            context = nonce + mine + _RANKS.pack(self.rank, dst)
            sock.sendall(_CLAIM.pack(self.rank, mine, self._mac(b"claim", context)))
            try:
                welcome = _read(sock, _TAG)
            except ConnectionError:
                raise ConnectionError(f"rank {dst} refused the handshake (is {SECRET_ENV} the "
                                      "same on every rank?)") from None
            if not hmac.compare_digest(welcome, self._mac(b"welcome", context)):
                raise ProtocolError(f"{addr} could not prove it is rank {dst} (wrong secret)")
            conn = _Conn(sock, self.rank, dst, self._mac(b"session", context))
            self._register(conn, inbound=False)
        except BaseException:
            sock.close()
            raise
        self._serve(conn)
        return conn

    # -- receiving ----------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next message or failure notice from anyone; None after `timeout` seconds.
        Nothing more comes from a peer once its failure has been handed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                frame = self.inbox.get(timeout=left)
            except queue.Empty:
                return None
            if frame.src in self._reported:
                continue
            if frame.failed:
                self._reported.add(frame.src)
            return frame

    def reject(self, peer: int, reason: str) -> None:
        """The caller found a frame from `peer` invalid: drop the peer as if it had died. The
        caller reports the failure itself; recv() hands out nothing more from that peer."""
        log.warning(f"loco transport (rank {self.rank}): dropping rank {peer}: {reason}")
        self._lost(peer, reason, notify=False)
        with self._lock:
            self._dead.add(peer)
        self._reported.add(peer)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError as e:
                if self._closing:
                    return
                log.warning(f"loco transport (rank {self.rank}): accept failed ({e})")
                time.sleep(0.1)  # e.g. out of file descriptors: try again, do not spin
                continue
            if not self._handshakes.acquire(blocking=False):
                sock.close()  # a flood of connections: vet the ones in hand first
                continue
            threading.Thread(target=self._welcome, args=(sock, addr), daemon=True).start()

    def _welcome(self, sock: socket.socket, addr) -> None:
        """Vet one incoming connection (in its own thread, with a deadline)."""
        conn = None
        try:
            sock.settimeout(self.handshake_timeout_s)
            nonce = os.urandom(_NONCE)
            sock.sendall(_HELLO.pack(_MAGIC, nonce))
            peer, theirs, proof = _CLAIM.unpack(_read(sock, _CLAIM.size))
            context = nonce + theirs + _RANKS.pack(peer, self.rank)
            if not hmac.compare_digest(proof, self._mac(b"claim", context)):
                raise ProtocolError("it does not know the shared secret")
            if not 0 <= peer < self.world or peer == self.rank:
                raise ProtocolError(f"it claims rank {peer}, not a peer in a world of {self.world}")
            conn = _Conn(sock, self.rank, peer, self._mac(b"session", context))
            self._register(conn, inbound=True)
            sock.sendall(self._mac(b"welcome", context))
            # Only now may messages go out on it: a frame written before the welcome would
            # reach the peer where it reads the welcome (both ends connecting at once).
            with self._lock:
                self._send_conn.setdefault(conn.peer, conn)
        except ProtocolError as e:
            log.warning(f"loco transport (rank {self.rank}): refused a connection from {addr}: {e}")
            sock.close()
            return
        except OSError:  # closed at once, silent past the deadline, or garbage then closed
            if conn is not None:
                self._lost(conn.peer, "its connection broke during the handshake")
            sock.close()
            return
        finally:
            self._handshakes.release()
        self._serve(conn)

    def _register(self, conn: _Conn, inbound: bool) -> None:
        with self._lock:
            if self._closing:
                raise ProtocolError("this transport is closing")
            if conn.peer in self._dead or conn.peer in self._said_bye:
                raise ProtocolError(f"rank {conn.peer} has already left or been declared dead")
            if inbound:
                if conn.peer in self._inbound:
                    raise ProtocolError(f"rank {conn.peer} is already connected")
                self._inbound.add(conn.peer)
            self._conns.setdefault(conn.peer, []).append(conn)
            # Both ends may connect at once; each then sends on the first connection it has
            # (an inbound one once its handshake is done: _welcome).
            if not inbound:
                self._send_conn.setdefault(conn.peer, conn)

    def _serve(self, conn: _Conn) -> None:
        # A peer that sends nothing for timeout_s (it heartbeats every timeout_s/4) is dead;
        # the same timeout bounds a write stalled by a peer that stopped reading.
        conn.sock.settimeout(self.timeout_s)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=self._reader, args=(conn,), daemon=True).start()
        threading.Thread(target=self._heartbeat, args=(conn,), daemon=True).start()

    def _reader(self, conn: _Conn) -> None:
        try:
            while True:
                kind, header, payload = conn.read(self.max_payload)
                if kind == _BYE:
                    with self._lock:
                        self._said_bye.add(conn.peer)
                    return
                if kind == _DATA:
                    self.inbox.put(Frame(conn.peer, _parse_header(header), payload))
        except TimeoutError:
            reason = f"it sent nothing, not even a heartbeat, for {self.timeout_s:g} s (stopped or hung)"
        except ProtocolError as e:
            reason = f"it broke the protocol: {e}"
            if not self._closing:
                log.warning(f"loco transport (rank {self.rank}): dropping rank {conn.peer}: {e}")
        except OSError:
            reason = "its connection closed without a goodbye"
        except Exception as e:  # e.g. MemoryError: the peer must still be reported
            reason = f"reading from it failed ({e!r})"
        self._lost(conn.peer, reason)

    def _heartbeat(self, conn: _Conn) -> None:
        # One thread per connection: a write to a peer that stopped reading blocks for up to
        # timeout_s, and must not hold up the heartbeats other peers rely on.
        while not conn.closed.wait(self.timeout_s / 4):
            if self._closing:
                return
            try:
                conn.write(_HEARTBEAT, wait=0)  # busy: a data frame is on the way, proof enough
            except OSError:
                return  # the reader notices

    def _lost(self, peer: int, reason: str, notify: bool = True) -> None:
        """`peer` is dead: close its connections and tell the inbox, once."""
        with self._lock:
            if self._closing or peer in self._dead or peer in self._said_bye:
                return
            self._dead.add(peer)
            conns = self._conns.pop(peer, [])
            self._send_conn.pop(peer, None)
        for conn in conns:
            conn.close()  # if it comes back (SIGCONT), its next write fails and it stops
        if notify:
            self.inbox.put(Frame(peer, {"reason": reason}, b"", failed=True))

    def _mac(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(self._secret, label + context, hashlib.sha256).digest()

    @property
    def dead(self) -> set[int]:
        with self._lock:
            return set(self._dead)

    # -- shutdown -----------------------------------------------------------------------
    def close(self, goodbye: bool = True) -> None:
        """Flush queued messages, say goodbye on every connection, close. A process that is
        failing closes with goodbye=False: its peers must see it die, not finish. Only the
        first call does anything."""
        with self._lock:
            if self._closing:
                return
            boxes, senders = dict(self._outboxes), dict(self._senders)
        if goodbye:
            for box in boxes.values():
                box.put((_STOP, None, None))
            end = time.monotonic() + self.timeout_s
            for thread in senders.values():
                thread.join(max(0.0, end - time.monotonic()))
        with self._lock:
            self._closing = True
            conns = [c for cs in self._conns.values() for c in cs]
        for conn in conns:
            if goodbye:
                try:
                    conn.write(_BYE, wait=1.0)
                except OSError:
                    pass
            conn.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        except OSError:
            pass
        self._listener.close()


def _parse_header(data: bytearray) -> dict:
    def no_constants(name):  # NaN and Infinity are not JSON, and not for us either
        raise ValueError(f"{name} in a header")

    try:
        header = json.loads(data, parse_constant=no_constants)
    except ValueError as e:
        raise ProtocolError(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    return header


def _read(sock: socket.socket, n: int) -> bytearray:
    """Exactly n bytes (the caller has checked n against its limits)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, _CHUNK))
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf
