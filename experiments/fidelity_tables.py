"""Tables and figures of experiments/fidelity.sh's runs.

    python experiments/fidelity_tables.py OUTDIR [--img docs/img]

Reads every run folder under OUTDIR (each sweep point's config.toml, summary.json and
metrics.jsonl) and prints markdown: claim 1, the best DiLoCo per M against the best
data-parallel, with the papers' default outer optimizer beside it; the same for every
subfolder of OUTDIR that holds sweeps of its own (claim 1 at another model size, e.g.
OUTDIR/small_2x128 from `fidelity.sh ... scaling,scaling-lr --set model.depth=2 ...`; figure
fidelity_scaling_<subfolder>.png), then claim 1 across the model sizes (seed 0, DiLoCo's best
outer setting per M and inner lr against data-parallel at inner lr 4e-3 and 8e-3); claims 2 and 3, every
variant's final bpc against its DiLoCo at the same H and outer optimizer, over seeds, and
with each method's outer optimizer swept (`tuned_*`); claim 4 with the
asynchronous server's outer optimizer tuned (`c4_*`, beside the defaults of `async_*` and the
DiLoCo seeds of `seeds_diloco_M4`), on equal speeds and with half-speed workers; claim 5,
HALoS against Async Local-SGD and DiLoCo (+ DyLU) on HALoS's cluster (`c5_*`): final bpc and
simulated time to two targets; claim 6, AR against masked diffusion with and without
Loopholing at equal tokens and equal training FLOPs (`c6_*`). Every configuration run with
several seeds is reported as mean +- standard deviation (n seeds). Figures (with --img): the
best run per M against tokens (fidelity_scaling.png), the seeds (fidelity_seeds.png), and
for claims 2 to 6 validation bpc against tokens and against simulated time, mean over
seeds with the range shaded (fidelity_streaming.png, fidelity_eager.png,
fidelity_async_tuned.png, fidelity_halos.png, fidelity_diffusion.png).
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


def model_size(rs: list[dict]) -> str:
    m = rs[0]["cfg"]["model"]
    return f"{m['depth']} x {m['width']} ({rs[0]['summary']['params'] / 1e6:.2f}M parameters)"


def across_sizes(sizes: list[list[dict]]) -> str:
    """Claim 1 at each model size, seed 0 only (the sweeps of PART scaling and scaling-lr, and
    data-parallel at lr 4e-3 from PART seeds where PART scaling's runs are absent): per M and
    DiLoCo inner lr, the best outer (lr, momentum) and its gap to data-parallel at inner lr
    4e-3 (the same inner lr) and 8e-3."""
    lines = ["| model | M | DiLoCo inner lr | best outer (lr, momentum) | final bpc | - DP lr 4e-3 "
             "| - DP lr 8e-3 |", "|---|---|---|---|---|---|---|"]
    for rs in sizes:
        dp: dict[float, dict] = {}
        for r in sorted(rs, key=lambda r: not r["sweep"].startswith("ddp")):  # PART scaling first
            c = r["cfg"]
            if (c["algorithm"]["name"] == "ddp" and c["cluster"]["size"] == 1 and c["train"]["seed"] == 0
                    and c["train"]["batch_size"] == 64 and r["sweep"].startswith(("ddp", "seeds_ddp"))):
                dp.setdefault(c["train"]["lr"], r)
        for M in (1, 2, 4, 8):
            for lr in (2e-3, 4e-3):
                points = [r for r in rs if r["sweep"].startswith("diloco") and r["cfg"]["cluster"]["size"] == M
                          and r["cfg"]["train"]["lr"] == lr]
                if not points:
                    continue
                top = min(points, key=bpc)
                gaps = [f"{bpc(top) - bpc(dp[x]):+.4f}" if x in dp else "-" for x in (4e-3, 8e-3)]
                lines.append(f"| {model_size(rs)} | {M} | {lr:g} | ({setting(top, 'outer_lr'):g}, "
                             f"{setting(top, 'outer_momentum'):g}) | {bpc(top):.4f} | {gaps[0]} | {gaps[1]} |")
        lines.append(f"| {model_size(rs)} | DP | | | " + ", ".join(
            f"lr {x:g}: {bpc(r):.4f} ({r['sweep']})" for x, r in sorted(dp.items())) + " | | |")
    return ("\n".join(lines) + "\n\nSeed 0 everywhere; DiLoCo's outer grid: (0.5, 0.7, 1.0) x (0, 0.5, 0.9) "
            "at inner lr 2e-3, (0.7, 1.0) x (0, 0.5) at 4e-3. A gap is DiLoCo's final bpc minus "
            "data-parallel's (negative: DiLoCo better).\n")


def overlap(all_runs: list[dict]) -> str:
    out = ["| sweep | point | final bpc | bytes sent | simulated time (s) |", "|---|---|---|---|---|"]
    for r in sorted((r for r in all_runs if r["sweep"].startswith(("streaming", "ladder"))),
                    key=lambda r: (r["sweep"], r["point"])):
        s = r["summary"]
        out.append(f"| {r['sweep']} | {r['point']} | {s['final_val_bpc']:.4f} | "
                   f"{s['bytes_sent']:,} | {s['sim_time_s']:.1f} |")
    return "\n".join(out) + "\n"


def overlap_label(run: dict, outer: bool = True) -> str:
    """Claims 2 and 3's configuration of a run, without its seed (and with `outer` False,
    without its outer momentum)."""
    name, M = run["cfg"]["algorithm"]["name"], run["cfg"]["cluster"]["size"]
    H, mom = setting(run, "H"), setting(run, "outer_momentum")
    if name == "ddp":
        return f"M = {M}: data-parallel"
    where = f"M = {M}, H = {H}" + (f", outer momentum {mom}: " if outer else ": ")
    if name == "diloco":
        return where + "DiLoCo"
    if name == "eager":
        return where + ("eager" if setting(run, "mode") == "eager" else "naive delayed")
    if setting(run, "fragments") == 1 and setting(run, "tau") == 1 and setting(run, "alpha") == 0:
        return where + "one-step overlap"
    return where + (f"Streaming {setting(run, 'codec')}, tau {setting(run, 'tau')}, "
                    f"alpha {setting(run, 'alpha')}")


def overlap_seeds(all_runs: list[dict], img: Path | None) -> str:
    """The configurations of claims 2 and 3 run with more than one seed: mean +- std (n),
    every seed of PART overlap and PART overlap-seeds together."""
    groups: dict[str, list[dict]] = {}
    for r in all_runs:
        if r["sweep"].startswith(("streaming", "ladder")):
            groups.setdefault(overlap_label(r), []).append(r)
    out = ["| configuration | final bpc | seeds |", "|---|---|---|"]
    seeded = {label: rs for label, rs in sorted(groups.items()) if len(rs) > 1}
    for label, rs in seeded.items():
        out.append(f"| {label} | {spread(rs)} | "
                   f"{', '.join(str(seed(r)) for r in sorted(rs, key=seed))} |")
    if img is not None:  # claim 2 at M = 4; claim 3 at M = 2, H = 15 dashed and 60 solid
        curves_figure([(label.split(": ", 1)[1], rs, {}) for label, rs in seeded.items()
                       if label.startswith("M = 4")], img / "fidelity_streaming.png",
                      "Claim 2: Streaming DiLoCo against DiLoCo, M = 4, H = 10, outer (0.7, 0.5)",
                      top=2.6)
        series = []
        for i, name in enumerate(("data-parallel", "DiLoCo", "one-step overlap", "eager",
                                  "naive delayed")):
            for H, ls in ((15, "--"), (60, "-")):
                label = (f"M = 2: {name}" if name == "data-parallel" else
                         f"M = 2, H = {H}, outer momentum 0.0: {name}")
                if label in seeded and (H == 60 or name != "data-parallel"):
                    short = name if name == "data-parallel" else f"{name}, H = {H}"
                    series.append((short, seeded[label], {"color": f"C{i}", "ls": ls}))
        curves_figure(series, img / "fidelity_eager.png",
                      "Claim 3: the eager-updates ladder, M = 2, outer (0.7, 0)", top=2.8)
    return "\n".join(out) + "\n"


def overlap_tuned(all_runs: list[dict]) -> str:
    """PART overlap-tuned: every method's final bpc over its outer (lr, momentum) grid, its
    best cell, and the papers' default (0.7, 0.9) where the grid has it."""
    groups: dict[str, dict] = {}
    for r in all_runs:
        if r["sweep"].startswith("tuned_"):
            cell = (setting(r, "outer_lr"), setting(r, "outer_momentum"))
            groups.setdefault(overlap_label(r, outer=False), {})[cell] = bpc(r)
    out = ["| method | final bpc per outer (lr, momentum) | best | papers' default (0.7, 0.9) |",
           "|---|---|---|---|"]
    for label, cells in sorted(groups.items()):
        best = min(cells, key=cells.get)
        grid = ", ".join(f"({lr:g}, {m:g}): {v:.4f}" for (lr, m), v in sorted(cells.items()))
        default = cells.get((0.7, 0.9))
        out.append(f"| {label} | {grid} | ({best[0]:g}, {best[1]:g}): {cells[best]:.4f} | "
                   f"{'-' if default is None else f'{default:.4f}'} |")
    return "\n".join(out) + "\n"


def figure(best: dict, path: Path, size: str = "") -> None:
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
    ax.set_title("Best of each sweep at equal tokens and global batch 64 x 256" + (f"\n{size}" if size else ""))
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


# --------------------------------------------------------------------------- claims 4-6

def stats(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def spread(rs: list[dict]) -> str:
    """'mean +- std (n)' of the final bpc of a configuration's runs, or the single value."""
    xs = [bpc(r) for r in rs]
    if len(xs) == 1:
        return f"{xs[0]:.4f} (1)"
    mean, std = stats(xs)
    return f"{mean:.4f} +- {std:.4f} ({len(xs)})"


def mean_bpc(rs: list[dict]) -> float:
    return stats([bpc(r) for r in rs])[0]


def seed(run: dict) -> int:
    return run["cfg"]["train"]["seed"]


def curve(rs: list[dict], x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean, min and max of validation bpc over the runs (seeds) of one configuration, at
    each evaluation during training (the initial and the final full evaluation left out)."""
    per = [[e for e in r["evals"] if e["step"] > 0 and not e.get("final")] for r in rs]
    n = min(len(p) for p in per)
    xs = [per[0][i][x] for i in range(n)]
    ys = [[p[i]["val_bpc"] for p in per] for i in range(n)]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def curves_figure(series: list[tuple[str, list[dict], dict]], path: Path, title: str,
                  time_label: str = "simulated time (s)", log_time: bool = False,
                  top: float | None = None) -> None:
    """Two panels, bpc against tokens and against simulated time; one line per (label, runs,
    plot style), the seeds' mean with their range shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    lowest = float("inf")
    for i, (label, rs, style) in enumerate(series):
        color = style.get("color", f"C{i}")
        for ax, key, scale in ((axes[0], "tokens", 1e6), (axes[1], "sim_time_s", 1.0)):
            xs, mean, lo, hi = curve(rs, key)
            xs = [v / scale for v in xs]
            lowest = min([lowest] + lo)
            ax.plot(xs, mean, color=color, ls=style.get("ls", "-"), marker=".",
                    label=f"{label} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
    axes[0].set_xlabel("training tokens (millions, all workers)")
    axes[1].set_xlabel(time_label)
    if log_time:
        axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation bpc (200 windows)")
        ax.grid(alpha=0.3)
        if top is not None and lowest < top - 0.2:  # cut the first evaluations' high values
            ax.set_ylim(top=top)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speeds(run: dict) -> str:
    """'equal', or 'half' when some worker of the (custom) cluster runs below speed 1."""
    workers = run["cfg"]["cluster"].get("workers") or []
    return "half" if any(w.get("speed", 1.0) < 1.0 for w in workers) else "equal"


def async_label(run: dict) -> str:
    a = run["cfg"]["algorithm"]["name"]
    lr, mom = setting(run, "outer_lr"), setting(run, "outer_momentum")
    if a == "diloco":
        return f"DiLoCo{' + DyLU' if setting(run, 'dylu') else ''}, outer ({lr:g}, {mom:g})"
    naive = setting(run, "server_optimizer") == "nesterov"
    N = setting(run, "buffer_size") or run["summary"]["workers"]
    step = lr if naive else lr / N
    kind = "naive Nesterov" if naive else "delayed Nesterov"
    return f"Async, {kind}, outer ({lr:g}, {mom:g}); per arrival {step:.3g} x delta"


def claim4(all_runs: list[dict], img: Path | None) -> str:
    """The asynchronous server's outer optimizer swept, on equal speeds and with two workers
    at half speed, against DiLoCo's tuned (1.0, 0)."""
    # this part (c4_*) and the earlier `async` part (the defaults, async_async_*)
    pool = [r for r in all_runs if r["sweep"].startswith(("c4_", "async_async_"))]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in pool:
        rs = cells.setdefault((async_label(r), speeds(r)), [])
        if seed(r) not in {seed(x) for x in rs}:
            rs.append(r)
    # DiLoCo without DyLU computes the same model at either speed (only its time differs):
    # its seeds are PART seeds' seeds_diloco_M4 (the same configuration on a cluster without
    # a network), else the `async` part's single run; its times are the `async` part's
    timed = {sp: [r for r in all_runs if r["sweep"] == f"async_diloco_{sp}"]
             for sp in ("equal", "half")}
    diloco_runs = [r for r in all_runs if r["sweep"] == "seeds_diloco_M4"] or timed["equal"]
    diloco = async_label(diloco_runs[0]) if diloco_runs else ""
    if diloco_runs:
        cells[(diloco, "equal")] = cells[(diloco, "half")] = diloco_runs
    labels = sorted({k[0] for k in cells}, key=lambda l: (not l.startswith("DiLoCo"), l))
    lines = ["| configuration | equal speeds: final bpc | two workers at half speed | half - equal "
             "| simulated time, equal / half (s) | sweeps |", "|---|---|---|---|---|---|"]
    for label in labels:
        eq, half = cells.get((label, "equal"), []), cells.get((label, "half"), [])
        diff = f"{mean_bpc(half) - mean_bpc(eq):+.4f}" if eq and half else "-"
        if label == diloco:
            eq_t, half_t = timed["equal"], timed["half"]
        else:
            eq_t, half_t = eq, half
        t = " / ".join(f"{rs[0]['summary']['sim_time_s']:.1f}" if rs else "-" for rs in (eq_t, half_t))
        sweeps = ", ".join(sorted({r["sweep"] for r in eq + half}))
        lines.append(f"| {label} | {spread(eq) if eq else '-'} | {spread(half) if half else '-'} | "
                     f"{diff} | {t} | {sweeps} |")
    notes = []
    for label in labels:  # heterogeneity, where both speeds have several seeds
        eq, half = cells.get((label, "equal"), []), cells.get((label, "half"), [])
        if len(eq) > 1 and len(half) > 1 and label != diloco:
            notes.append(f"{label}: half - equal = {mean_bpc(half) - mean_bpc(eq):+.4f}; seed "
                         f"std {stats([bpc(r) for r in eq])[1]:.4f} (equal), "
                         f"{stats([bpc(r) for r in half])[1]:.4f} (half).")
    dn = {sp: [(l, rs) for (l, s), rs in cells.items() if s == sp and "delayed" in l]
          for sp in ("equal", "half")}
    for sp in ("equal", "half"):
        if dn[sp] and diloco:
            label, rs = min(dn[sp], key=lambda x: mean_bpc(x[1]))
            d = cells[(diloco, sp)]
            notes.append(f"Best delayed-Nesterov cell at {sp} speeds: {label}: {spread(rs)}, "
                         f"{mean_bpc(rs) - mean_bpc(d):+.4f} against DiLoCo's {spread(d)}.")
    text = ("\n".join(lines) + "\n\nFinal bpc: mean +- standard deviation over seeds (number of "
            "seeds). DiLoCo's quality: PART seeds (seeds_diloco_M4) where present; its times: "
            "PART async (async_diloco_*). With equal speeds DyLU changes nothing.\n")
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    if img is not None and pool:
        series, colors = [], {}

        def color(label: str) -> str:
            return colors.setdefault(label, f"C{len(colors)}")

        for sp, ls in (("equal", "-"), ("half", "--")):
            if timed[sp]:
                series.append((f"DiLoCo (1, 0), {sp}", timed[sp], {"color": "k", "ls": ls}))
            for (label, s), rs in cells.items():
                if s == sp and label.startswith("DiLoCo + DyLU"):
                    series.append((f"{label}, {sp}", rs, {"color": "0.55", "ls": ls}))
            # the two best delayed-Nesterov cells of either speed, and the naive rule's cell
            picked = sorted(dn[sp], key=lambda x: mean_bpc(x[1]))[:2]
            picked += [(l, rs) for (l, s), rs in cells.items()
                       if s == sp and "naive" in l and "(0.7, 0.9)" not in l]
            for label, rs in picked:
                short = label.split(";")[0].replace("Async, delayed Nesterov", "delayed N.") \
                    .replace("Async, naive Nesterov", "naive N.")
                series.append((f"{short}, {sp}", rs, {"color": color(label), "ls": ls}))
        curves_figure(series, img / "fidelity_async_tuned.png",
                      "Claim 4: Async Local-SGD with the server's outer optimizer tuned, M = 4 x 16",
                      top=3.0)
    return text


def time_to_target(evals: list[dict], target: float) -> float | None:
    """First simulated time the validation bpc reached `target`, interpolated between evals
    (as locotrain.report.time_to_target)."""
    prev = None
    for e in sorted(evals, key=lambda e: e["sim_time_s"]):
        if e["val_bpc"] <= target:
            if prev is None or prev["val_bpc"] == e["val_bpc"]:
                return e["sim_time_s"]
            f = (prev["val_bpc"] - target) / (prev["val_bpc"] - e["val_bpc"])
            return prev["sim_time_s"] + f * (e["sim_time_s"] - prev["sim_time_s"])
        prev = e
    return None


def mean_time(rs: list[dict], target: float) -> tuple[float | None, str]:
    """Mean time to the target over the runs that reach it, and 'mean (k/n)'."""
    ts = [time_to_target(r["evals"], target) for r in rs]
    got = [t for t in ts if t is not None]
    if not got:
        return None, f"- (0/{len(ts)})"
    return sum(got) / len(got), f"{sum(got) / len(got):.1f} ({len(got)}/{len(ts)})"


def bpc_at(rs: list[dict], t: float) -> str:
    """Validation bpc at simulated time t, linear between the evaluations during training (the
    final evaluation on every window left out), mean over the runs: 'mean (n)'."""
    ys = []
    for r in rs:
        ev = sorted((e for e in r["evals"] if not e.get("final")), key=lambda e: e["sim_time_s"])
        for a, b in zip(ev, ev[1:]):
            if a["sim_time_s"] <= t <= b["sim_time_s"]:
                f = (t - a["sim_time_s"]) / max(b["sim_time_s"] - a["sim_time_s"], 1e-12)
                ys.append(a["val_bpc"] + f * (b["val_bpc"] - a["val_bpc"]))
                break
    return f"{sum(ys) / len(ys):.4f} ({len(ys)})" if ys else "-"


def halos_label(run: dict) -> str:
    a = run["cfg"]["algorithm"]["name"]
    if a == "diloco":
        return "DiLoCo + DyLU" if setting(run, "dylu") else "DiLoCo"
    if a == "async_local_sgd":
        kind = "naive" if setting(run, "server_optimizer") == "nesterov" else "delayed Nesterov + DyLU"
        return f"Async Local-SGD, {kind}, outer ({setting(run, 'outer_lr'):g}, {setting(run, 'outer_momentum'):g})"
    return (f"HALoS, local ({setting(run, 'local_lr'):g}, {setting(run, 'local_momentum'):g}), "
            f"global ({setting(run, 'global_lr'):g}, {setting(run, 'global_momentum'):g})")


def family(label: str) -> str:
    return label.split(",")[0]


def claim5(all_runs: list[dict], img: Path | None) -> str:
    """HALoS against Async Local-SGD and DiLoCo (+ DyLU) on HALoS's cluster, same tokens."""
    cells: dict[str, list[dict]] = {}
    for r in (r for r in all_runs if r["sweep"].startswith("c5_")):
        cells.setdefault(halos_label(r), []).append(r)
    best: dict[str, str] = {}  # family -> its cell with the lowest mean final bpc
    for label, rs in cells.items():
        f = family(label)
        if f not in best or mean_bpc(rs) < mean_bpc(cells[best[f]]):
            best[f] = label
    tuned = [cells[label] for label in best.values()]
    targets = [("the worst final bpc among the tuned cells' runs (every one reaches it)",
                max(bpc(r) for rs in tuned for r in rs))]
    if "DiLoCo" in best:
        targets.insert(0, ("DiLoCo's mean final + 0.05", mean_bpc(cells[best["DiLoCo"]]) + 0.05))
    head = " | ".join(f"time to {t:.3f} bpc (s)" for _, t in targets)
    lines = [f"| configuration | final bpc | simulated time to spend the budget (s) | inter-region "
             f"GB | {head} |", "|---|---|---|---|" + "---|" * len(targets)]
    families = ["DiLoCo", "DiLoCo + DyLU", "Async Local-SGD", "HALoS"]
    order = sorted(cells, key=lambda l: (families.index(family(l)) if family(l) in families
                                         else len(families), l))
    for label in order:
        rs = cells[label]
        finish = stats([r["summary"]["sim_time_s"] for r in rs])[0]
        wan = stats([r["summary"]["bytes_inter_region"] / 1e9 for r in rs])[0]
        times = " | ".join(mean_time(rs, t)[1] for _, t in targets)
        mark = " (tuned)" if best.get(family(label)) == label and sum(
            family(l) == family(label) for l in cells) > 1 else ""
        lines.append(f"| {label}{mark} | {spread(rs)} | {finish:.1f} | {wan:.2f} | {times} |")
    notes = [f"Targets: {t:.3f} bpc = {what}." for what, t in targets]
    if "HALoS" in best:
        h = cells[best["HALoS"]]
        for what, t in targets:
            th = mean_time(h, t)[0]
            parts = []
            for f, label in best.items():
                tb = mean_time(cells[label], t)[0]
                if f != "HALoS" and th and tb:
                    parts.append(f"{f} {tb / th:.2f}")
            if th:
                notes.append(f"HALoS (tuned) to {t:.3f} bpc: {th:.1f} s; a baseline's time over "
                             "HALoS's (above 1: HALoS is faster): " + (", ".join(parts) or
                             "no baseline reached it") + ".")
        for f, label in best.items():
            if f != "HALoS":
                tuned_mark = " (tuned)" if sum(family(l) == f for l in cells) > 1 else ""
                notes.append(f"HALoS (tuned) final bpc {mean_bpc(h) - mean_bpc(cells[label]):+.4f} "
                             f"against {label}{tuned_mark}.")
    if "HALoS" in best:  # at equal simulated time: where HALoS's run ends
        h = cells[best["HALoS"]]
        t = min(curve([r], "sim_time_s")[0][-1] for r in h)
        at = [f"{label}: {bpc_at(cells[label], t)}" for label in best.values()]
        notes.append(f"Validation bpc (200 windows, mean over seeds) at {t:.1f} s of simulated time, "
                     "the last evaluation during tuned HALoS's run: " + "; ".join(at) + ".")
    text = ("\n".join(lines) + "\n\nFinal bpc: mean +- standard deviation over seeds (number of "
            "seeds); times: mean over the seeds that reach the target (how many of them did). "
            "(tuned): the family's cell with the lowest mean final bpc.\n\n" + "\n".join(notes) + "\n")
    if img is not None and cells:
        series = [(label + " (tuned)" if sum(family(l) == family(label) for l in cells) > 1 else label,
                   cells[label], {"color": f"C{i}"}) for i, label in enumerate(best.values())]
        default = next((l for l in cells if l.startswith("HALoS, local (3.2, 0.9), global (0.3, 0.5)")), None)
        if default and default not in best.values():
            series.append((default + " (HALoS's example)", cells[default],
                           {"color": f"C{len(series)}", "ls": "--"}))
        curves_figure(series, img / "fidelity_halos.png",
                      "Claim 5: HALoS's 4 x 4 cluster, 16 workers x 8 sequences, same tokens",
                      log_time=True, top=3.0)
    return text


def diffusion_label(run: dict) -> str:
    w = run["cfg"]["workload"]
    name = "AR" if w["name"] == "ar_gpt" else \
        "masked diffusion" + (" + Loopholing" if w.get("loopholing") else "")
    return f"{name}, lr {run['cfg']['train']['lr']:g}, {run['cfg']['train']['tokens'] / 1e6:.1f}M tokens"


def train_flops(run: dict) -> float:
    """(6 N + 12 L d T) per trained token, N without the input embedding (PaLM's count, as
    Backbone.flops_per_token), times 1 + self_cond_rate/3 for Loopholing: its first pass is a
    forward pass without gradient, a third of a training pass. The backbone counts causal and
    bidirectional attention alike."""
    m, w = run["cfg"]["model"], run["cfg"]["workload"]
    L, d, T = m["depth"], m["width"], m["seq_len"]
    loop = w["name"] != "ar_gpt" and w.get("loopholing")
    # params = V_in d + 12 L d^2 + V_out d (+ 2 d, Loopholing's LayerNorm); V_in = V_out + 1
    # for diffusion (the mask token)
    rest = run["summary"]["params"] - 12 * L * d * d - (2 * d if loop else 0)
    embedding = rest / 2 if w["name"] == "ar_gpt" else (rest + d) / 2
    per_token = 6 * (run["summary"]["params"] - embedding) + 12 * L * d * T
    return run["cfg"]["train"]["tokens"] * per_token * (1 + w.get("self_cond_rate", 1.0) / 3 if loop else 1)


def claim6(all_runs: list[dict], img: Path | None) -> str:
    """AR against masked diffusion, with and without Loopholing, at equal tokens and equal
    training FLOPs."""
    cells: dict[str, list[dict]] = {}
    for r in (r for r in all_runs if r["sweep"].startswith("c6_")):
        cells.setdefault(diffusion_label(r), []).append(r)
    ar = [l for l in cells if l.startswith("AR")]
    ref = min((cells[l] for l in ar), key=mean_bpc) if ar else None
    base = train_flops(ref[0]) if ref else max(train_flops(rs[0]) for rs in cells.values())
    lines = ["| configuration | training FLOPs (PFLOP; relative to AR) | final bpc (diffusion: "
             "an upper bound) | against AR | MC std. error | simulated time (s) |",
             "|---|---|---|---|---|---|"]
    for label in sorted(cells, key=lambda l: (not l.startswith("AR"), "Loop" in l, l)):
        rs = cells[label]
        f = train_flops(rs[0])
        vs = f"{mean_bpc(rs) - mean_bpc(ref):+.4f}" if ref and rs is not ref else "-"
        err = [r["summary"].get("final_val_bpc_stderr") for r in rs]
        err = f"{stats([e for e in err if e is not None])[0]:.4f}" if any(e is not None for e in err) else "exact"
        lines.append(f"| {label} | {f / 1e15:.3g} ({f / base:.3f}) | {spread(rs)} | {vs} | {err} | "
                     f"{rs[0]['summary']['sim_time_s']:.1f} |")
    notes = []
    if ref:
        tokens = ref[0]["cfg"]["train"]["tokens"]
        same_tokens = {l: rs for l, rs in cells.items() if rs[0]["cfg"]["train"]["tokens"] == tokens}
        same_flops = {l: rs for l, rs in cells.items() if abs(train_flops(rs[0]) / base - 1) < 0.01}
        for what, group in (("equal tokens", same_tokens), ("equal training FLOPs", same_flops)):
            notes.append(f"At {what}: " + "; ".join(
                f"{l}: {mean_bpc(rs):.4f}" for l, rs in sorted(group.items(), key=lambda x: mean_bpc(x[1])))
                + ".")
    draws = sorted({r["cfg"]["eval"]["samples"] for rs in cells.values() for r in rs
                    if r["cfg"]["workload"]["name"] != "ar_gpt"})
    text = ("\n".join(lines) + "\n\nFinal bpc on every validation window: mean +- standard deviation "
            "over seeds (number of seeds); the diffusion models' numbers are the MDLM bound "
            f"({', '.join(map(str, draws))} mask draws per window), their Monte-Carlo standard "
            "error beside them. Simulated time is proportional to training FLOPs (Loopholing's "
            "steps take 4/3 as long).\n\n" + "\n".join(notes) + "\n")
    if img is not None and cells:
        series = [(l, rs, {"color": f"C{i}", "ls": "--" if "Loop" in l else "-"})
                  for i, (l, rs) in enumerate(sorted(cells.items()))]
        curves_figure(series, img / "fidelity_diffusion.png",
                      "Claim 6: AR against masked diffusion, with and without Loopholing",
                      time_label="simulated time (s), proportional to training FLOPs", top=3.5)
    return text


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
    sizes = [all_runs] if any(r["sweep"].startswith("diloco") for r in all_runs) else []
    for sub in sorted(p for p in Path(args.outdir).iterdir() if p.is_dir()):
        sub_runs = runs(sub)  # a subfolder of sweeps: claim 1 at another model size
        if any(r["sweep"].startswith("ddp") for r in sub_runs):
            table, best = scaling(sub_runs)
            print(f"## Claim 1, {sub.name}: {model_size(sub_runs)}\n\n" + table)
            if args.img:
                figure(best, Path(args.img) / f"fidelity_scaling_{sub.name}.png", model_size(sub_runs))
            sizes.append(sub_runs)
    if len(sizes) > 1:
        print("## Claim 1 across model sizes\n\n" + across_sizes(sizes))
    if any(r["sweep"].startswith("seeds_") for r in all_runs):
        print("## Seeds\n\n" + seeds(all_runs, Path(args.img) if args.img else None))
    if any(r["sweep"].startswith(("streaming", "ladder")) for r in all_runs):
        print("## Claims 2 and 3\n\n" + overlap(all_runs))
        print("## Claims 2 and 3 over seeds\n\n"
              + overlap_seeds(all_runs, Path(args.img) if args.img else None))
    if any(r["sweep"].startswith("tuned_") for r in all_runs):
        print("## Claims 2 and 3, outer optimizer swept\n\n" + overlap_tuned(all_runs))
    img = Path(args.img) if args.img else None
    if img is not None:
        img.mkdir(parents=True, exist_ok=True)
    if any(r["sweep"].startswith("c4_") for r in all_runs):
        print("## Claim 4, the server's outer optimizer tuned\n\n" + claim4(all_runs, img))
    if any(r["sweep"].startswith("c5_") for r in all_runs):
        print("## Claim 5, HALoS on its 4 x 4 cluster\n\n" + claim5(all_runs, img))
    if any(r["sweep"].startswith("c6_") for r in all_runs):
        print("## Claim 6, masked diffusion against AR\n\n" + claim6(all_runs, img))


if __name__ == "__main__":
    main()
