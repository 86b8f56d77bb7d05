"""Plots and comparison tables, drawn from metrics lines (never from live objects), so
they can be redrawn from any finished run folder."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import atomic_write  # noqa: E402

COLORS = {"compute": "#2e8b57", "blocked": "#d1495b", "idle": "#c9c9c9"}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _curve(evals: list[dict], x: str):
    pts = [(e[x], e["val_bpc"]) for e in evals if x in e and not e.get("final")]
    finals = [e for e in evals if e.get("final") and x in e]
    if finals:
        pts.append((finals[-1][x], finals[-1]["val_bpc"]))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(path: Path, runs: dict[str, list[dict]], x: str, xlabel: str, title: str,
                logx: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, evals in runs.items():
        xs, ys = _curve(evals, x)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation bits per character")
    ax.set_title(title)
    if logx:
        ax.set_xscale("symlog")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_timeline(path: Path, spans: list[dict], title: str, max_processes: int = 24) -> None:
    """Gantt chart of compute / blocked / idle spans per process."""
    names = list(dict.fromkeys(s["process"] for s in spans))[:max_processes]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.4))
    for row, name in enumerate(names):
        for kind in COLORS:
            bars = [(s["start"], s["end"] - s["start"]) for s in spans
                    if s["process"] == name and s["kind"] == kind]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=COLORS[kind])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("simulated time (s)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="upper right", fontsize=8)
    _save(fig, path)


def plot_run(out: Path, evals: list[dict], spans: list[dict] | None, label: str) -> None:
    plots = out / "plots"
    plot_curves(plots / "loss.png", {label: evals}, "tokens", "training tokens (all workers)",
                "validation loss")
    if any("sim_time_s" in e for e in evals):
        plot_curves(plots / "loss_vs_time.png", {label: evals}, "sim_time_s",
                    "simulated time (s)", "validation loss against simulated time")
    if any("bytes_sent" in e for e in evals):
        plot_curves(plots / "loss_vs_bytes.png", {label: evals}, "bytes_sent",
                    "bytes sent (all processes)", "validation loss against bytes", logx=True)
    if spans:
        plot_timeline(plots / "timeline.png", spans, f"{label}: compute / blocked / idle")


def plot_sweep(path: Path, keys: list[str], rows: list[tuple[dict, dict, list[dict]]]) -> None:
    """One panel per swept key (best bpc of every point against that key's value, the
    values in the order given) and one with every point's curve against tokens."""
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.8),
                             squeeze=False, constrained_layout=True)
    for ax, key in zip(axes[0], keys):
        values = list(dict.fromkeys(settings[key] for settings, _, _ in rows))
        xs = [values.index(settings[key]) for settings, _, _ in rows]
        ax.scatter(xs, [s["best_val_bpc"] for _, s, _ in rows], s=18, alpha=0.8)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("best validation bpc")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for settings, _, evals in rows:
        xs, ys = _curve(evals, "tokens")
        ax.plot(xs, ys, lw=1, label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items()))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bpc")
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
