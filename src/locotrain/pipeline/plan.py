"""From a placement to one simulated training step (timeline.py): compute times from the
model's FLOPs and the devices' peaks, activation messages over the matched devices' links,
and a ring all-reduce per stage group.

Assumptions, beyond the time model's own (docs/pipelines.md):
* A micro-batch's forward on a stage takes its FLOPs / (device peak x mfu); each half of the
  backward (p1: input gradient, p2: weight gradient) takes as long as the forward, the usual
  2x-forward backward of matmul-dominated layers split evenly. Embedding and head are left
  out, as in the paper's cost model (equal stages of transformer blocks).
* The data-parallel all-reduce of a stage group is the ring closed form
  2(M-1) l + 2(M-1)/M 8 S / B (runtime/network.py's `ring_allreduce_time`), over the ring
  order with the largest bottleneck bandwidth (then the smallest worst latency); l is that
  ring's worst hop latency and B its bottleneck bandwidth.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from ..runtime.network import ring_allreduce_time
from .placement import Allocation
from .scenarios import PEAK_FLOPS, Cluster, GPTSizes
from .timeline import Link, Pipeline, StageTimes, Timeline, simulate


@lru_cache(maxsize=None)
def _rings(M: int) -> np.ndarray:
    """Every ring over M members that starts at member 0, one direction only: (R, M + 1)."""
    rings = [(0,) + p + (0,) for p in itertools.permutations(range(1, M)) if p[0] < p[-1]]
    return np.array(rings or [(0,) * (M + 1)])


def best_ring(devices: list[int], cluster: Cluster) -> tuple[list[int], float, float]:
    """(ring order, worst hop latency s, bottleneck Gbit/s). Exhaustive up to 8 members;
    beyond that the devices are ringed site by site (as runtime/network.py groups by region)."""
    M = len(devices)
    if M <= 1:
        return list(devices), 0.0, math.inf
    dev = np.array(devices)
    if M <= 8:
        rings = dev[_rings(M)]
    else:
        rings = np.array([sorted(devices, key=lambda d: (cluster.sites[d], d)) + [0]])
        rings[0, -1] = rings[0, 0]
    bw = cluster.bandwidth_gbps[rings[:, :-1], rings[:, 1:]].min(axis=1)
    lat = cluster.latency_s[rings[:, :-1], rings[:, 1:]].max(axis=1)
    k = int(np.lexsort((lat, -bw))[0])
    return rings[k, :-1].tolist(), float(lat[k]), float(bw[k])


def ring_time(devices: list[int], nbytes: float, cluster: Cluster) -> float:
    _, lat, gbps = best_ring(devices, cluster)
    return ring_allreduce_time(len(devices), nbytes, lat, gbps * 1e9)


def pipeline_of(alloc: Allocation, cluster: Cluster, sizes: GPTSizes, mfu: float) -> Pipeline:
    S = len(alloc.stages)
    layers = sizes.layers_per_stage(S)
    times, links, names = [], [], []
    for chain in alloc.pipelines:
        row = []
        for s, d in enumerate(chain):
            flops = sizes.forward_flops(layers[s], sizes.micro_batch)
            f = flops / (PEAK_FLOPS[cluster.kinds[d]] * mfu)
            row.append(StageTimes(forward=f, p1=f, p2=f))
        times.append(row)
        links.append([Link(float(cluster.latency_s[a, b]), float(cluster.bandwidth_gbps[a, b]))
                      for a, b in zip(chain, chain[1:])])
        names.append([f"{d} {cluster.sites[d]}" for d in chain])
    allreduce = [ring_time(alloc.stages[s], sizes.stage_param_bytes(layers[s]), cluster)
                 for s in range(S)]
    return Pipeline(times, links, sizes.micro_batches, sizes.activation_bytes(sizes.micro_batch),
                    allreduce, names)


def simulate_placement(alloc: Allocation, cluster: Cluster, sizes: GPTSizes, mfu: float,
                       schedule: str = "gpipe", **kw) -> Timeline:
    return simulate(pipeline_of(alloc, cluster, sizes, mfu), schedule, **kw)
