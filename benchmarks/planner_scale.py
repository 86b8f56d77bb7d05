"""How fast `loco plan` simulates big clusters (docs/benchmarks.md, "Planner at scale").

    python benchmarks/planner_scale.py            # everything, ~3 minutes on 2 CPU cores
    python benchmarks/planner_scale.py --quick    # the headline runs only

1. The cost of one tensor op on phantom tensors (planner/phantom.py) against torch's "meta"
   device, the alternative we measured before choosing.
2. Streaming DiLoCo at 100B parameters (plan-100b: 108 layers, 36 fragments, H = 108) on
   1,000 workers in 10 regions (10 Gbit/s between regions, 400 inside, 30 ms): the cost as
   rounds and workers grow, with and without representatives.
3. HALoS on the same 1,000 workers (a local server per region, 100 workers each): the worker
   updates it simulates in a minute.

Prints one line per run: simulated processes, events, seconds, events per second. The
machine's load average is printed before and after: on a shared 2-core machine it matters.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from locotrain.config import load_config
from locotrain.planner.phantom import PhantomTensor
from locotrain.planner.plan import run_plan

REGIONS = [f"r{i}" for i in range(10)]


def cluster(workers: int) -> list[str]:
    lat = [[1e-4 if i == j else 0.03 for j in range(10)] for i in range(10)]
    bw = [[400 if i == j else 10 for j in range(10)] for i in range(10)]
    spread = ",".join(f'{{region="{r}",count={workers // 10}}}' for r in REGIONS)
    return ["cluster.preset=custom", "cluster.size=0", f"cluster.regions={json.dumps(REGIONS)}",
            f"cluster.latency_s={lat}", f"cluster.bandwidth_gbps={bw}", f"cluster.workers=[{spread}]"]


def timed(label: str, algorithm: str, workers: int, rounds: int, *extra: str) -> dict:
    cfg = load_config("plan-100b", [f"algorithm.name={algorithm}", f"plan.rounds={rounds}",
                                    *cluster(workers), *extra])[1]
    started = time.perf_counter()
    r = run_plan(cfg)
    seconds = time.perf_counter() - started
    H = getattr(cfg.algorithm.settings, "H", 1)
    row = {"run": label, "workers": r.workers, "processes": r.processes, "rounds": rounds,
           "worker_updates": r.inner_steps // H, "updates": r.updates, "events": r.events,
           "seconds": round(seconds, 2), "events_per_s": round(r.events / seconds),
           "simulated_s": round(r.wall_s), "cu": round(r.compute_utilization, 4)}
    print(json.dumps(row), flush=True)
    return row


def op_cost(make, n: int) -> float:
    """Microseconds per op of the kind the algorithms run (element-wise, foreach, cat)."""
    a, b = [make((1000, 1000)) for _ in range(10)], [make((1000, 1000)) for _ in range(10)]
    started = time.perf_counter()
    for _ in range(n):
        for x, y in zip(a, b):
            d = x - y  # noqa: F841
            x.mul_(0.5).add_(y, alpha=0.3)
            x.lerp_(y, 0.5)
            x.copy_(y)
            x.detach().clone()
        torch._foreach_add_(a, b, alpha=0.1)
        torch._foreach_add(a, b, alpha=0.1)
        torch.cat([t.reshape(-1) for t in a])
    return (time.perf_counter() - started) / (n * (10 * 7 + 2 + 11)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    torch.set_num_threads(1)
    print(json.dumps({"op_us_phantom": round(op_cost(PhantomTensor, 2000), 2),
                      "op_us_meta": round(op_cost(lambda s: torch.empty(s, device="meta"), 20), 1)}))
    timed("streaming, headline", "streaming", 1000, 1000)
    timed("halos, headline", "halos", 1000, 5)
    if not args.quick:
        for rounds in (10, 100):
            timed("streaming, rounds", "streaming", 1000, rounds)
        for workers in (10, 100):
            timed("streaming, workers", "streaming", workers, 100)
        timed("streaming, no representatives", "streaming", 100, 100, "plan.symmetry=false")
        timed("streaming, no representatives", "streaming", 1000, 10, "plan.symmetry=false")
        for rounds in (1, 2):
            timed("halos, rounds", "halos", 1000, rounds)
        timed("halos, workers", "halos", 100, 5)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
