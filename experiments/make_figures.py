"""Draw the figures of docs/experiments.md and docs/benchmarks.md from docs/results/.

    python experiments/make_figures.py
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS, IMG = ROOT / "docs" / "results", ROOT / "docs" / "img"
LN2 = math.log(2)


def evals(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "eval" and not e.get("final")]


def curves(ax, runs: dict[str, Path], x: str, scale: float = 1.0):
    for label, run in runs.items():
        ev = evals(run)
        ax.plot([e[x] * scale for e in ev if x in e], [e["val_bpc"] for e in ev if x in e],
                marker="o", ms=2.5, label=label)
    ax.grid(alpha=0.3)
    ax.set_ylabel("validation bpc")


def save(fig, name: str):
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=110, bbox_inches="tight")
    plt.close(fig)


def foundation():
    f = RESULTS / "foundation"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    nano = json.loads((f / "nanogpt_evals.json").read_text())
    ax.plot([e["step"] for e in nano], [e["val_loss"] / LN2 for e in nano], marker="o", ms=2.5,
            label="nanoGPT (its own val estimate)")
    for label, run in [("locotrain ar_gpt", f / "ar"), ("locotrain masked_diffusion (bound)", f / "diffusion")]:
        ev = evals(run)
        ax.plot([e["step"] for e in ev], [e["val_bpc"] for e in ev], marker="o", ms=2.5, label=label)
    ax.set_ylim(1.9, 3.4)
    ax.set_xlabel("step (64 x 256 characters)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("nanoGPT shakespeare_char size on one H100")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "foundation_curves.png")


def two_datacenters():
    d = RESULTS / "two_datacenters"
    main = {"ddp": d / "ddp", "diloco H=50": d / "diloco_H-50", "diloco H=100": d / "diloco_H-100",
            "diloco H=50, lr 1, mu 0": d / "diloco_H-50_avg", "streaming fp4 H=50": d / "streaming_fp4",
            "overlap local-sgd H=50": d / "overlap"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    curves(axes[0], main, "tokens", 1e-6)
    axes[0].set_xlabel("training tokens (millions)")
    curves(axes[1], main, "sim_time_s")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("simulated time (s), log scale")
    curves(axes[2], main, "bytes_sent", 1e-9)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("bytes sent (GB), log scale")
    for ax in axes:
        ax.set_ylim(2.1, 3.6)
    axes[0].legend(fontsize=8)
    fig.suptitle("two-datacenters, M = 4, 1 Gbit/s, nanoGPT-size GPT, equal tokens")
    save(fig, "two_datacenters.png")
    delayed = {"diloco H=50 (mu 0.9)": d / "diloco_H-50", "eager H=50 (mu 0.9)": d / "eager_H-50_mu0.9",
               "naive H=50 (mu 0.9)": d / "naive_H-50_mu0.9", "eager H=50 (mu 0)": d / "eager_H-50_mu0",
               "naive H=50 (mu 0)": d / "naive_H-50_mu0", "eager H=100 (mu 0)": d / "eager_H-100_mu0",
               "naive H=100 (mu 0)": d / "naive_H-100_mu0"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves(ax, delayed, "tokens", 1e-6)
    ax.set_ylim(2.2, 6.5)
    ax.set_xlabel("training tokens (millions)")
    ax.set_title("one-outer-step delay: outer momentum 0.9 diverges")
    ax.legend(fontsize=8)
    save(fig, "delayed_variants.png")


def halos():
    h = RESULTS / "halos_4x4"
    names = {"diloco": "DiLoCo", "diloco_dylu": "DiLoCo + speed-scaled steps",
             "async_naive": "Async, naive Nesterov", "async_dn_dylu": "Async, delayed Nesterov + DyLU",
             "halos": "HALoS"}
    levels = ["none", "slight", "moderate", "very"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, level in zip(axes, levels):
        curves(ax, {v: h / level / k for k, v in names.items()}, "sim_time_s")
        ax.set_title(f"heterogeneity: {level}")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylim(2.7, 4.6)
    axes[0].legend(fontsize=7)
    save(fig, "halos_4x4_time.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for key, label in names.items():
        s = [json.loads((h / lv / key / "summary.json").read_text()) for lv in levels]
        axes[0].plot(levels, [min(x["final_val_bpc"], 4.6) for x in s], marker="o", label=label)
        axes[1].plot(levels, [x["sim_time_s"] for x in s], marker="o", label=label)
    axes[0].set_ylabel("final validation bpc (clipped at 4.6)")
    axes[1].set_ylabel("simulated time for the token budget (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("heterogeneity")
    axes[1].legend(fontsize=8)
    save(fig, "halos_4x4_heterogeneity.png")


if __name__ == "__main__":
    foundation()
    two_datacenters()
    halos()
    print("figures in", IMG)
