"""Hierarchical DiLoCo against flat DiLoCo and flat data-parallel at equal tokens, on the CPU
(docs/experiments.md).

    python experiments/hierarchical_vs_flat.py [--out runs/hierarchical_vs_flat] [--tables-only]

The quickstart's model (409,856 parameters) and budget (983,040 tokens, 240 steps per worker)
on two clusters with 4 workers per region:

* `halos-4x4`: 16 workers in 4 regions, speeds 0.12-1 (HALoS's), 0.117-0.935 Gbit/s and
  30-150 ms across, batch 4 per worker, 50 ms per step at speed 1 (the quickstart's
  modelled device);
* `two-datacenters-8`: 4 + 4 workers, 1 Gbit/s and 30 ms across, batch 8, 50 ms per step.

One `loco compare` per cluster: ddp, diloco (H = 20, Nesterov 0.7 / 0.5), hierarchical
(H = 20, the same outer optimizer) with the outer sync among all workers, among region leaders,
and (two-datacenters, a `loco run` beside the comparison) all workers timed as a
hierarchical all-reduce (`cluster.allreduce = "hierarchical"`); and, on two-datacenters,
Streaming DiLoCo across regions against flat Streaming DiLoCo
(`--cluster two-datacenters-8-streaming`). Results go to
docs/results/hierarchical/<cluster>/: every run's metrics.jsonl and summary.json,
comparison.md and tables.md. About 35 minutes on 2 busy CPU cores."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain import report  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "hierarchical"
HIER = "hierarchical+H=20+outer_momentum=0.5"
CLUSTERS = {
    "halos-4x4": (["cluster.preset=halos-4x4", "cluster.size=16", "train.batch_size=4",
                   "eval.every=49152"],
                  ["ddp", "diloco", HIER, HIER + "+outer_sync=leaders"]),
    "two-datacenters-8": (["cluster.size=8", "train.batch_size=8", "eval.every=49152"],
                          ["ddp", "diloco", HIER, HIER + "+outer_sync=leaders"]),
    # Streaming DiLoCo across regions (outer = streaming) against flat Streaming DiLoCo:
    # 2 fragments of one block, tau = 1, alpha = 0.5, the same outer optimizer.
    "two-datacenters-8-streaming": (
        ["cluster.size=8", "train.batch_size=8", "eval.every=49152"],
        [STREAM := "streaming+H=20+outer_momentum=0.5+fragments=2+tau=1",
         HIER + "+outer=streaming+fragments=2+tau=1"]),
}
# Runs beside the comparison: a variant with a cluster setting (`loco compare` varies
# algorithm settings only).
EXTRA = {"two-datacenters-8": {"hierarchical_allreduce": [
    "algorithm.name=hierarchical", "algorithm.H=20", "algorithm.outer_momentum=0.5",
    "cluster.allreduce=hierarchical"]}}
MARGIN = 0.05


def folder(spec: str) -> str:
    return spec.replace("+", "_").replace("=", "-")


def run_compare(cluster: str, out: Path) -> None:
    sets, variants = CLUSTERS[cluster]
    cmd = [sys.executable, "-m", "locotrain", "compare", "quickstart", "--quiet", "--force",
           "--out", str(out), "--algorithms", ",".join(variants),
           *sum((["--set", s] for s in sets), [])]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    for name, extra in EXTRA.get(cluster, {}).items():
        cmd = [sys.executable, "-m", "locotrain", "run", "quickstart", "--quiet", "--force",
               "--out", str(out / name), *sum((["--set", s] for s in sets + extra), [])]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def tables(cluster: str, out: Path) -> str:
    dest = RESULTS / cluster
    dest.mkdir(parents=True, exist_ok=True)
    summaries, evals = {}, {}
    for spec in CLUSTERS[cluster][1] + list(EXTRA.get(cluster, {})):
        run = out / folder(spec)
        (dest / folder(spec)).mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "summary.json"):
            shutil.copy(run / name, dest / folder(spec) / name)
        summaries[spec] = json.loads((run / "summary.json").read_text())
        evals[spec] = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                       if e["event"] == "eval"]
    shutil.copy(out / "comparison.md", dest / "comparison.md")
    first = CLUSTERS[cluster][1][0]
    worst = max(s["final_val_bpc"] for s in summaries.values())
    target = worst  # a loss every variant reaches, so every time to it is defined
    lines = [f"Target {target:.3f} bpc = the worst final bpc of the variants ({first}'s best is "
             f"{summaries[first]['best_val_bpc']:.4f}).", "",
             "| variant | final bpc | sim time to target (s) | total sim time (s) | bytes sent "
             "| inter-region bytes | peak WAN link (Gbit/s) | utilisation |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, s in summaries.items():
        t = report.time_to_target(evals[spec], target, "sim_time_s")
        lines.append(f"| {spec} | {s['final_val_bpc']:.4f} | {'-' if t is None else f'{t:.1f}'} "
                     f"| {s['sim_time_s']:.1f} | {report._fmt_bytes(s['bytes_sent'])} | "
                     f"{report._fmt_bytes(s['bytes_inter_region'])} | "
                     f"{s.get('peak_link_gbps', 0):.3g} | {s['utilization']:.3f} |")
    text = "\n".join(lines) + "\n"
    (dest / "tables.md").write_text(f"# hierarchical vs flat, {cluster}\n\n{text}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "hierarchical_vs_flat")
    ap.add_argument("--tables-only", action="store_true", help="tables from finished runs")
    ap.add_argument("--cluster", choices=list(CLUSTERS), action="append")
    args = ap.parse_args()
    for cluster in args.cluster or list(CLUSTERS):
        out = args.out / cluster
        if not args.tables_only:
            run_compare(cluster, out)
        print(f"## {cluster}\n\n{tables(cluster, out)}")


if __name__ == "__main__":
    main()
