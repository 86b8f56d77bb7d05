"""The contract between algorithms and runtimes.

An algorithm is a set of processes. A process is a generator function `run(ctx)` that
yields a handful of blocking primitives and calls a few non-blocking ones:

    loss  = yield ctx.train(steps)            # inner steps on this worker's own shard
    grads = yield ctx.gradients()             # one forward/backward, no optimizer step
    hs    = yield ctx.gradients(buckets=b, codec=c)  # ... each bucket all-reduced as it is ready
    yield ctx.apply(grads)                    # clip + optimizer step with given gradients
    h     = ctx.start_all_reduce(tensors, codec)   # mean over all workers, non-blocking
    mean  = yield ctx.wait(h)                 # (or: mean = yield ctx.all_reduce(...))
    h     = ctx.send(dst, tensors, codec, meta)    # point-to-point, non-blocking
    msg   = yield ctx.recv(src=None)          # next message (from anyone)
    msg   = yield ctx.recv(timeout=0.5)       # ... or None after 0.5 s
    yield ctx.server_step()                   # the modelled cost of one server update
    ctx.share(tensors, meta)                  # the replicated state a rejoining worker heals from
    tensors, meta = yield ctx.heal()          # ... which it fetches from a live peer
    ctx.participants()                        # the workers the last all-reduce averaged
    ctx.now(); ctx.publish(params, tokens, updates); ctx.record_staleness(s)

The simulated runtime (runtime/sim.py) runs every process on one machine with a virtual
clock; the real runtime (runtime/torchdist.py) runs one process per rank over
torch.distributed. Algorithms never know which one runs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import torch

from ..codecs import Codec

Tensors = list[torch.Tensor]


# --------------------------------------------------------------------------- blocking ops


@dataclass
class Train:
    steps: int
    progress: float | None  # LR schedule position at the first step; None = own step count
    progress_end: float | None = None  # if given, the position moves linearly to it
    batch_size: int | None = None  # sequences per step; None = the worker's own batch size
    micro_batch: int | None = None  # at most this many at once (gradient accumulation)


@dataclass
class Gradients:
    batch_size: int | None = None  # as Train's (AdLoCo's norm test reads its last step's gradient)
    micro_batch: int | None = None
    buckets: list[list[int]] | None = None  # parameter indices, in the order backward makes them
    codec: Codec | None = None  # of the buckets' all-reduces
    scale: float = 1.0  # each gradient is multiplied by this before its all-reduce


@dataclass
class Apply:
    grads: list  # one per parameter, in job.param_names order
    progress: float | None = None


@dataclass
class Wait:
    handle: "Handle"
    slack: float = 0.0  # inner steps of compute that may run before the result is needed


@dataclass
class Recv:
    src: str | None
    timeout: float | None = None  # seconds; on timeout the receive returns None


@dataclass
class ServerStep:
    pass


@dataclass
class Heal:
    pass


Op = Train | Gradients | Apply | Wait | Recv | ServerStep | Heal


@dataclass
class Message:
    """A received message. The real runtime also delivers meta {"failed": True} (and no
    tensors) when process `src` dies; processes that wait on others should handle it."""
    src: str
    tensors: Tensors
    meta: dict
    sent_at: float

    @property
    def failed(self) -> bool:
        return bool(self.meta.get("failed"))


@dataclass
class Handle:
    """A non-blocking operation in flight; `yield ctx.wait(handle)` returns its result."""
    kind: str
    done: bool = False
    result: Any = None
    state: dict = field(default_factory=dict)  # runtime-private


# --------------------------------------------------------------------------- context


class Context(ABC):
    """What a process can do. One context per process."""

    name: str
    worker: int | None  # index of the worker this process drives, None for servers
    restarts: int = 0  # times this process was restarted after a crash (it starts from the top)
    # True if this worker did not start with the others (it restarted after a crash, or it
    # joins mid-run): a synchronous algorithm then heals it from a live peer (`heal`).
    rejoining: bool = False
    # The worker's working parameters (workers only). They belong to this process alone:
    # no other process reads or writes them, which is what lets a runtime run a worker's
    # inner steps late, early or batched with other workers' (runtime/engine.py).
    params: dict[str, torch.Tensor]

    @abstractmethod
    def initial_params(self) -> Tensors:
        """A fresh copy of the model every worker starts from (in job.param_names order)."""

    @abstractmethod
    def now(self) -> float:
        """Seconds since the start: virtual in the simulator, wall clock for real."""

    # -- worker compute ------------------------------------------------------------
    def train(self, steps: int, progress: float | None = None,
              progress_end: float | None = None, batch_size: int | None = None,
              micro_batch: int | None = None) -> Train:
        """`steps` inner steps. A step of `batch_size` sequences (default: the worker's) costs
        the modelled step time scaled by batch_size / the worker's batch; `micro_batch` splits
        it into forward/backward passes of at most that many sequences whose gradients add up
        (accumulation: the same gradient, less memory)."""
        return Train(steps, progress, progress_end, batch_size, micro_batch)

    def gradients(self, batch_size: int | None = None, micro_batch: int | None = None,
                  buckets: list[list[int]] | None = None, codec: Codec | None = None,
                  scale: float = 1.0) -> Gradients:
        """One forward/backward, no optimizer step; `batch_size` and `micro_batch` as train's.

        With `buckets` (lists of parameter indices, in the order the backward pass produces
        them: last layer first) the gradients are not handed back: as soon as the backward
        pass has produced a bucket, the runtime starts its all-reduce over every worker
        (mean, with `codec`, of the gradients times `scale`), and the primitive returns one
        Handle per bucket, in bucket order, each yielding that bucket's mean gradients. This
        is DDP's overlap of the gradient all-reduce with the backward pass (torch DDP's
        buckets). Every worker must pass the same buckets. The simulator times it: the
        backward pass is 2/3 of the step (Kaplan's 4N of 6N FLOPs per token), split among
        the buckets in proportion to their parameters; the real runtime starts each bucket's
        all-reduce from autograd hooks, in bucket order."""
        return Gradients(batch_size, micro_batch, buckets, codec, scale)

    def apply(self, grads: Tensors, progress: float | None = None) -> Apply:
        """Clip `grads`, take one inner optimizer step with them (blocking, so that the
        runtime can batch the steps of workers that apply at the same time)."""
        return Apply(grads, progress)

    @abstractmethod
    def reset_optimizer(self) -> None:
        """Forget the inner optimizer state (the DeepMind notebook's per-task AdamW)."""

    # -- communication -------------------------------------------------------------
    @abstractmethod
    def start_all_reduce(self, tensors: Tensors, codec: Codec,
                         group: tuple[int, ...] | None = None) -> Handle:
        """Mean over the workers of `group` (worker indices; None = every worker; any other
        group must be one of the algorithm's `groups()`); what is computed and sent is
        runtime/collectives.py's."""

    def all_reduce(self, tensors: Tensors, codec: Codec,
                   group: tuple[int, ...] | None = None) -> Wait:
        return Wait(self.start_all_reduce(tensors, codec, group))

    @abstractmethod
    def form_groups(self, groups: list[tuple[int, ...]]) -> None:
        """Make these groups of workers usable by all-reduce from now on, when membership is
        only known during the run (AdLoCo's trainers). Every worker process must call it
        with the same groups at the same point of its program (the real runtime creates a
        communicator per group on every rank); algorithms with servers declare their groups
        up front in `Algorithm.groups()` instead."""

    def wait(self, handle: Handle, slack: float = 0.0) -> Wait:
        """The handle's result. `slack` (a fraction of this worker's inner step) says the
        result is needed only that far into the worker's next compute: the layers an
        all-reduce carries are reached part-way through the next forward pass, and their
        gradients were final part-way through the last backward pass (the per-layer DAG of
        the Streaming DiLoCo and eager-updates papers' simulator, specs section 12). The
        simulator lets the worker compute that long before it blocks, and takes it off the
        worker's next compute; the real runtime, whose steps are not split by layer, waits
        at once."""
        return Wait(handle, slack)

    @abstractmethod
    def send(self, dst: str, tensors: Tensors, codec: Codec, meta: dict | None = None) -> Handle:
        """Send tensors (encoded with codec) and a small dict of numbers to process `dst`."""

    def recv(self, src: str | None = None, timeout: float | None = None) -> Recv:
        return Recv(src, timeout)

    def server_step(self) -> ServerStep:
        return ServerStep()

    # -- a synchronous group that re-forms (cluster.on_crash = "drop") -------------------
    # torchft's model (github.com/pytorch/torchft, manager.py): each all-reduce averages the
    # workers that are alive when it completes (a quorum), and a worker that restarts or
    # joins copies the replicated state from a live peer before it takes part again.
    @abstractmethod
    def participants(self) -> tuple[int, ...]:
        """The workers whose tensors this process's last completed all-reduce averaged:
        every worker of its group unless some crashed (cluster.on_crash = "drop")."""

    def share(self, tensors: Tensors, meta: dict) -> None:
        """Offer this worker's replicated state, as it is now: `tensors` (kept by reference:
        call again after they change in place, or are replaced) and small numbers `meta`.
        A worker that heals copies them, with this worker's parameters and inner-optimizer
        state. Call it where every replica holds the same state (right after an outer step);
        runtimes whose groups never re-form ignore it."""

    def heal(self) -> "Heal":
        """Wait for the next `share` of a live peer and return a copy of its (tensors, meta);
        this worker's parameters and inner-optimizer state become the peer's, and it takes
        part in every all-reduce of the group from the peer's next one. Returns None when no
        live peer is left to heal from (the run is over for this worker)."""
        return Heal()

    # -- records -------------------------------------------------------------------
    @abstractmethod
    def publish(self, params: Tensors, tokens: int, updates: int) -> None:
        """Declare the current global model, which has seen `tokens` training tokens after
        `updates` outer/server updates. The runtime evaluates it when an evaluation is due."""

    @abstractmethod
    def record_staleness(self, staleness: int) -> None:
        """Server versions between a worker's pull and its push, for one applied update."""

    def record_replica(self, params: Tensors) -> None:
        """This worker's own copy of the global model, when replicas may differ (eager
        updates). The simulator reports how far they drift apart (`replica_spread`); the
        real runtime, whose replicas live in separate processes, does not."""

    def log(self, text: str) -> None:
        """A line for the run's log (failures, stragglers, decisions)."""


@dataclass
class Process:
    name: str
    region: int
    run: Callable[[Context], Generator[Op, Any, None]]
    worker: int | None = None


class Algorithm(ABC):
    """One training algorithm: builds its processes from the job description."""

    name = "base"
    #: True if every worker runs the same number of steps in lock-step; the runtime then
    #: indexes the LR schedule by each worker's own step count.
    synchronous = True
    #: True if its workers take part in a group that re-forms: a synchronous algorithm whose
    #: workers call `share` and heal with `heal` (cluster.on_crash = "drop", joins).
    heals = False

    def __init__(self, cfg, job: "Job"):
        self.cfg = cfg
        self.job = job

    @abstractmethod
    def processes(self) -> list[Process]:
        ...

    def groups(self) -> list[tuple[int, ...]]:
        """Groups of workers, besides all of them, that all-reduce among themselves (the
        real runtime creates their communicators up front, in this order, on every rank)."""
        return []

    def worker_processes(self, run) -> list[Process]:
        """One process per worker, in its region, all running `run`."""
        return [Process(self.job.worker_name(w.index), w.region, run, worker=w.index)
                for w in self.job.workers]


@dataclass
class WorkerInfo:
    index: int
    region: int
    speed: float  # relative device speed
    batch_size: int
    step_time: float  # seconds per inner step: modelled in the simulator, measured for real
    join_s: float = 0.0  # when the worker joins the run (0: from the start)


@dataclass
class Job:
    """What an algorithm may know about the run it is part of."""
    workers: list[WorkerInfo]
    regions: list[str]
    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    total_tokens: int
    seq_len: int
    depth: int

    @property
    def M(self) -> int:
        return len(self.workers)

    def tokens_per_step(self, worker: int) -> int:
        return self.workers[worker].batch_size * self.seq_len

    @property
    def planned_steps(self) -> int:
        """Inner steps per worker when all workers step together until the budget is spent."""
        per_step = sum(self.tokens_per_step(w.index) for w in self.workers)
        return max(1, -(-self.total_tokens // per_step))

    def rounds(self, H: int) -> list[int]:
        """Inner steps of each round of a synchronous method: H, H, ..., and a shorter last
        round if the budget needs it."""
        total = self.planned_steps
        return [min(H, total - start) for start in range(0, total, H)]

    def worker_name(self, index: int) -> str:
        return f"w{index}"
