"""One pipeline stage's process (pipeline/distributed.py runs one per rank): its weights, its
two links, and one step of an order of operations, timed.

A link direction is a _Wire (direct over its process group, or staged through host memory);
receives are posted ahead by an _Inbox; the operations' times come from a _Timer (CUDA events
on GPUs). distributed.py's docstring says why a group per direction and why a dry step first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..models.backbone import init_params, rotary_tables
from .inprocess import _storage_bytes
from .schedules import Op
from .stages import Ops, split_blocks, stage_forward, stage_param_names, weight_grads

if TYPE_CHECKING:
    from .distributed import Job, Run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Wire:
    """One direction of one link as one end uses it: the peer, the group, and how a message
    travels. Direct: the tensor itself goes over the group (NCCL on GPUs, gloo on the cpu).
    Staged: copied to host memory, sent over a gloo group, copied back to the device; the
    copies belong to the link, not to the operations (the sender's copy is made after its
    operation's timer stopped, the receiver's before its operation's timer starts)."""

    def __init__(self, peer: int, group, device: torch.device, staged: bool):
        self.peer, self.group, self.device, self.staged = peer, group, device, staged

    def irecv(self, shape, dtype) -> tuple:
        """(buffer, work) of a receive posted now."""
        if self.staged:
            buf = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
        return buf, dist.irecv(buf, self.peer, group=self.group)

    def arrived(self, buf: torch.Tensor, work) -> torch.Tensor:
        """The message on this stage's device, once it is there (on the device, the current
        stream waits for it; staged, the host waits for gloo and queues the copy)."""
        work.wait()
        if not self.staged:
            return buf
        # from pinned memory the copy is queued on the current stream; the caching host
        # allocator keeps the pinned block until the copy is done
        return buf.to(self.device, non_blocking=True, copy=True)

    def isend(self, t: torch.Tensor) -> tuple:
        """(work, what must live until the work is done) of a send posted now."""
        if self.staged:  # the host waits for the computation that made t, then copies
            t = t.detach().to("cpu", copy=True)
        return dist.isend(t, self.peer, group=self.group), t

    def send(self, t: torch.Tensor) -> None:
        work, _ = self.isend(t)
        work.wait()

    def recv(self, shape, dtype) -> torch.Tensor:
        return self.arrived(*self.irecv(shape, dtype))


class _NoWire:
    """The dry step's link: zeros arrive, sends go nowhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def irecv(self, shape, dtype) -> tuple:
        return torch.zeros(shape, dtype=dtype, device=self.device), None

    def arrived(self, buf: torch.Tensor, work) -> torch.Tensor:
        return buf

    def isend(self, t: torch.Tensor) -> tuple:
        return None, t


class _Inbox:
    """The receives of one direction of one link, posted in micro-batch order, `ahead` at a
    time, so a message can land while the stage computes."""

    def __init__(self, wire, shape, dtype, m: int, ahead: int):
        self.wire, self.shape, self.dtype = wire, shape, dtype
        self.m, self.ahead, self.next = m, ahead, 0
        self.posted: deque = deque()
        self._post()

    def _post(self) -> None:
        while self.next < self.m and len(self.posted) < self.ahead:
            self.posted.append((self.next, *self.wire.irecv(self.shape, self.dtype)))
            self.next += 1

    def take(self, i: int) -> torch.Tensor:
        """Micro-batch i's message, once it is there; `refill` posts the next receive."""
        j, buf, work = self.posted.popleft()
        if j != i:  # the sender sends in micro-batch order; the schedules use them in order
            raise RuntimeError(f"micro-batch {i} used before {j} on the link from stage "
                               f"{getattr(self.wire, 'peer', '?')}: the schedule must use "
                               f"them in order")
        return self.wire.arrived(buf, work)

    def refill(self) -> None:
        self._post()

    def done(self) -> bool:
        return self.next == self.m and not self.posted


class _Timer:
    """Durations of operations: CUDA events on a GPU (the host runs ahead), else the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, start, op: Op) -> None:
        if not self.cuda:
            self.spans.append((op, time.perf_counter() - start))
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.spans.append((op, start, ev))

    def collect(self) -> list[tuple[Op, float]]:
        """After the step has been synchronised."""
        if not self.cuda:
            out = self.spans
        else:
            out = [(op, a.elapsed_time(b) / 1e3) for op, a, b in self.spans]
        self.spans = []
        return out


@dataclass
class _StepState:
    """What one step keeps per micro-batch, and its peaks."""
    inp: dict = field(default_factory=dict)  # stage input (requires grad), s > 0
    out: dict = field(default_factory=dict)  # stage output, or the loss on the last stage
    kept: dict = field(default_factory=dict)  # 2BP's (name, input, output gradient) per weight
    graph_bytes: dict = field(default_factory=dict)  # saved-for-backward bytes per micro-batch
    held: int = 0
    peak_held: int = 0
    peak_bytes: int = 0


class Stage:
    def __init__(self, job: Job, s: int, device: torch.device, links: list[tuple]):
        spec, S = job.spec, job.stages
        self.job, self.spec, self.S, self.s, self.m = job, spec, S, s, job.micro_batches
        self.device, self.dtype = device, DTYPES[job.dtype]
        gen = torch.Generator().manual_seed(job.seed)
        params = job.params if job.params is not None else init_params(spec, gen)
        self.weights = {n: params[n].detach().to(device, self.dtype).clone().requires_grad_(True)
                        for n in stage_param_names(spec, S, s)}
        self.shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        self.skip = {w.untyped_storage().data_ptr() for w in self.weights.values()}
        batch = job.batch if job.batch is not None else torch.randint(
            0, spec.vocab_in, (self.m, job.micro_batch, spec.seq_len + 1), generator=gen)
        self.batch = batch.to(device)
        self.rotary = rotary_tables(spec, device)
        self.msg_shape = (job.micro_batch, spec.seq_len, spec.width)
        self.message_bytes = job.micro_batch * spec.seq_len * spec.width * self.dtype.itemsize
        # links[l] = (activations l -> l+1, gradients l+1 -> l)
        staged = job.transport == "gloo"
        self.fwd_in = _Wire(s - 1, links[s - 1][0], device, staged) if s > 0 else None
        self.bwd_out = _Wire(s - 1, links[s - 1][1], device, staged) if s > 0 else None
        self.fwd_out = _Wire(s + 1, links[s][0], device, staged) if s < S - 1 else None
        self.bwd_in = _Wire(s + 1, links[s][1], device, staged) if s < S - 1 else None
        self.blocks = split_blocks(spec.depth, S)[s]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_link(self, warm: int = 3, reps: int = 20) -> dict[int, float]:
        """One-way time of one activation-sized message on each link this stage sends on,
        from a ping-pong (activation forward, gradient back): {link: seconds}."""
        out = {}
        for l in range(self.S - 1):
            if self.s not in (l, l + 1):
                continue
            ping = torch.zeros(self.msg_shape, dtype=self.dtype, device=self.device)
            for k in range(warm + reps):
                if k == warm:
                    self._sync()
                    t0 = time.perf_counter()
                if self.s == l:
                    self.fwd_out.send(ping)
                    self.bwd_in.recv(self.msg_shape, self.dtype)
                else:
                    self.bwd_out.send(self.fwd_in.recv(self.msg_shape, self.dtype))
            self._sync()
            if self.s == l:
                out[l] = (time.perf_counter() - t0) / reps / 2
        return out

    # -- one run: steps of the given order, timed

    def run(self, run: Run, order: list[Op], meta) -> dict:
        timer = _Timer(self.device)
        step_s, ops, peak_mem = [], [], None
        first = None
        # every kernel of the run loaded before any receive waits on the GPU (module docstring)
        self.step(run, order, _Timer(self.device), measure=False, dry=True)
        for k in range(run.warmup + run.steps):
            if k == run.warmup and self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._sync()
            dist.barrier(group=meta)
            t0 = time.perf_counter()
            loss, grads, st = self.step(run, order, timer, measure=k == 0)
            self._sync()
            t1 = time.perf_counter()
            spans = timer.collect()
            if k == 0:
                first = st
            if k >= run.warmup:
                step_s.append(t1 - t0)
                ops += spans
        if self.device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(self.device)
        op_s, per_mb = self._op_times(ops, run.steps)
        return {"stage": self.s, "blocks": [self.blocks.start, self.blocks.stop],
                "order": [str(op) for op in order], "step_s": step_s, "op_s": op_s,
                "per_mb_s": per_mb, "loss": float(loss), "peak_held": first.peak_held,
                "state_bytes": first.peak_bytes, "max_memory_allocated": peak_mem,
                "grads": {n: g.detach().float().cpu() for n, g in grads.items()}
                if self.job.keep_grads else {}}

    def _op_times(self, spans, steps: int) -> tuple[dict, dict]:
        """Mean seconds per micro-batch of each kind of operation, overall and per micro-batch
        (a p2 over several micro-batches is shared among them equally)."""
        per_mb: dict[str, list[float]] = {}
        for op, sec in spans:
            row = per_mb.setdefault(op.kind, [0.0] * self.m)
            for i in op.mbs:
                row[i] += sec / len(op.mbs) / steps
        return ({k: sum(v) / self.m for k, v in per_mb.items()}, per_mb)

    # -- one step

    def step(self, run: Run, order: list[Op], timer: _Timer, measure: bool, dry: bool = False):
        """One step of `order`; `dry`: without communication (zeros arrive, nothing is sent)."""
        S, s, m = self.S, self.s, self.m
        stash = run.mode == "stash"
        none = _NoWire(self.device)
        fwd_in, bwd_in = (none, none) if dry else (self.fwd_in, self.bwd_in)
        fwd_out, bwd_out = (none, none) if dry else (self.fwd_out, self.bwd_out)
        args = (self.msg_shape, self.dtype, m, self.job.prefetch)
        fwd = _Inbox(fwd_in, *args) if s > 0 else None
        bwd = _Inbox(bwd_in, *args) if s < S - 1 else None
        sends: list = []  # (work, tensor): a tensor lives until its send is done
        st = _StepState()
        grads: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        for w in self.weights.values():
            w.grad = None

        def free(i: int) -> None:
            for d in (st.inp, st.out, st.kept, st.graph_bytes):
                d.pop(i, None)

        for op in order:
            i = op.mbs[0]
            # An operation's time is all this stage does for it once its input is there:
            # posting the next receive and the arithmetic. The wait for the input and the
            # send are left out: they are the link's, the time model's business.
            if op.kind == "F":
                x = self.batch[i, :, :-1] if s == 0 else fwd.take(i).requires_grad_(True)
            elif op.kind in ("B", "P1"):
                g = bwd.take(i) if s < S - 1 else None
            t = timer.start()
            for inbox in (fwd, bwd):
                if inbox is not None:
                    inbox.refill()
            if op.kind == "F":
                y = self._forward(st, i, x, stash, measure)
                st.inp[i], st.out[i] = x, y
                st.held += 1
                if s == S - 1:
                    loss += y.detach().float()
            elif op.kind in ("B", "P1"):
                # plain: input and weight gradients at once; stash: the weights' Ops keep
                # (input, output gradient) instead, so this computes p1 only
                torch.autograd.backward(st.out[i], g)
                if s > 0:
                    gx = st.inp[i].grad.contiguous()
                if op.kind == "B":
                    st.held -= 1
                    free(i)
                else:  # the graph is gone; the stash holds what p2 needs
                    st.graph_bytes[i] = 0
                    st.inp.pop(i, None), st.out.pop(i, None)
            else:  # P2
                weight_grads([e for j in op.mbs for e in st.kept[j]], self.shapes, run.concat,
                             into=grads)
                st.held -= len(op.mbs)
                for j in op.mbs:
                    free(j)
            timer.stop(t, op)
            if op.kind == "F" and s < S - 1:
                sends.append(fwd_out.isend(y.detach()))
            elif op.kind in ("B", "P1") and s > 0:
                sends.append(bwd_out.isend(gx))
            sends = [(w, buf) for w, buf in sends if w is not None and not w.is_completed()]
            if measure:
                st.peak_bytes = max(st.peak_bytes, self._live_bytes(st))
            st.peak_held = max(st.peak_held, st.held)
        for w, _ in sends:
            w.wait()
        assert (fwd is None or fwd.done()) and (bwd is None or bwd.done())
        if not stash:
            grads = {n: w.grad for n, w in self.weights.items() if w.grad is not None}
        return loss.item(), grads, st

    def _forward(self, st: _StepState, i: int, x, stash: bool, measure: bool):
        targets = self.batch[i, :, 1:] if self.s == self.S - 1 else None
        st.kept[i] = [] if stash else None
        ops = Ops(st.kept[i])
        if not measure:
            return stage_forward(self.spec, self.weights, self.S, self.s, x, self.rotary, ops,
                                 targets, 1.0 / self.m)
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = stage_forward(self.spec, self.weights, self.S, self.s, x, self.rotary, ops,
                              targets, 1.0 / self.m)
        st.graph_bytes[i] = _storage_bytes(saved, self.skip)
        return y

    def _live_bytes(self, st: _StepState) -> int:
        """As inprocess.py counts: saved-for-backward tensors of the live graphs plus 2BP's
        kept pairs (weights excluded)."""
        total = sum(st.graph_bytes.values())
        for entries in st.kept.values():
            if entries:
                total += _storage_bytes([t for e in entries for t in e[1:]], self.skip)
        return total
