"""The modelled cluster: devices, workers, regions, links, stragglers and outages.

What is real and what is modelled is written down in docs/simulation.md. In short: a worker's
`n` inner steps take `n * step_time / speed` seconds, slowed by straggler windows; a message
of S bytes between regions r and s takes `latency[r][s] + 8 S / bandwidth[r][s]` on an idle
link, and concurrent transfers share links max-min fairly (runtime/network.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .config import ClusterConfig, WorkerSpec
from .errors import UserError

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (without sparsity).
# B300 is about 1.5x B200 in dense FP4; for bf16 NVIDIA lists both near 2.25-2.5 PFLOP/s, so
# we follow the common "1.5x" planning figure for mixed fleets and say so.
DEVICES = {
    "A100": 312e12,  # A100 SXM datasheet
    "H100": 989e12,  # H100 SXM datasheet
    "H200": 989e12,  # same GH100 compute as H100, more and faster memory
    "B200": 2250e12,  # DGX B200 datasheet: 18 PFLOP/s dense FP16/BF16 for 8 GPUs
    "B300": 3375e12,  # planning figure: 1.5x B200 (see note above)
    "RTX4090": 165e12,  # Ada whitepaper, dense FP16 tensor with FP32 accumulate
    "L40S": 362e12,  # L40S datasheet, dense
    "CPU": 1e12,  # a nominal host for phantom planning only
}


# --------------------------------------------------------------------------- presets

# HALoS (Kim et al., ICML 2025; github.com/utnslab/halos, examples/env.yaml): 4 regions x 4
# workers, inter-region Gbit/s below, 100 Gbit/s inside a region, speeds normalised by the
# fastest (an ~8.5x spread), 0.238 s per step at speed 1. They model no latency; we add
# 0.1 ms inside a region and 30-150 ms across, growing as bandwidth shrinks.
HALOS_GBPS = [
    [100, 0.537, 0.935, 0.202],
    [0.537, 100, 0.386, 0.117],
    [0.935, 0.386, 100, 0.127],
    [0.202, 0.117, 0.127, 100],
]
HALOS_LATENCY = [
    [1e-4, 0.060, 0.030, 0.120],
    [0.060, 1e-4, 0.080, 0.150],
    [0.030, 0.080, 1e-4, 0.140],
    [0.120, 0.150, 0.140, 1e-4],
]
HALOS_SPEEDS = [
    [0.232, 0.907, 0.828, 0.347],
    [0.574, 0.531, 0.722, 0.194],
    [0.852, 0.132, 0.896, 0.107],
    [0.827, 0.515, 0.527, 0.788],
]
# Yuan et al. 2022 (arXiv 2206.01288) world-wide scenario: 8 cities, 0.33-1.16 Gbit/s and
# 11-238 ms across. Their measured table is in DS3Lab/DT-FM config.py; we use a symmetric
# approximation on the same ranges (it feeds the planner, not a reproduction).
WORLD_CITIES = ["oregon", "virginia", "ohio", "tokyo", "seoul", "london", "frankfurt", "ireland"]


def _world_matrices() -> tuple[list[list[float]], list[list[float]]]:
    coords = [(-123, 44), (-78, 37), (-83, 40), (140, 36), (127, 37), (0, 51), (9, 50), (-8, 53)]
    n = len(coords)
    lat = [[1e-4] * n for _ in range(n)]
    bw = [[100.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                dx = min(abs(coords[i][0] - coords[j][0]), 360 - abs(coords[i][0] - coords[j][0]))
                d = math.hypot(dx, coords[i][1] - coords[j][1]) / 200  # 0..~1.2
                lat[i][j] = round(0.011 + 0.227 * min(1.0, d), 4)
                bw[i][j] = round(1.16 - 0.83 * min(1.0, d), 3)
    return lat, bw


def expand_preset(c: ClusterConfig) -> ClusterConfig:
    """Fill regions, matrices and workers from the preset, keeping explicit fields."""
    if c.preset == "custom":
        return c
    out = ClusterConfig(**{**c.__dict__})
    inter_bw = c.inter_gbps or None
    inter_lat = c.inter_latency_s if c.inter_latency_s >= 0 else None
    if c.preset == "single":
        n = c.size or 1
        regions, lat, bw = ["r0"], [[0.0]], [[0.0]]
        workers = [WorkerSpec("r0", count=n)]
    elif c.preset == "two-datacenters":
        n = c.size or 4
        if n < 2 or n % 2:
            raise UserError(f"cluster.size for two-datacenters must be even and >= 2, got {n}")
        x_bw, x_lat = inter_bw or 1.0, 0.03 if inter_lat is None else inter_lat
        regions = ["dc0", "dc1"]
        lat, bw = [[1e-4, x_lat], [x_lat, 1e-4]], [[100.0, x_bw], [x_bw, 100.0]]
        workers = [WorkerSpec("dc0", count=n // 2), WorkerSpec("dc1", count=n // 2)]
    elif c.preset == "mixed-fleet":
        n = c.size or 4
        if n < 2 or n % 2:
            raise UserError(f"cluster.size for mixed-fleet must be even and >= 2, got {n}")
        regions, lat, bw = ["dc0"], [[1e-4]], [[100.0]]
        workers = [WorkerSpec("dc0", device="B200", count=n // 2),
                   WorkerSpec("dc0", device="B300", count=n // 2)]
    elif c.preset == "halos-4x4":
        regions = [f"r{i}" for i in range(4)]
        lat = [row[:] for row in HALOS_LATENCY]
        bw = [row[:] for row in HALOS_GBPS]
        top = max(max(r) for r in HALOS_SPEEDS)
        workers = [WorkerSpec(f"r{i}", speed=round(s / top, 4)) for i, row in
                   enumerate(HALOS_SPEEDS) for s in row]
        for i in range(4):
            for j in range(4):
                if i != j:
                    bw[i][j] = inter_bw or bw[i][j]
                    lat[i][j] = lat[i][j] if inter_lat is None else inter_lat
        if not c.step_time_s:
            out.step_time_s = 0.2384
    else:  # world
        regions = WORLD_CITIES[:]
        lat, bw = _world_matrices()
        n = c.size or len(regions)
        workers = [WorkerSpec(regions[i % len(regions)]) for i in range(n)]
    out.regions = c.regions or regions
    out.latency_s = c.latency_s or lat
    out.bandwidth_gbps = c.bandwidth_gbps or bw
    out.workers = c.workers or workers
    return out


# --------------------------------------------------------------------------- the model


@dataclass
class Worker:
    index: int
    region: int
    speed: float  # relative to a reference device of speed 1 (device peak / reference peak)
    batch_size: int
    device: str
    join_s: float = 0.0


class Cluster:
    """Everything the runtimes need to know about the modelled machines and links."""

    def __init__(self, cfg: ClusterConfig, default_batch: int):
        c = expand_preset(cfg)
        self.cfg = c
        self.regions = list(c.regions)
        R = len(self.regions)
        if R == 0:
            raise UserError("cluster.regions is empty; name at least one region")
        if len(set(self.regions)) != R:
            raise UserError(f"cluster.regions has duplicates: {self.regions}")
        for key, mat in (("latency_s", c.latency_s), ("bandwidth_gbps", c.bandwidth_gbps)):
            if len(mat) != R or any(len(row) != R for row in mat):
                raise UserError(f"cluster.{key} must be a {R}x{R} matrix (one row and column "
                                f"per region in cluster.regions)")
            if any(v < 0 or math.isnan(v) for row in mat for v in row):
                # a preset's matrix is negative only through the override
                name = f"cluster.{key}" if getattr(cfg, key) else "cluster.inter_gbps"
                raise UserError(f"{name} has a negative entry; latencies and "
                                "bandwidths must be >= 0 (bandwidth 0 means unlimited)")
        self.latency = [[float(v) for v in row] for row in c.latency_s]
        # bit/s; 0 in the config means an unlimited link
        self.bandwidth = [[v * 1e9 if v > 0 else math.inf for v in row] for row in c.bandwidth_gbps]
        if c.device not in DEVICES:
            raise UserError(f"unknown cluster.device '{c.device}'; known: {', '.join(DEVICES)}")
        ref_peak = DEVICES[c.device]
        self.workers: list[Worker] = []
        for spec in c.workers:
            if spec.region not in self.regions:
                raise UserError(f"worker region '{spec.region}' is not in cluster.regions "
                                f"({', '.join(self.regions)})")
            device = spec.device or c.device
            if device not in DEVICES:
                raise UserError(f"unknown device '{device}'; known: {', '.join(DEVICES)}")
            if spec.speed <= 0 or spec.count < 1 or spec.batch_size < 0:
                raise UserError("a worker needs speed > 0, count >= 1 and batch_size >= 0")
            if spec.join_s < 0:
                raise UserError(f"a worker's join_s must be >= 0, got {spec.join_s}")
            for _ in range(spec.count):
                self.workers.append(Worker(
                    index=len(self.workers), region=self.regions.index(spec.region),
                    speed=spec.speed * DEVICES[device] / ref_peak,
                    batch_size=spec.batch_size or default_batch, device=device,
                    join_s=spec.join_s,
                ))
        if not self.workers:
            raise UserError("the cluster has no workers; add [[cluster.workers]] entries")
        if not 0 <= c.heterogeneity <= 1:
            raise UserError(f"cluster.heterogeneity must be in [0, 1], got {c.heterogeneity}")
        fastest = max(w.speed for w in self.workers)
        for w in self.workers:  # shrink every worker's gap to the fastest by the factor
            w.speed = fastest - c.heterogeneity * (fastest - w.speed)
        if c.step_time_s < 0 or c.mfu <= 0 or c.jitter < 0:
            raise UserError("cluster.step_time_s must be >= 0, cluster.mfu > 0, cluster.jitter >= 0")
        if c.step_fixed_s < 0 or (c.step_time_s > 0 and c.step_fixed_s > c.step_time_s):
            raise UserError(f"cluster.step_fixed_s must be in [0, cluster.step_time_s], got "
                            f"{c.step_fixed_s}; it is the part of a step that does not scale "
                            "with the batch")
        self.reference_peak = ref_peak
        self.default_batch = default_batch
        self._slowdowns = self._build_slowdowns(c)
        self._capacity_events = self._build_capacity_events(c)
        self.crashes = self._build_crashes(c)  # (worker, at, restart_at or None), by time
        # With on_crash = "wait" a crash is a window in which the worker is down.
        self._down: dict[int, list[tuple[float, float]]] = {}
        if c.on_crash == "wait":
            for w, at, back in self.crashes:
                self._down.setdefault(w, []).append((at, back))

    @property
    def M(self) -> int:
        return len(self.workers)

    def region_index(self, name: str) -> int:
        if name not in self.regions:
            raise UserError(f"unknown region '{name}'; cluster.regions = {', '.join(self.regions)}")
        return self.regions.index(name)

    # -- compute time ---------------------------------------------------------------
    def step_time(self, worker: int, flops_per_token: float, seq_len: int) -> float:
        """Seconds for one inner step of `worker` at full speed (before slowdowns)."""
        w, fixed = self.workers[worker], self.cfg.step_fixed_s
        if self.cfg.step_time_s > 0:
            base = fixed + (self.cfg.step_time_s - fixed) * w.batch_size / self.default_batch
        else:
            flops = flops_per_token * w.batch_size * seq_len
            base = fixed + flops / (self.reference_peak * self.cfg.mfu)
        return base / w.speed

    def compute_span(self, worker: int, start: float, seconds: float) -> tuple[float, float]:
        """When `seconds` of full-speed work started at `start` ends, given slowdown windows
        and down windows (on_crash = "wait": work under way when the worker goes down is
        lost and starts over when it is back). Returns (end, the share of the work lost)."""
        t, lost = start, 0.0
        while True:
            t = max([t] + [b for a, b in self._down.get(worker, []) if a <= t < b])
            end = self._slowed_end(worker, t, seconds)
            crash = min((a for a, _ in self._down.get(worker, []) if t < a < end), default=None)
            if crash is None:
                return end, lost
            lost += (crash - t) / (end - t)  # the time-share of the work done before the crash
            t = crash

    def compute_end(self, worker: int, start: float, seconds: float) -> float:
        return self.compute_span(worker, start, seconds)[0]

    def _slowed_end(self, worker: int, start: float, seconds: float) -> float:
        """When `seconds` of full-speed work started at `start` ends, given slowdown windows."""
        t, left = start, seconds
        for s0, s1, factor in self._slowdowns.get(worker, []):
            if s1 <= t:
                continue
            if s0 > t:  # full speed until the window opens
                if t + left <= s0:
                    return t + left
                left -= s0 - t
                t = s0
            # inside the window: work proceeds at 1/factor
            if t + left * factor <= s1:
                return t + left * factor
            left -= (s1 - t) / factor
            t = s1
        return t + left

    def _build_slowdowns(self, c: ClusterConfig) -> dict[int, list[tuple[float, float, float]]]:
        windows: dict[int, list[tuple[float, float, float]]] = {}
        for s in c.slowdowns:
            if not 0 <= s.worker < len(self.workers) or s.end_s <= s.start_s or s.factor <= 0:
                raise UserError("a cluster.slowdowns entry needs a valid worker index, "
                                "end_s > start_s and factor > 0")
            windows.setdefault(s.worker, []).append((s.start_s, s.end_s, s.factor))
        f = c.failures
        if f.horizon_s > 0 and f.straggler_rate_per_hour > 0:
            rng = random.Random(f"stragglers-{f.seed}")
            for w in range(len(self.workers)):
                t = 0.0
                while True:  # the next one can only start after this one ends: never overlapping
                    t += rng.expovariate(f.straggler_rate_per_hour / 3600.0)
                    if t >= f.horizon_s:
                        break
                    windows.setdefault(w, []).append((t, t + f.straggler_duration_s,
                                                      f.straggler_factor))
                    t += f.straggler_duration_s
        for w, spans in windows.items():
            spans.sort()
            for (a0, a1, _), (b0, _, _) in zip(spans, spans[1:]):
                if b0 < a1:
                    raise UserError(f"slowdown windows of worker {w} overlap; merge them")
        return windows

    # -- links ----------------------------------------------------------------------
    def _build_capacity_events(self, c: ClusterConfig) -> dict[tuple[int, int], list[tuple[float, float]]]:
        """Per inter-region link: sorted (time, multiplier-or-gbps) breakpoints."""
        events: dict[tuple[int, int], list[tuple[float, float]]] = {}
        for tr in c.traces:
            r, s = self.region_index(tr.src), self.region_index(tr.dst)
            if len(tr.times_s) != len(tr.gbps) or not tr.times_s or any(g < 0 for g in tr.gbps):
                raise UserError("a cluster.traces entry needs equally long times_s and gbps "
                                "lists with non-negative bandwidths")
            # 0 Gbit/s in a trace is a link carrying nothing (not "unlimited", as in the matrix)
            events[(r, s)] = [(t, g * 1e9) for t, g in zip(tr.times_s, tr.gbps)]
        self._outages: dict[tuple[int, int], list[tuple[float, float]]] = {}
        for o in c.outages:
            r, s = self.region_index(o.src), self.region_index(o.dst)
            if o.end_s <= o.start_s:
                raise UserError("a cluster.outages entry needs end_s > start_s")
            self._outages.setdefault((r, s), []).append((o.start_s, o.end_s))
        f = c.failures
        if f.horizon_s > 0 and f.outage_rate_per_hour > 0:
            rng = random.Random(f"outages-{f.seed}")
            for r in range(len(self.regions)):
                for s in range(len(self.regions)):
                    if r == s:
                        continue
                    t = 0.0
                    while True:
                        t += rng.expovariate(f.outage_rate_per_hour / 3600.0)
                        if t >= f.horizon_s:
                            break
                        self._outages.setdefault((r, s), []).append((t, t + f.outage_duration_s))
                        t += f.outage_duration_s
        self._lost: dict[tuple[int, int], float] = {}
        for loss in c.link_losses:
            r, s = self.region_index(loss.src), self.region_index(loss.dst)
            if r == s or loss.at_s < 0:
                raise UserError("a cluster.link_losses entry needs two different regions and "
                                "at_s >= 0")
            self._lost[(r, s)] = min(loss.at_s, self._lost.get((r, s), math.inf))
            self._outages.setdefault((r, s), []).append((loss.at_s, math.inf))
        return events

    def _build_crashes(self, c: ClusterConfig) -> list[tuple[int, float, float | None]]:
        """Every worker crash: (worker, at, restart time or None), from cluster.crashes and a
        seeded random schedule (cluster.failures.crash_rate_per_hour), whose next crash of a
        worker can only come after its restart."""
        crashes = []
        for spec in c.crashes:
            if not 0 <= spec.worker < len(self.workers):
                raise UserError(f"cluster.crashes names worker {spec.worker}, but the cluster has "
                                f"workers 0-{len(self.workers) - 1}; use one of those")
            if spec.at_s < 0 or spec.notice_s < 0:
                raise UserError(f"cluster.crashes of worker {spec.worker}: at_s and notice_s must "
                                f"be >= 0, got {spec.at_s:g} and {spec.notice_s:g}")
            back = spec.at_s + spec.restart_after_s if spec.restart_after_s >= 0 else None
            crashes.append((spec.worker, spec.at_s, back))
        f = c.failures
        if f.horizon_s > 0 and f.crash_rate_per_hour > 0:
            rng = random.Random(f"crashes-{f.seed}")
            for w in range(len(self.workers)):
                t = 0.0
                while True:
                    t += rng.expovariate(f.crash_rate_per_hour / 3600.0)
                    if t >= f.horizon_s:
                        break
                    back = t + f.restart_after_s if f.restart_after_s >= 0 else None
                    crashes.append((w, t, back))
                    if back is None:
                        break
                    t = back
        crashes.sort(key=lambda x: (x[1], x[0]))
        by_worker: dict[int, list] = {}
        for w, at, back in crashes:
            by_worker.setdefault(w, []).append((at, back))
        for w, spans in by_worker.items():
            for (a0, b0), (a1, _) in zip(spans, spans[1:]):
                if b0 is None or a1 < b0:
                    raise UserError(f"cluster.crashes of worker {w} overlap (a crash at {a1:g} s "
                                    "while it is still down); remove one")
        if c.on_crash == "wait" and any(back is None for _, _, back in crashes):
            raise UserError("a worker that never comes back (restart_after_s = -1) cannot be "
                            "waited for; set cluster.on_crash = \"drop\" or give it a restart")
        return crashes

    def crashes_that_drop(self) -> list[tuple[int, float, float | None]]:
        """The crashes that end a worker's process (on_crash = "drop")."""
        return self.crashes if self.cfg.on_crash == "drop" else []

    def is_down(self, worker: int, t: float) -> bool:
        return any(a <= t < b for a, b in self._down.get(worker, []))

    def lost_links(self, t: float) -> list[str]:
        """The links that are down for good at time t, as 'r0->r1 (at 500 s)'."""
        return [f"{self.regions[r]}->{self.regions[s]} (lost at {at:g} s)"
                for (r, s), at in sorted(self._lost.items()) if at <= t]

    def link_bandwidth(self, r: int, s: int, t: float) -> float:
        """bit/s of the link r -> s at time t (0 during an outage, inf if unlimited)."""
        for a, b in self._outages.get((r, s), []):
            if a <= t < b:
                return 0.0
        bw = self.bandwidth[r][s]
        for t0, value in self._capacity_events.get((r, s), []):
            if t0 <= t:
                bw = value
        return bw

    def capacity_breakpoints(self) -> list[float]:
        """Every time at which some link's or worker NIC's bandwidth changes."""
        times = {t for ev in self._capacity_events.values() for t, _ in ev}
        times |= {t for spans in self._outages.values() for span in spans for t in span}
        times |= {t for spans in self._down.values() for span in spans for t in span}
        return sorted(t for t in times if t != math.inf)

    def describe(self) -> str:
        return (f"{self.M} workers in {len(self.regions)} regions "
                f"({', '.join(self.regions)}), speeds "
                f"{min(w.speed for w in self.workers):.3g}-{max(w.speed for w in self.workers):.3g}")
