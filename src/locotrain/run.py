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
from .runtime.engine import Engine
from .setup import build, pick_device


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


def engine_for(cfg: Config) -> Engine:
    engine = Engine("sequential" if cfg.runtime.engine == "sequential" else "batched")
    if cfg.train.compile and pick_device(cfg.train.device).type == "cuda":
        engine.compile()
    return engine


def simulate(cfg: Config, out: Path | None = None, *, force: bool = False, quiet: bool = True,
             label: str = "") -> Result:
    """Train on the simulated cluster; write the run folder if `out` is given."""
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine, out, force=force, quiet=quiet, label=label)
    engine.start()
    sim.start()
    sim.runtime.run()
    return sim.finish()


class Simulation:
    """One simulated run, in three steps so that several can share one engine (`loco
    sweep`): register its workers with the engine (here), `start` once the engine has
    allocated them, drive `runtime.events()` (or `runtime.run()`), then `finish`."""

    def __init__(self, cfg: Config, engine: Engine, out: Path | None = None, *,
                 force: bool = False, quiet: bool = True, label: str = ""):
        self.cfg, self.engine, self.out, self.label = cfg, engine, out, label
        self.setup = setup = build(cfg)
        if out is not None:
            prepare_out_dir(out, force)
            atomic_write(out / "config.toml", to_toml(cfg))
        torch.manual_seed(cfg.train.seed)
        wl, job = setup.workload, setup.job
        self.params0 = wl.init_params(cfg.train.seed)
        shards = make_shards(setup.corpus.train.to(wl.device), job.M, cfg.data.shards,
                             wl.window, cfg.train.seed)
        if cfg.train.compile and wl.device.type == "cuda":
            wl.compile()
        self.rows = [engine.add_worker(w.index, wl, self.params0, shards[w.index], w.batch_size,
                                       cfg.train, job.planned_steps) for w in job.workers]
        self.recorder = Recorder(wl, job.param_names, cfg.train.tokens, cfg.eval.every,
                                 cfg.eval.windows, out / "metrics.jsonl" if out else None,
                                 label=label or cfg.algorithm.name, quiet=quiet)
        self.runtime: SimRuntime | None = None

    def start(self) -> None:
        job = self.setup.job
        self.runtime = SimRuntime(self.setup.cluster, job, self.setup.algorithm, self.engine,
                                  self.rows, self.recorder,
                                  [self.params0[n] for n in job.param_names], seed=self.cfg.train.seed)

    def finish(self) -> Result:
        cfg, setup, recorder = self.cfg, self.setup, self.recorder
        final = recorder.finish()
        chunks = [sec / n for w, n, sec in self.engine.chunks]
        stats = self.runtime.stats() | {"wall_per_step": chunks}
        summary = summarize(cfg, setup, recorder, final, stats, recorder.elapsed())
        final_params = dict(zip(setup.job.param_names, recorder.last[0]))
        if self.out is not None:
            write_outputs(self.out, cfg, setup, final_params, summary, recorder,
                          self.runtime.timeline())
        return Result(summary, final_params, self.runtime, recorder.evals)
