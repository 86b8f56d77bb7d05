"""Overlap Local-SGD (Wang, Liang, Joshi, ICASSP 2020, arXiv 2002.09539; the authors' code is
github.com/JYWa/Overlap_Local_SGD); see docs/algorithms.md section 6.

Local SGD with the synchronisation hidden behind computation. Every worker keeps an anchor z,
the average of the workers' models from the previous sync point. At sync point k (after
every H local steps, their tau):

    z_k = wait for the all-reduce started at sync point k-1   (k = 1: the initial params)
    x  <- (1 - pull) * x + pull * z_k          pull the local model toward the stale anchor
    beta > 0:  u <- beta * u + (z_k - x);  y = z_k - u        anchor momentum (u starts at 0)
    beta = 0:  y = x
    start all-reduce(mean of y) -> z_{k+1}     it runs during the next H local steps

`pull` is the paper's alpha, `anchor_momentum` its beta. The paper divides (z - x) by the
learning rate lr and multiplies u by lr again in y; with a constant lr the two cancel, so we
keep u in parameter units (with a schedule, their form would also rescale the old momentum by
lr_k / lr_{k-1} at every sync; we leave that out, and AdamW steps are not lr * gradient
anyway). The local optimizer is each worker's inner optimizer (AdamW by default), as for every
algorithm of this package, where the paper uses SGD with momentum. pull = 1 pins the anchor at the initial parameters (every worker sends
z_k, so the mean is z_k again); pull = 0 never pulls, and with M = 1 that is plain training.

End of run (our choice): after the last sync point we wait for its all-reduce and take that
mean as the final global model, so the last H steps of every worker are included. This is the
only blocking wait of a run. The global model published for evaluation is the anchor, the
only model all workers agree on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings
from ..errors import UserError
from ..runtime.api import Algorithm


@dataclass
class OverlapSettings(CodecSettings):
    """Defaults from the authors' launch script (tau = 2, alpha = 0.6, beta = 0.7)."""
    H: int = 2  # local steps between sync points (the paper's tau)
    pull: float = 0.6  # the paper's alpha: x <- (1 - pull) x + pull * anchor
    anchor_momentum: float = 0.7  # the paper's beta
    reset_inner_state_each_round: bool = False


class OverlapLocalSGD(Algorithm):
    name = "overlap_local_sgd"

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        if cfg.H < 1:
            raise UserError(f"algorithm.H (local steps per sync, tau) must be >= 1, got {cfg.H}")
        if not 0.0 <= cfg.pull <= 1.0:
            raise UserError(f"algorithm.pull must be in [0, 1], got {cfg.pull}")
        if not 0.0 <= cfg.anchor_momentum < 1.0:
            raise UserError("algorithm.anchor_momentum must be in [0, 1), "
                            f"got {cfg.anchor_momentum}")

    def processes(self):
        return self.worker_processes(self.worker)

    def worker(self, ctx):
        job, cfg = self.job, self.cfg
        pull, beta = cfg.pull, cfg.anchor_momentum
        codec = make_codec(cfg.codec, cfg.codec_block)
        params = list(ctx.params.values())
        z = [p.detach().clone() for p in params]  # anchor z_1: the initial parameters
        u = [torch.zeros_like(t) for t in z] if beta > 0 else None
        tokens_per_step = sum(job.tokens_per_step(m) for m in range(job.M))
        rounds = job.rounds(cfg.H)
        if ctx.worker == 0:
            ctx.publish(z, 0, 0)
        pending, done = None, 0  # done: local steps so far
        for k, h in enumerate(rounds):
            yield ctx.train(h)
            if pending is not None:
                # The anchor z_k averages the y's of sync point k-1, i.e. rounds 1..k-1.
                z = yield ctx.wait(pending)
                if ctx.worker == 0:
                    ctx.publish(z, done * tokens_per_step, k)
            done += h
            with torch.no_grad():
                for p, a in zip(params, z):
                    p.mul_(1.0 - pull).add_(a, alpha=pull)  # exact at pull = 0 and pull = 1
                if u is None:
                    y = [p.detach().clone() for p in params]  # a snapshot: x keeps training
                else:
                    for b, a, p in zip(u, z, params):
                        b.mul_(beta).add_(a - p)  # u starts at 0, so the first u is z - x
                    y = [a - b for a, b in zip(z, u)]
            if cfg.reset_inner_state_each_round:
                ctx.reset_optimizer()
            pending = ctx.start_all_reduce(y, codec)  # overlaps the next H local steps
        # End of run: the last sync point's mean is the final global model.
        z = yield ctx.wait(pending)
        if ctx.worker == 0:
            ctx.publish(z, done * tokens_per_step, len(rounds))


ALGORITHM = OverlapLocalSGD
SETTINGS = OverlapSettings
