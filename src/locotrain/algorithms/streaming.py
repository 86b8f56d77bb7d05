"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): DiLoCo that syncs the model
one fragment at a time, overlaps each fragment's all-reduce with `tau` inner steps, and mixes
the returned global fragment into the local one with weight `alpha`.

Fragments. The L transformer blocks are split into P = `fragments` groups of F = L/P blocks:
"strided" puts blocks {p, p+P, p+2P, ...} in fragment p (the paper's default), "sequential"
puts blocks [pF, (p+1)F). The paper does not say where the embedding, the head and other
non-block tensors (latent_ln) go: `embeddings = "first"` adds them to fragment 0,
`embeddings = "own"` makes them one extra fragment (index P), so Q = P or P+1 fragments sync.
Every block trains at every inner step; nothing is frozen.

Schedule. One fragment syncs every gap = H/Q steps, round-robin, fragment p at
t_p = (p+1) gap and every H steps after, and its all-reduce overlaps `tau` inner steps. The
paper's Algorithm 1 can be read two ways, and `tau_anchor` picks one:
  * "send" (default, the paper's pseudocode as we read it): the outer gradient is taken at
    t_p + kH and merged tau steps later, at t_p + kH + tau;
  * "merge" (torchft, github.com/pytorch/torchft, torchft/local_sgd.py): the outer gradient
    is taken tau steps earlier, at t_p + kH - tau, so that the merge falls on t_p + kH.
Both coincide at tau = 0. H % Q == 0 and tau < H/Q, so at most one fragment is ever in
flight.

Per fragment every worker keeps the global snapshot theta_p and its own outer Nesterov state
(identical on all workers). Send: delta_p = theta_p - phi_p. Receive: theta_p <- Nesterov
step with the mean delta, then phi_p <- alpha phi_p + (1 - alpha) theta_p.

End of run (our choice; neither source defines it). After the planned S inner steps, a
fragment still in flight is received and merged as usual (it counts as synced: re-sending it
at once would carry only alpha times its < tau fresh steps, and with alpha = 0 an exact zero
delta, i.e. a pure outer-momentum step). Then every other fragment whose last send came
before step S (or that never sent) does one final blocking sync at step S, so the final
global model contains all training. This costs at most one extra model of bytes per run. With
one fragment the schedule is exactly DiLoCo's, including a shorter last round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..codecs import make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import Nesterov
from ..runtime.api import Algorithm

_BLOCK = re.compile(r"^h(\d+)\.")
PAPER_BLOCKS_PER_FRAGMENT = 3  # Streaming DiLoCo's fragment size at every scale


@dataclass
class StreamingSettings(CodecSettings):
    """Defaults are the paper's main setting (H = 100, fragments of 3 blocks, strided,
    tau = 1, alpha = 0.5; outer Nesterov momentum 0.9) except the outer lr: 0.7 as in
    torchft's example and DiLoCo (the paper's 0.4 is unverified). The paper sends fp4;
    set codec = "fp4" for that."""
    H: int = 100
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 0  # P; 0 = as many as give fragments of about 3 blocks (at least 1)
    fragment_pattern: str = choice("strided", "strided", "sequential")
    embeddings: str = choice("first", "first", "own")  # wte/head join fragment 0, or sync alone
    tau: int = 1  # inner steps a fragment's all-reduce overlaps; tau < H / (fragments synced)
    alpha: float = 0.5  # merge: local = alpha * local + (1 - alpha) * global
    tau_anchor: str = choice("send", "send", "merge")
    # Time a fragment's sync as the papers' per-layer DAG does (docs/planner.md): it may
    # start when the last backward pass has finished its top block and must end when the
    # next forward pass reaches its bottom block. Timing only (the simulator's); the same
    # arithmetic.
    layer_windows: bool = False
    reset_inner_state_each_round: bool = False


def dag_window(names: list[str], depth: int) -> float:
    """How far past the step boundary an all-reduce of these parameters can reach, in steps,
    in the per-layer DAG of the Streaming DiLoCo and eager-updates papers' simulator (specs
    section 12). Backward (2/3 of a step) runs top down, so block b of L has its gradient
    final with b / L of it left: the sync can start (2/3) x_top before the boundary; forward
    (1/3) reaches block b at b / L of it: the sync must be done (1/3) x_bottom after. The
    embedding is at the bottom (0), the head at the top (1). In a loaded link the bytes
    cross in that window, whatever their order. A timing model only: the simulator's wait
    slack (api.Context.wait); the arithmetic is the same."""
    xs = []
    for n in names:
        m = _BLOCK.match(n)
        xs.append(int(m.group(1)) / depth if m else (0.0 if n == "wte" else 1.0))
    return (2 * max(xs) + min(xs)) / 3


def default_fragments(depth: int) -> int:
    """The largest P <= depth / 3 that divides the depth (fragments of >= 3 blocks), or 1."""
    return max([P for P in range(1, depth // PAPER_BLOCKS_PER_FRAGMENT + 1) if depth % P == 0],
               default=1)


class StreamingDiLoCo(Algorithm):
    name = "streaming"

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        L = job.depth
        self.P = P = cfg.fragments or default_fragments(L)
        if cfg.H < 1:
            raise UserError(f"algorithm.H must be >= 1, got {cfg.H}")
        if P < 1 or L % P:
            raise UserError(f"model.depth ({L}) must be divisible by algorithm.fragments ({P}); "
                            "pick a number of fragments that divides the depth")
        Q = len(self.fragments())
        if cfg.H % Q:
            own = " = algorithm.fragments + 1, as algorithm.embeddings = own" if Q > P else ""
            raise UserError(f"algorithm.H ({cfg.H}) must be divisible by the number of fragments "
                            f"({Q}{own}); pick H as a multiple of {Q}")
        if not 0 <= cfg.tau < cfg.H // Q:
            raise UserError(f"algorithm.tau ({cfg.tau}) must be in [0, algorithm.H / fragments) "
                            f"= [0, {cfg.H // Q}): at most one fragment may be in flight")
        if not 0.0 <= cfg.alpha <= 1.0:
            raise UserError(f"algorithm.alpha must be in [0, 1], got {cfg.alpha}")

    def processes(self):
        return self.worker_processes(self.worker)

    def fragments(self) -> list[list[str]]:
        """Parameter names of each fragment, each in job.param_names order."""
        P, L, cfg = self.P, self.job.depth, self.cfg
        F = L // P
        if cfg.fragment_pattern == "strided":
            owner = {b: b % P for b in range(L)}
        else:
            owner = {b: b // F for b in range(L)}
        Q = P + (cfg.embeddings == "own")
        frags: list[list[str]] = [[] for _ in range(Q)]
        for name in self.job.param_names:
            m = _BLOCK.match(name)
            # Non-block tensors (embedding, head, latent_ln) join fragment 0 or sync alone.
            frags[owner[int(m.group(1))] if m else (Q - 1 if Q > P else 0)].append(name)
        return frags

    def worker(self, ctx, inner=None, scale: float = 1.0):
        """`inner(n)`, a generator of n inner steps (`ctx.train(n)` unless given), and
        `scale`, applied to this worker's outer gradient, let hierarchical.py run the same
        fragment schedule over data-parallel regions."""
        job, cfg = self.job, self.cfg

        def train(n):
            yield ctx.train(n)

        inner = inner or train
        codec = make_codec(cfg.codec, cfg.codec_block)
        frags = self.fragments()
        Q, S, alpha, tau = len(frags), job.planned_steps, cfg.alpha, cfg.tau
        gap = cfg.H // Q  # steps between two consecutive fragment sends
        phi = ctx.params
        theta = {n: phi[n].detach().clone() for n in job.param_names}
        outer = [Nesterov(cfg.outer_lr, cfg.outer_momentum) for _ in frags]
        tokens_per_step = sum(job.tokens_per_step(m) for m in range(job.M))
        state = {"received": 0}
        if ctx.worker == 0:  # the layout once, so a run's log says what each sync carries
            parts = []
            for p, f in enumerate(frags):
                blocks = sorted({int(m.group(1)) for n in f if (m := _BLOCK.match(n))})
                other = [n for n in f if not _BLOCK.match(n)]
                parts.append(f"f{p} = blocks {blocks}{' + ' + ', '.join(other) if other else ''} "
                             f"({sum(phi[n].numel() for n in f)} values)")
            ctx.log(f"streaming: {Q} fragments ({cfg.fragment_pattern}, embeddings "
                    f"{cfg.embeddings}): " + "; ".join(parts))
            ctx.publish([theta[n] for n in job.param_names], 0, 0)

        slack = [dag_window(f, job.depth) if cfg.layer_windows else 0.0 for f in frags]

        def send(p):
            with torch.no_grad():
                delta = [(theta[n] - phi[n]) * scale if scale != 1.0 else theta[n] - phi[n]
                         for n in frags[p]]
            return ctx.start_all_reduce(delta, codec)  # the runtime snapshots the payload

        def receive(p, handle, step):
            mean = yield ctx.wait(handle, slack[p])
            outer[p].step([theta[n] for n in frags[p]], mean)
            with torch.no_grad():  # in place, so the inner optimizer keeps these tensors
                for n in frags[p]:
                    phi[n].lerp_(theta[n], 1.0 - alpha)  # exact theta at alpha=0
            state["received"] += 1
            if cfg.reset_inner_state_each_round and p == Q - 1:
                ctx.reset_optimizer()
            if ctx.worker == 0:
                ctx.publish([theta[n] for n in job.param_names], step * tokens_per_step,
                            state["received"])

        # Fragment sends happen at steps t with (t + offset) % gap == 0, t > 0; the receive
        # follows tau steps later. offset = tau moves the sends so merges fall on the grid.
        offset = tau if cfg.tau_anchor == "merge" else 0
        last_send = [0] * Q  # steps are 1-based, so 0 = never sent
        inflight = None  # (fragment, handle, step at which it is received)
        t = 0
        while t < S:
            nxt = min(S, ((t + offset) // gap + 1) * gap - offset)
            if inflight is not None:
                nxt = min(nxt, inflight[2])
            yield from inner(nxt - t)
            t = nxt
            if inflight is not None and inflight[2] == t:
                yield from receive(inflight[0], inflight[1], t)
                inflight = None
            if (t + offset) % gap == 0:  # tau < gap, so never also a receive step
                p = ((t + offset) // gap - 1) % Q
                handle, last_send[p] = send(p), t
                if tau == 0:
                    yield from receive(p, handle, t)
                else:
                    inflight = (p, handle, t + tau)
        if inflight is not None:
            yield from receive(inflight[0], inflight[1], S)
            last_send[inflight[0]] = S
        for p in range(Q):
            if last_send[p] < S:
                yield from receive(p, send(p), S)


ALGORITHM = StreamingDiLoCo
SETTINGS = StreamingSettings
