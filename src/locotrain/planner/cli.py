"""`loco plan [PRESET_OR_TOML] [--set KEY=VALUE ...] [--algorithms a,b+key=v,...]
[--find-bandwidth CU[,CU...]] [--out DIR]`: the algorithms on phantom compute
(docs/planner.md). Wired into `loco` by cli.py through `add_parser`.

Without --find-bandwidth it simulates each variant at the configured bandwidth and prints
wall time, compute utilisation, bytes and peak bandwidth. With it, it searches the
inter-worker bandwidth at which compute utilisation reaches each target, and for the papers'
settings (plan-1b, plan-10b, plan-100b) prints their numbers next to ours.

Writes DIR/plan.json (every key maps a variant to its value), DIR/timelines/<variant>.json,
DIR/plots/utilization.png (compute utilisation against bandwidth, one curve per variant) and
DIR/plots/timeline-<variant>.png.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan a cluster on phantom compute: time, "
                              "utilisation, bytes, the bandwidth a target needs")
    p.add_argument("config", nargs="?", default="quickstart",
                   help="a preset name (plan-1b, plan-10b, plan-100b, ...) or a TOML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set phantom.params=7e9 (repeatable)")
    p.add_argument("--algorithms", help="comma-separated variants, e.g. "
                   "ddp,diloco,streaming+codec=fp4 (default: the config's algorithm)")
    p.add_argument("--find-bandwidth", metavar="CU[,CU...]",
                   help="compute utilisations to reach, e.g. 0.5,0.9,0.99: prints the "
                   "bandwidth each needs")
    p.add_argument("--out", help="output folder (default runs/<preset>-plan-<time>)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> None:
    from ..cli import parse_variant
    from ..config import load_config
    from . import papers
    from .bandwidth import BandwidthSearch, parse_targets
    from .plan import phantom_workload, run_plan, with_bandwidth

    name, base = load_config(args.config, args.set)
    targets = parse_targets(args.find_bandwidth) if args.find_bandwidth else []
    variants = [v.strip() for v in args.algorithms.split(",")] if args.algorithms else \
        [base.algorithm.name]
    if len(set(variants)) != len(variants):
        raise UserError(f"--algorithms lists a variant twice: {', '.join(variants)}")
    configs = {}
    for spec in variants:  # every variant checked before any is simulated
        _, changes = parse_variant(spec)
        _, cfg = load_config(args.config, list(args.set) + changes)
        phantom_workload(cfg)
        configs[spec] = cfg
    out = Path(args.out) if args.out else \
        Path("runs") / f"{name}-plan-{time.strftime('%Y%m%d-%H%M%S')}"
    lo, hi = base.plan.min_gbps, base.plan.max_gbps
    results, found, curves, started = {}, {}, {}, time.perf_counter()
    for spec, cfg in configs.items():
        result = run_plan(cfg, spec, keep_timeline=True)
        results[spec] = result
        search = BandwidthSearch(
            lambda g, c=cfg, s=spec: run_plan(with_bandwidth(c, g), s).compute_utilization,
            spec, lo, hi)
        if math.isfinite(result.inter_gbps):
            search.points[result.inter_gbps] = result.compute_utilization
        found[spec] = {text: search.find(value) for text, value in targets}
        centre = list(found[spec].values()) or [result.inter_gbps if math.isfinite(
            result.inter_gbps) else 10.0]
        for g in _grid(min(centre) / 10, max(centre) * 10, lo, hi, 4 if targets else 2):
            search.at(g)
        curves[spec] = search.curve()
        print(f"loco plan: {spec} done ({len(search.points)} simulations, "
              f"{time.perf_counter() - started:.1f} s)", file=sys.stderr)
    summary = _summary(name, configs, results, found, curves)
    _write(out, summary, results, curves, found)
    print(_plain_table(name, configs, results))
    if targets:
        print()
        print(_bandwidth_table(configs, found, targets, papers))
    print(f"-> {out}")


def _grid(a: float, b: float, lo: float, hi: float, per_decade: int = 4) -> list[float]:
    """Points spread evenly in log space over [a, b], kept inside [lo, hi]."""
    a, b = max(a, lo), min(b, hi)
    n = max(2, round(math.log10(b / a) * per_decade) + 1)
    return [a * (b / a) ** (i / (n - 1)) for i in range(n)]


def _summary(name, configs, results, found, curves) -> dict:
    """plan.json: every metric a map from variant to value."""
    r = results
    return {
        "config": name,
        "variants": list(configs),
        "compute_utilization": {v: x.compute_utilization for v, x in r.items()},
        "utilization_whole_run": {v: x.utilization for v, x in r.items()},
        "wall_s": {v: x.wall_s for v, x in r.items()},
        "projected_wall_s": {v: x.projected_wall_s for v, x in r.items()},
        "train_tokens": {v: c.train.tokens for v, c in configs.items()},
        "bytes_sent": {v: x.bytes_sent for v, x in r.items()},
        "bytes_inter_region": {v: x.bytes_inter_region for v, x in r.items()},
        "peak_bandwidth_gbps": {v: x.peak_bandwidth_gbps for v, x in r.items()},
        "inter_gbps": {v: _finite(x.inter_gbps) for v, x in r.items()},
        "find_bandwidth": found,
        "curves": {v: [[g, u] for g, u in c] for v, c in curves.items()},
        "runs": {v: x.summary() | {"inter_gbps": _finite(x.inter_gbps)} for v, x in r.items()},
    }


def _finite(x: float):
    return x if math.isfinite(x) else None  # JSON has no infinity: null = unlimited


def _write(out: Path, summary, results, curves, found) -> None:
    from ..files import atomic_write
    from ..report import plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "plan.json", json.dumps(summary, indent=2))
    for v, r in results.items():
        slug = v.replace("+", "_").replace("=", "-")
        atomic_write(out / "timelines" / f"{slug}.json", json.dumps(r.timeline))
        plot_timeline(out / "plots" / f"timeline-{slug}.png", r.timeline,
                      f"{v}: {r.workers} workers, {r.processes} simulated", max_processes=12)
    plot_utilization(out / "plots" / "utilization.png", curves, found)


def plot_utilization(path: Path, curves: dict, found: dict) -> None:
    """Compute utilisation against bandwidth (log), one curve per variant, the targets found
    marked."""
    from ..report import _save, plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for v, points in curves.items():
        g, u = zip(*points)
        line, = ax.plot(g, u, marker=".", label=v)
        for text, gbps in found.get(v, {}).items():
            ax.plot([gbps], [float(text)], "o", color=line.get_color(), markersize=7,
                    markerfacecolor="none")
    ax.set_xscale("log")
    ax.set_xlabel("inter-worker bandwidth (Gbit/s)")
    ax.set_ylabel("compute utilisation (steady state)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("compute utilisation against bandwidth (circles: --find-bandwidth)")
    _save(fig, path)


# --------------------------------------------------------------------------- tables


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 600 else f"{s / 3600:.2f} h" if s < 86400 * 3 else f"{s / 86400:.1f} d"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000


def _plain_table(name, configs, results) -> str:
    rows = ["| variant | workers (simulated) | Gbit/s | wall | CU steady | CU whole run | "
            "bytes sent | peak Gbit/s (link) | projected for train.tokens |",
            "|---|---|---|---|---|---|---|---|---|"]
    for v, r in results.items():
        link, peak = max(r.peak_bandwidth_gbps.items(), key=lambda kv: kv[1], default=("-", 0.0))
        gbps = "unlimited" if not math.isfinite(r.inter_gbps) else f"{r.inter_gbps:g}"
        rows.append(f"| {v} | {r.workers} ({r.processes}) | {gbps} | {_fmt_time(r.wall_s)} | "
                    f"{r.compute_utilization:.4f} | {r.utilization:.4f} | {_fmt_bytes(r.bytes_sent)} | "
                    f"{peak:.3g} ({link}) | {_fmt_time(r.projected_wall_s)} "
                    f"({configs[v].train.tokens:.3g} tokens) |")
    rounds = next(iter(configs.values())).plan.rounds
    what = f"plan.rounds = {rounds} rounds" if rounds else "all of train.tokens"
    return f"{name}: {what} simulated per variant\n" + "\n".join(rows)


def _bandwidth_table(configs, found, targets, papers) -> str:
    """The papers' layout: one column per method, each cell the bandwidths for the targets
    (a/b/c/...); our row, then the paper's where it has the cell, then the ratio."""
    first = next(iter(configs.values()))
    row = papers.model_row(first)
    label = row or "plan"
    heads = [f"{v} ({papers.column(c)})" if papers.column(c) else v for v, c in configs.items()]
    title = "targets " + "/".join(t for t, _ in targets) + " (Gbit/s)"
    lines = [f"| {label}: {title} | " + " | ".join(heads) + " |",
             "|---" * (len(heads) + 1) + "|"]
    ours = [("/".join(f"{found[v][t]:.3g}" for t, _ in targets)) for v in configs]
    lines.append("| loco plan | " + " | ".join(ours) + " |")
    if row is not None:
        theirs, ratios = [], []
        for v, c in configs.items():
            values = [papers.paper_value(c, x) for _, x in targets]
            if all(x is not None for x in values):
                theirs.append("/".join(f"{x:g}" for x in values))
                ratios.append("/".join(f"{found[v][t] / x:.2f}" for (t, _), x in zip(targets, values)))
            else:
                theirs.append("-")
                ratios.append("-")
        lines.append("| paper | " + " | ".join(theirs) + " |")
        lines.append("| ours / paper | " + " | ".join(ratios) + " |")
    return "\n".join(lines)
