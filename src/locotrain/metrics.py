"""The event log of a run: evaluations when due, training-loss bookkeeping, a progress bar,
and atomic file writes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from .files import atomic_write


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

    Progress goes to `stream` (stderr by default): on a terminal a bar for training and one
    for the final evaluation (windows done / total); otherwise (a log piped to a file) one
    plain line per evaluation, and during a long final evaluation a line every
    `progress_every_s` seconds. `quiet` prints nothing.
    """

    def __init__(self, workload, param_names: list[str], total_tokens: int, every: int,
                 windows: int, metrics_path: Path | None, label: str = "", quiet: bool = False,
                 *, stream: TextIO | None = None, progress_every_s: float = 30.0):
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
        self.tokens_trained = 0
        self.quiet = quiet
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.progress_every_s = progress_every_s
        self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=label or None,
                        disable=quiet or not self.tty, dynamic_ncols=True, leave=True,
                        file=self.stream)

    # -- hooks the runtimes call ------------------------------------------------------
    def on_train(self, tokens: int, steps: int, loss: torch.Tensor) -> None:
        self.bar.update(tokens)
        self.tokens_trained += tokens
        self.loss_sum = loss.detach() if self.loss_sum is None else self.loss_sum + loss.detach()
        self.loss_steps += steps

    def advance_to(self, tokens: int) -> None:
        """Move the bar to `tokens` in all (a real run's rank that publishes sees every
        worker's tokens only through the model it publishes)."""
        self.bar.update(max(0, tokens - self.bar.n))

    def publish(self, params, tokens: int, updates: int, snapshot) -> None:
        self.last = (params, tokens, updates, snapshot)
        if tokens >= self.next_eval:
            self._evaluate(params, tokens, updates, snapshot(), final=False)
            self.next_eval = (tokens // self.every + 1) * self.every

    def log(self, text: str) -> None:
        self.logs.append(text)
        self._write({"event": "log", "time_s": self.elapsed(), "text": text})
        if self.quiet:
            return
        if self.tty:
            self.bar.write(text)
        else:
            print(text, flush=True)

    # -- evaluation -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _evaluate(self, params, tokens, updates, stats: dict, final: bool) -> dict:
        named = dict(zip(self.names, params))
        if final and not self.quiet:
            result = self._final_evaluation(named)
        else:
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
        if not self.quiet and not self.tty:
            self._say(self._eval_line(line, result.is_bound))
        return line

    def _eval_line(self, line: dict, bound: bool) -> str:
        """One plain progress line: tokens, validation bpc (on how many windows), elapsed."""
        bpc = f"{line['val_bpc']:.3f}"
        if bound:
            bpc = f"<= {bpc} +- {line.get('val_bpc_stderr', 0.0):.3f}"
        prefix = f"{self.label}: " if self.label else ""
        if line.get("final"):
            where = f"final, {line['tokens']:,} tokens"
            windows = f"all {line['windows']} windows"
        else:
            pct = 100 * line["tokens"] / max(1, self.total)
            where = f"{line['tokens']:,}/{self.total:,} tokens ({pct:.0f}%)"
            windows = f"{line['windows']} windows"
        return f"{prefix}{where}, val {bpc} bpc on {windows}, {self.elapsed():.1f} s elapsed"

    def _final_evaluation(self, named: dict):
        """The final evaluation (every window; minutes for the diffusion model) with its own
        progress: a bar on a terminal, else a line every `progress_every_s` seconds."""
        desc = f"{self.label} final eval" if self.label else "final eval"
        bar = tqdm(total=None, unit="win", desc=desc, disable=not self.tty, dynamic_ncols=True,
                   leave=True, file=self.stream)
        started = last = time.perf_counter()

        def progress(done: int, total: int) -> None:
            nonlocal last
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            now = time.perf_counter()
            if not self.tty and now - last >= self.progress_every_s and 0 < done < total:
                last = now
                self._say(f"{desc}: {done}/{total} windows ({100 * done // max(1, total)}%), "
                          f"{now - started:.0f} s")

        try:
            return evaluate_with_progress(self.workload, named, 0, progress)
        finally:
            bar.close()

    def finish(self) -> dict:
        """Evaluate the last published model on every validation window."""
        self.bar.close()
        if self.last is None:
            raise RuntimeError("the algorithm never published a global model")
        params, tokens, updates, snapshot = self.last
        return self._evaluate(params, tokens, updates, snapshot(), final=True)

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        """What a resumed run needs to carry on recording (run.py's checkpoints)."""
        loss = None if self.loss_sum is None else float(self.loss_sum)
        return {"evals": self.evals, "logs": self.logs, "next_eval": self.next_eval,
                "loss_sum": loss, "loss_steps": self.loss_steps, "tokens": self.tokens_trained}

    def load_state(self, state: dict) -> None:
        self.evals, self.logs, self.next_eval = state["evals"], state["logs"], state["next_eval"]
        self.loss_sum = None if state["loss_sum"] is None else torch.tensor(state["loss_sum"])
        self.loss_steps = state["loss_steps"]
        self.tokens_trained = state["tokens"]
        self.bar.update(state["tokens"])

    def _write(self, obj: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(obj) + "\n")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def evaluate_with_progress(workload, named: dict, limit: int,
                           progress: Callable[[int, int], None]):
    """`workload.evaluate(named, limit)`, calling `progress(windows_done, windows_total)` as
    it goes."""
    result = workload.evaluate(named, limit=limit, progress=progress)
    progress(result.windows, result.windows)
    return result
