"""2BP for real over torch.distributed: one process per pipeline stage.

    python -m locotrain.pipeline.distributed JOB.pt RESULT.pt    # one rank; spawn.py starts them

Each rank holds one stage of the char GPT (stages.py) and runs, step after step, exactly the
operations the time model (timeline.py) orders for its stage: 1F1B or GPipe, plain or with
2BP's split backward (Rae, Lee, Richings, arXiv 2405.18047) in the "stash" mode of
stages.Ops, the deferred weight gradients (p2) at the end of the step or, under p2 = fill,
wherever the model puts them to fill a wait. Activations travel forward and activation
gradients backward with isend/irecv; gloo on CPU, NCCL on GPUs, or (transport = "gloo") gloo
on GPUs too, each message staged through host memory.

Why one process group per link and direction: NCCL runs all point-to-point operations of one
communicator on one CUDA stream, in the order they were posted. Were activations and gradients
between stages s and s+1 posted on one communicator, a stage that posts "send activation 2,
then receive gradient 1" while its neighbour posts "send gradient 1, then receive activation
2" would wait on each other forever (the classic 1F1B deadlock that Megatron-LM avoids by
pairing sends and receives in one batched call). With a group per direction every stream
carries only sends or only receives, in micro-batch order on both ends, whatever the
schedule, so no order of operations can deadlock it; it is also what the time model assumes
(each direction of a link is its own FIFO pipe). The cost is 2(S-1) small groups.

Why every run starts with a step without communication (on every device; it matters on GPUs):
an NCCL receive posted ahead is a kernel that spins on the GPU until its peer's send arrives,
and PyTorch runs CUDA with lazy module loading (CUDA_MODULE_LOADING=LAZY): the first launch
of a kernel loads its module, and a load may need the whole context to synchronise, that is,
to wait for that spinning receive. Its sender is the neighbour, which needs this stage's
output first, so both ranks wait forever at the first launch of their first kernel (seen on
2 H200s: the host threads in F.embedding on stage 0 and in rms_norm on stage 1, first step
of the first run, while the blocking ping-pong before it, with no kernel launched while a
transfer waited, had finished). The stream order itself has no cycle: per link direction
one stream, sends and receives in micro-batch order at both ends. The dry step runs the
run's exact order and shapes with zeros for the received tensors and no sends, so every
kernel the run launches is loaded while no transfer is in flight; a barrier follows.
benchmarks/nccl_p2p_probe.py tries the pattern with and without it.

What a rank measures per run: wall time of every step (after a barrier, so the stages start
together; the step's time is the slowest stage's), the duration of every F, B, P1 and P2 (from
the moment its input is there to the end of its arithmetic, before its send: CUDA events on
GPUs, whose host runs ahead, the clock on the CPU; waiting for the input is not counted, nor
is the send), the micro-batches it holds state for, the bytes of that state as inprocess.py
counts them (tensors saved for backward plus what 2BP keeps between p1 and p2, in the first
step), and on GPUs torch.cuda.max_memory_allocated over the timed steps. Before the runs each
link is timed with a ping-pong of one activation-sized message (with the host copies under
transport = "gloo"). Rank 0 then feeds the measured stage and link times to the time model, on
the order the stages executed, and reports its predicted step time next to the measured one.

There is no optimizer step: a step is one pipeline flush of m micro-batches, which is the part
2BP changes.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models.backbone import Backbone, init_params, rotary_tables
from .inprocess import _storage_bytes
from .schedules import SCHEDULES, Op
from .stages import Ops, split_blocks, stage_forward, stage_param_names, weight_grads
from .timeline import P2_POLICIES, Link, Pipeline, StageTimes, simulate

MODES = ("plain", "stash")
TRANSPORTS = ("nccl", "gloo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Run:
    """One schedule: `warmup` untimed steps, then `steps` timed ones."""
    name: str
    schedule: str = "1f1b"
    mode: str = "plain"  # plain backward, or 2BP's "stash"
    p2: str = "end"  # where 2BP's p2 goes: "end" of the step, or "fill" the waits
    concat: bool = False  # one p2 call for all micro-batches
    steps: int = 1
    warmup: int = 0
    # The time model orders the operations; with unit stage times unless this names an earlier
    # 2BP run, whose measured stage and link times then decide where "fill" puts the p2s.
    plan_from: str | None = None


@dataclass
class Job:
    spec: Backbone
    stages: int
    micro_batches: int  # m
    micro_batch: int  # sequences per micro-batch
    runs: list[Run]
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL, one GPU per stage)
    dtype: str = "fp32"
    seed: int = 0
    params: dict[str, torch.Tensor] | None = None  # None: init_params from the seed
    batch: torch.Tensor | None = None  # (m, micro_batch, seq_len + 1); None: random tokens
    keep_grads: bool = False  # return every stage's gradients of the last step (tests)
    prefetch: int = 2  # receives posted ahead per link and direction
    # How messages travel: "nccl" device to device over the process group's backend (NCCL on
    # GPUs; the cpu has only gloo, which then carries them directly); "gloo": over gloo
    # groups, staged through host memory (device -> host copy, gloo, host -> device copy, all
    # part of the link's time), on GPUs a path without NCCL and slow like a real slow link.
    # On the cpu "gloo" copies each message too, so the staged path runs there as well.
    transport: str = "nccl"
    timeout_s: float = 300.0  # a collective or receive waiting longer fails the rank
    progress: bool = False  # rank 0 prints a line per run

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches * self.micro_batch * self.spec.seq_len


def check_job(job: Job, nproc: int) -> None:
    """Errors a user can cause, each one line, before any process is started."""
    S, depth = job.stages, job.spec.depth
    if S < 1:
        raise UserError(f"need at least 1 pipeline stage, got {S}")
    if S > depth:
        raise UserError(f"{S} stages for a model of {depth} blocks: every stage needs a block; "
                        f"use at most {depth} stages or a deeper model")
    if nproc != S:
        raise UserError(f"{S} stages need {S} processes (one per stage), got {nproc}; start "
                        f"{S} processes or cut the model into {nproc} stages")
    if job.device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got '{job.device}'")
    if job.transport not in TRANSPORTS:
        raise UserError(f"transport must be one of {', '.join(TRANSPORTS)}, got "
                        f"'{job.transport}'")
    if job.device == "cuda" and torch.cuda.device_count() < S:
        raise UserError(f"{S} stages on cuda need {S} GPUs, this machine has "
                        f"{torch.cuda.device_count()}; use fewer stages or the cpu")
    if job.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{job.dtype}'")
    if job.micro_batches < 1 or job.micro_batch < 1 or job.prefetch < 1:
        raise UserError("micro-batches, sequences per micro-batch and prefetch must be >= 1")
    if job.batch is not None and tuple(job.batch.shape) != (
            job.micro_batches, job.micro_batch, job.spec.seq_len + 1):
        raise UserError(f"batch of shape {tuple(job.batch.shape)}, expected (m, micro_batch, "
                        f"seq_len + 1) = ({job.micro_batches}, {job.micro_batch}, "
                        f"{job.spec.seq_len + 1})")
    seen: dict[str, Run] = {}
    for run in job.runs:
        if run.schedule not in SCHEDULES or run.mode not in MODES or run.p2 not in P2_POLICIES:
            raise UserError(f"run '{run.name}': schedule must be one of {SCHEDULES}, mode one "
                            f"of {MODES}, p2 one of {P2_POLICIES}")
        if run.mode == "plain" and (run.p2 != "end" or run.concat):
            raise UserError(f"run '{run.name}': p2 = fill and concat need the 2BP mode 'stash'")
        if run.steps < 1 or run.warmup < 0 or run.name in seen:
            raise UserError(f"run '{run.name}': needs steps >= 1, warmup >= 0, a unique name")
        source = seen.get(run.plan_from) if run.plan_from is not None else None
        if run.plan_from is not None and (source is None or source.mode != "stash"):
            raise UserError(f"run '{run.name}': plan_from must name an earlier 2BP (stash) run, "
                            f"got '{run.plan_from}'")
        seen[run.name] = run


# ---------------------------------------------------------------------------- one rank


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m locotrain.pipeline.distributed JOB.pt RESULT.pt", file=sys.stderr)
        return 2
    from ..runtime.launch import die_with_launcher

    die_with_launcher()  # a rank never outlives the process that spawned it
    job = torch.load(argv[0], weights_only=False)  # our own file, written by spawn.py
    try:
        result = run_rank(job)
    except UserError as e:
        print(f"locotrain pipeline: {e}", file=sys.stderr)
        return 2
    if result is not None:
        tmp = argv[1] + ".part"
        torch.save(result, tmp)
        os.replace(tmp, argv[1])
    return 0


def run_rank(job: Job) -> dict | None:
    """This process's stage, every run of the job; rank 0 returns the report, others None.
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment (torchrun's or
    spawn.py's)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_job(job, world)
    # `kill -USR1 PID` prints where this rank is: the way to see a pipeline that hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    timeout = timedelta(seconds=job.timeout_s)
    staged = job.transport == "gloo"
    if job.device == "cuda" and not staged:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use the tensor cores too
        # No device_id (lazy initialisation): each group's point-to-point operations get the
        # communicator of their pair of ranks. With a group per link direction either way is
        # safe (a group only ever carries one direction, in order), lazy is the plain one.
        dist.init_process_group("nccl", timeout=timeout)
        meta = dist.new_group(backend="gloo", timeout=timeout)  # small objects, barriers
    else:
        if job.device == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
        meta = dist.group.WORLD
    try:
        # every rank creates every group, in the same order (new_group is collective)
        backend = "gloo" if staged else None
        links = [(dist.new_group([l, l + 1], backend=backend),
                  dist.new_group([l, l + 1], backend=backend)) for l in range(world - 1)]
        stage = Stage(job, rank, device, links)
        timed = _gather(meta, stage.time_link())
        link_s = [timed[l][l] for l in range(world - 1)]  # as link l's sending end timed it
        reports: list[dict] = []
        for k, run in enumerate(job.runs):
            if job.progress and rank == 0:
                print(f"  run {k + 1}/{len(job.runs)} '{run.name}' ...", flush=True)
            pipe = _plan_pipeline(job, run, reports, link_s, stage.message_bytes)
            twobp = run.mode == "stash"
            plan = simulate(pipe, run.schedule, twobp=twobp, p2=run.p2, concat=run.concat)
            local = stage.run(run, plan.order(0, rank), meta)
            grads = local.pop("grads")
            stages = _gather(meta, local)
            report = _summarise(job, run, stages, link_s, stage.message_bytes)
            if job.keep_grads:
                every: list = [None] * world if rank == 0 else None
                dist.gather_object(grads, every, dst=0, group=meta)
                if rank == 0:
                    report["grads"] = {n: g for d in every for n, g in d.items()}
            reports.append(report)
            if job.progress and rank == 0:
                print(f"    step {report['step_s'] * 1e3:.2f} ms, "
                      f"{report['tokens_per_s']:,.0f} tokens/s; time model "
                      f"{report['predicted_step_s'] * 1e3:.2f} ms "
                      f"({report['prediction_rel_error']:+.1%})", flush=True)
        dist.barrier(group=meta)
        return {"link_one_way_s": link_s, "message_bytes": stage.message_bytes,
                "runs": reports} if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _gather(group, obj) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------- the time model


def _measured_times(report: dict) -> list[StageTimes]:
    """Per stage (forward, p1, p2) seconds per micro-batch; a plain B counts as p1 (with p2
    = 0 the model's backward is B, and without 2BP it never looks at the split)."""
    out = []
    for st in report["stages"]:
        t = st["op_s"]
        if "B" in t:
            out.append(StageTimes(t["F"], t["B"], 0.0))
        else:
            out.append(StageTimes(t["F"], t["P1"], t["P2"]))
    return out


def _link(one_way_s: float, message_bytes: int) -> Link:
    """A measured message time as the link's transfer time: it occupies the link's direction,
    as a message occupies its NCCL stream, so back-to-back messages queue."""
    if one_way_s <= 0:
        return Link()
    return Link(0.0, 8.0 * message_bytes / (one_way_s * 1e9))


def _plan_pipeline(job: Job, run: Run, reports: list[dict], link_s: list[float],
                   message_bytes: int) -> Pipeline:
    S, m = job.stages, job.micro_batches
    if run.plan_from is None:  # unit times, free links: the order inprocess.py runs
        return Pipeline.uniform(S, m, 1.0, 1.0, 1.0)
    source = next(r for r in reports if r["name"] == run.plan_from)
    return Pipeline([_measured_times(source)], [[_link(t, message_bytes) for t in link_s]], m,
                    message_bytes)


def _summarise(job: Job, run: Run, stages: list[dict], link_s: list[float],
               message_bytes: int) -> dict:
    """One run across the stages: the step is as long as its slowest stage; the time model is
    fed this run's measured stage times and the measured links."""
    steps = [max(st["step_s"][k] for st in stages) for k in range(run.steps)]
    step_s = statistics.median(steps)
    report = {"name": run.name, "schedule": run.schedule, "mode": run.mode, "p2": run.p2,
              "concat": run.concat, "plan_from": run.plan_from, "step_s": step_s,
              "step_s_all": steps, "tokens_per_s": job.tokens_per_step / step_s,
              "loss": stages[-1]["loss"], "stages": stages}
    pipe = Pipeline([_measured_times(report)], [[_link(t, message_bytes) for t in link_s]],
                    job.micro_batches, message_bytes)
    executed = [[Op(k, tuple(int(i) for i in mbs.split(",")))
                 for k, mbs in (op.split(":") for op in st["order"])] for st in stages]
    predicted = simulate(pipe, run.schedule, orders=executed)
    report["predicted_step_s"] = predicted.step_time_s
    report["prediction_rel_error"] = predicted.step_time_s / step_s - 1.0
    report["predicted_bubble"] = predicted.bubble_fraction
    return report


# ---------------------------------------------------------------------------- one stage


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


if __name__ == "__main__":
    sys.exit(main())
