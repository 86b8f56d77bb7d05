"""Bytes a real run sends against what the simulator charges, and how far their final models
are apart: ddp, diloco and streaming x fp32, bf16, int8, fp4 x M = 2, 3, 4 (CPU, gloo).

    python benchmarks/real_vs_sim_bytes.py --out docs/results/real_vs_sim_bytes.md

Each real run is `loco launch` of a tiny model on loopback; the simulated run is the same
config.toml through the simulator. runtime/collectives.py defines both byte counts, so they
must be equal; the models agree to float round-off (tests/test_real.py asserts both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from locotrain.checkpoint import load_checkpoint
from locotrain.config import load_config
from locotrain.run import simulate

TINY = ["model.depth=2", "model.width=32", "model.heads=2", "model.seq_len=16",
        "train.batch_size=8", "train.tokens=6144", "eval.windows=16", "eval.every=4096",
        "sample.chars=20", "runtime.timeout_s=30", "cluster.step_time_s=0"]
ALGORITHMS = {"ddp": ["algorithm.name=ddp"],
              "diloco": ["algorithm.name=diloco", "algorithm.H=4"],
              "streaming": ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=2",
                            "algorithm.tau=1", "algorithm.alpha=0.5"]}


def cluster(M: int) -> list[str]:
    if M == 3:  # one region
        return ["cluster.preset=custom", "cluster.size=3", "cluster.regions=['a']",
                "cluster.latency_s=[[0.0]]", "cluster.bandwidth_gbps=[[0.0]]",
                "cluster.workers=[{region='a', count=3}]"]
    return ["cluster.preset=two-datacenters", f"cluster.size={M}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = ["| algorithm | codec | M | real bytes | simulated bytes | equal | max abs diff of the final models |",
            "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, algo in ALGORITHMS.items():
            for codec in ("fp32", "bf16", "int8", "fp4"):
                for M in (2, 3, 4):
                    out = Path(tmp) / f"{name}-{codec}-{M}"
                    sets = [*TINY, *algo, *cluster(M), f"algorithm.codec={codec}"]
                    cmd = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet",
                           "--out", str(out)] + sum((["--set", s] for s in sets), [])
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(proc.stderr[-2000:])
                    real = json.loads((out / "summary.json").read_text())
                    sim = simulate(load_config(str(out / "config.toml"))[1])
                    weights = load_checkpoint(out)[0]
                    diff = max((weights[k] - sim.params[k].cpu()).abs().max().item() for k in weights)
                    equal = real["bytes_sent"] == sim.summary["bytes_sent"]
                    rows.append(f"| {name} | {codec} | {M} | {real['bytes_sent']:,} | "
                                f"{sim.summary['bytes_sent']:,} | {'yes' if equal else 'NO'} | {diff:.1e} |")
                    print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
