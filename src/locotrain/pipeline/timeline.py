"""The pipeline time model: when every forward, backward and message of one training step
happens, for R pipelines of S stages (data-parallel replicas) joined by modelled links.

What is modelled (docs/pipelines.md has the full list of assumptions):

* A device runs its stage's operations one at a time, in the schedule's order
  (schedules.py). An operation starts when the device is free and its input is there: a
  forward needs the activation from the previous stage, a backward (or 2BP's p1) the
  activation-gradient from the next stage (the last stage's backward needs only its own
  forward), a p2 only its own p1. Each has a fixed duration per micro-batch, plus an optional
  per-call overhead (kernel launches, which concatenating 2BP's p2 calls saves).
* A message between consecutive stages of one pipeline takes latency + 8 bytes / bandwidth
  on an idle link. Each direction of a link is a FIFO pipe: a message starts draining when
  the previous one in the same direction has drained (full duplex, so activations going
  forward and gradients coming back do not delay each other). Links of different device
  pairs do not share capacity: this is the per-pair measured latency/bandwidth model of Yuan
  et al. (arXiv 2206.01288), not runtime/network.py's shared WAN pipes between regions.
* With 2BP under the "end" policy p2 runs where the schedule puts it (after the stage's last
  p1). Under the "fill" policy a device that would otherwise wait (its next operation's input
  has not arrived) runs a pending p2 instead, greedily and without preemption; the p2s still
  pending at the end run last (concatenated into one call if asked).
* After the last weight gradient of every replica of stage s, the stage's data-parallel
  group all-reduces its gradients, taking `allreduce_s[s]` (the caller's ring closed form).
  The step ends when the last all-reduce does.

Events are processed in order of start time from a heap (a hand-written loop, not SimPy: the
model is one queue per device and per link, and deciding to fill a gap needs exactly "is the
input here yet at time t", which this order answers).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from .schedules import Op, stage_order

P2_POLICIES = ("end", "fill")


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0
    gbps: float = math.inf  # Gbit/s (1e9 bit/s); inf is a free link

    def transfer_s(self, nbytes: float) -> float:
        return 0.0 if self.gbps == math.inf else 8.0 * nbytes / (self.gbps * 1e9)


@dataclass(frozen=True)
class StageTimes:
    """Seconds per micro-batch on one device: forward, and the backward's two halves."""
    forward: float
    p1: float  # gradient w.r.t. the stage input (critical path)
    p2: float  # gradient w.r.t. the stage weights (deferrable)

    @property
    def backward(self) -> float:
        return self.p1 + self.p2


@dataclass
class Pipeline:
    """R pipelines (replicas) of S stages; times[r][s], links[r][s] joins stage s and s+1."""
    times: list[list[StageTimes]]
    links: list[list[Link]]
    m: int  # micro-batches per pipeline per step
    message_bytes: float = 0.0  # one activation or activation-gradient message
    allreduce_s: list[float] | None = None  # per stage, after its last weight gradient
    names: list[list[str]] | None = None  # device labels for the Gantt chart

    @property
    def R(self) -> int:
        return len(self.times)

    @property
    def S(self) -> int:
        return len(self.times[0])

    @classmethod
    def uniform(cls, S: int, m: int, forward: float, p1: float, p2: float, *, R: int = 1,
                link: Link = Link(), message_bytes: float = 0.0, allreduce_s: float = 0.0):
        """Equal stages on equal links: the textbook case the tests draw by hand."""
        return cls([[StageTimes(forward, p1, p2)] * S for _ in range(R)],
                   [[link] * (S - 1) for _ in range(R)], m, message_bytes, [allreduce_s] * S)


@dataclass(frozen=True)
class Span:
    replica: int
    stage: int
    kind: str  # F, B, P1, P2, or AR (the data-parallel all-reduce)
    mbs: tuple[int, ...]
    start: float
    end: float


@dataclass(frozen=True)
class Message:
    replica: int
    src: int  # stage
    dst: int
    mb: int
    start: float  # starts draining
    arrive: float


@dataclass
class Timeline:
    spans: list[Span]
    messages: list[Message]
    step_time_s: float  # including the data-parallel all-reduces
    pipeline_time_s: float  # end of the last compute operation
    bubble_fraction: float  # idle share of all devices' compute time up to pipeline_time_s
    busy_s: list[list[float]]  # [replica][stage], compute only
    peak_held: list[list[int]]  # micro-batches with any saved state (activations or p2 inputs)
    peak_awaiting_p1: list[list[int]]  # micro-batches whose activations wait for B or P1
    names: list[list[str]] = field(default_factory=list)

    def order(self, replica: int, stage: int) -> list[Op]:
        """The operations one device ran, in the order it ran them."""
        return [Op(s.kind, s.mbs) for s in self.spans
                if (s.replica, s.stage) == (replica, stage) and s.kind != "AR"]

    def peak_held_per_stage(self) -> list[int]:
        return [max(col) for col in zip(*self.peak_held)]


class _Device:
    def __init__(self, order: list[Op]):
        self.todo = list(order)
        self.free = 0.0
        self.version = 0  # bumps whenever its heap entry is out of date
        self.done_p1: list[int] = []  # micro-batches whose p1 ran but not yet their p2
        self.p2_scheduled: set[int] = set()


def simulate(pipe: Pipeline, schedule: str = "gpipe", *, twobp: bool = False, p2: str = "end",
             concat: bool = False, op_overhead_s: float = 0.0,
             orders: list[list[Op]] | None = None) -> Timeline:
    """Run the time model for one training step. `orders`, one list of operations per stage
    (the same for every replica), replaces the schedule's order and its p2 policy: the model
    then times an order given from outside, e.g. the one a real run executed."""
    if p2 not in P2_POLICIES:
        raise ValueError(f"unknown p2 policy '{p2}'; known: {', '.join(P2_POLICIES)}")
    R, S, m = pipe.R, pipe.S, pipe.m
    fill = twobp and p2 == "fill" and orders is None
    devs = {(r, s): _Device(list(orders[s]) if orders is not None else
                            stage_order(schedule, S, m, s, twobp, concat and not fill))
            for r in range(R) for s in range(S)}
    arrived: dict[tuple, float] = {}  # (r, s, kind "F"/"B", mb) -> when its input is there
    link_free: dict[tuple, float] = {}  # (r, src, dst) -> when that direction drains
    spans: list[Span] = []
    messages: list[Message] = []
    heap: list[tuple[float, int, int, int, int]] = []
    index = {key: i for i, key in enumerate(devs)}

    def duration(r: int, s: int, op: Op) -> float:
        t = pipe.times[r][s]
        work = {"F": t.forward, "B": t.backward, "P1": t.p1, "P2": t.p2 * len(op.mbs)}[op.kind]
        return work + op_overhead_s

    def ready(r: int, s: int, op: Op) -> float | None:
        """When op's input is there; None while it is not known yet."""
        if op.kind == "F":
            return 0.0 if s == 0 else arrived.get((r, s, "F", op.mbs[0]))
        if op.kind in ("B", "P1"):
            return 0.0 if s == S - 1 else arrived.get((r, s, "B", op.mbs[0]))
        return 0.0  # P2 follows its own P1 on the same device

    def next_op(key) -> tuple[float, Op] | None:
        d = devs[key]
        if fill and d.p2_scheduled:  # drop the p2s already run early to fill a gap
            d.todo = [op for op in d.todo if op.kind != "P2" or op.mbs[0] not in d.p2_scheduled]
        if fill and d.todo and all(op.kind == "P2" for op in d.todo):
            left = tuple(i for op in d.todo for i in op.mbs)
            d.todo = [Op("P2", left)] if concat else [Op("P2", (i,)) for i in left]
        if not d.todo:
            return None
        op = d.todo[0]
        t = ready(*key, op)
        if fill and (t is None or t > d.free):
            early = [i for i in d.done_p1 if i not in d.p2_scheduled]
            if early and op.kind != "P2":
                return d.free, Op("P2", (early[0],))
        return None if t is None else (max(d.free, t), op)

    def push(key) -> None:
        d = devs[key]
        d.version += 1
        nxt = next_op(key)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], index[key], d.version, *key))

    def send(r: int, src: int, dst: int, mb: int, kind: str, t: float) -> None:
        link = pipe.links[r][min(src, dst)]
        start = max(t, link_free.get((r, src, dst), 0.0))
        drained = start + link.transfer_s(pipe.message_bytes)
        link_free[(r, src, dst)] = drained
        arrived[(r, dst, kind, mb)] = drained + link.latency_s
        messages.append(Message(r, src, dst, mb, start, drained + link.latency_s))
        push((r, dst))

    for key in devs:
        push(key)
    while heap:
        start, _, version, r, s = heapq.heappop(heap)
        d = devs[(r, s)]
        if version != d.version:
            continue
        _, op = next_op((r, s))
        if d.todo and d.todo[0] == op:
            d.todo.pop(0)
        end = start + duration(r, s, op)
        spans.append(Span(r, s, op.kind, op.mbs, start, end))
        d.free = end
        if op.kind == "P1":
            d.done_p1.append(op.mbs[0])
        if op.kind == "P2":
            d.p2_scheduled.update(op.mbs)
        if op.kind == "F" and s < S - 1:
            send(r, s, s + 1, op.mbs[0], "F", end)
        if op.kind in ("B", "P1") and s > 0:
            send(r, s, s - 1, op.mbs[0], "B", end)
        push((r, s))
    left = [key for key, d in devs.items() if d.todo]
    if left:
        raise RuntimeError(f"schedule deadlocked; devices {left} never got their inputs")
    return _summarise(pipe, spans, messages)


def _summarise(pipe: Pipeline, spans: list[Span], messages: list[Message]) -> Timeline:
    R, S = pipe.R, pipe.S
    pipeline_end = max(sp.end for sp in spans)
    busy = [[0.0] * S for _ in range(R)]
    for sp in spans:
        busy[sp.replica][sp.stage] += sp.end - sp.start
    # the data-parallel all-reduce of stage s starts after every replica's last op on s
    step_end = pipeline_end
    for s in range(S):
        t_ar = (pipe.allreduce_s or [0.0] * S)[s]
        if R > 1 and t_ar > 0:
            start = max(sp.end for sp in spans if sp.stage == s)
            for r in range(R):
                spans.append(Span(r, s, "AR", (), start, start + t_ar))
            step_end = max(step_end, start + t_ar)
    idle = 1.0 - sum(map(sum, busy)) / (R * S * pipeline_end) if pipeline_end > 0 else 0.0
    held, awaiting = _peaks(spans, R, S)
    return Timeline(spans, messages, step_end, pipeline_end, idle, busy, held, awaiting,
                    pipe.names or [])


def _peaks(spans: list[Span], R: int, S: int) -> tuple[list[list[int]], list[list[int]]]:
    """Peak micro-batches held per device. A micro-batch is held from the start of its forward
    to the end of the op that finishes its weight gradient (B, or the P2 that covers it); it
    awaits p1 until its B or P1 ends. At equal times a release comes before an acquisition:
    the device is sequential, so the op that frees memory ended before the next one began."""
    held = [[0] * S for _ in range(R)]
    awaiting = [[0] * S for _ in range(R)]
    for r in range(R):
        for s in range(S):
            ev_held, ev_wait = [], []
            for sp in spans:
                if (sp.replica, sp.stage) != (r, s):
                    continue
                n = len(sp.mbs)
                if sp.kind == "F":
                    ev_held.append((sp.start, 1, 1))
                    ev_wait.append((sp.start, 1, 1))
                elif sp.kind in ("B", "P2"):
                    ev_held.append((sp.end, 0, -n))
                if sp.kind in ("B", "P1"):
                    ev_wait.append((sp.end, 0, -1))
            held[r][s] = _running_max(ev_held)
            awaiting[r][s] = _running_max(ev_wait)
    return held, awaiting


def _running_max(events: list[tuple[float, int, int]]) -> int:
    level = peak = 0
    for _, _, delta in sorted(events):
        level += delta
        peak = max(peak, level)
    return peak
