"""Oracles for the simulated runtime and the synchronous baselines (DDP, DiLoCo): special cases
with known answers, byte counts and times in closed form."""

import math

import pytest
import torch

from locotrain.codecs import make_codec
from locotrain.errors import UserError
from locotrain.data import make_shards
from locotrain.run import build, simulate
from locotrain.runtime.network import ring_allreduce_time
from locotrain.runtime.engine import Engine

from conftest import tiny_config

STEP = 0.5  # seconds per inner step at speed 1 in these tests


def numel(params) -> int:
    return sum(p.numel() for p in params.values())


def spans(result, kind):
    return [sum(e - s for k, s, e in p.spans if k == kind) for p in result.runtime.worker_procs]


# --------------------------------------------------------------------------- DiLoCo oracles


def test_diloco_with_one_worker_lr1_momentum0_is_plain_training():
    plain = simulate(tiny_config("algorithm.name=ddp"))
    diloco = simulate(tiny_config("algorithm.name=diloco", "algorithm.H=3",
                                  "algorithm.outer_lr=1", "algorithm.outer_momentum=0"))
    # theta - (theta - phi) == phi up to one rounding of the subtraction
    for k in plain.params:
        assert torch.allclose(plain.params[k], diloco.params[k], atol=1e-6, rtol=0), k
    # the same training losses and, at equal tokens, the same validation losses
    a = {e["tokens"]: e["val_loss"] for e in plain.evals}
    b = {e["tokens"]: e["val_loss"] for e in diloco.evals}
    common = sorted(set(a) & set(b))
    assert len(common) >= 3
    for t in common:
        assert a[t] == pytest.approx(b[t], abs=1e-5)


def test_diloco_lr1_momentum0_is_parameter_averaging():
    cfg = tiny_config("algorithm.name=diloco", "algorithm.H=3", "algorithm.outer_lr=1",
                      "algorithm.outer_momentum=0", "cluster.preset=two-datacenters",
                      "cluster.size=4", "train.tokens=6144")
    result = simulate(cfg)
    # replay by hand: every worker trains H steps from the average, then we average
    setup = build(cfg)
    wl, job = setup.workload, setup.job
    torch.manual_seed(cfg.train.seed)
    params = wl.init_params(cfg.train.seed)
    shards = make_shards(setup.corpus.train, job.M, cfg.data.shards, wl.window, cfg.train.seed)
    engine = Engine("sequential")
    workers = [engine.add_worker(m, wl, params, shards[m], cfg.train.batch_size, cfg.train,
                                 job.planned_steps) for m in range(job.M)]
    engine.start()
    rounds = setup.algorithm.rounds()
    assert rounds == [3, 3, 3, 3]  # 6144 tokens / (4 workers x 8 x 16) = 12 steps
    for h in rounds:
        for w in workers:
            engine.train(w, h)
        with torch.no_grad():
            for k in params:
                mean = sum(w.params[k] for w in workers) / job.M
                for w in workers:
                    w.params[k].copy_(mean)
    for k in params:
        assert torch.allclose(result.params[k], workers[0].params[k], atol=1e-6), k


def test_outer_nesterov_matches_torch_sgd():
    from locotrain.optim import Nesterov

    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    ref = [t.clone().requires_grad_(True) for t in theta]
    sgd = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    ours = Nesterov(0.7, 0.9)
    for _ in range(4):
        deltas = [torch.randn(t.shape, generator=g) for t in theta]
        for r, d in zip(ref, deltas):
            r.grad = d.clone()
        sgd.step()
        ours.step(theta, deltas)
        for a, b in zip(theta, ref):
            assert torch.allclose(a, b.detach(), atol=1e-6)


# --------------------------------------------------------------------------- bytes


def _sync_cfg(*extra):
    return tiny_config("cluster.preset=two-datacenters", "cluster.size=4",
                       f"cluster.step_time_s={STEP}", "train.tokens=12288", *extra)


def test_ddp_bytes_are_one_gradient_all_reduce_per_step():
    r = simulate(_sync_cfg("algorithm.name=ddp"))
    n, M, steps = numel(r.params), 4, r.summary["inner_steps"] // 4
    assert steps == 12288 // (4 * 8 * 16)
    # a ring all-reduce of S bytes: every member sends 2(M-1)/M S, 2(M-1) S in all
    assert r.summary["bytes_sent"] == steps * 2 * (M - 1) * 4 * n
    assert r.summary["peak_payload_bytes"] == 4 * n
    # two of the four ring hops cross between the datacenters
    assert r.summary["bytes_inter_region"] == r.summary["bytes_sent"] // 2


@pytest.mark.parametrize("H", [2, 4])
def test_diloco_bytes_are_ddp_bytes_divided_by_H(H):
    ddp = simulate(_sync_cfg("algorithm.name=ddp"))
    diloco = simulate(_sync_cfg("algorithm.name=diloco", f"algorithm.H={H}"))
    assert diloco.summary["tokens"] == ddp.summary["tokens"]
    assert diloco.summary["bytes_sent"] * H == ddp.summary["bytes_sent"]
    assert diloco.summary["outer_updates"] * H == ddp.summary["outer_updates"]


@pytest.mark.parametrize("codec", ["bf16", "int8", "fp4"])
def test_codec_bytes_are_the_encoded_size(codec):
    fp32 = simulate(_sync_cfg("algorithm.name=diloco", "algorithm.H=4"))
    coded = simulate(_sync_cfg("algorithm.name=diloco", "algorithm.H=4", f"algorithm.codec={codec}"))
    n, rounds, M = numel(fp32.params), fp32.summary["outer_updates"], 4
    nbytes = make_codec(codec).nbytes
    # runtime/collectives.py: fp32 is a ring over M chunks of ceil(n/M) values; bf16 a
    # reduce-scatter + all-gather of bf16 chunks; int8 and fp4 (M <= 8) an all-gather.
    per_rank = {"bf16": 2 * (M - 1) * nbytes(math.ceil(n / M)),
                "int8": (M - 1) * nbytes(n), "fp4": (M - 1) * nbytes(n)}[codec]
    assert fp32.summary["bytes_sent"] == rounds * M * 2 * (M - 1) * 4 * math.ceil(n / M)
    assert coded.summary["bytes_sent"] == rounds * M * per_rank
    assert coded.summary["peak_payload_bytes"] == make_codec(codec).nbytes(n)
    if codec == "fp4":  # 1/8 of fp32 plus one float32 scale per 128 values
        assert coded.summary["peak_payload_bytes"] == math.ceil(n / 2) + 4 * math.ceil(n / 128)
    # the quantisation error is really applied: the model differs, but not by much
    diff = max((fp32.params[k] - coded.params[k]).abs().max().item() for k in fp32.params)
    assert 0 < diff < 0.1


# --------------------------------------------------------------------------- time


def test_one_worker_with_unlimited_network_takes_steps_times_step_time():
    r = simulate(tiny_config("algorithm.name=diloco", "algorithm.H=3",
                             f"cluster.step_time_s={STEP}"))
    steps = r.summary["inner_steps"]
    assert r.summary["sim_time_s"] == pytest.approx(steps * STEP, rel=1e-12)
    assert r.summary["utilization"] == pytest.approx(1.0)


@pytest.mark.parametrize("batch,fixed", [(4, 0.0), (4, 0.15), (2, 0.15), (8, 0.2)])
def test_a_step_costs_its_fixed_part_plus_the_batch_share_of_the_rest(batch, fixed):
    """cluster.step_fixed_s F: a step of batch b takes F + (step_time_s - F) b / b0, b0 the
    config's train.batch_size (here every worker's, so b = b0 and the step is step_time_s),
    or, for a worker with its own batch, that formula; F = 0 is the plain linear model."""
    from locotrain.cluster import Cluster
    from locotrain.config import load_config

    cfg = load_config("quickstart", ["cluster.preset=custom", "cluster.regions=['r']",
                                     "cluster.latency_s=[[0.0]]", "cluster.bandwidth_gbps=[[0.0]]",
                                     f"cluster.workers=[{{region='r', batch_size={batch}}}]",
                                     f"cluster.step_time_s={STEP}", f"cluster.step_fixed_s={fixed}",
                                     "train.batch_size=4", "cluster.size=1"])[1]
    cluster = Cluster(cfg.cluster, cfg.train.batch_size)
    assert cluster.step_time(0, 1.0, 64) == pytest.approx(fixed + (STEP - fixed) * batch / 4)


def test_a_fixed_part_longer_than_the_step_is_a_one_line_error():
    from locotrain.cluster import Cluster
    from locotrain.config import load_config

    cfg = load_config("quickstart", [f"cluster.step_time_s={STEP}",
                                     f"cluster.step_fixed_s={STEP * 2}"])[1]
    with pytest.raises(UserError, match="step_fixed_s"):
        Cluster(cfg.cluster, cfg.train.batch_size)


def test_two_worker_all_reduce_over_one_link_matches_the_closed_form():
    latency, gbps, H = 0.03, 0.05, 4
    r = simulate(tiny_config("algorithm.name=diloco", f"algorithm.H={H}",
                             "cluster.preset=two-datacenters", "cluster.size=2",
                             f"cluster.inter_gbps={gbps}", f"cluster.inter_latency_s={latency}",
                             f"cluster.step_time_s={STEP}"))
    S = 4 * numel(r.params)
    rounds = r.summary["outer_updates"]
    comm = ring_allreduce_time(2, S, latency, gbps * 1e9)
    assert comm == pytest.approx(2 * latency + 8 * S / (gbps * 1e9))
    assert r.summary["sim_time_s"] == pytest.approx(rounds * (H * STEP + comm), rel=1e-9)
    # the exposed communication shows as blocked time, and utilisation is its complement
    assert spans(r, "blocked") == pytest.approx([rounds * comm] * 2, rel=1e-9)
    assert r.summary["utilization"] == pytest.approx(H * STEP / (H * STEP + comm), rel=1e-9)


def test_ddp_exposes_communication_every_step_and_diloco_once_per_round():
    slow = ("cluster.inter_gbps=0.01", "cluster.inter_latency_s=0.05")
    ddp = simulate(_sync_cfg("algorithm.name=ddp", *slow))
    diloco = simulate(_sync_cfg("algorithm.name=diloco", "algorithm.H=4", *slow))
    S = 4 * numel(ddp.params)
    comm = ring_allreduce_time(4, S, 0.05, 0.01e9)
    steps = ddp.summary["inner_steps"] // 4
    assert ddp.summary["sim_time_s"] == pytest.approx(steps * (STEP + comm), rel=1e-9)
    assert diloco.summary["sim_time_s"] == pytest.approx(steps * STEP + steps / 4 * comm, rel=1e-9)


def test_unequal_speeds_make_fast_workers_idle_at_the_barrier():
    r = simulate(tiny_config("algorithm.name=diloco", "algorithm.H=4", "cluster.preset=mixed-fleet",
                             "cluster.size=2", f"cluster.step_time_s={STEP}"))
    # mixed-fleet: one B200 (speed 2250/989) and one B300 (1.5x); the network is fast
    compute = spans(r, "compute")
    idle = spans(r, "idle")
    assert compute[0] == pytest.approx(1.5 * compute[1], rel=1e-9)
    assert idle[1] == pytest.approx(compute[0] - compute[1], rel=1e-3)
    assert idle[0] == pytest.approx(0.0, abs=1e-9)


def test_a_straggler_window_slows_that_worker_by_its_factor():
    base = ("algorithm.name=diloco", "algorithm.H=4", "cluster.preset=two-datacenters",
            "cluster.size=2", f"cluster.step_time_s={STEP}", "cluster.inter_gbps=0")
    plain = simulate(tiny_config(*base))
    slow = simulate(tiny_config(*base, "cluster.slowdowns=[{worker=1, start_s=0.5, end_s=1.5, factor=3.0}]"))
    # during the 1 s window worker 1 does 1/3 s of work: 2/3 s lost, once per run
    lost = slow.summary["sim_time_s"] - plain.summary["sim_time_s"]
    assert lost == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_a_link_outage_delays_the_all_reduce_until_the_link_returns():
    base = ("algorithm.name=diloco", "algorithm.H=4", "cluster.preset=two-datacenters",
            "cluster.size=2", f"cluster.step_time_s={STEP}", "cluster.inter_latency_s=0")
    plain = simulate(tiny_config(*base))
    # the first all-reduce starts at 4 * STEP = 2 s; the dc0 -> dc1 link is down until 5 s
    down = simulate(tiny_config(*base, "cluster.outages=[{src='dc0', dst='dc1', start_s=1.0, end_s=5.0}]"))
    assert down.summary["sim_time_s"] - plain.summary["sim_time_s"] == pytest.approx(3.0, rel=1e-6)


def test_hierarchical_all_reduce_costs_its_three_phases():
    gbps, H = 0.1, 4
    base = ("algorithm.name=diloco", f"algorithm.H={H}", "cluster.preset=two-datacenters",
            "cluster.size=4", f"cluster.step_time_s={STEP}", f"cluster.inter_gbps={gbps}",
            "cluster.inter_latency_s=0.02")
    ring = simulate(tiny_config(*base))
    hier = simulate(tiny_config(*base, "cluster.allreduce=hierarchical"))
    S = 4 * numel(ring.params)
    rounds = ring.summary["outer_updates"]
    intra = 0.5 * 8 * S / 100e9 + 1e-4  # reduce-scatter in each datacenter (2 members)
    leaders = ring_allreduce_time(2, S, 0.02, gbps * 1e9)
    expected = rounds * (H * STEP + 2 * intra + leaders)
    assert hier.summary["sim_time_s"] == pytest.approx(expected, rel=1e-9)
    assert hier.summary["bytes_inter_region"] < ring.summary["bytes_inter_region"]


def test_same_config_and_seed_give_identical_metrics():
    cfg = ("algorithm.name=diloco", "algorithm.H=3", "cluster.preset=two-datacenters",
           "cluster.jitter=0.1", "algorithm.codec=fp4")
    a, b = simulate(tiny_config(*cfg)), simulate(tiny_config(*cfg))
    strip = lambda evals: [{k: v for k, v in e.items() if k != "time_s"} for e in evals]  # noqa: E731
    assert strip(a.evals) == strip(b.evals)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])


def test_unequal_batch_sizes_weight_the_ddp_gradient_mean():
    # one worker with batch 8 and one with batch 24: the mean must weight them 1:3
    r = simulate(tiny_config("algorithm.name=ddp", "cluster.preset=custom", "cluster.regions=['a']",
                             "cluster.latency_s=[[0.0]]", "cluster.bandwidth_gbps=[[0.0]]",
                             "cluster.workers=[{region='a', batch_size=8}, {region='a', batch_size=24}]",
                             "train.tokens=4096"))
    assert r.summary["tokens"] == 4096 and r.summary["inner_steps"] == 2 * 8


def test_speed_scaled_diloco_with_equal_speeds_is_diloco():
    base = ("algorithm.name=diloco", "algorithm.H=4", "cluster.preset=two-datacenters",
            "cluster.size=2", "train.tokens=2560")  # 10 steps: a short last round
    plain = simulate(tiny_config(*base))
    scaled = simulate(tiny_config(*base, "algorithm.dylu=true"))
    assert scaled.summary["tokens"] == plain.summary["tokens"]
    for k in plain.params:
        assert torch.allclose(plain.params[k], scaled.params[k], atol=1e-7), k


def test_speed_scaled_diloco_equalises_round_durations_and_spends_the_budget():
    r = simulate(tiny_config("algorithm.name=diloco", "algorithm.H=8", "algorithm.dylu=true",
                             "algorithm.dylu_rounding=floor", "cluster.preset=custom",
                             "cluster.regions=['a']", "cluster.latency_s=[[0.0]]",
                             "cluster.bandwidth_gbps=[[0.0]]", f"cluster.step_time_s={STEP}",
                             "cluster.workers=[{region='a', speed=1.0}, {region='a', speed=0.5}]",
                             "train.tokens=3072"))  # 24 steps of 8 x 16: two rounds of 8 + 4
    assert r.summary["tokens"] == 3072 and r.summary["outer_updates"] == 2
    compute = spans(r, "compute")
    assert compute == pytest.approx([2 * 8 * STEP, 2 * 4 * STEP / 0.5])  # equal durations
    assert spans(r, "idle") == pytest.approx([0.0, 0.0], abs=1e-9)


@pytest.mark.parametrize("fixed", [0.0, 0.2, STEP])
def test_a_smaller_batch_saves_only_the_part_of_the_step_that_scales(fixed):
    """AdLoCo with its batch frozen at 2 of the worker's 8 (one worker, no network): every
    inner step takes F + (step_time_s - F) 2 / 8, so the run takes steps x that; F = the
    whole step (a launch-bound GPU) makes a batch of 2 cost as much as one of 8."""
    r = simulate(tiny_config("algorithm.name=adloco", "algorithm.H=2", "algorithm.trainers=1",
                             "algorithm.initial_batch=2", "algorithm.batch_test=none",
                             f"cluster.step_time_s={STEP}", f"cluster.step_fixed_s={fixed}"))
    steps = r.summary["inner_steps"]
    assert steps == 8192 // (2 * 16)
    assert r.summary["sim_time_s"] == pytest.approx(steps * (fixed + (STEP - fixed) * 2 / 8))
