"""Data-parallel training: every inner step, the workers average their gradients and take the
same optimizer step. The baseline every other algorithm is measured against.

`bucket_mb = 0` (default): one all-reduce of the whole gradient after the backward pass,
blocking, so all of it is exposed (the analytic model of docs/algorithms.md section 12).
`bucket_mb > 0`: what real DDP does (torch.nn.parallel.DistributedDataParallel, its
`bucket_cap_mb`, default 25): the gradients are grouped into buckets of about that many MB
of float32 values, in reverse parameter order (the order the backward pass produces them),
and each bucket's all-reduce starts as soon as its gradients exist, overlapping the rest of
the backward pass (runtime/api.py, `gradients(buckets=...)`). The step ends when the last
bucket's all-reduce is done and the optimizer has stepped. torch DDP makes its first bucket
small (1 MB) so that communication starts early; we do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..codecs import make_codec
from ..config import CodecSettings
from ..errors import UserError
from ..runtime.api import Algorithm


@dataclass
class DDPSettings(CodecSettings):
    """Data-parallel reads the codec of its gradient all-reduce and its bucket size."""
    bucket_mb: float = 0.0  # MB of float32 gradient per bucket, overlapped with backward; 0 = none


def buckets(shapes: list[tuple[int, ...]], bucket_mb: float) -> list[list[int]]:
    """Parameter indices in buckets of at least one parameter and at most about `bucket_mb`
    MB (2^20 bytes) of float32 values, last parameter first (torch DDP's greedy filling)."""
    cap = bucket_mb * 2**20 / 4
    out, current, size = [], [], 0
    for i in reversed(range(len(shapes))):
        n = math.prod(shapes[i])
        if current and size + n > cap:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return out + [current] if current else out


class DDP(Algorithm):
    name = "ddp"
    heals = True  # its group re-forms when workers crash, restart or join

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        if not cfg.bucket_mb >= 0:
            raise UserError(f"algorithm.bucket_mb must be >= 0 (0 = no overlap), got {cfg.bucket_mb}")

    def processes(self):
        return self.worker_processes(self.worker)

    def worker(self, ctx):
        job = self.job
        codec = make_codec(self.cfg.codec, self.cfg.codec_block)
        params = list(ctx.params.values())
        batches = [w.batch_size for w in job.workers]
        # Weight gradients by batch size so the mean is the gradient of the global batch.
        weight = batches[ctx.worker] * job.M / sum(batches)
        groups = buckets(job.param_shapes, self.cfg.bucket_mb) if self.cfg.bucket_mb > 0 else None
        first, in_model = 0, 0
        if ctx.rejoining:  # (cluster.on_crash = "drop") the peer's parameters and AdamW state
            healed = yield ctx.heal()  # come with the heal; the step and token count here
            if healed is None:
                return
            first, in_model = healed[1]["step"], healed[1]["tokens"]
        elif ctx.worker == 0:
            ctx.publish(params, 0, 0)
        for step in range(first, job.planned_steps):
            if groups is None:
                grads = yield ctx.gradients()
                if weight != 1.0:
                    grads = [g * weight for g in grads]
                mean = yield ctx.all_reduce(grads, codec)
            else:
                handles = yield ctx.gradients(buckets=groups, codec=codec, scale=weight)
                mean = [None] * len(params)
                for bucket, handle in zip(groups, handles):
                    for i, g in zip(bucket, (yield ctx.wait(handle))):
                        mean[i] = g
            yield ctx.apply(mean)
            # With a worker dropped the mean is over those alive (weighted by the whole
            # group's batches: exact for equal batches).
            averaged = ctx.participants()
            in_model += sum(job.tokens_per_step(m) for m in averaged)
            ctx.share([], {"step": step + 1, "tokens": in_model})
            if ctx.worker == min(averaged):
                ctx.publish(params, in_model, step + 1)


ALGORITHM = DDP
SETTINGS = DDPSettings
