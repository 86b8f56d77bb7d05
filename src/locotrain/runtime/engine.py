"""The inner steps of every worker: stacked state, deferred and batched computation.

Each worker is a row of a bank: for every parameter one tensor with a leading worker
dimension holds all workers' copies, and so do the inner optimizer's moments. A worker's
`params` are views of its row. Inner steps are jobs: a runtime submits one when a worker
asks for steps and collects its result when the worker resumes. Until then the job is
pending, and the batched engine runs every compatible pending job together: all workers
that train at the same time in one stacked forward, backward and optimizer step
(models/backbone.py's batched matmuls, optim.adamw_stacked). Workers with different step
counts run together for as long as they all have steps left; the ones that finish drop out.

Why deferring and batching change nothing: a worker's steps read only its own state
(parameters, optimizer moments, data stream, random stream, step count), and while its job
is pending nothing but the worker's own process may touch that state, and that process is
suspended waiting for the job (runtime/api.py states this contract). So running the steps
early, late, alone or alongside others computes the same numbers, up to the float rounding
of batched kernels. The sequential engine runs every job alone, on the same code: it is the
reference the batched engine is tested against (tests/test_engine.py).

Randomness per worker: a data stream (which windows) and a noise stream (the diffusion
model's masks), each its own seeded generator, consumed in step order. Dropout draws from
torch's global generator, so with dropout > 0 the two engines draw different (equally
distributed) masks; everything else is identical.

CUDA graphs (runtime.cuda_graphs = "on", with train.compile on a CUDA device): the batched
engine then compiles the workload's forward (and so its backward) and the optimizer with
torch.compile's "reduce-overhead" mode, which records each of them as a CUDA graph per shape
and replays it, one launch instead of hundreds. A replay overwrites the outputs of the
previous one, so every step starts a new graph generation and results that outlive a step
(a `gradients` job's gradients) are copied out. benchmarks/cuda_graphs.py measures it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data import Shard, windows_at
from ..optim import adamw_stacked, clip_stacked, lion_stacked, lr_at

ENGINES = ("batched", "sequential")
_ZERO = torch.zeros(())


@dataclass(eq=False)
class Row:
    """One worker's place in the engine and its private training state."""
    index: int  # the worker's index in its job (w0, w1, ...)
    bank: "Bank"
    slot: int  # its row in the bank's stacked tensors
    workload: object
    shard: Shard
    batch_size: int
    cfg: TrainConfig
    planned_steps: int
    data_stream: torch.Generator
    noise_stream: torch.Generator
    steps: int = 0  # inner steps taken: the schedule position of synchronous methods
    optimizer_steps: int = 0  # since the last reset: AdamW's bias correction
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # views of the row
    job: "Job | None" = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.workload.spec.seq_len


@dataclass(eq=False)
class Job:
    """Inner steps (`train`), one gradient (`gradients`) or one optimizer step with given
    gradients (`apply`) of one worker."""
    row: Row
    kind: str
    steps: int
    progress: float | None = None
    progress_end: float | None = None
    grads: list[torch.Tensor] | None = None
    batch_size: int = 0  # sequences per step (0 = the worker's own)
    micro_batch: int = 0  # at most this many per forward/backward (0 = the whole batch)
    done: int = 0
    loss: torch.Tensor | None = None
    result: object = None
    finished: bool = False
    seq: int = 0  # submission order in its engine: how a resumed run finds it again
    # A gradients job of the real runtime's bucketed all-reduce (api.Gradients buckets):
    # called with (parameter index, its gradient) as soon as the backward pass finishes it.
    on_grad: object = None

    @property
    def batch(self) -> int:
        return self.batch_size or self.row.batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.row.workload.spec.seq_len

    def position(self, i: int) -> float:
        """Learning-rate position of step i of this job's current chunk (see api.Train):
        with no progress given, the worker's own step count."""
        if self.progress is None:
            return (self.row.steps + i) / self.row.planned_steps
        if self.progress_end is None:
            return self.progress
        return self.progress + (self.progress_end - self.progress) * (self.done + i) / self.steps


class Bank:
    """Stacked parameters and inner-optimizer moments of the workers of one model shape."""

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        self.rows: list[Row] = []
        self.params: dict[str, torch.Tensor] = {}
        self.moments: dict[str, list[torch.Tensor]] = {}

    def allocate(self, first: list[dict[str, torch.Tensor]]) -> None:
        """Stack every row's initial parameters; zero moments."""
        for n in self.names:
            self.params[n] = torch.stack([p[n].detach().to(self.device) for p in first]).contiguous()
        self.moments = {"exp_avg": [torch.zeros_like(self.params[n]) for n in self.names]}
        if any(r.cfg.optimizer == "adamw" for r in self.rows):
            self.moments["exp_avg_sq"] = [torch.zeros_like(self.params[n]) for n in self.names]
        for r in self.rows:
            r.params = {n: self.params[n][r.slot] for n in self.names}

    def take(self, slots: list[int]):
        """The working set of these rows: the stacked tensors themselves when the rows are
        the whole bank in order (no copy), else gathered copies to put back afterwards."""
        if slots == list(range(len(self.rows))):
            return [self.params[n] for n in self.names], self.moments, None
        index = torch.tensor(slots, device=self.device)
        params = [self.params[n].index_select(0, index) for n in self.names]
        moments = {k: [t.index_select(0, index) for t in ts] for k, ts in self.moments.items()}
        return params, moments, index

    def put(self, index, params, moments) -> None:
        if index is None:
            return
        for n, p in zip(self.names, params):
            self.params[n].index_copy_(0, index, p)
        for k, ts in moments.items():
            for t, part in zip(self.moments[k], ts):
                t.index_copy_(0, index, part)


class Engine:
    def __init__(self, mode: str = "batched"):
        if mode not in ENGINES:
            raise ValueError(f"unknown engine {mode!r}; use one of {ENGINES}")
        self.mode = mode
        self.rows: list[Row] = []
        self._banks: dict[tuple, Bank] = {}
        self._first: dict[int, list] = {}  # bank id -> initial params of its rows
        self.pending: list[Job] = []
        self.submitted = 0
        self.chunks: list[tuple[int, int, float]] = []  # (workers, steps, host seconds)
        self.on_step = None  # called after every inner step (the real runtime's progress hook)
        self._clip, self._adamw, self._lion = clip_stacked, adamw_stacked, lion_stacked
        # While a resumed run replays its way to the checkpoint, jobs only advance the
        # counters; the checkpoint then puts the state back (runtime/snapshot.py).
        self.replaying = False
        # A plan's workers hold phantom tensors (planner/phantom.py): there is nothing to
        # compute, so every job completes the way a replayed one does, at once and alone.
        self.phantom = False
        self.compiled = False
        self.graphs = False  # steps replayed as CUDA graphs (decided in `start`)

    def compile(self, mode: str | None = None) -> None:
        """Fuse the optimizer's element-wise work (dozens of kernels per tensor otherwise)."""
        self._clip, self._adamw, self._lion = (torch.compile(f, mode=mode) for f in
                                               (clip_stacked, adamw_stacked, lion_stacked))
        self.compiled = True

    # -- workers --------------------------------------------------------------------------
    def add_worker(self, index: int, workload, params0: dict[str, torch.Tensor], shard: Shard,
                   batch_size: int, train: TrainConfig, planned_steps: int) -> Row:
        """Register a worker (before `start`). Seeds follow the worker's index in its job."""
        names = list(params0)
        key = (workload.spec, str(workload.device), tuple(names))
        bank = self._banks.setdefault(key, Bank(names, workload.device))
        seed = train.seed * 1_000_003 + 7919 * index
        row = Row(index, bank, len(bank.rows), workload, shard, batch_size, train, planned_steps,
                  torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2))
        bank.rows.append(row)
        self._first.setdefault(id(bank), []).append(params0)
        self.rows.append(row)
        return row

    def start(self) -> None:
        """Allocate the stacked state; every row's `params` become views of it."""
        for bank in self._banks.values():
            if not bank.params:
                bank.allocate(self._first[id(bank)])
        self._first.clear()
        if self._wants_graphs():
            self._use_graphs()

    def _wants_graphs(self) -> bool:
        """The workers' config asks for CUDA graphs (Workload.cuda_graphs) and this engine
        compiles. The batched engine only: the sequential one is the reference, and real
        runs (one sequential engine per rank) hand gradients to collectives mid-step."""
        return (self.mode == "batched" and self.compiled and not self.graphs
                and any(getattr(r.workload, "cuda_graphs", False) for r in self.rows))

    def _use_graphs(self) -> None:
        """Recompile the optimizer and every workload's forward in "reduce-overhead" mode.
        A graph reads its inputs from the addresses it was recorded with and copies any other
        input there first; the banks' stacked tensors keep their addresses for the whole run,
        so marking them static spares that copy when a step takes whole banks (synchronous
        methods). A step of some rows only gathers copies, which are copied in."""
        self.compile("reduce-overhead")
        for workload in {id(r.workload): r.workload for r in self.rows}.values():
            workload.compile("reduce-overhead")
        for bank in self._banks.values():
            for t in [*bank.params.values(), *(t for ts in bank.moments.values() for t in ts)]:
                torch._dynamo.mark_static_address(t)
        self.graphs = True

    def reset_optimizer(self, row: Row) -> None:
        for ts in row.bank.moments.values():
            for t in ts:
                t[row.slot].zero_()
        row.optimizer_steps = 0

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, row: Row, kind: str, steps: int = 1, progress=None, progress_end=None,
               grads=None, batch_size=None, micro_batch=None) -> Job:
        if row.job is not None:
            raise RuntimeError(f"worker {row.index} submitted a job while one is pending")
        self.submitted += 1
        job = Job(row, kind, steps, progress, progress_end, grads, batch_size or 0,
                  micro_batch or 0, seq=self.submitted)
        row.job = job
        self.pending.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Forget a job whose worker crashed; whatever of it ran stays in the worker's state,
        which a restart overwrites."""
        if job in self.pending:
            self.pending.remove(job)
        if job.row.job is job:
            job.row.job = None
        job.finished = True

    def train(self, row: Row, steps: int, progress=None, progress_end=None) -> torch.Tensor:
        """Run `steps` inner steps of one worker now (tests, hand replays)."""
        return self.complete(self.submit(row, "train", steps, progress, progress_end))

    def complete(self, job: Job):
        """Run pending jobs until `job` is done; return its result."""
        while not job.finished:
            self._run(self._group(job))
        return job.result

    def run_all(self) -> None:
        while self.pending:
            self._run(self._group(self.pending[0]))

    def _group(self, job: Job) -> list[Job]:
        """The pending jobs that can run together with `job`: same kind, same model, same
        batch size and inner-optimizer constants (the learning rate and decay may differ)."""
        if self.mode == "sequential" or self.replaying or self.phantom:  # only what is asked for
            return [job]
        key = _group_key(job)
        group = [j for j in self.pending if _group_key(j) == key]
        return sorted(group, key=lambda j: j.row.slot)

    def _run(self, group: list[Job]) -> None:
        if self.replaying or self.phantom:
            return self._skip(group)
        started = time.perf_counter()
        rows = [j.row for j in group]
        bank = rows[0].bank
        steps = min(j.steps - j.done for j in group) if group[0].kind == "train" else 1
        params, moments, index = bank.take([r.slot for r in rows])
        losses = self._steps(group, rows, params, moments, steps)
        bank.put(index, params, moments)
        for w, j in enumerate(group):
            if losses is not None:
                j.loss = losses[w] if j.loss is None else j.loss + losses[w]
            j.done += steps
            if j.done == j.steps:
                j.finished = True
                j.row.job = None
                self.pending.remove(j)
                if j.kind == "train":
                    j.result = j.loss
        self.chunks.append((len(group), steps, time.perf_counter() - started))

    def _skip(self, group: list[Job]) -> None:
        """A replayed (or phantom) job: the counters move as if it ran, and its results are
        zeros of the right shapes. A replay copies the checkpoint's values over whatever a
        process keeps of them; a phantom run needs the shapes only."""
        for j in group:
            r = j.row
            steps = j.steps - j.done
            if j.kind != "gradients":
                r.steps += steps
                r.optimizer_steps += steps
            # (a phantom run shares one zero: nothing it holds is ever restored in place)
            loss = _ZERO if self.phantom else torch.zeros((), device=r.bank.device)
            j.loss = loss if j.loss is None else j.loss + loss
            j.done, j.finished, r.job = j.steps, True, None
            self.pending.remove(j)
            if j.kind == "train":
                j.result = j.loss
            elif j.kind == "gradients":
                j.result = ([torch.zeros_like(p) for p in r.params.values()], loss)

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, rows: list[Row]) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything these workers' training depends on: their parameters, optimizer moments,
        counters and random streams (views). A job may be part-way done: its steps so far are
        in the state, and `job_states` keeps how far it got."""
        tensors, counters = {}, []
        for i, r in enumerate(rows):
            for n in r.bank.names:
                tensors[f"w{i}.params.{n}"] = r.bank.params[n][r.slot]
            for kind, ts in r.bank.moments.items():
                for n, t in zip(r.bank.names, ts):
                    tensors[f"w{i}.{kind}.{n}"] = t[r.slot]
            tensors[f"w{i}.data_stream"] = r.data_stream.get_state()
            tensors[f"w{i}.noise_stream"] = r.noise_stream.get_state()
            counters.append({"steps": r.steps, "optimizer_steps": r.optimizer_steps})
        return tensors, {"rows": counters}

    def load_state(self, rows: list[Row], tensors: dict[str, torch.Tensor], meta: dict) -> None:
        mine, _ = self.state(rows)
        if set(mine) != set(tensors) or len(meta["rows"]) != len(rows):
            raise ValueError("the checkpoint's workers or model do not match this run's")
        with torch.no_grad():
            for name, t in mine.items():
                if not name.endswith("_stream"):
                    t.copy_(tensors[name])
        for i, (r, m) in enumerate(zip(rows, meta["rows"])):
            r.steps, r.optimizer_steps = m["steps"], m["optimizer_steps"]
            r.data_stream.set_state(tensors[f"w{i}.data_stream"])
            r.noise_stream.set_state(tensors[f"w{i}.noise_stream"])

    def job_states(self, jobs: list[Job]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """How far these submitted jobs got, and the results of those that finished (a job
        can finish early, batched with another worker's, before its worker collects it)."""
        tensors, states = {}, []
        for i, j in enumerate(jobs):
            states.append({"seq": j.seq, "done": j.done, "finished": j.finished})
            if j.loss is not None:
                tensors[f"job{i}.loss"] = j.loss
            if j.finished and j.kind == "gradients":
                for k, g in enumerate(j.result[0]):
                    tensors[f"job{i}.grad{k}"] = g
        return tensors, states

    def load_job_states(self, jobs: list[Job], tensors: dict, states: list[dict]) -> None:
        """Put the saved progress back into the replayed run's jobs (the same submissions)."""
        if [j.seq for j in jobs] != [st["seq"] for st in states]:
            raise ValueError("the replay submitted other jobs than the checkpointed run")
        for i, (j, st) in enumerate(zip(jobs, states)):
            j.done, j.finished = st["done"], st["finished"]
            j.loss = tensors.get(f"job{i}.loss")
            if j.loss is not None:
                j.loss = j.loss.to(j.row.bank.device)
            if j.finished:
                if j in self.pending:
                    self.pending.remove(j)
                j.row.job = None
                j.result = j.loss if j.kind == "train" else None
                if j.kind == "gradients":
                    grads = [tensors[f"job{i}.grad{k}"].to(j.row.bank.device)
                             for k in range(len(j.row.params))]
                    j.result = (grads, j.loss)

    def _steps(self, group, rows, params, moments, steps):
        kind = group[0].kind
        workload = rows[0].workload
        if kind == "apply":
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            grads = [torch.stack([j.grads[i] for j in group]) for i in range(len(params))]
            self._optimize(rows, params, grads, moments, self._learning_rates(group, rows, 1)[0])
            return None
        batch = group[0].batch
        batches = self._batches(rows, steps, batch)
        total = torch.zeros(len(rows), device=params[0].device)
        lrs = self._learning_rates(group, rows, steps)
        micro = group[0].micro_batch or batch
        for i in range(steps):
            if self.graphs:  # the previous step's graph outputs are no longer read
                torch.compiler.cudagraph_mark_step_begin()
            leaves = [p.detach().requires_grad_(True) for p in params]
            named = dict(zip(rows[0].bank.names, leaves))
            loss = torch.zeros(len(rows), device=params[0].device)
            for start in range(0, batch, micro):  # accumulation: the mean over the batch
                part = batches[i][:, start:start + micro]
                piece = workload.loss(named, part, [r.noise_stream for r in rows])
                share = part.shape[1] / batch
                if group[0].on_grad is not None and start + micro >= batch:  # the last pass
                    _hook_gradients(leaves, group[0].on_grad)
                (piece.sum() * share).backward()  # each worker's loss is its own row's
                loss += piece.detach() * share
            grads = [p.grad for p in leaves]
            total += loss
            if kind == "gradients":
                if self.graphs:  # they outlive this step; the next replay would overwrite them
                    grads = [g.clone() for g in grads]
                for w, j in enumerate(group):
                    j.result = ([g[w] for g in grads], loss.detach()[w])
                return total
            self._optimize(rows, params, grads, moments, lrs[i])
            if self.on_step is not None:
                self.on_step()
        return total

    def _batches(self, rows: list[Row], steps: int, batch: int) -> torch.Tensor:
        """(steps, W, B, window) token windows: each worker's own stream, in step order."""
        window = rows[0].workload.window
        starts = torch.stack([torch.stack([r.shard.starts(batch, window, r.data_stream)
                                           for r in rows]) for _ in range(steps)])
        tokens = rows[0].shard.tokens
        if all(r.shard.tokens is tokens for r in rows):
            return windows_at(tokens, starts, window)
        return torch.stack([windows_at(r.shard.tokens, starts[:, w], window)
                            for w, r in enumerate(rows)], dim=1)

    def _learning_rates(self, group, rows, steps) -> torch.Tensor:
        """(steps, W): each worker's learning rate at each step of this chunk, at the
        position its job gives it (one transfer to the device per chunk)."""
        table = [[lr_at(j.position(i), r.cfg.lr, r.cfg.warmup, r.cfg.min_lr_ratio, step=1 / r.planned_steps)
                  for j, r in zip(group, rows)] for i in range(steps)]
        return torch.tensor(table).to(rows[0].bank.device, non_blocking=True)

    def _optimize(self, rows, params, grads, moments, lr) -> None:
        """Clip each worker's gradient, then one inner-optimizer step at each worker's own
        learning rate `lr` (W,)."""
        cfg = rows[0].cfg
        device = params[0].device
        if cfg.grad_clip > 0:
            self._clip(grads, cfg.grad_clip)
        decay = torch.tensor([r.cfg.weight_decay for r in rows]).to(device, non_blocking=True)
        decays = [p.dim() >= 3 for p in params]  # matrices of each worker
        for r in rows:
            r.steps += 1
            r.optimizer_steps += 1
        if cfg.optimizer == "lion":
            self._lion(params, grads, moments["exp_avg"], decays, lr, (cfg.beta1, cfg.beta2),
                       decay)
        else:
            counts = torch.tensor([float(r.optimizer_steps) for r in rows]).to(device, non_blocking=True)
            self._adamw(params, grads, moments["exp_avg"], moments["exp_avg_sq"], decays,
                        counts, lr, (cfg.beta1, cfg.beta2), decay)


def _hook_gradients(leaves: list[torch.Tensor], on_grad) -> None:
    """Call on_grad(index, gradient) for each parameter as autograd finishes its gradient
    (one worker: the engine of a real rank holds a stack of one)."""
    for i, leaf in enumerate(leaves):
        leaf.register_post_accumulate_grad_hook(lambda p, i=i: on_grad(i, p.grad[0]))


def _group_key(job: Job) -> tuple:
    r = job.row
    wl = r.workload
    task = (type(wl), wl.cfg.workload.context_len, wl.cfg.workload.loopholing,
            wl.cfg.workload.self_cond_rate)
    inner = (r.cfg.optimizer, r.cfg.beta1, r.cfg.beta2, r.cfg.grad_clip)
    shape = (job.batch, job.micro_batch) if job.kind != "apply" else 0
    return (job.kind, id(r.bank), task, inner, shape)
