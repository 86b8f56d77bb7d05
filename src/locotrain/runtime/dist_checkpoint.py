"""Checkpoints of real runs (runtime/torchdist.py), the way the simulator's work
(runtime/snapshot.py): each rank saves its worker's state and every tensor its process holds;
a resumed rank replays its process without arithmetic or communication up to the saved
point and copies the values back.

A checkpoint of several processes must be a consistent cut: no rank may be past an exchange
another has not reached. Synchronous algorithms give one for free: every worker runs the
same sequence of all-reduces. Rank 0 decides, after its c-th all-reduce of all workers, that
the checkpoint comes after the next one it has not joined yet and says so through
torch.distributed's store before it joins that one; no rank can finish it before rank 0 has
joined it, so every rank reads the decision in time. At that point each rank completes the
all-reduces it started and has not waited for (the same ones on every rank), saves
`checkpoint/rank<r>-<c>.json` and its tensors, and rank 0 writes `checkpoint/real.json`
(naming c) once every rank has. A stop (SIGTERM) is a checkpoint rank 0 asks for at once,
after which every rank exits. Parameter-server algorithms have no such cut: their
checkpoints are runtime/dist_snapshot.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from datetime import timedelta
from pathlib import Path

import torch

from ..checkpoint import STATE_DIR, load_run_state, save_run_state
from ..errors import UserError
from ..files import atomic_write
from . import snapshot
from .api import Handle

MANIFEST = "real.json"
SMALL = 4096  # all-reduce results up to this many values are recorded for replays
_AT = "locotrain/checkpoint/at"  # + "/c": a checkpoint after all-reduce c
_STOP = "locotrain/checkpoint/stop"  # + "/c": every rank stops after the checkpoint at cut c


class StoppedAtCheckpoint(Exception):
    """This rank was asked to stop (SIGTERM), and every rank has saved the checkpoint (or
    this one has, and another names it). `announce`: this rank says how to continue."""

    def __init__(self, announce: bool):
        super().__init__()
        self.announce = announce


class Checkpoints:
    def __init__(self, rt, every_tokens: int, enabled: bool = True):
        self.rt = rt
        # Synchronous algorithms with a run folder checkpoint: every `every` tokens, and at
        # the next common cut once a stop is asked for (SIGTERM, `loco launch` stopping).
        self.enabled = enabled and rt.setup.algorithm.synchronous
        self.every = every_tokens if self.enabled else 0
        self.next = self.every
        self.stop_requested = False  # set by the SIGTERM handler (distributed.py)
        self.stop_scheduled = False
        self.events = 0  # primitives this rank's process has yielded
        self.reduces = 0  # all-reduces of all workers completed, in program order
        self.outstanding: list[Handle] = []  # started, not yet waited for
        self.exchanged: list = []  # small all-reduce results, in order
        self.replay: dict | None = None
        self.due = 0  # c > 0: a checkpoint at cut c, after the primitive under way
        self.saved: list[int] = []  # the checkpoints (all-reduce counts) this rank wrote

    # -- hooks of the runtime ----------------------------------------------------------------
    def before(self, op) -> None:  # (dist_snapshot's points; this class's are after())
        pass

    def idle(self) -> None:
        pass

    def published(self, tokens: int) -> None:
        pass

    def arrived(self, src: int, msg) -> None:
        pass

    def delivered(self, msg) -> None:
        pass

    # A replay of a synchronous run exchanges its messages again, for real: every rank
    # replays, and the messages are the same (dist_snapshot's replays feed them from a log).
    replaying_messages = False

    def started(self, handle: Handle) -> None:
        self.outstanding.append(handle)

    def finished(self, handle: Handle) -> None:
        """An all-reduce completed (the runtime's _wait)."""
        if handle in self.outstanding:
            self.outstanding.remove(handle)
        result = handle.result
        if sum(t.numel() for t in result) <= SMALL:
            self.exchanged.append([t.detach().cpu().reshape(-1).tolist() for t in result])
        if handle.state.get("group") != tuple(range(self.rt.job.M)) or not self.enabled:
            return
        self.reduces += 1
        rt = self.rt
        stopping = self.stop_requested and not self.stop_scheduled
        if rt.rank == 0 and (stopping or (self.every and rt.tokens * rt.job.M >= self.next)):
            # The first all-reduce rank 0 has not joined yet (it may have started some already:
            # eager updates and Streaming DiLoCo's overlap): nobody can finish it before
            # rank 0 joins it, which it does after it has said so.
            at = self.reduces + len([h for h in self.outstanding
                                     if h.state.get("group") == tuple(range(rt.job.M))]) + 1
            rt.store.set(f"{_AT}/{at}", "1")  # one key per cut: a later one never hides it
            if stopping:  # every rank stops after this one, whether or not it got the signal
                rt.store.set(f"{_STOP}/{at}", "1")
                self.stop_scheduled = True
            if self.every:
                self.next = (rt.tokens * rt.job.M // self.every + 1) * self.every
        if rt.store.check([f"{_AT}/{self.reduces}"]):
            self.due = self.reduces

    def replayed(self, tensors) -> Handle:
        """An all-reduce during a replay: what the original run got, if small, else zeros of
        the right shapes (the restore overwrites whatever is kept)."""
        handle = Handle("all_reduce", done=True)
        if sum(t.numel() for t in tensors) <= SMALL:
            values = self.replay["exchanged"].popleft()
            handle.result = [torch.tensor(v, dtype=t.dtype, device=t.device).view(t.shape)
                             for v, t in zip(values, tensors)]
            self.exchanged.append(values)
        else:
            handle.result = [torch.zeros_like(t) for t in tensors]
        return handle

    def after(self, value) -> None:
        """After every primitive, before its result `value` goes back to the process: count
        it; at the end of a replay restore, or save when a checkpoint is due. (The process
        is suspended at that primitive, and `value` is part of what it holds.)"""
        self.events += 1
        if self.replay is not None and self.events == self.replay["events"]:
            self._restore(value)
        elif self.due:
            cut, self.due = self.due, 0
            self.save(value, cut)

    # -- saving --------------------------------------------------------------------------------
    def save(self, value, cut: int) -> None:
        rt = self.rt
        for handle in list(self.outstanding):
            rt._wait(handle)  # every rank started the same ones
        self.due = 0  # (completing them may have asked again)
        tensors, meta = self._state(value)
        # One file set per checkpoint: a rank that dies while the others save (before rank 0
        # has named this checkpoint in real.json) must leave the previous one whole.
        save_run_state(rt.out, tensors, meta, name=f"rank{rt.rank}-{self.reduces}")
        self._forget_all_but(self.saved[-1:] + [self.reduces])
        self.saved.append(self.reduces)
        key = f"locotrain/checkpoint/{self.reduces}"
        rt.store.set(f"{key}/{rt.rank}", "1")
        if rt.rank == 0:
            rt.store.wait([f"{key}/{r}" for r in range(len(rt.procs))],
                          timedelta(seconds=rt.cfg.runtime.timeout_s))
            name_checkpoint(rt, "reduces", self.reduces)
        if rt.store.check([f"{_STOP}/{cut}"]):
            raise StoppedAtCheckpoint(rt.rank == 0)

    def _forget_all_but(self, keep: list[int]) -> None:
        """Delete this rank's older checkpoints. The one before the newest is kept: when any
        rank writes checkpoint c, rank 0 has named c's predecessor in real.json (it does so
        before joining the all-reduce that leads to c), but c itself may never be named."""
        forget_all_but(self.rt, f"rank{self.rt.rank}-", keep)

    def _state(self, value) -> tuple[dict, dict]:
        rt = self.rt
        tensors, meta = capture(rt, self._roots(value), copy=False)
        meta |= {"events": self.events, "reduces": self.reduces, "exchanged": self.exchanged,
                 "counters": {k: getattr(rt, k) for k in ("tokens", "inner_steps",
                                                          "collective_bytes", "collective_inter",
                                                          "peak_payload")}}
        return tensors, meta

    def _roots(self, value) -> list:
        rt = self.rt
        last = rt.recorder.last[0] if rt.recorder and rt.recorder.last else None
        return [rt.gen, self.outstanding, last, value]

    # -- resuming ------------------------------------------------------------------------------
    def resume(self) -> None:
        """Before the first primitive: load this rank's checkpoint and replay up to it."""
        rt = self.rt
        at, tensors, meta = load_named(rt, "reduces", "")
        self.saved = [at]
        self.replay = {"events": meta["events"], "tensors": tensors, "meta": meta,
                       "exchanged": deque(meta["exchanged"])}
        self.exchanged = []
        rt.engine.replaying = True

    def _restore(self, value) -> None:
        rt, tensors, meta = self.rt, self.replay["tensors"], self.replay["meta"]
        self.replay = None
        rt.engine.replaying = False
        restore(rt, self._roots(value), tensors, meta)
        for k, v in meta["counters"].items():
            setattr(rt, k, v)
        self.reduces, self.exchanged = meta["reduces"], meta["exchanged"]
        self.next = (rt.tokens * rt.job.M // self.every + 1) * self.every if self.every else 0

    @property
    def replaying(self) -> bool:
        return self.replay is not None


# -- what both kinds of real checkpoint do (this file's and dist_snapshot.py's) ---------------
def capture(rt, roots: list, copy: bool) -> tuple[dict, dict]:
    """Every tensor the process holds (reachable from `roots`), its worker's engine state, its
    random stream, and on the process that records the metrics their state and length.
    `copy`: on the cpu, for a process that carries on before it saves."""
    def keep(t):
        return t.detach().to("cpu", copy=True) if copy else t

    walked = snapshot.tensors_in(roots)
    tensors = {f"walk/{i}": keep(t) for i, t in enumerate(walked)}
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"shapes": snapshot.shapes(walked)}
    if rt.row is not None:
        engine, meta["engine"] = rt.engine.state([rt.row])
        tensors |= {f"engine/{k}": keep(v) for k, v in engine.items()}
    if rt.recorder is not None:
        metrics = rt.out / "metrics.jsonl"
        meta["recorder"] = rt.recorder.state()
        meta["metrics_bytes"] = metrics.stat().st_size if metrics.exists() else 0
    return tensors, meta


def restore(rt, roots: list, tensors: dict, meta: dict) -> None:
    """Put `capture`'s values back into a replayed process that reached the same point."""
    walked = snapshot.tensors_in(roots)
    if snapshot.shapes(walked) != meta["shapes"]:
        raise UserError(f"cannot resume '{rt.out}': rank {rt.rank}'s replay did not reach "
                        "the checkpointed state")
    with torch.no_grad():
        for i, t in enumerate(walked):
            t.copy_(tensors[f"walk/{i}"])
    if rt.row is not None:
        engine = {k.removeprefix("engine/"): v for k, v in tensors.items() if k.startswith("engine/")}
        rt.engine.load_state([rt.row], engine, meta["engine"])
    if "recorder" in meta:
        rt.recorder.load_state(meta["recorder"])
    rt.spans, rt.wall_per_step = [], []  # wall-clock records start again at the resume
    torch.set_rng_state(tensors["rng/torch"])


def name_checkpoint(rt, key: str, n: int) -> None:
    """real.json: checkpoint n (`key`: what n counts) is the one to resume from."""
    config = (rt.out / "config.toml").read_bytes()
    atomic_write(rt.out / STATE_DIR / MANIFEST, json.dumps({
        "world": len(rt.procs), key: n, "config_sha256": hashlib.sha256(config).hexdigest()}))


def load_named(rt, key: str, tag: str) -> tuple[int, dict, dict]:
    """(n, tensors, meta) of this rank's part of the checkpoint real.json names (files
    rank<r>-<tag><n>); the metrics file is cut back to where that checkpoint left it."""
    manifest = rt.out / STATE_DIR / MANIFEST
    if not manifest.is_file():
        raise UserError(f"'{rt.out}' holds no checkpoint of a real run ({STATE_DIR}/{MANIFEST})")
    try:
        n = int(json.loads(manifest.read_text())[key])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint in '{rt.out}' is corrupt ({MANIFEST}: {e}); re-run "
                        "training or restore the folder") from None
    tensors, meta = load_run_state(rt.out, name=f"rank{rt.rank}-{tag}{n}")
    if "metrics_bytes" in meta:
        with open(rt.out / "metrics.jsonl", "r+b") as f:
            f.truncate(meta["metrics_bytes"])
    return n, tensors, meta


def forget_all_but(rt, prefix: str, keep: list[int]) -> None:
    """Delete this rank's checkpoint files `prefix`<n>... whose n is not in `keep`."""
    for f in (rt.out / STATE_DIR).glob(f"{prefix}*"):
        n = f.name.removeprefix(prefix).split("-")[0].split(".")[0]
        if n.isdigit() and int(n) not in keep:
            f.unlink()


def real_checkpoint(out: Path) -> bool:
    return (Path(out) / STATE_DIR / MANIFEST).is_file()
