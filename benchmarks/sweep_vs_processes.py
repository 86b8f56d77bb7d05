"""`loco sweep` (one process, one pooled engine) against the same points as concurrent
`loco run` processes (with the batched engine, and with the sequential one: the simulator
before the batched engine), on one GPU; and the same sweep spread over every GPU of the host.

    PYTHONPATH=src python benchmarks/sweep_vs_processes.py --json r.json [--steps 400]
        [--sequential] [--multi] [--limit SECONDS]

The points: two-datacenters (4 workers, nanoGPT-size char GPT, DiLoCo H = 50), outer lr in
{0.3, 0.5, 0.7, 1.0} x outer momentum in {0.5, 0.9}: 8 points. Wall time of each variant,
compilation included (each process compiles its own graphs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LRS, MOMENTA = ["0.3", "0.5", "0.7", "1.0"], ["0.5", "0.9"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--steps", type=int, default=400, help="inner steps per worker and point")
    ap.add_argument("--sequential", action="store_true",
                    help="also time the runs with the sequential engine (the old simulator)")
    ap.add_argument("--multi", action="store_true", help="also spread the sweep over every GPU")
    ap.add_argument("--limit", type=float, default=600, help="seconds before concurrent runs are killed")
    args = ap.parse_args()
    common = [f"train.tokens={args.steps * 4 * 16 * 256}", "eval.windows=32", "sample.chars=50",
              "algorithm.name=diloco", "algorithm.H=50"]
    sets = sum((["--set", s] for s in common), [])
    loco = [sys.executable, "-m", "locotrain"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one_gpu = {**env, "CUDA_VISIBLE_DEVICES": "0"}
    results = {"points": 8, "steps_per_worker": args.steps, "workers_per_point": 4}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(loco + ["sweep", "two-datacenters", "--quiet", "--out", f"{tmp}/sweep",
                               "--grid", f"algorithm.outer_lr={','.join(LRS)}",
                               "--grid", f"algorithm.outer_momentum={','.join(MOMENTA)}"] + sets,
                       check=True, env=one_gpu)
        results["sweep_one_gpu_s"] = time.perf_counter() - started
        print(json.dumps(results), flush=True)

        for engine in ["batched"] + (["sequential"] if args.sequential else []):
            started = time.perf_counter()
            procs = [subprocess.Popen(loco + ["run", "two-datacenters", "--quiet", "--out",
                                              f"{tmp}/{engine}-{lr}-{mu}", "--set",
                                              f"algorithm.outer_lr={lr}", "--set",
                                              f"algorithm.outer_momentum={mu}", "--set",
                                              f"runtime.engine={engine}"] + sets, env=one_gpu)
                     for lr, mu in itertools.product(LRS, MOMENTA)]
            try:
                codes = [p.wait(timeout=args.limit) for p in procs]
            except subprocess.TimeoutExpired:  # report a lower bound rather than nothing
                for p in procs:
                    p.kill()
                codes = "killed"
            seconds = time.perf_counter() - started
            results[f"concurrent_{engine}_runs_one_gpu_s"] = seconds
            results[f"concurrent_{engine}_exit_codes"] = codes
            results[f"ratio_vs_{engine}"] = seconds / results["sweep_one_gpu_s"]
            print(json.dumps(results), flush=True)
        # the pooled sweep and the solo runs must agree
        sweep = json.loads(Path(f"{tmp}/sweep/outer_lr-0.7_outer_momentum-0.9/summary.json").read_text())
        solo = json.loads(Path(f"{tmp}/batched-0.7-0.9/summary.json").read_text())
        results["final_bpc_sweep_vs_solo"] = [sweep["final_val_bpc"], solo["final_val_bpc"]]

        import torch
        if args.multi and torch.cuda.device_count() > 1:
            started = time.perf_counter()
            subprocess.run(loco + ["sweep", "two-datacenters", "--quiet", "--out", f"{tmp}/multi",
                                   "--grid", f"algorithm.outer_lr={','.join(LRS)}",
                                   "--grid", f"algorithm.outer_momentum={','.join(MOMENTA)}"] + sets,
                           check=True, env=env)
            results["sweep_all_gpus_s"] = time.perf_counter() - started
            results["gpus"] = torch.cuda.device_count()
            results["sweep_md_all_gpus"] = Path(f"{tmp}/multi/sweep.md").read_text()
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
