"""`loco place CLUSTER [--set KEY=VALUE ...] [--out DIR]`: Yuan et al.'s decentralized scheduler
on a cluster (a scenario or a cluster file), its allocation simulated with the pipeline time
model. Wired into `loco` by cli.py through `add_parser`.

Writes DIR/placement.json (costs of the optimised allocation and of the baselines, the
simulated step times, the allocation), DIR/placement.png and DIR/gantt.png.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


@dataclass
class PlaceSettings:
    """Every `--set` key of `loco place`; defaults are the paper's setup (spec 9.4)."""
    stages: int = 8  # D_PP
    replicas: int = 0  # D_DP; 0 = devices / stages
    # the model (GPT-3 XL) and the batch
    layers: int = 24
    width: int = 2048
    seq_len: int = 2048
    sequences: int = 32  # per pipeline per step
    micro_batch: int = 1  # sequences per micro-batch
    bytes_per_value: int = 2
    mfu: float = 0.4  # our choice for fp16 V100s (not from the paper)
    # the simulated step
    schedule: str = "gpipe"
    twobp: bool = False
    p2: str = "end"
    concat: bool = False
    # the search
    seed: int = 0
    population: int = 100
    offspring: int = 1000  # the paper: 4,900 (see docs/pipelines.md for why fewer)
    passes: int = 1  # Kernighan-Lin passes per offspring
    seeds: bool = True  # the two constructed partitions join the population
    random_samples: int = 1000  # random allocations for the baseline costs
    simulate_random: int = 5  # of which this many are simulated for the baseline step time


def parse_settings(items: list[str]) -> PlaceSettings:
    fields = {f.name: f for f in dataclasses.fields(PlaceSettings)}
    values = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, text = (x.strip() for x in item.split("=", 1))
        if key not in fields:
            raise UserError(f"unknown --set key '{key}' for loco place; keys: {', '.join(fields)}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare string
        tp = type(fields[key].default)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not tp:
            raise UserError(f"--set {key}={text}: expected {tp.__name__}")
        values[key] = value
    s = PlaceSettings(**values)
    _validate(s)
    return s


def _validate(s: PlaceSettings) -> None:
    from .schedules import SCHEDULES
    from .timeline import P2_POLICIES

    if s.stages < 1:
        raise UserError(f"--set stages={s.stages}: need at least 1 stage")
    if s.stages > s.layers:
        raise UserError(f"--set stages={s.stages} is larger than the model's {s.layers} layers; "
                        "every stage needs at least one layer (lower stages or raise layers)")
    if s.layers < 1 or s.width < 1 or s.seq_len < 1 or s.bytes_per_value < 1:
        raise UserError("layers, width, seq_len and bytes_per_value must be >= 1")
    if s.micro_batch < 1 or s.sequences < s.micro_batch or s.sequences % s.micro_batch:
        raise UserError(f"sequences ({s.sequences}) must be a positive multiple of micro_batch "
                        f"({s.micro_batch})")
    if not 0 < s.mfu <= 1:
        raise UserError(f"--set mfu={s.mfu}: must be in (0, 1]")
    if s.schedule not in SCHEDULES:
        raise UserError(f"--set schedule={s.schedule}: known schedules {', '.join(SCHEDULES)}")
    if s.p2 not in P2_POLICIES:
        raise UserError(f"--set p2={s.p2}: known policies {', '.join(P2_POLICIES)}")
    if s.population < 2 or s.offspring < 0 or s.passes < 0 or s.random_samples < 1:
        raise UserError("population must be >= 2, offspring and passes >= 0, random_samples >= 1")
    if not 0 <= s.simulate_random <= s.random_samples:
        raise UserError("simulate_random must be between 0 and random_samples")


def place(cluster_source: str, settings: PlaceSettings, out: Path) -> dict:
    """Search, baselines, simulation and outputs; returns what placement.json holds."""
    from ..files import atomic_write
    from .placement import CostModel
    from .plan import simulate_placement
    from .plots import gantt, placement
    from .scenarios import GPTSizes, load_cluster
    from .search import search

    cluster = load_cluster(cluster_source)
    s = settings
    D_DP = s.replicas or max(1, cluster.N // s.stages)
    if s.stages * D_DP != cluster.N:
        raise UserError(f"the cluster's {cluster.N} devices do not split into {s.stages} stages "
                        f"x {D_DP} replicas; choose --set stages (and replicas) with stages x "
                        f"replicas = {cluster.N}")
    if s.stages > 16:
        raise UserError(f"--set stages={s.stages}: the exact group order (Held-Karp) is limited "
                        "to 16 stages")
    out.mkdir(parents=True, exist_ok=True)  # fail on a bad --out before the search, not after
    sizes = GPTSizes(s.layers, s.width, s.seq_len, s.sequences, s.micro_batch, s.bytes_per_value)
    layers = sizes.layers_per_stage(s.stages)
    c_dp = sizes.stage_param_bytes(max(layers))
    c_pp = sizes.activation_bytes(s.sequences)
    model = CostModel(cluster, s.stages, D_DP, c_dp, c_pp)
    t0 = time.perf_counter()
    result = search(model, seed=s.seed, population=s.population, offspring=s.offspring,
                    passes=s.passes, seeds=s.seeds)
    search_s = time.perf_counter() - t0
    best = result.best
    rng = random.Random(f"random-baseline-{s.seed}")
    randoms = []
    for _ in range(s.random_samples):
        perm = list(range(cluster.N))
        rng.shuffle(perm)
        randoms.append(model.in_order(perm))
    in_order = model.in_order()
    random_best = min(randoms, key=lambda a: a.cost)
    kw = dict(twobp=s.twobp, p2=s.p2, concat=s.concat)

    def step(alloc):
        return simulate_placement(alloc, cluster, sizes, s.mfu, s.schedule, **kw)

    timeline = step(best)
    steps = {"optimised": timeline.step_time_s, "in_order": step(in_order).step_time_s,
             "random_best": step(random_best).step_time_s}
    if s.simulate_random:
        steps["random_mean"] = statistics.mean(step(a).step_time_s
                                               for a in randoms[:s.simulate_random])
    costs = [a.cost for a in randoms]
    summary = {
        "cluster": cluster.name, "note": cluster.note, "devices": cluster.N,
        "stages": s.stages, "replicas": D_DP, "settings": dataclasses.asdict(s),
        "c_dp_bytes": c_dp, "c_pp_bytes": c_pp,
        "cost_optimised": best.cost, "cost_optimised_dp": best.dp, "cost_optimised_pp": best.pp,
        "cost_random_mean": statistics.mean(costs), "cost_random_best": random_best.cost,
        "cost_random_worst": max(costs), "cost_in_order": in_order.cost,
        "step_time_s": steps,
        "simulated": {"schedule": s.schedule, "twobp": s.twobp,
                      "micro_batches": sizes.micro_batches,
                      "pipeline_time_s": timeline.pipeline_time_s,
                      "bubble_fraction": timeline.bubble_fraction},
        "search": {"seconds": search_s, "evaluations": result.evaluations,
                   "offspring": s.offspring, "population": s.population,
                   "history_every_100": result.history[::100] + result.history[-1:]},
        "allocation": {"stages": best.stages, "pipelines": best.pipelines,
                       "sites": [[cluster.sites[d] for d in p] for p in best.pipelines]},
    }
    atomic_write(out / "placement.json", json.dumps(summary, indent=1))
    placement(best.pipelines, cluster.sites,
              {"optimised": best.cost, "in order": in_order.cost,
               "random (best of %d)" % s.random_samples: min(costs),
               "random (mean)": statistics.mean(costs)},
              out / "placement.png", f"{cluster.name}: {s.stages} stages x {D_DP} replicas")
    gantt(timeline, out / "gantt.png", f"{cluster.name}, optimised placement, {s.schedule}"
          f"{' + 2BP' if s.twobp else ''}")
    return summary


def cmd_place(args) -> None:
    settings = parse_settings(args.set)
    out = Path(args.out) if args.out else (
        Path("runs") / f"{Path(args.cluster).stem}-place-{time.strftime('%Y%m%d-%H%M%S')}")
    r = place(args.cluster, settings, out)
    st = r["step_time_s"]
    print(f"{r['cluster']}: {r['stages']} stages x {r['replicas']} replicas, cost DP + 2 PP "
          f"{r['cost_optimised']:.3f} s optimised, {r['cost_in_order']:.3f} s in order, "
          f"{r['cost_random_mean']:.3f} s random mean ({r['cost_random_best']:.3f} best); "
          f"simulated step {st['optimised']:.2f} s ({st['in_order']:.2f} in order); search "
          f"{r['search']['seconds']:.1f} s -> {out}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("place", help="place a pipeline- and data-parallel job on a "
                              "cluster (Yuan et al.'s scheduler) and simulate its step")
    p.add_argument("cluster", help="a scenario (dc-ondemand, spot, two-universities, "
                   "us-regions, world-8) or a .toml/.json file with latency_s and bandwidth_gbps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set stages=4 --set offspring=500 (keys: "
                   f"{', '.join(f.name for f in dataclasses.fields(PlaceSettings))})")
    p.add_argument("--out", help="output folder (default runs/<cluster>-place-<time>)")
    p.set_defaults(func=cmd_place)
