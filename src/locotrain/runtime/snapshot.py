"""Finding every tensor a paused run holds, so that a checkpoint can save them and a resumed
run can put them back.

A simulated run is resumed by replaying it: the same config rebuilds the same processes, and
the event loop runs again up to the checkpointed event without doing the arithmetic (no
inner steps; collectives and messages carry whatever values the replay computes). The
control flow of every algorithm depends only on the config, the virtual clock and the small
values it exchanges (which the checkpoint records and the replay feeds back, see sim.py), so
the replay rebuilds the same objects: the same generators suspended at the same yields,
holding tensors of the same shapes in the same places. `tensors_in` walks those objects in a
fixed order and lists every tensor once; the checkpoint saves their values in that order and
the resumed run copies them back into the replayed run's tensors, in place, which restores
every alias too. A checkpoint also records the list's shapes: a replay that reaches a
different structure is refused instead of resumed wrongly.

Walked: lists, tuples, deques, dicts, generators (their frame's locals, and the generator
they delegate to with `yield from`), and objects of this package (their attributes). Not
walked: functions (closures share the cells of the frame that made them, which is walked),
torch generators, and the objects listed in SKIP (the runtime itself, contexts, engines,
workloads, configs), whose state is saved by their owners or never changes.
"""

from __future__ import annotations

import types
from collections import deque

import torch

from .api import Handle

SKIP_TYPES: tuple[type, ...] = ()


def skip(*classes: type) -> None:
    """Never walk into objects of these classes (runtimes register their own)."""
    global SKIP_TYPES
    SKIP_TYPES = SKIP_TYPES + classes


def tensors_in(roots) -> list[torch.Tensor]:
    """Every tensor reachable from `roots`, each once, in a deterministic order."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [roots]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (int, float, str, bool, bytes, type(None))) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        else:
            stack.extend(reversed(_children(obj)))  # depth first, in the children's order
    return found


def _children(obj) -> list:
    if isinstance(obj, (list, tuple, deque)):
        return list(obj)
    if isinstance(obj, dict):
        return [v for _, v in obj.items()]
    if isinstance(obj, Handle):  # its result; `state` is the runtime's own exchange buffers
        return [obj.result]
    if isinstance(obj, types.GeneratorType):
        frame = obj.gi_frame
        if frame is None:  # finished
            return []
        return [frame.f_locals[k] for k in frame.f_code.co_varnames + frame.f_code.co_cellvars
                if k in frame.f_locals] + [obj.gi_yieldfrom]
    if isinstance(obj, SKIP_TYPES) or isinstance(obj, (types.FunctionType, types.MethodType,
                                                       torch.Generator, type)):
        return []
    module = type(obj).__module__ or ""
    if module.startswith("locotrain.") and hasattr(obj, "__dict__"):
        return [v for _, v in sorted(vars(obj).items())]
    return []


def shapes(tensors: list[torch.Tensor]) -> list[str]:
    """What a checkpoint records of the structure: one 'dtype[shape]' per tensor."""
    return [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors]
