"""Per-stage operation orders of the pipeline schedules: GPipe and 1F1B, each with or without 2BP.

A schedule here is only an order: for every stage, the list of operations it runs, one at a
time. When each one runs is the time model's business (timeline.py), and the in-process
runner (inprocess.py) executes the same lists on the real model.

Operations (`Op.kind`):
  F   forward of one micro-batch
  B   the whole backward of one micro-batch (input- and weight-gradient together)
  P1  2BP's backward-p1: the gradient w.r.t. the stage input only, on the critical path
  P2  2BP's backward-p2: the weight gradient, deferred; `mbs` may hold several micro-batches
      when they are concatenated into one call
(2BP: Rae, Lee, Richings, arXiv 2405.18047, spec section 8.)

GPipe (Huang et al., arXiv 1811.06965): all forwards, then all backwards. The backwards run in
ascending micro-batch order, as PyTorch's `torch.distributed.pipelining.ScheduleGPipe` does;
with equal stage times the order does not change the step time.
1F1B (PipeDream-Flush, Narayanan et al., arXiv 2006.09503; Megatron-LM's non-interleaved
schedule): stage s (0-based, of S) runs min(S-s-1, m) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. Stage s therefore holds at
most S-s micro-batches' activations, against m for GPipe.
With 2BP every B becomes a P1, and the P2s are appended after the stage's last P1 (the paper's
schedules run the deferred p2 work in the drain bubble); `concat` makes them one call.
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b")


class Op(NamedTuple):
    kind: str  # "F", "B", "P1" or "P2"
    mbs: tuple[int, ...]  # the micro-batches it works on (several only for a concatenated P2)

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(map(str, self.mbs))}"  # "F:0", "P2:0,1"


def _f(i: int) -> Op:
    return Op("F", (i,))


def _b(i: int) -> Op:
    return Op("B", (i,))


def stage_order(schedule: str, S: int, m: int, s: int, twobp: bool = False,
                concat: bool = False) -> list[Op]:
    """The operations stage `s` of `S` runs for `m` micro-batches, in order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")
    if not (S >= 1 and m >= 1 and 0 <= s < S):
        raise ValueError(f"need S >= 1, m >= 1 and 0 <= s < S, got S={S}, m={m}, s={s}")
    if schedule == "gpipe":
        order = [_f(i) for i in range(m)] + [_b(i) for i in range(m)]
    else:
        warm = min(S - s - 1, m)
        order = [_f(i) for i in range(warm)]
        for i in range(m - warm):  # steady state: one forward, one backward
            order += [_f(warm + i), _b(i)]
        order += [_b(i) for i in range(m - warm, m)]
    if not twobp:
        return order
    order = [Op("P1", op.mbs) if op.kind == "B" else op for op in order]
    done = [op.mbs[0] for op in order if op.kind == "P1"]  # p2 in the order p1 ran
    return order + ([Op("P2", tuple(done))] if concat else [Op("P2", (i,)) for i in done])


def all_orders(schedule: str, S: int, m: int, twobp: bool = False,
               concat: bool = False) -> list[list[Op]]:
    return [stage_order(schedule, S, m, s, twobp, concat) for s in range(S)]
