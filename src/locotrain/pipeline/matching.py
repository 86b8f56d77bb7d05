"""Bottleneck perfect matching: pair the rows and columns of a square cost matrix so that the
largest cost used is as small as possible (spec 9.2: who sends activations to whom between two
consecutive stage groups, when the slowest pair sets the pace).

Yuan et al.'s code (DS3Lab/DT-FM, scheduler.py) forbids the costliest remaining edge and
re-solves a linear assignment until none is feasible. We solve the same problem with the
threshold method (Burkard, Dell'Amico, Martello, "Assignment Problems", ch. 6): the optimum is
one of the matrix's values, and "is there a perfect matching using only edges <= t" is a
bipartite-matching test, monotone in t, so the smallest t that passes is the answer. That
needs no linear-assignment solver (scipy is not a dependency) and far less work:
one maximum-matching computation grown edge by edge, O(n^3) in all. It starts at a lower
bound (every row and every column must use at least its cheapest edge), which is usually
already feasible for the block-structured matrices of the scenarios.
"""

from __future__ import annotations

import numpy as np


def bottleneck_matching(cost: np.ndarray) -> tuple[float, list[int]]:
    """(the smallest achievable largest cost, perm with perm[row] = column).

    Edges are admitted cheapest first, all edges of one cost together, from the lower bound
    on; a maximum matching (Kuhn's augmenting paths) is kept and grown from the rows still
    free whenever edges come in. The first threshold at which it is perfect is optimal."""
    cost = np.asarray(cost, dtype=float)
    n = cost.shape[0]
    if cost.shape != (n, n) or n == 0:
        raise ValueError(f"need a non-empty square matrix, got shape {cost.shape}")
    # no threshold below this can work: every row and every column needs an edge
    bound = float(max(cost.min(axis=1).max(), cost.min(axis=0).max()))
    flat = cost.ravel()
    edges = np.argsort(flat, kind="stable").tolist()
    values = flat[edges].tolist()
    adj: list[list[int]] = [[] for _ in range(n)]
    owner, match = [-1] * n, [-1] * n  # column -> row, row -> column

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j], match[i] = i, j
                    return True
        return False

    k, size = 0, 0
    while True:
        t = max(values[k], bound)
        while k < len(edges) and values[k] <= t:  # admit every edge up to the threshold
            i, j = divmod(edges[k], n)
            adj[i].append(j)
            k += 1
        for i in range(n):
            if match[i] < 0 and augment(i, [False] * n):
                size += 1
        if size == n:  # a complete bipartite graph always gets here
            return t, match
