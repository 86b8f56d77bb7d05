"""One simulated training run end to end: build everything from the config (setup.py does
every check before anything is written), train on the simulated cluster, write the run
folder (outputs.py); checkpoint it on a schedule or when interrupted, and resume it.

Resuming replays the run up to the checkpoint without arithmetic and puts the checkpointed
tensors back (runtime/snapshot.py says why that is exact), so a resumed run ends with the
same metrics and the same model bytes as one that was never interrupted
(tests/test_resume.py, every algorithm, on the CPU)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_run_state, save_run_state
from .config import Config, load_config, to_toml
from .errors import UserError
from .data import make_shards
from .metrics import Recorder, atomic_write
from .outputs import STATUS, prepare_out_dir, summarize, write_outputs
from .runtime.sim import SimRuntime
from .runtime import snapshot
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
    """Train with the configured algorithm on the simulated cluster, with the thread count
    train.threads asks for (the command line's entry point). Returns the summary."""
    set_threads(cfg)
    return simulate(cfg, out, force=force, quiet=quiet, label=label).summary


def set_threads(cfg: Config) -> None:
    if pick_device(cfg.train.device).type == "cpu":
        torch.set_num_threads(choose_threads(cfg))


def choose_threads(cfg: Config) -> int:
    """train.threads, or the cores the machine is not already busy with (docs/benchmarks.md:
    two threads on two idle cores, one when another program keeps a core busy)."""
    if cfg.train.threads > 0:
        return cfg.train.threads
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - busy_cores(cores) + 0.5)))


def busy_cores(cores: int, interval_s: float = 0.2) -> float:
    """How many cores other programs keep busy now: /proc/stat read twice, `interval_s`
    apart. Not the load average: it lags by a minute or more, so a run started right after
    another one ended saw a core still "busy" and took half the threads (42.5 s for the
    quickstart instead of 29 s). The load average only where there is no /proc/stat."""
    try:
        before = _cpu_times()
        time.sleep(interval_s)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total, idle = after[0] - before[0], after[1] - before[1]
    return cores * (1.0 - idle / total) if total > 0 else 0.0


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


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
    sim.run()
    return sim.finish()


# Settings a resumed run may change: they decide what is measured, not what is computed.
RESUMABLE_CHANGES = ("eval.", "sample.")


def resume(out: Path, overrides: list[str] = (), *, quiet: bool = True) -> Result:
    """Continue the run in `out` from its last checkpoint."""
    out = Path(out)
    tensors, meta = load_run_state(out)
    config_text = (out / "config.toml").read_text(encoding="utf-8")
    if hashlib.sha256(config_text.encode()).hexdigest() != meta["config_sha256"]:
        raise UserError(f"'{out}/config.toml' changed since the checkpoint; restore it, or start "
                        "a new run")
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(RESUMABLE_CHANGES):
            raise UserError(f"loco resume --set {item}: only {', '.join(k + '*' for k in RESUMABLE_CHANGES)} "
                            "may change when resuming (the rest changes what is computed)")
    cfg = load_config(str(out / "config.toml"), list(overrides))[1]
    with open(out / "metrics.jsonl", "r+b") as f:  # drop what was written after the checkpoint
        f.truncate(meta["metrics_bytes"])
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine, out, quiet=quiet, resuming=True)
    engine.start()
    sim.start()
    engine.replaying = True
    sim.runtime.recorder = _Replaying(sim.recorder)
    sim.runtime.replay(meta["sim"], lambda: sim.restore(tensors, meta))
    sim.run()
    result = sim.finish()
    (out / STATUS).unlink(missing_ok=True)  # no longer an interrupted run
    return result


class _Replaying:
    """The recorder while a resumed run replays: it keeps the published model (a replay must
    rebuild it) and records nothing else (the checkpoint holds the metrics so far)."""

    def __init__(self, recorder):
        self.recorder = recorder

    def publish(self, params, tokens, updates, snapshot):
        self.recorder.last = (params, tokens, updates, snapshot)

    def on_train(self, tokens, steps, loss):
        pass

    def log(self, text):
        pass


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after writing its checkpoint."""

    def __init__(self, out: Path | None):
        super().__init__(str(out))
        self.out = out


class Simulation:
    """One simulated run, in three steps so that several can share one engine (`loco
    sweep`): register its workers with the engine (here), `start` once the engine has
    allocated them, drive `runtime.events()` (or `runtime.run()`), then `finish`."""

    def __init__(self, cfg: Config, engine: Engine, out: Path | None = None, *,
                 force: bool = False, quiet: bool = True, label: str = "",
                 resuming: bool = False):
        self.cfg, self.engine, self.out, self.label = cfg, engine, out, label
        self.setup = setup = build(cfg)
        if out is not None and not resuming:
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
        every = cfg.train.checkpoint_every
        self.next_checkpoint = every if every > 0 else None
        self.stop_requested = False

    def start(self) -> None:
        job = self.setup.job
        self.runtime = SimRuntime(self.setup.cluster, job, self.setup.algorithm, self.engine,
                                  self.rows, self.recorder,
                                  [self.params0[n] for n in job.param_names], seed=self.cfg.train.seed)
        if self.out is not None:
            self.runtime.pause = self._pause

    def run(self) -> None:
        """runtime.run(), with SIGINT and SIGTERM asking for a checkpoint at the next event
        (a second signal stops at once)."""
        if threading.current_thread() is not threading.main_thread() or self.out is None:
            return self.runtime.run()

        def ask(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.runtime.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _pause(self, runtime) -> None:
        """After every event: a checkpoint when one is due or a signal asked for it."""
        due = self.next_checkpoint is not None and runtime.tokens >= self.next_checkpoint
        if due or self.stop_requested:
            self.checkpoint()
        if due:
            every = self.cfg.train.checkpoint_every
            self.next_checkpoint = (runtime.tokens // every + 1) * every
        if self.stop_requested:
            raise Interrupted(self.out)

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save everything the run needs to continue: the workers' state (engine), every
        tensor the processes and the messages in flight hold (in the order a replay finds
        them), the metrics so far and the random streams."""
        engine_tensors, engine_meta = self.engine.state(self.rows)
        job_tensors, jobs = self.engine.job_states(self.runtime.unconsumed_jobs())
        walked, sim_meta = self.runtime.checkpoint_state()
        tensors = {f"engine/{k}": v for k, v in engine_tensors.items()}
        tensors |= {f"jobs/{k}": v for k, v in job_tensors.items()}
        tensors |= {f"walk/{i}": t for i, t in enumerate(walked)}
        tensors["rng/torch"] = torch.get_rng_state()
        metrics = self.out / "metrics.jsonl"
        meta = {"events": sim_meta["events"], "sim": sim_meta, "engine": engine_meta, "jobs": jobs,
                "recorder": self.recorder.state(),
                "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
                "config_sha256": hashlib.sha256((self.out / "config.toml").read_bytes()).hexdigest()}
        save_run_state(self.out, tensors, meta)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Called by the replay at the checkpointed event: put the checkpoint back."""
        self.engine.replaying = False
        self.runtime.recorder = self.recorder
        walked = snapshot.tensors_in(self.runtime.roots())
        sim = meta["sim"]
        if snapshot.shapes(walked) != sim["shapes"] or self.runtime.tokens != sim["tokens"]:
            raise UserError(f"cannot resume '{self.out}': the replay did not reach the checkpointed "
                            "state (the algorithm's control flow depends on values it does not "
                            "exchange); start the run again")
        with torch.no_grad():
            for i, t in enumerate(walked):
                t.copy_(tensors[f"walk/{i}"])
        engine = {k.removeprefix("engine/"): v for k, v in tensors.items() if k.startswith("engine/")}
        self.engine.load_state(self.rows, engine, meta["engine"])
        jobs = {k.removeprefix("jobs/"): v for k, v in tensors.items() if k.startswith("jobs/")}
        self.engine.load_job_states(self.runtime.unconsumed_jobs(), jobs, meta["jobs"])
        self.recorder.load_state(meta["recorder"])
        torch.set_rng_state(tensors["rng/torch"])
        self.runtime.replica_spread = sim["replica_spread"]

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
