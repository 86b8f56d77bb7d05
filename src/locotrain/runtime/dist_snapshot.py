"""Checkpoints of real runs of the parameter-server algorithms (Async Local-SGD, HALoS), whose
processes exchange messages in an order no rank can predict, so that no all-reduce count
marks a common point (runtime/dist_checkpoint.py does that for the synchronous ones).

A consistent cut of message-passing processes is Chandy and Lamport's snapshot ("Distributed
Snapshots: Determining Global States of Distributed Systems", ACM TOCS 1985), which needs
FIFO channels: our TCP connections are. The process that publishes the global model starts
one (every train.checkpoint_every tokens it publishes, or on SIGTERM). A process records its
state when it starts a snapshot or first meets a marker, then sends a marker to every other
process before any other message; from then on it also records what reaches it from each
peer until that peer's marker arrives. Recorded: this process's state just before the
primitive it is about to run (the same point a resume replays to), the messages it had
received and not yet taken, and those recorded on the channels. Nothing is lost or counted
twice: a worker in the middle of a task records after the task, before it sends the result,
and a resumed worker sends it again.

A process is paused only at primitives, so markers are read there, and while it waits to
receive. On SIGTERM every process stops at the snapshot: it records, collects the markers,
saves and exits; continuing runs record and carry on. Resuming replays each process without
arithmetic, feeding it the messages it took before (their sources and meta data, logged;
zeros for their tensors), then copies the saved values in (snapshot.py) and gives it back
its untaken messages. A run in which a process has died takes no more checkpoints (a
resumed run would have to bring the dead process back as dead); it says so once.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch

from ..checkpoint import save_run_state
from ..errors import UserError
from .api import Handle, Message
from .dist_checkpoint import (StoppedAtCheckpoint, capture, forget_all_but, load_named,
                              name_checkpoint, restore)

_DONE = "locotrain/snapshot"  # + "/s/r": rank r saved snapshot s


class Snapshots:
    def __init__(self, rt, every_tokens: int, enabled: bool = True):
        self.rt = rt
        self.enabled = enabled
        self.every = every_tokens if enabled else 0
        self.next = self.every
        self.stop_requested = False  # set by the SIGTERM handler (distributed.py)
        self.due = False  # the initiator: start a snapshot at the next chance
        self.last = 0  # the newest snapshot this process took part in
        self.events = 0  # primitives this process has completed
        self.op = None  # the primitive this process is about to run (or is waiting in)
        self.log: list = []  # what every receive gave the process, for a replay
        self.taking: dict | None = None  # a snapshot recorded here, its channels still open
        self.replay: dict | None = None
        self.saved: list[int] = []
        self.warned = False

    # -- hooks of the runtime ----------------------------------------------------------------
    def started(self, handle: Handle) -> None:
        if self.enabled:  # a snapshot does not cover collectives under way
            raise UserError("this algorithm's workers all-reduce, which a snapshot of its "
                            "messages does not cover: its real runs cannot be checkpointed")

    def finished(self, handle: Handle) -> None:
        pass

    def before(self, op) -> None:
        """The process is about to run `op`: the point a checkpoint records and a resume
        restores."""
        self.op = op
        if self.replay is not None:
            if self.events == self.replay["events"]:
                self._restore()
            return
        if self.enabled:
            self.rt.poll()
            self.idle()

    def after(self, value) -> None:
        self.events += 1

    def idle(self) -> None:
        """The initiator starts a snapshot that is due (also while it waits to receive)."""
        if self.taking is None and self.replay is None and self.rt.recorder is not None and (
                self.due or self.stop_requested):
            self._record(self.last + 1, stop=self.stop_requested, initiator=True)

    def published(self, tokens: int) -> None:
        if self.every and tokens >= self.next:
            self.due = True
            self.next = (tokens // self.every + 1) * self.every

    def marker(self, src: int, header: dict) -> None:
        """A peer's marker: record first if this process has not, then close that channel."""
        sid = header["snapshot"]
        if self.taking is None and sid > self.last:
            self._record(sid, stop=bool(header.get("stop")), initiator=False, closed=src)
        elif self.taking is not None and self.taking["id"] == sid:
            self.taking["open"].discard(src)
            self._complete_if_closed()

    def arrived(self, src: int, msg: Message) -> None:
        """A message went into the mailbox: on a channel still open, it is channel state."""
        if self.taking is None:
            return
        if msg.failed and src in self.taking["open"]:
            self.rt.log(f"checkpoint {self.taking['id']} abandoned: process {msg.src} died")
            self.taking = None
        elif src in self.taking["open"]:
            self.taking["inbox"].append(_copy(msg))

    def delivered(self, msg: Message | None) -> None:
        """A receive gave the process `msg` (None: it timed out)."""
        if self.replay is None:
            self.log.append(None if msg is None else {
                "src": msg.src, "meta": msg.meta, "sent_at": msg.sent_at,
                "shapes": [list(t.shape) for t in msg.tensors]})

    def replayed_message(self) -> Message | None:
        """A receive during a replay: what the original run got, with zeros for tensors."""
        entry = self.replay["log"].popleft()
        if entry is None:
            return None
        tensors = [torch.zeros(s, device=self.rt.device) for s in entry["shapes"]]
        return Message(entry["src"], tensors, entry["meta"], entry["sent_at"])

    @property
    def replaying(self) -> bool:
        return self.replay is not None

    replaying_messages = replaying  # receives come from the log, sends are not made again

    # -- taking a snapshot ---------------------------------------------------------------------
    def _record(self, sid: int, stop: bool, initiator: bool, closed: int | None = None) -> None:
        """Record this process's state for snapshot `sid` and send the markers; `closed`:
        the peer whose marker started it (nothing more is recorded from it)."""
        rt = self.rt
        self.due = False
        if rt.transport.dead:
            if not self.warned:
                rt.log("no more checkpoints: a process of this run has died, and a resumed run "
                       "cannot bring it back as it was")
                self.warned = True
            return
        tensors, meta = capture(rt, self._roots(), copy=True)
        meta |= {"snapshot": sid, "events": self.events, "log": list(self.log),
                 "counters": {"tokens": rt.tokens, "inner_steps": rt.inner_steps,
                              "peak_payload": rt.peak_payload,
                              "bytes_sent": rt.transport.bytes_sent,
                              "bytes_to": {str(k): v for k, v in rt.transport.bytes_to.items()}}}
        peers = set(range(len(rt.procs))) - {rt.rank}
        self.taking = {"id": sid, "stop": stop, "initiator": initiator, "open": peers - {closed},
                       "tensors": tensors, "meta": meta, "inbox": [_copy(m) for m in rt.mailbox]}
        self.last = sid
        for peer in sorted(peers):  # before any other message this process sends
            rt.transport.send(peer, {"snapshot": sid, "stop": int(stop)})
        self._complete_if_closed()
        while stop and self.taking is not None:  # nothing more to compute: collect the
            rt.poll(wait=min(1.0, rt.cfg.runtime.timeout_s))  # markers, save, and stop

    def _complete_if_closed(self) -> None:
        taking = self.taking
        if taking is None or taking["open"]:
            return
        self.taking = None
        rt, sid = self.rt, taking["id"]
        tensors, meta = taking["tensors"], taking["meta"]
        inbox = []
        for i, msg in enumerate(taking["inbox"]):
            tensors |= {f"inbox/{i}/{j}": t for j, t in enumerate(msg.tensors)}
            inbox.append({"src": msg.src, "meta": msg.meta, "sent_at": msg.sent_at,
                          "tensors": len(msg.tensors)})
        meta["inbox"] = inbox
        save_run_state(rt.out, tensors, meta, name=f"rank{rt.rank}-s{sid}")
        self._forget_all_but(self.saved[-1:] + [sid])
        self.saved.append(sid)
        rt.store.set(f"{_DONE}/{sid}/{rt.rank}", "1")
        named = False
        if taking["initiator"]:
            try:
                rt.store.wait([f"{_DONE}/{sid}/{r}" for r in range(len(rt.procs))],
                              timedelta(seconds=rt.cfg.runtime.timeout_s))
            except RuntimeError:  # a process died before saving: the last one stays named
                rt.log(f"checkpoint {sid} incomplete: not every process saved it in time")
            else:
                name_checkpoint(rt, "snapshot", sid)
                named = True
        if taking["stop"]:
            raise StoppedAtCheckpoint(named)

    def _forget_all_but(self, keep: list[int]) -> None:
        """Older file sets of this rank; the one before the newest stays until the initiator
        has named the newest in real.json."""
        forget_all_but(self.rt, f"rank{self.rt.rank}-s", keep)

    def _roots(self) -> list:
        rt = self.rt
        last = rt.recorder.last[0] if rt.recorder and rt.recorder.last else None
        return [rt.gen, self.op, last]

    # -- resuming ------------------------------------------------------------------------------
    def resume(self) -> None:
        """Before the first primitive: load this rank's part of the named snapshot."""
        rt = self.rt
        sid, tensors, meta = load_named(rt, "snapshot", "s")
        self.saved, self.last, self.log = [sid], sid, list(meta["log"])
        self.replay = {"events": meta["events"], "tensors": tensors, "meta": meta,
                       "log": deque(meta["log"])}
        rt.engine.replaying = True

    def _restore(self) -> None:
        rt, tensors, meta = self.rt, self.replay["tensors"], self.replay["meta"]
        self.replay = None
        rt.engine.replaying = False
        restore(rt, self._roots(), tensors, meta)
        if "recorder" in meta:
            tokens = rt.recorder.last[1] if rt.recorder.last else 0
            self.next = (tokens // self.every + 1) * self.every if self.every else 0
        c = meta["counters"]
        rt.tokens, rt.inner_steps, rt.peak_payload = c["tokens"], c["inner_steps"], c["peak_payload"]
        rt.transport.bytes_sent = c["bytes_sent"]
        rt.transport.bytes_to = {int(k): v for k, v in c["bytes_to"].items()}
        rt.mailbox = deque(Message(m["src"], [tensors[f"inbox/{i}/{j}"].to(rt.device)
                                              for j in range(m["tensors"])], m["meta"], m["sent_at"])
                           for i, m in enumerate(meta["inbox"]))


def _copy(msg: Message) -> Message:
    return Message(msg.src, [t.detach().to("cpu", copy=True) for t in msg.tensors],
                   dict(msg.meta), msg.sent_at)

