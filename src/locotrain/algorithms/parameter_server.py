"""What the parameter-server algorithms share (Async Local-SGD, HALoS): the settings of their
workers, dynamic local updates, the task planner that spends a token budget, the worker
process, and the server optimizer.

Not an algorithm itself: async_local_sgd.py and halos.py build on it, and DiLoCo borrows
dynamic local updates for HALoS's "DiLoCo + DynUpd" baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import DelayedNesterov, Nesterov


@dataclass
class AsyncWorkerSettings(CodecSettings):
    """Settings of the workers of a parameter server."""
    H: int = 50  # inner steps per task (the fastest worker's, with dynamic local updates)
    dylu: bool = True  # dynamic local updates: H_w scaled by worker speed
    dylu_rounding: str = choice("floor", "floor", "ceil")  # floor: Liu et al.'s Eq. 6
    reset_inner_state_each_round: bool = False  # a fresh inner optimizer for every task


def dylu_steps(H: int, rate: float, fastest: float, rounding: str) -> int:
    """Dynamic local updates (Liu et al. 2024, Eq. 6): the fastest worker runs H steps,
    others proportionally fewer, at least one."""
    exact = H * rate / fastest
    steps = math.ceil(exact - 1e-9) if rounding == "ceil" else math.floor(exact + 1e-9)
    return max(1, steps)


def modelled_rate(worker) -> float:
    """Inner steps per second from the job: modelled in the simulator, calibrated for real."""
    return 1.0 / worker.step_time if worker.step_time > 0 else worker.speed


class TaskPlanner:
    """Hands out tasks until a token budget is spent; one per server.

    Dynamic local updates need each worker's speed relative to the fleet's fastest. The job's
    rates (modelled or calibrated) give that from the start; once every worker this server
    plans for has reported a measured rate, relative speeds come from the measurements (so a
    straggler's tasks shrink while it is slow), scaled by the modelled share of this server's
    fastest worker in the fleet (a HALoS local server never sees other regions' workers).
    Measured and modelled rates are never compared with each other: in a real run the
    model's seconds need not be the machine's.

    Every step of a task has its own place in the learning-rate schedule: a task covers the
    budget share [progress, progress_end) and the worker moves through it step by step, as
    HALoS's workers advance their schedule every local step. A task that never comes back
    (its worker died) is returned to the budget, so another worker trains those tokens."""

    def __init__(self, cfg: AsyncWorkerSettings, job, workers: list[int], budget: int):
        self.cfg, self.job, self.budget = cfg, job, budget
        self.assigned = 0
        self.workers = list(workers)
        self.modelled = {w: modelled_rate(job.workers[w]) for w in workers}
        self.fleet_fastest = max(modelled_rate(w) for w in job.workers)
        self.measured: dict[int, float] = {}
        self.outstanding: dict[int, int] = {}  # worker -> tokens of the task it holds
        self.lost = 0  # tokens handed to workers that died with them

    def observe(self, worker: int, steps: int, seconds: float) -> None:
        self.outstanding.pop(worker, None)
        if seconds > 0:
            self.measured[worker] = steps / seconds

    def release(self, worker: int) -> int:
        """The worker died holding a task: its tokens go back to the budget. Returns them."""
        tokens = self.outstanding.pop(worker, 0)
        self.assigned -= tokens
        self.lost += tokens
        if worker in self.workers:
            self.workers.remove(worker)
            self.measured.pop(worker, None)
            self.modelled.pop(worker, None)
        return tokens

    def join(self, worker: int) -> None:
        """A worker that joins the run, or comes back after a crash."""
        if worker not in self.workers:
            self.workers.append(worker)
            self.modelled[worker] = modelled_rate(self.job.workers[worker])

    def relative_speed(self, worker: int) -> float:
        local_share = max(self.modelled.values()) / self.fleet_fastest
        if len(self.measured) == len(self.workers):
            return self.measured[worker] / max(self.measured.values()) * local_share
        return self.modelled[worker] / self.fleet_fastest

    def next_task(self, worker: int) -> dict | None:
        """{steps, progress, progress_end} of the worker's next task, or None when the
        budget is spent."""
        left = self.budget - self.assigned
        if left <= 0:
            return None
        H = self.cfg.H
        if self.cfg.dylu:
            H = dylu_steps(H, self.relative_speed(worker), 1.0, self.cfg.dylu_rounding)
        per_step = self.job.tokens_per_step(worker)
        steps = min(H, -(-left // per_step))
        start = self.assigned
        self.assigned += steps * per_step
        self.outstanding[worker] = steps * per_step
        return {"steps": steps, "progress": start / self.budget,
                "progress_end": self.assigned / self.budget}

    def dispatch(self, ctx, worker: int, theta, version: int, codec) -> bool:
        """Send the worker its next task with the current model, or tell it to stop.
        Returns whether the worker is still active."""
        task = self.next_task(worker)
        if task is None:
            ctx.send(self.job.worker_name(worker), [], codec, {"stop": True})
            return False
        ctx.send(self.job.worker_name(worker), theta, codec, {"version": version, **task})
        return True


def worker_index(name: str) -> int:
    return int(name[1:])


def async_worker(job, cfg: AsyncWorkerSettings, server_of):
    """The worker of Async Local-SGD and HALoS: pull, train, push, repeat until told to stop."""
    codec = make_codec(cfg.codec, cfg.codec_block)

    def run(ctx):
        server = server_of(ctx.worker)
        params = list(ctx.params.values())
        if ctx.restarts or job.workers[ctx.worker].join_s > 0:  # the server does not know us yet
            ctx.send(server, [], codec, {"joined": True})
        while True:
            msg = yield ctx.recv(server)
            if msg.failed:
                ctx.log(f"server {server} is gone; stopping")
                return
            if msg.meta.get("stop"):
                return
            with torch.no_grad():
                for p, t in zip(params, msg.tensors):
                    p.copy_(t)
            start = [t.clone() for t in msg.tensors]
            began = ctx.now()
            if cfg.reset_inner_state_each_round:
                ctx.reset_optimizer()
            steps = msg.meta["steps"]
            yield ctx.train(steps, msg.meta["progress"], msg.meta["progress_end"])
            with torch.no_grad():
                delta = [s - p for s, p in zip(start, params)]
            ctx.send(server, delta, codec, {
                "version": msg.meta["version"], "steps": steps,
                "tokens": steps * job.tokens_per_step(ctx.worker),
                "seconds": ctx.now() - began})
    return run


def server_optimizer(kind: str, lr: float, momentum: float, buffer: int, activation: float):
    """Nesterov per arrival (the naive baseline) or delayed Nesterov (Liu et al.'s fix)."""
    if kind == "nesterov":
        return Nesterov(lr, momentum)
    return DelayedNesterov(lr, momentum, buffer, activation)


def check_buffers(cfg, activation: float, buffers: list[int], buffer_keys: str) -> None:
    """`buffers`: the buffer size N of every delayed-Nesterov optimizer the method runs."""
    if cfg.H < 1:
        raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")
    if min(buffers) < 1:
        raise UserError(f"{buffer_keys} must be >= 1 (0 = default)")
    N = max(buffers)
    if not 0 <= activation <= 1 / N:
        raise UserError(f"algorithm.momentum_activation must be in [0, 1/N] = [0, {1 / N:.4g}] "
                        f"for the buffer size N = {N} ({buffer_keys}), got {activation}")
