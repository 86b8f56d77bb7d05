"""CUDA graphs for the batched engine, and batched evaluation, in one GPU call.

    PYTHONPATH=src python benchmarks/cuda_graphs.py --json results.json [--quick] [--cases ...]

All cases in one process on one device, the nanoGPT-size char GPT of the two-datacenters
preset (6 x 384, 256 characters, dropout 0.2, bf16 autocast and torch.compile on CUDA):

* reference: ONE model at batch 256 through the same engine (W = 1), no graphs;
* diloco-16: the whole simulator, 16 DiLoCo workers of batch 16 (H = 50), batched engine,
  runtime.cuda_graphs = off; diloco-16-graphs: the same with cuda_graphs = on;
* eval-8, eval-32: the validation loss of 8 (32) different models on every validation window,
  one at a time (Workload.evaluate, what a run does) against stacked (evaluate_many: all of
  them in one call, and in calls of runtime.eval_batch models, what `loco sweep` does);
* check-diloco, check-ddp: a small model (dropout 0) trained with and without graphs, to see
  that graphs change no result: DiLoCo (train jobs) and DDP (gradients and apply jobs).

Throughput is measured as in benchmarks/batched_engine.py (steady state after the first
chunks; the event loop and outer steps inside, evaluations outside). Every case starts from a
fresh torch.compile cache, so each compiles what it runs; a case that fails is recorded with
its error and the others still run. Results are written after every case.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batched_engine import Timed, case_simulation, sync  # noqa: E402
from locotrain.config import load_config  # noqa: E402
from locotrain.run import Simulation, engine_for  # noqa: E402
from locotrain.setup import build  # noqa: E402

# A tiny model to check the script on a CPU (train.compile stays as the preset has it: the
# engine compiles on CUDA only, so on a CPU graphs fall back to plain steps).
QUICK = ["model.depth=2", "model.width=64", "model.heads=2", "model.seq_len=32"]
CHECK_MODEL = ["model.depth=2", "model.width=128", "model.heads=4", "model.seq_len=64",
               "model.dropout=0"]


def fresh() -> None:
    """Forget compiled code, compile counters and memory statistics between cases."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def graph_counters() -> dict:
    """What inductor counted about CUDA graphs (skips and their reasons, recordings)."""
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}


def case_reference(batch: int, steps: int, timer, quick: list[str]) -> dict:
    """One model at `batch`, through the same engine: chunks of 25 steps, the first two left
    out."""
    cfg = load_config("two-datacenters", [f"train.batch_size={batch}", "cluster.preset=single",
                                          "cluster.size=0", "runtime.cuda_graphs=off"] + quick)[1]
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine)
    engine.start()
    timer.marks.clear()
    started = time.perf_counter()
    for _ in range(steps // 25):
        engine.train(sim.rows[0], 25)
    return {"case": f"reference-one-model-batch{batch}",
            "tokens_per_s": timer.rate(2 / (steps // 25)),
            "wall_s": time.perf_counter() - started, "peak_gib": peak_gib()}


def case_diloco(graphs: str, steps: int, timer, quick: list[str]) -> dict:
    seq = 32 if quick else 256
    overrides = ["cluster.size=16", f"train.tokens={steps * 16 * 16 * seq}",
                 "eval.every=1000000000000", "eval.windows=8", "algorithm.name=diloco",
                 "algorithm.H=50", "runtime.engine=batched", f"runtime.cuda_graphs={graphs}"]
    name = "diloco-16" + ("-graphs" if graphs == "on" else "")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its line; main prints ours
        result = case_simulation(name, "two-datacenters", overrides + quick, timer)
    return result | {"graph_counters": graph_counters()}


def distinct_models(workload, n: int) -> list[dict]:
    """n different models (the head starts at zero: without noise all would predict alike)."""
    models = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        params = workload.init_params(seed)
        models.append({k: v + 0.02 * torch.randn(v.shape, generator=g).to(v.device)
                       for k, v in params.items()})
    return models


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def case_eval(M: int, cap: int, repeats: int, limit: int, quick: list[str]) -> dict:
    """M models on the validation windows (limit 0: all of them, as a final evaluation): one
    at a time, all stacked, stacked by `cap`."""
    cfg = load_config("two-datacenters", quick)[1]
    workload = build(cfg).workload
    models = distinct_models(workload, M)
    alone_s, alone = timed(lambda: [workload.evaluate(m, limit) for m in models], repeats)
    all_s, together = timed(lambda: workload.evaluate_many(models, limit), repeats)
    capped_s, _ = timed(lambda: [r for i in range(0, M, cap)
                                 for r in workload.evaluate_many(models[i:i + cap], limit)],
                        repeats)
    worst = max(abs(b.val_loss - a.val_loss) / a.val_loss for a, b in zip(alone, together))
    return {"case": f"eval-{M}", "models": M, "windows": alone[0].windows,
            "one_at_a_time_s": alone_s, "stacked_s": all_s, f"stacked_by_{cap}_s": capped_s,
            "speedup_stacked": alone_s / all_s, f"speedup_by_{cap}": alone_s / capped_s,
            "max_rel_diff_val_loss": worst, "peak_gib": peak_gib()}


def train_once(overrides: list[str]):
    cfg = load_config("two-datacenters", overrides)[1]
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine)
    engine.start()
    sim.start()
    sim.run()
    return sim.finish(), engine.graphs


def case_check(algorithm: str, quick: list[str]) -> dict:
    """The same small run with and without graphs: how far the final models and losses are
    apart (bf16 autocast; without dropout nothing random differs)."""
    common = CHECK_MODEL + quick + ["cluster.size=4", "train.tokens=204800", "eval.every=51200",
                                    "eval.windows=16", f"algorithm.name={algorithm}"]
    common += ["algorithm.H=10"] if algorithm == "diloco" else []
    runs, used = {}, {}
    for graphs in ("off", "on"):
        fresh()
        runs[graphs], used[graphs] = train_once(common + [f"runtime.cuda_graphs={graphs}"])
    off, on = runs["off"], runs["on"]
    rel = max(((on.params[k].float() - off.params[k].float()).norm()
               / off.params[k].float().norm().clamp_min(1e-12)).item() for k in off.params)
    losses = [(a["val_loss"], b["val_loss"]) for a, b in zip(off.evals, on.evals)]
    return {"case": f"check-{algorithm}", "graphs_used": used["on"], "max_rel_diff_params": rel,
            "val_loss_off_on": losses, "graph_counters": graph_counters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model, to check the script on a CPU")
    ap.add_argument("--cases", default="reference,diloco,graphs,eval,check")
    ap.add_argument("--steps", type=int, default=0, help="inner steps per DiLoCo worker")
    ap.add_argument("--eval-batch", type=int, default=8, help="runtime.eval_batch to compare")
    args = ap.parse_args()
    quick = QUICK if args.quick else []
    steps = args.steps or (100 if args.quick else 300)
    cases = set(args.cases.split(","))
    timer = Timed()
    if torch.cuda.is_available():  # say in the log why a graph was not used
        torch._logging.set_logs(perf_hints=True)
    plan = []  # (name, case)
    if "reference" in cases:
        plan.append(("reference", lambda: case_reference(256, 100 if args.quick else 200, timer,
                                                         quick)))
    if "diloco" in cases:
        plan.append(("diloco-16", lambda: case_diloco("off", steps, timer, quick)))
    if "graphs" in cases:
        plan.append(("diloco-16-graphs", lambda: case_diloco("on", steps, timer, quick)))
    if "eval" in cases:
        limit = 256 if args.quick else 0
        plan += [(f"eval-{m}", lambda m=m: case_eval(m, args.eval_batch, 3, limit, quick))
                 for m in (8, 32)]
    if "check" in cases:
        plan += [(f"check-{a}", lambda a=a: case_check(a, quick)) for a in ("diloco", "ddp")]
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "cases": []}
    for name, case in plan:
        fresh()
        started = time.perf_counter()
        try:
            result = case()
        except Exception as e:  # keep the other cases' numbers
            traceback.print_exc()
            result = {"case": name, "error": f"{type(e).__name__}: {e}"}
        result["case_wall_s"] = time.perf_counter() - started
        print(json.dumps(result), flush=True)
        results["cases"].append(result)
        results["ratios"] = ratios(results["cases"])
        Path(args.json).write_text(json.dumps(results, indent=2))


def ratios(cases: list[dict]) -> dict:
    """Tokens/s of each simulated case over the one-model reference's."""
    rates = {c["case"]: c["tokens_per_s"] for c in cases if "tokens_per_s" in c}
    ref = next((r for name, r in rates.items() if name.startswith("reference")), None)
    return {name: r / ref for name, r in rates.items() if ref and not name.startswith("reference")}

if __name__ == "__main__":
    main()
