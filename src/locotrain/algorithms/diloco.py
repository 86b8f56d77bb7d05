"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): every worker runs H inner steps from
the global parameters theta, the outer gradient delta_m = theta - phi_m is averaged with one
all-reduce, and every worker applies the same outer Nesterov step to its copy of theta.

With M=1, outer_lr=1 and outer_momentum=0 this is plain training; with outer_lr=1 and
outer_momentum=0 it is parameter averaging (FedAvg). Both are pinned by tests.

`dylu = true` gives HALoS's "DiLoCo + DynUpd" baseline: worker w runs
H_w = H * v_w / max v steps per round (v = step rate), so that on unequal hardware every
worker finishes its round at about the same time; the learning rate then follows the share
of the token budget spent when a round starts.

With cluster.on_crash = "drop" the group re-forms (runtime/api.py, `participants`): a round
averages the outer gradients of the workers alive at its all-reduce, and a worker that
restarts or joins heals from a live peer (theta, the outer momentum, the round) and trains
from the next round on. The model counts the tokens of the workers that were averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import Nesterov
from ..runtime.api import Algorithm
from .parameter_server import dylu_steps, modelled_rate
from .streaming import dag_window


@dataclass
class DiLoCoSettings(CodecSettings):
    """The paper's outer optimizer (Nesterov, lr 0.7, momentum 0.9). Its H is 500 over
    88,000 steps; our default of 50 suits runs of a few thousand steps."""
    H: int = 50  # inner steps per round
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    reset_inner_state_each_round: bool = False
    dylu: bool = False  # HALoS's "DiLoCo + DynUpd": steps per round scaled by worker speed
    dylu_rounding: str = choice("ceil", "ceil", "floor")  # ceil, as HALoS's baseline
    # Time the sync as the papers' per-layer DAG does (streaming.dag_window; for plans)
    layer_windows: bool = False


class DiLoCo(Algorithm):
    name = "diloco"
    heals = True  # its group re-forms when workers crash, restart or join

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        if cfg.H < 1:
            raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")

    def processes(self):
        return self.worker_processes(self.worker)

    def rounds(self) -> list[int]:
        return self.job.rounds(self.cfg.H)

    def speed_scaled_rounds(self) -> list[list[int]]:
        """With dynamic local updates: the steps of every worker in every round. The last
        round is shrunk in proportion so that the rounds spend the token budget."""
        job = self.job
        rates = [modelled_rate(w) for w in job.workers]
        steps = [dylu_steps(self.cfg.H, r, max(rates), self.cfg.dylu_rounding) for r in rates]
        per_round = sum(h * job.tokens_per_step(m) for m, h in enumerate(steps))
        full, left = divmod(job.total_tokens, per_round)
        rounds = [steps] * full
        if left:
            rounds.append([max(1, round(h * left / per_round)) for h in steps])
        return rounds

    def worker(self, ctx):
        job, cfg = self.job, self.cfg
        codec = make_codec(cfg.codec, cfg.codec_block)
        params = list(ctx.params.values())
        theta = [p.detach().clone() for p in params]
        outer = Nesterov(cfg.outer_lr, cfg.outer_momentum)
        if cfg.dylu:
            plan = self.speed_scaled_rounds()
        else:
            plan = [[h] * job.M for h in self.rounds()]
        round_tokens = [sum(h * job.tokens_per_step(m) for m, h in enumerate(steps))
                        for steps in plan]
        slack = dag_window(job.param_names, job.depth) if cfg.layer_windows else 0.0
        first, in_model = 0, 0  # the round to start with; tokens of the averaged workers
        if ctx.rejoining:
            healed = yield ctx.heal()
            if healed is None:
                return  # no live peer holds the model any more
            tensors, meta = healed
            first, in_model = meta["round"], meta["tokens"]
            with torch.no_grad():
                for t, p, v in zip(theta, params, tensors):
                    t.copy_(v)
                    p.copy_(v)  # the parameters that came with it may be mid-round ones
            outer.buf = [v.clone() for v in tensors[len(theta):]] or None
        elif ctx.worker == 0:
            ctx.publish(theta, 0, 0)
        for r in range(first, len(plan)):
            h = plan[r][ctx.worker]
            if cfg.dylu:  # the LR follows the share of the budget spent, step by step
                start = sum(round_tokens[:r])
                yield ctx.train(h, start / job.total_tokens,
                                (start + round_tokens[r]) / job.total_tokens)
            else:
                yield ctx.train(h)
            with torch.no_grad():
                delta = [t - p for t, p in zip(theta, params)]
            mean = yield ctx.wait(ctx.start_all_reduce(delta, codec), slack)
            averaged = ctx.participants()
            in_model += sum(plan[r][m] * job.tokens_per_step(m) for m in averaged)
            outer.step(theta, mean)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            if cfg.reset_inner_state_each_round:
                ctx.reset_optimizer()
            ctx.share(theta + (outer.buf or []), {"round": r + 1, "tokens": in_model})
            if ctx.worker == min(averaged):
                ctx.publish(theta, in_model, r + 1)


ALGORITHM = DiLoCo
SETTINGS = DiLoCoSettings
