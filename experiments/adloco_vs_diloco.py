"""AdLoCo against fixed-batch DiLoCo at equal tokens, on the CPU (docs/experiments.md).

    python experiments/adloco_vs_diloco.py [--out runs/adloco_vs_diloco] [--tables-only]

The quickstart's model (2 x 128 char GPT, context 64, 409,856 parameters) and budget (983,040
tokens), 4 workers, on two clusters:

* `two-datacenters`: 2 + 2 workers, 1 Gbit/s and 30 ms between the datacenters, 50 ms per
  batch-16 step;
* `hetero`: the same network, dc1's two workers at speed 0.35 (a slower device).

Each is one `loco compare` of fixed-batch DiLoCo (b = 16, H = 20; outer Nesterov 0.7 / 0.5 as
the quickstart, and plain SGD 0.5 as AdLoCo's reference) against AdLoCo variants (b from 4,
H = 20, outer SGD 0.5, eta 0.8). Results go to docs/results/adloco/<cluster>/: every run's
metrics.jsonl and summary.json, comparison.md (`loco compare`'s table), tables.md (rounds and
simulated time to the target, bytes, final bpc, the batch schedule) and schedule.png. About
40 minutes on 2 busy CPU cores (one core per run)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain import report  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "adloco"
COMMON = ["cluster.size=4", "eval.every=24576"]
CLUSTERS = {
    "two-datacenters": [],
    "hetero": ["cluster.preset=custom", "cluster.regions=['dc0', 'dc1']",
               "cluster.latency_s=[[0.0001, 0.03], [0.03, 0.0001]]",
               "cluster.bandwidth_gbps=[[100.0, 1.0], [1.0, 100.0]]",
               "cluster.workers=[{region='dc0', count=2}, {region='dc1', count=2, speed=0.35}]"],
    # A step costs the same at any batch, as a small model's does on a GPU (measured on an
    # H200 up to 128 sequences: benchmarks/batch_cost.py), instead of the linear default.
    "two-datacenters-fixed": ["cluster.step_fixed_s=0.05"],
}
ADLOCO = "adloco+H=20+initial_batch=4"
VARIANTS = {
    "two-datacenters": ["diloco", "diloco+outer_momentum=0+outer_lr=0.5", ADLOCO,
                        ADLOCO + "+trainers=1", ADLOCO + "+outer_momentum=0.5+outer_lr=0.7",
                        "adloco+H=20+initial_batch=16+batch_test=none"],
    "hetero": ["diloco", "diloco+outer_momentum=0+outer_lr=0.5", ADLOCO, ADLOCO + "+trainers=1"],
    "two-datacenters-fixed": ["diloco", ADLOCO + "+outer_momentum=0.5+outer_lr=0.7"],
}
MARGIN = 0.05  # target = the first variant's (DiLoCo's) best + MARGIN, as `loco compare`

LINE = re.compile(r"\[t=([0-9.]+)s w0\] adloco (round (\d+)|end): (.*)")
TRAINER = re.compile(r"trainer (\d+) b=(\d+) nodes \[([0-9, ]*)\]")


def folder(spec: str) -> str:
    return spec.replace("+", "_").replace("=", "-")


def run_compare(cluster: str, out: Path) -> None:
    sets = sum((["--set", s] for s in COMMON + CLUSTERS[cluster]), [])
    cmd = [sys.executable, "-m", "locotrain", "compare", "quickstart", "--quiet", "--force",
           "--out", str(out), "--algorithms", ",".join(VARIANTS[cluster]), *sets]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def schedule(metrics: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """(time, round, {trainer: (b, nodes)}) states and (time, round, text) merges, from the
    algorithm's log lines."""
    states, merges = [], []
    for e in metrics:
        m = LINE.match(e.get("text", "")) if e["event"] == "log" else None
        if not m:
            continue
        t, r, text = float(m.group(1)), int(m.group(3) or -1), m.group(4)
        if "merge" in text:
            merges.append((t, r, text))
        else:
            states.append((t, r, {int(k): (int(b), nodes) for k, b, nodes in TRAINER.findall(text)}))
    return states, merges


def tables(cluster: str, out: Path) -> str:
    dest = RESULTS / cluster
    dest.mkdir(parents=True, exist_ok=True)
    summaries, evals, metrics = {}, {}, {}
    for spec in VARIANTS[cluster]:
        run = out / folder(spec)
        (dest / folder(spec)).mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "summary.json"):
            shutil.copy(run / name, dest / folder(spec) / name)
        summaries[spec] = json.loads((run / "summary.json").read_text())
        metrics[spec] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals[spec] = [e for e in metrics[spec] if e["event"] == "eval"]
    shutil.copy(out / "comparison.md", dest / "comparison.md")
    first = VARIANTS[cluster][0]
    tight = summaries[first]["best_val_bpc"] + MARGIN
    loose = max(s["final_val_bpc"] for s in summaries.values())  # every variant reaches it
    lines = [f"Targets: A = {tight:.3f} bpc ({first}'s best + {MARGIN}, as `loco compare`), "
             f"B = {loose:.3f} bpc (the worst final bpc, so every variant reaches it). Rounds "
             "and simulated time to a target interpolate between evaluations ('-': never). "
             "Schedule: round: b of each trainer after that round's test; 'merge:' after a merge.", "",
             "| variant | final bpc | outer rounds | inner steps / worker | rounds to A | time to A "
             "(s) | rounds to B | time to B (s) | total sim time (s) | bytes sent | inter-region "
             "| batch schedule |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "-" if x is None else f"{x:.1f}"

    for spec, s in summaries.items():
        cells = [fmt(report.time_to_target(evals[spec], target, key))
                 for target in (tight, loose) for key in ("outer_updates", "sim_time_s")]
        states, merges = schedule(metrics[spec])
        merged_at = {r for _, r, _ in merges}
        sched, seen = [], set()
        for _, rd, st in states:
            b = "/".join(str(b) for b, _ in st.values())
            sched.append(f"merge: {b}" if rd in merged_at and rd in seen else f"{rd}: {b}")
            seen.add(rd)
        lines.append(f"| {spec} | {s['final_val_bpc']:.4f} | {s['outer_updates']} | "
                     f"{s['inner_steps'] // s['workers']} | {' | '.join(cells)} | "
                     f"{s['sim_time_s']:.1f} | {report._fmt_bytes(s['bytes_sent'])} | "
                     f"{report._fmt_bytes(s['bytes_inter_region'])} | {', '.join(sched) or '-'} |")
    text = "\n".join(lines) + "\n"
    (dest / "tables.md").write_text(f"# AdLoCo vs DiLoCo, {cluster}\n\n{text}")
    plot(cluster, dest / "schedule.png", evals, metrics)
    return text


def plot(cluster: str, path: Path, evals: dict, metrics: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, (spec, ev) in enumerate(evals.items()):
        top.plot([e["sim_time_s"] for e in ev], [e["val_bpc"] for e in ev], color=f"C{i}",
                 label=spec, lw=1.2)
        states, merges = schedule(metrics[spec])
        for t, _, _ in merges:
            top.axvline(t, color=f"C{i}", ls=":", lw=0.8)
        trainers = sorted({k for _, _, st in states for k in st})
        end = ev[-1]["sim_time_s"]
        for k in trainers:
            pts = [(t, st[k][0]) for t, _, st in states if k in st]
            if len(pts) and len(trainers) > 0 and "batch_test=none" not in spec:
                xs = [p[0] for p in pts] + [end if k in states[-1][2] else pts[-1][0]]
                ys = [p[1] for p in pts] + [pts[-1][1]]
                bottom.step(xs, ys, where="post", color=f"C{i}", lw=1.2,
                            ls=["-", "--", "-.", ":"][k % 4])
    top.set_ylabel("validation bpc")
    top.set_ylim(top=min(4.0, top.get_ylim()[1]))
    top.legend(fontsize=7)
    top.set_title(f"{cluster}: validation bpc (dotted: merges) and AdLoCo's batch per trainer",
                  fontsize=9)
    bottom.set_yscale("log")
    bottom.set_ylabel("b (sequences per node per step)")
    bottom.set_xlabel("simulated time (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "adloco_vs_diloco")
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
