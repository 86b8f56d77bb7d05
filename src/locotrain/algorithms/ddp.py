"""Data-parallel training: every inner step, the workers average their gradients with one
all-reduce and take the same optimizer step. The baseline every other algorithm is
measured against. Communication is not overlapped with the backward pass (real DDP buckets
overlap it), matching the analytic model of docs/algorithms.md section 12.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..codecs import make_codec
from ..config import CodecSettings
from ..runtime.api import Algorithm


@dataclass
class DDPSettings(CodecSettings):
    """Data-parallel reads only the codec of its gradient all-reduce."""


class DDP(Algorithm):
    name = "ddp"

    def processes(self):
        return self.worker_processes(self.worker)

    def worker(self, ctx):
        job = self.job
        codec = make_codec(self.cfg.codec, self.cfg.codec_block)
        params = list(ctx.params.values())
        batches = [w.batch_size for w in job.workers]
        # Weight gradients by batch size so the mean is the gradient of the global batch.
        weight = batches[ctx.worker] * job.M / sum(batches)
        tokens_per_step = sum(job.tokens_per_step(m) for m in range(job.M))
        if ctx.worker == 0:
            ctx.publish(params, 0, 0)
        for step in range(job.planned_steps):
            grads = yield ctx.gradients()
            if weight != 1.0:
                grads = [g * weight for g in grads]
            mean = yield ctx.all_reduce(grads, codec)
            yield ctx.apply(mean)
            if ctx.worker == 0:
                ctx.publish(params, (step + 1) * tokens_per_step, step + 1)


ALGORITHM = DDP
SETTINGS = DDPSettings
