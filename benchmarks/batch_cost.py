"""What a step costs as a function of the batch, measured, for `cluster.step_fixed_s`.

    python benchmarks/batch_cost.py --json results.json [--batches 1,2,4,...] [--steps 60]

For each model size and batch, one `loco run` of data-parallel on one worker (a fresh
process, the simulator's own engine) and its `step_time_median_s`; then a least-squares fit
t(b) = fixed + slope * b over the batches, and the fixed share of a step at batch 16, the
batch the presets use. A model whose step is mostly fixed cost (launch-bound) gains almost
nothing from a smaller batch, which a linear time model (step_fixed_s = 0) would credit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name: --set overrides
    "quickstart (2 x 128, context 64)": ["model.depth=2", "model.width=128", "model.heads=4",
                                         "model.seq_len=64"],
    "nanoGPT size (6 x 384, context 256)": ["model.depth=6", "model.width=384", "model.heads=6",
                                            "model.seq_len=256"],
}


def step_time(overrides: list[str], batch: int, steps: int, seq_len: int, tmp: Path) -> float:
    out = tmp / f"b{batch}-{time.monotonic_ns()}"
    sets = overrides + ["algorithm.name=ddp", "cluster.preset=single", "cluster.size=1",
                        f"train.batch_size={batch}", f"train.tokens={batch * seq_len * steps}",
                        "eval.windows=8", "sample.chars=1"]
    cmd = [sys.executable, "-m", "locotrain", "run", "quickstart", "--quiet", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads((out / "summary.json").read_text())["step_time_median_s"]


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mt = sum(t for _, t in points) / n
    slope = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return mt - slope * mb, slope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {"date": time.strftime("%Y-%m-%d"), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MODELS.items():
            seq_len = int(next(o for o in overrides if o.startswith("model.seq_len")).split("=")[1])
            points = [(b, step_time(overrides, b, args.steps, seq_len, Path(tmp))) for b in batches]
            fixed, slope = fit(points)
            at16 = fixed + slope * 16
            results["models"][name] = {"step_s": dict(points), "fixed_s": fixed,
                                       "slope_s_per_sequence": slope,
                                       "fixed_share_at_16": fixed / at16}
            print(json.dumps({name: results["models"][name]}), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print("| model | " + " | ".join(f"b = {b}" for b in batches) + " | fit: fixed + slope b | fixed share at b = 16 |")
    print("|---|" + "---|" * len(batches) + "---|---|")
    for name, r in results["models"].items():
        print(f"| {name} | " + " | ".join(f"{r['step_s'][b] * 1e3:.2f} ms" for b in batches)
              + f" | {r['fixed_s'] * 1e3:.2f} ms + {r['slope_s_per_sequence'] * 1e3:.3f} ms b | "
              f"{r['fixed_share_at_16']:.0%} |")


if __name__ == "__main__":
    main()
