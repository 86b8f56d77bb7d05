"""One-outer-step-delay DiLoCo with eager updates (Kale, Douillard, Donchev 2025,
arXiv 2502.12996); see docs/algorithms.md section 3.

DiLoCo blocks at the end of every round until the mean outer gradient has arrived. Here the
all-reduce of round t's outer gradients may take a whole inner phase: it is started at the end
of round t and only waited for at the end of round t+1, while the next H inner steps run.
Every replica m therefore keeps its own outer parameters x_m, its own outer Nesterov state and
its own previous delta D_m^{t-1}. At the end of round t (Dbar^s = mean over replicas of D^s):

    D_m^t = x_m^{t-1} - phi_m^t                 start all-reduce(D_m^t) -> Dbar^t (later)
    Dbar^{t-1} = wait for the all-reduce started in round t-1 (zeros in round 1)
    eager:  input = Dbar^{t-1} + (D_m^t - D_m^{t-1}) / M   (own fresh term replaces own stale)
    naive:  input = Dbar^{t-1}                             (same on every replica)
    x_m^t = Outer_m(x_m^{t-1}, input);  phi_m := x_m^t

The first round uses Dbar^0 = D_m^0 = 0 (a [design] choice of docs/algorithms.md 3.1): eager
applies only D_m^1 / M, naive applies nothing.

End of run (our choice; the spec leaves it open): after round T the mean Dbar^T is still in
flight. We wait for it and take one last outer step with input Dbar^T - D_m^T / M (eager; the
own term D_m^T / M was already applied in round T) or Dbar^T (naive). The inputs of every
replica then sum to Dbar^1 + ... + Dbar^T: every mean enters its (linear) Nesterov exactly
once, and no replica's own work is lost or counted twice. This wait is the only blocking
communication of a run. With outer momentum the last step still carries the momentum term,
as any outer step does.

The global model is replica 0's x_0 (replicas differ only in when their own term was applied).
With M=1 eager applies D^t in round t: DiLoCo up to float rounding (pinned by a test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import Nesterov
from ..runtime.api import Algorithm


@dataclass
class EagerSettings(CodecSettings):
    mode: str = choice("eager", "eager", "naive")
    H: int = 50  # inner steps per round (the paper: 30 and 100)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    reset_inner_state_each_round: bool = False


class EagerDiLoCo(Algorithm):
    """DiLoCo's rounds with a delayed outer step."""

    name = "eager"

    def __init__(self, cfg: EagerSettings, job):
        super().__init__(cfg, job)
        if cfg.H < 1:
            raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")

    def processes(self):
        return self.worker_processes(self.worker)

    def worker(self, ctx):
        job, cfg = self.job, self.cfg
        M, eager = job.M, cfg.mode == "eager"
        codec = make_codec(cfg.codec, cfg.codec_block)
        params = list(ctx.params.values())
        x = [p.detach().clone() for p in params]  # this replica's own outer parameters
        outer = Nesterov(cfg.outer_lr, cfg.outer_momentum)  # this replica's own
        tokens_per_step = sum(job.tokens_per_step(m) for m in range(M))
        zeros = [torch.zeros_like(t) for t in x]
        prev_own, prev_mean, pending = zeros, zeros, None  # D_m^{t-1}, Dbar^{t-1}, h_{t-1}
        if ctx.worker == 0:
            ctx.publish(x, 0, 0)
        done, rounds = 0, job.rounds(cfg.H)
        for r, h in enumerate(rounds):
            yield ctx.train(h)
            done += h
            with torch.no_grad():
                own = [t - p for t, p in zip(x, params)]  # D_m^t, never modified afterwards
            handle = ctx.start_all_reduce(own, codec)  # hidden behind the next inner phase
            if pending is not None:
                prev_mean = yield ctx.wait(pending)
            outer.step(x, self._input(eager, M, prev_mean, own, prev_own))
            self._load(params, x)
            if cfg.reset_inner_state_each_round:
                ctx.reset_optimizer()
            prev_own, pending = own, handle
            ctx.record_replica(x)  # replicas drift apart by when their own terms entered
            if ctx.worker == 0:
                ctx.publish(x, done * tokens_per_step, r + 1)
        # Flush: the last mean enters once; eager removes the own term applied in round T.
        last_mean = yield ctx.wait(pending)
        outer.step(x, self._input(eager, M, last_mean, zeros, prev_own))
        self._load(params, x)
        ctx.record_replica(x)
        if ctx.worker == 0:
            # Still round T's update completed, not a new round: same tokens and count.
            ctx.publish(x, done * tokens_per_step, len(rounds))

    @staticmethod
    def _input(eager: bool, M: int, mean, own, prev_own):
        """Outer-optimizer input: mean + (own - prev_own)/M (eager) or the mean (naive)."""
        if not eager:
            return mean
        with torch.no_grad():
            return [b + (d - q) / M for b, d, q in zip(mean, own, prev_own)]

    @staticmethod
    def _load(params, x) -> None:
        with torch.no_grad():
            for p, t in zip(params, x):
                p.copy_(t)


ALGORITHM = EagerDiLoCo
SETTINGS = EagerSettings
