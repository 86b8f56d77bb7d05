"""Oracles for the asynchronous algorithms (Async Local-SGD, HALoS): the delayed-Nesterov rule,
the synchronous special case, dynamic local updates, a hand-built staleness timeline, the token
budget, the one-worker HALoS reduction, HALoS's accounting, and config checks."""

import math

import pytest
import torch

from locotrain.algorithms.parameter_server import dylu_steps
from locotrain.codecs import make_codec
from locotrain.data import make_shards
from locotrain.errors import UserError
from locotrain.optim import DelayedNesterov, Nesterov
from locotrain.run import build, simulate
from locotrain.runtime import sim
from locotrain.runtime.engine import Engine

from conftest import tiny_config

TOK = 8 * 16  # tokens of one inner step of one worker in the tiny config (batch 8 x seq 16)
NO_EVALS = "eval.every=100000000"  # evaluate only the initial and the final model


def custom(speeds, latency=0.0, step=1.0, server_s=0.0):
    """One region 'a', unlimited bandwidth, one worker per entry of `speeds`."""
    workers = ", ".join(f"{{region='a', speed={s}}}" for s in speeds)
    return ["cluster.preset=custom", "cluster.regions=['a']", f"cluster.latency_s=[[{latency}]]",
            "cluster.bandwidth_gbps=[[0.0]]", f"cluster.workers=[{workers}]",
            f"cluster.step_time_s={step}", f"cluster.server_compute_s={server_s}",
            "cluster.jitter=0.0"]


def compute_spans(result):
    """Per worker (in index order): its compute spans as (start, end)."""
    return [[(s, e) for k, s, e in p.spans if k == "compute"] for p in result.runtime.worker_procs]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def all_finished(result):
    return all(p.done for p in result.runtime.procs)


# --------------------------------------------------------------------------- 1. delayed Nesterov


@pytest.mark.parametrize("N", [1, 3, 4])
def test_delayed_nesterov_with_c0_is_torch_nesterov_on_buffer_averages(N):
    """After every full buffer of N arrivals, DN(lr, beta, N, c=0) equals
    torch.optim.SGD(lr, momentum=beta, nesterov=True) fed the buffer averages; in between,
    each arrival moved theta by exactly -lr * delta / N (plain SGD, no momentum)."""
    lr, beta = 0.7, 0.9
    g = torch.Generator().manual_seed(100 + N)
    shapes = [(5, 3), (7,)]
    f64 = dict(generator=g, dtype=torch.float64)  # the identity is exact; keep rounding out of it
    theta = [torch.randn(s, **f64) for s in shapes]
    ref = [t.clone().requires_grad_(True) for t in theta]
    sgd = torch.optim.SGD(ref, lr=lr, momentum=beta, nesterov=True)
    dn = DelayedNesterov(lr, beta, N, 0.0)
    for _ in range(4):  # several buffers, so the momentum is really carried over
        deltas = [[torch.randn(s, **f64) for s in shapes] for _ in range(N)]
        before = [r.detach().clone() for r in ref]
        for i, d in enumerate(deltas[:-1]):  # mid-buffer: only the SGD part has been applied
            dn.step(theta, d)
            for t, b, *ds in zip(theta, before, *deltas[:i + 1]):
                assert torch.allclose(t, b - lr * sum(ds) / N, atol=1e-6, rtol=0)
        dn.step(theta, deltas[-1])
        for r, *ds in zip(ref, *deltas):
            r.grad = sum(ds) / N
        sgd.step()
        for t, r in zip(theta, ref):
            assert torch.allclose(t, r.detach(), atol=1e-6, rtol=0)


def test_delayed_nesterov_with_momentum_activation_by_hand():
    """N=2, c=0.25, lr=0.5, beta=0.9, theta0=1, deltas 0.4, -0.2, 1.0, 0.2, worked by hand:
        1: m=0 (not a boundary)        theta = 1 - 0.5*(0.25*0.9*0 + 0.4/2)            = 0.9
        2: m = 0.9*0 + (0.4-0.2)/2 = 0.1
           theta = 0.9 - 0.5*((1 - 0.5 + 0.25)*0.9*0.1 + (-0.2)/2)                  = 0.91625
        3: theta = 0.91625 - 0.5*(0.25*0.9*0.1 + 1.0/2)                               = 0.655
        4: m = 0.9*0.1 + (1.0+0.2)/2 = 0.69
           theta = 0.655 - 0.5*(0.75*0.9*0.69 + 0.2/2)                                = 0.372125
    """
    theta = [torch.tensor([1.0], dtype=torch.float64)]
    dn = DelayedNesterov(0.5, 0.9, 2, 0.25)
    expected = [0.9, 0.91625, 0.655, 0.372125]
    for d, want in zip([0.4, -0.2, 1.0, 0.2], expected):
        dn.step(theta, [torch.tensor([d], dtype=torch.float64)])
        assert theta[0].item() == pytest.approx(want, abs=1e-12)


def test_delayed_nesterov_with_buffer_1_is_nesterov_for_any_activation():
    """With N=1 every arrival is a buffer boundary and (1 - c*N + c) = 1: plain Nesterov."""
    g = torch.Generator().manual_seed(7)
    theta = [torch.randn(4, 3, generator=g)]
    other = [t.clone() for t in theta]
    dn, nes = DelayedNesterov(0.7, 0.9, 1, 1.0), Nesterov(0.7, 0.9)
    for _ in range(5):
        d = [torch.randn(4, 3, generator=g)]
        dn.step(theta, d)
        nes.step(other, d)
        assert torch.allclose(theta[0], other[0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 2. sync special case


@pytest.mark.parametrize("lr,momentum", [(1.0, 0.0), (0.7, 0.9)])
def test_async_with_grace_period_is_synchronous_diloco(lr, momentum):
    """Async Local-SGD publishes exactly DiLoCo's parameter sequence under these conditions:

    * M = 3 workers of equal speed in one region, zero latency, unlimited bandwidth,
      cluster.server_compute_s = 0, no jitter, no slowdowns: all tasks end at the same instant;
    * grace_period_s = 0.5 > 0 (shorter than a task): the server gathers all M arrivals, applies
      them, and hands every worker the same theta (it stops waiting once all M have arrived, so
      the run takes no longer than DiLoCo);
    * dylu left on: with equal speeds every worker runs H steps (dylu off would do the same);
    * server_optimizer = delayed_nesterov, momentum_activation c = 0, buffer_size = M: one
      buffer is one round, so DN equals Nesterov on the round's mean delta (test above);
    * the same H, outer_lr, outer_momentum for both, codec fp32;
    * a constant inner learning rate (train.warmup = 0, train.min_lr_ratio = 1): DiLoCo indexes
      the schedule by the worker's own step count, Async by the progress at task start;
    * the budget is a multiple of M * H * tokens per step, so every round is full (otherwise the
      async server cuts only the last task while DiLoCo shortens every worker's last round).
    Inner AdamW state persists in both; the workers' data streams are the same objects.
    """
    common = ["algorithm.H=4", f"algorithm.outer_lr={lr}", f"algorithm.outer_momentum={momentum}",
              "train.warmup=0", "train.min_lr_ratio=1", f"train.tokens={4 * 3 * 4 * TOK}",
              f"eval.every={3 * 4 * TOK}", *custom([1.0, 1.0, 1.0])]
    diloco = simulate(tiny_config("algorithm.name=diloco", *common))
    sync = simulate(tiny_config("algorithm.name=async_local_sgd", "algorithm.grace_period_s=0.5",
                                "algorithm.server_optimizer=delayed_nesterov",
                                "algorithm.buffer_size=3", "algorithm.momentum_activation=0",
                                "algorithm.dylu=true", *common))
    assert diloco.summary["tokens"] == sync.summary["tokens"] == 4 * 3 * 4 * TOK
    # the same evaluation points (one per round, plus the final one) with the same losses
    assert [e["tokens"] for e in sync.evals] == [e["tokens"] for e in diloco.evals]
    assert len(sync.evals) == 6
    for a, b in zip(diloco.evals, sync.evals):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5), a["tokens"]
    assert max_diff(diloco.params, sync.params) < 1e-5
    # one server version per arrival: M per DiLoCo round
    assert sync.summary["outer_updates"] == 3 * diloco.summary["outer_updates"] == 12
    # nobody waited out the grace period
    assert sync.summary["sim_time_s"] == pytest.approx(diloco.summary["sim_time_s"]) == 16.0


# --------------------------------------------------------------------------- 3. DyLU


def test_dylu_steps_rounding():
    assert dylu_steps(8, 1.0, 1.0, "floor") == dylu_steps(8, 1.0, 1.0, "ceil") == 8
    assert dylu_steps(8, 0.5, 1.0, "floor") == dylu_steps(8, 0.5, 1.0, "ceil") == 4
    assert dylu_steps(8, 0.3, 1.0, "floor") == 2
    assert dylu_steps(8, 0.3, 1.0, "ceil") == 3
    # exact ratios computed in floating point do not round the wrong way
    assert dylu_steps(10, 0.7, 1.0, "floor") == dylu_steps(10, 0.7, 1.0, "ceil") == 7
    assert dylu_steps(8, 0.01, 1.0, "floor") == 1  # at least one step


# Latency 0.1 s separates consecutive tasks of a worker, so each compute span is one task.
@pytest.mark.parametrize("dylu,durations", [("true", [8.0, 8.0, 8.0]), ("false", [8.0, 16.0, 32.0])])
def test_dylu_gives_every_worker_a_first_task_of_equal_duration(dylu, durations):
    """Speeds 1, 0.5, 0.25 at 1 s per step at speed 1, H=8: with DyLU the first tasks are
    8, 4, 2 steps of 1, 2, 4 s (8 s each); without, 8 steps each (8, 16, 32 s)."""
    r = simulate(tiny_config("algorithm.name=async_local_sgd", "algorithm.H=8",
                             f"algorithm.dylu={dylu}", "algorithm.dylu_rounding=floor",
                             f"train.tokens={24 * TOK}", NO_EVALS,
                             *custom([1.0, 0.5, 0.25], latency=0.1)))
    firsts = [spans[0] for spans in compute_spans(r)]
    assert [s for s, _ in firsts] == pytest.approx([0.1] * 3)  # all start with the first pull
    assert [e - s for s, e in firsts] == pytest.approx(durations, rel=1e-9)
    assert all_finished(r)


@pytest.mark.parametrize("rounding,steps", [("floor", 2), ("ceil", 3)])
def test_dylu_rounding_on_a_speed_of_0_3(rounding, steps):
    """H=8, speed 0.3 against a fastest of 1.0: 8 * 0.3 = 2.4 steps, floor 2 or ceil 3, each
    step taking 1/0.3 s."""
    r = simulate(tiny_config("algorithm.name=async_local_sgd", "algorithm.H=8", "algorithm.dylu=true",
                             f"algorithm.dylu_rounding={rounding}", f"train.tokens={16 * TOK}",
                             NO_EVALS, *custom([1.0, 0.3], latency=0.1)))
    (s0, e0), (s1, e1) = [spans[0] for spans in compute_spans(r)]
    assert e0 - s0 == pytest.approx(8.0, rel=1e-9)
    assert e1 - s1 == pytest.approx(steps / 0.3, rel=1e-9)


# --------------------------------------------------------------------------- 4. staleness


def test_arrival_order_and_staleness_on_a_hand_built_timeline(monkeypatch):
    """Speeds 1, 0.5, 0.25 at 1 s per step, H=2, dylu off: tasks take 2, 4 and 8 s. Zero latency,
    unlimited bandwidth, server_compute_s = 0, no grace period. Budget 10 tasks of 2 steps.
    Server version v after each arrival; staleness = v_now - v_pulled; ties at one instant go in
    worker order (the event loop breaks ties by process index), and every worker gets its next
    task right after its own update:
        t=0   w0, w1, w2 pull v0                                    (tasks 1-3)
        t=2   w0 (v0): s=0 -> v1; w0 pulls v1                       (task 4)
        t=4   w0 (v1): s=0 -> v2; w0 pulls v2                       (task 5)
              w1 (v0): s=2 -> v3; w1 pulls v3                       (task 6)
        t=6   w0 (v2): s=1 -> v4; w0 pulls v4                       (task 7)
        t=8   w0 (v4): s=0 -> v5; w0 pulls v5                       (task 8)
              w1 (v3): s=2 -> v6; w1 pulls v6                       (task 9)
              w2 (v0): s=6 -> v7; w2 pulls v7                       (task 10, budget spent)
        t=10  w0 (v5): s=2 -> v8, stop
        t=12  w1 (v6): s=2 -> v9, stop
        t=16  w2 (v7): s=2 -> v10, stop
    """
    applied = []
    record = sim._SimContext.record_staleness

    def spy(self, staleness):
        applied.append((self.now(), staleness))
        record(self, staleness)

    monkeypatch.setattr(sim._SimContext, "record_staleness", spy)
    r = simulate(tiny_config("algorithm.name=async_local_sgd", "algorithm.H=2", "algorithm.dylu=false",
                             "algorithm.grace_period_s=0", f"train.tokens={10 * 2 * TOK}", NO_EVALS,
                             *custom([1.0, 0.5, 0.25])))
    expected = [(2, 0), (4, 0), (4, 2), (6, 1), (8, 0), (8, 2), (8, 6), (10, 2), (12, 2), (16, 2)]
    assert applied == [(pytest.approx(t), s) for t, s in expected]
    assert r.runtime.staleness == [s for _, s in expected]
    assert r.summary["staleness_mean"] == pytest.approx(1.7)
    assert r.summary["staleness_max"] == 6
    assert r.summary["outer_updates"] == 10
    assert r.summary["tokens"] == 20 * TOK
    # w0 ran 5 tasks (10 s), w1 3 tasks (12 s), w2 2 tasks (16 s), each stopping at its last push
    compute = [sum(e - s for s, e in spans) for spans in compute_spans(r)]
    assert compute == pytest.approx([10.0, 12.0, 16.0])
    assert [p.finished_at for p in r.runtime.procs] == pytest.approx([10.0, 12.0, 16.0, 16.0])
    assert r.summary["sim_time_s"] == pytest.approx(16.0)


# --------------------------------------------------------------------------- 5. budget


@pytest.mark.parametrize("speeds", [[1.0, 1.0, 1.0], [1.0, 0.5, 0.25]])
def test_async_trains_exactly_the_budget_and_every_worker_stops(speeds):
    """13 steps of budget with H=4 (dylu on, ceil): the last task is cut to what is left."""
    r = simulate(tiny_config("algorithm.name=async_local_sgd", "algorithm.H=4",
                             f"train.tokens={13 * TOK}", NO_EVALS, *custom(speeds, latency=0.01)))
    assert r.summary["tokens"] == 13 * TOK
    assert r.summary["inner_steps"] == 13
    assert r.evals[-1]["tokens"] == 13 * TOK  # the published model has seen every token
    assert all_finished(r)
    if speeds == [1.0, 1.0, 1.0]:  # 1 s per step: task durations are step counts
        steps = sorted(round(e - s) for spans in compute_spans(r) for s, e in spans)
        assert steps == [1, 4, 4, 4]


def test_halos_trains_exactly_the_budget():
    """On halos-4x4 a budget of 64 steps (a multiple of one worker's step and of a step of all
    16 workers) must be trained exactly, as Async Local-SGD does on the same cluster."""
    common = ["algorithm.H=4", "algorithm.K=4", "cluster.preset=halos-4x4",
              f"train.tokens={64 * TOK}", NO_EVALS]
    r = simulate(tiny_config("algorithm.name=halos", *common))
    assert all_finished(r)
    assert r.summary["tokens"] == 64 * TOK


# --------------------------------------------------------------------------- 6. HALoS, one worker


def replay_one_worker(cfg, lr, momentum, N, merge=None):
    """One worker and a delayed-Nesterov server, by hand: tasks of min(H, steps left) steps,
    each started from the server's theta at progress = tokens handed out / budget.

    With `merge = (global_lr, global_momentum, global_weight)` the server is a HALoS local
    server with K=1 in front of a global DN server with buffer 1, at zero latency: after each
    worker update the local server hands out the next task (from theta_l), pushes
    u = theta_merge - theta_l, the global server steps theta_g with u, and the local server
    merges theta_l <- (1 - w) theta_l + w theta_g and snapshots theta_merge. Returns the
    published model: theta (Async) or theta_g (HALoS)."""
    setup = build(cfg)
    wl, job = setup.workload, setup.job
    torch.manual_seed(cfg.train.seed)
    params0 = wl.init_params(cfg.train.seed)
    shards = make_shards(setup.corpus.train, job.M, cfg.data.shards, wl.window, cfg.train.seed)
    engine = Engine("sequential")
    worker = engine.add_worker(0, wl, params0, shards[0], cfg.train.batch_size, cfg.train,
                               job.planned_steps)
    engine.start()
    tensors = list(worker.params.values())
    theta = [params0[n].detach().clone() for n in job.param_names]
    theta_g = [t.clone() for t in theta]
    theta_merge = [t.clone() for t in theta]
    opt = DelayedNesterov(lr, momentum, N, 0.0)
    if merge:
        global_opt = DelayedNesterov(merge[0], merge[1], 1, 0.0)
    start = [t.clone() for t in theta]
    budget, assigned = cfg.train.tokens, 0
    while assigned < budget:
        steps = min(cfg.algorithm.settings.H, math.ceil((budget - assigned) / TOK))
        progress = assigned / budget
        assigned += steps * TOK
        with torch.no_grad():
            for p, t in zip(tensors, start):
                p.copy_(t)
        engine.train(worker, steps, progress, assigned / budget)  # each step at its own place
        with torch.no_grad():
            delta = [t - p for t, p in zip(start, tensors)]
        opt.step(theta, delta)
        start = [t.clone() for t in theta]  # the next task starts before the merge
        if merge:
            with torch.no_grad():
                global_opt.step(theta_g, [m - t for m, t in zip(theta_merge, theta)])
                for t, g in zip(theta, theta_g):
                    t.mul_(1 - merge[2]).add_(g, alpha=merge[2])
            theta_merge = [t.clone() for t in theta]
    return dict(zip(job.param_names, theta_g if merge else theta))


@pytest.mark.parametrize("lr,momentum,N", [(0.7, 0.9, 2), (1.0, 0.0, 1)])
def test_halos_with_one_worker_is_a_delayed_nesterov_server(lr, momentum, N):
    """HALoS reduces to Async Local-SGD (and to a hand replay) under these conditions:

    * one region, one worker: the local server's DN sees exactly the arrivals Async's server
      sees, and the region's budget share is the whole budget, so the LR progress
      (tokens handed out / budget) is the same (the default warm-up + cosine schedule is kept);
    * zero latency, unlimited bandwidth, server_compute_s = 0: the global reply and the merge
      happen at the instant of the push, before the worker's next update arrives (with
      latency, global_weight = 1 would overwrite updates applied while the exchange is in flight);
    * K = 1: the local server pushes u = theta_merge - theta_l after every worker update;
    * global_lr = 1, global_momentum = 0, global_buffer = 1: theta_g <- theta_g - u, and
      theta_g == theta_merge, so theta_g = theta_l (up to one rounding);
    * global_weight = 1: the merge sets theta_l <- theta_g, a no-op up to rounding;
    * the local optimizer equals Async's: server_optimizer = delayed_nesterov, local_lr /
      local_momentum / local_buffer = outer_lr / outer_momentum / buffer_size, c = 0, no
      staleness weighting; the same H (DyLU gives the only worker H steps).
    The budget (8.5 tasks) also pins the cut last task (2 steps).
    """
    base = ["algorithm.H=4", f"train.tokens={34 * TOK}", f"eval.every={8 * TOK}",
            "algorithm.momentum_activation=0", *custom([1.0])]
    async_cfg = tiny_config("algorithm.name=async_local_sgd", f"algorithm.outer_lr={lr}",
                            "algorithm.server_optimizer=delayed_nesterov",
                            f"algorithm.outer_momentum={momentum}", f"algorithm.buffer_size={N}", *base)
    one = simulate(async_cfg)
    halos = simulate(tiny_config("algorithm.name=halos", f"algorithm.local_lr={lr}",
                                 f"algorithm.local_momentum={momentum}", f"algorithm.local_buffer={N}",
                                 "algorithm.K=1", "algorithm.global_weight=1", "algorithm.global_lr=1",
                                 "algorithm.global_momentum=0", "algorithm.global_buffer=1", *base))
    by_hand = replay_one_worker(async_cfg, lr, momentum, N)
    assert max_diff(one.params, by_hand) < 1e-5
    assert max_diff(halos.params, by_hand) < 1e-5
    assert halos.summary["tokens"] == one.summary["tokens"] == 34 * TOK
    assert halos.summary["outer_updates"] == one.summary["outer_updates"] == 9
    assert [e["tokens"] for e in halos.evals] == [e["tokens"] for e in one.evals]
    for a, b in zip(one.evals, halos.evals):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5), a["tokens"]


def test_halos_one_worker_merge_and_global_step_by_hand():
    """The same single-worker, zero-latency, K=1 set-up with a global step that does not simply
    copy theta_l (global_lr 0.5, global_momentum 0.5, global_buffer 1) and a partial merge
    (global_weight 0.25): the published theta_g equals the hand replay, which applies the code's
    merge theta_l <- (1 - w) theta_l + w theta_g (not the help text's opposite weighting)."""
    cfg = tiny_config("algorithm.name=halos", "algorithm.H=4", f"train.tokens={24 * TOK}", NO_EVALS,
                      "algorithm.momentum_activation=0",
                      "algorithm.local_lr=0.7", "algorithm.local_momentum=0.9", "algorithm.local_buffer=2",
                      "algorithm.K=1", "algorithm.global_lr=0.5", "algorithm.global_momentum=0.5",
                      "algorithm.global_buffer=1", "algorithm.global_weight=0.25", *custom([1.0]))
    halos = simulate(cfg)
    by_hand = replay_one_worker(cfg, 0.7, 0.9, 2, merge=(0.5, 0.5, 0.25))
    assert max_diff(halos.params, by_hand) < 1e-5
    assert halos.summary["outer_updates"] == 6
    # the reduction is not vacuous: the global model lags the plain DN server's
    plain = replay_one_worker(cfg, 0.7, 0.9, 2)
    assert max_diff(halos.params, plain) > 1e-3


# --------------------------------------------------------------------------- 7. HALoS accounting


def test_halos_accounting_and_inter_region_bytes_on_halos_4x4():
    """Every worker update is applied by a local server (one staleness record per task), the
    global model published last has seen every trained token, and worker traffic never crosses
    regions: with K so large that each local server only sends its final change, the
    inter-region bytes are exactly 3 regions x (u up + theta_g down) + 3 'done' headers, while
    Async Local-SGD sends theta and delta across for every task of a worker outside r0."""
    common = ["algorithm.H=4", "algorithm.dylu=true", "cluster.preset=halos-4x4",
              f"train.tokens={64 * TOK}", NO_EVALS]
    halos = simulate(tiny_config("algorithm.name=halos", "algorithm.K=4", *common))
    tasks = sum(len(spans) for spans in compute_spans(halos))  # latency > 0: one span per task
    assert len(halos.runtime.staleness) == tasks
    assert halos.summary["inner_steps"] * TOK == halos.summary["tokens"]
    assert halos.evals[-1]["tokens"] == halos.summary["tokens"]
    assert halos.summary["outer_updates"] >= 4  # at least each region's final change
    assert all_finished(halos)

    S = make_codec("fp32").nbytes(sum(p.numel() for p in halos.params.values())) + sim.HEADER_BYTES
    lazy = simulate(tiny_config("algorithm.name=halos", "algorithm.K=1000000", *common))
    assert lazy.summary["outer_updates"] == 4
    assert lazy.evals[-1]["tokens"] == lazy.summary["tokens"]
    assert lazy.summary["bytes_inter_region"] == 3 * 2 * S + 3 * sim.HEADER_BYTES

    flat = simulate(tiny_config("algorithm.name=async_local_sgd", *common))
    far = [spans for p, spans in zip(flat.runtime.worker_procs, compute_spans(flat)) if p.region != 0]
    assert flat.summary["bytes_inter_region"] == (
        sum(len(s) for s in far) * 2 * S + len(far) * sim.HEADER_BYTES)
    assert 4 * lazy.summary["bytes_inter_region"] < flat.summary["bytes_inter_region"]
    assert 2 * halos.summary["bytes_inter_region"] < flat.summary["bytes_inter_region"]


def test_halos_global_model_counts_updates_applied_during_the_last_exchange():
    """Two workers in region a, the global server in region b, 0.5 s away; 1 s tasks, K=1, a
    budget of two tasks. At t=1 both updates arrive: the first triggers a push (in flight until
    t=2), the second is applied while it is in flight. The local server must still report the
    second update's tokens to the global server before finishing, so the final published model
    accounts for all trained tokens."""
    r = simulate(tiny_config("algorithm.name=halos", "algorithm.H=1", "algorithm.K=1",
                             "algorithm.global_region=b", "cluster.preset=custom",
                             "cluster.regions=['a','b']", "cluster.latency_s=[[0.0,0.5],[0.5,0.0]]",
                             "cluster.bandwidth_gbps=[[0.0,0.0],[0.0,0.0]]",
                             "cluster.workers=[{region='a', speed=1.0, count=2}]",
                             "cluster.step_time_s=1.0", "cluster.server_compute_s=0.0",
                             f"train.tokens={2 * TOK}", NO_EVALS))
    assert all_finished(r)
    assert r.summary["tokens"] == 2 * TOK
    assert len(r.runtime.staleness) == 2
    assert r.evals[-1]["tokens"] == r.summary["tokens"]


# --------------------------------------------------------------------------- 8. config checks


TWO_REGIONS = ["cluster.preset=custom", "cluster.regions=['a','b']",
               "cluster.latency_s=[[0.0,0.0],[0.0,0.0]]", "cluster.bandwidth_gbps=[[0.0,0.0],[0.0,0.0]]",
               "cluster.workers=[{region='a', speed=1.0, count=2}]", "cluster.step_time_s=1.0"]


@pytest.mark.parametrize("overrides", [
    ["algorithm.name=async_local_sgd", "algorithm.server_region=nowhere"],
    ["algorithm.name=halos", "algorithm.global_region=nowhere"],
    # N = buffer_size = 4: c must be <= 1/4
    ["algorithm.name=async_local_sgd", "algorithm.buffer_size=4", "algorithm.momentum_activation=0.3"],
    # N = buffer_size = 0 -> the number of workers (3): c must be <= 1/3
    ["algorithm.name=async_local_sgd", "cluster.size=3", "algorithm.momentum_activation=0.4"],
    ["algorithm.name=async_local_sgd", "algorithm.momentum_activation=-0.1"],
    # HALoS's local DN has N = local_buffer = 4: c = 0.5 > 1/4 (2 workers, so 1/M = 0.5)
    ["algorithm.name=halos", "cluster.size=2", "algorithm.local_buffer=4",
     "algorithm.momentum_activation=0.5"],
    # HALoS's global DN has N = global_buffer = 4: c = 0.5 > 1/4
    ["algorithm.name=halos", "cluster.size=2", "algorithm.global_buffer=4",
     "algorithm.momentum_activation=0.5"],
    ["algorithm.name=halos", "algorithm.K=0"],
    ["algorithm.name=halos", "algorithm.global_weight=-0.1"],
    ["algorithm.name=halos", "algorithm.global_weight=1.5"],
], ids=["server_region", "global_region", "c>1/buffer", "c>1/M", "c<0", "halos_c>1/local_buffer",
        "halos_c>1/global_buffer", "K=0", "weight<0", "weight>1"])
def test_bad_async_configs_raise_user_errors(overrides):
    with pytest.raises(UserError):
        build(tiny_config(*overrides))


def test_good_async_configs_at_the_limits_build():
    setup = build(tiny_config("algorithm.name=async_local_sgd", "algorithm.server_region=b",
                              "algorithm.buffer_size=4", "algorithm.momentum_activation=0.25",
                              *TWO_REGIONS))
    assert setup.algorithm.processes()[-1].region == 1  # the server sits in region b
    setup = build(tiny_config("algorithm.name=halos", "algorithm.global_region=b", "algorithm.K=1",
                              "algorithm.global_weight=1", *TWO_REGIONS))
    assert setup.algorithm.processes()[-1].region == 1
    build(tiny_config("algorithm.name=halos", "algorithm.global_weight=0", *TWO_REGIONS))


def test_halos_accepts_momentum_activation_up_to_its_own_buffers():
    """halos-4x4 with the buffers at their 0 = default settings: 4 workers per region and 4
    regions, so both DNs have N = 4 and c = 1/4 is valid for both, although 1/4 > 1/M = 1/16
    (buffer_size is not used by HALoS)."""
    setup = build(tiny_config("algorithm.name=halos", "cluster.preset=halos-4x4",
                              "algorithm.local_buffer=0", "algorithm.global_buffer=0",
                              "algorithm.momentum_activation=0.25"))
    assert [len(m) for m in setup.algorithm.members.values()] == [4, 4, 4, 4]
    assert len(setup.algorithm.regions) == 4


def test_dylu_never_compares_modelled_with_measured_rates():
    """A real run measures seconds that need not be the model's: here every worker is 4x
    slower than modelled. Relative speeds must stay those of the fleet, and once everyone has
    reported, the measured ratios rule (worker 1 became twice as slow as worker 0)."""
    from locotrain.algorithms.parameter_server import AsyncWorkerSettings, TaskPlanner
    from locotrain.runtime.api import Job, WorkerInfo

    job = Job([WorkerInfo(0, 0, 1.0, 8, 0.1), WorkerInfo(1, 0, 1.0, 8, 0.1)], ["a"], ["p"],
              [(1,)], total_tokens=10**6, seq_len=16, depth=1)
    planner = TaskPlanner(AsyncWorkerSettings(H=8, dylu=True), job, [0, 1], job.total_tokens)
    planner.observe(0, 8, 3.2)  # 0.4 s per step instead of the modelled 0.1
    assert planner.next_task(0)["steps"] == 8 and planner.next_task(1)["steps"] == 8
    planner.observe(1, 8, 6.4)
    assert planner.next_task(0)["steps"] == 8 and planner.next_task(1)["steps"] == 4
