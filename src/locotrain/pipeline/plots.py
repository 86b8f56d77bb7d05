"""Pictures: the Gantt chart of a pipeline step, and a placement on its cluster."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from ..files import atomic_write

COLORS = {"F": "#4C72B0", "B": "#C44E52", "P1": "#DD8452", "P2": "#55A868", "AR": "#8C8C8C"}
LABELS = {"F": "forward", "B": "backward", "P1": "backward-p1 (input grad)",
          "P2": "backward-p2 (weight grad)", "AR": "data-parallel all-reduce"}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())


def gantt(timeline, path: Path, title: str = "") -> None:
    """One row per device (pipeline r, stage s), busy spans coloured by kind; white is idle."""
    R, S = len(timeline.busy_s), len(timeline.busy_s[0])
    rows = R * S
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.28 * rows))
    label_bars = rows <= 16 and len(timeline.spans) <= 400
    for sp in timeline.spans:
        y = sp.replica * S + sp.stage
        ax.barh(y, sp.end - sp.start, left=sp.start, height=0.8, color=COLORS[sp.kind],
                edgecolor="white", linewidth=0.4)
        if label_bars and sp.kind != "AR" and sp.end - sp.start > timeline.step_time_s / 80:
            ax.text((sp.start + sp.end) / 2, y, ",".join(map(str, sp.mbs)), ha="center",
                    va="center", fontsize=6, color="white")
    names = timeline.names
    ax.set_yticks(range(rows))
    ax.set_yticklabels([names[r][s] if names else f"pipe {r} stage {s}"
                        for r in range(R) for s in range(S)], fontsize=7 if rows > 16 else 9)
    ax.set_ylim(rows - 0.5, -0.5)  # first pipeline's stage 0 on top
    ax.set_xlim(0, timeline.step_time_s * 1.01)
    ax.set_xlabel("time (s)")
    kinds = [k for k in COLORS if any(sp.kind == k for sp in timeline.spans)]
    ax.legend(handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in kinds],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(kinds), fontsize=8,
              frameon=False)
    ax.set_title(f"{title}{' - ' if title else ''}step {timeline.step_time_s:.3g} s, "
                 f"bubble {100 * timeline.bubble_fraction:.1f}%", fontsize=10, pad=22)
    _save(fig, path)


def placement(pipelines: list[list[int]], sites: list[str], costs: dict[str, float],
              path: Path, title: str = "") -> None:
    """Left: the allocation, one row per pipeline and one column per stage, each cell the
    device coloured by its site. Right: the paper's cost of this and the baseline allocations."""
    R, S = len(pipelines), len(pipelines[0])
    site_names = list(dict.fromkeys(sites))
    cmap = plt.get_cmap("tab10" if len(site_names) <= 10 else "tab20")
    color = {name: cmap(i % cmap.N) for i, name in enumerate(site_names)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 1.5 + 0.45 * R),
                                 gridspec_kw={"width_ratios": [max(S, 2), 3], "wspace": 0.55})
    for r, chain in enumerate(pipelines):
        for s, dev in enumerate(chain):
            ax.add_patch(plt.Rectangle((s, r), 0.95, 0.9, color=color[sites[dev]]))
            ax.text(s + 0.47, r + 0.45, str(dev), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, S)
    ax.set_ylim(R, 0)
    ax.set_xticks([s + 0.47 for s in range(S)], [f"stage {s}" for s in range(S)], fontsize=7)
    ax.set_yticks([r + 0.45 for r in range(R)], [f"pipe {r}" for r in range(R)], fontsize=7)
    ax.set_title("allocation (device ids, colour = site)", fontsize=9)
    shown = site_names[:20]
    ax.legend(handles=[Patch(color=color[n], label=n) for n in shown], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(shown), 5),
              frameon=False)
    names = list(costs)
    bx.barh(range(len(names)), [costs[n] for n in names], color="#4C72B0")
    for i, n in enumerate(names):
        bx.text(costs[n], i, f" {costs[n]:.3g} s", va="center", fontsize=8)
    bx.set_yticks(range(len(names)), names, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("communication cost DP + 2 PP (s per step)")
    bx.set_xlim(0, max(costs.values()) * 1.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
