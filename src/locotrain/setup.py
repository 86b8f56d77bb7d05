"""Everything a run needs, built from the config, with every check a user can trip done up
front: corpus, workload, modelled cluster, the job description and the algorithm. Both
runtimes' callers (run.py for the simulator, distributed.py for real processes) start here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithms import build_algorithm
from .cluster import Cluster
from .codecs import make_codec
from .config import Config
from .data import Corpus, load_corpus
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
    settings = cfg.algorithm.settings
    codec = make_codec(settings.codec, settings.codec_block)  # fail early on a bad codec
    if cfg.cluster.allreduce == "hierarchical" and not codec.lossless:
        raise UserError("cluster.allreduce = 'hierarchical' models fp32 all-reduces only; "
                        "use algorithm.codec = 'fp32' or cluster.allreduce = 'ring'")
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
    algorithm = build_algorithm(cfg.algorithm.name, settings, job)
    return Setup(cfg, corpus, workload, cluster, job, algorithm)


