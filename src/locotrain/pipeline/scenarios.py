"""The five network scenarios of Yuan et al. (NeurIPS 2022, arXiv 2206.01288, spec 9.4), and
cluster files: devices with a latency and a bandwidth matrix between every pair.

64 V100 GPUs in every scenario. Numbers from the spec; where it is silent or gives a range,
the choice is ours and is written next to it. Their simulation code (DS3Lab/DT-FM,
scheduler/heuristic_evolutionary_solver/config.py) builds the same five cases; we follow its
region layout (which devices sit where) and, for us-regions and world-8, its per-pair
measured numbers, which lie inside the spec's ranges.

A cluster file (TOML or JSON) holds `latency_s` and `bandwidth_gbps`, N x N, symmetric, and
optionally `sites` (a label per device, for the picture) and `devices` (a kind per device from
the catalogue below, for compute times; default V100).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cluster import DEVICES
from ..errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

# Dense fp16/bf16 tensor peak, FLOP/s. V100 is not in the project's catalogue (cluster.py):
# 125 TFLOP/s is the V100 SXM2 datasheet's tensor-core figure.
PEAK_FLOPS = {**DEVICES, "V100": 125e12}


@dataclass
class Cluster:
    name: str
    sites: list[str]  # a label per device
    kinds: list[str]  # device kind per device (PEAK_FLOPS key)
    latency_s: np.ndarray  # N x N
    bandwidth_gbps: np.ndarray  # N x N
    note: str = ""

    @property
    def N(self) -> int:
        return len(self.sites)


def _build(name: str, note: str, sites: list[str], link) -> Cluster:
    """link(site_a, site_b) -> (latency s, Gbit/s) for two different devices."""
    n = len(sites)
    lat, bw = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            lat[i, j], bw[i, j] = link(sites[i], sites[j]) if i != j else (0.0, math.inf)
    return Cluster(name, sites, ["V100"] * n, lat, bw, note)


def dc_ondemand() -> Cluster:
    # 8 instances x 8 GPUs; 100 Gbit/s inside an instance, 3.125 between (spec). Latency is
    # not given (DT-FM uses 0): we take 10 us inside an instance, 100 us between.
    sites = [f"inst{i // 8}" for i in range(64)]
    return _build("dc-ondemand", "8 instances x 8 V100, 100 Gbit/s inside, 3.125 between",
                  sites, lambda a, b: (1e-5, 100.0) if a == b else (1e-4, 3.125))


def spot() -> Cluster:
    # 8 spot instances of 4 GPUs (100 Gbit/s inside, our choice as for dc-ondemand) plus 32
    # single-GPU machines; 1.25 Gbit/s between any two machines (spec); latencies as above.
    sites = [f"spot{i // 4}" for i in range(32)] + [f"single{i}" for i in range(32)]
    return _build("spot", "8 x 4-GPU spot instances + 32 single GPUs, 1.25 Gbit/s between",
                  sites, lambda a, b: (1e-5, 100.0) if a == b else (1e-4, 1.25))


def two_universities() -> Cluster:
    # 32 GPUs in Ohio, 32 in Virginia: 5 Gbit/s and 1 ms inside, 1.12 Gbit/s and 11 ms across.
    sites = ["ohio"] * 32 + ["virginia"] * 32
    return _build("two-universities", "32 V100 in Ohio + 32 in Virginia", sites,
                  lambda a, b: (1e-3, 5.0) if a == b else (11e-3, 1.12))


# DT-FM config.py's case 3, (ms, Gbit/s): inside the spec's 11-67 ms and 1.02-1.25 Gbit/s.
US_PAIRS = {
    ("virginia", "oregon"): (67, 1.15), ("virginia", "california"): (59, 1.05),
    ("virginia", "ohio"): (11, 1.12), ("oregon", "california"): (12, 1.25),
    ("oregon", "ohio"): (49, 1.10), ("california", "ohio"): (52, 1.02),
}

# Yuan et al.'s measured AWS table (DT-FM config.py, `delay_bandwidth_dict`), the 8 cities
# of the world-wide case, (ms, Gbit/s). Inside a city: 5 ms and 2 Gbit/s, as DT-FM assumes.
WORLD_PAIRS = {
    ("oregon", "virginia"): (67, 0.79), ("oregon", "ohio"): (49, 1.10),
    ("oregon", "tokyo"): (96, 0.523), ("oregon", "seoul"): (124, 0.46),
    ("oregon", "london"): (136, 0.42), ("oregon", "frankfurt"): (143, 0.404),
    ("oregon", "ireland"): (124, 0.482), ("virginia", "ohio"): (11, 1.12),
    ("virginia", "tokyo"): (143, 0.524), ("virginia", "seoul"): (172, 0.500),
    ("virginia", "london"): (76, 1.16), ("virginia", "frankfurt"): (90, 1.02),
    ("virginia", "ireland"): (67, 1.05), ("ohio", "tokyo"): (130, 0.694),
    ("ohio", "seoul"): (159, 0.529), ("ohio", "london"): (86, 1.05),
    ("ohio", "frankfurt"): (99, 0.799), ("ohio", "ireland"): (77, 1.14),
    ("tokyo", "seoul"): (34, 1.10), ("tokyo", "london"): (210, 0.366),
    ("tokyo", "frankfurt"): (223, 0.36), ("tokyo", "ireland"): (199, 0.465),
    ("seoul", "london"): (238, 0.342), ("seoul", "frankfurt"): (235, 0.358),
    ("seoul", "ireland"): (228, 0.335), ("london", "frankfurt"): (14, 1.14),
    ("london", "ireland"): (12, 1.09), ("frankfurt", "ireland"): (24, 1.08),
}


def _regions(name: str, note: str, cities: list[str], pairs: dict, per_city: int) -> Cluster:
    def link(a, b):
        if a == b:
            return 5e-3, 2.0
        ms, gbps = pairs.get((a, b)) or pairs[(b, a)]
        return ms / 1e3, gbps
    return _build(name, note, [c for c in cities for _ in range(per_city)], link)


def us_regions() -> Cluster:
    return _regions("us-regions", "4 US regions x 16 V100; 2 Gbit/s and 5 ms inside",
                    ["virginia", "oregon", "california", "ohio"], US_PAIRS, 16)


def world_8() -> Cluster:
    return _regions("world-8", "8 cities on 3 continents x 8 V100; measured AWS links",
                    ["oregon", "virginia", "ohio", "tokyo", "seoul", "london", "frankfurt",
                     "ireland"], WORLD_PAIRS, 8)


SCENARIOS = {"dc-ondemand": dc_ondemand, "spot": spot, "two-universities": two_universities,
             "us-regions": us_regions, "world-8": world_8}


# --------------------------------------------------------------------------- cluster files


def load_cluster(source: str) -> Cluster:
    """A scenario name or a TOML/JSON cluster file."""
    if source in SCENARIOS:
        return SCENARIOS[source]()
    path = Path(source)
    if not path.is_file():
        near = difflib.get_close_matches(source, list(SCENARIOS), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"no scenario or cluster file named '{source}'; {hint}scenarios: "
                        f"{', '.join(SCENARIOS)} (or a .toml/.json file with latency_s and "
                        "bandwidth_gbps matrices)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"'{source}' is not valid {'JSON' if path.suffix == '.json' else 'TOML'}"
                        f": {e}") from None
    return cluster_from_dict(path.stem, data, source)


def cluster_from_dict(name: str, data: dict, where: str = "the cluster") -> Cluster:
    unknown = set(data) - {"latency_s", "bandwidth_gbps", "sites", "devices", "note"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a cluster has "
                        "latency_s, bandwidth_gbps, sites, devices, note")
    mats = {}
    for key in ("latency_s", "bandwidth_gbps"):
        if key not in data:
            raise UserError(f"{where} has no {key}; give an N x N matrix (one row per device)")
        mats[key] = _square(data[key], f"{where}: {key}")
    lat, bw = mats["latency_s"], mats["bandwidth_gbps"]
    n = len(lat)
    if bw.shape != lat.shape:
        raise UserError(f"{where}: latency_s is {n} x {n} but bandwidth_gbps is "
                        f"{bw.shape[0]} x {bw.shape[1]}; both need one row per device")
    off = ~np.eye(n, dtype=bool)
    if (lat < 0).any() or (bw[off] <= 0).any():
        raise UserError(f"{where}: latencies must be >= 0 and bandwidths > 0 between devices")
    if not (np.allclose(lat, lat.T) and np.allclose(bw, bw.T)):
        raise UserError(f"{where}: the matrices must be symmetric (the paper's cost counts "
                        "each link once for activations and once for gradients)")
    sites = [str(s) for s in data.get("sites", [f"d{i}" for i in range(n)])]
    kinds = data.get("devices", ["V100"] * n)
    if isinstance(kinds, str):
        kinds = [kinds] * n
    if len(sites) != n or len(kinds) != n:
        raise UserError(f"{where}: sites and devices need one entry per device ({n})")
    bad = sorted(set(kinds) - set(PEAK_FLOPS))
    if bad:
        raise UserError(f"{where}: unknown device kind(s) {', '.join(bad)}; known: "
                        f"{', '.join(PEAK_FLOPS)}")
    bw = bw.copy()
    np.fill_diagonal(bw, math.inf)
    return Cluster(name, sites, list(kinds), lat, bw, str(data.get("note", "")))


def _square(rows, where: str) -> np.ndarray:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise UserError(f"{where} must be a list of rows (an N x N matrix of numbers)")
    n = len(rows)
    for i, row in enumerate(rows):
        if len(row) != n:
            raise UserError(f"{where} must be square: it has {n} rows but row {i} has "
                            f"{len(row)} entries")
    try:
        m = np.array(rows, dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"{where} holds something that is not a number") from None
    if not np.isfinite(m[~np.eye(n, dtype=bool)]).all():
        raise UserError(f"{where} holds a non-finite number between two devices")
    return m


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class GPTSizes:
    """What the planner needs to know about the model: GPT-3 XL by default (spec 9.4)."""
    layers: int = 24
    width: int = 2048
    seq_len: int = 2048
    sequences: int = 32  # per pipeline per step: 0.5M-token batch / 2048 / 8 pipelines
    micro_batch: int = 1  # sequences per micro-batch (DT-FM's scripts: --micro-batch-size 1)
    bytes_per_value: int = 2  # fp16 activations and gradients

    @property
    def micro_batches(self) -> int:
        return self.sequences // self.micro_batch

    def layers_per_stage(self, S: int) -> list[int]:
        """As even as possible, the first stages taking one more."""
        return [self.layers // S + (1 if s < self.layers % S else 0) for s in range(S)]

    def stage_param_bytes(self, layers: int) -> float:
        """Gradient bytes of a stage: 12 width^2 weights per block (no embedding or head)."""
        return layers * 12 * self.width ** 2 * self.bytes_per_value

    def activation_bytes(self, sequences: int) -> float:
        """One activation (or activation-gradient) message for `sequences` sequences."""
        return sequences * self.seq_len * self.width * self.bytes_per_value

    def forward_flops(self, layers: int, sequences: int) -> float:
        """2 x 12 width^2 per token per block for the matmuls plus 4 seq_len width for
        attention scores and values (the forward third of PaLM's 6N + 12 L d T)."""
        tokens = sequences * self.seq_len
        return layers * tokens * (24 * self.width ** 2 + 4 * self.seq_len * self.width)
