"""Asynchronous Local-SGD (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
Modeling", arXiv 2401.09135; the DeepMind toy notebook github.com/google-deepmind/asyncdiloco).

One parameter server holds theta. A worker pulls theta (noting its version), runs H_w inner
steps, pushes delta = theta_pulled - phi, and gets a new task with the latest theta. The
server applies every arrival at once, with
  * `server_optimizer = "nesterov"`: a Nesterov step per arrival, the naive baseline that
    over-accelerates stale directions, or
  * `"delayed_nesterov"`: the paper's fix (optim.DelayedNesterov): each arrival moves theta by
    lr*delta/N at once and the momentum is applied once per N arrivals (N = `buffer_size`,
    default the number of workers; `momentum_activation` = c).
`staleness_weighting` scales an arrival by (sqrt(M)/M)/sqrt(1 + staleness) ("polynomial") or
sqrt(M)/M ("constant"), as the notebook's alternatives.

Dynamic local updates (DyLU, the paper's Eq. 6): H_w = floor(H * v_w / max_j v_j) (or ceil,
`dylu_rounding`), at least 1, where v_w is worker w's step rate. The server starts from the
rates in the job (modelled in the simulator) and replaces each with the rate the worker
measures and reports with every push, so a straggler's tasks shrink while it is slow.

A grace period (`grace_period_s` > 0) lets the server wait that long after an arrival for
others, apply them all, and start every waiting worker from the same theta: with equal
speeds and no latency this makes the method synchronous DiLoCo (pinned by a test).

The learning-rate schedule of a task is indexed by global progress when it starts (tokens
handed out so far / budget), as in HALoS and the notebook. The server hands out tasks until
the token budget is spent (the last task is cut to fit), then tells each worker to stop.
"""

from __future__ import annotations

import math

import torch

from ..codecs import make_codec
from ..errors import UserError
from ..optim import DelayedNesterov, Nesterov
from ..runtime.api import Algorithm, Process

SERVER = "ps"


def dylu_steps(H: int, rate: float, fastest: float, rounding: str) -> int:
    """Dynamic local updates: the fastest worker runs H steps, others proportionally fewer."""
    exact = H * rate / fastest
    steps = math.ceil(exact - 1e-9) if rounding == "ceil" else math.floor(exact + 1e-9)
    return max(1, steps)


def staleness_weight(mode: str, staleness: int, M: int) -> float:
    if mode == "constant":
        return math.sqrt(M) / M
    if mode == "polynomial":
        return math.sqrt(M) / M / math.sqrt(1 + staleness)
    return 1.0


def modelled_rate(worker) -> float:
    """Inner steps per second from the job: modelled in the simulator, calibrated for real."""
    return 1.0 / worker.step_time if worker.step_time > 0 else worker.speed


class TaskPlanner:
    """Hands out tasks until a token budget is spent; shared by the servers of this family.

    Dynamic local updates need each worker's speed relative to the fleet's fastest. The job's
    rates (modelled or calibrated) give that from the start; once every worker this server
    plans for has reported a measured rate, relative speeds come from the measurements (so a
    straggler's tasks shrink while it is slow), scaled by the modelled share of this server's
    fastest worker in the fleet (a HALoS local server never sees other regions' workers).
    Measured and modelled rates are never compared with each other: in a real run the
    model's seconds need not be the machine's."""

    def __init__(self, cfg, job, workers: list[int], budget: int):
        self.cfg, self.job, self.budget = cfg, job, budget
        self.assigned = 0
        self.workers = workers
        self.modelled = {w: modelled_rate(job.workers[w]) for w in workers}
        self.fleet_fastest = max(modelled_rate(w) for w in job.workers)
        self.measured: dict[int, float] = {}

    def observe(self, worker: int, steps: int, seconds: float) -> None:
        if seconds > 0:
            self.measured[worker] = steps / seconds

    def relative_speed(self, worker: int) -> float:
        local_share = max(self.modelled.values()) / self.fleet_fastest
        if len(self.measured) == len(self.workers):
            return self.measured[worker] / max(self.measured.values()) * local_share
        return self.modelled[worker] / self.fleet_fastest

    def next_task(self, worker: int) -> dict | None:
        """{steps, progress} for the worker's next task, or None when the budget is spent."""
        left = self.budget - self.assigned
        if left <= 0:
            return None
        H = self.cfg.H
        if self.cfg.dylu:
            H = dylu_steps(H, self.relative_speed(worker), 1.0, self.cfg.dylu_rounding)
        per_step = self.job.tokens_per_step(worker)
        steps = min(H, -(-left // per_step))
        progress = self.assigned / self.budget
        self.assigned += steps * per_step
        return {"steps": steps, "progress": progress}

    def dispatch(self, ctx, worker: int, theta, version: int, codec) -> bool:
        """Send the worker its next task with the current model, or tell it to stop.
        Returns whether the worker is still active."""
        task = self.next_task(worker)
        if task is None:
            ctx.send(self.job.worker_name(worker), [], codec, {"stop": True})
            return False
        ctx.send(self.job.worker_name(worker), theta, codec, {"version": version, **task})
        return True


def async_worker(job, cfg, server_of):
    """The worker of Async Local-SGD and HALoS: pull, train, push, repeat until told to stop."""
    codec = make_codec(cfg.codec, cfg.codec_block)

    def run(ctx):
        server = server_of(ctx.worker)
        params = list(ctx.params.values())
        while True:
            msg = yield ctx.recv(server)
            if msg.failed:
                ctx.log(f"server {server} died; stopping")
                return
            if msg.meta.get("stop"):
                return
            with torch.no_grad():
                for p, t in zip(params, msg.tensors):
                    p.copy_(t)
            start = [t.clone() for t in msg.tensors]
            began = ctx.now()
            yield ctx.train(msg.meta["steps"], progress=msg.meta["progress"])
            with torch.no_grad():
                delta = [s - p for s, p in zip(start, params)]
            ctx.send(server, delta, codec, {
                "version": msg.meta["version"], "steps": msg.meta["steps"],
                "tokens": msg.meta["steps"] * job.tokens_per_step(ctx.worker),
                "seconds": ctx.now() - began})
    return run


def server_optimizer(cfg, lr: float, momentum: float, buffer: int):
    if cfg.server_optimizer == "nesterov":
        return Nesterov(lr, momentum)
    return DelayedNesterov(lr, momentum, buffer, cfg.momentum_activation)


def check_async_config(cfg, buffers: list[int], buffer_keys: str) -> None:
    """`buffers`: the buffer size N of every delayed-Nesterov optimizer the method runs."""
    if cfg.H < 1:
        raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")
    if min(buffers) < 1 or cfg.grace_period_s < 0:
        raise UserError(f"{buffer_keys} must be >= 1 (0 = default) and algorithm.grace_period_s >= 0")
    N = max(buffers)
    if not 0 <= cfg.momentum_activation <= 1 / N:
        raise UserError(f"algorithm.momentum_activation must be in [0, 1/N] = [0, {1 / N:.4g}] "
                        f"for the buffer size N = {N} ({buffer_keys}), got {cfg.momentum_activation}")


class AsyncLocalSGD(Algorithm):
    name = "async_local_sgd"
    synchronous = False

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        check_async_config(cfg, [cfg.buffer_size or job.M], "algorithm.buffer_size")
        if cfg.server_region and cfg.server_region not in job.regions:
            raise UserError(f"algorithm.server_region '{cfg.server_region}' is not a region of "
                            f"the cluster ({', '.join(job.regions)})")
        self.server_region = job.regions.index(cfg.server_region) if cfg.server_region else 0

    def processes(self):
        worker = async_worker(self.job, self.cfg, lambda w: SERVER)
        return self.worker_processes(worker) + [Process(SERVER, self.server_region, self.server)]

    def server(self, ctx):
        job, cfg = self.job, self.cfg
        codec = make_codec(cfg.codec, cfg.codec_block)
        planner = TaskPlanner(cfg, job, [w.index for w in job.workers], job.total_tokens)
        opt = server_optimizer(cfg, cfg.outer_lr, cfg.outer_momentum, cfg.buffer_size or job.M)
        theta = ctx.initial_params()
        version, applied_tokens = 0, 0
        ctx.publish(theta, 0, 0)

        def dispatch(w: int) -> bool:
            return planner.dispatch(ctx, w, theta, version, codec)

        active = sum(dispatch(w.index) for w in job.workers)
        while active:
            arrivals = [(yield ctx.recv())]
            if cfg.grace_period_s > 0:  # gather whoever else finishes within the grace period
                while len(arrivals) < active:
                    msg = yield ctx.recv(timeout=cfg.grace_period_s)
                    if msg is None:
                        break
                    arrivals.append(msg)
            for msg in [m for m in arrivals if m.failed]:
                ctx.log(f"worker {msg.src} died; carrying on with {active - 1} workers")
                active -= 1
            arrivals = [m for m in arrivals if not m.failed]
            for msg in arrivals:
                w = int(msg.src[1:])
                staleness = version - msg.meta["version"]
                yield ctx.server_step()
                weight = staleness_weight(cfg.staleness_weighting, staleness, job.M)
                delta = msg.tensors if weight == 1.0 else [d * weight for d in msg.tensors]
                opt.step(theta, delta)
                version += 1
                applied_tokens += msg.meta["tokens"]
                ctx.record_staleness(staleness)
                planner.observe(w, msg.meta["steps"], msg.meta["seconds"])
            if arrivals:
                ctx.publish(theta, applied_tokens, version)
            for msg in arrivals:
                active -= not dispatch(int(msg.src[1:]))


ALGORITHM = AsyncLocalSGD
