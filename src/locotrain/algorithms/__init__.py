"""One file per algorithm. Each declares the settings it reads (a dataclass next to its code,
`SETTINGS`), builds its processes from the job description (`ALGORITHM`) and speaks only
the runtime primitives of runtime/api.py.

This module imports no algorithm (and no torch) until one is asked for, so `loco list`
and `loco --help` answer at once."""

from __future__ import annotations

from importlib import import_module

SUMMARIES = {
    "ddp": "data-parallel baseline: all-reduce of gradients every inner step",
    "diloco": "DiLoCo: H inner steps, then outer Nesterov on the mean outer gradient",
    "streaming": "Streaming DiLoCo: fragments synced in turn, overlapped by tau steps, mixed by alpha",
    "eager": "one-outer-step-delay DiLoCo, mode = eager | naive (arXiv 2502.12996)",
    "overlap_local_sgd": "Overlap Local-SGD: pull toward a one-round-stale anchor (Wang et al. 2020)",
    "async_local_sgd": "Async Local-SGD: one parameter server, delayed Nesterov, dynamic local updates",
    "halos": "HALoS: local parameter servers per region and one global server",
    "adloco": "AdLoCo: trainers (DiLoCo groups) with norm-test batch growth, merged by batch demand",
    "hierarchical": "hierarchical DiLoCo: data-parallel inside each region, DiLoCo or Streaming DiLoCo across",
}
ALGORITHMS = tuple(SUMMARIES)


def _module(name: str):
    return import_module(f".{name}", __name__)


def settings_class(name: str) -> type:
    """The dataclass of the settings algorithm `name` reads."""
    return _module(name).SETTINGS


def build_algorithm(name: str, settings, job):
    """The algorithm `name` with its settings, for this job (runtime/api.py's Algorithm)."""
    return _module(name).ALGORITHM(settings, job)


__all__ = ["ALGORITHMS", "SUMMARIES", "build_algorithm", "settings_class"]
