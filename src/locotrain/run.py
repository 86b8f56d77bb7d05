"""One training run end to end: build everything from the config (all checks happen here,
before anything is written), train on the simulated cluster, write the run folder."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report
from .algorithms import build_algorithm
from .checkpoint import save_checkpoint
from .cluster import Cluster
from .codecs import make_codec
from .config import Config, to_toml
from .data import Corpus, load_corpus, make_shards
from .errors import UserError
from .metrics import Recorder, atomic_write
from .runtime.api import Job, WorkerInfo
from .runtime.sim import SimRuntime
from .runtime.worker import WorkerState
from .workloads import Workload, build_workload

RUN_FILES = ["config.toml", "metrics.jsonl", "summary.json", "model.safetensors",
             "checkpoint.json", "samples.txt", "timeline.json", "plots"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class Setup:
    cfg: Config
    corpus: Corpus
    workload: Workload
    cluster: Cluster
    job: Job
    algorithm: object


def build(cfg: Config) -> Setup:
    """Everything a run needs, with every user-facing check done up front."""
    device = pick_device(cfg.train.device)
    corpus = load_corpus(cfg.data.path, cfg.data.train_fraction, min_val_len=cfg.model.seq_len + 1)
    workload = build_workload(cfg, corpus, device)
    cluster = Cluster(cfg.cluster, cfg.train.batch_size)
    make_codec(cfg.algorithm.codec, cfg.algorithm.codec_block)  # fail early on a bad codec
    names = list(workload.spec.param_shapes())
    step_times = [cluster.step_time(w.index, workload.spec.flops_per_token(), workload.spec.seq_len)
                  for w in cluster.workers]
    job = Job(
        workers=[WorkerInfo(w.index, w.region, w.speed, w.batch_size, step_times[w.index])
                 for w in cluster.workers],
        regions=cluster.regions, param_names=names,
        param_shapes=[workload.spec.param_shapes()[n] for n in names],
        total_tokens=cfg.train.tokens, seq_len=cfg.model.seq_len, depth=cfg.model.depth,
    )
    algorithm = build_algorithm(cfg.algorithm, job)
    return Setup(cfg, corpus, workload, cluster, job, algorithm)


def prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder")
    taken = [name for name in RUN_FILES if (out / name).exists()]
    if taken and not force:
        raise UserError(f"output folder '{out}' already holds a run ({taken[0]}); "
                        "pass --force to replace it or choose another --out")
    for name in taken:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class Result:
    summary: dict
    params: dict[str, torch.Tensor]  # the final global model
    runtime: SimRuntime
    evals: list[dict]


def train(cfg: Config, out: Path | None, *, force: bool = False, quiet: bool = False,
          label: str = "") -> dict:
    """Train with the configured algorithm on the simulated cluster. Returns the summary."""
    return simulate(cfg, out, force=force, quiet=quiet, label=label).summary


def simulate(cfg: Config, out: Path | None = None, *, force: bool = False, quiet: bool = True,
             label: str = "") -> Result:
    """Train on the simulated cluster; write the run folder if `out` is given."""
    setup = build(cfg)
    if out is not None:
        prepare_out_dir(out, force)
        atomic_write(out / "config.toml", to_toml(cfg))
    torch.manual_seed(cfg.train.seed)
    wl, cluster, job = setup.workload, setup.cluster, setup.job
    params0 = wl.init_params(cfg.train.seed)
    train_tokens = setup.corpus.train.to(wl.device)
    shards = make_shards(train_tokens, job.M, cfg.data.shards, wl.window, cfg.train.seed)
    if cfg.train.compile and wl.device.type == "cuda":
        wl.compile()
    workers = [WorkerState(w.index, wl, params0, shards[w.index], w.batch_size, cfg.train,
                           job.planned_steps) for w in job.workers]
    recorder = Recorder(wl, job.param_names, cfg.train.tokens, cfg.eval.every, cfg.eval.windows,
                        out / "metrics.jsonl" if out else None,
                        label=label or cfg.algorithm.name, quiet=quiet)
    runtime = SimRuntime(cluster, job, setup.algorithm, workers, recorder,
                         [params0[n] for n in job.param_names], seed=cfg.train.seed)
    runtime.run()
    final = recorder.finish()
    elapsed = recorder.elapsed()
    summary = summarize(cfg, setup, recorder, final, runtime.stats(), elapsed)
    final_params = dict(zip(job.param_names, recorder.last[0]))
    if out is not None:
        write_outputs(out, cfg, setup, final_params, summary, recorder, runtime.timeline())
    return Result(summary, final_params, runtime, recorder.evals)


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
    for key in ("sim_time_s", "runtime", "dead_processes", "step_time_by_worker_s"):
        if key in stats:
            s[key] = stats[key]
    if "val_bpc_stderr" in final:
        s["final_val_bpc_stderr"] = final["val_bpc_stderr"]
    for key in ("staleness_mean", "staleness_max"):
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
    report.plot_run(out, recorder.evals, spans, cfg.algorithm.name)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
