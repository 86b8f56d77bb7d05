"""Hierarchical DiLoCo (algorithms/hierarchical.py): one worker per region is DiLoCo, one
region is DDP, the token-weighted outer mean by hand, bytes per link in closed form, the empty
region error, and both runtimes on one small run."""

import json
import math

import pytest
import torch

from locotrain.algorithms.hierarchical import Hierarchical, HierarchicalSettings
from locotrain.checkpoint import load_checkpoint
from locotrain.config import load_config
from locotrain.errors import UserError
from locotrain.run import simulate
from locotrain.runtime.api import Job, WorkerInfo
from locotrain.setup import build

from conftest import tiny_config
from scripted import Script

STEP = 0.5
STREAMING = ["model.depth=2", "algorithm.fragments=2", "algorithm.tau=1", "algorithm.alpha=0.5"]


def numel(params) -> int:
    return sum(p.numel() for p in params.values())


def _cfg(*extra):
    # the quickstart's diloco table sets outer_momentum = 0.5: pin it for both algorithms
    return tiny_config("cluster.preset=two-datacenters", f"cluster.step_time_s={STEP}",
                       "train.tokens=12288", "algorithm.H=4", "algorithm.outer_momentum=0.5",
                       *extra)


def test_one_worker_per_region_is_diloco():
    diloco = simulate(_cfg("algorithm.name=diloco", "cluster.size=2"))
    hier = simulate(_cfg("algorithm.name=hierarchical", "cluster.size=2"))
    for k in diloco.params:  # its steps are gradients + apply, DiLoCo's one train job
        assert torch.allclose(diloco.params[k], hier.params[k], atol=1e-6, rtol=0), k
    for key in ("bytes_sent", "bytes_inter_region", "tokens", "outer_updates", "sim_time_s"):
        assert hier.summary[key] == diloco.summary[key], key


def test_one_region_is_ddp():
    ddp = simulate(tiny_config("algorithm.name=ddp", "cluster.size=3", "train.tokens=6144"))
    hier = simulate(tiny_config("algorithm.name=hierarchical", "cluster.size=3",
                                "train.tokens=6144", "algorithm.H=4"))
    for k in ddp.params:
        assert torch.equal(ddp.params[k], hier.params[k]), k
    assert [e["val_loss"] for e in hier.evals] == [e["val_loss"] for e in ddp.evals]
    for key in ("bytes_sent", "tokens", "outer_updates"):
        assert hier.summary[key] == ddp.summary[key], key


@pytest.mark.parametrize("mode", ["all", "leaders"])
def test_outer_mean_weights_regions_by_their_tokens(mode):
    """Region 0 = {w0} with batch 4, region 1 = {w1, w2} with batch 4 each: region 1 trains
    twice the tokens per step, so the outer gradient is (delta_0 + 2 delta_1) / 3. Scripted
    steps: a worker's step subtracts its canned gradient (in region 1, the region's mean)."""
    workers = [WorkerInfo(0, 0, 1.0, 4, 1.0), WorkerInfo(1, 1, 1.0, 4, 1.0),
               WorkerInfo(2, 1, 1.0, 4, 1.0)]
    job = Job(workers, ["a", "b"], ["w"], [(2,)], total_tokens=2 * 12 * 4, seq_len=4, depth=1)
    grads = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([2.0, 0.0])],
             2: [torch.tensor([0.0, 4.0])]}
    cfg = HierarchicalSettings(H=2, outer_lr=1.0, outer_momentum=0.0, outer_sync=mode)
    theta0 = [torch.tensor([1.0, -1.0])]
    s = Script(Hierarchical(cfg, job), theta0, gradients=grads).run()
    delta_0 = 2 * grads[0][0]  # two steps
    delta_1 = 2 * (grads[1][0] + grads[2][0]) / 2
    final = s.calls("w0", "publish")[-1]
    assert torch.allclose(final[0][0], theta0[0] - (delta_0 + 2 * delta_1) / 3)
    for m in (1, 2):  # every worker holds the same model after the round
        assert torch.allclose(s.params[m]["w"], final[0][0])
    if mode == "all":  # worker contributions delta_r B_r M / (B n_r) = delta_0, delta_1
        assert torch.allclose(s.calls("w0", "all_reduce")[0][0], delta_0)
        assert torch.allclose(s.calls("w2", "all_reduce")[-1][0], delta_1)
    else:  # leaders w0, w1 contribute delta_r B_r R / B = 2/3 delta_0, 4/3 delta_1
        assert torch.allclose(s.calls("w0", "all_reduce")[0][0], 2 / 3 * delta_0)
        assert torch.allclose(s.calls("w1", "all_reduce")[-1][0], 4 / 3 * delta_1)
        assert len(s.calls("w2", "all_reduce")) == 2  # its region's two gradient all-reduces
        assert [d for d, _ in s.calls("w1", "send")] == ["w2"]  # w1 sends w2 the mean


def _bytes_cfg(*extra):
    return _cfg("algorithm.name=hierarchical", "cluster.size=4", *extra)


@pytest.mark.parametrize("mode", ["all", "leaders"])
def test_bytes_per_link_in_closed_form(mode):
    """Two datacenters of 2 workers, n values, 24 steps, rounds of 4. Every step each region
    all-reduces its gradients in a ring of 2: each worker sends 2 (2-1) 4 ceil(n/2) bytes, all
    inside its datacenter. Every round, `all`: one ring of the 4 workers, 2 (4-1) 4 ceil(n/4)
    bytes each, and two of its four hops cross; `leaders`: a ring of the 2 leaders,
    2 (2-1) 4 ceil(n/2) each, both hops crossing, then each leader sends the mean to its peer
    (4 n bytes + a 64-byte header) inside its datacenter."""
    r = simulate(_bytes_cfg(f"algorithm.outer_sync={mode}"))
    n, steps, rounds = numel(r.params), 24, 6
    assert r.summary["inner_steps"] == 4 * steps and r.summary["outer_updates"] == rounds
    inner = steps * 4 * 2 * 4 * math.ceil(n / 2)
    if mode == "all":
        outer = rounds * 4 * 6 * 4 * math.ceil(n / 4)
        inter = rounds * 2 * 6 * 4 * math.ceil(n / 4)
    else:
        outer = rounds * (2 * 2 * 4 * math.ceil(n / 2) + 2 * (4 * n + 64))
        inter = rounds * 2 * 2 * 4 * math.ceil(n / 2)
    assert r.summary["bytes_sent"] == inner + outer
    assert r.summary["bytes_inter_region"] == inter
    links = r.summary["peak_link_gbps_by_link"]
    assert set(links) == {"dc0->dc1", "dc1->dc0"}  # the WAN pipes carried the outer sync only


def test_leaders_and_all_compute_the_same_model_and_hierarchical_timing_helps():
    every = simulate(_bytes_cfg())
    leaders = simulate(_bytes_cfg("algorithm.outer_sync=leaders"))
    timed = simulate(_bytes_cfg("cluster.allreduce=hierarchical"))
    for k in every.params:
        assert torch.allclose(every.params[k], leaders.params[k], atol=1e-6), k
        assert torch.equal(every.params[k], timed.params[k]), k
    # fewer bytes on the WAN: leaders send 2 (R-1)/R of a model each, not 2 (M-1)/M per worker
    assert leaders.summary["bytes_inter_region"] < every.summary["bytes_inter_region"]
    assert leaders.summary["sim_time_s"] < every.summary["sim_time_s"]
    assert timed.summary["sim_time_s"] < every.summary["sim_time_s"]


def test_a_region_without_workers_is_a_one_line_error():
    cfg = tiny_config("algorithm.name=hierarchical", "algorithm.H=2", "cluster.preset=custom",
                      "cluster.size=2", "cluster.regions=['a', 'b', 'c']",
                      "cluster.latency_s=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]",
                      "cluster.bandwidth_gbps=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]",
                      "cluster.workers=[{region='a', count=1}, {region='c', count=1}]")
    with pytest.raises(UserError) as e:
        build(cfg)
    assert "region 'b' has no worker" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("outer", [["algorithm.outer_sync=leaders"],
                                   ["algorithm.outer=streaming", *STREAMING, "algorithm.codec=fp4"]])
def test_real_processes_give_the_simulators_parameters(tmp_path, outer):
    """4 real processes in two datacenters: per-step region all-reduces (two groups), then
    a ring of the two leaders and messages from leader to peer (leaders mode), or fp4
    fragments among all four overlapping one inner step (outer = streaming)."""
    from test_real import launch

    proc, out, _ = launch(tmp_path, "algorithm.name=hierarchical", "algorithm.H=4",
                          "cluster.size=4", "train.tokens=6144", *outer)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real, _, _, _ = load_checkpoint(out)
    sim = simulate(load_config(str(out / "config.toml"))[1])
    for k in real:
        assert torch.allclose(real[k], sim.params[k].cpu(), atol=1e-5, rtol=1e-4), k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == sim.summary["tokens"]
    assert summary["outer_updates"] == sim.summary["outer_updates"]


def test_an_interrupted_run_resumes_to_the_same_end(tmp_path):
    from locotrain.run import resume
    from test_resume import metrics, run

    case = ["algorithm.name=hierarchical", "algorithm.H=4", "algorithm.outer_sync=leaders"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    events = run(reference, case)
    assert run(out, case, stop_at=events // 2) is None
    resume(out)
    assert metrics(out) == metrics(reference)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- outer = streaming


def test_streaming_outer_with_one_worker_per_region_is_streaming_diloco():
    streaming = simulate(_cfg("algorithm.name=streaming", "cluster.size=2", *STREAMING))
    hier = simulate(_cfg("algorithm.name=hierarchical", "algorithm.outer=streaming",
                         "cluster.size=2", *STREAMING))
    for k in streaming.params:
        assert torch.allclose(streaming.params[k], hier.params[k], atol=1e-6, rtol=0), k
    for key in ("bytes_sent", "bytes_inter_region", "tokens", "outer_updates", "sim_time_s"):
        assert hier.summary[key] == streaming.summary[key], key


def test_streaming_outer_over_regions_keeps_each_region_one_replica():
    """Two regions of two workers: every inner step all-reduces gradients inside the region
    (fp32, n values per step, none across), fragments cross the WAN in turn; the workers of
    a region end with the same parameters; across regions the bytes are Streaming DiLoCo's."""
    res = simulate(_cfg("algorithm.name=hierarchical", "algorithm.outer=streaming",
                        "cluster.size=4", *STREAMING))
    flat = simulate(_cfg("algorithm.name=streaming", "cluster.size=4", *STREAMING))
    assert res.summary["outer_updates"] == flat.summary["outer_updates"]
    assert res.summary["bytes_inter_region"] == flat.summary["bytes_inter_region"]
    assert res.summary["bytes_sent"] > flat.summary["bytes_sent"]  # + the per-step region traffic
    w = [proc.worker.params for proc in res.runtime.worker_procs]
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]) and torch.equal(w[2][k], w[3][k]), k


def test_streaming_outer_needs_every_worker_in_the_sync():
    with pytest.raises(UserError, match="outer_sync"):
        build(_cfg("algorithm.name=hierarchical", "algorithm.outer=streaming",
                   "algorithm.outer_sync=leaders", "cluster.size=4", *STREAMING))


def test_streaming_outer_weights_regions_by_their_tokens():
    """Region 0 = {w0} with batch 8, region 1 = {w1, w2} with batch 2 each: region 0 trains
    twice region 1's tokens, so with one fragment, tau = 0 and alpha = 0 (a whole-model sync
    that replaces the local copy) the outer gradient is (2 delta_0 + delta_1) / 3; each worker
    contributes delta_r B_r M / (B n_r), B = 12: 2 delta_0 from w0, delta_1 / 2 from w1 and w2."""
    workers = [WorkerInfo(0, 0, 1.0, 8, 1.0), WorkerInfo(1, 1, 1.0, 2, 1.0),
               WorkerInfo(2, 1, 1.0, 2, 1.0)]
    job = Job(workers, ["a", "b"], ["w"], [(2,)], total_tokens=2 * 12 * 4, seq_len=4, depth=1)
    grads = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([2.0, 0.0])],
             2: [torch.tensor([0.0, 4.0])]}
    cfg = HierarchicalSettings(H=2, outer_lr=1.0, outer_momentum=0.0, outer="streaming",
                               fragments=1, tau=0, alpha=0.0)
    theta0 = [torch.tensor([1.0, -1.0])]
    s = Script(Hierarchical(cfg, job), theta0, gradients=grads).run()
    delta_0 = 2 * grads[0][0]
    delta_1 = 2 * (grads[1][0] + grads[2][0]) / 2
    assert torch.allclose(s.calls("w0", "publish")[1][0][0], theta0[0] - (2 * delta_0 + delta_1) / 3)
    assert torch.allclose(s.calls("w0", "all_reduce")[0][0], 2 * delta_0)
    assert torch.allclose(s.calls("w2", "all_reduce")[-1][0], 0.5 * delta_1)
