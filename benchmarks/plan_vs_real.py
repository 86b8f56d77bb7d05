"""The planner's prediction of a real run (`loco launch`) against the run itself.

    python benchmarks/plan_vs_real.py RUN_DIR --gbps 10 --latency-s 1e-4 [--json OUT]

RUN_DIR is a finished `loco launch` run of a synchronous algorithm (its config.toml,
summary.json, timeline.json). The planner gets what a plan would be given by hand: the
measured compute time per inner step of each worker (its timeline's compute spans over its
steps; the fastest worker sets `cluster.step_time_s`, the others a speed), one region per
worker and the link's bandwidth and latency from the command line. It simulates the whole
run on phantom compute (`plan.rounds = 0`) and the script prints the wall times and bytes
side by side. Evaluations are not planned (a phantom has nothing to evaluate): the real
wall time is also given without the first worker's time in neither compute nor a wait,
which is its evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locotrain.config import load_config
from locotrain.planner.plan import run_plan


def measured(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    spans = json.loads((run / "timeline.json").read_text())
    workers = sorted({s["process"] for s in spans if s["process"].startswith("w")},
                     key=lambda name: int(name[1:]))
    compute = {w: sum(s["end"] - s["start"] for s in spans
                      if s["process"] == w and s["kind"] == "compute") for w in workers}
    start = min(s["start"] for s in spans)
    end = max(s["end"] for s in spans)
    w0 = [s for s in spans if s["process"] == workers[0]]
    busy = sum(s["end"] - s["start"] for s in w0 if s["kind"] in ("compute", "blocked", "idle"))
    steps = summary["inner_steps"] // len(workers)
    return {"workers": workers, "steps_per_worker": steps,
            "step_s": {w: compute[w] / steps for w in workers},
            "wall_s": end - start, "w0_other_s": (max(s["end"] for s in w0) - start) - busy,
            "bytes_sent": summary["bytes_sent"]}


def plan_overrides(real: dict, gbps: float, latency_s: float) -> list[str]:
    names = [f"r{i}" for i in range(len(real["workers"]))]
    fastest = min(real["step_s"].values())
    n = len(names)
    workers = ", ".join(f"{{region='{r}', speed={fastest / real['step_s'][w]:.6f}}}"
                        for r, w in zip(names, real["workers"]))
    return ["plan.rounds=0", "cluster.preset=custom", f"cluster.regions={names}",
            f"cluster.latency_s={[[latency_s] * n for _ in range(n)]}",
            f"cluster.bandwidth_gbps={[[gbps] * n for _ in range(n)]}",
            f"cluster.workers=[{workers}]", f"cluster.size={n}",
            f"cluster.step_time_s={fastest:.6f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--gbps", type=float, required=True, help="the link's bandwidth")
    ap.add_argument("--latency-s", type=float, required=True, help="the link's latency")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    real = measured(args.run)
    overrides = plan_overrides(real, args.gbps, args.latency_s)
    _, cfg = load_config(str(args.run / "config.toml"), overrides)
    plan = run_plan(cfg)
    without_eval = real["wall_s"] - real["w0_other_s"]
    out = {"real": real, "overrides": overrides, "planned_wall_s": plan.wall_s,
           "planned_bytes_sent": plan.bytes_sent,
           "error_wall": plan.wall_s / real["wall_s"] - 1,
           "error_wall_without_evaluations": plan.wall_s / without_eval - 1}
    print(f"real {real['wall_s']:.2f} s ({without_eval:.2f} s without w0's evaluations), "
          f"planned {plan.wall_s:.2f} s: {out['error_wall']:+.1%} "
          f"({out['error_wall_without_evaluations']:+.1%}); bytes real {real['bytes_sent']:,} "
          f"planned {plan.bytes_sent:,}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
