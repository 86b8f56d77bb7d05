"""`loco sweep`: the cartesian product of a few settings (and seeds) as independent
simulations in one process, their inner steps pooled into one batched engine.

Each point is an ordinary simulated run with its own folder. The simulations take turns:
each runs its event loop until a worker needs a compute result it does not have yet, and
then the engine runs every pending job of every simulation together (runtime/engine.py).
Workers of different points batch together whenever their models have the same shapes and
inner optimizer; learning rates, schedules and weight decay may differ per point. So do the
evaluations: each point's global model is copied when an evaluation falls due, and up to
runtime.eval_batch of them are evaluated in one stacked computation (metrics.EvalQueue); a
point's folder is written once its final evaluation has run.

With several GPUs on one host, the points are dealt out round-robin to one process per GPU,
each pooling its share; the parent writes the table once all are done.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import UserError
from .files import atomic_write


def parse_grid(text: str) -> tuple[str, list[str]]:
    """'KEY=V1,V2,...' -> (KEY, ['V1', 'V2', ...]); commas inside [...] {} or quotes stay."""
    if "=" not in text:
        raise UserError(f"--grid expects KEY=V1,V2,..., got '{text}'")
    key, rest = (part.strip() for part in text.split("=", 1))
    values, depth, quote, current = [], 0, "", ""
    for ch in rest:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    values = [v for v in values if v]
    if not key or not values:
        raise UserError(f"--grid {text}: give a key and at least one value, e.g. "
                        "--grid algorithm.outer_lr=0.3,0.7")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {key} lists a value twice: {', '.join(values)}")
    return key, values


def plan_points(source: str, grids: list[str], seeds: int, sets: list[str]):
    """Every point's (label, settings, config), all checked before anything runs."""
    from .setup import build

    parsed = [parse_grid(g) for g in grids]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid repeats a key: {', '.join(keys)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    base_seed = load_config(source, sets)[1].train.seed
    points = []
    for values in itertools.product(*[v for _, v in parsed]):
        for s in range(seeds):
            settings = dict(zip(keys, values))
            if seeds > 1:
                settings["train.seed"] = str(base_seed + s)
            overrides = list(sets) + [f"{k}={v}" for k, v in settings.items()]
            try:
                _, cfg = load_config(source, overrides)
                build(cfg)
            except UserError as e:
                raise UserError(f"sweep point {_label(settings) or 'base'}: {e}") from None
            points.append((_label(settings), settings, cfg))
    return keys, points


def _label(settings: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in settings.items())


def _folder(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "", label.replace("+", "_")) or "base"


def run_points(points, out: Path, force: bool, quiet: bool) -> None:
    """Run these points in this process, pooled into one engine."""
    from tqdm import tqdm

    from .metrics import EvalQueue
    from .run import Simulation, engine_for, set_threads

    set_threads(points[0][2])
    engine = engine_for(points[0][2])
    sims = [Simulation(cfg, engine, out / _folder(label), force=force, quiet=True, label=label)
            for label, _, cfg in points]
    queue = EvalQueue(eval_batch(points[0][2], sims[0].setup.workload.device))
    if queue.cap > 1:  # else each evaluation runs alone when it falls due (the reference)
        for sim in sims:
            sim.recorder.defer_to(queue)
    engine.start()
    for sim in sims:
        sim.start()
    loops = {i: sim.runtime.events() for i, sim in enumerate(sims)}
    total = sum(cfg.train.tokens for _, _, cfg in points)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"sweep of {len(sims)}",
               disable=quiet, dynamic_ncols=True)
    ending = []  # simulations whose loops are over, waiting for their final evaluation
    while loops:
        jobs = []
        for i, loop in list(loops.items()):
            job = next(loop, None)
            if job is None:
                del loops[i]
                sims[i].recorder.queue_final()
                ending.append(sims[i])
            else:
                jobs.append(job)
        for job in jobs:
            engine.complete(job)  # each runs together with every other pending job
        ending = _finish_evaluated(ending)
        bar.n = min(total, sum(sim.runtime.tokens for sim in sims))
        bar.refresh()
    queue.flush()  # the final evaluations still queued, together
    _finish_evaluated(ending)
    bar.close()


def eval_batch(cfg: Config, device) -> int:
    """How many models to evaluate in one stacked computation: runtime.eval_batch, or by
    default 8 on a GPU and one at a time on a CPU, where stacked evaluation is slower (its
    larger activations fall out of the caches; docs/simulation.md)."""
    if cfg.runtime.eval_batch:
        return cfg.runtime.eval_batch
    return 8 if device.type == "cuda" else 1


def _finish_evaluated(ending: list) -> list:
    """Write the folders of the simulations whose final evaluation has run; the others."""
    for sim in ending:
        if sim.recorder.final_done:
            sim.finish()
    return [sim for sim in ending if not sim.recorder.final_done]


def sweep(source: str, grids: list[str], seeds: int, sets: list[str], out: Path, force: bool,
          quiet: bool, shard: str = "") -> str:
    keys, points = plan_points(source, grids, seeds, sets)
    if (out / "sweep.md").exists() and not force and not shard:
        raise UserError(f"'{out}' already holds a sweep; pass --force or another --out")
    if shard:  # a child process of a several-GPU sweep: run my share, write no table
        k, n = (int(x) for x in shard.split("/"))
        run_points(points[k::n], out, force, quiet)
        return ""
    gpus = _gpu_count()
    if gpus > 1 and len(points) > 1 and points[0][2].train.device != "cpu":
        _run_on_gpus(source, grids, seeds, sets, out, force, quiet, min(gpus, len(points)))
    else:
        run_points(points, out, force, quiet)
    return write_table(out, keys, points, points[0][2])


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_on_gpus(source, grids, seeds, sets, out, force, quiet, n) -> None:
    """One process per GPU, each running every n-th point pooled in its own engine."""
    children = []
    for k in range(n):
        cmd = [sys.executable, "-m", "locotrain", "sweep", source, "--out", str(out),
               "--shard", f"{k}/{n}", "--seeds", str(seeds), "--quiet"]
        cmd += sum((["--grid", g] for g in grids), []) + sum((["--set", s] for s in sets), [])
        cmd += ["--force"] if force else []
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(k)}
        children.append(subprocess.Popen(cmd, env=env))
    codes = [c.wait() for c in children]
    if any(codes):
        raise UserError(f"a sweep process failed (exit codes {codes}); see its output above")


def write_table(out: Path, keys: list[str], points, cfg0: Config) -> str:
    """sweep.md and plots/sweep.png from the point folders."""
    from . import report

    rows = []
    for label, settings, cfg in points:
        folder = out / _folder(label)
        summary = json.loads((folder / "summary.json").read_text())
        evals = [e for e in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                 if e["event"] == "eval"]
        rows.append((settings, summary, evals))
    best = min(s["best_val_bpc"] for _, s, _ in rows)
    target = cfg0.compare.target_bpc or best + cfg0.compare.target_margin_bpc
    head = [*keys] + (["seed"] if any("train.seed" in st for st, _, _ in rows) else [])
    lines = ["| " + " | ".join(head + ["final val bpc", "best val bpc", "simulated time (s)",
                                       "bytes sent", f"time to {target:.3f} bpc (s)"]) + " |",
             "|" + "---|" * (len(head) + 5)]
    for settings, s, evals in rows:
        t = report.time_to_target(evals, target)
        cells = [settings.get(k, "") for k in keys] + ([settings.get("train.seed", "")]
                                                       if len(head) > len(keys) else [])
        lines.append("| " + " | ".join(cells + [
            f"{s['final_val_bpc']:.4f}", f"{s['best_val_bpc']:.4f}", f"{s['sim_time_s']:.1f}",
            f"{s['bytes_sent']:,}", "-" if t is None else f"{t:.1f}"]) + " |")
    lines += ["", f"The target {target:.3f} bpc is "
              + ("compare.target_bpc" if cfg0.compare.target_bpc else
                 f"the best point's best + {cfg0.compare.target_margin_bpc} "
                 "(compare.target_margin_bpc)")
              + "; time to target interpolates between evaluations, '-' means never reached."]
    table = "\n".join(lines) + "\n"
    report.plot_sweep(out / "plots" / "sweep.png", keys, rows)
    atomic_write(out / "sweep.md", f"# sweep over {', '.join(keys)}\n\n{table}")
    return table
