"""The real runtime: each process of an algorithm is one OS process (one torch.distributed
rank), running the same algorithm file as the simulator.

    loco launch quickstart --nproc 2                      # one machine, spawns the ranks
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m locotrain.distributed two-datacenters --out runs/x   # several machines

(locotrain/distributed.py is the entry point of a rank: it builds the run and hands this
runtime the algorithm's processes.)

Rank r runs process r of `algorithm.processes()` (workers first, then servers), so the world
size is the number of processes. Primitives map onto real operations:

| primitive | here |
|---|---|
| `train`, `gradients`, `apply` | the worker's real steps on its GPU (or CPU) |
| `start_all_reduce` / `wait` | `dist.all_reduce(async_op=True)` among the workers (gloo on CPU, NCCL on GPUs); with a lossy codec an all-gather of the encoded bytes (fp4 packed two per byte), decoded and averaged in fp32 and encoded once more, the same arithmetic as the simulator |
| `send` / `recv` | runtime/transport.py: TCP messages with any-source receive, timeouts and dead-peer notices |
| `server_step` | nothing: the update itself is real |
| `now` | wall-clock seconds since the common start |

Failures: a collective that does not complete within `runtime.timeout_s` (a peer died) is a
clear error, so synchronous runs end within a bounded time; a worker that dies shows up at its
parameter server as a message with meta {"failed": True}, and servers carry on without it.

The process that publishes the global model (worker 0, or the server holding it) writes the
run folder: the same files as a simulated run, without `sim_time_s`; `time_s` is wall time.
At the end every rank leaves its counters in torch.distributed's store and that process
sums them: bytes are what was actually sent (socket bytes for messages; for collectives the
volume of gloo's and NCCL's ring algorithms: 2(M-1)/M of the payload for an all-reduce,
(M-1) payloads for an all-gather).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..codecs import Codec, flatten, make_codec, unflatten
from ..config import to_toml
from ..data import make_shards
from ..errors import UserError
from ..metrics import Recorder, atomic_write
from ..outputs import prepare_out_dir, summarize, write_outputs
from ..workloads import build_workload
from . import collectives, snapshot
from .api import (Algorithm, Apply, Context, Gradients, Handle, Job, Message, Recv, ServerStep,
                  Train, Wait)
from .launch import PROGRESS_ENV
from .transport import Transport
from .dist_checkpoint import Checkpoints
from .dist_snapshot import Snapshots
from .engine import Engine


def _all_gather(out: torch.Tensor, payload: torch.Tensor, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, payload, group=group, async_op=True)


_COUNTERS = "locotrain/counters"  # a rank's "tokens inner_steps" so far (asynchronous runs)

class PeerFailure(RuntimeError):
    """A collective could not complete: a peer process died or stalled."""


class _Context(Context):
    def __init__(self, rt: "DistRuntime"):
        self._rt = rt
        self.name = rt.spec.name
        self.worker = rt.spec.worker
        self.params = rt.row.params if rt.row else {}

    def now(self):
        return time.perf_counter() - self._rt.t0

    def initial_params(self):
        return [t.detach().clone() for t in self._rt.initial]

    def reset_optimizer(self):
        self._rt.engine.reset_optimizer(self._rt.row)

    def start_all_reduce(self, tensors, codec, group=None):
        self._members = tuple(range(self._rt.job.M)) if group is None else tuple(sorted(group))
        return self._rt.start_all_reduce(tensors, codec, group)

    def participants(self):
        # A real group never re-forms (a dead rank stops a synchronous run, docs/runtime.md):
        # the last all-reduce averaged its whole group. (share/heal are never needed.)
        return getattr(self, "_members", tuple(range(self._rt.job.M)))

    def form_groups(self, groups):
        rt = self._rt
        if len(rt.procs) != rt.job.M:
            raise RuntimeError("form_groups needs every process to be a worker; an algorithm "
                               "with servers declares its groups in groups()")
        timeout = timedelta(seconds=rt.cfg.runtime.timeout_s)
        for g in groups:  # every rank calls new_group for every group, in the same order
            members = tuple(sorted(g))
            if members not in rt.groups:
                rt.groups[members] = dist.new_group(list(members), timeout=timeout)

    def send(self, dst, tensors, codec, meta=None):
        return self._rt.send(dst, tensors, codec, meta or {})

    def publish(self, params, tokens, updates):
        self._rt.publish(params, tokens, updates)

    def record_staleness(self, staleness):
        self._rt.staleness.append(int(staleness))

    def log(self, text):
        self._rt.log(f"[t={self.now():.2f}s {self.name}] {text}")


class DistRuntime:
    def __init__(self, cfg, setup, rank: int, world: int, local_rank: int, out: Path | None,
                 force: bool, prepared: bool, resume: bool = False):
        """`setup` is setup.build(cfg)'s: the algorithm comes from the caller, so that this
        runtime never imports one."""
        self.cfg, self.rank, self.out, self.force, self.prepared = cfg, rank, out, force, prepared
        if cfg.cluster.allreduce == "hierarchical":
            raise UserError("cluster.allreduce = 'hierarchical' is modelled by the simulator only; "
                            "real runs all-reduce over one ring (set cluster.allreduce = 'ring')")
        self.setup = setup
        self.job = self.setup.job
        procs = self.setup.algorithm.processes()
        if world != len(procs):
            raise UserError(f"this config runs {len(procs)} processes ({self.job.M} workers + "
                            f"{len(procs) - self.job.M} server(s)) but the world size is {world}; "
                            f"launch with --nproc {len(procs)}")
        self.procs, self.spec = procs, procs[rank]
        self.rank_of = {p.name: i for i, p in enumerate(procs)}
        use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
        is_server = self.spec.worker is None
        if use_cuda and not (is_server and cfg.runtime.server_device == "cpu"):
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        note = ""
        # GPU ranks on this machine: the workers, plus servers if they use the GPU too
        local = int(os.environ.get("LOCOTRAIN_GPU_RANKS", os.environ.get("LOCAL_WORLD_SIZE", world)))
        if use_cuda and local > torch.cuda.device_count():
            # NCCL refuses two ranks on one GPU; gloo moves CUDA tensors through the host.
            backend = "cpu:gloo,cuda:gloo"
            note = (f"{local} processes share {torch.cuda.device_count()} GPU(s): NCCL needs one GPU "
                    "per rank, so collectives use gloo")
        timeout = timedelta(seconds=cfg.runtime.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        self.backend = backend
        workers = list(range(self.job.M))
        # Communicators for every group the algorithm all-reduces in, made on every rank in
        # the same order (torch.distributed's rule): all workers, then its own groups.
        everyone = tuple(workers)
        self.groups = {everyone: dist.new_group(workers, timeout=timeout)
                       if world > self.job.M else None}
        for g in self.setup.algorithm.groups():
            self.groups[tuple(sorted(g))] = dist.new_group(sorted(g), timeout=timeout)
        self.store = dist.distributed_c10d._get_default_store()
        self.transport = Transport(  # payloads: at most 5 bytes a value (int8, 1 value a block)
            rank, self.store, _my_address(cfg.runtime.host), cfg.runtime.timeout_s,
            secret=cfg.runtime.secret, world=world,
            max_payload=5 * sum(int(np.prod(s)) for s in self.job.param_shapes) + 1024)

        torch.manual_seed(cfg.train.seed)
        self.workload = build_workload(cfg, self.setup.corpus, self.device)
        self.setup.workload = self.workload  # evaluation and sampling on this process's device
        params0 = self.workload.init_params(cfg.train.seed)
        self.initial = [params0[n] for n in self.job.param_names]
        # One worker per process: an engine of one row, whose jobs run as soon as submitted.
        self.engine, self.row = Engine("sequential"), None
        if self.spec.worker is not None:
            if cfg.train.compile and self.device.type == "cuda":
                self.workload.compile()
                self.engine.compile()
            w = self.spec.worker
            tokens = self.setup.corpus.train.to(self.device)
            shard = make_shards(tokens, self.job.M, cfg.data.shards, self.workload.window,
                                cfg.train.seed)[w]
            self.row = self.engine.add_worker(w, self.workload, params0, shard,
                                              self.job.workers[w].batch_size, cfg.train,
                                              self.job.planned_steps)
            self.engine.start()
            self.engine.on_step = self.advance_collectives
        self.recorder: Recorder | None = None
        self.mailbox: deque[Message] = deque()
        self.staleness: list[int] = []
        self.spans: list[tuple[str, float, float]] = []
        self.wall_per_step: list[float] = []
        self.collective_bytes = self.collective_inter = self.peak_payload = 0
        self.scattering: list[Handle] = []  # quantised reduce-scatters in their first phase
        self.tokens = self.inner_steps = 0
        self.logs: list[str] = [note] if note and rank == 0 else []
        # A consistent cut: after a common all-reduce (synchronous algorithms), or a snapshot
        # of processes and the messages between them (parameter servers).
        kind = Checkpoints if setup.algorithm.synchronous else Snapshots
        self.ckpt = kind(self, cfg.train.checkpoint_every, enabled=out is not None)
        self.resuming = resume
        # A common start through the store: a collective barrier would need every rank,
        # CPU-only servers included, to agree on a backend device.
        self.store.set(f"locotrain/ready/{rank}", "1")
        self.store.wait([f"locotrain/ready/{r}" for r in range(world)], timeout)
        self.t0 = time.perf_counter()

    # -- the driver -----------------------------------------------------------------------
    def run(self) -> None:
        self.gen = gen = self.spec.run(_Context(self))
        if self.resuming:
            self.ckpt.resume()  # replays up to the checkpoint, then restores it
        value = None
        while True:
            try:
                op = gen.send(value)
            except StopIteration:
                break
            self.ckpt.before(op)
            value = self._execute(op)
            self.ckpt.after(value)
        self.finished_at = time.perf_counter() - self.t0

    def _execute(self, op):
        started = time.perf_counter() - self.t0
        if isinstance(op, (Train, Gradients, Apply)):
            tick = time.perf_counter()
            self.advance_collectives()
            if isinstance(op, Train):
                job = self.engine.submit(self.row, "train", op.steps, op.progress, op.progress_end,
                                         batch_size=op.batch_size, micro_batch=op.micro_batch)
            elif isinstance(op, Gradients):
                job = self.engine.submit(self.row, "gradients", batch_size=op.batch_size,
                                         micro_batch=op.micro_batch)
                if op.buckets is not None:
                    handles = self._bucket_hooks(job, op)
            else:
                job = self.engine.submit(self.row, "apply", grads=op.grads, progress=op.progress)
            result = self.engine.complete(job)
            seconds = time.perf_counter() - tick
            self._span("compute", started)
            if isinstance(op, Apply):  # the optimizer step belongs to the step it completes
                if self.wall_per_step:
                    self.wall_per_step[-1] += seconds
                return None
            self.wall_per_step.append(seconds / job.steps)
            self.inner_steps += job.steps
            self.tokens += job.steps * job.tokens_per_step
            if not self.setup.algorithm.synchronous:  # a run that outlives its dead workers
                # counts their tokens from the last values they left in the launcher's store
                self.store.set(f"{_COUNTERS}/{self.rank}", f"{self.tokens} {self.inner_steps}")
            if isinstance(op, Gradients) and op.buckets is not None:
                return handles
            return result[0] if isinstance(op, Gradients) else result
        if isinstance(op, Wait):
            result = self._wait(op.handle)
            self._span("blocked", started)
            return result
        if isinstance(op, Recv):
            msg = self._recv(op.src, op.timeout)
            self._span("blocked", started)
            return msg
        if isinstance(op, ServerStep):
            return None
        raise TypeError(f"{self.spec.name} yielded {op!r}, which is not a runtime primitive")

    def _span(self, kind: str, started: float) -> None:
        self.spans.append((kind, started, time.perf_counter() - self.t0))

    def _bucket_hooks(self, job, op: Gradients) -> list[Handle]:
        """DDP's overlap (api.Gradients with buckets): as autograd finishes each parameter's
        gradient, the engine calls back; a bucket whose gradients are all there starts its
        all-reduce at once, but only after every earlier bucket has started (collectives
        must be issued in the same order on every rank, as torch DDP's reducer does)."""
        handles: list[Handle | None] = [None] * len(op.buckets)
        owner = {i: k for k, bucket in enumerate(op.buckets) for i in bucket}
        grads: dict[int, torch.Tensor] = {}
        left = [len(b) for b in op.buckets]
        state = {"next": 0}

        def on_grad(i: int, g: torch.Tensor) -> None:
            grads[i] = g * op.scale if op.scale != 1.0 else g
            left[owner[i]] -= 1
            k = state["next"]
            while k < len(op.buckets) and left[k] == 0:
                handles[k] = self.start_all_reduce([grads[j] for j in op.buckets[k]], op.codec)
                k += 1
            state["next"] = k

        job.on_grad = on_grad
        return handles

    # -- collectives ----------------------------------------------------------------------
    # collectives.plan decides the scheme and the bytes; here each scheme's real exchange.
    def start_all_reduce(self, tensors, codec, group=None) -> Handle:
        if self.ckpt.replaying:
            return self.ckpt.replayed(tensors)
        members = tuple(range(self.job.M)) if group is None else tuple(sorted(group))
        if members not in self.groups:
            raise RuntimeError(f"all-reduce over group {members}, which the algorithm did not "
                               "declare in groups()")
        M, me = len(members), members.index(self.spec.worker)
        flat = flatten(tensors).to(self.device)
        plan = collectives.plan(codec, M, flat.numel())
        handle = Handle("all_reduce", state={"like": tensors, "plan": plan, "group": members})
        self.collective_bytes += plan.bytes_per_rank
        ring_next = members[(me + 1) % M]
        if self.job.workers[ring_next].region != self.job.workers[self.spec.worker].region:
            self.collective_inter += plan.bytes_per_rank
        self.peak_payload = max(self.peak_payload, plan.payload_bytes)
        if M == 1:
            handle.done, handle.result = True, unflatten(plan.reduce([flat]), tensors)
            self.ckpt.finished(handle)
            return handle
        group = self.groups[members]
        if plan.scheme == "ring":
            handle.state |= {"flat": flat, "work": dist.all_reduce(flat, group=group, async_op=True)}
        elif plan.scheme == "gather":
            payload = codec.encode(flat)
            out = torch.empty(M * payload.numel(), dtype=torch.uint8, device=self.device)
            handle.state |= {"out": out, "work": _all_gather(out, payload, group)}
        else:  # scatter: send chunk j of the encoded contribution to rank j
            chunks = plan.pad(flat).view(M, plan.chunk)
            encoded = torch.cat([codec.encode(c) for c in chunks])
            received = torch.empty_like(encoded)
            work = dist.all_to_all_single(received, encoded, group=group, async_op=True)
            handle.state |= {"received": received, "work": work, "phase": 1}
            self.scattering.append(handle)
        self.ckpt.started(handle)
        return handle

    def advance_collectives(self, block: bool = False) -> None:
        """Start the all-gather of every quantised reduce-scatter whose first phase is done
        (between inner steps, so the second phase overlaps compute too)."""
        for handle in list(self.scattering):
            work = handle.state["work"]
            if not block and not work.is_completed():
                continue
            self._finish_work(work)
            plan = handle.state["plan"]
            M = plan.M
            size = plan.codec.nbytes(plan.chunk)
            mine = handle.state["received"].view(M, size)
            mean = collectives.mean_in_rank_order([plan.codec.decode(b, plan.chunk) for b in mine])
            out = torch.empty(M * size, dtype=torch.uint8, device=self.device)
            handle.state |= {"out": out, "phase": 2, "work": _all_gather(
                out, plan.codec.encode(mean), self.groups[handle.state["group"]])}
            self.scattering.remove(handle)

    def _finish_work(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise PeerFailure(f"{self.spec.name}: all-reduce failed or did not complete within "
                              f"runtime.timeout_s = {self.cfg.runtime.timeout_s} s; a peer process "
                              f"probably died ({str(e).splitlines()[0][:120]})") from None

    def _wait(self, handle: Handle):
        if handle.done:
            return handle.result
        if handle.kind == "send":
            handle.state["event"].wait()
            handle.done = True
            return None
        if handle.state.get("phase") == 1:
            self.advance_collectives(block=True)
        self._finish_work(handle.state["work"])
        plan = handle.state["plan"]
        M = plan.M
        if plan.scheme == "ring":
            flat = handle.state["flat"].div_(M)
        elif plan.scheme == "gather":
            size = plan.payload_bytes
            parts = [plan.codec.decode(b, plan.numel) for b in handle.state["out"].view(M, size)]
            flat = collectives.mean_in_rank_order(parts)
        else:
            size = plan.codec.nbytes(plan.chunk)
            chunks = [plan.codec.decode(b, plan.chunk) for b in handle.state["out"].view(M, size)]
            flat = torch.cat(chunks)[:plan.numel]
        handle.done, handle.result = True, unflatten(flat, handle.state["like"])
        self.ckpt.finished(handle)
        return handle.result

    # -- messages -------------------------------------------------------------------------
    def send(self, dst: str, tensors, codec, meta: dict) -> Handle:
        if dst not in self.rank_of:
            raise RuntimeError(f"{self.spec.name} sent to unknown process '{dst}'")
        if self.ckpt.replaying_messages:  # on its way to its snapshot: sent before
            return Handle("send", done=True)
        flat = flatten(tensors).cpu() if tensors else torch.zeros(0)
        payload = codec.encode(flat) if tensors else torch.zeros(0, dtype=torch.uint8)
        header = {"meta": meta, "codec": codec.name, "block": getattr(codec, "block", 128),
                  "numel": flat.numel(), "shapes": [list(t.shape) for t in tensors],
                  "sent_at": time.perf_counter() - self.t0}
        self.peak_payload = max(self.peak_payload, payload.numel())
        event = self.transport.send(self.rank_of[dst], header, payload.numpy().tobytes())
        return Handle("send", state={"event": event})

    def _recv(self, src: str | None, timeout: float | None) -> Message | None:
        if self.ckpt.replaying_messages:
            return self.ckpt.replayed_message()
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            for i, msg in enumerate(self.mailbox):
                if src is None or msg.src == src:
                    del self.mailbox[i]
                    self.ckpt.delivered(msg)
                    return msg
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if self.ckpt.enabled:  # wake up now and then: a snapshot may be due meanwhile
                left = 0.2 if left is None else min(0.2, left)
            frame = self.transport.recv(left)
            if frame is not None:
                self._take(frame)
            elif deadline is not None and time.perf_counter() >= deadline:
                self.ckpt.delivered(None)
                return None
            else:
                self.ckpt.idle()

    def poll(self, wait: float = 0.0) -> None:
        """Take whatever has arrived (waiting up to `wait` s for the first) into the mailbox."""
        frame = self.transport.recv(wait)
        while frame is not None:
            self._take(frame)
            frame = self.transport.recv(0)

    def _take(self, frame) -> None:
        h = frame.header
        if (not frame.failed and isinstance(self.ckpt, Snapshots) and set(h) == {"snapshot", "stop"}
                and type(h["snapshot"]) is int and h["snapshot"] > 0 and h["stop"] in (0, 1)):
            self.ckpt.marker(frame.src, h)
            return
        msg = self._message(frame)
        self.mailbox.append(msg)
        self.ckpt.arrived(frame.src, msg)

    def _message(self, frame) -> Message:
        name = self.procs[frame.src].name
        now = time.perf_counter() - self.t0
        if frame.failed:
            reason = frame.header.get("reason", "its connection closed without a goodbye")
            self.log(f"[t={now:.2f}s {self.spec.name}] process {name} died ({reason})")
            return Message(name, [], {"failed": True}, now)
        # The transport vouches that a secret holder sent this frame, not that it is sound: a
        # buggy or mismatched peer must not crash this process or make it decode something
        # that is not a piece of the model. Every field is checked before it is used.
        from collections import Counter

        h, problem, tensors = frame.header, None, []
        try:
            model = Counter(tuple(s) for s in self.job.param_shapes)
            shapes = [tuple(s) for s in h["shapes"]] if isinstance(h["shapes"], list) else None
            meta, sent_at, numel, block = h["meta"], h["sent_at"], h["numel"], h["block"]
            if shapes is None or Counter(shapes) - model:
                problem = "shapes that are not distinct parameters of the model"
            elif type(numel) is not int or numel != sum(int(np.prod(s)) for s in shapes):
                problem = f"numel {numel!r} that does not match its shapes"
            elif type(block) is not int or block < 1 or not isinstance(h["codec"], str):
                problem = "no valid codec and block"
            elif not isinstance(meta, dict) or "failed" in meta or not all(
                    isinstance(k, str) and isinstance(v, (int, float, str))
                    for k, v in meta.items()):  # (failure notices come from the transport)
                problem = "meta that is not a flat mapping of names to numbers, booleans or text"
            elif isinstance(sent_at, bool) or not isinstance(sent_at, (int, float)):
                problem = "no send time"
            else:
                codec = make_codec(h["codec"], block)  # UserError for an unknown name
                if len(frame.payload) != codec.nbytes(numel):
                    problem = (f"{len(frame.payload)} payload bytes where {h['codec']} needs "
                               f"{codec.nbytes(numel)}")
                elif shapes:
                    buf = torch.from_numpy(np.frombuffer(frame.payload, dtype=np.uint8).copy())
                    flat = codec.decode(buf, numel).to(self.device)
                    tensors = unflatten(flat, [torch.empty(s) for s in shapes])
        except (KeyError, TypeError, ValueError, UserError) as e:
            problem = f"a malformed header ({type(e).__name__}: {e})"
        if problem is None:
            return Message(name, tensors, meta, sent_at)
        # Nothing here can skip the frame, so the peer is treated as dead: its connection is
        # closed and nothing more from it is delivered (the algorithms handle dead peers).
        self.transport.reject(frame.src, f"invalid message: {problem}")
        self.log(f"[t={now:.2f}s {self.spec.name}] process {name} sent an invalid message "
                 f"({problem}); dropping it and treating {name} as dead")
        return Message(name, [], {"failed": True}, now)

    # -- records --------------------------------------------------------------------------
    def publish(self, params, tokens, updates) -> None:
        if self.recorder is None:
            if self.out is not None and not self.prepared:
                prepare_out_dir(self.out, self.force)
                atomic_write(self.out / "config.toml", to_toml(self.cfg))
            self.recorder = Recorder(self.workload, self.job.param_names, self.cfg.train.tokens,
                                     self.cfg.eval.every, self.cfg.eval.windows,
                                     self.out / "metrics.jsonl" if self.out else None,
                                     label=self.cfg.algorithm.name,
                                     quiet=os.environ.get(PROGRESS_ENV) != "1")
            self.recorder.t0 = self.t0
            for text in self.logs:
                self.recorder.log(text)
        params = [p.to(self.device) for p in params]
        if self.ckpt.replaying:  # a resumed rank on its way to the checkpoint: record nothing
            self.recorder.last = (params, tokens, updates, self._snapshot)
            return
        self.recorder.publish(params, tokens, updates, self._snapshot)
        self.recorder.advance_to(tokens)
        self.ckpt.published(tokens)

    def _snapshot(self) -> dict:
        out = {"step": self.inner_steps if self.row else len(self.staleness)}
        if self.setup.algorithm.synchronous:  # symmetric collectives: every worker alike
            out |= {"inner_steps": self.inner_steps * self.job.M,
                    "bytes_sent": (self.collective_bytes + self.transport.bytes_sent) * self.job.M}
        if self.staleness:
            out["staleness_mean"] = sum(self.staleness) / len(self.staleness)
            out["staleness_max"] = max(self.staleness)
        return out

    def log(self, text: str) -> None:
        if self.ckpt.replaying:
            return
        print(text, file=sys.stderr, flush=True)
        if self.recorder is not None:
            self.recorder.log(text)
        else:
            self.logs.append(text)

    def my_stats(self) -> dict:
        region = self.spec.region
        inter = sum(n for dst, n in self.transport.bytes_to.items() if self.procs[dst].region != region)
        return {"tokens": self.tokens, "inner_steps": self.inner_steps,
                "bytes_sent": self.collective_bytes + self.transport.bytes_sent,
                "bytes_inter_region": self.collective_inter + inter,
                "peak_payload_bytes": self.peak_payload, "wall_per_step": self.wall_per_step,
                "spans": self.spans, "finished_at": self.finished_at, "name": self.spec.name,
                "worker": self.spec.worker}

    def finish(self) -> None:
        """Leave counters in the store; the publishing process sums them and writes outputs."""
        self.store.set(f"locotrain/stats/{self.rank}", json.dumps(self.my_stats()))
        if self.recorder is None:
            return
        dead = {self.procs[r].name for r in self.transport.dead}
        stats = []
        for r, proc in enumerate(self.procs):
            if proc.name in dead:
                continue
            try:
                self.store.wait([f"locotrain/stats/{r}"], timedelta(seconds=self.cfg.runtime.timeout_s))
                stats.append(json.loads(self.store.get(f"locotrain/stats/{r}")))
            except RuntimeError:
                dead.add(proc.name)
        final = self.recorder.finish()
        workers = [s for s in stats if s["worker"] is not None]
        total = {k: sum(s[k] for s in stats) for k in ("tokens", "inner_steps", "bytes_sent",
                                                       "bytes_inter_region")}
        if dead:  # their trained tokens, as far as they got; what the model lacks was lost
            for r, proc in enumerate(self.procs):
                if proc.name in dead and self.store.check([f"{_COUNTERS}/{r}"]):
                    tokens, steps = map(int, self.store.get(f"{_COUNTERS}/{r}").split())
                    total["tokens"] += tokens
                    total["inner_steps"] += steps
            total["tokens_lost"] = max(0, total["tokens"] - final["tokens"])
            total["tokens"] -= total["tokens_lost"]
        elapsed = max(s["finished_at"] for s in stats)
        compute = [sum(e - b for k, b, e in s["spans"] if k == "compute") for s in workers]
        total |= {"peak_payload_bytes": max(s["peak_payload_bytes"] for s in stats),
                  "wall_per_step": [x for s in workers for x in s["wall_per_step"]],
                  "utilization": sum(c / max(elapsed, 1e-9) for c in compute) / max(1, len(compute)),
                  "runtime": f"torch.distributed ({self.backend}) + TCP messages",
                  "bytes_by_host": {s["name"]: s["bytes_sent"] for s in stats},
                  "step_time_by_worker_s": [float(np.median(s["wall_per_step"] or [0.0])) for s in workers]}
        if dead:
            total["dead_processes"] = sorted(dead)
        summary = summarize(self.cfg, self.setup, self.recorder, final, total, elapsed)
        if self.out is not None:
            spans = [{"process": s["name"], "kind": k, "start": b, "end": e}
                     for s in stats for k, b, e in s["spans"]]
            params = dict(zip(self.job.param_names, self.recorder.last[0]))
            write_outputs(self.out, self.cfg, self.setup, params, summary, self.recorder, spans)
        self.summary = summary

    def close(self) -> None:
        self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _my_address(host: str) -> str:
    """The address other ranks reach this one at: the route toward MASTER_ADDR."""
    if host:
        return host
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master, 9))
        return s.getsockname()[0]


# A checkpoint walks what a process holds (its generator, snapshot.py), not the runtime around
# it: a replay rebuilds these, the engine saves the worker's state, and dist_snapshot saves the
# mailbox (whose contents a replay does not have when it restores).
snapshot.skip(_Context, DistRuntime, Engine, Transport, Algorithm, Job, Codec)
