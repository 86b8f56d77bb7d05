"""One file per algorithm. Each builds its processes from the job description and speaks
only the runtime primitives of runtime/api.py."""

from __future__ import annotations

from importlib import import_module

from ..config import ALGORITHMS, AlgorithmConfig
from ..runtime.api import Algorithm, Job

SUMMARIES = {
    "ddp": "data-parallel baseline: all-reduce of gradients every inner step",
    "diloco": "DiLoCo: H inner steps, then outer Nesterov on the mean outer gradient",
    "streaming": "Streaming DiLoCo: fragments synced in turn, overlapped by tau steps, mixed by alpha",
    "eager": "one-outer-step-delay DiLoCo, mode = eager | naive (arXiv 2502.12996)",
    "overlap_local_sgd": "Overlap Local-SGD: pull toward a one-round-stale anchor (Wang et al. 2020)",
    "async_local_sgd": "Async Local-SGD: one parameter server, delayed Nesterov, dynamic local updates",
    "halos": "HALoS: local parameter servers per region and one global server",
}


def build_algorithm(cfg: AlgorithmConfig, job: Job) -> Algorithm:
    module = import_module(f".{cfg.name}", __name__)
    return module.ALGORITHM(cfg, job)


__all__ = ["ALGORITHMS", "SUMMARIES", "build_algorithm"]
