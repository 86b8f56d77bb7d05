"""Yuan et al.'s communication cost of a placement (NeurIPS 2022, arXiv 2206.01288, spec 9.2).

N = D_PP * D_DP devices. A placement is (a) a partition of the devices into D_PP groups of
D_DP, every group holding one pipeline stage for all data-parallel replicas, (b) the order of
the groups along the pipeline, and (c) for each pair of consecutive groups, which device sends
its activations to which. Its cost, in seconds per step:

  DP = max over groups C and devices d in C of  sum_{d' in C, d' != d} 2 (lat + c_dp / (D_DP bw))
  PP = min over group orders of  sum over consecutive groups (a, b) of m(a, b),
       m(a, b) = min over perfect matchings of the largest  lat + c_pp / bw  it uses
  cost = DP + 2 PP   (activations forward and their gradients backward)

c_dp is the byte count of one stage's gradients, c_pp of one pipeline's activations for the
whole step through one stage boundary. With equal links DP is the ring all-reduce closed form
2 (M-1) lat + 2 (M-1)/M c_dp / bw.

Speed. The search (search.py) evaluates this tens of thousands of times, so every piece is
cached. The key observation: devices that the matrices cannot tell apart (swapping the two
leaves both matrices unchanged: 8 GPUs of one instance, one city) are interchangeable in every
cost, so a group's costs depend only on how many devices of each such class it holds. We find
the classes once and cache group costs, pair costs and path costs by class counts; on the
scenarios (8 or fewer classes of many devices) most lookups then hit. On a matrix with no two
equal devices every device is its own class and the caches are plain memoisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .matching import bottleneck_matching
from .path import open_path
from .scenarios import Cluster


def device_classes(*matrices: np.ndarray) -> list[int]:
    """cls[d]: devices d, e get one class iff exchanging them leaves every matrix unchanged.
    Such exchanges compose (if d~e and e~f then d~f), so comparing with one member each suffices."""
    n = matrices[0].shape[0]
    reps: list[int] = []
    cls = [0] * n
    for d in range(n):
        for k, e in enumerate(reps):
            perm = np.arange(n)
            perm[[d, e]] = perm[[e, d]]
            if all(np.array_equal(m[np.ix_(perm, perm)], m) for m in matrices):
                cls[d] = k
                break
        else:
            cls[d] = len(reps)
            reps.append(d)
    return cls


@dataclass
class Allocation:
    """stages[s][r] is the device holding stage s of pipeline (replica) r."""
    stages: list[list[int]]
    cost: float
    dp: float
    pp: float

    @property
    def pipelines(self) -> list[list[int]]:
        return [list(chain) for chain in zip(*self.stages)]


def _greedy_matching_mean(cost: np.ndarray) -> float:
    """Match cheapest edges first; the mean cost of the n edges taken."""
    n = cost.shape[0]
    free_r, free_c, total, taken = [True] * n, [True] * n, 0.0, 0
    flat = cost.ravel()
    for e in np.argsort(flat, kind="stable").tolist():
        i, j = divmod(e, n)
        if free_r[i] and free_c[j]:
            free_r[i] = free_c[j] = False
            total += float(flat[e])
            taken += 1
            if taken == n:
                break
    return total / n


class CostModel:
    def __init__(self, cluster: Cluster, D_PP: int, D_DP: int, c_dp_bytes: float,
                 c_pp_bytes: float):
        if D_PP * D_DP != cluster.N:
            raise ValueError(f"{D_PP} stages x {D_DP} replicas != {cluster.N} devices")
        self.cluster, self.D_PP, self.D_DP = cluster, D_PP, D_DP
        lat, bits_per_s = cluster.latency_s, cluster.bandwidth_gbps * 1e9
        # one message of the whole step's activations; the gradient share of a ring member
        self.pp = lat + 8 * c_pp_bytes / bits_per_s
        self.dp = 2 * (lat + 8 * c_dp_bytes / (D_DP * bits_per_s))
        np.fill_diagonal(self.pp, 0.0)
        np.fill_diagonal(self.dp, 0.0)
        self.cls = device_classes(cluster.latency_s, cluster.bandwidth_gbps)
        self._dp_cache: dict[tuple, tuple[float, float]] = {}
        self._pair_cache: dict[tuple, tuple[float, float]] = {}
        self._path_cache: dict[tuple, tuple[float, list[int]]] = {}
        self.evaluations = 0

    # -- pieces ---------------------------------------------------------------------
    def key(self, group) -> tuple[int, ...]:
        return tuple(sorted(self.cls[d] for d in group))

    def group(self, group, key=None) -> tuple[float, float]:
        """(DP term of the group, its reach: the largest over its devices of the cheapest
        activation message to any device outside it). The reach is a lower bound on every
        hop the group takes part in; it enters only the smooth companion score."""
        key = key or self.key(group)
        if key not in self._dp_cache:
            g = list(group)
            out = np.ones(self.cluster.N, bool)
            out[g] = False
            self._dp_cache[key] = (float(self.dp[np.ix_(g, g)].sum(axis=1).max()),
                                   float(self.pp[np.ix_(g, out)].min(axis=1).max()))
        return self._dp_cache[key]

    def dp_cost(self, group, key=None) -> float:
        return self.group(group, key)[0]

    def pair(self, a, b, ka=None, kb=None) -> tuple[float, float]:
        """(bottleneck matching cost of the hop between groups a and b, mean edge cost of a
        greedy cheapest-first matching). The second is the smooth companion (see `soft`): it
        counts how many devices find a cheap partner, which the bottleneck alone cannot see."""
        ka, kb = ka or self.key(a), kb or self.key(b)
        k = (ka, kb) if ka <= kb else (kb, ka)  # the matrices are symmetric
        if k not in self._pair_cache:
            sub = self.pp[np.ix_(list(a), list(b))]
            near = (sub.min(axis=1).mean() + sub.min(axis=0).mean()) / 2
            self._pair_cache[k] = (bottleneck_matching(sub)[0],
                                   (_greedy_matching_mean(sub) + float(near)) / 2)
        return self._pair_cache[k]

    def pair_cost(self, a, b, ka=None, kb=None) -> float:
        return self.pair(a, b, ka, kb)[0]

    def soft(self, groups: list, order: list[int]) -> float:
        """A smooth companion of the cost that breaks its many ties (a max of maxes is flat
        under most single swaps): the mean instead of the max of the groups' DP terms, and
        per hop the mean edge of a greedy matching instead of the bottleneck. The search
        prefers the lower soft score among equal costs."""
        dp, reach = zip(*(self.group(g) for g in groups))
        hops = sum(self.pair(groups[a], groups[b])[1] for a, b in zip(order, order[1:]))
        return sum(dp) / len(groups) + 2 * (hops + sum(reach))

    def path(self, groups: list, keys: list[tuple] | None = None) -> tuple[float, list[int]]:
        """Cheapest group order (indices into `groups`), cached by the groups' classes."""
        keys = keys or [self.key(g) for g in groups]
        rank = sorted(range(len(groups)), key=lambda i: keys[i])  # canonical order
        ck = tuple(keys[i] for i in rank)
        if ck not in self._path_cache:
            G = len(groups)
            c = np.zeros((G, G))
            for i in range(G):
                for j in range(i + 1, G):
                    c[i, j] = c[j, i] = self.pair_cost(groups[rank[i]], groups[rank[j]],
                                                       ck[i], ck[j])
            self._path_cache[ck] = open_path(c)
        cost, order = self._path_cache[ck]
        return cost, [rank[i] for i in order]

    # -- whole placements -----------------------------------------------------------
    def cost(self, groups: list) -> tuple[float, float, float, list[int]]:
        """(DP + 2 PP, DP, PP, group order) of a partition, order and matchings optimal."""
        self.evaluations += 1
        keys = [self.key(g) for g in groups]
        dp = max(self.dp_cost(g, k) for g, k in zip(groups, keys))
        pp, order = self.path(groups, keys)
        return dp + 2 * pp, dp, pp, order

    def allocate(self, groups: list) -> Allocation:
        """The full placement of a partition: best order, bottleneck matchings chained into
        pipelines (DT-FM's get_pipelines does the same walk)."""
        total, dp, pp, order = self.cost(groups)
        stages = [sorted(groups[order[0]])]
        for g in order[1:]:
            nxt = sorted(groups[g])
            _, perm = bottleneck_matching(self.pp[np.ix_(stages[-1], nxt)])
            stages.append([nxt[perm[r]] for r in range(self.D_DP)])
        return Allocation(stages, total, dp, pp)

    def fixed(self, stages: list[list[int]]) -> Allocation:
        """A placement taken as given, order and matching included: stage s of pipeline r on
        stages[s][r]. This is what launching without a scheduler gets (DT-FM's
        random_scheduler.py scores its baselines this way)."""
        dp = max(self.dp_cost(g) for g in stages)
        pp = sum(max(self.pp[a, b] for a, b in zip(x, y)) for x, y in zip(stages, stages[1:]))
        return Allocation([list(g) for g in stages], dp + 2 * pp, dp, float(pp))

    def in_order(self, perm=None) -> Allocation:
        """Devices in the given order (default: as listed) cut into consecutive groups: group s
        is stage s, and position r in each group is pipeline r."""
        perm = list(range(self.cluster.N)) if perm is None else list(perm)
        return self.fixed([perm[s * self.D_DP:(s + 1) * self.D_DP] for s in range(self.D_PP)])
