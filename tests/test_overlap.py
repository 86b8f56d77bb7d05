"""Overlap Local-SGD (algorithms/overlap_local_sgd.py, Wang, Liang, Joshi 2020).

Spies on the worker's inner training and on the simulator's all-reduce let the tests rebuild
every sync point by hand: x before and after the pull, the anchor, what was sent."""

import pytest
import torch

from conftest import tiny_config
from locotrain.errors import UserError
from locotrain.run import build, simulate
from locotrain.runtime.sim import _SimContext
from locotrain.runtime.worker import WorkerState


def close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def clone(tensors):
    return [t.detach().clone() for t in tensors]


@pytest.fixture
def spies(monkeypatch):
    """trains[w] = [(params before, params after)] per train call; sent[w] = [(y, handle)]."""
    trains, sent = {}, {}
    original_train = WorkerState.train
    original_start = _SimContext.start_all_reduce

    def train(self, steps, *schedule):
        before = clone(self.tensors)
        loss = original_train(self, steps, *schedule)
        trains.setdefault(self.index, []).append((before, clone(self.tensors)))
        return loss

    def start(self, tensors, codec):
        handle = original_start(self, tensors, codec)
        sent.setdefault(self.worker, []).append((clone(tensors), handle))
        return handle

    monkeypatch.setattr(WorkerState, "train", train)
    monkeypatch.setattr(_SimContext, "start_all_reduce", start)
    return trains, sent


def test_single_worker_without_pull_is_plain_training():
    common = ["cluster.preset=single"]
    overlap = simulate(tiny_config("algorithm.name=overlap_local_sgd", "algorithm.pull=0", "algorithm.H=5",
                                   "algorithm.anchor_momentum=0", *common)).params
    ddp = simulate(tiny_config("algorithm.name=ddp", *common)).params
    close(list(overlap.values()), list(ddp.values()))


@pytest.mark.parametrize("pull,beta", [(1.0, 0.0), (0.6, 0.0), (0.6, 0.7)])
def test_every_sync_point_by_hand(spies, pull, beta):
    trains, sent = spies
    cfg = tiny_config("algorithm.name=overlap_local_sgd", f"algorithm.pull={pull}",
                      f"algorithm.anchor_momentum={beta}", "algorithm.H=5",
                      "cluster.preset=two-datacenters", "cluster.size=2")
    result = simulate(cfg)
    x0 = trains[0][0][0]
    for w in (0, 1):
        T = len(sent[w])
        assert T == len(trains[w]) == 7
        z, u = x0, [torch.zeros_like(t) for t in x0]
        for k in range(T):
            x = [(1 - pull) * a + pull * b for a, b in zip(trains[w][k][1], z)]
            if beta > 0:
                u = [beta * c + (b - a) for c, a, b in zip(u, x, z)]
                y = [b - c for b, c in zip(z, u)]
            else:
                y = x
            close(sent[w][k][0], y)
            if k + 1 < T:  # the next round starts from the pulled model
                close(trains[w][k + 1][0], x)
            if pull == 1.0:  # ... which is then exactly the one-round-stale mean
                assert all(torch.equal(a, b) for a, b in zip(sent[w][k][0], z))
            z = sent[w][k][1].result  # z_{k+1}, the mean of this sync point's y's
        final = list(result.params.values())
        assert all(map(torch.equal, final, z))  # the last mean is the global model
    if pull == 1.0:  # every worker sends z_k, so the anchor never leaves the start
        assert all(map(torch.equal, final, x0))
        assert max((a - b).abs().max() for a, b in zip(*trains[0][0])) > 1e-3  # yet x trained


@pytest.mark.parametrize("size", [2, 4])
def test_communication_is_hidden_and_counted(size):
    cfg = tiny_config("algorithm.name=overlap_local_sgd", "algorithm.H=4",
                      "cluster.preset=two-datacenters", f"cluster.size={size}",
                      "cluster.step_time_s=2.0", "cluster.inter_gbps=0.0002",
                      "cluster.inter_latency_s=0")  # 8 s of local steps vs a <= 4 s all-reduce
    result = simulate(cfg)
    numel = sum(t.numel() for t in result.params.values())
    rounds = 8192 // (128 * size) // 4  # planned steps: tokens / (M * 8 * 16); H = 4
    assert result.runtime.network.bytes_sent == rounds * 2 * (size - 1) * 4 * numel
    for proc in result.runtime.worker_procs:
        last_compute = max(end for kind, _, end in proc.spans if kind == "compute")
        waits = [span for span in proc.spans if span[0] != "compute"]
        (kind, start, end), = waits  # only the final wait for the last mean
        assert kind == "blocked" and start == pytest.approx(last_compute) and end - start < 8.0


@pytest.mark.parametrize("override,key", [
    ("algorithm.pull=-0.1", "algorithm.pull"), ("algorithm.pull=1.5", "algorithm.pull"),
    ("algorithm.anchor_momentum=1.0", "algorithm.anchor_momentum"),
    ("algorithm.anchor_momentum=-0.2", "algorithm.anchor_momentum"),
    ("algorithm.H=0", "algorithm.H"),
])
def test_bad_values_are_user_errors(override, key):
    with pytest.raises(UserError, match=key):
        build(tiny_config("algorithm.name=overlap_local_sgd", override))
