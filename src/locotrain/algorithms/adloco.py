"""AdLoCo (Kutuzov et al. 2025, arXiv 2508.18182): several DiLoCo instances ("trainers") on one
pool of nodes, each growing its batch size by a norm test, merged pairwise every few outer
steps. Rules from the reference code (github.com/funmagster/AdLoCo: trainers.py, cluster.py,
algorithms/calc_batch.py, policies.py, switch_mode.py); the paper itself was not read beyond
its abstract, and its theorem on the number of communications was not retrieved.

How the paper's pieces map onto our primitives
----------------------------------------------

* **Node = worker.** A node is one training stream. A device hosting k streams is k workers in
  one region whose speeds add up to the device's (a custom cluster: `count = k`, `speed = s/k`);
  the reference's 4 nodes per GPU are 4 such workers. Every node trains b sequences per step at
  its own worker's step time, scaled by b / train.batch_size (the simulator charges a batch its
  size). We do not give faster devices larger batches: inside a trainer every node uses b.
* **Trainer = group of workers.** Trainer k is a DiLoCo instance over its nodes: H inner steps
  of per-node batch b_k, one all-reduce of the outer gradients (with `codec`) over its group,
  then an outer SGD step, with momentum if `outer_momentum` > 0 (the reference: plain SGD, lr
  0.5). Every node of trainer k keeps its own copy of theta_k and of the outer state, as in
  diloco.py. Groups are formed during the run (`ctx.form_groups`) whenever membership changes;
  every worker computes the same membership from the same exchanged numbers.
* **Initial trainers.** `trainers` groups of consecutive workers (a region's workers stay
  together when regions are contiguous, as in every preset); all start from the same theta_0.
* **Norm test.** Each node keeps its last inner step's gradient g_m (the last step is taken as
  `gradients` + `apply`, the same arithmetic as a `train` step). With M the trainer's nodes:
        gbar = mean_m g_m;  V = b/(M-1) sum_m ||g_m - gbar||^2
        T = ceil(V / (M eta^2 ||gbar||^2));  b <- max(b, T)       (monotone)
  sum_m ||g_m - gbar||^2 = sum_m ||g_m||^2 - M ||gbar||^2, so the trainer all-reduces only
  ||g_m||^2 and gbar. gbar is model-sized; instead we all-reduce a count sketch of g_m
  (`sketch_dim` values: a seeded hash bucket and sign per parameter, E||S x||^2 = ||x||^2,
  relative error about sqrt(2 / sketch_dim), 4% at 1023) and take ||S gbar||^2 for
  ||gbar||^2. With `sketch_dim = 0` or >= the parameter count the gradient itself is sent
  (exact, but a second model-sized all-reduce per round, and not resumable: a resumed run
  replays only small exchanges). The reference, one process holding every gradient, needs none
  of this. A trainer of one node keeps its b (no variance estimate, as the reference).
  `batch_test = "inner_product"`: the reference's augmented inner-product test, T = max(T_ip,
  T_orth), T_ip = var_m(<g_m, gbar>) / (nu^2 ||gbar||^4), T_orth = the per-coordinate variance
  of the components of g_m orthogonal to gbar / (nu^2 ||gbar||^2), as calc_batch.py computes
  them (unbiased variances, no factor b, one nu for both; its vartheta is read nowhere). A
  second all-reduce of 2 values gives var_m <g_m, gbar>. `batch_test = "none"` freezes b.
* **Batch demand and node reassignment.** After every outer step (and after a merge) nodes
  are reassigned in proportion to D_k = nodes_k x b_k: max(1, round(N D_k / sum D)), the
  rounding error fixed on the largest demands first, never below one node (the reference's
  rule, whose fix-up can leave a trainer with none). Unlike the reference, which deals every
  node out afresh each round, a trainer that shrinks releases its highest-numbered nodes and
  the others keep theirs, so the fewest nodes move. A node joining trainer k receives
  theta_k (and its momentum) from k's lowest-numbered staying node: one fp32 message. Its
  inner optimizer state stays (it is per node; `reset_inner_state_each_round` forgets it
  every round, as the reference, which builds a fresh AdamW per node per round).
* **Exchanges.** When the test runs and there are several trainers, every worker learns every
  trainer's new b from one all-reduce over all workers of M numbers (slot m holds M b of
  worker m's trainer, so the mean is exact). All such small exchanges are fp32 and counted in
  the bytes; so are merges and the messages of moving nodes.
* **Merges.** Every `merge_frequency` outer steps while several trainers remain, the policy
  picks two (`worst_with_worst`: the two smallest demands, the smaller absorbed;
  `best_with_worst`: the largest absorbs the smallest; ties by trainer number):
  theta = (D_a theta_a + D_b theta_b) / (D_a + D_b), one fp32 all-reduce over both trainers'
  nodes (node m contributes theta b (n_a + n_b) / (D_a + D_b)). The absorber keeps its b and
  outer state (its momentum rides along in the same all-reduce); the absorbed trainer's is
  discarded. If several trainers remain when the token budget is spent, they are merged the
  same way into one final model (the reference returns one model per trainer).
* **Switch mode.** `device_batch` is the most sequences a device holds at once (the
  reference's b_max, found there by a binary search over memory); a larger b accumulates
  gradients over ceil(b / device_batch) passes (`micro_batch`). The result is the same
  gradient, so the reference's accumulation-vs-loader modes differ only in memory, which we
  do not model. `max_batch` caps b (0 = no cap; the reference has none).
* **Budget and schedule.** Rounds run until train.tokens are spent; a round's steps shrink
  when fewer are left (at least one step). The learning rate follows the share of the token
  budget spent, step by step (as dylu in diloco.py), since the step count is not known ahead.
  Trainers run in lock-step (the reference runs every trainer's round, then merges).
* **What is evaluated.** Worker 0's trainer's theta after every round (the final merged model
  at the end); `tokens` count every trainer's tokens, `outer_updates` the rounds.
* **Records.** Worker 0 logs the trainers (b and nodes) at the start, after a round whose
  test changed a b, after a merge or reassignment, and every merge itself, as lines in
  metrics.jsonl ({"event": "log", "text": "[t=...s w0] adloco round R: trainer 0 b=4 nodes
  [0, 1]; ..."}; t is virtual time in the simulator, wall time for real). `loco run` prints
  them too. experiments/adloco_vs_diloco.py parses them into the batch schedule.

With one trainer, `batch_test = "none"`, `initial_batch = train.batch_size` and momentum 0 it
is DiLoCo with plain-SGD outer steps (pinned by tests/test_adloco.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..codecs import flatten, make_codec
from ..config import CodecSettings, choice
from ..errors import UserError
from ..optim import Nesterov
from ..runtime.api import Algorithm, Handle


@dataclass
class AdLoCoSettings(CodecSettings):
    """Defaults from the reference's config.yaml where they fit a small run: outer SGD lr 0.5
    without momentum, eta 0.8, nu 0.3, merges every 2 outer steps, worst with worst. Its H is
    200, 4 trainers and an initial batch of 1; ours are smaller and larger to suit runs of a
    few hundred steps on 2-16 workers."""
    H: int = 50  # inner steps per outer round
    trainers: int = 2  # DiLoCo instances at the start (at most the number of workers)
    merge_frequency: int = 2  # merge two trainers every this many outer steps
    merge_policy: str = choice("worst_with_worst", "worst_with_worst", "best_with_worst")
    initial_batch: int = 4  # b at the start: sequences per node per inner step
    batch_test: str = choice("norm", "norm", "inner_product", "none")  # none = b frozen
    eta: float = 0.8  # the norm test's eta_nt
    nu: float = 0.3  # the augmented inner-product test's nu
    max_batch: int = 0  # b never grows past this (0 = no cap)
    device_batch: int = 0  # sequences per forward/backward; larger b accumulates (0 = any)
    sketch_dim: int = 1023  # count-sketch size for the norm test's mean gradient (0 = exact)
    outer_lr: float = 0.5
    outer_momentum: float = 0.0  # Nesterov momentum of the outer SGD (the reference: none)
    reset_inner_state_each_round: bool = False


# --------------------------------------------------------------------------- pure rules


def initial_trainers(M: int, T: int) -> dict[int, list[int]]:
    """T trainers of consecutive workers, sizes as equal as the reference's rounding makes
    them (3 workers, 2 trainers: [0], [1, 2])."""
    return distribute({t: [] for t in range(T)}, {t: 1 for t in range(T)}, M, fresh=True)


def node_counts(demand: dict[int, float], N: int) -> dict[int, int]:
    """Nodes per trainer in proportion to demand: max(1, round(N D / sum D)), the rounding
    error fixed on the largest demands first (ties: trainer number), never below 1."""
    order = sorted(demand, key=lambda t: -demand[t])
    total = sum(demand.values())
    counts = {t: max(1, round(demand[t] / total * N)) for t in demand}
    left, i = N - sum(counts.values()), 0
    while left:
        t = order[i % len(order)]
        if left > 0:
            counts[t] += 1
            left -= 1
        elif counts[t] > 1:
            counts[t] -= 1
            left += 1
        i += 1
    return counts


def distribute(members: dict[int, list[int]], batch: dict[int, int], N: int,
               fresh: bool = False) -> dict[int, list[int]]:
    """The next membership: counts from demand nodes x b (a trainer with no nodes yet counts
    b, as the reference). Trainers above their count release their highest-numbered nodes,
    which join the trainers below theirs in trainer order, lowest-numbered first."""
    demand = {t: (len(m) or 1) * batch[t] for t, m in members.items()}
    counts = node_counts(demand, N)
    if fresh:  # consecutive blocks
        out, start = {}, 0
        for t in members:
            out[t] = list(range(start, start + counts[t]))
            start += counts[t]
        return out
    out = {t: sorted(m)[:counts[t]] for t, m in members.items()}
    pool = sorted(n for t, m in members.items() for n in sorted(m)[counts[t]:])
    for t in out:
        need = counts[t] - len(out[t])
        out[t] = sorted(out[t] + pool[:need])
        pool = pool[need:]
    return out


def pick_merge(members: dict[int, list[int]], batch: dict[int, int],
               policy: str) -> tuple[int, int]:
    """(absorber, absorbed) by demand nodes x b."""
    demand = {t: len(m) * batch[t] for t, m in members.items()}
    if policy == "worst_with_worst":
        low = sorted(members, key=lambda t: demand[t])
        return low[1], low[0]
    high = sorted(members, key=lambda t: -demand[t])
    return high[0], high[-1]


def norm_test(b: int, M: int, mean_sq_norm: float, gbar_sq: float, eta: float) -> int:
    """The norm test from the mean of ||g_m||^2 and ||gbar||^2: max(b, T)."""
    if M < 2 or gbar_sq < 1e-12:
        return b
    spread = max(0.0, M * mean_sq_norm - M * gbar_sq)  # sum_m ||g_m - gbar||^2
    V = b / (M - 1) * spread
    return max(b, math.ceil(V / (M * eta ** 2 * gbar_sq)))


def inner_product_test(b: int, M: int, numel: int, mean_sq_norm: float, gbar_sq: float,
                       mean_x: float, mean_x2: float, nu: float) -> int:
    """The reference's augmented inner-product test from x_m = <g_m, gbar>: T_ip =
    var(x) / (nu^2 ||gbar||^4); T_orth = sum_m ||g_m - x_m gbar / ||gbar||^2||^2 /
    (M numel - 1) / (nu^2 ||gbar||^2) (torch.var over every coordinate, whose mean is 0)."""
    if M < 2 or gbar_sq < 1e-12:
        return b
    var_ip = max(0.0, M / (M - 1) * (mean_x2 - mean_x ** 2))
    orth = max(0.0, M * mean_sq_norm - M * mean_x2 / gbar_sq)
    T_ip = var_ip / (nu ** 2 * gbar_sq ** 2)
    T_orth = orth / (M * numel - 1) / (nu ** 2 * gbar_sq)
    return max(b, math.ceil(max(T_ip, T_orth)))


class CountSketch:
    """x -> S x in R^dim: every coordinate added, with a seeded random sign, to a seeded random
    bucket. Linear, the same on every worker, and E||S x||^2 = ||x||^2, E<Sx, Sy> = <x, y>.
    Its tables (12 bytes a parameter) live in a module-level cache, shared by the simulator's
    workers and outside what a checkpoint walks (they are rebuilt from the seed)."""

    def __init__(self, numel: int, dim: int, seed: int = 0):
        self.numel, self.dim, self.seed = numel, dim, seed

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.numel, self.dim, self.seed, str(device))
        if key not in _SKETCH_TABLES:
            g = torch.Generator().manual_seed(self.seed)
            bucket = torch.randint(self.dim, (self.numel,), generator=g)
            sign = torch.randint(0, 2, (self.numel,), generator=g).float().mul_(2).sub_(1)
            _SKETCH_TABLES[key] = (bucket.to(device), sign.to(device))
        return _SKETCH_TABLES[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bucket, sign = self.tables(x.device)
        return torch.zeros(self.dim, dtype=x.dtype, device=x.device).index_add_(0, bucket, x * sign)


_SKETCH_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def describe(members: dict[int, list[int]], batch: dict[int, int]) -> str:
    return "; ".join(f"trainer {t} b={batch[t]} nodes {members[t]}" for t in members)


_LOG = re.compile(r"^\[t=([0-9.]+)s w0\] adloco (?:round \d+|end): (.*)$")
_TRAINER = re.compile(r"trainer (\d+) b=(\d+) nodes")
_MERGE = re.compile(r"merge trainers? ([0-9, ]+?) \(.*?\) into (trainer \d+|the final model)")


def timeline_marks(logs: list[str]) -> dict:
    """What report.py draws over the timeline, from worker 0's log lines (describe() and the
    merge lines): each merge as a vertical mark, and each trainer's batch as a step line."""
    marks, series = [], {}
    for line in logs:
        m = _LOG.match(line)
        if not m:
            continue
        t, text = float(m.group(1)), m.group(2)
        if "merge" in text:
            merged = _MERGE.search(text)
            marks.append((t, f"merge {merged.group(1)} \u2192 {merged.group(2).split()[-1]}"
                          if merged else "merge"))
        for k, b in _TRAINER.findall(text):
            series.setdefault(f"trainer {k}", []).append((t, int(b)))
    return {"marks": marks, "series": series, "series_label": "batch per trainer (b)"}


# --------------------------------------------------------------------------- the algorithm


class AdLoCo(Algorithm):
    name = "adloco"

    def __init__(self, cfg, job):
        super().__init__(cfg, job)
        M = job.M
        checks = [
            (cfg.H >= 1, f"algorithm.H must be >= 1, got {cfg.H}"),
            (cfg.trainers >= 1, f"algorithm.trainers must be >= 1, got {cfg.trainers}"),
            (cfg.trainers <= M, f"algorithm.trainers = {cfg.trainers}, but the cluster has {M} "
                                f"worker(s) and every trainer needs one; set algorithm.trainers "
                                f"<= {M} or add workers"),
            (cfg.merge_frequency >= 1, f"algorithm.merge_frequency must be >= 1 (outer steps "
                                       f"between merges), got {cfg.merge_frequency}"),
            (cfg.initial_batch >= 1, f"algorithm.initial_batch must be >= 1 (sequences per node "
                                     f"per step), got {cfg.initial_batch}"),
            (cfg.eta > 0, f"algorithm.eta must be > 0, got {cfg.eta}"),
            (cfg.nu > 0, f"algorithm.nu must be > 0, got {cfg.nu}"),
            (cfg.max_batch == 0 or cfg.max_batch >= cfg.initial_batch,
             f"algorithm.max_batch = {cfg.max_batch} is below algorithm.initial_batch = "
             f"{cfg.initial_batch}; raise it, or 0 for no cap"),
            (cfg.device_batch >= 0, f"algorithm.device_batch must be >= 0 (0 = no limit), got "
                                    f"{cfg.device_batch}"),
            (cfg.sketch_dim >= 0, f"algorithm.sketch_dim must be >= 0 (0 = exact), got "
                                  f"{cfg.sketch_dim}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def processes(self):
        return self.worker_processes(self.worker)

    # -- helpers --------------------------------------------------------------------
    def _start(self, ctx, tensors, codec, group: list[int]) -> Handle:
        """All-reduce over a group of workers; a group of one is its own mean (no exchange)."""
        if len(group) == 1:
            return Handle("all_reduce", done=True, result=[t.clone() for t in tensors])
        return ctx.start_all_reduce(tensors, codec, None if len(group) == self.job.M else tuple(group))

    def _form(self, ctx, formed: set, groups) -> None:
        """Every worker calls this at the same points with the same groups (api.form_groups)."""
        new = [tuple(g) for g in groups if 1 < len(g) < self.job.M and tuple(g) not in formed]
        new = list(dict.fromkeys(new))
        if new:
            formed.update(new)
            ctx.form_groups(new)

    def worker(self, ctx):
        job, cfg = self.job, self.cfg
        M, me = job.M, ctx.worker
        codec, fp32 = make_codec(cfg.codec, cfg.codec_block), make_codec("fp32")
        params = list(ctx.params.values())
        theta = [p.detach().clone() for p in params]
        outer = Nesterov(cfg.outer_lr, cfg.outer_momentum)
        momentum = cfg.outer_momentum > 0
        numel = sum(p.numel() for p in params)
        sketch = CountSketch(numel, cfg.sketch_dim) if 0 < cfg.sketch_dim < numel else None
        testing = cfg.batch_test != "none"
        members = initial_trainers(M, cfg.trainers)
        batch = {t: cfg.initial_batch for t in members}
        formed: set = set()
        self._form(ctx, formed, members.values())
        sends = []
        if me == 0:
            ctx.publish(theta, 0, 0)
            ctx.log(f"adloco round 0: {describe(members, batch)}")

        def outer_state() -> list[torch.Tensor]:  # what a trainer's nodes share besides theta
            if not momentum:
                return []
            return outer.buf if outer.buf is not None else [torch.zeros_like(t) for t in theta]

        def adopt(tensors) -> None:  # this node's trainer state := tensors (theta [+ momentum])
            with torch.no_grad():
                for t, v in zip(theta, tensors[:len(theta)]):
                    t.copy_(v)
                for p, t in zip(params, theta):
                    p.copy_(t)
            if momentum:
                outer.buf = [v.clone() for v in tensors[len(theta):]]

        total, spent, r = job.total_tokens, 0, 0
        while spent < total:
            r += 1
            mine = next(t for t, m in members.items() if me in m)
            group, b = members[mine], batch[mine]
            per_step = job.seq_len * sum(len(m) * batch[t] for t, m in members.items())
            h = min(cfg.H, -(-(total - spent) // per_step))
            p0, p1 = spent / total, min(1.0, (spent + h * per_step) / total)
            micro = cfg.device_batch if 0 < cfg.device_batch < b else None
            test_here = testing and len(group) >= 2
            if test_here:  # the last step apart, to keep its gradient
                last = p0 + (p1 - p0) * (h - 1) / h
                if h > 1:
                    yield ctx.train(h - 1, p0, last, batch_size=b, micro_batch=micro)
                grads = yield ctx.gradients(batch_size=b, micro_batch=micro)
                g = flatten(grads)
                yield ctx.apply(grads, progress=last)
            else:
                yield ctx.train(h, p0, p1, batch_size=b, micro_batch=micro)
            spent += h * per_step
            with torch.no_grad():
                delta = [t - p for t, p in zip(theta, params)]
            pending = self._start(ctx, delta, codec, group)
            new_b = b
            if test_here:  # (never yield inside no_grad: the mode is global, other processes run)
                s = sketch(g) if sketch is not None else g
                stats = yield ctx.wait(self._start(ctx, [s, g.pow(2).sum().reshape(1)], fp32, group))
                sbar = stats[0].double()
                gbar_sq, mean_sq = sbar.pow(2).sum().item(), stats[1].double().item()
                if cfg.batch_test == "norm":
                    new_b = norm_test(b, len(group), mean_sq, gbar_sq, cfg.eta)
                else:
                    x = (s.double() @ sbar).reshape(1)
                    ip = yield ctx.wait(self._start(ctx, [torch.cat([x, x * x]).float()], fp32, group))
                    new_b = inner_product_test(b, len(group), numel, mean_sq, gbar_sq,
                                               ip[0][0].item(), ip[0][1].item(), cfg.nu)
                if cfg.max_batch:
                    new_b = min(new_b, max(b, cfg.max_batch))
            control = None
            if testing and len(members) > 1:  # every trainer's new b, exactly
                slots = torch.zeros(M)
                slots[me] = float(new_b * M)
                control = self._start(ctx, [slots], fp32, list(range(M)))
            mean = yield ctx.wait(pending)
            outer.step(theta, mean)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            if cfg.reset_inner_state_each_round:
                ctx.reset_optimizer()
            before = dict(batch)
            if control is not None:
                slots = (yield ctx.wait(control))[0]
                for t, m in members.items():
                    batch[t] = int(round(slots[m[0]].item()))
            else:
                batch[mine] = new_b
            if me == 0 and batch != before:  # the batch schedule, as it changes
                ctx.log(f"adloco round {r}: {describe(members, batch)}")
            if spent >= total:
                if me == 0 and len(members) == 1:
                    ctx.publish(theta, spent, r)
                break
            if me == 0:
                ctx.publish(theta, spent, r)
            changed = False  # membership
            if len(members) > 1 and r % cfg.merge_frequency == 0:
                a, v = pick_merge(members, batch, cfg.merge_policy)
                union = sorted(members[a] + members[v])
                D = {t: len(members[t]) * batch[t] for t in (a, v)}
                self._form(ctx, formed, [union])
                if me in union:
                    w = batch[mine] * len(union) / (D[a] + D[v])
                    state = outer_state()
                    share = (len(union) / len(members[a])) if mine == a else 0.0
                    merged = yield ctx.wait(self._start(
                        ctx, [t * w for t in theta] + [s * share for s in state], fp32, union))
                    adopt(merged)
                if me == 0:
                    ctx.log(f"adloco round {r}: merge trainer {v} (demand {D[v]}) into trainer "
                            f"{a} (demand {D[a]}), weights {D[v] / (D[a] + D[v]):.4f} / "
                            f"{D[a] / (D[a] + D[v]):.4f}")
                members[a] = union
                del members[v], batch[v]
                changed = True
            moved = distribute(members, batch, M)
            if moved != members:
                self._form(ctx, formed, moved.values())
                for t in moved:
                    stay = [n for n in moved[t] if n in members[t]]
                    for n in (n for n in moved[t] if n not in members[t]):
                        if me == stay[0]:  # the trainer's lowest-numbered staying node
                            sends.append(ctx.send(job.worker_name(n), theta + outer_state(), fp32,
                                                  {"trainer": t}))
                        if me == n:
                            msg = yield ctx.recv(src=job.worker_name(stay[0]))
                            adopt(msg.tensors)
                members, changed = moved, True
            if me == 0 and changed:  # after a merge or a reassignment
                ctx.log(f"adloco round {r}: {describe(members, batch)}")
        if len(members) > 1:  # the budget is spent: one final model, merged by demand
            D = {t: len(m) * batch[t] for t, m in members.items()}
            mine = next(t for t, m in members.items() if me in m)
            w = batch[mine] * M / sum(D.values())
            merged = yield ctx.wait(self._start(ctx, [t * w for t in theta], fp32, list(range(M))))
            adopt(merged)
            if me == 0:
                ctx.log(f"adloco end: merge trainers {', '.join(map(str, members))} (demands "
                        f"{', '.join(str(D[t]) for t in members)}) into the final model")
                ctx.publish(theta, spent, r)
        for handle in sends:
            yield ctx.wait(handle)


ALGORITHM = AdLoCo
SETTINGS = AdLoCoSettings
