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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models.backbone import Backbone
from .schedules import SCHEDULES, Op
from .stage_process import DTYPES, Stage
from .timeline import P2_POLICIES, Link, Pipeline, StageTimes, simulate

MODES = ("plain", "stash")
TRANSPORTS = ("nccl", "gloo")


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


if __name__ == "__main__":
    sys.exit(main())
