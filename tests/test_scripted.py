"""Each algorithm's arithmetic as a pure generator, on the scripted runtime (tests/scripted.py),
against expectations computed by hand or by the spec's per-step pseudocode."""

import pytest
import torch

from locotrain.algorithms.async_local_sgd import AsyncLocalSGD, AsyncLocalSGDSettings
from locotrain.algorithms.ddp import DDP, DDPSettings
from locotrain.algorithms.diloco import DiLoCo, DiLoCoSettings
from locotrain.algorithms.eager import EagerDiLoCo, EagerSettings
from locotrain.algorithms.halos import HALoS, HALoSSettings
from locotrain.algorithms.overlap_local_sgd import OverlapLocalSGD, OverlapSettings
from locotrain.algorithms.streaming import StreamingDiLoCo, StreamingSettings
from locotrain.optim import Nesterov
from locotrain.runtime.api import Job, WorkerInfo

from scripted import Script

SEQ = 4


def job(batches, names=("wte", "h0.w", "h1.w", "head"), steps=None, regions=None, depth=2):
    """A job of len(batches) workers (step time 1 s) over 2-value parameters; `steps` inner
    steps per worker when they all step together."""
    regions = regions or [0] * len(batches)
    workers = [WorkerInfo(i, r, 1.0, b, 1.0) for i, (b, r) in enumerate(zip(batches, regions))]
    tokens = (steps or 1) * sum(batches) * SEQ
    return Job(workers, [f"r{r}" for r in range(max(regions) + 1)], list(names),
               [(2,)] * len(names), total_tokens=tokens, seq_len=SEQ, depth=depth)


def params0(j):
    return [torch.tensor([1.0, -1.0]) * (i + 1) for i in range(len(j.param_names))]


def drift(M, n_params):
    """Worker m moves every value by 0.1 (m + 1) per inner step (0.1, 0.2, 0.3, ...)."""
    return {m: [torch.full((2,), 0.1 * (m + 1))] * n_params for m in range(M)}


# --------------------------------------------------------------------------- DDP


def test_ddp_weights_gradients_by_batch_size():
    """Workers with batches 4 and 12: the all-reduced mean must be the gradient of the global
    batch of 16, (4 g0 + 12 g1) / 16, so each worker contributes g_m b_m M / sum(b)."""
    j = job([4, 12], names=("w",), steps=1)
    grads = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([2.0, 4.0])]}
    s = Script(DDP(DDPSettings(), j), [torch.zeros(2)], gradients=grads).run()
    assert torch.equal(s.calls("w0", "all_reduce")[0][0], torch.tensor([0.5, 1.0]))
    assert torch.equal(s.calls("w1", "all_reduce")[0][0], torch.tensor([3.0, 6.0]))
    expected = (4 * grads[0][0] + 12 * grads[1][0]) / 16  # 1.75, 3.5
    for w in ("w0", "w1"):
        assert torch.allclose(s.calls(w, "apply")[0][0], expected)


# --------------------------------------------------------------------------- DiLoCo


def test_diloco_lr1_momentum0_averages_the_drifts():
    """With outer lr 1 and momentum 0, each round moves theta by the mean drift x H."""
    j = job([1, 1, 1], steps=7)  # rounds of 3, 3, 1
    s = Script(DiLoCo(DiLoCoSettings(H=3, outer_lr=1.0, outer_momentum=0.0), j), params0(j),
               drift=drift(3, 4)).run()
    final = s.calls("w0", "publish")[-1][0]
    for t0, t in zip(params0(j), final):
        assert torch.allclose(t, t0 - 7 * 0.2)  # mean drift 0.2 per step, 7 steps
    assert [c[0] for c in s.calls("w1", "train")] == [3, 3, 1]


# --------------------------------------------------------------------------- Streaming


def streaming_by_the_spec(cfg, frags, M, S, theta0, drifts):
    """The spec's per-step pseudocode (section 2.3), one inner step at a time."""
    gap, Q = cfg.H // len(frags), len(frags)
    offset = cfg.tau if cfg.tau_anchor == "merge" else 0
    phi = [[t.clone() for t in theta0] for _ in range(M)]
    theta = [t.clone() for t in theta0]
    outer = [Nesterov(cfg.outer_lr, cfg.outer_momentum) for _ in frags]
    sent = []  # (step, fragment, every worker's delta)
    last, inflight = [0] * Q, None

    def send(p, t):
        deltas = [[theta[i] - phi[m][i] for i in frags[p]] for m in range(M)]
        sent.append((t, p, deltas))
        return [sum(d[k] for d in deltas) / M for k in range(len(frags[p]))]

    def merge(p, mean):
        sub = [theta[i] for i in frags[p]]
        outer[p].step(sub, mean)
        for m in range(M):
            for i in frags[p]:
                phi[m][i] = cfg.alpha * phi[m][i] + (1 - cfg.alpha) * theta[i]

    for t in range(1, S + 1):
        for m in range(M):
            phi[m] = [x - d for x, d in zip(phi[m], drifts[m])]
        if inflight and inflight[2] == t:
            merge(inflight[0], inflight[1])
            inflight = None
        if (t + offset) % gap == 0:
            p = ((t + offset) // gap - 1) % Q
            mean, last[p] = send(p, t), t
            if cfg.tau == 0:
                merge(p, mean)
            else:
                inflight = (p, mean, t + cfg.tau)
    if inflight:
        merge(inflight[0], inflight[1])
        last[inflight[0]] = S
    for p in range(Q):
        if last[p] < S:
            merge(p, send(p, S))
    return theta, sent


@pytest.mark.parametrize("anchor", ["send", "merge"])
def test_streaming_with_overlap_and_mixing_follows_the_spec(anchor):
    """M = 3, two fragments, tau = 1, alpha = 0.5, outer Nesterov 0.7 / 0.9, 9 steps (so the
    end of the run cuts a round): every outer gradient sent and the final global model must
    be the spec's step-by-step result."""
    j = job([1, 1, 1], steps=9)
    cfg = StreamingSettings(H=4, fragments=2, tau=1, alpha=0.5, outer_lr=0.7,
                            outer_momentum=0.9, tau_anchor=anchor)
    algo = StreamingDiLoCo(cfg, j)
    names = j.param_names
    frags = [[names.index(n) for n in f] for f in algo.fragments()]
    assert frags == [[0, 1, 3], [2]]  # wte, h0, head | h1 (strided, embeddings first)
    drifts = drift(3, 4)
    s = Script(algo, params0(j), drift=drifts).run()
    theta, sent = streaming_by_the_spec(cfg, frags, 3, 9, params0(j), drifts)
    for m in range(3):
        got = s.calls(f"w{m}", "all_reduce")
        assert len(got) == len(sent)
        for (t, p, deltas), delta in zip(sent, got):
            for a, b in zip(deltas[m], delta):
                assert torch.allclose(a, b, atol=1e-6), (anchor, t, p, m)
    for a, b in zip(theta, s.calls("w0", "publish")[-1][0]):
        assert torch.allclose(a, b, atol=1e-6)


def test_streaming_mixing_by_hand():
    """The first merge by hand (anchor "send", theta0 = 1, drifts 0.1/0.2/0.3 per step):
    t = 2: fragment 0 sends delta_m = 2 d_m, mean 0.4; t = 3: theta = 1 - 0.7 (0.4 + 0.9 *
    0.4) = 0.468 and worker 0 mixes 0.5 (1 - 0.3) + 0.5 * 0.468 = 0.584. Its next send of
    fragment 0, at t = 6 after three more steps: 0.468 - (0.584 - 0.3) = 0.184."""
    j = job([1, 1, 1], names=("h0.w", "h1.w"), steps=9)
    cfg = StreamingSettings(H=4, fragments=2, tau=1, alpha=0.5, outer_lr=0.7, outer_momentum=0.9)
    s = Script(StreamingDiLoCo(cfg, j), [torch.ones(2), torch.ones(2)], drift=drift(3, 2)).run()
    sends = s.calls("w0", "all_reduce")  # fragments 0, 1, 0, 1, ... at t = 2, 4, 6, 8
    assert torch.allclose(sends[0][0], torch.full((2,), 0.2))
    assert torch.allclose(sends[2][0], torch.full((2,), 0.184), atol=1e-6)


# --------------------------------------------------------------------------- eager


@pytest.mark.parametrize("mode", ["eager", "naive"])
def test_eager_replicas_by_hand(mode):
    """M = 2, H = 2, 3 rounds, outer lr 1 and momentum 0 (the outer step subtracts its
    input), drifts d_m: every round's own delta is 2 d_m and every mean 2 dbar = 0.3.
    eager: x_m after round t = theta0 - sum_{s<t} mean^s - own_m^t / M; naive: theta0 -
    sum_{s<t} mean^s. After the flush both hold theta0 - 3 means: each mean entered once."""
    j = job([1, 1], names=("w",), steps=6)
    cfg = EagerSettings(mode=mode, H=2, outer_lr=1.0, outer_momentum=0.0)
    s = Script(EagerDiLoCo(cfg, j), [torch.zeros(2)], drift=drift(2, 1)).run()
    mean = 0.3
    for m, d in ((0, 0.1), (1, 0.2)):
        own = d if mode == "eager" else 0.0  # 2 d_m / M
        expected = [-own, -mean - own, -2 * mean - own, -3 * mean]
        got = [r[0][0].item() for r in s.calls(f"w{m}", "replica")]
        assert got == pytest.approx(expected, abs=1e-6), (mode, m)


def test_eager_with_momentum_feeds_nesterov_the_spec_inputs():
    """With momentum, replica m's outer optimizer must see mean^{t-1} + (own^t - own^{t-1})/M
    in round t and mean^T - own^T/M at the flush (spec 3.1)."""
    j = job([1, 1], names=("w",), steps=6)
    cfg = EagerSettings(mode="eager", H=2, outer_lr=0.7, outer_momentum=0.9)
    s = Script(EagerDiLoCo(cfg, j), [torch.zeros(2)], drift=drift(2, 1)).run()
    for m, d in ((0, 0.1), (1, 0.2)):
        own, mean = 2 * d, 0.3
        inputs = [own / 2, mean, mean, mean - own / 2]
        x, opt = [torch.zeros(2)], Nesterov(0.7, 0.9)
        expected = []
        for u in inputs:
            opt.step(x, [torch.full((2,), u)])
            expected.append(x[0][0].item())
        got = [r[0][0].item() for r in s.calls(f"w{m}", "replica")]
        assert got == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- Overlap Local-SGD


@pytest.mark.parametrize("pull,beta", [(1.0, 0.0), (0.6, 0.0), (0.6, 0.7)])
def test_overlap_every_sync_point_by_hand(pull, beta):
    """Wang et al.'s rule at every sync point k, with x trained by H drift steps:
    x <- (1 - pull) x + pull z_k; u <- beta u + (z_k - x); y = z_k - u (beta > 0) or x;
    the all-reduce of the y's is z_{k+1}, and the last one is the global model."""
    j = job([1, 1], names=("w",), steps=15)  # H = 5: three sync points
    s = Script(OverlapLocalSGD(OverlapSettings(H=5, pull=pull, anchor_momentum=beta), j),
               [torch.ones(2)], drift=drift(2, 1)).run()
    ys = {m: [c[0] for c in s.calls(f"w{m}", "all_reduce")] for m in (0, 1)}
    z = torch.ones(2)  # z_1: the initial parameters
    x = {m: torch.ones(2) for m in (0, 1)}
    u = {m: torch.zeros(2) for m in (0, 1)}
    for k in range(3):
        sent = []
        for m in (0, 1):
            x[m] = (1 - pull) * (x[m] - 5 * 0.1 * (m + 1)) + pull * z
            if beta > 0:
                u[m] = beta * u[m] + (z - x[m])
                y = z - u[m]
            else:
                y = x[m]
            assert torch.allclose(ys[m][k], y, atol=1e-6), (k, m)
            sent.append(y)
        z = (sent[0] + sent[1]) / 2
    assert torch.allclose(s.calls("w0", "publish")[-1][0][0], z, atol=1e-6)
    if pull == 1.0:  # every worker sends z_k, so the anchor never leaves the start
        assert torch.allclose(z, torch.ones(2))


# --------------------------------------------------------------------------- async family


def test_async_tasks_cover_the_schedule_step_by_step():
    """Every task covers its own slice [progress, progress_end) of the budget, the slices
    tile [0, 1) without gaps, and the first one starts at 0 (its first step at warm-up lr
    > 0, see test_optim)."""
    j = job([2, 2], names=("w",), steps=10)  # 160 tokens; tasks of 3 steps x 8 tokens
    cfg = AsyncLocalSGDSettings(H=3, dylu=False)
    s = Script(AsyncLocalSGD(cfg, j), [torch.zeros(2)], drift=drift(2, 1)).run()
    tasks = sorted((c[:3] for w in ("w0", "w1") for c in s.calls(w, "train")), key=lambda c: c[1])
    assert tasks[0][1] == 0.0 and tasks[-1][2] == pytest.approx(1.0)
    for (steps, start, end), nxt in zip(tasks, tasks[1:] + [(0, 1.0, 1.0)]):
        assert end - start == pytest.approx(steps * 2 * SEQ / j.total_tokens)
        assert end == pytest.approx(nxt[1])
    assert sum(t[0] for t in tasks) * 2 * SEQ == j.total_tokens


def test_halos_local_server_merges_and_pushes_by_hand():
    """One region, one worker, K = 1, buffers 1, no momentum, local lr 1, global lr 0.5,
    global_weight 0.25, H = 2 steps of drift 0.1 (delta 0.2 per task), theta0 = 0. Task 1:
    the local server moves to -0.2 and pushes u = 0.2; the global server moves to -0.1 and
    replies; the local server merges 0.75 theta_l + 0.25 theta_g, and every push carries
    theta_merge - theta_l."""
    j = job([1], names=("w",), steps=6)
    cfg = HALoSSettings(H=2, dylu=False, K=1, local_buffer=1, global_buffer=1, local_lr=1.0,
                        local_momentum=0.0, global_lr=0.5, global_momentum=0.0,
                        global_weight=0.25)
    s = Script(HALoS(cfg, j), [torch.zeros(2)], drift=drift(1, 1)).run()
    pushes = [msg.tensors[0][0].item() for dst, msg in s.calls("lps0", "send")
              if dst == "gps" and msg.tensors]
    tasks = [msg.tensors[0][0].item() for dst, msg in s.calls("lps0", "send")
             if dst == "w0" and msg.tensors]
    globals_ = [p[0][0][0].item() for p in s.calls("gps", "publish")]
    # Replay the rules on the observed order: theta_l after each update, merge, push.
    theta_l, merged, theta_g = 0.0, 0.0, 0.0
    expect_pushes, expect_globals = [], [0.0]
    for _ in pushes:
        theta_l -= 0.2  # a worker delta of 0.2 at local lr 1, N = 1
        expect_pushes.append(merged - theta_l)
        theta_g -= 0.5 * expect_pushes[-1]
        expect_globals.append(theta_g)
        theta_l = 0.75 * theta_l + 0.25 * theta_g
        merged = theta_l
    assert pushes == pytest.approx(expect_pushes)
    assert globals_ == pytest.approx(expect_globals)
    # By hand: the merge after task 1 gives 0.75 (-0.2) + 0.25 (-0.1) = -0.175, so task 3
    # starts from -0.175 - 0.2 (task 2 was dispatched before the reply came back).
    assert tasks == pytest.approx([0.0, -0.2, -0.375])
