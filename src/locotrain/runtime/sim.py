"""The simulated runtime: every process of an algorithm on one machine, a virtual clock for a
modelled cluster, real arithmetic.

A small hand-written discrete-event loop rather than SimPy. We weighed SimPy (the standard
process-based DES library): its processes and events fit, but the network model needs to
re-time transfers already in flight whenever a flow starts or ends (max-min fair sharing),
and ties must break by (time, process, sequence) so that runs are bit-for-bit repeatable.
Both are a few lines on a heap and awkward through SimPy's interrupts; the loop below is
~150 lines and has no dependency.

Compute is real and deferred: when a worker asks for `n` inner steps at virtual time t, it
resumes at t + the modelled duration, and the steps are a job of runtime/engine.py that runs
by then, batched with whatever other workers' jobs are pending. The loop decides *when*
things happen from the timing model alone, so it never waits for arithmetic to know what
comes next; it needs a job's result only when the worker resumes. This is exact because a
worker's steps read only its own state; everything shared (collectives, messages, servers)
is resolved in virtual-time order.

Plans (planner/, docs/planner.md) run this same loop with two additions:
* phantom compute: the workers' tensors have sizes and no values (planner/phantom.py), the
  engine completes jobs without computing (Engine.phantom), and collectives and messages
  cost their declared sizes' bytes and time while their arithmetic is skipped;
* representatives: identical synchronous workers (same region, speed, batch and device, no
  crash, no jitter) do the same thing at the same virtual times, so one process may stand for
  each class (`representatives`: worker -> copies). All-reduces keep the whole group's M
  (collectives.plan) and the network runs the ring of all copies (network.py); steps,
  tokens, bytes and utilisation count every copy. Only phantom runs of algorithms that
  synchronise through all-reduces over all workers may use them (no messages, no groups).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from ..cluster import Cluster
from ..codecs import Codec, flatten, unflatten
from ..errors import UserError
from . import collectives, snapshot
from .api import (Algorithm, Apply, Context, Gradients, Handle, Heal, Job, Message, Recv,
                  ServerStep, Train, Wait)
from .engine import Engine, Row
from .engine import Job as EngineJob
from .network import Network
from ..metrics import replica_spread

HEADER_BYTES = 64  # per point-to-point message: sender, version, counters


@dataclass
class _Proc:
    idx: int
    name: str
    region: int
    gen: object = None
    worker: Row | None = None
    done: bool = False
    waiting: object = None  # the Handle or Recv it is blocked on
    wait_start: float = 0.0
    collectives: dict = field(default_factory=dict)  # group -> collectives joined so far
    mailbox: deque = field(default_factory=deque)
    spans: list = field(default_factory=list)  # (kind, start, end)
    finished_at: float = 0.0
    replicas_recorded: int = 0
    run: object = None  # the process's function: a restart makes a new generator from it
    restarts: int = 0
    dead: bool = False  # crashed and not (yet) restarted
    crashed_at: float = -1.0
    job: object = None  # the compute job it waits for, and when that span started and ends
    span_start: float = 0.0
    span_end: float = 0.0
    # A synchronous group that re-forms (cluster.on_crash = "drop"; see "quorum" below):
    member: bool = True  # all-reduces of its group wait for it (False: crashed, or healing)
    shared: tuple | None = None  # (tensors, meta) last offered to a worker that heals
    participants: tuple = ()  # the workers its last completed all-reduce averaged
    uncommitted: int = 0  # tokens trained since its last completed all-reduce
    # api.Context.wait's slack: seconds of the next compute it may do while it waits, and the
    # seconds of it done so far (taken off its next compute span)
    wait_slack: float = 0.0
    ahead: float = 0.0

    def span(self, kind: str, start: float, end: float) -> None:
        if end <= start:
            return
        if self.spans and self.spans[-1][0] == kind and abs(self.spans[-1][2] - start) < 1e-12:
            self.spans[-1] = (kind, self.spans[-1][1], end)
        else:
            self.spans.append((kind, start, end))


class _SimContext(Context):
    def __init__(self, rt: "SimRuntime", proc: _Proc):
        self._rt, self._proc = rt, proc
        self.name = proc.name
        self.worker = proc.worker.index if proc.worker else None
        self.params = proc.worker.params if proc.worker else {}
        self.restarts = proc.restarts
        self.rejoining = bool(proc.restarts) or bool(
            proc.worker and rt.job.workers[proc.worker.index].join_s > 0)

    def now(self) -> float:
        return self._rt.time

    def initial_params(self):
        return [t.detach().clone() for t in self._rt.initial]

    def reset_optimizer(self):
        self._rt.engine.reset_optimizer(self._proc.worker)

    def start_all_reduce(self, tensors, codec, group=None):
        return self._rt._join_collective(self._proc, tensors, codec, group)

    def form_groups(self, groups):
        self._rt._groups |= {tuple(sorted(g)) for g in groups}

    def participants(self):
        return self._proc.participants

    def share(self, tensors, meta):
        self._rt._share(self._proc, tensors, meta)

    def send(self, dst, tensors, codec, meta=None):
        return self._rt._send(self._proc, dst, tensors, codec, meta or {})

    def publish(self, params, tokens, updates):
        self._rt._publish(params, tokens, updates)

    def record_staleness(self, staleness):
        self._rt.staleness.append(int(staleness))

    def record_replica(self, params):
        self._rt._record_replica(self._proc, params)

    def log(self, text):
        self._rt.recorder.log(f"[t={self._rt.time:.2f}s {self.name}] {text}")


class SimRuntime:
    def __init__(self, cluster: Cluster, job: Job, algorithm: Algorithm, engine: Engine,
                 workers, recorder, initial: list[torch.Tensor], seed: int = 0,
                 representatives: dict[int, int] | None = None):
        """`workers`: the engine rows, by worker index (a list, or a dict with the
        representatives only). `representatives`: worker -> how many identical workers it
        stands for (see the module docstring); None = every worker runs."""
        self.cluster, self.job, self.algorithm, self.engine = cluster, job, algorithm, engine
        self.initial = initial
        self.recorder = recorder
        self.phantom = engine.phantom
        if representatives is not None and not self.phantom:
            raise ValueError("representatives stand for other workers' arithmetic too: phantom "
                             "runs only")
        self.step_times = [w.step_time for w in job.workers]  # modelled seconds per step
        self.time = 0.0
        self._heap: list = []
        self._seq = 0
        self.procs: list[_Proc] = []
        self.copies: dict[int, int] = {}  # worker index -> workers it stands for
        for spec in algorithm.processes():
            if (representatives is not None and spec.worker is not None
                    and spec.worker not in representatives):
                continue  # its representative does what it would do
            proc = _Proc(len(self.procs), spec.name, spec.region, run=spec.run)
            if spec.worker is not None:
                proc.worker = workers[spec.worker]
                self.copies[spec.worker] = (representatives or {}).get(spec.worker, 1)
            proc.gen = spec.run(_SimContext(self, proc))
            self.procs.append(proc)
        self.by_name = {p.name: p for p in self.procs}
        self.worker_procs = [p for p in self.procs if p.worker is not None]
        self._proc_of = {p.worker.index: p for p in self.worker_procs}
        for p in self.worker_procs:  # one that joins mid-run takes part once it has healed
            p.member = job.workers[p.worker.index].join_s == 0
        self._synchronous = algorithm.synchronous
        self._healers: deque = deque()  # workers waiting in heal(), first come first served
        self._heals: dict[int, tuple] = {}  # state transfers on the wire, by network tag
        self._durable: dict | None = None  # the state the last member to crash left behind
        self.workers_total = sum(self.copies.values())
        self.network = Network(cluster, {p.name: p.region for p in self.procs},
                               {p.name: p.worker.index for p in self.worker_procs},
                               copies={p.name: self.copies[p.worker.index] for p in self.worker_procs})
        self._bucketed: dict = {}  # gradients job -> its buckets' all-reduce handles
        self._jitter = [random.Random(f"jitter-{seed}-{w}") for w in range(job.M)]
        self._collectives: dict[tuple, dict] = {}  # (group, index) -> the collective so far
        self._groups = {tuple(sorted(g)) for g in algorithm.groups()}
        self._messages: dict[int, tuple] = {}
        self.inner_steps = 0
        self.tokens = 0  # in finished compute jobs (less what a crash threw away after)
        self.tokens_lost = 0.0  # computed, then thrown away by a crash
        self._peers: dict[str, set[str]] = {}  # who exchanged messages with whom
        self.staleness: list[int] = []
        self.peak_payload = 0
        self._replicas: dict[int, dict[int, torch.Tensor]] = {}  # round -> worker -> replica
        self.replica_spread: float | None = None
        self.events_done = 0
        self.pause = None  # called with the runtime after every event: checkpoints, interrupts
        # Small values that algorithms exchange and may branch on (a norm test's statistics,
        # message metadata), in order: a checkpoint keeps them and a replay feeds them back.
        self.exchanged: list = []
        self._replay: dict | None = None

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        for job in self.events():
            self.engine.complete(job)

    def events(self):
        """The event loop. It pauses (yields) whenever a worker resumes whose compute job has
        not run yet; the caller completes the job, batched with every other pending job
        (several simulations can share one engine: `loco sweep`)."""
        for proc in self.procs:
            start = self.job.workers[proc.worker.index].join_s if proc.worker else 0.0
            self._schedule(start, proc, None)
        for worker, at, restart_at in self.cluster.crashes_that_drop():
            proc = self.worker_procs[worker]
            self._schedule(at, proc, _Crash(restart_at))
        while True:
            t_heap = self._heap[0][0] if self._heap else math.inf
            t_net = self.network.next_time()
            if t_net == math.inf and t_heap == math.inf:
                break
            if t_net <= t_heap:
                self.time = t_net
                for tag in self.network.advance(t_net):
                    self._on_network(tag)
            else:
                self.time, _, _, proc, value = heapq.heappop(self._heap)
                if isinstance(value, (_Finished, _BucketReady)) and not value.job.finished:
                    yield value.job
                self._drive(proc, value)
            self.events_done += 1
            if self._replay is not None and self.events_done == self._replay["until"]:
                restore, self._replay = self._replay["restore"], None
                restore()
            elif self._replay is None and self.pause is not None:
                self.pause(self)
        stuck = [p for p in self.procs if not p.done]
        if stuck:
            raise RunStuck(self._why_stuck(stuck))

    def _why_stuck(self, stuck: list[_Proc]) -> str:
        waits = ", ".join(f"{p.name} waits for {'an all-reduce' if isinstance(p.waiting, Handle) else 'a message'}"
                          for p in stuck)
        lost = self.cluster.lost_links(self.time)
        cause = (f"; the transfers it needs cross {', '.join(lost)}, which went down for good"
                 if lost and self.network.stalled() else
                 "; nothing it waits for can still arrive (its peers crashed or finished)")
        return f"the run cannot progress after t={self.time:.3f} s: {waits}{cause}"

    def _schedule(self, t: float, proc: _Proc, value) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, proc.idx, self._seq, proc, value))

    def _drive(self, proc: _Proc, value) -> None:
        """Run a process until it blocks; the blocking primitive decides when it resumes."""
        if isinstance(value, _Crash):
            return self._crash(proc, value.restart_at)
        if isinstance(value, _BucketReady):
            return self._bucket_ready(proc, value)
        if isinstance(value, _Restart):
            if not self._restart(proc):
                return
            value = None
        elif proc.dead or proc.done or (isinstance(value, _Finished) and value.job is not proc.job):
            return  # an event meant for a process, or an incarnation of it, that crashed since
        if isinstance(value, _Timeout):
            if proc.waiting is not value.recv:  # the message came first: a stale timer
                return
            proc.span("idle", proc.wait_start, self.time)
            proc.waiting, value = None, None
        elif isinstance(value, _Finished):  # a compute span ended: count it, hand back the result
            job = value.job
            proc.job = None
            if job.kind == "apply":
                value = None
            else:
                k = self.copies[proc.worker.index]
                self.inner_steps += job.steps * k
                self.tokens += job.steps * job.tokens_per_step * k
                self.recorder.on_train(job.steps * job.tokens_per_step * k, job.steps * k, job.loss)
                proc.uncommitted += job.steps * job.tokens_per_step * k
                value = job.result[0] if job.kind == "gradients" else job.result
                if job in self._bucketed:  # the gradients went to their all-reduces
                    value = self._bucketed.pop(job)
        while True:
            try:
                op = proc.gen.send(value)
            except StopIteration:
                proc.done, proc.finished_at = True, self.time
                self._release_healers()
                return
            if isinstance(op, Train):
                self._compute(proc, self.engine.submit(
                    proc.worker, "train", op.steps, op.progress, op.progress_end,
                    batch_size=op.batch_size, micro_batch=op.micro_batch))
                return
            if isinstance(op, Gradients):
                job = self.engine.submit(proc.worker, "gradients", batch_size=op.batch_size,
                                         micro_batch=op.micro_batch)
                if op.buckets is None:
                    self._compute(proc, job)
                else:
                    self._bucketed[job] = self._start_buckets(proc, job, op)
                return
            if isinstance(op, Apply):  # part of the step Gradients already timed
                job = self.engine.submit(proc.worker, "apply", grads=op.grads, progress=op.progress)
                proc.job = job
                self._schedule(self.time, proc, _Finished(job))
                return
            if isinstance(op, Heal):
                proc.waiting, proc.wait_start = op, self.time
                self._healers.append(proc)
                self._release_healers()  # at once, if no live member can serve it
                return
            if isinstance(op, ServerStep):
                end = self.time + self.cluster.cfg.server_compute_s
                proc.span("compute", self.time, end)
                self._schedule(end, proc, None)
                return
            if isinstance(op, Wait):
                if op.handle.done:
                    value = op.handle.result
                    continue
                proc.waiting, proc.wait_start = op.handle, self.time
                if op.slack > 0 and proc.worker is not None:
                    proc.wait_slack = op.slack * self.step_times[proc.worker.index]
                op.handle.state["waiter"] = proc
                return
            if isinstance(op, Recv):
                msg = self._take(proc, op.src)
                if msg is not None or op.timeout == 0:
                    value = msg
                    continue
                proc.waiting, proc.wait_start = op, self.time
                if op.timeout is not None:
                    self._schedule(self.time + op.timeout, proc, _Timeout(op))
                return
            raise TypeError(f"{proc.name} yielded {op!r}, which is not a runtime primitive")

    def _compute(self, proc: _Proc, job, fractions: list[float] = ()) -> list[float]:
        """The job runs whenever the engine gets to it; the worker resumes at the modelled
        end of its steps. Returns the times at which these fractions of its work are done."""
        w = proc.worker.index
        # A step of another batch than the worker's: its fixed part (cluster.step_fixed_s,
        # once per forward/backward pass) plus the batch's share of the rest.
        fixed = self.cluster.cfg.step_fixed_s / self.cluster.workers[w].speed
        passes = -(-job.batch // job.micro_batch) if job.micro_batch else 1
        seconds = job.steps * (fixed * passes + (self.step_times[w] - fixed)
                               * job.batch / proc.worker.batch_size)
        if self.cluster.cfg.jitter > 0:
            seconds *= max(0.1, 1.0 + self.cluster.cfg.jitter * self._jitter[w].gauss(0.0, 1.0))
        if proc.ahead:  # done while it waited on a result it needed only part-way in
            seconds, proc.ahead = max(0.0, seconds - proc.ahead), 0.0
        end, lost = self.cluster.compute_span(w, self.time, seconds)
        self.tokens_lost += lost * job.steps * job.tokens_per_step  # redone after a restart
        proc.span("compute", self.time, end)
        proc.job, proc.span_start, proc.span_end = job, self.time, end
        self._schedule(end, proc, _Finished(job))
        return [self.cluster.compute_end(w, self.time, f * seconds) for f in fractions]

    # -- gradient buckets (api.Gradients with buckets: DDP's overlap) -------------------
    FORWARD_SHARE = 1 / 3  # a training step's FLOPs: forward 2N, backward 4N per token (Kaplan)

    def _start_buckets(self, proc: _Proc, job, op: Gradients) -> list[Handle]:
        """The backward pass produces the buckets in the given order, each after a share of
        the backward time proportional to its parameters; each bucket's all-reduce starts
        when its gradients are ready (a _BucketReady event), while the worker computes on."""
        sizes = [sum(math.prod(self.job.param_shapes[i]) for i in b) for b in op.buckets]
        total, done, fractions = sum(sizes), 0, []
        for n in sizes:
            done += n
            fractions.append(self.FORWARD_SHARE + (1 - self.FORWARD_SHARE) * done / total)
        fractions[-1] = 1.0  # the last bucket is ready as the step ends, exactly
        handles = [Handle("all_reduce") for _ in op.buckets]
        for t, bucket, handle in zip(self._compute(proc, job, fractions), op.buckets, handles):
            self._schedule(t, proc, _BucketReady(job, bucket, handle, op.codec, op.scale))
        return handles

    def _bucket_ready(self, proc: _Proc, ev: "_BucketReady") -> None:
        if proc.dead:  # (synchronous algorithms only wait for crashed workers; never here)
            return
        grads = ev.job.result[0]
        tensors = [grads[i] for i in ev.bucket]
        if ev.scale != 1.0:
            tensors = [g * ev.scale for g in tensors]
        self._join_collective(proc, tensors, ev.codec, None, ev.handle)

    # -- collectives ----------------------------------------------------------------
    def _join_collective(self, proc: _Proc, tensors, codec: Codec, group=None,
                         handle: Handle | None = None) -> Handle:
        """Join the all-reduce with this process's next collective index in `group` (all
        workers if None). The arithmetic and the bytes are collectives.plan's, exactly what
        the real runtime does (with the whole group's M when workers have representatives)."""
        if proc.worker is None:
            raise RuntimeError(f"{proc.name} is not a worker; all-reduce is among workers only")
        members = self._members(group)
        if proc.worker.index not in members:
            raise RuntimeError(f"{proc.name} joined an all-reduce of group {group} it is not in")
        index = proc.collectives.get(members, 0)
        proc.collectives[members] = index + 1
        key = (members, index)
        handle = handle or Handle("all_reduce")
        flat = _flatten(tensors)  # a copy: the payload is snapshotted when the call is made
        coll = self._collectives.setdefault(key, {"parts": {}, "handles": [], "like": tensors,
                                                  "procs": [], "codec": codec})
        coll["parts"][proc.worker.index] = flat
        coll["handles"].append(handle)
        coll["procs"].append(proc)
        self._complete_if_ready(key)
        return handle

    def _complete_if_ready(self, key) -> None:
        """An all-reduce starts on the wire once every member of its group that is in the
        quorum has joined: all of them, unless crashes dropped some (cluster.on_crash =
        "drop"); then the mean is over those that joined (M = their number)."""
        coll, (members, _) = self._collectives[key], key
        if "joined" in coll or not coll["parts"]:
            return
        if any(m not in coll["parts"] and self._in_quorum(m) for m in members):
            return
        present = tuple(m for m in members if m in coll["parts"])
        numel = coll["parts"][present[0]].numel()
        plan = collectives.plan(coll["codec"], sum(self.copies[m] for m in present), numel)
        coll["result"] = self._exchanged("coll", numel,
                                         lambda: plan.reduce([coll["parts"][m] for m in present]))
        coll["joined"] = self.time
        for p in coll["procs"]:  # their work up to here is in the mean
            p.participants, p.uncommitted = present, 0
        self.peak_payload = max(self.peak_payload, plan.payload_bytes)
        hosts = [self.job.worker_name(m) for m in present]
        if self.cluster.cfg.allreduce == "hierarchical":  # fp32 only (checked at build)
            self.network.all_reduce(self.time, hosts, plan.payload_bytes, ("coll", key),
                                    mode="hierarchical")
        else:
            self.network.ring(self.time, hosts, plan.bytes_per_rank, plan.hops, ("coll", key))

    def _members(self, group) -> tuple[int, ...]:
        if group is None:
            return tuple(p.worker.index for p in self.worker_procs)
        if self.workers_total > len(self.worker_procs):
            raise RuntimeError(f"all-reduce over group {group}: representatives stand for "
                               "all-reduces over every worker only")
        members = tuple(sorted(group))
        if members not in self._groups:
            raise RuntimeError(f"all-reduce over group {members}, which the algorithm did not "
                               "declare in groups()")
        return members

    def _send(self, proc: _Proc, dst: str, tensors, codec: Codec, meta: dict) -> Handle:
        if dst not in self.by_name:
            raise RuntimeError(f"{proc.name} sent to unknown process '{dst}'")
        if self.workers_total > len(self.worker_procs):
            raise RuntimeError(f"{proc.name} sent a message, but representatives stand for "
                               "algorithms that only all-reduce over every worker")
        if self.phantom and tensors and getattr(tensors[0], "phantom", False):
            numel = sum(t.numel() for t in tensors)  # sizes only: no copy, no codec
            received = [t.clone() for t in tensors]
        else:
            flat = flatten(tensors)
            numel = flat.numel()
            flat = self._exchanged("msg", numel,
                                   lambda: flat.clone() if codec.lossless else codec.roundtrip(flat))
            received = unflatten(flat, tensors)
        meta = self._exchanged("meta", 0, lambda: dict(meta))
        msg = Message(proc.name, received, meta, self.time)
        self._peers.setdefault(proc.name, set()).add(dst)
        self._peers.setdefault(dst, set()).add(proc.name)
        nbytes = (codec.nbytes(numel) if tensors else 0) + HEADER_BYTES
        self.peak_payload = max(self.peak_payload, nbytes)
        handle = Handle("send")
        self._seq += 1
        self._messages[self._seq] = (msg, dst, handle)
        self.network.send(self.time, proc.name, dst, nbytes, ("msg", self._seq))
        return handle

    def _take(self, proc: _Proc, src: str | None) -> Message | None:
        for i, msg in enumerate(proc.mailbox):
            if src is None or msg.src == src:
                del proc.mailbox[i]
                return msg
        return None

    def _on_network(self, tag) -> None:
        kind, key = tag
        if kind == "coll":
            coll = self._collectives.pop(key)
            for p in coll["procs"]:  # the exchange on the wire, whether or not it waited
                p.span("comm", coll["joined"], self.time)
            for handle in coll["handles"]:
                handle.done = True
                handle.result = _unflatten(coll["result"], coll["like"])
                self._wake(handle, ready_at=coll["joined"])
            return
        if kind == "heal":
            return self._healed(key)
        msg, dst, handle = self._messages.pop(key)
        sender = self.by_name[msg.src]
        sender.span("comm", msg.sent_at, self.time)
        handle.done = True
        self._wake(handle, ready_at=msg.sent_at)
        if msg.sent_at <= sender.crashed_at:  # the sender crashed before it all went out
            return
        self._deliver(self.by_name[dst], msg)

    def _deliver(self, proc: _Proc, msg: Message) -> None:
        if proc.dead or proc.done:
            # Nobody reads it: the sender learns that its peer is gone, as a connection would tell.
            sender = self.by_name[msg.src]
            if not msg.failed and not (sender.dead or sender.done):
                self._deliver(sender, Message(proc.name, [], {"failed": True}, self.time))
            return
        if isinstance(proc.waiting, Recv) and proc.waiting.src in (None, msg.src):
            self._resume(proc, msg, ready_at=msg.sent_at)
        else:
            proc.mailbox.append(msg)

    # -- crashes (cluster.on_crash = "drop") --------------------------------------------------
    def _crash(self, proc: _Proc, restart_at: float | None) -> None:
        """The worker's process dies: its compute is thrown away, what it was sending is lost,
        and the processes it talked to are told, as a closed connection would tell them."""
        if proc.dead or proc.done:
            return
        if proc.job is not None:
            job, span = proc.job, max(proc.span_end - proc.span_start, 1e-12)
            done = min(1.0, (self.time - proc.span_start) / span)
            self.tokens_lost += done * job.steps * job.tokens_per_step
            self.engine.cancel(job)
            proc.spans = [(k, a, min(b, self.time)) for k, a, b in proc.spans if a < self.time]
        proc.gen.close()
        proc.dead, proc.crashed_at, proc.finished_at = True, self.time, self.time
        if proc.worker is not None and self._synchronous:
            self._leave_quorum(proc)
        proc.done = restart_at is None
        proc.job, proc.waiting = None, None
        proc.wait_slack = proc.ahead = 0.0
        proc.mailbox.clear()
        again = f"; it restarts at t={restart_at:.2f}s" if restart_at is not None else ""
        self.recorder.log(f"[t={self.time:.2f}s {proc.name}] crashed{again}")
        for peer in sorted(self._peers.get(proc.name, ())):
            self._deliver(self.by_name[peer], Message(proc.name, [], {"failed": True}, self.time))
        if restart_at is not None:
            self._schedule(restart_at, proc, _Restart())

    def _restart(self, proc: _Proc) -> bool:
        """A fresh process for the worker (its code from the top; `ctx.restarts` says it is
        not the first), a fresh inner optimizer, the same data stream. Not if no server is
        left to give it work: the run is over."""
        servers = [p for p in self.procs if p.worker is None]
        if all(p.done for p in servers) if servers else self._group_is_over():
            proc.done = True
            self.recorder.log(f"[t={self.time:.2f}s {proc.name}] not restarted: the run is over")
            return False
        proc.dead = proc.done = False
        proc.shared = None  # its previous incarnation's
        proc.restarts += 1
        self.engine.reset_optimizer(proc.worker)
        proc.gen = proc.run(_SimContext(self, proc))
        return True

    # -- quorum: a synchronous group that re-forms (cluster.on_crash = "drop") ---------------
    # torchft's model (github.com/pytorch/torchft, manager.py and its heal from a live peer):
    # an all-reduce averages the members alive when it completes; a crashed worker's
    # unsynchronised work is lost; one that restarts (or joins) waits for the next `share`
    # of a live member, becomes a member at once (the group's next all-reduce waits for it),
    # and resumes when the peer's state, parameters and inner-optimizer state have crossed
    # the network to it. When every member is down at once, the last to go leaves the group's
    # last shared state behind (as if each member wrote it to storage after every outer step:
    # torchft's fallback is a checkpoint), and the next to restart heals from that.
    def _in_quorum(self, worker: int) -> bool:
        p = self._proc_of[worker]
        return p.member and not p.dead

    def _live_members(self) -> list[_Proc]:
        return [p for p in self.worker_procs if p.member and not p.dead and not p.done]

    def _group_is_over(self) -> bool:
        """No member is alive and nothing is left to heal from, or a worker has finished."""
        finished = any(p.done and not p.dead for p in self.worker_procs)
        return finished or (not self._live_members() and self._durable is None)

    def _leave_quorum(self, proc: _Proc) -> None:
        """A member crashed: what it trained since its last all-reduce is lost, its part of
        an all-reduce not yet on the wire is withdrawn, and all-reduces that waited only for
        it go ahead without it. One already on the wire completes for the others."""
        proc.member = False
        self.tokens_lost += proc.uncommitted  # finished work, thrown away after all
        self.tokens -= proc.uncommitted
        proc.uncommitted = 0
        for key, coll in list(self._collectives.items()):
            keep = [i for i, p in enumerate(coll["procs"]) if p is not proc]
            if "joined" in coll or len(keep) == len(coll["procs"]):
                continue
            coll["parts"].pop(proc.worker.index, None)
            coll["handles"] = [coll["handles"][i] for i in keep]
            coll["procs"] = [coll["procs"][i] for i in keep]
        for h in (h for c in self._collectives.values() for h in c["handles"]):
            if h.state.get("waiter") is proc:
                h.state.pop("waiter")
        for key in list(self._collectives):
            self._complete_if_ready(key)
        if not self._live_members() and proc.shared is not None:
            self._durable = self._state_of(proc)
        self._release_healers()

    def _share(self, proc: _Proc, tensors, meta: dict) -> None:
        proc.shared = (list(tensors), dict(meta))
        while self._healers:
            healer = self._healers.popleft()
            if not (healer.dead or healer.done):
                self._serve(proc, healer)

    def _state_of(self, proc: _Proc) -> dict:
        """A copy of what a worker heals from `proc`: its shared tensors and numbers, its
        parameters, moments and step counters (not its data streams), and its place in the
        group's sequence of all-reduces."""
        tensors, meta = proc.shared
        state = {"payload": [t.clone() for t in tensors], "meta": dict(meta), "row": None,
                 "collectives": dict(proc.collectives), "participants": proc.participants,
                 "numel": sum(t.numel() for t in tensors)}
        if not self.phantom:
            rows, counters = self.engine.state([proc.worker])
            state["row"] = ({k: v.clone() for k, v in rows.items() if not k.endswith("_stream")},
                            {"rows": [dict(c) for c in counters["rows"]]})
            state["numel"] += sum(v.numel() for v in state["row"][0].values())
        else:  # parameters and two moments (AdamW)
            state["numel"] += 3 * sum(math.prod(s) for s in self.job.param_shapes)
        return state

    def _serve(self, source: _Proc | None, healer: _Proc) -> None:
        """Hand `healer` a copy of `source`'s state as it is now (over the network), or of
        the state the last member left (source None: at once); from now on it is a member,
        at the state's place in the group's sequence of all-reduces."""
        state = self._state_of(source) if source is not None else self._durable
        healer.member = True
        healer.collectives = dict(state["collectives"])
        healer.participants = state["participants"]
        if source is None:
            self.recorder.log(f"[t={self.time:.2f}s {healer.name}] heals from the state the "
                              "last member left (no live member)")
            return self._install(healer, state, self.time)
        self._seq += 1
        self._heals[self._seq] = (healer, healer.restarts, source, state, self.time)
        self.recorder.log(f"[t={self.time:.2f}s {healer.name}] heals from {source.name} "
                          f"({4 * state['numel']:,} bytes)")
        self.network.send(self.time, source.name, healer.name, 4 * state["numel"] + HEADER_BYTES,
                          ("heal", self._seq))

    def _healed(self, key: int) -> None:
        healer, incarnation, source, state, sent_at = self._heals.pop(key)
        if healer.dead or healer.restarts != incarnation:
            return  # it crashed again meanwhile
        if source.crashed_at >= sent_at:  # the source died mid-transfer: heal again
            healer.member = False
            self._healers.append(healer)
            for k in list(self._collectives):
                self._complete_if_ready(k)
            self._release_healers()
            return
        self._install(healer, state, sent_at)

    def _install(self, healer: _Proc, state: dict, sent_at: float) -> None:
        if state["row"] is not None:
            own, _ = self.engine.state([healer.worker])
            tensors = dict(state["row"][0], **{k: v for k, v in own.items() if k.endswith("_stream")})
            self.engine.load_state([healer.worker], tensors, state["row"][1])
        payload = [t.clone() for t in state["payload"]]
        healer.shared = (payload, dict(state["meta"]))  # what it holds now, until it shares
        self._resume(healer, (payload, dict(state["meta"])), ready_at=sent_at)

    def _release_healers(self) -> None:
        """With no live member left, the waiting workers heal from the state the last member
        left, or, if there is none or the run is over, they end."""
        while self._healers and not self._live_members():
            healer = self._healers.popleft()
            if healer.waiting is None or healer.dead:
                continue
            if self._group_is_over():
                self._resume(healer, None, ready_at=self.time)
            else:
                self._serve(None, healer)

    def _wake(self, handle: Handle, ready_at: float) -> None:
        proc = handle.state.pop("waiter", None)
        if proc is not None:
            self._resume(proc, handle.result, ready_at)

    def _resume(self, proc: _Proc, value, ready_at: float) -> None:
        """Wake a waiting process. Until `ready_at` it waited on other processes (idle); after
        that, on the network (blocked). A wait with slack (api.Context.wait) computed first,
        for as long as its slack allows."""
        start = proc.wait_start
        if proc.wait_slack:
            worked = min(self.time - start, max(0.0, proc.wait_slack - proc.ahead))
            proc.span("compute", start, start + worked)
            proc.ahead += worked
            proc.wait_slack, start = 0.0, start + worked
        split = min(max(start, ready_at), self.time)
        proc.span("idle", start, split)
        proc.span("blocked", split, self.time)
        proc.waiting = None
        self._schedule(self.time, proc, value)

    # -- checkpoints ----------------------------------------------------------------
    SMALL = 4096  # values: exchanges up to this size are recorded for replays

    def _exchanged(self, kind: str, numel: int, compute):
        """A value some process receives (a collective's result, a message's payload or
        metadata): computed, and recorded when small; during a replay, taken from the record
        instead, so that the replay branches as the original run did."""
        small = kind == "meta" or numel <= self.SMALL
        if self._replay is not None and small:
            recorded_kind, value = self._replay["exchanged"].popleft()
            if recorded_kind != kind:
                raise RuntimeError(f"the replay exchanged a {kind} where the run exchanged a "
                                   f"{recorded_kind}")
            return value if kind == "meta" else torch.tensor(value, dtype=torch.float32)
        value = compute()
        if getattr(value, "phantom", False):  # sizes only: nothing to record or replay
            return value
        if small:
            self.exchanged.append((kind, value if kind == "meta" else value.tolist()))
        return value

    def roots(self) -> list:
        """Where the state of a paused run lives (runtime/snapshot.py walks it)."""
        return [[(p.gen, p.mailbox, p.waiting) for p in self.procs], self._heap,
                self._collectives, self._messages, self._replicas, self._heals, self._durable,
                self.recorder.last[0] if self.recorder.last else None]

    def unconsumed_jobs(self) -> list:
        """Compute jobs submitted and not yet handed back to their worker, in submission order."""
        return sorted((v.job for *_, v in self._heap if isinstance(v, _Finished)),
                      key=lambda j: j.seq)

    def checkpoint_state(self) -> tuple[list[torch.Tensor], dict]:
        tensors = snapshot.tensors_in(self.roots())
        return tensors, {"events": self.events_done, "time": self.time, "tokens": self.tokens,
                         "inner_steps": self.inner_steps, "replica_spread": self.replica_spread,
                         "exchanged": self.exchanged, "shapes": snapshot.shapes(tensors)}

    def replay(self, state: dict, restore) -> None:
        """Run without arithmetic up to the checkpointed event, then call `restore`."""
        self._replay = {"until": state["events"], "restore": restore,
                        "exchanged": deque((k, v) for k, v in state["exchanged"])}
        self.exchanged = [tuple(e) for e in state["exchanged"]]

    # -- records --------------------------------------------------------------------
    def _record_replica(self, proc: _Proc, params) -> None:
        """Replicas are compared once every worker has recorded the same round."""
        if self.phantom:  # no values to compare
            return
        k = proc.replicas_recorded
        proc.replicas_recorded += 1
        pending = self._replicas.setdefault(k, {})
        pending[proc.worker.index] = flatten(params)
        if len(pending) == len(self.worker_procs):
            self.replica_spread = replica_spread(list(pending.values()))
            del self._replicas[k]

    def _publish(self, params, tokens: int, updates: int) -> None:
        self.recorder.publish(params, tokens, updates, self.snapshot)

    def compute_seconds(self, proc: _Proc, until: float) -> float:
        return sum(min(e, until) - s for k, s, e in proc.spans if k == "compute" and s < until)

    def snapshot(self) -> dict:
        t = self.time
        weights = [self.copies[p.worker.index] for p in self.worker_procs]
        util = ([self.compute_seconds(p, t) / t * k for p, k in zip(self.worker_procs, weights)]
                if t > 0 else weights)
        net = self.network
        out = {
            "step": self.inner_steps // self.workers_total,
            "sim_time_s": t,
            "inner_steps": self.inner_steps,
            "bytes_sent": net.bytes_sent,
            "bytes_inter_region": net.bytes_inter_region,
            "utilization": sum(util) / self.workers_total,
            "peak_link_gbps": max(net.peak_link_bps.values(), default=0.0) / 1e9,
            "bytes_by_host": dict(net.bytes_by_host),
        }
        if self.replica_spread is not None:
            out["replica_spread"] = self.replica_spread
        if self.staleness:
            out["staleness_mean"] = sum(self.staleness) / len(self.staleness)
            out["staleness_max"] = max(self.staleness)
        return out

    def stats(self) -> dict:
        """Totals for the run's summary."""
        return {
            "tokens": self.tokens, "inner_steps": self.inner_steps,
            "tokens_lost": round(self.tokens_lost),
            "sim_time_s": max(p.finished_at for p in self.procs),
            "bytes_sent": self.network.bytes_sent,
            "bytes_inter_region": self.network.bytes_inter_region,
            "peak_payload_bytes": self.peak_payload,
            "bytes_by_host": dict(self.network.bytes_by_host),
            "peak_link_gbps_by_link": {f"{self.cluster.regions[r]}->{self.cluster.regions[q]}": bps / 1e9
                               for (r, q), bps in sorted(self.network.peak_link_bps.items())},
        }

    def timeline(self) -> list[dict]:
        return [{"process": p.name, "kind": k, "start": s, "end": e}
                for p in self.procs for k, s, e in p.spans]


@dataclass
class _Timeout:
    recv: Recv


@dataclass
class _Crash:
    restart_at: float | None


@dataclass
class _Restart:
    pass


class RunStuck(UserError):
    """No process can make progress any more (permanent link loss, every peer gone)."""


@dataclass
class _Finished:
    """A compute span ended: hand the job's result back and count what was done."""
    job: object


@dataclass
class _BucketReady:
    """The backward pass of a gradients job produced this bucket: start its all-reduce."""
    job: object
    bucket: list[int]
    handle: Handle
    codec: Codec
    scale: float


def _flatten(tensors: list):
    """codecs.flatten; of phantoms, one phantom of their total size (no copy to make)."""
    if tensors and getattr(tensors[0], "phantom", False):
        return type(tensors[0])((sum(t.numel() for t in tensors),))
    return flatten(tensors)


def _unflatten(flat, like: list) -> list:
    """A collective's result for one member: its own copy, shaped like what it sent."""
    if getattr(flat, "phantom", False):
        return [t.clone() for t in like]
    return unflatten(flat.clone(), like)


# A paused run's tensors live in the processes' generators and in what is in flight; the
# runtime's own objects are rebuilt by a replay, and the engine saves the workers' state.
snapshot.skip(_Proc, _SimContext, SimRuntime, Row, Engine, EngineJob, Network, Cluster,
              Algorithm, Job, Codec)
