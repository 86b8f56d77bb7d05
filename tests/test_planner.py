"""The planner (`loco plan`, docs/planner.md): phantom compute times and bytes exactly what
real arithmetic does, representatives stand exactly for the workers they replace, the
exposed communication of spec section 12 in closed form, the bandwidth search, bad input."""

import json

import pytest
import torch

from locotrain.config import load_config
from locotrain.errors import UserError
from locotrain.cli import main as loco
from locotrain.planner.bandwidth import BandwidthSearch, parse_targets
from locotrain.planner.phantom import PhantomTensor
from locotrain.planner.plan import inter_gbps, run_plan, steady_window, with_bandwidth
from locotrain.run import simulate
from locotrain.runtime.engine import Engine
from locotrain.runtime.network import ring_allreduce_time

from conftest import tiny_config

# --------------------------------------------------------------------------- phantom tensors


def test_phantom_tensors_keep_shapes_and_do_nothing():
    x, real = PhantomTensor((3, 4)), torch.ones(3, 4)
    assert (x - real).shape == (3, 4) and (real - x).shape == (3, 4)
    assert x.mul_(2).add_(real, alpha=0.5) is x  # in place: itself
    assert torch.cat([x.reshape(-1), x.view(12)]).shape == (24,)
    assert torch.stack([x, x]).shape == (2, 3, 4) and x[1].shape == (4,) and x[:, 1:3].shape == (3, 2)
    assert torch._foreach_add_([x], [x]) is None
    assert [t.shape for t in torch._foreach_add([x], [x], alpha=2)] == [(3, 4)]
    assert torch.zeros_like(x).shape == (3, 4) and x.pow(2).sum().shape == ()
    assert x.numel() == 12 and x.item() == 0.0
    with pytest.raises(TypeError):
        bool(x)  # no values to branch on


# --------------------------------------------------------------------------- phantom = real

# Two datacenters of two workers with unequal speeds, a straggler window and a link outage:
# what the simulator models besides the arithmetic.
UNEQUAL = ["cluster.preset=custom", 'cluster.regions=["a","b"]',
           "cluster.latency_s=[[0.0001,0.03],[0.03,0.0001]]",
           "cluster.bandwidth_gbps=[[10,0.05],[0.05,10]]",
           'cluster.workers=[{region="a"},{region="a",speed=0.6},{region="b",speed=0.8},{region="b"}]',
           "cluster.size=0", "cluster.step_time_s=0.05",
           'cluster.slowdowns=[{worker=1,start_s=0.2,end_s=0.6,factor=3}]',
           'cluster.outages=[{src="a",dst="b",start_s=0.4,end_s=0.7}]']
EVERY = ["ddp", "ddp+bucket_mb=0.001", "diloco+H=4", "diloco+H=4+dylu=true", "streaming+H=4",
         "eager+H=4", "overlap_local_sgd+H=4", "async_local_sgd+H=4", "halos+H=4+K=4",
         "hierarchical+H=4", "adloco+H=4+batch_test=none"]


def variant(spec: str) -> list[str]:
    name, *changes = spec.split("+")
    return [f"algorithm.name={name}"] + [f"algorithm.{c}" for c in changes]


@pytest.mark.parametrize("spec", EVERY)
def test_phantom_run_times_and_bytes_exactly_as_real_arithmetic(spec):
    """The timing never depends on the arithmetic: a tiny real model's simulated run and its
    phantom (the same tensors, no values) end at the same virtual time with the same bytes,
    on unequal workers with a straggler and an outage, for every algorithm."""
    cfg = tiny_config(*variant(spec), *UNEQUAL, "train.tokens=8192", "plan.rounds=0")
    real = simulate(cfg).summary
    plan = run_plan(cfg)
    assert plan.wall_s == pytest.approx(real["sim_time_s"], rel=1e-12, abs=1e-12)
    assert plan.bytes_sent == real["bytes_sent"]
    assert plan.bytes_inter_region == real["bytes_inter_region"]
    assert plan.peak_bandwidth_gbps == pytest.approx(real["peak_link_gbps_by_link"])
    assert plan.utilization == pytest.approx(real["utilization"], rel=1e-9)
    assert (plan.tokens, plan.inner_steps) == (real["tokens"], real["inner_steps"])


def test_phantom_parameter_servers_survive_crashes_like_real_ones():
    cfg = tiny_config("algorithm.name=async_local_sgd", "algorithm.H=4", *UNEQUAL,
                      "train.tokens=8192", "plan.rounds=0", "cluster.on_crash=drop",
                      'cluster.crashes=[{worker=2,at_s=0.3,restart_after_s=0.2}]')
    real = simulate(cfg).summary
    plan = run_plan(cfg)
    assert plan.wall_s == pytest.approx(real["sim_time_s"], rel=1e-12)
    assert plan.bytes_sent == real["bytes_sent"] and plan.tokens == real["tokens"]


# --------------------------------------------------------------------------- representatives

# A small symmetric cluster: 3 regions x 3 workers, one region with two speed classes.
SYMMETRIC = ["phantom.params=3e6", "phantom.layers=6", "model.seq_len=16", "train.batch_size=4",
             "cluster.preset=custom", 'cluster.regions=["a","b","c"]',
             "cluster.latency_s=[[0.001,0.02,0.04],[0.02,0.001,0.03],[0.04,0.03,0.001]]",
             "cluster.bandwidth_gbps=[[5,0.5,0.3],[0.5,5,0.4],[0.3,0.4,5]]",
             'cluster.workers=[{region="a",count=3},{region="b",count=2},{region="b",speed=0.5},'
             '{region="c",count=3}]', "cluster.size=0", "cluster.step_time_s=0.1", "plan.rounds=5"]


@pytest.mark.parametrize("spec", ["ddp", "ddp+bucket_mb=1", "diloco+H=6", "streaming+H=6",
                                  "streaming+H=6+codec=fp4", "eager+H=6+codec=bf16",
                                  "overlap_local_sgd+H=6"])
def test_representatives_time_and_count_like_every_process(spec):
    cfg = load_config("quickstart", SYMMETRIC + variant(spec))[1]
    full = run_plan(_no_symmetry(cfg))
    reps = run_plan(cfg)
    assert (reps.processes, full.processes) == (4, 9) and reps.workers == full.workers == 9
    assert reps.wall_s == pytest.approx(full.wall_s, rel=1e-12)
    assert (reps.bytes_sent, reps.bytes_inter_region) == (full.bytes_sent, full.bytes_inter_region)
    assert reps.peak_bandwidth_gbps == pytest.approx(full.peak_bandwidth_gbps, rel=1e-12)
    assert reps.utilization == pytest.approx(full.utilization, rel=1e-12)
    assert reps.compute_utilization == pytest.approx(full.compute_utilization, rel=1e-12)
    assert (reps.tokens, reps.inner_steps) == (full.tokens, full.inner_steps)


def _no_symmetry(cfg):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.plan.symmetry = False
    return cfg


# --------------------------------------------------------------------------- closed forms

T, LAT = 0.5, 0.01  # step time, latency between the two datacenters
N = 8_000_000  # parameters: 8 layers of 1M, no embedding
PER_STEP = 2 * 4 * 16  # tokens per step of both workers


def two_dc(*overrides, gbps=1.0):
    sets = ["phantom.params=8e6", "phantom.layers=8", "model.seq_len=16", "train.batch_size=4",
            "cluster.preset=custom", 'cluster.regions=["a","b"]',
            f"cluster.latency_s=[[0,{LAT}],[{LAT},0]]", f"cluster.bandwidth_gbps=[[0,{gbps}],[{gbps},0]]",
            'cluster.workers=[{region="a"},{region="b"}]', f"cluster.step_time_s={T}",
            "plan.rounds=0", *overrides]
    return load_config("quickstart", sets)[1]


def transfer(values: float, gbps: float, bits: int = 32) -> float:
    """One all-reduce of `values` over M = 2, fp32 (f = 2(M-1)/M = 1): 2 latencies + f S / B."""
    return 2 * LAT + values * bits / (gbps * 1e9)


def test_data_parallel_exposes_every_all_reduce():
    r = run_plan(two_dc("algorithm.name=ddp", f"train.tokens={10 * PER_STEP}"))
    assert r.wall_s == pytest.approx(10 * (T + ring_allreduce_time(2, 4 * N, LAT, 1e9)))
    assert r.wall_s == pytest.approx(10 * (T + transfer(N, 1.0)))


def test_data_parallel_buckets_overlap_the_backward_pass():
    # Fast link: each layer's all-reduce (32 ms) ends before the next layer's gradient
    # (2T/3 / 8 = 42 ms later): only the last bucket is exposed.
    r = run_plan(two_dc("algorithm.name=ddp", "algorithm.bucket_mb=1", f"train.tokens={10 * PER_STEP}"))
    assert r.wall_s == pytest.approx(10 * (T + transfer(N / 8, 1.0)))
    # Slow link: the link never idles after the first bucket is ready (forward T/3, then
    # the first of 8 equal buckets), so the step ends when all of it has drained.
    r = run_plan(two_dc("algorithm.name=ddp", "algorithm.bucket_mb=1", f"train.tokens={10 * PER_STEP}",
                        gbps=0.2))
    assert r.wall_s == pytest.approx(10 * (T / 3 + 2 * T / 3 / 8 + transfer(N, 0.2)))


def test_diloco_exposes_one_all_reduce_per_round():
    r = run_plan(two_dc("algorithm.name=diloco", "algorithm.H=5", f"train.tokens={20 * PER_STEP}"))
    assert r.wall_s == pytest.approx(4 * (5 * T + transfer(N, 1.0)))


@pytest.mark.parametrize("gbps", [1.0, 0.5])
def test_diloco_with_layer_windows_hides_the_dag_window(gbps):
    """The whole model's sync may start when the last backward pass has finished the top
    block (7 of 8: (2/3) 7/8 of a step early) and is needed when the next forward pass
    reaches block 0 (at once): w = 7/12 of a step hidden, except after the last round."""
    r = run_plan(two_dc("algorithm.name=diloco", "algorithm.H=5", "algorithm.layer_windows=true",
                        f"train.tokens={20 * PER_STEP}", gbps=gbps))
    c, w = transfer(N, gbps), 7 / 12
    assert r.wall_s == pytest.approx(4 * 5 * T + 3 * max(0.0, c - w * T) + c)


@pytest.mark.parametrize("tau,gbps", [(0, 1.0), (0, 0.1), (1, 1.0), (1, 0.1)])
def test_streaming_exposes_what_tau_steps_do_not_hide(tau, gbps):
    """Spec 12: per fragment max(0, l + f (S/P) q / B - tau T). Here P = 4 fragments, H = 8,
    3 rounds; the last send (at the last step) and the final syncs of the other fragments
    are blocking (streaming.py's end of run)."""
    r = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=4",
                        f"algorithm.tau={tau}", f"train.tokens={24 * PER_STEP}", gbps=gbps))
    c = transfer(N / 4, gbps)
    rounds, P = 3, 4
    assert r.wall_s == pytest.approx(rounds * 8 * T + (rounds * P - 1) * max(0.0, c - tau * T) + P * c)


@pytest.mark.parametrize("gbps", [0.1, 0.05])
def test_layer_windows_hide_what_the_next_forward_pass_does_not_need_yet(gbps):
    """Streaming with one fragment per layer (P = 8) and tau = 0, each layer's all-reduce
    waited for with slack x_p = p / 8 of a step (api.Context.wait; streaming.layer_windows):
    a sync after step t exposes max(0, c - x_p T) instead of c; the last sync and the final
    ones have no next step to hide behind (spec 12's per-layer DAG, by hand)."""
    r = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=8",
                        "algorithm.tau=0", "algorithm.layer_windows=true",
                        f"train.tokens={24 * PER_STEP}", gbps=gbps))
    c = transfer(N / 8, gbps)
    hidden = sum(max(0.0, c - ((t - 1) % 8) / 8 * T) for t in range(1, 24))
    assert r.wall_s == pytest.approx(24 * T + hidden + c + 7 * c)
    plain = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=8",
                            "algorithm.tau=0", f"train.tokens={24 * PER_STEP}", gbps=gbps))
    assert plain.wall_s == pytest.approx(24 * T + 23 * c + 8 * c)


def test_steady_state_leaves_out_the_start_and_the_end():
    # Overlapped fragments (0.28 s) shorter than tau T = 0.5 s: the steady state computes all
    # the time; the whole run does not (the final syncs block).
    r = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=4",
                        "algorithm.tau=1", f"train.tokens={24 * PER_STEP}"))
    assert r.compute_utilization == 1.0 > r.utilization
    marks = [(0.0, 0, 0)] + [(10.0 * u, 0, u) for u in range(1, 9)] + [(99.0, 0, 8)]
    assert steady_window(marks) == (20.0, 60.0)  # updates 2 to 6 of 8


def test_fp4_streaming_sends_an_eighth_plus_scales():
    fp32 = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=4",
                           f"train.tokens={24 * PER_STEP}"))
    fp4 = run_plan(two_dc("algorithm.name=streaming", "algorithm.H=8", "algorithm.fragments=4",
                          "algorithm.codec=fp4", f"train.tokens={24 * PER_STEP}"))
    assert fp4.bytes_sent / fp32.bytes_sent == pytest.approx((0.5 + 4 / 128) / 4)


def test_eager_hides_what_one_round_of_compute_covers():
    # An all-reduce (2.35 s) shorter than a round (H T = 2.5 s) is hidden; only the last
    # one, waited for at the end, is exposed.
    r = run_plan(two_dc("algorithm.name=eager", "algorithm.H=5", f"train.tokens={20 * PER_STEP}",
                        gbps=0.11))
    assert r.wall_s == pytest.approx(4 * 5 * T + transfer(N, 0.11))
    # Longer than a round, consecutive all-reduces share the link, which sets the pace:
    # the steady state's round takes the drain time, plus at most the latency terms.
    r = run_plan(two_dc("algorithm.name=eager", "algorithm.H=5", f"train.tokens={12 * 5 * PER_STEP}",
                        gbps=0.05))
    drain = transfer(N, 0.05) - 2 * LAT
    assert 5 * T / (drain + 2 * LAT) <= r.compute_utilization <= 5 * T / drain


# --------------------------------------------------------------------------- the search


def test_bandwidth_search_is_monotone_and_hits_its_target():
    cfg = two_dc("algorithm.name=diloco", "algorithm.H=5", "plan.rounds=8")

    def cu(g):
        return run_plan(with_bandwidth(cfg, g)).compute_utilization

    search = BandwidthSearch(cu, "diloco", 0.001, 1e4)
    found = search.find(0.9)
    assert cu(found) >= 0.9 > cu(found / 1.0101)
    # DiLoCo's closed form: CU = H T / (H T + transfer) -> the exact bandwidth
    exact = 32 * N / (5 * T * (1 / 0.9 - 1) - 2 * LAT) / 1e9
    assert exact <= found <= exact * 1.01
    curve = search.curve()
    assert all(u1 <= u2 for (_, u1), (_, u2) in zip(curve, curve[1:]))
    assert search.find(0.5) < found  # the second target reuses the first one's plans


def test_with_bandwidth_scales_the_slowest_link_to_the_value():
    cfg = load_config("halos-4x4")[1]
    assert inter_gbps(cfg) == pytest.approx(0.117)
    faster = with_bandwidth(cfg, 1.17)
    assert inter_gbps(faster) == pytest.approx(1.17)
    assert faster.cluster.bandwidth_gbps[0][2] == pytest.approx(9.35)  # 0.935 x 10
    assert faster.cluster.bandwidth_gbps[0][0] == 100  # inside a region: untouched


# --------------------------------------------------------------------------- the command


def plan(capsys, *argv):
    code = loco(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_loco_plan_writes_its_files(tmp_path, capsys):
    out = tmp_path / "p"
    code, text, _ = plan(capsys, "quickstart", "--set", "phantom.params=8e6", "--set", "phantom.layers=8",
                         "--set", "cluster.inter_latency_s=0.001",
                         "--set", "plan.rounds=4", "--algorithms", "ddp,diloco", "--find-bandwidth",
                         "0.5,0.9", "--out", str(out))
    assert code == 0, text
    p = json.loads((out / "plan.json").read_text())
    for key in ("compute_utilization", "wall_s", "bytes_sent", "peak_bandwidth_gbps", "find_bandwidth"):
        assert set(p[key]) == {"ddp", "diloco"}, key
    assert set(p["find_bandwidth"]["diloco"]) == {"0.5", "0.9"}
    assert p["find_bandwidth"]["diloco"]["0.5"] < p["find_bandwidth"]["diloco"]["0.9"]
    assert (out / "plots" / "utilization.png").stat().st_size > 0
    assert (out / "timelines" / "ddp.json").exists() and "| loco plan |" in text


def one_line_error(capsys, *argv) -> str:
    code, _, err = plan(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loco plan:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loco: error:"), err
    return lines[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "has no size" in one_line_error(capsys, "quickstart", "--set", "phantom.layers=24", *out)
    assert "is not an algorithm" in one_line_error(capsys, "quickstart", "--algorithms", "ddp,dilcoo", *out)
    assert "(0, 1]" in one_line_error(capsys, "quickstart", "--find-bandwidth", "1.5", *out)
    line = one_line_error(capsys, "quickstart", "--set", "phantom.params=1e6", "--set",
                          "algorithm.H=1", "--set", "plan.max_gbps=0.001", "--set", "plan.min_gbps=1e-5",
                          "--find-bandwidth", "0.99", *out)
    assert "out of reach" in line and "best found" in line
    assert "batch_test=none" in one_line_error(capsys, "quickstart", "--algorithms", "adloco", *out)


def test_targets_parse_as_written():
    assert parse_targets("0.5, 0.99") == [("0.5", 0.5), ("0.99", 0.99)]
    with pytest.raises(UserError):
        parse_targets("0.5,half")


# --------------------------------------------------------------------------- scale and buckets


def test_a_thousand_workers_run_as_one_process_per_class():
    regions = [f"r{i}" for i in range(10)]
    lat = [[1e-4 if i == j else 0.03 for j in range(10)] for i in range(10)]
    bw = [[400 if i == j else 10 for j in range(10)] for i in range(10)]
    workers = ",".join(f'{{region="{r}",count=100}}' for r in regions)
    cfg = load_config("plan-100b", [
        "plan.rounds=3", "cluster.preset=custom", "cluster.size=0", f"cluster.regions={json.dumps(regions)}",
        f"cluster.latency_s={lat}", f"cluster.bandwidth_gbps={bw}", f"cluster.workers=[{workers}]"])[1]
    r = run_plan(cfg)
    assert (r.workers, r.processes) == (1000, 10)
    assert r.bytes_inter_region < r.bytes_sent  # the ring crosses each region boundary once


def test_real_runtime_hooks_hand_gradients_over_last_layer_first():
    cfg = tiny_config("model.depth=2")
    from locotrain.data import make_shards
    from locotrain.setup import build

    setup = build(cfg)
    wl = setup.workload
    engine = Engine("sequential")
    shard = make_shards(setup.corpus.train, 1, "iid", wl.window, 0)[0]
    row = engine.add_worker(0, wl, wl.init_params(0), shard, 8, cfg.train, 10)
    engine.start()
    seen = []
    job = engine.submit(row, "gradients")
    job.on_grad = lambda i, g: seen.append((i, tuple(g.shape)))
    grads, _ = engine.complete(job)
    names = setup.job.param_names
    assert sorted(i for i, _ in seen) == list(range(len(names)))
    assert seen[0][0] == names.index("head")  # the backward pass starts at the head
    assert [s for _, s in sorted(seen)] == [tuple(g.shape) for g in grads]


@pytest.mark.slow
def test_bucketed_ddp_on_real_processes_equals_the_simulator(tmp_path):
    from test_real import REAL, launch

    proc, out, _ = launch(tmp_path, "algorithm.name=ddp", "algorithm.bucket_mb=0.001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    real = json.loads((out / "summary.json").read_text())
    sim = simulate(load_config("quickstart", REAL + ["algorithm.name=ddp",
                                                     "algorithm.bucket_mb=0.001"])[1]).summary
    assert real["bytes_sent"] == sim["bytes_sent"]
    assert real["final_val_bpc"] == pytest.approx(sim["final_val_bpc"], abs=1e-4)


def test_bucketed_ddp_resumes_exactly(tmp_path, monkeypatch):
    """Bucket all-reduces in flight when a run is interrupted come back on resume
    (test_resume.py's check: the same metrics and model bytes as the uninterrupted run)."""
    import test_resume

    monkeypatch.setitem(test_resume.CASES, "ddp-buckets",
                        ["algorithm.name=ddp", "algorithm.bucket_mb=0.01"])
    test_resume.test_resumed_runs_equal_the_uninterrupted_run(tmp_path, "ddp-buckets")
