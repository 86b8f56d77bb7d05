"""2BP for real, in one process: the char GPT's stages (stages.py) run a pipeline schedule one
operation at a time on the CPU, and the gradients come out equal to plain backprop's.

The order of operations is the time model's (timeline.py with unit stage times and free
links): the runner executes exactly the schedule the planner reasons about. Messages between
stages are tensors handed over in memory (an activation detached from the sender's graph, an
activation-gradient).

Three ways to run the backward (`mode`):
* "plain": one autograd backward per micro-batch and stage (B).
* "stash": 2BP with a custom autograd function (stages.Ops): p1 computes only input
  gradients and keeps each weight's (input, output gradient); p2 makes the weight gradients
  from them, optionally concatenating the micro-batches.
* "autograd": 2BP with autograd alone (spec 8.1's PyTorch design): p1 is
  torch.autograd.grad w.r.t. the stage input with retain_graph=True, p2 is
  torch.autograd.grad w.r.t. the stage weights. It keeps the whole graph alive until p2 and
  p2 recomputes the activation gradients inside the stage, so it costs more memory and more
  compute than "stash"; it is here because it is the simplest correct split.

What is measured: the micro-batches a stage holds state for (activations or p2 inputs) and
the bytes of that state: the tensors autograd saves for backward (counted through
torch.autograd.graph.saved_tensors_hooks, each storage once, weights excluded) plus, between
p1 and p2, what 2BP keeps (the stashed pairs, or the retained graph and output gradient).
Wall time per step is recorded but says nothing about pipeline throughput: the stages run one
after another in one process, so there is no overlap to gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.backbone import Backbone, rotary_tables
from .stages import Ops, stage_forward, stage_param_names, weight_grads
from .timeline import Pipeline, simulate

MODES = ("plain", "stash", "autograd")


@dataclass
class Report:
    grads: dict[str, torch.Tensor]
    loss: float
    orders: list[list[str]]  # operations each stage ran, in order
    peak_held: list[int]  # micro-batches with state, per stage
    peak_bytes: list[int]  # bytes of that state at its peak, per stage
    wall_s: float
    log: list[tuple[int, str, int]] = field(default_factory=list)  # (stage, op, live bytes)


def _storage_bytes(tensors, skip: set[int]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        if st.data_ptr() in skip or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def run_schedule(spec: Backbone, params: dict[str, torch.Tensor], batch: torch.Tensor, S: int,
                 schedule: str = "1f1b", mode: str = "plain", concat: bool = False) -> Report:
    """One training step of a pipeline of S stages over m micro-batches.

    batch: (m, B, T + 1) token windows; micro-batch i is batch[i]. Returns the gradients of
    the mean loss over the whole batch (so plain backprop on the full batch is the reference).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; known: {', '.join(MODES)}")
    m = batch.shape[0]
    twobp = mode != "plain"
    timeline = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), schedule, twobp=twobp,
                        concat=concat)
    ops_in_order = sorted((sp for sp in timeline.spans if sp.kind != "AR"),
                          key=lambda sp: (sp.start, sp.stage))
    rotary = rotary_tables(spec, "cpu")
    names = [stage_param_names(spec, S, s) for s in range(S)]
    weights = [{n: params[n].detach().clone().requires_grad_(True) for n in names[s]}
               for s in range(S)]
    skip = {w.untyped_storage().data_ptr() for ws in weights for w in ws.values()}
    shapes = {n: tuple(params[n].shape) for n in params}
    grads = {n: torch.zeros_like(params[n]) for n in params}

    inp: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> stage input
    out: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> stage output (or loss)
    g_out: dict[tuple[int, int], torch.Tensor] = {}  # gradient w.r.t. out, from the next stage
    graph_bytes: dict[tuple[int, int], int] = {}  # saved-for-backward bytes while the graph lives
    kept: dict[tuple[int, int], list] = {}  # what 2BP keeps between p1 and p2
    held = [0] * S
    peak_bytes, peak_held = [0] * S, [0] * S
    log, losses = [], []

    def forward(s: int, i: int) -> None:
        x = batch[i, :, :-1] if s == 0 else inp[(s, i)]
        targets = batch[i, :, 1:] if s == S - 1 else None
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        kept[(s, i)] = [] if mode == "stash" else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = stage_forward(spec, weights[s], S, s, x, rotary, Ops(kept[(s, i)]), targets,
                              1.0 / m)
        graph_bytes[(s, i)] = _storage_bytes(saved, skip)
        out[(s, i)] = y
        if s < S - 1:
            inp[(s + 1, i)] = y.detach().requires_grad_(True)
        else:
            losses.append(y.item() * m)

    def send_back(s: int, i: int, gx: torch.Tensor | None) -> None:
        if s > 0:
            g_out[(s - 1, i)] = gx

    def backward_all(s: int, i: int) -> None:  # plain B
        torch.autograd.backward(out[(s, i)], g_out.get((s, i)))
        send_back(s, i, inp[(s, i)].grad if s > 0 else None)
        _free(s, i)

    def p1(s: int, i: int) -> None:
        y, g = out[(s, i)], g_out.get((s, i))
        if mode == "stash":
            torch.autograd.backward(y, g)  # weights get None: their inputs go to the stash
            send_back(s, i, inp[(s, i)].grad if s > 0 else None)
            graph_bytes[(s, i)] = 0  # the graph is freed; the stash holds what p2 needs
        elif s > 0:
            (gx,) = torch.autograd.grad(y, inp[(s, i)], g, retain_graph=True)
            send_back(s, i, gx)

    def p2(s: int, mbs: tuple[int, ...]) -> None:
        if mode == "stash":
            entries = [e for i in mbs for e in kept[(s, i)]]
            for n, g in weight_grads(entries, shapes, concat).items():
                grads[n] += g
        else:
            ys = [out[(s, i)] for i in mbs]
            gs = [g_out.get((s, i)) for i in mbs]
            if s == S - 1:
                gs = [torch.ones_like(y) for y in ys]
            ws = list(weights[s].values())
            groups = [list(zip(ys, gs))] if concat else [[(y, g)] for y, g in zip(ys, gs)]
            for pairs in groups:
                gw = torch.autograd.grad([y for y, _ in pairs], ws, [g for _, g in pairs])
                for n, g in zip(weights[s], gw):
                    grads[n] += g
        for i in mbs:
            _free(s, i)

    def _free(s: int, i: int) -> None:
        for d in (inp, out, g_out, graph_bytes, kept):
            d.pop((s, i), None)
        held[s] -= 1

    def live_bytes(s: int) -> int:
        total = sum(b for (st, _), b in graph_bytes.items() if st == s)
        for (st, i), entries in kept.items():
            if st != s:
                continue
            if mode == "stash" and entries:
                total += _storage_bytes([t for e in entries for t in e[1:]], skip)
            if mode == "autograd" and (st, i) in g_out and graph_bytes.get((st, i)):
                total += _storage_bytes([g_out[(st, i)]], skip)
        return total

    t0 = time.perf_counter()
    for sp in ops_in_order:
        s = sp.stage
        if sp.kind == "F":
            held[s] += 1
            forward(s, sp.mbs[0])
        elif sp.kind == "B":
            backward_all(s, sp.mbs[0])
        elif sp.kind == "P1":
            p1(s, sp.mbs[0])
        else:
            p2(s, sp.mbs)
        b = live_bytes(s)
        peak_bytes[s] = max(peak_bytes[s], b)
        peak_held[s] = max(peak_held[s], held[s])
        log.append((s, f"{sp.kind}:{','.join(map(str, sp.mbs))}", b))
    wall = time.perf_counter() - t0
    if mode == "plain":
        for ws in weights:
            for n, w in ws.items():
                grads[n] += w.grad
    orders = [[str(op) for op in timeline.order(0, s)] for s in range(S)]
    return Report(grads, sum(losses) / m, orders, peak_held, peak_bytes, wall, log)


def reference_grads(spec: Backbone, params: dict[str, torch.Tensor], batch: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """Plain backprop through backbone.forward_one on the whole batch: the mean loss."""
    from ..models.backbone import forward_one

    ws = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    flat = batch.reshape(-1, batch.shape[-1])
    logits, _ = forward_one(spec, ws, flat[:, :-1], rotary_tables(spec, "cpu"))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), flat[:, 1:].flatten())
    loss.backward()
    return {n: w.grad for n, w in ws.items()}, loss.item()
