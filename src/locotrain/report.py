"""Plots and comparison tables, drawn from metrics lines (never from live objects), so
they can be redrawn from any finished run folder.

Each plot has a `*_figure` function that returns the matplotlib figure (what the tests
inspect) and a `plot_*` function that draws it and writes the PNG."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib
import tomllib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from .files import atomic_write

COLORS = {"compute": "#2e8b57", "blocked": "#d1495b", "idle": "#c9c9c9", "comm": "#3b6fb6"}
STATES = ("compute", "blocked", "idle")  # what a process does; "comm" overlaps them
STATE_NAMES = {"compute": "compute", "blocked": "blocked (waiting on the network)",
               "idle": "idle (waiting for other processes)",
               "comm": "comm (own transfers on the wire, thin lane)"}
BPC = "validation bits per character"


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- loss curves


def _points(evals: list[dict], x: str) -> list[tuple[float, float, float | None, bool, int]]:
    """One point per value of `x`, in order: (x, bpc, stderr or None, full, windows).

    Evaluations at the same x (the last one during training and the final one, which uses
    every validation window) keep the one on the most windows, the later one on a tie.
    `full`: the evaluation used as many windows as the run's most (the final evaluation's
    count); the others used a subset (`eval.windows`)."""
    rows = [e for e in evals if x in e and e.get("event", "eval") == "eval"]
    if not rows:
        return []
    most = max(e.get("windows", 0) for e in rows)
    chosen: dict = {}
    for i, e in enumerate(rows):
        rank = (e.get("windows", 0), bool(e.get("final")), i)
        if e[x] not in chosen or rank > chosen[e[x]][0]:
            chosen[e[x]] = (rank, e)
    out = []
    for value in sorted(chosen):
        e = chosen[value][1]
        windows = e.get("windows", 0)
        out.append((value, e["val_bpc"], e.get("val_bpc_stderr"),
                    bool(e.get("final")) or windows >= most, windows))
    return out


def _curve(evals: list[dict], x: str):
    pts = _points(evals, x)
    return [p[0] for p in pts], [p[1] for p in pts]


def _is_bound(evals: list[dict]) -> bool:
    return any("val_bpc_stderr" in e for e in evals)


def _quantity(xlabel: str) -> str:
    """'simulated time (s)' -> 'simulated time'."""
    text = xlabel.strip()
    if text.endswith(")") and "(" in text:
        text = text[:text.rindex("(")].strip()
    return text or "x"


def _title(title: str, names: list[str], xlabel: str) -> str:
    if len(names) > 1:
        head = f"{title}: {' vs '.join(names)}" if title else " vs ".join(names)
    else:
        head = title or (names[0] if names else "")
    head = "\n".join(textwrap.wrap(head, 70)) if head else ""
    what = f"validation bpc against {_quantity(xlabel)}"
    return f"{head}\n{what}" if head else what


def _bytes_axis(ax, lo: float, hi: float) -> None:
    decades = math.log10(max(hi, lo * 1.0001)) - math.log10(lo)
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if decades < 1 else (1.0, 2.0, 5.0) if decades < 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def curves_figure(runs: dict[str, list[dict]], x: str, xlabel: str, title: str,
                  logx: bool = False):
    """Validation bpc of each run against `x`. Filled markers: evaluations on every
    validation window; hollow: on a subset (`eval.windows`). Runs whose numbers are upper
    bounds (masked diffusion) say so and carry +-1 standard-error bars. With `logx`, the
    axis starts at the first positive x; evaluations at x = 0 are named in the axis label."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    ends: list[tuple[float, str, str]] = []  # (bpc, text, color) of each curve's last point
    bound = {label: _is_bound(evals) for label, evals in runs.items()}
    mixed = any(bound.values()) and not all(bound.values())
    subset_windows, full_windows, zero, drawn, positive = set(), set(), [], 0, []
    for i, (label, evals) in enumerate(runs.items()):
        pts = _points(evals, x)
        if logx:
            zero += [p for p in pts if p[0] <= 0]
            pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        drawn += 1
        color = f"C{i % 10}"
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        positive += xs
        name = label + (" (\u2264 upper bound)" if mixed and bound[label] else "")
        ax.plot(xs, ys, color=color, lw=1.6, label=name, zorder=2)
        if bound[label]:
            ax.errorbar(xs, ys, yerr=[p[2] or 0.0 for p in pts], fmt="none", ecolor=color,
                        elinewidth=1.2, capsize=3, zorder=2)
        full = [p for p in pts if p[3]]
        sub = [p for p in pts if not p[3]]
        full_windows |= {p[4] for p in full}
        subset_windows |= {p[4] for p in sub}
        ax.plot([p[0] for p in full], [p[1] for p in full], ls="none", marker="o", ms=5,
                color=color, zorder=3)
        ax.plot([p[0] for p in sub], [p[1] for p in sub], ls="none", marker="o", ms=5,
                mfc="white", mec=color, mew=1.3, zorder=3)
        end = f"\u2264 {ys[-1]:.3f} \u00b1{pts[-1][2] or 0.0:.3f}" if bound[label] else f"{ys[-1]:.3f}"
        ends.append((ys[-1], end, color))
    label_x = xlabel
    if logx and positive:
        ax.set_xscale("log")
        label_x = f"{xlabel}, log scale"
        if "bytes" in x:
            _bytes_axis(ax, min(positive), max(positive))
    elif x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if zero:
        values = sorted({round(p[1], 3) for p in zero})
        at = f" ({values[0]:.3f} bpc)" if len(values) == 1 else ""
        label_x += (f"\nnot shown: the evaluation{'s' if len(zero) > 1 else ''} at "
                    f"{_quantity(xlabel)} = 0{at}")
    ax.set_xlabel(label_x)
    if bound and all(bound.values()):
        ax.set_ylabel(f"\u2264 {BPC}\n(upper bound, bars \u00b11 standard error)")
    elif mixed:
        ax.set_ylabel(f"{BPC}\n(\u2264 upper bound where marked)")
    else:
        ax.set_ylabel(BPC)
    ax.set_title(_title(title, list(runs), xlabel), fontsize=11)
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, f"no evaluation has {x}" + (" > 0" if logx else ""),
                transform=ax.transAxes, ha="center", va="center", color="0.4")
        return fig
    handles, labels = ax.get_legend_handles_labels()
    keys: list[tuple] = []
    if subset_windows:
        grey = "0.35"
        keys = [(Line2D([], [], ls="none", marker="o", ms=5, color=grey),
                 f"all {'/'.join(map(str, sorted(full_windows)))} validation windows"),
                (Line2D([], [], ls="none", marker="o", ms=5, mfc="white", mec=grey, mew=1.3),
                 f"subset: {'/'.join(map(str, sorted(subset_windows)))} windows (eval.windows)")]
    _legend_below(fig, list(zip(handles, labels)), keys)
    _label_ends(ax, ends)
    return fig


def _legend_below(fig, runs: list[tuple], keys: list[tuple], ncol_max: int = 4) -> None:
    """One legend under the plot: the runs on the first row(s), the marker key on the next."""
    ncol = max(1, min(ncol_max, max(len(runs), len(keys))))
    blank = (Line2D([], [], ls="none"), "")
    rows = []
    for group in (runs, keys):
        for i in range(0, len(group), ncol):
            chunk = group[i:i + ncol]
            rows.append(chunk + [blank] * (ncol - len(chunk)))
    entries = [rows[r][c] for c in range(ncol) for r in range(len(rows))]  # column-major
    fig.legend([h for h, _ in entries], [t for _, t in entries], loc="outside lower center",
               ncol=ncol, fontsize=8, frameon=False)


def _label_ends(ax, ends: list[tuple[float, str, str]]) -> None:
    """Each curve's last value just right of the axes, at its height, nudged apart so that
    close values stay legible (which run ends lowest reads off without a table)."""
    lo, hi = ax.get_ylim()
    gap = 0.05 * (hi - lo)
    placed: list[float] = []
    for y, _, _ in sorted(ends):
        placed.append(max(y, placed[-1] + gap) if placed else y)
    overflow = placed[-1] - hi if placed else 0.0
    if overflow > 0:  # pushed above the top: shift the stack down
        placed = [p - overflow for p in placed]
    at = blended_transform_factory(ax.transAxes, ax.transData)
    for (y, text, color), y_text in zip(sorted(ends), placed):
        ax.annotate(text, xy=(1.0, y), xycoords=at, xytext=(1.01, y_text), textcoords=at,
                    va="center", ha="left", fontsize=8, color=color, annotation_clip=False)


def plot_curves(path: Path, runs: dict[str, list[dict]], x: str, xlabel: str, title: str,
                logx: bool = False) -> None:
    """`title` names the context (the preset for `loco compare`, the run's label for one
    run); the figure's title adds which runs are compared and against what."""
    _save(curves_figure(runs, x, xlabel, title, logx), path)


# --------------------------------------------------------------------------- timeline


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _pct(f: float) -> str:
    if 0 < f < 0.005:
        return "<1%"
    if 0.995 <= f < 1:
        return ">99%"
    return f"{f:.0%}"


def time_shares(spans: list[dict]) -> dict[str, dict[str, float]]:
    """Per process: the fraction of the timeline's extent (first start to last end, over all
    processes) spent in compute, blocked and idle; with "comm" spans, the fraction with a
    transfer on the wire and `comm_hidden`, the part of that overlapped by compute; `gap`:
    the fraction in none of the three (a process done early; on real processes, evaluations
    and start-up)."""
    if not spans:
        return {}
    t0 = min(s["start"] for s in spans)
    extent = max(max(s["end"] for s in spans) - t0, 1e-12)
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(s["process"] for s in spans):
        mine = [s for s in spans if s["process"] == name]
        by_kind = {k: _union([(s["start"], s["end"]) for s in mine if s["kind"] == k])
                   for k in (*STATES, "comm")}
        shares = {k: _length(by_kind[k]) / extent for k in STATES}
        shares["gap"] = max(0.0, 1.0 - _length(_union([iv for k in STATES for iv in by_kind[k]])) / extent)
        if by_kind["comm"]:
            comm = _length(by_kind["comm"])
            shares["comm"] = comm / extent
            shares["comm_hidden"] = _overlap(by_kind["comm"], by_kind["compute"]) / max(comm, 1e-12)
        out[name] = shares
    return out


def timeline_figure(spans: list[dict], title: str, max_processes: int = 24,
                    clock: str = "simulated", overlay: dict | None = None):
    """Gantt chart of compute / blocked / idle spans per process, each process's transfers
    ("comm" spans) as a thin lane under its bar, and the shares of time at the right.
    `clock`: "simulated" (the simulator's virtual time) or "wall-clock" (real processes).
    `overlay`: an algorithm's own events (draw_overlay), marks over the chart and its
    per-round values in a panel below."""
    procs = list(dict.fromkeys(s["process"] for s in spans))
    names = procs[:max_processes]
    has_comm = any(s["kind"] == "comm" for s in spans)
    shares = time_shares([s for s in spans if s["process"] in names])
    height = (0.5 if has_comm else 0.4) * len(names) + 1.6
    if overlay and overlay.get("series"):
        fig, (ax, below) = plt.subplots(2, 1, sharex=True, figsize=(8.5, height + 1.4),
                                        height_ratios=[height, 1.4], layout="constrained")
    else:
        fig, ax = plt.subplots(figsize=(8.5, height), layout="constrained")
        below = None
    bar = (-0.36, 0.52) if has_comm else (-0.36, 0.72)
    lane = (0.2, 0.16)
    for row, name in enumerate(names):
        mine = [s for s in spans if s["process"] == name]
        for kind in (*STATES, "comm"):
            bars = [(s["start"], s["end"] - s["start"]) for s in mine if s["kind"] == kind]
            if not bars:
                continue
            y = lane if kind == "comm" else bar
            ax.broken_barh(bars, (row + y[0], y[1]), facecolors=COLORS[kind], edgecolor="none",
                           linewidth=0)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(left=min((s["start"] for s in spans), default=0.0))
    ax.margins(x=0.01)
    (below or ax).set_xlabel("simulated time (s)" if clock == "simulated" else
                             "wall-clock time since the run started (s)" if clock == "wall-clock"
                             else "time (s)")
    if overlay:
        draw_overlay(ax, below, overlay)
    shown = title if len(procs) <= max_processes else \
        f"{title} (first {max_processes} of {len(procs)} processes)"
    ax.set_title(shown, fontsize=11)
    right = blended_transform_factory(ax.transAxes, ax.transData)
    for row, name in enumerate(names):
        sh = shares.get(name, {})
        text = " \u00b7 ".join(f"{_pct(sh.get(k, 0.0))} {k}" for k in STATES)
        if sh.get("gap", 0.0) >= 0.005:
            text += f" \u00b7 {_pct(sh['gap'])} gap"
        if "comm" in sh:
            text += f"\n{_pct(sh['comm'])} on the wire, {_pct(sh['comm_hidden'])} of it hidden"
        ax.text(1.01, row, text, transform=right, va="center", ha="left", fontsize=7.5)
    kinds = [*STATES] + (["comm"] if has_comm else [])
    handles = [Patch(facecolor=COLORS[k]) for k in kinds]
    labels = [STATE_NAMES[k] for k in kinds]
    if any(sh.get("gap", 0.0) >= 0.005 for sh in shares.values()):
        handles.append(Patch(facecolor="white", edgecolor="0.6"))
        labels.append("gap: no span (done early, evaluating, starting)")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)),
               fontsize=8, frameon=False)
    return fig


def plot_timeline(path: Path, spans: list[dict], title: str, max_processes: int = 24,
                  clock: str = "simulated", overlay: dict | None = None) -> None:
    _save(timeline_figure(spans, title, max_processes, clock, overlay), path)


def draw_overlay(ax, below, overlay: dict) -> None:
    """An algorithm's own events (its `timeline_marks`, e.g. AdLoCo's merges and batch
    schedule): a dotted line and a label per mark across the chart, and step lines of its
    per-round values in the panel below."""
    for t, label in overlay.get("marks", []):
        for a in (ax, below):
            if a is not None:
                a.axvline(t, color="0.2", linestyle=":", linewidth=1.0)
        ax.annotate(label, (t, 1), xycoords=("data", "axes fraction"), xytext=(2, -2),
                    textcoords="offset points", fontsize=7, color="0.2", va="top")
    if below is None:
        return
    for i, (name, points) in enumerate(overlay["series"].items()):
        ts, vs = zip(*points)
        below.step(ts, vs, where="post", color=OVERLAY_COLORS[i % len(OVERLAY_COLORS)],
                   linewidth=1.5, label=name)
    below.set_ylabel(overlay.get("series_label", ""), fontsize=8)
    below.set_ylim(bottom=0)
    below.grid(alpha=0.3)
    below.legend(fontsize=7, loc="upper left", frameon=False, ncol=4)


OVERLAY_COLORS = ["#8172B3", "#DD8452", "#937860", "#DA8BC3", "#000000"]  # none of the states'


def algorithm_overlay(out: Path) -> dict | None:
    """The run's algorithm's marks for the timeline, from its log lines in metrics.jsonl,
    when the algorithm's file defines `timeline_marks` (the algorithm owns its log format)."""
    import json
    from importlib import import_module

    try:
        name = tomllib.loads((Path(out) / "config.toml").read_text())["algorithm"]["name"]
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        marks = getattr(import_module(f"locotrain.algorithms.{name}"), "timeline_marks", None)
    except (OSError, KeyError, ImportError, tomllib.TOMLDecodeError):
        return None
    if marks is None:
        return None
    logs = [e["text"] for e in map(json.loads, lines) if e.get("event") == "log"]
    return marks(logs)


# --------------------------------------------------------------------------- one run


def run_label(out: Path, label: str) -> tuple[str, str]:
    """The run's label and a note for titles, from its resolved config.toml when there is one:
    a bare algorithm name gains the codec when that is not fp32 ('streaming+codec=fp4', the
    way `loco compare` names variants); the note names a workload other than ar_gpt."""
    try:
        cfg = tomllib.loads((Path(out) / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return label, ""
    algorithm = cfg.get("algorithm", {})
    name = algorithm.get("name", "")
    if label in ("", name):
        table = algorithm.get(name, {})
        codec = algorithm.get("codec", table.get("codec", "fp32") if isinstance(table, dict) else "fp32")
        label = name + (f"+codec={codec}" if codec != "fp32" else "")
    workload = cfg.get("workload", {}).get("name", "ar_gpt")
    return label, ("" if workload == "ar_gpt" else workload)


def plot_run(out: Path, evals: list[dict], spans: list[dict] | None, label: str,
             clock: str | None = None) -> None:
    """A run folder's plots. `clock`: what the timeline's times are, "simulated" or
    "wall-clock"; by default simulated when the evaluations carry sim_time_s (runs of the
    real runtime carry none)."""
    out = Path(out)
    label, note = run_label(out, label)
    title = f"{label} ({note})" if note else label
    if clock is None:
        clock = "simulated" if any("sim_time_s" in e for e in evals) else "wall-clock"
    plots = out / "plots"
    plot_curves(plots / "loss.png", {label: evals}, "tokens", "training tokens (all workers)", title)
    if clock == "simulated":
        plot_curves(plots / "loss_vs_time.png", {label: evals}, "sim_time_s",
                    "simulated time (s)", title)
    else:
        plot_curves(plots / "loss_vs_time.png", {label: evals}, "time_s",
                    "wall-clock time (s)", title)
    if any(e.get("bytes_sent", 0) > 0 for e in evals):
        plot_curves(plots / "loss_vs_bytes.png", {label: evals}, "bytes_sent",
                    "bytes sent (all processes)", title, logx=True)
    if spans:
        plot_timeline(plots / "timeline.png", spans,
                      f"{title}: where each process's time goes", clock=clock,
                      overlay=algorithm_overlay(out))


def plot_sweep(path: Path, keys: list[str], rows: list[tuple[dict, dict, list[dict]]]) -> None:
    """One panel per swept key (best bpc of every point against that key's value, the
    values in the order given) and one with every point's curve against tokens."""
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.8),
                             squeeze=False, constrained_layout=True)
    bound = "\u2264 " if any(_is_bound(evals) for _, _, evals in rows) else ""
    fig.suptitle(f"sweep over {', '.join(keys)}: {len(rows)} points"
                 + (" (masked diffusion: upper bounds)" if bound else ""), fontsize=11)
    for ax, key in zip(axes[0], keys):
        values = list(dict.fromkeys(settings[key] for settings, _, _ in rows))
        xs = [values.index(settings[key]) for settings, _, _ in rows]
        ax.scatter(xs, [s["best_val_bpc"] for _, s, _ in rows], s=22, alpha=0.85,
                   c=[f"C{i % 10}" for i in range(len(rows))])  # the curves' colours
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{bound}best validation bpc")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for i, (settings, _, evals) in enumerate(rows):
        xs, ys = _curve(evals, "tokens")
        ax.plot(xs, ys, lw=1, color=f"C{i % 10}", label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items()))
    ax.set_xlabel("training tokens")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylabel(f"{bound}validation bpc")
    ax.set_title("every point against training tokens", fontsize=9)
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    _save(fig, path)


# --------------------------------------------------------------------------- comparison


def time_to_target(evals: list[dict], target: float, key: str = "sim_time_s") -> float | None:
    """First time the validation bpc reached `target`, linearly interpolated between evals."""
    prev = None
    for e in sorted((e for e in evals if key in e), key=lambda e: e[key]):
        if e["val_bpc"] <= target:
            if prev is None or prev["val_bpc"] == e["val_bpc"]:
                return e[key]
            f = (prev["val_bpc"] - target) / (prev["val_bpc"] - e["val_bpc"])
            return prev[key] + f * (e[key] - prev[key])
        prev = e
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def comparison_markdown(summaries: dict[str, dict], evals: dict[str, list[dict]],
                        target: float, target_note: str = "") -> str:
    time_key = "sim_time_s" if all("sim_time_s" in s for s in summaries.values()) else "time_s"
    spread = any("replica_spread" in s for s in summaries.values())
    head = ("| algorithm | final val bpc | best val bpc | time to "
            f"{target:.3f} bpc (s) | total time (s) | bytes sent | inter-region bytes | "
            "most bytes from one host | peak payload | peak WAN link (Gbit/s) | utilisation |"
            + (" replica spread |" if spread else ""))
    lines = [head, "|" + "---|" * (11 + spread)]
    for name, s in summaries.items():
        t = time_to_target(evals[name], target, time_key)
        host_max = max(s.get("bytes_by_host", {}).values(), default=0)
        link = f"{s['peak_link_gbps']:.3g}" if "peak_link_gbps" in s else "-"
        lines.append(
            f"| {name} | {s['final_val_bpc']:.4f} | {s['best_val_bpc']:.4f} | "
            f"{'-' if t is None else f'{t:.1f}'} | {s.get(time_key, math.nan):.1f} | "
            f"{_fmt_bytes(s.get('bytes_sent', 0))} | {_fmt_bytes(s.get('bytes_inter_region', 0))} | "
            f"{_fmt_bytes(host_max)} | {_fmt_bytes(s.get('peak_payload_bytes', 0))} | {link} | "
            f"{s.get('utilization', math.nan):.3f} |"
            + (f" {s['replica_spread']:.2e} |" if "replica_spread" in s else (" - |" if spread else "")))
    clock = "simulated" if time_key == "sim_time_s" else "wall-clock"
    lines += ["", f"Times are {clock} seconds. The target {target:.3f} bpc is {target_note or 'given'}; "
              "'time to target' interpolates between evaluations, '-' means never reached. "
              "Peak payload is the largest encoded message or all-reduce contribution of one "
              "worker; the peak WAN link is the highest total rate any inter-region link carried "
              "(simulated runs only)."
              + (" Replica spread: how far the workers' own copies of the model drift apart "
                 "(RMS distance from their mean / its norm, at the end)." if spread else "")]
    return "\n".join(lines) + "\n"
