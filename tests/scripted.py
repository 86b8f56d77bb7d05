"""A scripted runtime for tests: runs an algorithm's processes as plain generators, with no
clock, no network and no model, so that each algorithm's arithmetic can be checked against
hand-computed expectations.

What the script decides, instead of a model and a network:

* `train(worker, steps, params, progress, progress_end)`: what `steps` inner steps do to the
  worker's parameters (default: every step subtracts the worker's canned `drift` vector,
  i.e. phi <- phi - drift_m per step); returns the summed loss.
* `gradients(worker, params)`: what `ctx.gradients()` returns (canned per worker).
* `yield ctx.apply(grads)`: plain SGD with learning rate 1, p <- p - g, so the effect is exact.
* all-reduce: the plain mean of the contributions in rank order (or `reduce(parts)`).
* messages: delivered in the order sent; a receive with a timeout returns None only when
  every process is blocked.

Everything a process yields or calls is recorded in `log` as (process name, kind, details),
with tensors cloned at the moment of the call.
"""

from __future__ import annotations

from collections import deque

import torch

from locotrain.runtime.api import (Apply, Context, Gradients, Handle, Message, Recv, ServerStep,
                                   Train, Wait)


class ScriptedContext(Context):
    def __init__(self, script: "Script", name: str, worker: int | None):
        self._s = script
        self.name, self.worker = name, worker
        self.params = script.params[worker] if worker is not None else {}

    def initial_params(self):
        return [t.clone() for t in self._s.params0]

    def now(self):
        return float(self._s.ticks)

    def reset_optimizer(self):
        self._s.record(self.name, "reset_optimizer", None)

    def start_all_reduce(self, tensors, codec, group=None):
        return self._s.join(self, tensors, group)

    def participants(self):  # a scripted group never loses a member
        return tuple(range(self._s.job.M))

    def form_groups(self, groups):
        self._s.record(self.name, "form_groups", [tuple(g) for g in groups])

    def send(self, dst, tensors, codec, meta=None):
        msg = Message(self.name, [t.clone() for t in tensors], dict(meta or {}), self.now())
        self._s.record(self.name, "send", (dst, msg))
        self._s.mailboxes[dst].append(msg)
        handle = Handle("send", done=True)
        return handle

    def publish(self, params, tokens, updates):
        self._s.record(self.name, "publish", ([p.clone() for p in params], tokens, updates))

    def record_staleness(self, staleness):
        self._s.record(self.name, "staleness", staleness)

    def record_replica(self, params):
        self._s.record(self.name, "replica", [p.clone() for p in params])

    def log(self, text):
        self._s.record(self.name, "log", text)


class Script:
    def __init__(self, algorithm, params0: list[torch.Tensor], drift=None, train=None,
                 gradients=None, reduce=None):
        job = algorithm.job
        self.job = job
        self.params0 = [t.clone() for t in params0]
        self.params = {w.index: {n: t.clone() for n, t in zip(job.param_names, params0)}
                       for w in job.workers}
        self.drift = drift  # worker -> list of tensors subtracted per inner step
        self._train = train or self._drift
        self._gradients = gradients
        self._reduce = reduce or (lambda parts: [sum(ts) / len(ts) for ts in zip(*parts)])
        self.log: list[tuple[str, str, object]] = []
        self.ticks = 0
        self.procs = algorithm.processes()
        self.mailboxes = {p.name: deque() for p in self.procs}
        self._collectives: dict[tuple, dict] = {}
        self._joined: dict[str, int] = {}

    # -- what the script does instead of a model --------------------------------------
    def _drift(self, worker, steps, params, progress, progress_end):
        with torch.no_grad():
            for p, d in zip(params.values(), self.drift[worker]):
                p.sub_(steps * d)
        return torch.tensor(float(steps))

    def record(self, name, kind, details):
        self.log.append((name, kind, details))

    def join(self, ctx: ScriptedContext, tensors, group=None) -> Handle:
        members = tuple(range(self.job.M)) if group is None else tuple(sorted(group))
        index = self._joined.get((ctx.name, members), 0)
        self._joined[(ctx.name, members)] = index + 1
        coll = self._collectives.setdefault((members, index), {"parts": {}, "handles": []})
        coll["parts"][ctx.worker] = [t.detach().clone() for t in tensors]
        self.record(ctx.name, "all_reduce", coll["parts"][ctx.worker])
        handle = Handle("all_reduce")
        coll["handles"].append(handle)
        if len(coll["parts"]) == len(members):
            mean = self._reduce([coll["parts"][m] for m in sorted(coll["parts"])])
            for h in coll["handles"]:
                h.done, h.result = True, [t.clone() for t in mean]
        return handle

    # -- driving ------------------------------------------------------------------------
    def run(self) -> "Script":
        gens = {p.name: p.run(ScriptedContext(self, p.name, p.worker)) for p in self.procs}
        blocked: dict[str, object] = {}  # process -> what it waits for
        ready = deque((p.name, None) for p in self.procs)
        while ready or blocked:
            if not ready:
                timed = [n for n, op in blocked.items() if isinstance(op, Recv) and op.timeout is not None]
                if not timed:
                    raise RuntimeError(f"scripted run deadlocked: {blocked}")
                ready.append((timed[0], None))
                del blocked[timed[0]]
            name, value = ready.popleft()
            self.ticks += 1
            while True:
                try:
                    op = gens[name].send(value)
                except StopIteration:
                    break
                value, waiting = self._execute(name, op)
                if waiting:
                    blocked[name] = op
                    break
            for other, op in list(blocked.items()):
                value, waiting = self._poll(other, op)
                if not waiting:
                    del blocked[other]
                    ready.append((other, value))
        return self

    def _execute(self, name, op):
        worker = next(p.worker for p in self.procs if p.name == name)
        if isinstance(op, Train):
            self.record(name, "train", (op.steps, op.progress, op.progress_end, op.batch_size))
            return self._train(worker, op.steps, self.params[worker], op.progress,
                               op.progress_end), False
        if isinstance(op, Gradients):
            grads = [g.clone() for g in self._gradients[worker]]
            self.record(name, "gradients", grads)
            return grads, False
        if isinstance(op, Apply):
            self.record(name, "apply", [g.clone() for g in op.grads])
            with torch.no_grad():
                for p, g in zip(self.params[worker].values(), op.grads):
                    p.sub_(g)
            return None, False
        if isinstance(op, ServerStep):
            return None, False
        return self._poll(name, op)

    def _poll(self, name, op):
        if isinstance(op, Wait):
            return (op.handle.result, False) if op.handle.done else (None, True)
        if isinstance(op, Recv):
            box = self.mailboxes[name]
            for i, msg in enumerate(box):
                if op.src is None or msg.src == op.src:
                    del box[i]
                    return msg, False
            return None, True
        raise TypeError(f"{name} yielded {op!r}")

    # -- reading the log ----------------------------------------------------------------
    def calls(self, name: str, kind: str) -> list:
        return [d for n, k, d in self.log if n == name and k == kind]
