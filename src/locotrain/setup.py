"""Everything a run needs, built from the config, with every check a user can trip done up
front: corpus, workload, modelled cluster, the job description and the algorithm. Both
runtimes' callers (run.py for the simulator, distributed.py for real processes) start here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .algorithms import build_algorithm
from .cluster import Cluster
from .codecs import make_codec
from .config import Config
from .data import Corpus, check_content, load_corpus
from .errors import UserError
from .runtime.api import Job, WorkerInfo
from .workloads import Workload, build_workload


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class Setup:
    cfg: Config
    corpus: Corpus | None  # None for a phantom workload (planner/phantom.py)
    workload: Workload
    cluster: Cluster
    job: Job
    algorithm: object


def build(cfg: Config, workload=None) -> Setup:
    """Everything a run needs, with every user-facing check done up front. A given
    `workload` (a plan's phantom, planner/phantom.py) stands in for the config's: no corpus
    is read."""
    corpus = None
    if workload is None:
        device = pick_device(cfg.train.device)
        corpus = load_corpus(cfg.data.path, cfg.data.train_fraction)
        check_content(corpus, cfg.data.sha256, cfg.data.chars)
        # the resolved config (a run's config.toml) records the text trained on
        cfg.data.sha256, cfg.data.chars = corpus.sha256, corpus.chars
    cluster = Cluster(cfg.cluster, cfg.train.batch_size)
    if workload is None:
        check_seq_len(cfg.model.seq_len, corpus, cluster.M)
        workload = build_workload(cfg, corpus, device)
    settings = cfg.algorithm.settings
    check_outer_optimizer(settings)
    codec = make_codec(settings.codec, settings.codec_block)  # fail early on a bad codec
    if cfg.cluster.allreduce == "hierarchical" and not codec.lossless:
        raise UserError("cluster.allreduce = 'hierarchical' models fp32 all-reduces only; "
                        "use algorithm.codec = 'fp32' or cluster.allreduce = 'ring'")
    names = list(workload.spec.param_shapes())
    step_times = [cluster.step_time(w.index, workload.spec.flops_per_token(), workload.spec.seq_len)
                  for w in cluster.workers]
    job = Job(
        workers=[WorkerInfo(w.index, w.region, w.speed, w.batch_size, step_times[w.index],
                            join_s=w.join_s)
                 for w in cluster.workers],
        regions=cluster.regions, param_names=names,
        param_shapes=[workload.spec.param_shapes()[n] for n in names],
        total_tokens=cfg.train.tokens, seq_len=workload.spec.seq_len,
        depth=getattr(workload, "depth", cfg.model.depth),
    )
    algorithm = build_algorithm(cfg.algorithm.name, settings, job)
    if (algorithm.synchronous and not algorithm.heals
            and (cluster.crashes_that_drop() or any(w.join_s for w in job.workers))):
        raise UserError(f"{cfg.algorithm.name} waits for crashed workers: use cluster.on_crash "
                        "= \"wait\" and no mid-run joins (join_s); the group re-forms around "
                        "crashes and joins with ddp and diloco, and the parameter-server "
                        "algorithms (async_local_sgd, halos) carry on without the worker")
    # Rounds bind synchronous algorithms only: an asynchronous worker's last task is cut to
    # the budget, and the fastest worker runs more steps than the average.
    check_budget(job, getattr(settings, "H", None) if algorithm.synchronous else None)
    return Setup(cfg, corpus, workload, cluster, job, algorithm)


MIN_VAL_WINDOWS = 16  # fewer make the validation loss too noisy to compare runs by


def check_seq_len(seq_len: int, corpus: Corpus, workers: int) -> None:
    """Windows of seq_len + 1 characters: MIN_VAL_WINDOWS of them in the validation text,
    and at least one in every worker's training shard (data.make_shards)."""
    longest = min(len(corpus.val) // MIN_VAL_WINDOWS, len(corpus.train) // workers) - 1
    if seq_len > longest:
        fix = (f"the largest model.seq_len that works is {longest}" if longest > 0 else
               "use a longer text")
        raise UserError(
            f"model.seq_len = {seq_len} is too long for corpus '{corpus.name}' (its "
            f"{len(corpus.val):,} validation characters must hold {MIN_VAL_WINDOWS} windows, its "
            f"{len(corpus.train):,} training characters one per worker for {workers}); {fix}")


def check_outer_optimizer(settings) -> None:
    """The outer (or server) optimizers' settings, found by name in every algorithm's
    settings: outer_lr, local_lr, global_lr, outer_momentum, anchor_momentum, ..."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name.endswith("lr") and not value > 0:
            raise UserError(f"algorithm.{f.name} must be > 0, got {value}")
        if f.name.endswith("momentum") and not 0 <= value < 1:
            raise UserError(f"algorithm.{f.name} must be in [0, 1), got {value}")


def check_budget(job: Job, H: int | None) -> None:
    """train.tokens must pay for one inner step of every worker and, for algorithms with
    rounds of H steps, one round: a smaller budget silently trained a whole step or round."""
    per_step = sum(job.tokens_per_step(w.index) for w in job.workers)
    if job.total_tokens < per_step:
        raise UserError(f"train.tokens = {job.total_tokens:,} is less than one inner step of all "
                        f"{job.M} worker(s) ({per_step:,} tokens: batch size x model.seq_len "
                        f"each); set train.tokens >= {per_step}")
    if H is not None and H > job.planned_steps:
        raise UserError(f"algorithm.H = {H}, but the run has {job.planned_steps} inner steps per "
                        f"worker (train.tokens = {job.total_tokens:,} at {per_step:,} per step of "
                        f"all workers); set algorithm.H <= {job.planned_steps} or train.tokens >= "
                        f"{H * per_step}")


