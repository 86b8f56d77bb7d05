"""Our char GPT against nanoGPT's shakespeare_char run, on the same GPU in one call.

    python benchmarks/nanogpt_compare.py --nanogpt PATH/TO/nanoGPT --out results/

PATH/TO/nanoGPT is a checkout of github.com/karpathy/nanoGPT (its code is never part of this
repository). The script writes nanoGPT's data files from locotrain's own copy of Tiny
Shakespeare (the same 90/10 split nanoGPT's prepare.py makes), runs nanoGPT's
`train.py config/train_shakespeare_char.py`, then `loco run shakespeare-char` for the AR
model and the masked-diffusion model at the same size and token budget, and prints a table.

Throughput is the median time of one training step (nanoGPT prints a host-timed step every
10 iterations; we time every compute span the same way), so compilation and evaluation do
not count; wall time counts everything.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain.data import read_text  # noqa: E402

TOKENS_PER_STEP = 64 * 256


def prepare_nanogpt_data(nanogpt: Path) -> None:
    _, text = read_text("")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    out = nanogpt / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(out / "train.bin")
    ids[n:].tofile(out / "val.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_nanogpt(nanogpt: Path, steps: int, log: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py",
           f"--max_iters={steps}", f"--lr_decay_iters={steps}", *extra]
    started = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=nanogpt, stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - started
    text = log.read_text()
    step_ms = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", text, re.M)]
    val = [float(m) for m in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", text, re.M)]
    median = statistics.median(step_ms[5:]) / 1000  # skip the compile iterations
    return {"name": "nanoGPT", "best_val_loss_nats": min(val), "wall_s": wall,
            "step_time_median_s": median, "tokens_per_s": TOKENS_PER_STEP / median}


def run_loco(name: str, out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "locotrain", "run", "shakespeare-char", "--quiet", "--force",
           "--out", str(out), "--set", f"train.tokens={steps * TOKENS_PER_STEP}", *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - started
    s = json.loads((out / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    best = min(evals, key=lambda e: e["val_loss"])
    return {"name": name, "best_val_loss_nats": best["val_loss"], "best_val_bpc": best["val_bpc"],
            "best_at_tokens": best["tokens"], "final_val_bpc": s["final_val_bpc"],
            "final_val_bpc_stderr": s.get("final_val_bpc_stderr"), "wall_s": wall,
            "step_time_median_s": s["step_time_median_s"],
            "tokens_per_s": TOKENS_PER_STEP / s["step_time_median_s"],
            "sample_steps_per_char": s.get("sample_steps_per_char")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--only", default="nanogpt,ar,diffusion")
    ap.add_argument("--nanogpt-args", default="", help="extra nanoGPT flags, e.g. --device=cpu")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    rows = []

    def keep(row):  # save after every run, so a run cut short still reports the others
        rows.append(row)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)

    if "nanogpt" in only:
        prepare_nanogpt_data(args.nanogpt)
        keep(run_nanogpt(args.nanogpt, args.steps, args.out / "nanogpt.log",
                         args.nanogpt_args.split()))
    if "ar" in only:
        keep(run_loco("locotrain ar_gpt", args.out / "ar", args.steps, []))
    if "diffusion" in only:
        keep(run_loco("locotrain masked_diffusion", args.out / "diffusion", args.steps,
                      ["--set", "workload.name=masked_diffusion"]))
    base = rows[0]["tokens_per_s"]
    print(f"\n{'run':<28}{'tok/s (median step)':>22}{'ratio':>8}{'best val nats':>15}{'wall s':>9}")
    for r in rows:
        print(f"{r['name']:<28}{r['tokens_per_s']:>22,.0f}{r['tokens_per_s'] / base:>8.2f}"
              f"{r['best_val_loss_nats']:>15.4f}{r['wall_s']:>9.1f}")


if __name__ == "__main__":
    main()
