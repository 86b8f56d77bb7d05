"""The run folder: refusing to overwrite a run, the summary, and every file a finished run
writes. Shared by the simulated and the real runtime's callers."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from . import report
from .checkpoint import STATE_DIR, save_checkpoint
from .errors import UserError
from .files import atomic_write

RUN_FILES = ["config.toml", "metrics.jsonl", "summary.json", "model.safetensors",
             "checkpoint.json", "samples.txt", "timeline.json", "plots", "status.json", STATE_DIR]
# summary.json is written last: a folder without it holds no finished run. status.json marks
# a run stopped by a signal (and which tokens it had reached); STATE_DIR is the checkpoint it
# may resume from, which --force must remove with the rest.
FINISHED, STATUS = "summary.json", "status.json"

# The folders this process prepared, so that the CLI can mark those it did not finish when
# it is interrupted.
prepared: list[Path] = []


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder")
    taken = [name for name in RUN_FILES if (out / name).exists()]
    if taken and not force:
        raise UserError(f"output folder '{out}' {_holds(out, taken[0])}; "
                        "pass --force to replace it or choose another --out")
    for name in taken:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    prepared.append(out)


def _holds(out: Path, first: str) -> str:
    """What the run in `out` is: interrupted, unfinished for another reason, or finished."""
    if (out / STATUS).exists():
        try:
            tokens = json.loads((out / STATUS).read_text())["last_eval_tokens"]
            where = f" (last evaluation at {tokens:,} tokens)"
        except (OSError, ValueError, KeyError, TypeError):
            where = ""
        again = (f"; continue it with `loco resume {out}`"
                 if (out / STATE_DIR / "state.json").is_file() else "")
        return f"holds an interrupted (incomplete) run{where}{again}"
    if not (out / FINISHED).exists():
        return (f"holds an incomplete run (no {FINISHED}: it failed, was killed or is "
                "still running)")
    return f"already holds a run ({first})"


def unfinished() -> list[Path]:
    """The folders this process prepared that hold no finished run."""
    return [out for out in prepared if out.is_dir() and not (out / FINISHED).exists()]


def mark_interrupted(out: Path) -> None:
    """status.json: the run in `out` was stopped (Ctrl-C, SIGTERM) before it finished, after
    the tokens of its last evaluation."""
    tokens = 0
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                tokens = json.loads(line).get("tokens", tokens)
            except ValueError:  # a line cut short by the interruption
                pass
    atomic_write(out / STATUS, json.dumps({
        "state": "interrupted", "complete": False, "last_eval_tokens": tokens,
        "note": "stopped before the end; metrics.jsonl holds its evaluations up to here",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))


def summarize(cfg, setup, recorder, final: dict, stats: dict, elapsed: float) -> dict:
    """summary.json: what the run did and reached. `stats` come from the runtime."""
    # best over evaluations on the same windows as the final one (eval.windows may make
    # the ones during training use a subset)
    best = min(e["val_bpc"] for e in recorder.evals if e["windows"] == final["windows"])
    per_step = stats.get("wall_per_step") or [0.0]
    s = {
        "algorithm": cfg.algorithm.name,
        "workload": cfg.workload.name,
        "corpus": setup.corpus.name,
        "params": setup.workload.num_params(),
        "workers": setup.job.M,
        "tokens": stats["tokens"],
        # Every token computed, those in the evaluated model, and those a crash threw away
        # (real runs: what dead processes computed and the model never received).
        "tokens_trained": stats["tokens"] + stats.get("tokens_lost", 0),
        "tokens_in_model": final["tokens"],
        "tokens_lost": stats.get("tokens_lost", 0),
        "time_s": round(elapsed, 3),
        "tokens_per_s": stats["tokens"] / max(elapsed, 1e-9),
        "best_val_bpc": best,
        "final_val_bpc": final["val_bpc"],
        "final_val_loss": final["val_loss"],
        "inner_steps": stats["inner_steps"],
        "outer_updates": final["outer_updates"],
        "bytes_sent": stats["bytes_sent"],
        "bytes_inter_region": stats["bytes_inter_region"],
        "peak_payload_bytes": stats["peak_payload_bytes"],
        "utilization": final.get("utilization", stats.get("utilization")),
        "device": str(setup.workload.device),
        # host seconds per inner step (median over compute spans; on CUDA the host runs
        # ahead of the GPU only as far as its launch queue allows, as in nanoGPT's timing)
        "step_time_median_s": statistics.median(per_step),
    }
    for key in ("sim_time_s", "runtime", "dead_processes", "step_time_by_worker_s",
                "bytes_by_host", "peak_link_gbps_by_link"):
        if key in stats:
            s[key] = stats[key]
    if "val_bpc_stderr" in final:
        s["final_val_bpc_stderr"] = final["val_bpc_stderr"]
    for key in ("staleness_mean", "staleness_max", "replica_spread", "peak_link_gbps"):
        if key in final:
            s[key] = final[key]
    return s


def write_outputs(out, cfg, setup, params, summary, recorder, spans: list[dict]) -> None:
    wl = setup.workload
    save_checkpoint(out, params, cfg, setup.corpus.tokenizer.chars,
                    {"workload": cfg.workload.name, "tokens": summary["tokens"],
                     "final_val_bpc": summary["final_val_bpc"]})
    started = time.perf_counter()
    result = wl.sample(params, cfg.sample.prompt, cfg.sample.chars,
                       torch.Generator().manual_seed(cfg.sample.seed))
    summary["sample_steps_per_char"] = result.steps_per_char
    summary["sample_s"] = round(time.perf_counter() - started, 3)
    header = (f"# {cfg.workload.name}, {summary['tokens']} tokens, final val "
              f"{'<= ' if 'final_val_bpc_stderr' in summary else ''}{summary['final_val_bpc']:.4f} bpc, "
              f"{result.steps_per_char:.3f} model steps per character\n\n")
    atomic_write(out / "samples.txt", header + result.text + "\n")
    atomic_write(out / "timeline.json", json.dumps(spans))
    report.plot_run(out, recorder.evals, spans, recorder.label or cfg.algorithm.name)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
