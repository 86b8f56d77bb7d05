"""The one transformer backbone behind both workloads, written as a pure function.

nanochat-style (Karpathy, github.com/karpathy/nanochat, gpt.py of Oct 2025): rotary positions,
QK-norm after rotary, RMSNorm without parameters (after the embedding, before every block
and before the head), ReLU^2 MLP at 4x, no biases, untied head, zero-initialised head and
residual projections. Two knobs nanochat does not have: dropout (the nanoGPT char baseline
needs it to reach 1.47 nats) and `causal`, which is the only architectural difference
between the autoregressive GPT and the masked-diffusion model (tiny-diffusion's "is_causal=
False", github.com/nathan-barry/tiny-diffusion).

Parameters are a flat dict of tensors passed in on every call, each with a leading worker
dimension: `forward` runs W models at once (the batched engine's inner steps), and
`forward_one` is the one-model case (evaluation, sampling). Nothing here is an nn.Module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Backbone:
    vocab_in: int  # embedding rows (the diffusion model adds one for the mask token)
    vocab_out: int  # head columns (never includes the mask token)
    depth: int
    width: int
    heads: int
    seq_len: int
    causal: bool
    dropout: float = 0.0
    softcap: float = 0.0  # tanh logit soft-capping (nanochat uses 15); 0 disables
    latent_input: bool = False  # Loopholing: a carried hidden state is added to the input

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.width
        shapes: dict[str, tuple[int, ...]] = {"wte": (self.vocab_in, d)}
        for i in range(self.depth):
            shapes |= {
                f"h{i}.wq": (d, d),
                f"h{i}.wk": (d, d),
                f"h{i}.wv": (d, d),
                f"h{i}.wo": (d, d),
                f"h{i}.fc": (4 * d, d),
                f"h{i}.proj": (d, 4 * d),
            }
        if self.latent_input:
            shapes |= {"latent_ln.w": (d,), "latent_ln.b": (d,)}
        shapes["head"] = (self.vocab_out, d)
        return shapes

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 N (non-embedding) + 12 L d T (PaLM appendix B)."""
        n = self.num_params() - self.vocab_in * self.width
        return 6.0 * n + 12.0 * self.depth * self.width * self.seq_len


def init_params(spec: Backbone, generator: torch.Generator) -> Params:
    """nanochat's init: fan-in scaled normal for matrices, unit normal embedding, zeros for the
    head and for both residual projections (so every block starts as the identity)."""
    params: Params = {}
    for name, shape in spec.param_shapes().items():
        if name == "head" or name.endswith((".wo", ".proj", "latent_ln.b")):
            t = torch.zeros(shape)
        elif name == "latent_ln.w":
            t = torch.ones(shape)
        elif name == "wte":
            t = torch.randn(shape, generator=generator)
        else:
            fan_out, fan_in = shape
            std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
            t = torch.randn(shape, generator=generator) * std
        params[name] = t
    return params


def rotary_tables(spec: Backbone, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim/2), base 10,000."""
    half = spec.head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32, device=device) / half))
    angles = torch.outer(torch.arange(spec.seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, T, heads, head_dim); rotate the two halves of the head dimension.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (W, N, in) times each worker's own weight w (W, out, in): one batched matmul."""
    return torch.bmm(x, w.transpose(1, 2))


def block(spec: Backbone, i: int, x: torch.Tensor, B: int, cos: torch.Tensor,
          sin: torch.Tensor, linear, p_drop: float = 0.0, train: bool = False) -> torch.Tensor:
    """Transformer block i on the hidden states x (W, B*T, width) of W models; `linear(h,
    name)` applies weight `name` (a batched matmul here; the pipeline stages pass one that
    keeps what 2BP's deferred weight gradients need)."""
    W, N, d = x.shape
    T = N // B
    heads = (W * B, T, spec.heads, spec.head_dim)
    h = _rms_norm(x)
    q, k, v = (linear(h, f"h{i}.{w}").view(heads) for w in ("wq", "wk", "wv"))
    q, k = _rms_norm(_rotate(q, cos, sin)), _rms_norm(_rotate(k, cos, sin))
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=spec.causal, dropout_p=p_drop,
    )
    y = linear(y.transpose(1, 2).reshape(W, N, d), f"h{i}.wo")
    x = x + F.dropout(y, p_drop, training=train)
    h = _rms_norm(x)
    y = linear(F.relu(linear(h, f"h{i}.fc")).square(), f"h{i}.proj")
    return x + F.dropout(y, p_drop, training=train)


def forward(
    spec: Backbone,
    params: Params,
    tokens: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    *,
    latent: torch.Tensor | None = None,
    train: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W models at once, each with its own parameters and its own batch.

    params: every tensor with a leading worker dimension W; tokens (W, B, T) ->
    (logits (W, B, T, vocab_out) in float32, final hidden state (W, B, T, width)). One model
    is W = 1 (`forward_one`). Every matmul is a batched matmul over the workers and attention
    runs over W * B sequences, so W small models cost about what one model with a W times
    larger batch costs (the batched engine, runtime/engine.py).

    `latent` (W, B, T, width) is the Loopholing input: the previous denoising step's final
    hidden state, layer-normalised and added to the token embedding before the embedding norm.
    """
    W, B, T = tokens.shape
    N, d = B * T, spec.width
    cos, sin = rotary[0][:T], rotary[1][:T]
    p_drop = spec.dropout if train else 0.0
    # Row w of the stacked table holds worker w's embedding: offset the ids into it.
    offsets = (torch.arange(W, device=tokens.device) * spec.vocab_in).view(W, 1, 1)
    x = F.embedding(tokens + offsets, params["wte"].reshape(W * spec.vocab_in, d)).view(W, N, d)
    x = F.dropout(x, p_drop, training=train)  # as nanoGPT's embedding dropout
    if latent is not None:
        w, b = params["latent_ln.w"], params["latent_ln.b"]
        x = x + F.layer_norm(latent.reshape(W, N, d), (d,)) * w[:, None, :] + b[:, None, :]
    x = _rms_norm(x)
    for i in range(spec.depth):
        x = block(spec, i, x, B, cos, sin, lambda h, name: _linear(h, params[name]), p_drop, train)
    hidden = _rms_norm(x)
    logits = _linear(hidden, params["head"]).float()
    if spec.softcap > 0:
        logits = spec.softcap * torch.tanh(logits / spec.softcap)
    return logits.view(W, B, T, -1), hidden.view(W, B, T, d)


def forward_one(spec: Backbone, params: Params, tokens: torch.Tensor, rotary, *,
                latent: torch.Tensor | None = None, train: bool = False):
    """One model: params without the worker dimension, tokens (B, T)."""
    stacked = {k: v.unsqueeze(0) for k, v in params.items()}
    logits, hidden = forward(spec, stacked, tokens.unsqueeze(0), rotary,
                             latent=None if latent is None else latent.unsqueeze(0), train=train)
    return logits[0], hidden[0]
