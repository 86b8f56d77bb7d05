"""Throughput of the simulator's batched engine against one model doing the same arithmetic.

    PYTHONPATH=src python benchmarks/batched_engine.py --json results.json [--quick]

All cases in one process on one device, the nanoGPT-size char GPT of the two-datacenters
preset (6 x 384, 256 characters, dropout 0.2, bf16 autocast and torch.compile on CUDA):

* reference: ONE model at batch 16 x M (256 for M = 16) through the same engine (W = 1);
* diloco-M: the whole simulator (two-datacenters, DiLoCo H = 50) with M workers of batch 16,
  batched engine, for M in 4, 16, 64;
* diloco-16-sequential: the same with every worker stepped alone (the old simulator's way);
* halos-16: HALoS on halos-4x4 (16 workers, 8.5x speed spread; tasks start at different
  virtual times, so the batch width varies).

Steady state: the engine synchronises the device after every chunk of steps and the first
chunks (compilation, warm-up) are left out; tokens/s = tokens trained after the warm-up /
wall seconds from the end of the warm-up to the end of the run, so the event loop, the outer
steps and the collectives' arithmetic are inside the measured time. Evaluations are outside
(eval.every beyond the run). Peak device memory is reported per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from locotrain.config import load_config  # noqa: E402
from locotrain.run import Simulation, engine_for  # noqa: E402
from locotrain.runtime.engine import Engine  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """Wraps Engine._run: synchronise after every chunk and note when it ended and what it
    trained."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []  # (time, tokens trained by this chunk)
        original = Engine._run

        def run(engine, group):
            original(engine, group)
            sync()
            tokens = sum(j.tokens_per_step for j in group) * engine.chunks[-1][1]
            self.marks.append((time.perf_counter(), tokens if group[0].kind != "apply" else 0))

        Engine._run = run

    def rate(self, skip_fraction: float) -> float:
        """Tokens/s after the first `skip_fraction` of the chunks."""
        k = max(1, int(len(self.marks) * skip_fraction))
        t0 = self.marks[k - 1][0]
        tokens = sum(n for _, n in self.marks[k:])
        return tokens / (self.marks[-1][0] - t0)


def simulate(preset: str, overrides: list[str]) -> Simulation:
    cfg = load_config(preset, overrides)[1]
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine)
    engine.start()
    sim.start()
    sim.runtime.run()
    return sim


def case_simulation(name, preset, overrides, timer, skip=0.2):
    timer.marks.clear()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    started = time.perf_counter()
    sim = simulate(preset, overrides)
    wall = time.perf_counter() - started
    rate = timer.rate(skip)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    widths = [w for w, n, _ in sim.engine.chunks]
    result = {"case": name, "tokens_per_s": rate, "wall_s": wall, "peak_gib": peak,
              "workers": sim.setup.job.M, "mean_batch_width": sum(widths) / len(widths),
              "tokens": sim.runtime.tokens}
    print(json.dumps(result), flush=True)
    return result


def case_reference(batch: int, steps: int, timer, quick: bool):
    """One model at `batch`, through the same engine: chunks of 25 steps, the first two
    left out."""
    cfg = load_config("two-datacenters", [f"train.batch_size={batch}", "cluster.preset=single"]
                      + (QUICK if quick else []))[1]
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine)
    engine.start()
    row = sim.rows[0]
    timer.marks.clear()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    for _ in range(steps // 25):
        engine.train(row, 25)
    rate = timer.rate(2 / (steps // 25))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    result = {"case": f"reference-one-model-batch{batch}", "tokens_per_s": rate, "peak_gib": peak}
    print(json.dumps(result), flush=True)
    return result


QUICK = ["model.depth=2", "model.width=64", "model.heads=2", "model.seq_len=32",
         "train.compile=false"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="a tiny model, to check the script on a CPU")
    ap.add_argument("--cases", default="all")
    args = ap.parse_args()
    timer = Timed()
    quick = QUICK if args.quick else []
    steps = 100 if args.quick else 400  # inner steps per worker in each simulation
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cases": []}
    cases = args.cases.split(",")

    def want(name):
        return args.cases == "all" or name in cases

    seq = 32 if args.quick else 256

    def diloco(M, engine="batched"):
        return [f"cluster.size={M}", f"train.tokens={steps * M * 16 * seq}", "eval.every=1000000000000",
                "eval.windows=8", "algorithm.name=diloco", "algorithm.H=50",
                f"runtime.engine={engine}"] + quick

    if want("reference"):
        results["cases"].append(case_reference(256, 200, timer, args.quick))
    for M in (16, 4, 64):
        if want(f"diloco-{M}"):
            results["cases"].append(case_simulation(f"diloco-{M}", "two-datacenters",
                                                    diloco(M), timer))
    if want("sequential"):
        results["cases"].append(case_simulation("diloco-16-sequential", "two-datacenters",
                                                diloco(16, "sequential"), timer))
    if want("halos"):
        results["cases"].append(case_simulation(
            "halos-16", "halos-4x4", [f"train.tokens={steps * 16 * 16 * seq}",
                                      "eval.every=1000000000000", "eval.windows=8"] + quick, timer,
            skip=0.3))
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
