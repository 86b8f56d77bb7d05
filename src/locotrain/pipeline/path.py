"""The cheapest open path through all nodes (open-loop travelling salesman), exactly, by the
Held-Karp dynamic programme: the order of the stage groups along the pipeline (spec 9.2).

dp[mask, j] = cheapest path that visits exactly the nodes in `mask` and ends at j. Yuan et
al.'s code runs the programme once per start node and keeps the best; starting every node at
cost 0 in one programme gives the same optimum (the best start) in one pass. O(2^n n^2), so
for the pipeline depths of interest (n <= ~16) it is exact and fast; here it is vectorised
over all (mask, end) pairs of one subset size at a time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=None)
def _layers(n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each subset size k >= 2: arrays (mask, last node j, mask without j) over all pairs."""
    masks = np.arange(1 << n)
    sizes = np.array([bin(x).count("1") for x in masks])
    out = []
    for k in range(2, n + 1):
        ms = masks[sizes == k]
        pairs = [(mk, j) for mk in ms for j in range(n) if mk >> j & 1]
        mask = np.array([p[0] for p in pairs])
        last = np.array([p[1] for p in pairs])
        out.append((mask, last, mask ^ (1 << last)))
    return out


def open_path(cost: np.ndarray) -> tuple[float, list[int]]:
    """(cost of the cheapest Hamiltonian path with a free start and end, the node order)."""
    cost = np.asarray(cost, dtype=float)
    n = cost.shape[0]
    if n <= 1:
        return 0.0, list(range(n))
    if n > 20:
        raise ValueError(f"Held-Karp over {n} nodes needs 2^{n} states; use fewer stages")
    dp = np.full((1 << n, n), np.inf)
    back = np.full((1 << n, n), -1, dtype=np.int64)
    dp[1 << np.arange(n), np.arange(n)] = 0.0
    for mask, last, prev in _layers(n):
        # arrive at `last` from any i in prev (dp is inf for i not in prev)
        through = dp[prev] + cost[:, last].T
        i = through.argmin(axis=1)  # lowest index on ties: deterministic
        dp[mask, last] = through[np.arange(len(mask)), i]
        back[mask, last] = i
    full = (1 << n) - 1
    j = int(dp[full].argmin())
    best = float(dp[full, j])
    order, mask = [j], full
    while back[mask, j] >= 0:
        mask, j = mask ^ (1 << j), int(back[mask, j])
        order.append(j)
    return best, order[::-1]
