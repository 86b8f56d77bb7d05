"""1F1B with and without 2BP (Rae, Lee, Richings, arXiv 2405.18047) for real: the char GPT cut
into one stage per GPU, one process per stage over NCCL (pipeline/distributed.py). Measured:
throughput, the 2BP / plain ratio, peak memory per stage, the time of every F, B, p1 and p2;
and the time model's (pipeline/timeline.py) step time when fed those measured stage times and
the measured message time between stages, with its relative error against the measured step.

    export PYTHONPATH=$PWD/src
    python benchmarks/pipeline_2bp.py --json $OUT/pipeline_2bp.json          # all GPUs (>= 2)
    python benchmarks/pipeline_2bp.py --device cpu --json /tmp/pipeline_2bp.json   # smoke, gloo
    python benchmarks/pipeline_2bp.py --transport gloo --json $OUT/pipeline_2bp_gloo.json
        # GPUs without NCCL: every message copied to host memory, sent over gloo, copied back

Models: the nanoGPT char size (6 x 384) and a deeper one (24 x 384), where a stage has
enough blocks for the pipeline's bubble to matter. Variants, in this order in one group of
processes: plain 1F1B; 1F1B + 2BP with every p2 at the end of the step; 1F1B + 2BP with p2s
filling the waits where the time model, fed the measured times of the previous run, puts them
(the planner decides the order, the processes execute it). A step is one pipeline flush of
m micro-batches, without an optimizer step.

Step times drift during a call (the same run's steps moved from 140 to 200 ms on an H200 pair,
2026-11-30), so `--rounds R` runs the whole list of variants R times, interleaved (plain, 2bp,
plain, 2bp, ...): every ratio is taken within one round, and the table gives the median over
rounds with the lowest and highest round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from locotrain.errors import UserError
from locotrain.models.backbone import Backbone
from locotrain.pipeline.distributed import Job, Run, check_job
from locotrain.pipeline.spawn import spawn

VOCAB = 65  # Tiny Shakespeare's characters; the tokens are random, only the sizes matter
VARIANTS = {  # name -> what to run (plan_from is filled in below)
    "plain": {"mode": "plain"},
    "2bp-end": {"mode": "stash", "p2": "end"},
    "2bp-fill": {"mode": "stash", "p2": "fill"},
    "2bp-end-concat": {"mode": "stash", "p2": "end", "concat": True},
}


def parse(argv):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if gpu else "cpu")
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline stages = processes (default: every GPU, at most the "
                   "shallowest model's blocks; 2 on the cpu)")
    p.add_argument("--models", default=None,
                   help="DEPTHxWIDTH,... (default 6x384,24x384; on the cpu 2x64,4x64)")
    p.add_argument("--micro-batches", "-m", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per micro-batch (default 32; 2 on the cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256; 32 on the cpu")
    p.add_argument("--schedules", default="1f1b", help="1f1b and/or gpipe, comma-separated")
    p.add_argument("--variants", default="plain,2bp-end,2bp-fill",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 on the cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps (default 5; 1 on the cpu)")
    p.add_argument("--transport", choices=("nccl", "gloo"), default="nccl",
                   help="nccl: device to device (on the cpu: gloo directly); gloo: staged "
                   "through host memory over gloo (a slow link; no NCCL on GPUs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list of variants this many times, interleaved (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="weights and activations (default bf16 on GPUs, fp32 on the cpu)")
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.models = a.models or ("2x64,4x64" if cpu else "6x384,24x384")
    if not a.stages:  # every GPU, unless the shallowest model has fewer blocks
        blocks = min((int(d.lower().split("x")[0]) for d in a.models.split(",")
                      if d.lower().split("x")[0].isdigit()), default=2)
        a.stages = 2 if cpu else max(2, min(torch.cuda.device_count(), blocks))
    a.micro_batch = a.micro_batch or (2 if cpu else 32)
    a.seq_len = a.seq_len or (32 if cpu else 256)
    a.steps = a.steps or (3 if cpu else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if cpu else 5)
    a.dtype = a.dtype or ("fp32" if cpu else "bf16")
    return a


def runs_for(args) -> list[Run]:
    """Every schedule x variant, `rounds` times; round r > 1's names end in '.rR'."""
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    runs = []
    for r in range(1, args.rounds + 1):
        tag = "" if r == 1 else f".r{r}"
        for schedule in args.schedules.split(","):
            done_end = None
            for v in args.variants.split(","):
                if v not in VARIANTS:
                    raise UserError(f"unknown variant '{v}'; known: {', '.join(VARIANTS)}")
                name = f"{schedule}-{v}{tag}"
                kw = dict(VARIANTS[v])
                if v == "2bp-fill":  # ordered by the model fed this round's 2BP-end times
                    kw["plan_from"] = done_end
                runs.append(Run(name, schedule, steps=args.steps, warmup=args.warmup, **kw))
                done_end = name if v == "2bp-end" else done_end
    return runs


def summarise(runs: dict) -> dict:
    """Per variant over its rounds: the median of the rounds' step times and predictions, and
    the median, lowest and highest of the within-round ratios to plain of the same schedule."""
    rounds: dict[str, list[str]] = {}
    for name in runs:
        rounds.setdefault(name.split(".r")[0], []).append(name)
    out = {}
    for base, names in rounds.items():
        rs = [runs[n] for n in names]
        step = statistics.median(r["step_ms"] for r in rs)
        pred = statistics.median(r["predicted_step_ms"] for r in rs)
        ratios = []
        for n, r in zip(names, rs):
            plain = runs.get(n.replace(base, f"{r['schedule']}-plain", 1))
            if r["mode"] != "plain" and plain:
                ratios.append(plain["step_ms"] / r["step_ms"])  # = tokens/s over plain's
        out[base] = {"rounds": len(rs), "step_ms": step, "predicted_step_ms": pred,
                     "prediction_rel_error": pred / step - 1.0,
                     "prediction_rel_errors": [r["prediction_rel_error"] for r in rs],
                     "tokens_per_s": rs[0]["tokens_per_s"] * rs[0]["step_ms"] / step,
                     "ratio_over_plain": statistics.median(ratios) if ratios else None,
                     "ratios_over_plain": ratios,
                     "peak_memory_bytes": [max(st["peak_memory_bytes"] or st["state_bytes"]
                                               for st in (r["stages"][k] for r in rs))
                                           for k in range(len(rs[0]["stages"]))],
                     "memory_unit": "GiB" if rs[0]["stages"][0]["peak_memory_bytes"]
                     else "MiB saved"}
    return out


def model_result(spec: Backbone, job: Job, report: dict) -> dict:
    ms = 1e3
    runs = {}
    for r in report["runs"]:
        runs[r["name"]] = {
            "schedule": r["schedule"], "mode": r["mode"], "p2": r["p2"], "concat": r["concat"],
            "plan_from": r["plan_from"],
            "tokens_per_s": r["tokens_per_s"], "step_ms": r["step_s"] * ms,
            "step_ms_all": [t * ms for t in r["step_s_all"]],
            "predicted_step_ms": r["predicted_step_s"] * ms,
            "prediction_rel_error": r["prediction_rel_error"],
            "predicted_bubble": r["predicted_bubble"], "loss": r["loss"],
            "stages": [{
                "stage": st["stage"], "blocks": st["blocks"],
                "peak_memory_bytes": st["max_memory_allocated"],  # None on the cpu
                "state_bytes": st["state_bytes"], "peak_micro_batches_held": st["peak_held"],
                "op_ms": {k: v * ms for k, v in st["op_s"].items()},
                "per_micro_batch_ms": {k: [x * ms for x in v] for k, v in st["per_mb_s"].items()},
                "order": st["order"],
            } for st in r["stages"]],
        }
    ratios = {}
    for name, r in runs.items():
        plain = runs.get(f"{r['schedule']}-plain")
        if plain and r["mode"] != "plain":
            ratios[name] = r["tokens_per_s"] / plain["tokens_per_s"]
    return {"model": f"{spec.depth}x{spec.width}", "depth": spec.depth, "width": spec.width,
            "heads": spec.heads, "seq_len": spec.seq_len, "params": spec.num_params(),
            "stages": job.stages, "micro_batches": job.micro_batches,
            "micro_batch": job.micro_batch, "tokens_per_step": job.tokens_per_step,
            "dtype": job.dtype, "message_bytes": report["message_bytes"],
            "link_one_way_ms": [t * ms for t in report["link_one_way_s"]],
            "runs": runs, "throughput_ratio_over_plain": ratios, "summary": summarise(runs)}


def table(models: list[dict]) -> str:
    """One row per variant: medians over its rounds; 'rounds' gives the ratio's range."""
    rows = [(f"{'model':>7} {'run':<16} {'tokens/s':>11} {'vs plain':>8} {'rounds':>13} "
             f"{'step ms':>8} {'model ms':>8} {'error':>7}  peak memory per stage")]
    for m in models:
        for name, r in m["summary"].items():
            scale = 2**30 if r["memory_unit"] == "GiB" else 2**20
            ratio, span = r["ratio_over_plain"], ""
            if ratio is not None and len(r["ratios_over_plain"]) > 1:
                span = f"{min(r['ratios_over_plain']):.2f}-{max(r['ratios_over_plain']):.2f}"
            rows.append(f"{m['model']:>7} {name:<16} {r['tokens_per_s']:>11,.0f} "
                        f"{'' if ratio is None else f'{ratio:.3f}':>8} {span:>13} "
                        f"{r['step_ms']:>8.2f} {r['predicted_step_ms']:>8.2f} "
                        f"{r['prediction_rel_error']:>+7.1%}  "
                        + " ".join(f"{b / scale:.2f}" for b in r["peak_memory_bytes"])
                        + f" {r['memory_unit']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse(argv)
    started = time.monotonic()
    out = Path(args.json)
    try:
        runs = runs_for(args)
        jobs = []
        for dims in args.models.split(","):
            depth, width = (int(x) for x in dims.lower().split("x"))
            heads = max(1, width // 64)  # head size 64, as nanoGPT's 384 / 6
            spec = Backbone(VOCAB, VOCAB, depth, width, heads, args.seq_len, causal=True)
            jobs.append(Job(spec, args.stages, args.micro_batches, args.micro_batch, runs,
                            device=args.device, dtype=args.dtype, progress=True,
                            transport=args.transport))
            check_job(jobs[-1], args.stages)  # every model checked before the first runs
    except ValueError:
        print(f"pipeline_2bp: --models must look like 6x384,24x384, got '{args.models}'",
              file=sys.stderr)
        return 2
    except UserError as e:
        print(f"pipeline_2bp: {e}", file=sys.stderr)
        return 2
    direct = args.transport == "nccl"
    result = {"device": args.device,
              "backend": "nccl" if args.device == "cuda" and direct else "gloo",
              "transport": args.transport,
              "host_staged": not direct,
              "gpus": [torch.cuda.get_device_name(i)
                       for i in range(min(args.stages, torch.cuda.device_count()))]
              if args.device == "cuda" else [], "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(),
              "args": vars(args), "models": []}
    for job in jobs:
        spec = job.spec
        print(f"model {spec.depth} x {spec.width} ({spec.num_params() / 1e6:.1f}M parameters), "
              f"{args.stages} stages, m = {args.micro_batches} micro-batches of "
              f"{args.micro_batch} x {args.seq_len} tokens, {args.device} ({result['backend']}"
              f"{', host-staged' if not direct else ''}), "
              f"{args.dtype}", flush=True)
        report = spawn(job, timeout_s=600)
        result["models"].append(model_result(spec, job, report))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every model: a partial run counts
    result["wall_s"] = time.monotonic() - started
    out.write_text(json.dumps(result, indent=1))
    print(table(result["models"]))
    print(f"wrote {out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
