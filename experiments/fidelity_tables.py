"""Tables and figures of experiments/fidelity.sh's runs.

    python experiments/fidelity_tables.py OUTDIR [--img docs/img]

Reads every run folder under OUTDIR (each sweep point's config.toml, summary.json and
metrics.jsonl) and prints markdown: claim 1, the best DiLoCo per M against the best
data-parallel, with the papers' default outer optimizer beside it; claims 2 and 3, every
variant's final bpc against its DiLoCo at the same H and outer optimizer. Figures: the best
run per M against tokens (fidelity_scaling.png) and the eager ladder (fidelity_ladder.png).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path


def runs(folder: Path) -> list[dict]:
    found = []
    for summary in sorted(folder.glob("*/*/summary.json")):
        run = summary.parent
        cfg = tomllib.loads((run / "config.toml").read_text())
        evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e.get("event") == "eval"]
        found.append({"sweep": run.parent.name, "point": run.name, "cfg": cfg,
                      "summary": json.loads(summary.read_text()), "evals": evals})
    return found


def setting(run: dict, key: str):
    name = run["cfg"]["algorithm"]["name"]
    return run["cfg"]["algorithm"].get(name, {}).get(key)


def bpc(run: dict) -> float:
    return run["summary"]["final_val_bpc"]


def scaling(all_runs: list[dict]) -> tuple[str, dict]:
    ddp = [r for r in all_runs if r["sweep"].startswith("ddp")]
    best_ddp = min(ddp, key=bpc)
    d = bpc(best_ddp)
    lines = ["| M | per-worker batch | DiLoCo, best (inner lr, outer lr, momentum) | final bpc "
             "| vs best DDP | DiLoCo, papers' default outer (0.7, 0.9), inner lr 2e-3 | vs best DDP "
             "| worst setting |", "|---|---|---|---|---|---|---|---|"]
    best = {"ddp": best_ddp}
    for M in (1, 2, 4, 8):
        points = [r for r in all_runs if r["sweep"].startswith("diloco")
                  and r["cfg"]["cluster"]["size"] == M]
        if not points:
            continue
        top, worst = min(points, key=bpc), max(points, key=bpc)
        best[M] = top
        default = next((r for r in points if setting(r, "outer_lr") == 0.7
                        and setting(r, "outer_momentum") == 0.9), None)

        def label(r):
            return f"({r['cfg']['train']['lr']:g}, {setting(r, 'outer_lr')}, {setting(r, 'outer_momentum')})"

        lines.append(
            f"| {M} | {top['cfg']['train']['batch_size']} | {label(top)} | {bpc(top):.4f} | "
            f"{bpc(top) - d:+.4f} | "
            + (f"{bpc(default):.4f} | {bpc(default) - d:+.4f}" if default else "- | -")
            + f" | {label(worst)}: {bpc(worst):.4f} |")
    ddp_line = ", ".join(f"lr {r['cfg']['train']['lr']:g}: {bpc(r):.4f}"
                         for r in sorted(ddp, key=lambda r: r["cfg"]["train"]["lr"]))
    return "\n".join(lines) + f"\n\nData-parallel (batch 64): {ddp_line}.\n", best


def overlap(all_runs: list[dict]) -> str:
    out = ["| sweep | point | final bpc | bytes sent | simulated time (s) |", "|---|---|---|---|---|"]
    for r in sorted((r for r in all_runs if r["sweep"].startswith(("streaming", "ladder"))),
                    key=lambda r: (r["sweep"], r["point"])):
        s = r["summary"]
        out.append(f"| {r['sweep']} | {r['point']} | {s['final_val_bpc']:.4f} | "
                   f"{s['bytes_sent']:,} | {s['sim_time_s']:.1f} |")
    return "\n".join(out) + "\n"


def figure(best: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, run in best.items():
        xs = [e["tokens"] / 1e6 for e in run["evals"] if e["step"] > 0]
        ys = [e["val_bpc"] for e in run["evals"] if e["step"] > 0]
        label = (f"DDP, lr {run['cfg']['train']['lr']:g}" if key == "ddp" else
                 f"DiLoCo M={key}, lr {run['cfg']['train']['lr']:g}, outer "
                 f"({setting(run, 'outer_lr')}, {setting(run, 'outer_momentum')})")
        ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel("training tokens (millions, all workers)")
    ax.set_ylabel("validation bpc (200 windows)")
    ax.set_title("Best of each sweep at equal tokens and global batch 64 x 256")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def seeds(all_runs: list[dict], img: Path | None) -> str:
    """Mean, spread and each seed's final bpc of every `seeds_*` sweep's configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in all_runs:
        if r["sweep"].startswith("seeds_"):
            point = "_".join(p for p in r["point"].split("_") if not p.startswith("seed-"))
            groups.setdefault((r["sweep"].removeprefix("seeds_"), point), []).append(r)
    lines = ["| configuration | seeds | mean final bpc | std | min | max |", "|---|---|---|---|---|---|"]
    for (sweep, point), rs in sorted(groups.items()):
        xs = [bpc(r) for r in rs]
        mean = sum(xs) / len(xs)
        std = (sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5
        lines.append(f"| {sweep} {point} (inner lr {rs[0]['cfg']['train']['lr']:g}) | {len(xs)} | "
                     f"{mean:.4f} | {std:.4f} | {min(xs):.4f} | {max(xs):.4f} |")
    if img is not None and groups:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, ((sweep, point), rs) in enumerate(sorted(groups.items())):
            curves = [[e["val_bpc"] for e in r["evals"] if e["step"] > 0][:-1] for r in rs]
            xs = [e["tokens"] / 1e6 for e in rs[0]["evals"] if e["step"] > 0][:-1]
            mean = [sum(c) / len(c) for c in zip(*curves)]
            ax.plot(xs, mean, color=f"C{i}", label=f"{sweep}, inner lr {rs[0]['cfg']['train']['lr']:g}")
            ax.fill_between(xs, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                            color=f"C{i}", alpha=0.15)
        ax.set_xlabel("training tokens (millions, all workers)")
        ax.set_ylabel("validation bpc (200 windows)")
        ax.set_title("Mean and range over seeds 0-2")
        ax.set_ylim(top=2.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "fidelity_seeds.png", dpi=120)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--img", default="")
    args = ap.parse_args()
    all_runs = runs(Path(args.outdir))
    if any(r["sweep"].startswith("ddp") for r in all_runs):
        table, best = scaling(all_runs)
        print("## Claim 1\n\n" + table)
        if args.img:
            figure(best, Path(args.img) / "fidelity_scaling.png")
    if any(r["sweep"].startswith("seeds_") for r in all_runs):
        print("## Seeds\n\n" + seeds(all_runs, Path(args.img) if args.img else None))
    if any(r["sweep"].startswith(("streaming", "ladder")) for r in all_runs):
        print("## Claims 2 and 3\n\n" + overlap(all_runs))


if __name__ == "__main__":
    main()
