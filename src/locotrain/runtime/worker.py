"""One worker's private training state, shared by both runtimes: working parameters, the
inner optimizer, its data shard and random stream, and the inner step."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data import Shard
from ..optim import inner_optimizer, lr_at
from ..workloads import Workload


class WorkerState:
    def __init__(self, index: int, workload: Workload, params0: dict[str, torch.Tensor],
                 shard: Shard, batch_size: int, train: TrainConfig, planned_steps: int):
        self.index = index
        self.workload = workload
        self.shard = shard
        self.batch_size = batch_size
        self.cfg = train
        self.planned_steps = planned_steps
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params0.items()}
        self.tensors = list(self.params.values())
        self.generator = torch.Generator().manual_seed(train.seed * 1_000_003 + 7919 * index + 1)
        self.steps = 0
        self.opt = self._make_optimizer()

    def _make_optimizer(self):
        c = self.cfg
        return inner_optimizer(self.params, c.optimizer, c.lr, (c.beta1, c.beta2), c.weight_decay)

    def reset_optimizer(self) -> None:
        self.opt = self._make_optimizer()

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.workload.spec.seq_len

    def _set_lr(self, progress: float | None) -> None:
        if progress is None:
            progress = self.steps / self.planned_steps
        c = self.cfg
        lr = lr_at(progress, c.lr, c.warmup, c.min_lr_ratio, step=1 / self.planned_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _backward(self) -> torch.Tensor:
        batch = self.shard.batch(self.batch_size, self.workload.window, self.generator)
        loss = self.workload.loss(self.params, batch, self.generator)
        for p in self.tensors:
            p.grad = None
        loss.backward()
        return loss.detach()

    def _step(self, progress: float | None) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.tensors, self.cfg.grad_clip, foreach=True)
        self._set_lr(progress)
        self.opt.step()
        self.steps += 1

    def train(self, steps: int, progress: float | None = None,
              progress_end: float | None = None, between_steps=None) -> torch.Tensor:
        """`steps` inner steps; returns the summed training loss as a 0-d tensor (no sync).
        Step i's LR position is progress + (progress_end - progress) i / steps, or the
        worker's own step count if both are None. `between_steps` (the real runtime's) runs
        after every step."""
        total = torch.zeros((), device=self.workload.device)
        for i in range(steps):
            total += self._backward()
            p = progress
            if progress is not None and progress_end is not None:
                p = progress + (progress_end - progress) * i / steps
            self._step(p)
            if between_steps is not None:
                between_steps()
        return total

    def gradients(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        loss = self._backward()
        return [p.grad for p in self.tensors], loss

    def apply(self, grads: list[torch.Tensor], progress: float | None = None) -> None:
        for p, g in zip(self.tensors, grads):
            p.grad = g
        self._step(progress)
