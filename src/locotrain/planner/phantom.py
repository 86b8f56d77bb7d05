"""Phantom compute: a model that has sizes and no values, for planning clusters far bigger than
this machine with the algorithm files as they are (`loco plan`, docs/planner.md).

A phantom workload is a parameter count, a layer count and a step time (given, or derived from
FLOPs per token); its tensors are `PhantomTensor`s, which know their shape and nothing else.
The algorithms run unchanged: every tensor operation they write returns another phantom of
the right shape at once, the engine's jobs only advance the clock (runtime/engine.py,
`Engine.phantom`), and the simulator charges collectives and messages the bytes of the
declared sizes without doing their arithmetic (runtime/collectives.py, runtime/sim.py).

Why a small class and not torch's "meta" device. Meta tensors support every op our
algorithms use, but each op goes through the dispatcher: measured on this 2-core machine
(torch 2.13, shared with other jobs) 270-610 us per op of the kinds our algorithms run,
against 0.8-2 us here (benchmarks/planner_scale.py prints both). A 100B-parameter Streaming
DiLoCo plan with 1,000 rounds runs ~10^6 such ops: minutes with meta tensors, about a second
with these.
torch functions reach the class through `__torch_function__` (torch.cat, torch.stack,
torch.zeros_like, torch._foreach_*, ...), methods and operators are plain Python.

Rules, enough for every algorithm in algorithms/ (tests/test_planner.py runs them all):
in-place ops (names ending in "_") return self; out-of-place ops return a new phantom of the
broadcast shape of their phantom arguments; reductions without a dim return a scalar
phantom; `torch._foreach_*` returns a list (out-of-place) or None (in-place). `.item()` is
0.0: a phantom has no values, so an algorithm that branches on them (AdLoCo's norm test)
cannot be planned, and the planner refuses it (plan.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_REDUCTIONS = {"sum", "mean", "norm", "amax", "amin", "max", "min", "prod", "var", "std",
               "dot", "vdot", "inner"}


class PhantomTensor:
    """A float32 tensor with a shape and no values."""

    __slots__ = ("shape",)
    phantom = True  # what collectives.py and sim.py test for (they never import the planner)
    dtype = torch.float32
    device = torch.device("cpu")
    requires_grad = False
    grad = None

    def __init__(self, shape):
        self.shape = tuple(shape)

    # -- what algorithms and runtimes read ---------------------------------------------
    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    ndim = property(dim)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def item(self) -> float:
        return 0.0

    def tolist(self):
        raise TypeError("a phantom tensor has no values")

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"PhantomTensor{tuple(self.shape)}"

    # -- shape changes -------------------------------------------------------------------
    def view(self, *shape):
        return PhantomTensor(_resolve(shape, self.numel()))

    reshape = view

    def flatten(self, *args):
        return PhantomTensor((self.numel(),))

    def unsqueeze(self, d: int):
        s = list(self.shape)
        s.insert(d if d >= 0 else len(s) + d + 1, 1)
        return PhantomTensor(s)

    def __getitem__(self, index):
        return PhantomTensor(_indexed(self.shape, index))

    def __setitem__(self, index, value) -> None:
        pass

    # -- copies and conversions (no values, so all are the same) --------------------------
    def _same(self, *args, **kwargs):
        return PhantomTensor(self.shape)

    def _self(self, *args, **kwargs):
        return self

    detach = clone = to = float = double = half = bfloat16 = contiguous = cpu = _same
    abs = neg = sign = sqrt = exp = log = log2 = sigmoid = relu = _same
    requires_grad_ = detach_ = _self

    def __getattr__(self, name: str):
        # Any other in-place method (mul_, add_, lerp_, copy_, zero_, index_add_, ...)
        # changes nothing; any other method keeps the shape unless it reduces.
        if name.startswith("__"):
            raise AttributeError(name)
        if name.endswith("_"):
            return self._self
        if name in _REDUCTIONS:
            return lambda *a, **k: _reduce(self, a, k)
        return lambda *a, **k: _result([self, *a])

    # -- operators ---------------------------------------------------------------------------
    def _binary(self, other):
        return _result([self, other])

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _binary
    __truediv__ = __rtruediv__ = __pow__ = __rpow__ = _binary
    __iadd__ = __isub__ = __imul__ = __itruediv__ = _self

    def __matmul__(self, other):
        return PhantomTensor(())

    def __neg__(self):
        return PhantomTensor(self.shape)

    def __bool__(self) -> bool:
        raise TypeError("a phantom tensor has no values to branch on")

    # -- torch functions -------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.startswith("_foreach_"):
            if name.endswith("_"):
                return None
            return [PhantomTensor(t.shape) for t in args[0]]
        if name == "cat":
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            shape = list(tensors[0].shape)
            shape[dim] = sum(t.shape[dim] for t in tensors)
            return PhantomTensor(shape)
        if name == "stack":
            tensors = args[0]
            return PhantomTensor((len(tensors), *tensors[0].shape))
        if name.endswith("_like"):
            return PhantomTensor(args[0].shape)
        if name in _REDUCTIONS:
            return _reduce(args[0], args[1:], kwargs)
        if name.endswith("_") or name.startswith("__i"):  # in place on a real tensor
            return args[0]
        return _result(list(args) + list(kwargs.values()))


def is_phantom(t) -> bool:
    return getattr(t, "phantom", False)


def _resolve(shape, numel: int) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape = tuple(numel // known if s == -1 else s for s in shape)
    return tuple(shape)


def _indexed(shape: torch.Size, index) -> tuple[int, ...]:
    """The shape after basic indexing: ints drop a dimension, slices shorten one."""
    if not isinstance(index, tuple):
        index = (index,)
    out, d = [], 0
    for i in index:
        if i is Ellipsis:
            rest = len(shape) - d - (len(index) - 1 - index.index(Ellipsis))
            out += shape[d:d + rest]
            d += rest
        elif isinstance(i, slice):
            out.append(len(range(*i.indices(shape[d]))))
            d += 1
        elif i is None:
            out.append(1)
        else:
            d += 1
    return tuple(out) + tuple(shape[d:])


def _result(args) -> PhantomTensor:
    """A new phantom with the broadcast shape of the phantoms (and tensors) among args."""
    shapes = [a.shape for a in args if isinstance(a, (PhantomTensor, torch.Tensor))]
    if len(shapes) == 1 or all(s == shapes[0] for s in shapes):
        return PhantomTensor(shapes[0])
    return PhantomTensor(torch.broadcast_shapes(*shapes))


def _reduce(t, args, kwargs) -> PhantomTensor:
    dim = kwargs.get("dim", args[0] if args and isinstance(args[0], int) else None)
    if dim is None:
        return PhantomTensor(())
    shape = list(t.shape)
    if kwargs.get("keepdim"):
        shape[dim] = 1
    else:
        del shape[dim]
    return PhantomTensor(shape)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class PhantomSpec:
    """What the engine and the simulator read from a workload's spec: the tensors' shapes
    and the tokens of a sequence. `shapes` is a tuple of (name, shape) in model order."""
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    seq_len: int
    flops: float  # training FLOPs per token

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    def flops_per_token(self) -> float:
        return self.flops


def layered_spec(params: int, layers: int, seq_len: int, embedding: int = 0) -> PhantomSpec:
    """A model described by its size only: `layers` blocks of equal size, one tensor each
    (named h{i}.w, so Streaming DiLoCo's fragments find them), plus an embedding and a head of
    `embedding` parameters each if given. FLOPs: Kaplan's 6 N per token (N without the
    embeddings); the step time usually comes with it (cluster.step_time_s)."""
    body = params - 2 * embedding
    per_layer, extra = divmod(body, layers)
    shapes = [("wte", (embedding,))] if embedding else []
    shapes += [(f"h{i}.w", (per_layer + (1 if i < extra else 0),)) for i in range(layers)]
    if embedding:
        shapes.append(("head", (embedding,)))
    return PhantomSpec(tuple(shapes), seq_len, 6.0 * body)


def backbone_spec(backbone) -> PhantomSpec:
    """The phantom of a real architecture (models/backbone.Backbone): the very tensors the
    real model has, so a phantom run sends what the real one sends, byte for byte."""
    shapes = tuple((n, tuple(s)) for n, s in backbone.param_shapes().items())
    return PhantomSpec(shapes, backbone.seq_len, backbone.flops_per_token())


class PhantomWorkload:
    """The workload the engine and the simulator see in a plan: sizes, no data, no loss. The
    engine runs none of its jobs (Engine.phantom); nothing is ever evaluated."""

    name = "phantom"
    phantom = True
    device = torch.device("cpu")

    def __init__(self, spec: PhantomSpec, batch_size: int):
        self.spec = spec
        self.window = spec.seq_len + 1
        self.batch_size = batch_size

    def init_params(self, seed: int = 0) -> dict[str, PhantomTensor]:
        return {n: PhantomTensor(s) for n, s in self.spec.shapes}

    def num_params(self) -> int:
        return self.spec.num_params()

    def evaluate(self, params, limit=0, progress=None):
        raise RuntimeError("a phantom model cannot be evaluated")
