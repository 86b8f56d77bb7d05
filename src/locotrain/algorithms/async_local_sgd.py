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

Dynamic local updates (DyLU, on by default as in the paper's DN+DyLU): H_w = floor(H v_w /
max_j v_j), at least 1, where v_w is worker w's step rate (parameter_server.TaskPlanner).

A grace period (`grace_period_s` > 0) lets the server wait that long after an arrival for
others, apply them all, and start every waiting worker from the same theta: with equal
speeds and no latency this makes the method synchronous DiLoCo (pinned by a test).

Every inner step follows the learning-rate schedule at its own position in the token budget
(a task covers [progress, progress_end)). The server hands out tasks until the budget is
spent (the last task is cut to fit), then tells each worker to stop. A worker that dies
gives its unfinished task back to the budget; the others train it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..codecs import make_codec
from ..config import choice
from ..errors import UserError
from ..runtime.api import Algorithm, Process
from .parameter_server import (AsyncWorkerSettings, TaskPlanner, async_worker, check_buffers,
                               server_optimizer, worker_index)

SERVER = "ps"


@dataclass
class AsyncLocalSGDSettings(AsyncWorkerSettings):
    server_optimizer: str = choice("delayed_nesterov", "delayed_nesterov", "nesterov")
    outer_lr: float = 0.7  # DiLoCo's; delayed Nesterov moves lr/N per arrival
    outer_momentum: float = 0.9
    buffer_size: int = 0  # N of delayed Nesterov; 0 = number of workers (the paper's N = K)
    momentum_activation: float = 0.0  # c of delayed Nesterov, 0 <= c <= 1/N
    staleness_weighting: str = choice("none", "none", "constant", "polynomial")
    grace_period_s: float = 0.0
    server_region: str = ""  # region of the parameter server; "" = the first region


def staleness_weight(mode: str, staleness: int, M: int) -> float:
    if mode == "constant":
        return math.sqrt(M) / M
    if mode == "polynomial":
        return math.sqrt(M) / M / math.sqrt(1 + staleness)
    return 1.0


class AsyncLocalSGD(Algorithm):
    name = "async_local_sgd"
    synchronous = False

    def __init__(self, cfg: AsyncLocalSGDSettings, job):
        super().__init__(cfg, job)
        check_buffers(cfg, cfg.momentum_activation, [cfg.buffer_size or job.M],
                      "algorithm.buffer_size")
        if cfg.grace_period_s < 0:
            raise UserError(f"algorithm.grace_period_s must be >= 0, got {cfg.grace_period_s}")
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
        present = [w.index for w in job.workers if w.join_s == 0]
        planner = TaskPlanner(cfg, job, present, job.total_tokens)
        opt = server_optimizer(cfg.server_optimizer, cfg.outer_lr, cfg.outer_momentum,
                               cfg.buffer_size or job.M, cfg.momentum_activation)
        theta = ctx.initial_params()
        version, applied_tokens = 0, 0
        ctx.publish(theta, 0, 0)

        def dispatch(w: int) -> bool:
            return planner.dispatch(ctx, w, theta, version, codec)

        active = {w for w in present if dispatch(w)}
        while active:
            arrivals = [(yield ctx.recv())]
            if cfg.grace_period_s > 0:  # gather whoever else finishes within the grace period
                while len(arrivals) < len(active):
                    msg = yield ctx.recv(timeout=cfg.grace_period_s)
                    if msg is None:
                        break
                    arrivals.append(msg)
            for msg in [m for m in arrivals if m.failed]:
                w = worker_index(msg.src)
                active.discard(w)
                tokens = planner.release(w)
                ctx.log(f"worker {msg.src} died; {tokens} tokens of its task go back to the "
                        f"budget; carrying on with {len(active)} workers")
            for msg in [m for m in arrivals if m.meta.get("joined")]:
                w = worker_index(msg.src)  # a new or restarted worker: hand it a task
                planner.join(w)
                if dispatch(w):
                    active.add(w)
            arrivals = [m for m in arrivals if not m.failed and not m.meta.get("joined")]
            for msg in arrivals:
                staleness = version - msg.meta["version"]
                yield ctx.server_step()
                weight = staleness_weight(cfg.staleness_weighting, staleness, job.M)
                delta = msg.tensors if weight == 1.0 else [d * weight for d in msg.tensors]
                opt.step(theta, delta)
                version += 1
                applied_tokens += msg.meta["tokens"]
                ctx.record_staleness(staleness)
                planner.observe(worker_index(msg.src), msg.meta["steps"], msg.meta["seconds"])
            if arrivals:
                ctx.publish(theta, applied_tokens, version)
            # A dead worker's tokens may have come back: workers told to stop stay stopped,
            # the active ones absorb them.
            for msg in arrivals:
                w = worker_index(msg.src)
                if not dispatch(w):
                    active.discard(w)


ALGORITHM = AsyncLocalSGD
SETTINGS = AsyncLocalSGDSettings
