"""The pipeline-parallelism results of docs/experiments.md ("Pipelines over slow links"):

    python experiments/pipelines.py [OUT]        # OUT defaults to docs/results/pipelines

1. `loco place` on Yuan et al.'s five scenarios (paper setup: 64 V100, GPT-3 XL, 8 stages x 8
   replicas), default settings; the optimised placement then re-simulated under GPipe and
   1F1B, each with and without 2BP.
2. The time model on equal stages and free links (4 stages): GPipe / 1F1B with and without
   2BP, step, bubble, peak micro-batches held; Gantt charts of one example.
3. 2BP for real on the char GPT in one process: gradients against plain backprop, micro-batches
   and bytes held per stage.
Writes raw JSON, PNGs and tables.md into OUT. About 3 minutes on 2 CPU cores.
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from locotrain.models.backbone import Backbone, init_params  # noqa: E402
from locotrain.pipeline.cli import parse_settings, place  # noqa: E402
from locotrain.pipeline.inprocess import reference_grads, run_schedule  # noqa: E402
from locotrain.pipeline.placement import CostModel  # noqa: E402
from locotrain.pipeline.plan import simulate_placement  # noqa: E402
from locotrain.pipeline.plots import gantt  # noqa: E402
from locotrain.pipeline.scenarios import SCENARIOS, GPTSizes  # noqa: E402
from locotrain.pipeline.timeline import Pipeline, simulate  # noqa: E402

SCHEDULES = [("gpipe", False, "end"), ("gpipe", True, "end"), ("gpipe", True, "fill"),
             ("1f1b", False, "end"), ("1f1b", True, "end"), ("1f1b", True, "fill")]


def scenarios(out: Path) -> tuple[list[str], dict]:
    rows, raw = [], {}
    settings = parse_settings([])
    sizes = GPTSizes()
    for name in SCENARIOS:
        t0 = time.perf_counter()
        r = place(name, settings, out / "place" / name)
        wall = time.perf_counter() - t0
        model = CostModel(SCENARIOS[name](), 8, 8, r["c_dp_bytes"], r["c_pp_bytes"])
        alloc = model.fixed(r["allocation"]["stages"])
        assert abs(alloc.cost - r["cost_optimised"]) < 1e-9 * r["cost_optimised"]
        steps = {}
        for schedule, twobp, p2 in SCHEDULES:
            t = simulate_placement(alloc, model.cluster, sizes, settings.mfu, schedule,
                                   twobp=twobp, p2=p2)
            steps[f"{schedule}{' + 2BP ' + p2 if twobp else ''}"] = t.step_time_s
        raw[name] = {"place": r, "wall_s": wall, "optimised_step_by_schedule": steps}
        st = r["step_time_s"]
        rows.append(f"| {name} | {r['cost_optimised']:.2f} | {r['cost_random_mean']:.2f} | "
                    f"{r['cost_random_best']:.2f} | {r['cost_in_order']:.2f} | "
                    f"{st['optimised']:.2f} | {st['random_mean']:.2f} | {st['random_best']:.2f} | "
                    f"{st['in_order']:.2f} | {r['search']['seconds']:.1f} |")
        print(rows[-1], flush=True)
    head = ["| scenario | cost optimised | random mean | random best | in order | "
            "step optimised | random mean | random best | in order | search s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    labels = list(next(iter(raw.values()))["optimised_step_by_schedule"])
    sched = ["| scenario | " + " | ".join(labels) + " |", "|---|" + "---|" * len(SCHEDULES)]
    for name, d in raw.items():
        steps = d["optimised_step_by_schedule"].values()
        sched.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in steps) + " |")
    return head + rows + [""] + sched, raw


def time_model(out: Path) -> tuple[list[str], dict]:
    rows = ["| S | m | schedule | step | bubble | peak held per stage |",
            "|---|---|---|---|---|---|"]
    raw = {}
    S = 4
    for m in (4, 8, 16):
        pipe = Pipeline.uniform(S, m, 1.0, 1.0, 1.0)  # F = 1, B = 2 split evenly
        for schedule, twobp, p2 in [("gpipe", False, "end"), ("gpipe", True, "end"),
                                    ("1f1b", False, "end"), ("1f1b", True, "end"),
                                    ("1f1b", True, "fill")]:
            t = simulate(pipe, schedule, twobp=twobp, p2=p2)
            label = f"{schedule}{' + 2BP (' + p2 + ')' if twobp else ''}"
            raw[f"m{m} {label}"] = {"step": t.step_time_s, "bubble": t.bubble_fraction,
                                    "peak_held": t.peak_held_per_stage()}
            rows.append(f"| {S} | {m} | {label} | {t.step_time_s:g} | "
                        f"{100 * t.bubble_fraction:.1f}% | {t.peak_held_per_stage()} |")
            if m == 8 and schedule == "1f1b":
                name = f"gantt_1f1b{'_2BP_' + p2 if twobp else ''}.png"
                gantt(t, out / name, f"{S} stages, {m} micro-batches, {label}")
    return rows, raw


def twobp_real(out: Path) -> tuple[list[str], dict]:
    torch.set_num_threads(1)
    spec = Backbone(vocab_in=65, vocab_out=65, depth=8, width=128, heads=4, seq_len=64,
                    causal=True)
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(v.shape, generator=gen) * 0.05
              for k, v in init_params(spec, torch.Generator().manual_seed(0)).items()}
    S, m = 4, 8
    batch = torch.randint(0, 65, (m, 4, spec.seq_len + 1), generator=gen)
    ref, ref_loss = reference_grads(spec, params, batch)
    rows = ["| schedule | backward | max rel. grad error | loss diff | peak micro-batches held "
            "per stage | peak saved bytes per stage | wall s (not throughput) |",
            "|---|---|---|---|---|---|---|"]
    raw = {"spec": spec.__dict__, "S": S, "m": m, "micro_batch_sequences": 4}
    for schedule, mode, concat in [("1f1b", "plain", False), ("1f1b", "stash", False),
                                   ("1f1b", "stash", True), ("1f1b", "autograd", False),
                                   ("gpipe", "plain", False), ("gpipe", "stash", False)]:
        walls = []
        for _ in range(3):
            r = run_schedule(spec, params, batch, S, schedule, mode, concat)
            walls.append(r.wall_s)
        err = max(float((r.grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)
        label = {"plain": "plain backprop", "stash": "2BP (stash p2 inputs)",
                 "autograd": "2BP (autograd.grad, retained graph)"}[mode]
        label += ", p2 concatenated" if concat else ""
        raw[f"{schedule} {label}"] = {"max_rel_err": err, "loss_diff": r.loss - ref_loss,
                                      "peak_held": r.peak_held, "peak_bytes": r.peak_bytes,
                                      "wall_s_median": statistics.median(walls)}
        rows.append(f"| {schedule} | {label} | {err:.1e} | {r.loss - ref_loss:.1e} | "
                    f"{r.peak_held} | {[round(b / 1e6, 2) for b in r.peak_bytes]} MB | "
                    f"{statistics.median(walls):.3f} |")
        print(rows[-1], flush=True)
    return rows, raw


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/results/pipelines")
    out.mkdir(parents=True, exist_ok=True)
    t_rows, t_raw = time_model(out)
    b_rows, b_raw = twobp_real(out)
    s_rows, s_raw = scenarios(out)
    (out / "results.json").write_text(json.dumps(
        {"time_model": t_raw, "twobp_real": b_raw, "scenarios": s_raw}, indent=1))
    md = ["# Pipeline results (experiments/pipelines.py)", "",
          "## Placement on Yuan et al.'s scenarios (cost DP + 2 PP and simulated GPipe step, s)",
          "", *s_rows, "", "## Time model, equal stages, free links", "", *t_rows, "",
          "## 2BP in one process on the char GPT", "", *b_rows, ""]
    (out / "tables.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
