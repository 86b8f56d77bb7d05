"""The event log of a run: evaluations when due, training-loss bookkeeping, a progress bar,
and atomic file writes; and the queue that evaluates the models of many runs together."""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(eq=False)
class Due:
    """An evaluation that fell due: what was known at that point of the run, and its result
    and metrics line once it is computed."""
    step: int
    tokens: int
    updates: int
    stats: dict
    train_loss: torch.Tensor | None  # mean training loss since the last evaluation
    final: bool
    time_s: float
    result: object = None  # the workload's EvalResult
    line: dict | None = None


class Recorder:
    """Evaluates the published global model when an evaluation is due and logs it.

    Evaluations are due every `every` training tokens (summed over workers), at the first
    publication at or past each multiple, so runs of different algorithms line up at equal
    tokens. The final evaluation always uses every validation window.

    By default an evaluation runs when it falls due. A recorder that `defer_to`s an
    EvalQueue instead keeps a copy of the model and lets the queue evaluate it later, together
    with other runs' models; the metrics lines still go out in the order they fell due (a
    log line waits behind an evaluation still queued). Deferring is safe because nothing in a
    run reads an evaluation's result before the run ends, except a checkpoint, which first
    evaluates whatever is queued (`state`).

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
        self.queue: EvalQueue | None = None
        self.outbox: deque = deque()  # metrics lines (dicts) and evaluations (Due), in order
        self.final: Due | None = None

    def defer_to(self, queue: EvalQueue) -> None:
        """Evaluate through `queue` from now on (`loco sweep`)."""
        self.queue = queue

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
        self.outbox.append({"event": "log", "time_s": self.elapsed(), "text": text})
        self._drain()
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

    def _evaluate(self, params, tokens, updates, stats: dict, final: bool) -> Due:
        """Evaluate now, or queue a copy of the model when deferring; either way the line
        goes out once every line before it has."""
        due = self._due(tokens, updates, stats, final)
        named = dict(zip(self.names, params))
        limit = 0 if final else self.windows
        self.outbox.append(due)
        if self.queue is not None:  # the model changes in place as the run goes on: a copy
            self.queue.add(self, {n: p.detach().clone() for n, p in named.items()}, limit, due)
        else:
            if final and not self.quiet:
                due.result = self._final_evaluation(named)
            else:
                due.result = self.workload.evaluate(named, limit=limit)
            due.time_s = round(self.elapsed(), 3)  # including the evaluation, as it always was
        self._drain()
        return due

    def _due(self, tokens, updates, stats: dict, final: bool) -> Due:
        """What the metrics line needs from this point of the run: the counters, the
        runtime's snapshot and the training loss since the last evaluation (a tensor: no
        device sync until the line is written)."""
        train_loss = None
        if self.loss_steps:
            train_loss = self.loss_sum / self.loss_steps
            self.loss_sum, self.loss_steps = None, 0
        return Due(stats.pop("step", updates), int(tokens), int(updates), stats, train_loss,
                   final, round(self.elapsed(), 3))

    def _drain(self) -> None:
        """Write every line at the front of the outbox whose evaluation is done."""
        while self.outbox and _ready(self.outbox[0]):
            item = self.outbox.popleft()
            if isinstance(item, Due):
                self._record(item)
            else:
                self._write(item)

    def _record(self, due: Due) -> None:
        result = due.result
        line = {"event": "eval", "step": due.step, "tokens": due.tokens, "time_s": due.time_s,
                "val_loss": result.val_loss, "val_bpc": result.val_bpc}
        if result.is_bound:
            line["val_bpc_stderr"] = result.stderr_bpc
        if due.train_loss is not None:
            line["train_loss"] = due.train_loss.item()
        line["outer_updates"] = due.updates
        line |= due.stats
        line["windows"] = result.windows
        if due.final:
            line["final"] = True
        due.line = line
        self.evals.append(line)
        self._write(line)
        shown = ("<= " if result.is_bound else "") + f"{result.val_bpc:.3f}"
        self.bar.set_postfix_str(f"val {shown} bpc", refresh=False)
        if not self.quiet and not self.tty:
            self._say(self._eval_line(line, result.is_bound))

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

    def queue_final(self) -> None:
        """The run is over: the final evaluation of the last published model falls due (with
        a queue, it waits there for other runs' models)."""
        if self.last is None:
            raise RuntimeError("the algorithm never published a global model")
        params, tokens, updates, snapshot = self.last
        self.final = self._evaluate(params, tokens, updates, snapshot(), final=True)

    @property
    def final_done(self) -> bool:
        return self.final is not None and self.final.line is not None

    def finish(self) -> dict:
        """Evaluate the last published model on every validation window; its metrics line."""
        self.bar.close()
        if self.final is None:
            self.queue_final()
        if not self.final_done:
            self.queue.flush()
        return self.final.line

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        """What a resumed run needs to carry on recording (run.py's checkpoints): every
        evaluation due so far, so the queued ones run now."""
        if self.outbox and self.queue is not None:
            self.queue.flush()
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


class EvalQueue:
    """Evaluations of the global models of many runs (`loco sweep`), deferred and run in
    batches: models of the same shape and evaluation settings go through one stacked
    computation (Workload.evaluate_many), as the engine stacks workers' training.

    Each queued evaluation holds a copy of its model, so the queue evaluates as soon as it
    holds `cap` models: memory stays at `cap` model copies (runtime.eval_batch)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.waiting: list[tuple[Recorder, dict, int, Due]] = []

    def add(self, recorder: Recorder, named: dict, limit: int, due: Due) -> None:
        self.waiting.append((recorder, named, limit, due))
        if len(self.waiting) >= self.cap:
            self.flush()

    def flush(self) -> None:
        """Evaluate everything queued; then each recorder writes the lines that were waiting."""
        waiting, self.waiting = self.waiting, []
        for group in _compatible(waiting):
            for start in range(0, len(group), self.cap):
                part = group[start:start + self.cap]
                workload, limit = part[0][0].workload, part[0][2]
                results = workload.evaluate_many([named for _, named, _, _ in part], limit)
                for (_, _, _, due), result in zip(part, results):
                    due.result = result
        for recorder in dict.fromkeys(r for r, _, _, _ in waiting):
            recorder._drain()


def _ready(item) -> bool:
    """A log line is ready at once, an evaluation once it has its result."""
    return not isinstance(item, Due) or item.result is not None


def _compatible(waiting: list) -> list[list]:
    """The queued evaluations in groups that one workload can stack (Workload.eval_key), in
    the order each group first appears."""
    groups: dict[tuple, list] = {}
    for entry in waiting:
        recorder, _, limit, _ = entry
        groups.setdefault(recorder.workload.eval_key(limit), []).append(entry)
    return list(groups.values())


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
