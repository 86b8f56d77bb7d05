"""The bandwidth tables `loco plan` reproduces, as the papers print them (Gbit/s at which
compute utilisation reaches 50/80/90/95/99%), and which of our plan variants each column is.

* Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), Table 4: H = 100, fragments of
  3 layers, step times from Kaplan FLOPs at 60% MFU (docs/algorithms.md section 2.6).
* Eager updates (Kale, Douillard, Donchev 2025, arXiv 2502.12996), Table 5: 1-outer-step
  overlapped FP4, H = 30 and 100 (docs/algorithms.md section 3.3).

The papers' own simulator is not public; docs/planner.md sets ours against these numbers.
"""

from __future__ import annotations

TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)

# (parameters, layers, seconds per step) -> the model's row label
MODELS = {(1e9, 24, 0.1): "1B", (10e9, 48, 0.8): "10B", (100e9, 108, 4.9): "100B"}

TABLES = {
    "1B": {
        "Data-Parallel": (86.8, 152.6, 184.2, 222.3, 569.0),
        "DiLoCo": (1.4, 6.2, 13.3, 23.3, 86.8),
        "Streaming": (1.4, 5.2, 9.1, 16.0, 28.1),
        "+ overlap": (1.4, 4.3, 6.2, 9.1, 11.0),
        "+ overlap + FP4": (0.4, 0.9, 1.7, 2.0, 3.0),
        "eager H=30": (1.1, 2.0, 2.0, 2.0, 2.4),
        "eager H=100": (0.1, 0.2, 0.2, 0.2, 0.2),
    },
    "10B": {
        "Data-Parallel": (104.8, 222.3, 222.3, 268.3, 471.5),
        "DiLoCo": (1.7, 7.5, 16.0, 33.9, 104.8),
        "Streaming": (1.7, 5.2, 9.1, 13.3, 19.3),
        "+ overlap": (1.7, 3.6, 5.2, 6.2, 7.5),
        "+ overlap + FP4": (0.4, 0.9, 1.4, 1.4, 1.7),
        "eager H=30": (0.7, 1.1, 1.4, 1.4, 1.4),
        "eager H=100": (0.1, 0.2, 0.2, 0.3, 0.3),
    },
    "100B": {
        "Data-Parallel": (184.2, 323.8, 390.7, 390.7, 471.5),
        "DiLoCo": (3.0, 11.0, 23.3, 49.4, 184.2),
        "Streaming": (2.4, 6.2, 9.1, 11.0, 19.3),
        "+ overlap": (1.7, 3.6, 4.3, 5.2, 5.2),
        "+ overlap + FP4": (0.5, 0.9, 1.1, 1.1, 1.4),
        "eager H=30": (0.5, 0.8, 0.9, 0.9, 0.9),
        "eager H=100": (0.2, 0.3, 0.3, 0.3, 0.4),
    },
}


def model_row(cfg) -> str | None:
    """The papers' row this config plans, if it is one of theirs."""
    key = (cfg.phantom.params, cfg.phantom.layers, cfg.cluster.step_time_s)
    return MODELS.get(key)


def column(cfg) -> str | None:
    """The papers' column a plan variant is, from its resolved settings."""
    s, name = cfg.algorithm.settings, cfg.algorithm.name
    fp4 = s.codec == "fp4"
    if name == "ddp" and not fp4:
        return "Data-Parallel"
    if name == "diloco" and not fp4:
        return "DiLoCo"
    if name == "streaming":
        if s.tau == 0:
            return None if fp4 else "Streaming"
        return "+ overlap + FP4" if fp4 else "+ overlap"
    if name == "eager" and fp4 and s.mode == "eager" and s.H in (30, 100):
        return f"eager H={s.H}"
    return None


def paper_value(cfg, target: float) -> float | None:
    row, col = model_row(cfg), column(cfg)
    if row is None or col is None or target not in TARGETS:
        return None
    return TABLES[row][col][TARGETS.index(target)]
