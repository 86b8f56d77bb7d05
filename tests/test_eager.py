"""Eager / naive one-outer-step-delay DiLoCo (algorithms/eager.py, arXiv 2502.12996).

The outer optimizer is swapped for a recorder through `make_outer`, and the all-reduces are
watched through the simulator's context, so the tests see exactly what each replica sent
(D_m^t), what came back (Dbar^t) and what entered its outer optimizer."""

import pytest
import torch

from conftest import tiny_config
from locotrain.algorithms.eager import EagerDiLoCo
from locotrain.errors import UserError
from locotrain.optim import Nesterov
from locotrain.run import build, simulate
from locotrain.runtime.sim import _SimContext

SLOW_LINK = ["cluster.preset=two-datacenters", "cluster.size=2", "cluster.step_time_s=1.0",
             "cluster.inter_gbps=0.0001", "cluster.inter_latency_s=0"]  # all-reduce ~5.3 s


@pytest.fixture
def spy(monkeypatch):
    """worker -> [(tensors it sent, handle)], one entry per all-reduce, in order."""
    calls = {}
    original = _SimContext.start_all_reduce

    def start(self, tensors, codec):
        handle = original(self, tensors, codec)
        calls.setdefault(self.worker, []).append(([t.detach().clone() for t in tensors], handle))
        return handle

    monkeypatch.setattr(_SimContext, "start_all_reduce", start)
    return calls


@pytest.fixture
def outers(monkeypatch):
    """The replicas' outer optimizers, in creation order (= worker order), with their inputs."""
    made = []

    class Recording(Nesterov):
        def __init__(self, lr, momentum):
            super().__init__(lr, momentum)
            self.inputs = []

        def step(self, theta, delta):
            self.inputs.append([d.detach().clone() for d in delta])
            super().step(theta, delta)

    def make_outer(self):
        made.append(Recording(self.cfg.outer_lr, self.cfg.outer_momentum))
        return made[-1]

    monkeypatch.setattr(EagerDiLoCo, "make_outer", make_outer)
    return made


def total(lists):
    return [sum(parts) for parts in zip(*lists)]


def close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("size,H", [(2, 5), (4, 4)])  # T = 7 (short last round), T = 4
def test_eager_oracle_every_mean_enters_once(spy, outers, size, H):
    cfg = tiny_config("algorithm.name=eager", f"algorithm.H={H}",
                      "cluster.preset=two-datacenters", f"cluster.size={size}")
    simulate(cfg)
    M, T = size, len(spy[0])
    assert T >= 3 and len(outers) == M
    means = [handle.result for _, handle in spy[0]]  # Dbar^1 .. Dbar^T
    for m, outer in enumerate(outers):
        assert len(outer.inputs) == T + 1  # T rounds and the final flush
        own_last = spy[m][-1][0]  # D_m^T
        expected = total(means[:T - 1] + [[d / M for d in own_last]])
        close(total(outer.inputs[:T]), expected)  # the spec's oracle, before the flush
        close(total(outer.inputs), total(means))  # after it: every mean exactly once
    # replicas really differ (their own terms were applied at different times)
    assert not torch.equal(outers[0].inputs[1][0], outers[1].inputs[1][0])


def test_naive_applies_the_previous_mean(spy, outers):
    cfg = tiny_config("algorithm.name=eager", "algorithm.mode=naive", "algorithm.H=5",
                      "cluster.preset=two-datacenters", "cluster.size=2")
    simulate(cfg)
    T = len(spy[0])
    means = [handle.result for _, handle in spy[0]]
    for outer in outers:
        assert len(outer.inputs) == T + 1
        assert all(torch.count_nonzero(d) == 0 for d in outer.inputs[0])  # round 1: nothing
        for t in range(1, T + 1):  # round t+1 (or the flush) applies Dbar^t, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(outer.inputs[t], means[t - 1]))


@pytest.mark.parametrize("outer_lr", [1.0, 0.7])
def test_single_replica_eager_is_diloco(outer_lr):
    # M = 1: Dbar^{t-1} = D^{t-1}, so the input D^{t-1} + (D^t - D^{t-1}) is the fresh D^t and
    # the flush input Dbar^T - D^T is zero: eager is DiLoCo with the same outer optimizer.
    # With outer_lr = 1 that is plain training.
    common = ["cluster.preset=single", "algorithm.H=5", f"algorithm.outer_lr={outer_lr}",
              "algorithm.outer_momentum=0"]
    eager = simulate(tiny_config("algorithm.name=eager", *common)).params
    diloco = simulate(tiny_config("algorithm.name=diloco", *common)).params
    # float rounding of x - (x - phi) vs phi, carried through AdamW: ~5e-7 seen
    close(list(eager.values()), list(diloco.values()), atol=2e-6)
    naive = simulate(tiny_config("algorithm.name=eager", "algorithm.mode=naive", *common)).params
    assert max((naive[k] - diloco[k]).abs().max() for k in diloco) > 1e-4  # and naive is not


def non_compute(proc):
    return [span for span in proc.spans if span[0] != "compute"]


def test_eager_hides_the_all_reduce_diloco_does_not():
    common = ["algorithm.H=8", *SLOW_LINK]  # inner phase 8 s > all-reduce ~5.3 s
    eager = simulate(tiny_config("algorithm.name=eager", *common))
    diloco = simulate(tiny_config("algorithm.name=diloco", *common))
    for proc in eager.runtime.worker_procs:
        last_compute = max(end for kind, _, end in proc.spans if kind == "compute")
        (kind, start, end), = non_compute(proc)  # one wait only: the final flush
        assert kind == "blocked" and start == pytest.approx(last_compute)
        assert 0 < end - start < 8.0
    for proc in diloco.runtime.worker_procs:  # 32 steps = 4 rounds, one blocking wait each
        waits = non_compute(proc)
        assert len(waits) == 4 and all(kind == "blocked" for kind, _, _ in waits)
    assert eager.summary["sim_time_s"] < diloco.summary["sim_time_s"] - 3 * 5.0
    assert eager.runtime.network.bytes_sent == diloco.runtime.network.bytes_sent


@pytest.mark.parametrize("override", ["algorithm.H=0", "algorithm.H=-3"])
def test_bad_H_is_a_user_error(override):
    with pytest.raises(UserError, match="algorithm.H"):
        build(tiny_config("algorithm.name=eager", override))
