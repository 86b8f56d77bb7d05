"""Inner optimizers (AdamW, Lion), the learning-rate schedule, and outer optimizers
(Nesterov, delayed Nesterov) acting on lists of tensors.

Outer gradients follow the convention of DiLoCo, torchft and HALoS: delta = start - end, so
every outer optimizer subtracts it, like an ordinary gradient.
"""

from __future__ import annotations

import math

import torch

Tensors = list[torch.Tensor]


# --------------------------------------------------------------------------- schedule


def lr_at(progress: float, lr: float, warmup: float, min_ratio: float, step: float = 0.0) -> float:
    """The learning rate of the step that starts at `progress` (a fraction of the budget):
    linear warm-up over the first `warmup` fraction, then cosine down to lr * min_ratio.

    `step` is one step's share of the budget. Warm-up runs lr (progress + step) / (warmup +
    step), so step s of a run with W warm-up steps trains at lr (s + 1) / (W + 1), as nanoGPT
    does: the first step already moves, none trains at 0."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return lr * (progress + step) / (warmup + step)
    span = max(1e-12, 1.0 - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / span))
    return lr * (min_ratio + (1.0 - min_ratio) * cosine)


# --------------------------------------------------------------------------- inner


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, arXiv 2302.06675): the update is the sign of an interpolation
    between momentum and gradient; one state buffer; decoupled weight decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = (beta1 * m + (1 - beta1) * p.grad).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def inner_optimizer(params: dict[str, torch.Tensor], name: str, lr: float, betas, weight_decay):
    """AdamW or Lion over a parameter dict; weight decay on matrices only."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    fused = all(p.is_cuda for p in params.values())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


# --------------------------------------------------------------------------- stacked


def _per_worker(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(W,) -> (W, 1, ..., 1), broadcasting over one stacked tensor's own dimensions."""
    return values.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def clip_stacked(grads: Tensors, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for W workers at once: every tensor leads with the
    worker dimension, and each worker's gradient is clipped by its own total norm.
    Returns the norms (W,)."""
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s epsilon
    for g in grads:
        g.mul_(_per_worker(coef, g).to(g.dtype))
    return norms


@torch.no_grad()
def adamw_stacked(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  decays: list[bool], steps: torch.Tensor, lr: torch.Tensor, betas,
                  weight_decay: torch.Tensor, eps: float = 1e-8) -> None:
    """torch.optim.AdamW's update (its single-tensor arithmetic) for W workers at once. Every
    tensor leads with the worker dimension; `steps` (the step count including this one),
    `lr` and `weight_decay` are (W,) so that each worker keeps its own schedule, bias
    correction and decay; `decays` says which tensors are decayed (matrices)."""
    beta1, beta2 = betas
    bias1 = 1 - beta1 ** steps
    bias2_sqrt = (1 - beta2 ** steps).sqrt()
    step_size = lr / bias1
    for p, g, m, v, decay in zip(params, grads, exp_avgs, exp_avg_sqs, decays):
        if decay:
            p.mul_(_per_worker(1 - lr * weight_decay, p))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / _per_worker(bias2_sqrt, v)).add_(eps)
        p.addcdiv_(m * _per_worker(-step_size, m), denom)


@torch.no_grad()
def lion_stacked(params: Tensors, grads: Tensors, exp_avgs: Tensors, decays: list[bool],
                 lr: torch.Tensor, betas, weight_decay: torch.Tensor) -> None:
    """Lion's update (the class below) for W workers at once, as adamw_stacked."""
    beta1, beta2 = betas
    for p, g, m, decay in zip(params, grads, exp_avgs, decays):
        update = m.lerp(g, 1 - beta1).sign_()
        if decay:
            p.mul_(_per_worker(1 - lr * weight_decay, p))
        p.sub_(update * _per_worker(lr, p))
        m.lerp_(g, 1 - beta2)


# --------------------------------------------------------------------------- outer


class Nesterov:
    """PyTorch SGD(momentum=mu, nesterov=True, dampening=0) on an outer gradient:
        b <- mu*b + delta;   theta <- theta - lr*(delta + mu*b)
    With lr=1 and mu=0 the step is theta <- theta - delta: plain parameter averaging."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.buf: Tensors | None = None

    @torch.no_grad()
    def step(self, theta: Tensors, delta: Tensors) -> None:
        if self.momentum == 0:
            torch._foreach_add_(theta, delta, alpha=-self.lr)
            return
        if self.buf is None:
            self.buf = [d.clone() for d in delta]
        else:
            torch._foreach_mul_(self.buf, self.momentum)
            torch._foreach_add_(self.buf, delta)
        update = torch._foreach_add(delta, self.buf, alpha=self.momentum)
        torch._foreach_add_(theta, update, alpha=-self.lr)


class DelayedNesterov:
    """Delayed Nesterov for a parameter server (Liu et al. 2024, arXiv 2401.09135; the exact
    rule as implemented in github.com/utnslab/halos, src/halos/opt.py).

    Every arrival moves theta by lr*delta/N at once; every N-th arrival also folds the
    buffer's average into the momentum and applies it. With c=0, after each full buffer the
    parameters equal Nesterov SGD applied to the buffer averages. `c` (momentum activation,
    0 <= c <= 1/N) applies a fraction of the momentum at every arrival instead.
    """

    def __init__(self, lr: float, momentum: float, buffer_size: int, activation: float = 0.0):
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.lr, self.momentum, self.N, self.c = lr, momentum, buffer_size, activation
        self.m: Tensors | None = None
        self.acc: Tensors | None = None
        self.arrivals = 0

    @torch.no_grad()
    def step(self, theta: Tensors, delta: Tensors) -> None:
        N, c, beta = self.N, self.c, self.momentum
        if self.m is None:
            self.m = [torch.zeros_like(d) for d in delta]
            self.acc = [torch.zeros_like(d) for d in delta]
        self.arrivals += 1
        torch._foreach_add_(self.acc, delta)
        if self.arrivals % N == 0:
            torch._foreach_mul_(self.m, beta)
            torch._foreach_add_(self.m, self.acc, alpha=1.0 / N)
            torch._foreach_add_(theta, self.m, alpha=-self.lr * (1 - c * N + c) * beta)
            for a in self.acc:
                a.zero_()
        elif c > 0:
            torch._foreach_add_(theta, self.m, alpha=-self.lr * c * beta)
        torch._foreach_add_(theta, delta, alpha=-self.lr / N)
