"""Overlap Local-SGD (algorithms/overlap_local_sgd.py, Wang, Liang, Joshi 2020).

Spies on the worker's inner training and on the simulator's all-reduce let the tests rebuild
every sync point by hand: x before and after the pull, the anchor, what was sent."""

import pytest
import torch

from conftest import tiny_config
from locotrain.errors import UserError
from locotrain.run import build, simulate


def close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def clone(tensors):
    return [t.detach().clone() for t in tensors]


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
        waits = [span for span in proc.spans if span[0] in ("blocked", "idle")]
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
