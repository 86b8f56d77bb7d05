"""Comparison tables (markdown) and overlaid plots from folders of finished runs.

    python experiments/tables.py OUTDIR [--margin 0.05]

OUTDIR holds one folder per group (e.g. a heterogeneity level), each holding run folders; the
first run of a group (in the order of ORDER below, else alphabetical) is the baseline whose
best validation bpc + margin is the target."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from locotrain import report  # noqa: E402

ORDER = ["ddp", "diloco", "diloco_dylu", "async_naive", "async_dn_dylu", "halos"]


def load(run: Path):
    summary = json.loads((run / "summary.json").read_text())
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "eval"]
    return summary, evals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--margin", type=float, default=0.05)
    args = ap.parse_args()
    for group in sorted(p for p in args.out.iterdir() if p.is_dir()):
        runs = [p for p in group.iterdir() if (p / "summary.json").is_file()]
        runs.sort(key=lambda p: (ORDER.index(p.name) if p.name in ORDER else 99, p.name))
        if not runs:
            continue
        loaded = {p.name: load(p) for p in runs}
        summaries = {k: v[0] for k, v in loaded.items()}
        evals = {k: v[1] for k, v in loaded.items()}
        target = summaries[runs[0].name]["best_val_bpc"] + args.margin
        note = f"{runs[0].name}'s best + {args.margin}"
        table = report.comparison_markdown(summaries, evals, target, note)
        (group / "comparison.md").write_text(f"# {group.name}\n\n{table}")
        report.plot_curves(group / "loss_vs_time.png", evals, "sim_time_s", "simulated time (s)",
                           group.name)
        report.plot_curves(group / "loss_vs_tokens.png", evals, "tokens", "training tokens",
                           group.name)
        print(f"## {group.name}\n\n{table}")


if __name__ == "__main__":
    main()
