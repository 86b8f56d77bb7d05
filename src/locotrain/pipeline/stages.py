"""The char GPT of models/backbone.py cut into pipeline stages, with 2BP's split backward.

Stage 0 holds the embedding and the first blocks, the last stage the last blocks, the final
norm, the head and the loss; blocks are spread as evenly as possible. The block is the
backbone's (nanochat-style: rotary, QK-norm, ReLU^2 MLP, no biases) written out again for
one model without the worker dimension, because backbone.forward runs the whole network in
one call. tests/test_pipeline.py pins the stages, run one after another, to
backbone.forward_one's logits, so the two cannot drift apart silently.

Every weight is used through `Ops.linear` / `Ops.embed`, which is where the backward split
happens (2BP: Rae, Lee, Richings, arXiv 2405.18047; the same B/W split as zero-bubble
pipelines, Qi et al., arXiv 2401.10241):
* plain: ordinary autograd; one backward computes input and weight gradients together.
* stash: a custom autograd function whose backward returns only the input gradient (p1) and
  keeps (layer input, output gradient) per weight; `weight_grads` later turns them into the
  weight gradients (p2), optionally with the micro-batches concatenated into one matmul.
The other 2BP variant (p1 as torch.autograd.grad w.r.t. the stage input with retain_graph,
p2 as torch.autograd.grad w.r.t. the weights) needs no custom function and lives in
inprocess.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.backbone import Backbone, block
from ..models.backbone import _rms_norm  # the same norm as the backbone's


def split_blocks(depth: int, S: int) -> list[range]:
    """Blocks of each stage, as even as possible (the first stages take one more)."""
    if not 1 <= S <= depth:
        raise ValueError(f"need 1 <= stages <= depth, got {S} stages for {depth} blocks")
    sizes = [depth // S + (1 if s < depth % S else 0) for s in range(S)]
    starts = [sum(sizes[:s]) for s in range(S)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def stage_param_names(spec: Backbone, S: int, s: int) -> list[str]:
    names = ["wte"] if s == 0 else []
    for i in split_blocks(spec.depth, S)[s]:
        names += [f"h{i}.{w}" for w in ("wq", "wk", "wv", "wo", "fc", "proj")]
    return names + (["head"] if s == S - 1 else [])


class _StashLinear(torch.autograd.Function):
    """y = x w^T whose backward gives x its gradient and keeps (x, dy) for the weight's."""

    @staticmethod
    def forward(ctx, x, w, name, stash):
        ctx.save_for_backward(x, w)
        ctx.name, ctx.stash = name, stash
        return x @ w.t()

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        # detached: an unpacked saved input carries its grad_fn, so the stash (shared by a
        # stage's layers) would hold a later layer's input whose grad_fn chain reaches an
        # earlier layer's node, whose ctx holds the stash: a cycle through C++ that Python's
        # gc cannot break. Every step's stash leaked that way (13.6 MB a step on a 4 x 64
        # model on the CPU; 64 GB of GPU memory at 6 x 384 on an H200).
        ctx.stash.append((ctx.name, x.detach(), gy.detach()))
        return gy @ w, None, None, None


class _StashEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, w, name, stash):
        ctx.save_for_backward(tokens)
        ctx.name, ctx.stash = name, stash
        return F.embedding(tokens, w)

    @staticmethod
    def backward(ctx, gy):
        (tokens,) = ctx.saved_tensors
        ctx.stash.append((ctx.name, tokens, gy.detach()))
        return None, None, None, None


class Ops:
    """How a stage uses its weights: plainly, or stashing the weight-gradient inputs."""

    def __init__(self, stash: list | None = None):
        self.stash = stash  # None: plain autograd

    def linear(self, x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = x2 @ w.t() if self.stash is None else _StashLinear.apply(x2, w, name, self.stash)
        return y.view(*shape[:-1], w.shape[0])

    def embed(self, tokens: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        if self.stash is None:
            return F.embedding(tokens, w)
        return _StashEmbedding.apply(tokens, w, name, self.stash)


@torch.no_grad()
def weight_grads(entries: list[tuple], shapes: dict[str, tuple], concat: bool = False,
                 into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """2BP's p2: dL/dW from the kept (input, output gradient) pairs of one or more
    micro-batches. `concat` joins the pairs of each weight into one matmul (the paper's
    concatenation of micro-batches for p2), otherwise one matmul per micro-batch and weight.
    `into` accumulates in place into the gradients already there (and adds the missing ones),
    which saves a fresh buffer and an addition per weight and call (the multi-process runner
    calls p2 once per micro-batch)."""
    by_name: dict[str, list[tuple]] = {}
    for name, x, gy in entries:
        by_name.setdefault(name, []).append((x, gy))
    out = {} if into is None else into
    for name, pairs in by_name.items():
        if concat and len(pairs) > 1:
            pairs = [(torch.cat([x.reshape(-1) if x.dtype == torch.long else x for x, _ in pairs]),
                      torch.cat([gy.reshape(-1, gy.shape[-1]) for _, gy in pairs]))]
        g = out.get(name)
        if g is None:
            gy0 = pairs[0][1]
            g = out[name] = torch.zeros(shapes[name], dtype=gy0.dtype, device=gy0.device)
        for x, gy in pairs:
            if x.dtype == torch.long:  # embedding: scatter the rows' gradients
                g.index_add_(0, x.reshape(-1), gy.reshape(-1, gy.shape[-1]))
            else:
                g.addmm_(gy.reshape(-1, gy.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
    return out


def stage_forward(spec: Backbone, params: dict[str, torch.Tensor], S: int, s: int,
                  x: torch.Tensor, rotary, ops: Ops, targets: torch.Tensor | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """Stage s: tokens (B, T) or hidden (B, T, width) in; hidden out, or on the last stage the
    mean cross-entropy over `targets` times `scale` (1/m for m micro-batches)."""
    if spec.dropout or spec.latent_input:
        raise ValueError("the pipeline stages support dropout = 0 and no latent input only")
    B, T = x.shape[:2]
    cos, sin = rotary[0][:T], rotary[1][:T]
    if s == 0:
        x = _rms_norm(ops.embed(x, params["wte"], "wte"))
    x = x.reshape(1, B * T, spec.width)  # the backbone's blocks take a stack of models
    for i in split_blocks(spec.depth, S)[s]:
        x = block(spec, i, x, B, cos, sin, lambda h, name: ops.linear(h, params[name], name))
    x = x.view(B, T, spec.width)
    if s < S - 1:
        return x
    logits = ops.linear(_rms_norm(x), params["head"], "head").float()
    if spec.softcap > 0:
        logits = spec.softcap * torch.tanh(logits / spec.softcap)
    if targets is None:
        return logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) * scale
