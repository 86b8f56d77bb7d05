"""The decentralized scheduler's search (Yuan et al., arXiv 2206.01288, spec 9.3): a memetic
algorithm over partitions of the devices into D_PP equal groups.

A population of random partitions; each offspring is a 5-point crossover of two random parents
followed by local search, and replaces the worse parent if it is better (the paper's scheme:
population 100, 4,900 offspring). Our own choices, where the paper's code differs:

* Crossover aligns the parents' group labels first (greedily, by overlap), so that "copy
  parent 1's group for these 5 devices" means the same group in both; DT-FM copies raw labels,
  which are arbitrary. Group sizes are then repaired by moving surplus devices, chosen at
  random, from over-full to under-full groups.
* Local search is a Kernighan-Lin pass (Kernighan & Lin 1970) between two random groups A
  and B: repeatedly make the best swap of two unlocked devices, even when it makes things
  worse, lock both, and keep the best prefix of the swap sequence. Every step first scores
  all |A| x |B| swaps at once with numpy (the DP terms exactly; each pipeline hop touching A
  or B by the lower bound of its bottleneck matching, where every device uses at least its
  cheapest partner), then scores the `candidates` best of those exactly (bottleneck
  matchings re-solved, group order held fixed) and makes the exactly best one. The pass's
  result is scored in full (Held-Karp order re-solved) and kept only if it is better. DT-FM
  instead runs cyclic multi-group moves driven by a pairwise gain.
* The cost is a max of maxes, flat under most single swaps; ties are broken everywhere by a
  smooth companion score (CostModel.soft), which gives the search a slope on those plateaus.
  Swaps of two devices of one class (placement.py) are skipped.
* Two constructed partitions join the random population (`seed_labels`).
Seeded: the same seed gives the same placement.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from .placement import Allocation, CostModel


@dataclass
class SearchResult:
    best: Allocation
    history: list[float] = field(default_factory=list)  # best cost after each offspring
    evaluations: int = 0
    seconds: float = 0.0


def groups_of(labels: list[int], G: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(G)]
    for d, g in enumerate(labels):
        out[g].append(d)
    return out


def random_labels(N: int, G: int, rng: random.Random) -> list[int]:
    perm = list(range(N))
    rng.shuffle(perm)
    labels = [0] * N
    for i, d in enumerate(perm):
        labels[d] = i // (N // G)
    return labels


def seed_labels(model: CostModel) -> list[list[int]]:
    """Two constructed partitions that join the random population (our addition to the paper's
    random start; the search is free to leave them). Both are greedy and use only the matrices:
    * tight groups: each stage group is a device and its cheapest data-parallel partners (on
      the scenarios: stages inside a site, what listing the devices site by site gives);
    * tight pipelines: each pipeline is a chain grown from a well-connected device along the
      cheapest activation links, preferring on ties the devices with no cheap link at all (so
      the well-connected ones stay together in later chains); stage s is position s of every
      chain (pipelines inside a site)."""
    N, G, M = model.cluster.N, model.D_PP, model.D_DP
    pp, dp = model.pp, model.dp
    reach = np.where(np.eye(N, dtype=bool), np.inf, pp).min(axis=1)
    free = set(range(N))
    groups_first = [0] * N
    for g in range(G):
        start = min(free, key=lambda d: (reach[d], d))
        members = sorted(free - {start}, key=lambda d: (dp[start, d], d))[:M - 1] + [start]
        for d in members:
            groups_first[d] = g
        free -= set(members)
    free = set(range(N))
    chains_first = [0] * N
    for _ in range(M):
        chain = [min(free, key=lambda d: (reach[d], d))]
        free.discard(chain[0])
        while len(chain) < G:
            nxt = min(free, key=lambda d: (pp[chain[-1], d], -reach[d], d))
            chain.append(nxt)
            free.discard(nxt)
        for s, d in enumerate(chain):
            chains_first[d] = s
    return [groups_first, chains_first]


def crossover(p1: list[int], p2: list[int], G: int, rng: random.Random,
              points: int = 5) -> list[int]:
    N, size = len(p1), len(p1) // G
    overlap: dict[tuple[int, int], int] = {}
    for a, b in zip(p1, p2):
        overlap[(a, b)] = overlap.get((a, b), 0) + 1
    rename, used = {}, set()
    for (a, b), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if a not in rename and b not in used:
            rename[a] = b
            used.add(b)
    for a in range(G):  # groups of p1 that share no device with a free group of p2
        if a not in rename:
            rename[a] = min(set(range(G)) - used)
            used.add(rename[a])
    child = list(p2)
    fixed = set(rng.sample(range(N), min(points, N)))
    for d in sorted(fixed):
        child[d] = rename[p1[d]]
    counts = [child.count(g) for g in range(G)]
    movable = [d for d in range(N) if d not in fixed]
    rng.shuffle(movable)
    for d in movable:  # repair: surplus devices to groups that are short
        if counts[child[d]] > size:
            short = next(g for g in range(G) if counts[g] < size)
            counts[child[d]] -= 1
            counts[short] += 1
            child[d] = short
    return child


# --------------------------------------------------------------------------- KL pass


def _min_excluding(M: np.ndarray) -> np.ndarray:
    """E[r, x] = min over columns c != x of M[r, c]."""
    r, n = M.shape
    if n == 1:
        return np.full_like(M, np.inf)
    idx = np.argpartition(M, 1, axis=1)[:, :2]
    two = np.take_along_axis(M, idx, axis=1)
    first = np.where(two[:, 0] <= two[:, 1], 0, 1)
    lo, hi = two[np.arange(r), first], two[np.arange(r), 1 - first]
    E = np.repeat(lo[:, None], n, axis=1)
    E[np.arange(r), idx[np.arange(r), first]] = hi
    return E


def _masked(arr: np.ndarray, axis_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(max, sum) over the last axis of arr (i, j, k), leaving out k == i."""
    mask = np.eye(axis_len, dtype=bool)[:, None, :]
    return np.where(mask, -np.inf, arr).max(axis=2), np.where(mask, 0.0, arr).sum(axis=2)


def _dp_after(D: np.ndarray, g: np.ndarray, other: np.ndarray):
    """(max, mean) row sum of group g after g[i] leaves and other[j] joins, over (i, j)."""
    n = len(g)
    Dgg, Dgo = D[np.ix_(g, g)], D[np.ix_(g, other)]
    rows = Dgg.sum(1)[None, None, :] - Dgg.T[:, None, :] + Dgo.T[None, :, :]
    rmax, rsum = _masked(rows, n)
    new = Dgo.sum(0)[None, :] - Dgo  # the newcomer's row: sum over the members who stay
    return np.maximum(rmax, new), (rsum + new) / n


def _hop_after(P: np.ndarray, g: np.ndarray, other: np.ndarray, x: np.ndarray):
    """Bottleneck lower bound and soft score of the hop (g', x), g' = g - g[i] + other[j]."""
    n = len(g)
    Pgx, Pox = P[np.ix_(g, x)], P[np.ix_(other, x)]
    rm_g, rm_o = Pgx.min(1), Pox.min(1)
    row_max = np.maximum(_max_excluding(rm_g)[:, None], rm_o[None, :])
    row_sum = (rm_g.sum() - rm_g)[:, None] + rm_o[None, :]
    col = np.minimum(_min_excluding(Pgx.T).T[:, None, :], Pox[None, :, :])  # (i, j, e)
    lb = np.maximum(row_max, col.max(2))
    return lb, (row_sum + col.sum(2)) / (2 * n)


def _hop_between_after(P: np.ndarray, a: np.ndarray, b: np.ndarray):
    """The same for the hop between A' = a - a[i] + b[j] and B' = b - b[j] + a[i]."""
    n = len(a)
    Pab, Paa, Pbb = P[np.ix_(a, b)], P[np.ix_(a, a)], P[np.ix_(b, b)]
    # rows of A': a[k] (k != i) and b[j]
    r1 = np.minimum(_min_excluding(Pab).T[None, :, :], Paa.T[:, None, :])  # (i, j, k)
    r1max, r1sum = _masked(r1, n)
    r2 = np.minimum(np.diag(_min_excluding(Pbb))[None, :], Pab)  # (i, j)
    # columns of B': b[l] (l != j) and a[i]
    c1 = np.minimum(_min_excluding(Pab.T).T[:, None, :], Pbb[None, :, :])  # (i, j, l)
    maskj = np.eye(n, dtype=bool)[None, :, :]
    c1max = np.where(maskj, -np.inf, c1).max(2)
    c1sum = np.where(maskj, 0.0, c1).sum(2)
    c2 = np.minimum(np.diag(_min_excluding(Paa))[:, None], Pab)
    lb = np.maximum.reduce([r1max, r2, c1max, c2])
    return lb, (r1sum + r2 + c1sum + c2) / (2 * n)


def _max_excluding(v: np.ndarray) -> np.ndarray:
    return _min_excluding(-v[None, :])[0] * -1


def _proxy(model: CostModel, groups, A: int, B: int, nbr: dict, a: np.ndarray,
           b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast estimates of (cost, soft) after swapping a[i] and b[j], for all (i, j) at once:
    DP exactly, every hop touching A or B by its bottleneck lower bound (and a cheapest-partner
    mean for soft); the hops that stay are left out (they are the same for every swap)."""
    P, D, G = model.pp, model.dp, len(groups)
    dpa, dpa_soft = _dp_after(D, a, b)
    dpb, dpb_soft = (t.T for t in _dp_after(D, b, a))
    value, soft = np.maximum(dpa, dpb), (dpa + dpb) / G
    for g, other, flip in ((A, B, False), (B, A, True)):
        for x in nbr[g]:
            if x in (A, B):
                continue
            mine, theirs = (b, a) if flip else (a, b)
            lb, s = _hop_after(P, mine, theirs, np.array(groups[x]))
            value, soft = value + 2 * (lb.T if flip else lb), soft + 2 * (s.T if flip else s)
    if B in nbr[A]:
        lb, s = _hop_between_after(P, a, b)
        value, soft = value + 2 * lb, soft + 2 * s
    return value, soft


def kl_pass(model: CostModel, groups: list[list[int]], order: list[int], A: int, B: int,
            steps: int = 0, candidates: int = 4) -> list[list[int]]:
    """One Kernighan-Lin pass between groups A and B; returns the new partition (a copy).
    Each step scores every swap by the fast estimate, scores the `candidates` best of them
    exactly (group order fixed), and makes the exactly best one even if it is worse."""
    G = len(groups)
    hops = list(zip(order, order[1:]))
    nbr = {g: [h[0] if h[1] == g else h[1] for h in hops if g in h] for g in (A, B)}
    touch = [h for h in hops if A in h or B in h]
    rest = [h for h in hops if h not in touch]
    rest_pp = [model.pair(groups[x], groups[y]) for x, y in rest]
    others = [model.group(groups[g]) for g in range(G) if g not in (A, B)]
    rest_dp = max((d for d, _ in others), default=0.0)
    rest_dp_soft = sum(d for d, _ in others) / G
    rest_reach = sum(r for _, r in others)
    rest_pp_cost, rest_pp_soft = sum(c for c, _ in rest_pp), sum(s for _, s in rest_pp)

    def exact(ga: list[int], gb: list[int]) -> tuple[float, float]:
        """(cost, soft) with the group order fixed; only A's and B's terms change."""
        sets = {A: ga, B: gb}
        (da, ra), (db, rb) = model.group(ga), model.group(gb)
        pp, pps = rest_pp_cost, rest_pp_soft + rest_reach + ra + rb
        for x, y in touch:
            c, s = model.pair(sets.get(x, groups[x]), sets.get(y, groups[y]))
            pp, pps = pp + c, pps + s
        return (round(max(rest_dp, da, db) + 2 * pp, 9),
                rest_dp_soft + (da + db) / G + 2 * pps)

    cls = np.array(model.cls)
    a, b = np.array(groups[A]), np.array(groups[B])
    best = exact(a.tolist(), b.tolist())
    best_ab = (a.copy(), b.copy())
    locked_a, locked_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    for _ in range(steps or min(len(a), len(b))):
        value, soft = _proxy(model, groups, A, B, nbr, a, b)
        banned = (cls[a][:, None] == cls[b][None, :]) | locked_a[:, None] | locked_b[None, :]
        flat = np.flatnonzero(~banned.ravel())
        if len(flat) == 0:
            break
        ranked = flat[np.lexsort((soft.ravel()[flat], np.round(value.ravel()[flat], 9)))]
        choice, tried = None, set()
        for k in ranked.tolist():
            i, j = divmod(k, len(b))
            kind = (cls[a[i]], cls[b[j]])
            if kind in tried:  # the same class counts as a swap already scored
                continue
            tried.add(kind)
            na, nb = a.copy(), b.copy()
            na[i], nb[j] = b[j], a[i]
            score = exact(na.tolist(), nb.tolist())
            if choice is None or score < choice[0]:
                choice = (score, i, j)
            if len(tried) >= candidates:
                break
        score, i, j = choice
        a[i], b[j] = b[j], a[i]
        locked_a[i] = locked_b[j] = True
        if score < best:
            best, best_ab = score, (a.copy(), b.copy())
    out = [list(g) for g in groups]
    out[A], out[B] = sorted(best_ab[0].tolist()), sorted(best_ab[1].tolist())
    return out


def _score(model: CostModel, groups: list[list[int]]) -> tuple[float, float, list[int]]:
    cost, _, _, order = model.cost(groups)
    return cost, model.soft(groups, order), order


def _better(x: tuple, y: tuple) -> bool:
    return (round(x[0], 9), x[1]) < (round(y[0], 9), y[1])


def local_search(model: CostModel, labels: list[int], rng: random.Random, passes: int,
                 steps: int = 0) -> tuple[list[int], tuple[float, float]]:
    G = model.D_PP
    groups = groups_of(labels, G)
    cur = _score(model, groups)
    for _ in range(passes):
        A, B = rng.sample(range(G), 2)
        trial = kl_pass(model, groups, cur[2], A, B, steps)
        score = _score(model, trial)
        if _better(score, cur):
            groups, cur = trial, score
    out = [0] * len(labels)
    for g, members in enumerate(groups):
        for d in members:
            out[d] = g
    return out, cur[:2]


def search(model: CostModel, *, seed: int = 0, population: int = 100, offspring: int = 1000,
           passes: int = 1, steps: int = 0, seeds: bool = True) -> SearchResult:
    """The memetic search; deterministic for a seed."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    N, G = model.cluster.N, model.D_PP
    pop = seed_labels(model) if seeds else []
    pop += [random_labels(N, G, rng) for _ in range(max(population, 2) - len(pop))]
    scores = [_score(model, groups_of(p, G))[:2] for p in pop]
    history = [min(s[0] for s in scores)]
    for _ in range(offspring):
        i, j = rng.sample(range(len(pop)), 2)
        child = crossover(pop[i], pop[j], G, rng)
        child, score = local_search(model, child, rng, passes, steps)
        worse = i if not _better(scores[i], scores[j]) else j
        if _better(score, scores[worse]):
            pop[worse], scores[worse] = child, score
        history.append(min(s[0] for s in scores))
    best = min(range(len(pop)), key=lambda k: (round(scores[k][0], 9), scores[k][1], k))
    alloc = model.allocate(groups_of(pop[best], G))
    return SearchResult(alloc, history, model.evaluations, time.perf_counter() - t0)
