"""Point-to-point messages for the real runtime, over plain TCP sockets.

Why not torch.distributed's isend/irecv: a parameter server needs "receive from anyone, or
time out", and it must notice when a worker dies. NCCL has no any-source receive; gloo has
one, but a receive that times out tears down its connection, and a dead peer can leave it
waiting forever. So messages go over one TCP connection per pair of processes, read by a
background thread per connection into an inbox:

* `send` is non-blocking (a sender thread per destination keeps messages in order);
* `recv(timeout)` takes the next message from anyone;
* a connection that closes without a goodbye frame means its peer died: the inbox gets a
  failure notice, once per peer;
* every byte written to a socket is counted, so byte totals are what was actually sent.

Addresses are exchanged through torch.distributed's key-value store, the one torchrun sets
up for rendezvous. Collectives (all-reduce) stay on torch.distributed (gloo or NCCL).
Frames: 8-byte header length, 8-byte payload length, a JSON header, the payload bytes.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
from dataclasses import dataclass

_FRAME = struct.Struct("!QQ")
_BYE = {"bye": True}


@dataclass
class Frame:
    src: int
    header: dict
    payload: bytes
    failed: bool = False  # the peer `src` died; header and payload are empty


class Transport:
    def __init__(self, rank: int, store, host: str = "127.0.0.1", timeout_s: float = 60.0):
        self.rank, self.store, self.timeout_s = rank, store, timeout_s
        self.inbox: queue.Queue[Frame] = queue.Queue()
        self.bytes_sent = 0
        self.bytes_to: dict[int, int] = {}
        self._lock = threading.Lock()
        self._socks: dict[int, socket.socket] = {}
        self._outboxes: dict[int, queue.Queue] = {}
        self._said_bye: set[int] = set()
        self._dead: set[int] = set()
        self._closing = False
        self._listener = socket.create_server((host, 0))
        port = self._listener.getsockname()[1]
        store.set(f"locotrain/addr/{rank}", f"{host}:{port}")
        threading.Thread(target=self._accept, daemon=True).start()

    # -- sending ------------------------------------------------------------------------
    def send(self, dst: int, header: dict, payload: bytes | memoryview = b"") -> threading.Event:
        """Queue a message; the returned event is set once it is written to the socket."""
        done = threading.Event()
        with self._lock:
            box = self._outboxes.get(dst)
            if box is None:
                box = self._outboxes[dst] = queue.Queue()
                threading.Thread(target=self._sender, args=(dst, box), daemon=True).start()
        box.put((header, payload, done))
        return done

    def _sender(self, dst: int, box: queue.Queue) -> None:
        sock = None
        while True:
            header, payload, done = box.get()
            if header is None:
                return
            try:
                sock = sock or self._connect(dst)
                data = json.dumps(header).encode()
                sock.sendall(_FRAME.pack(len(data), len(payload)) + data)
                if len(payload):
                    sock.sendall(payload)
                if header is not _BYE:  # goodbyes are bookkeeping, not traffic
                    with self._lock:
                        n = _FRAME.size + len(data) + len(payload)
                        self.bytes_sent += n
                        self.bytes_to[dst] = self.bytes_to.get(dst, 0) + n
            except OSError:
                self._mark_dead(dst)
            done.set()

    def _connect(self, dst: int) -> socket.socket:
        with self._lock:
            if dst in self._socks:
                return self._socks[dst]
        addr = self.store.get(f"locotrain/addr/{dst}").decode()
        host, port = addr.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("!Q", self.rank))
        self._register(dst, sock)
        return sock

    # -- receiving ----------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next message or failure notice from anyone; None after `timeout` seconds."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            src = struct.unpack("!Q", _read(sock, 8))[0]
            self._register(src, sock)

    def _register(self, peer: int, sock: socket.socket) -> None:
        with self._lock:
            self._socks.setdefault(peer, sock)
        threading.Thread(target=self._reader, args=(peer, sock), daemon=True).start()

    def _reader(self, peer: int, sock: socket.socket) -> None:
        try:
            while True:
                hlen, plen = _FRAME.unpack(_read(sock, _FRAME.size))
                header = json.loads(_read(sock, hlen))
                payload = _read(sock, plen) if plen else b""
                if header == _BYE:
                    self._said_bye.add(peer)
                    return
                self.inbox.put(Frame(peer, header, payload))
        except (OSError, ConnectionError, ValueError):
            if peer not in self._said_bye and not self._closing:
                self._mark_dead(peer)

    def _mark_dead(self, peer: int) -> None:
        with self._lock:
            if peer in self._dead or peer in self._said_bye or self._closing:
                return
            self._dead.add(peer)
        self.inbox.put(Frame(peer, {}, b"", failed=True))

    @property
    def dead(self) -> set[int]:
        return set(self._dead)

    # -- shutdown -----------------------------------------------------------------------
    def close(self) -> None:
        """Flush queued messages, say goodbye on every connection, close."""
        with self._lock:
            boxes = dict(self._outboxes)
        flushed = [self.send(dst, _BYE) for dst in boxes]
        for event in flushed:
            event.wait(self.timeout_s)
        self._closing = True
        for box in boxes.values():
            box.put((None, None, None))
        with self._lock:
            socks = list(self._socks.values())
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._listener.close()


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)
