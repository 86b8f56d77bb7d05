"""Eager / naive one-outer-step-delay DiLoCo (algorithms/eager.py, arXiv 2502.12996) on the
simulator; the arithmetic by hand is in test_scripted.py."""

import pytest
import torch

from conftest import tiny_config
from locotrain.errors import UserError
from locotrain.run import build, simulate

def close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


SLOW_LINK = ["cluster.preset=two-datacenters", "cluster.size=2", "cluster.step_time_s=1.0",
             "cluster.inter_gbps=0.0001", "cluster.inter_latency_s=0"]  # all-reduce ~5.3 s


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
    return [span for span in proc.spans if span[0] in ("blocked", "idle")]


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
