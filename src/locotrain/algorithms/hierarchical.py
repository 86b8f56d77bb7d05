"""Hierarchical DiLoCo: data-parallel inside each region, DiLoCo across regions.

The workers of one region are one replica in DiLoCo's sense: every inner step they average
their gradients with an fp32 all-reduce over the region's group (weighted by batch size, as
ddp.py, so the mean is the gradient of the region's whole batch) and take the same AdamW step,
so they hold the same parameters. Every H steps the regions sync as DiLoCo replicas: the outer
gradient delta = theta - phi of every region is averaged, weighted by the region's share of
the tokens per step (B_r / B), and every worker applies the same outer Nesterov step. Fast
links carry the per-step traffic; the slow ones carry one model per H steps.

`outer_sync` says who takes part in the outer all-reduce (with `codec`):

* `all` (default): every worker, contributing its region's delta scaled by
  B_r M / (B n_r). With `cluster.allreduce = "hierarchical"` the simulator times that
  exchange as reduce-scatter in each region, a ring of region leaders and an all-gather.
* `leaders`: only each region's lowest-numbered worker, contributing delta B_r R / B to a ring
  of R leaders; each leader then sends the mean (fp32, exact) to the rest of its region. The
  WAN pipes carry 2(R-1)/R of a model per leader instead of 2(M-1)/M per worker, in 2(R-1)
  latencies instead of 2(M-1).

Special cases (tests/test_hierarchical.py): one worker per region is DiLoCo; one region is
DDP (there is nothing to sync across regions, so no outer step is taken at all). A region
with no worker is an error.

`outer = "streaming"` syncs across regions as Streaming DiLoCo does (streaming.py's own
schedule: fragments in turn, each all-reduce overlapping `tau` inner steps, merged with
`alpha`), with the region's data-parallel steps as the inner steps; it needs
`outer_sync = "all"`. One worker per region is then Streaming DiLoCo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import Nesterov
from ..runtime.api import Algorithm
from .streaming import StreamingDiLoCo, StreamingSettings


@dataclass
class HierarchicalSettings(CodecSettings):
    """DiLoCo's outer optimizer and H (diloco.py's defaults); `codec` encodes the outer sync
    only, the per-step gradient all-reduce inside a region is fp32."""
    H: int = 50  # inner (data-parallel) steps per outer round
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_sync: str = choice("all", "all", "leaders")  # who joins the outer all-reduce
    outer: str = choice("diloco", "diloco", "streaming")  # how regions sync
    # outer = "streaming" only (streaming.py's meaning and defaults):
    fragments: int = 0
    tau: int = 1
    alpha: float = 0.5


class Hierarchical(Algorithm):
    name = "hierarchical"

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        if cfg.H < 1:
            raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")
        self.regions = [[w.index for w in job.workers if w.region == r]
                        for r in range(len(job.regions))]
        for name, members in zip(job.regions, self.regions):
            if not members:
                raise UserError(f"hierarchical: region '{name}' has no worker; put a worker in "
                                f"it or remove it from cluster.regions")
        self.leaders = tuple(m[0] for m in self.regions)
        self.streaming = None
        if cfg.outer == "streaming":
            if cfg.outer_sync != "all":
                raise UserError("hierarchical: outer = \"streaming\" syncs its fragments among "
                                "all workers; set algorithm.outer_sync = \"all\"")
            self.streaming = StreamingDiLoCo(StreamingSettings(
                codec=cfg.codec, codec_block=cfg.codec_block, H=cfg.H, outer_lr=cfg.outer_lr,
                outer_momentum=cfg.outer_momentum, fragments=cfg.fragments, tau=cfg.tau,
                alpha=cfg.alpha), job)

    def processes(self):
        return self.worker_processes(self.worker)

    def groups(self):
        everyone = tuple(range(self.job.M))
        groups = [tuple(m) for m in self.regions if 1 < len(m) < self.job.M]
        if self.cfg.outer_sync == "leaders" and 1 < len(self.leaders) < self.job.M:
            groups.append(self.leaders)
        return [g for g in groups if g != everyone]

    def _group(self, members) -> tuple[int, ...] | None:
        return None if len(members) == self.job.M else tuple(members)

    def worker(self, ctx):
        job, cfg = self.job, self.cfg
        me = ctx.worker
        codec, fp32 = make_codec(cfg.codec, cfg.codec_block), make_codec("fp32")
        params = list(ctx.params.values())
        region = self.regions[job.workers[me].region]
        batch = [w.batch_size for w in job.workers]
        B, B_r, R = sum(batch), sum(batch[m] for m in region), len(self.regions)
        # Gradients weighted by batch so the region's mean is its whole batch's gradient.
        weight = batch[me] * len(region) / B_r
        # The outer gradient is weighted by the region's share of the tokens (exactly 1 with
        # equal regions): a mean over all M workers is then the batch-weighted mean of regions.
        outer_scale = B_r * job.M / (B * len(region))

        def region_steps(n):
            """n data-parallel steps of this worker's region."""
            for _ in range(n):
                grads = yield ctx.gradients()
                if len(region) > 1:
                    if weight != 1.0:
                        grads = [g * weight for g in grads]
                    grads = yield ctx.all_reduce(grads, fp32, self._group(region))
                yield ctx.apply(grads)

        if self.streaming is not None and R > 1:
            yield from self.streaming.worker(ctx, inner=region_steps, scale=outer_scale)
            return
        tokens_per_step = sum(job.tokens_per_step(m) for m in range(job.M))
        theta = [p.detach().clone() for p in params]
        outer = Nesterov(cfg.outer_lr, cfg.outer_momentum)
        if me == 0:
            ctx.publish(theta, 0, 0)
        step = 0
        for r, h in enumerate(job.rounds(cfg.H) if R > 1 else [job.planned_steps]):
            for _ in range(h):
                yield from region_steps(1)
                step += 1
                if R == 1 and me == 0:  # one region: data-parallel, nothing more
                    ctx.publish(params, step * tokens_per_step, step)
            if R == 1:
                break
            with torch.no_grad():
                delta = [t - p for t, p in zip(theta, params)]
            if cfg.outer_sync == "all":
                mean = yield ctx.all_reduce([d * outer_scale for d in delta]
                                            if outer_scale != 1 else delta, codec, None)
            elif me == region[0]:
                scale = B_r * R / B
                mean = yield ctx.all_reduce([d * scale for d in delta] if scale != 1 else delta,
                                            codec, self._group(self.leaders))
                for m in region[1:]:
                    ctx.send(job.worker_name(m), mean, fp32, {"round": r})
            else:
                mean = (yield ctx.recv(src=job.worker_name(region[0]))).tensors
            outer.step(theta, mean)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            if me == 0:
                ctx.publish(theta, step * tokens_per_step, r + 1)


ALGORITHM = Hierarchical
SETTINGS = HierarchicalSettings
