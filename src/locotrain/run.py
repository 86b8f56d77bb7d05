"""One simulated training run end to end: build everything from the config (setup.py does
every check before anything is written), train on the simulated cluster, write the run
folder (outputs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, to_toml
from .data import make_shards
from .metrics import Recorder, atomic_write
from .outputs import prepare_out_dir, summarize, write_outputs
from .runtime.sim import SimRuntime
from .runtime.worker import WorkerState
from .setup import build


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


