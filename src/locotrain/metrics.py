"""The event log of a run: evaluations when due, training-loss bookkeeping, a progress bar,
and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replica_spread(replicas: list[torch.Tensor]) -> float:
    """How far replicas of one model drift apart: the RMS distance of the flat replicas from
    their mean, relative to the mean's norm (0 when all agree)."""
    stacked = torch.stack([r.double() for r in replicas])
    mean = stacked.mean(0)
    rms = (stacked - mean).pow(2).sum(1).mean().sqrt()
    return (rms / mean.norm().clamp_min(1e-30)).item()


class Recorder:
    """Evaluates the published global model when an evaluation is due and logs it.

    Evaluations are due every `every` training tokens (summed over workers), at the first
    publication at or past each multiple, so runs of different algorithms line up at equal
    tokens. The final evaluation always uses every validation window.
    """

    def __init__(self, workload, param_names: list[str], total_tokens: int, every: int,
                 windows: int, metrics_path: Path | None, label: str = "", quiet: bool = False):
        self.workload = workload
        self.names = param_names
        self.total = total_tokens
        self.every = every or max(1, total_tokens // 10)
        self.windows = windows
        self.path = metrics_path
        self.next_eval = 0
        self.t0 = time.perf_counter()
        self.last = None
        self.evals: list[dict] = []
        self.logs: list[str] = []
        self.loss_sum = None
        self.loss_steps = 0
        self.quiet = quiet
        self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=label or None,
                        disable=quiet, dynamic_ncols=True, leave=True)

    # -- hooks the runtimes call ------------------------------------------------------
    def on_train(self, tokens: int, steps: int, loss: torch.Tensor) -> None:
        self.bar.update(tokens)
        self.loss_sum = loss.detach() if self.loss_sum is None else self.loss_sum + loss.detach()
        self.loss_steps += steps

    def publish(self, params, tokens: int, updates: int, snapshot) -> None:
        self.last = (params, tokens, updates, snapshot)
        if tokens >= self.next_eval:
            self._evaluate(params, tokens, updates, snapshot(), final=False)
            self.next_eval = (tokens // self.every + 1) * self.every

    def log(self, text: str) -> None:
        self.logs.append(text)
        self._write({"event": "log", "time_s": self.elapsed(), "text": text})
        if not self.quiet:
            self.bar.write(text)

    # -- evaluation -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _evaluate(self, params, tokens, updates, stats: dict, final: bool) -> dict:
        named = dict(zip(self.names, params))
        result = self.workload.evaluate(named, limit=0 if final else self.windows)
        line = {"event": "eval", "step": stats.pop("step", updates), "tokens": int(tokens),
                "time_s": round(self.elapsed(), 3), "val_loss": result.val_loss,
                "val_bpc": result.val_bpc}
        if result.is_bound:
            line["val_bpc_stderr"] = result.stderr_bpc
        if self.loss_steps:
            line["train_loss"] = (self.loss_sum / self.loss_steps).item()
            self.loss_sum, self.loss_steps = None, 0
        line["outer_updates"] = int(updates)
        line |= stats
        line["windows"] = result.windows
        if final:
            line["final"] = True
        self.evals.append(line)
        self._write(line)
        shown = ("<= " if result.is_bound else "") + f"{result.val_bpc:.3f}"
        self.bar.set_postfix_str(f"val {shown} bpc", refresh=False)
        return line

    def finish(self) -> dict:
        """Evaluate the last published model on every validation window."""
        self.bar.close()
        if self.last is None:
            raise RuntimeError("the algorithm never published a global model")
        params, tokens, updates, snapshot = self.last
        return self._evaluate(params, tokens, updates, snapshot(), final=True)

    def _write(self, obj: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(obj) + "\n")
