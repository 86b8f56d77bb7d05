"""One plan: an algorithm on a cluster, simulated on phantom compute (docs/planner.md).

The simulator is the one `loco run` uses (runtime/sim.py, network.py); only the compute is
phantom (phantom.py) and, where workers are identical and synchronous, one process stands for
each class of them (`representatives`). What comes out is time and bytes: wall time, compute
utilisation, bytes sent, peak bandwidth per link.

Compute utilisation (CU) = pure compute time / wall time, averaged over workers (spec 12).
`utilization` is that over the whole simulated run; `compute_utilization` is that over the
steady state, the middle half of the run measured between two outer updates (the publishing
process's update marks at a quarter and three quarters of the run's updates), so that the
start (nothing to wait for yet) and the end (eager's last wait, streaming's final syncs) do
not bias it. The papers' bandwidth tables are steady-state numbers; --find-bandwidth uses it.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

from ..cluster import expand_preset
from ..config import Config
from ..errors import UserError
from ..models.backbone import Backbone
from ..runtime.engine import Engine
from ..runtime.sim import SimRuntime
from ..setup import build
from .phantom import PhantomWorkload, backbone_spec, layered_spec

# Algorithms whose workers run one program and meet only in all-reduces over all workers:
# identical workers among them stay identical, so a representative can stand for them.
# (hierarchical and adloco all-reduce in groups or send messages; the parameter-server
# methods interleave each worker's tasks at their servers: they always run in full.)
SYMMETRIC = {"ddp", "diloco", "streaming", "eager", "overlap_local_sgd"}


@dataclass
class PlanResult:
    variant: str
    wall_s: float  # simulated wall time of the run
    compute_utilization: float  # steady state (module docstring)
    utilization: float  # over the whole run
    bytes_sent: int
    bytes_inter_region: int
    peak_bandwidth_gbps: dict[str, float]  # per inter-region link (the highest rate carried)
    inner_steps: int
    tokens: int
    updates: int
    processes: int  # simulated processes (representatives count once)
    workers: int
    events: int  # of the event loop
    inter_gbps: float  # the inter-worker bandwidth it ran at (planner/bandwidth.py)
    projected_wall_s: float  # for all of train.tokens, at the steady state's pace
    timeline: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        out = dict(self.__dict__)
        out.pop("timeline")
        return out


# --------------------------------------------------------------------------- the model


def phantom_workload(cfg: Config) -> PhantomWorkload:
    """The phantom of `cfg`: [phantom] params/layers if given, else the architecture."""
    p, m = cfg.phantom, cfg.model
    if p.params < 0 or p.layers < 0 or p.embedding_params < 0 or p.vocab < 0:
        raise UserError("phantom.params, phantom.layers, phantom.embedding_params and "
                        "phantom.vocab must be >= 0")
    if p.params > 0:
        layers = p.layers or m.depth
        body = int(p.params) - 2 * int(p.embedding_params)
        if body < layers:
            raise UserError(f"phantom.params = {p.params:g} leaves fewer parameters than "
                            f"layers ({layers}) once the embedding and head take "
                            f"2 x {p.embedding_params:g}; raise phantom.params")
        spec = layered_spec(int(p.params), layers, m.seq_len, int(p.embedding_params))
        workload = PhantomWorkload(spec, cfg.train.batch_size)
        workload.depth = layers
        return workload
    if p.layers or p.embedding_params:
        raise UserError("the phantom model has no size: phantom.layers or "
                        "phantom.embedding_params is set but phantom.params is 0; set "
                        "phantom.params (e.g. 1e9), or drop them to derive the model from [model]")
    vocab = p.vocab or _corpus_vocab(cfg)
    causal = cfg.workload.name == "ar_gpt"
    backbone = Backbone(vocab_in=vocab + (0 if causal else 1), vocab_out=vocab, depth=m.depth,
                        width=m.width, heads=m.heads, seq_len=m.seq_len, causal=causal,
                        latent_input=not causal and cfg.workload.loopholing)
    workload = PhantomWorkload(backbone_spec(backbone), cfg.train.batch_size)
    workload.depth = m.depth
    return workload


def _corpus_vocab(cfg: Config) -> int:
    return _vocab_of(cfg.data.path, cfg.data.train_fraction)


@functools.lru_cache(maxsize=8)
def _vocab_of(path: str, fraction: float) -> int:
    """Reading the corpus is what a small plan spends most on; a search does it once."""
    from ..data import load_corpus

    return load_corpus(path, fraction).tokenizer.vocab_size


# --------------------------------------------------------------------------- a run


def with_rounds(cfg: Config) -> Config:
    """`plan.rounds` rounds of the algorithm (H inner steps each; one step for ddp) instead
    of all of train.tokens; the steady state needs a few, and a plan repeats for every
    bandwidth tried."""
    if cfg.plan.rounds < 0:
        raise UserError(f"plan.rounds must be >= 0 (0 = all of train.tokens), got {cfg.plan.rounds}")
    if cfg.plan.rounds == 0:
        return cfg
    cfg = copy.deepcopy(cfg)
    H = getattr(cfg.algorithm.settings, "H", 1)
    workers = expand_preset(cfg.cluster).workers
    per_step = cfg.model.seq_len * sum((w.batch_size or cfg.train.batch_size) * w.count
                                       for w in workers)
    cfg.train.tokens = cfg.plan.rounds * H * per_step
    return cfg


def representatives(setup) -> dict[int, int] | None:
    """worker -> how many identical workers it stands for, or None when the algorithm or the
    cluster is not symmetric (runtime/sim.py's docstring says what that needs)."""
    cfg, cluster = setup.cfg, setup.cluster
    c = cluster.cfg
    if (not cfg.plan.symmetry or cfg.algorithm.name not in SYMMETRIC
            or c.allreduce != "ring" or c.jitter > 0):
        return None
    if c.failures.horizon_s > 0 and c.failures.straggler_rate_per_hour > 0:
        return None  # every worker has its own random slowdowns
    alone = {w for w, _, _ in cluster.crashes} | {s.worker for s in c.slowdowns}
    classes: dict[tuple, list[int]] = {}
    for w, info in zip(cluster.workers, setup.job.workers):
        key = ("alone", w.index) if w.index in alone else (
            w.region, w.speed, w.batch_size, w.device, w.join_s, info.step_time)
        classes.setdefault(key, []).append(w.index)
    return {members[0]: len(members) for members in classes.values()}


def run_plan(cfg: Config, variant: str = "", *, keep_timeline: bool = False) -> PlanResult:
    """Simulate `cfg` on phantom compute for plan.rounds rounds (with_rounds); the wall
    time is projected to all of train.tokens."""
    budget = cfg.train.tokens
    cfg = with_rounds(cfg)
    if cfg.algorithm.name == "adloco" and cfg.algorithm.settings.batch_test != "none":
        raise UserError("adloco's norm test picks batch sizes from gradient values, which a "
                        "phantom model does not have; plan it with its batch sizes frozen: "
                        "--set algorithm.batch_test=none")
    workload = phantom_workload(cfg)
    setup = build(cfg, workload=workload)
    job = setup.job
    reps = representatives(setup)
    engine = Engine("sequential")
    engine.phantom = True
    params0 = workload.init_params()
    indices = sorted(reps) if reps is not None else [w.index for w in job.workers]
    rows = {i: engine.add_worker(i, workload, params0, None, job.workers[i].batch_size,
                                 cfg.train, job.planned_steps) for i in indices}
    engine.start()
    recorder = PlanRecorder()
    runtime = SimRuntime(setup.cluster, job, setup.algorithm, engine, rows, recorder,
                         [params0[n] for n in job.param_names], seed=cfg.train.seed,
                         representatives=reps)
    recorder.runtime = runtime
    runtime.run()
    stats = runtime.stats()
    wall = stats["sim_time_s"]
    steady, window = steady_utilization(runtime, recorder.marks)
    return PlanResult(
        variant=variant or cfg.algorithm.name, wall_s=wall, compute_utilization=steady,
        utilization=utilization(runtime, 0.0, wall), bytes_sent=stats["bytes_sent"],
        bytes_inter_region=stats["bytes_inter_region"],
        peak_bandwidth_gbps=stats["peak_link_gbps_by_link"], inner_steps=stats["inner_steps"],
        tokens=stats["tokens"], updates=max((u for _, _, u in recorder.marks), default=0),
        processes=len(runtime.procs), workers=runtime.workers_total,
        events=runtime.events_done, inter_gbps=inter_gbps(cfg),
        projected_wall_s=_projected(budget, recorder.marks, window, wall),
        timeline=runtime.timeline() if keep_timeline else [])


class PlanRecorder:
    """What the runtime reports to, in a plan: the publishing process's update marks (time,
    tokens, updates); no evaluation (a phantom has no values), no loss."""

    def __init__(self):
        self.runtime: SimRuntime | None = None
        self.marks: list[tuple[float, int, int]] = []
        self.logs: list[str] = []
        self.last = None

    def publish(self, params, tokens, updates, snapshot) -> None:
        self.marks.append((self.runtime.time, tokens, updates))

    def on_train(self, tokens, steps, loss) -> None:
        pass

    def log(self, text: str) -> None:
        self.logs.append(text)


# --------------------------------------------------------------------------- utilisation


def utilization(runtime: SimRuntime, t0: float, t1: float) -> float:
    """Compute time of the workers inside [t0, t1] over its length, averaged over workers
    (each representative counted for its copies)."""
    if t1 <= t0:
        return 1.0
    total = 0.0
    for p in runtime.worker_procs:
        busy = sum(min(e, t1) - max(s, t0) for k, s, e in p.spans
                   if k == "compute" and s < t1 and e > t0)
        total += busy * runtime.copies[p.worker.index]
    return total / (t1 - t0) / runtime.workers_total


def steady_window(marks: list[tuple[float, int, int]]) -> tuple[float, float] | None:
    """From the first mark at a quarter of the run's updates to the first at three quarters
    (None if the run has fewer than 4 updates)."""
    U = max((u for _, _, u in marks), default=0)
    if U < 4:
        return None
    first = {}
    for t, _, u in marks:
        first.setdefault(u, t)
    lo, hi = math.ceil(U / 4), math.floor(3 * U / 4)
    t0 = min(t for u, t in first.items() if u >= lo)
    t1 = min(t for u, t in first.items() if u >= hi)
    return (t0, t1) if t1 > t0 else None


def steady_utilization(runtime: SimRuntime, marks) -> tuple[float, tuple[float, float] | None]:
    window = steady_window(marks)
    if window is None:
        wall = max(p.finished_at for p in runtime.procs)
        return utilization(runtime, 0.0, wall), None
    return utilization(runtime, *window), window


def _projected(budget: int, marks, window, wall: float) -> float:
    """Wall time for `budget` tokens at the steady pace (tokens per second between the
    window's marks), or at the whole run's pace without a window."""
    if window is not None:
        at = {t: tok for t, tok, _ in marks}
        done = at[window[1]] - at[window[0]]
        if done > 0:
            return budget * (window[1] - window[0]) / done
    tokens = max((tok for _, tok, _ in marks), default=0)
    return wall * budget / tokens if tokens else wall


# --------------------------------------------------------------------------- bandwidth


def inter_gbps(cfg: Config) -> float:
    """The bandwidth between workers: the slowest inter-region link (Gbit/s), or in a
    one-region cluster its hosts' NICs; math.inf when unlimited."""
    c = expand_preset(cfg.cluster)
    bw = c.bandwidth_gbps
    R = len(bw)
    entries = [bw[r][s] for r in range(R) for s in range(R) if r != s] if R > 1 else [bw[0][0]]
    finite = [v for v in entries if v > 0]
    return min(finite) if finite else math.inf


def with_bandwidth(cfg: Config, gbps: float) -> Config:
    """`cfg` with the inter-worker bandwidth set to `gbps`: every inter-region link scaled
    so that the slowest is `gbps` (all of them `gbps` if they were unlimited); in a
    one-region cluster, every host's NIC."""
    if not gbps > 0:
        raise UserError(f"a bandwidth must be > 0 Gbit/s, got {gbps}")
    now = inter_gbps(cfg)
    cfg = copy.deepcopy(cfg)
    c = expand_preset(cfg.cluster)
    bw = [list(row) for row in c.bandwidth_gbps]
    R = len(bw)
    if R == 1:
        bw[0][0] = gbps
    for r in range(R):
        for s in range(R):
            if r != s and (now == math.inf or bw[r][s] > 0):  # 0 (unlimited) stays
                bw[r][s] = gbps if now == math.inf else bw[r][s] * gbps / now
    c.bandwidth_gbps = bw
    c.preset, c.inter_gbps, c.inter_latency_s = "custom", 0.0, -1.0
    cfg.cluster = c
    return cfg
