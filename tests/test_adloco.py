"""AdLoCo (algorithms/adloco.py): the norm test and the inner-product test against hand
computations on canned gradients, merge weights by hand, node reassignment, the reduction to
DiLoCo with plain-SGD outer steps, settings errors, and both runtimes on one small run."""

import json
import math
import re

import pytest
import torch

from locotrain.algorithms.adloco import (AdLoCo, AdLoCoSettings, CountSketch, distribute,
                                         initial_trainers, node_counts, pick_merge)
from locotrain.checkpoint import load_checkpoint
from locotrain.config import load_config
from locotrain.errors import UserError
from locotrain.run import simulate
from locotrain.runtime.api import Job, WorkerInfo
from locotrain.setup import build

from conftest import tiny_config
from scripted import Script

SEQ = 4


def job(M, steps, batch=2):
    """M workers of batch `batch` (the budget: `steps` steps of all of them) over one
    2-value parameter."""
    workers = [WorkerInfo(i, 0, 1.0, batch, 1.0) for i in range(M)]
    return Job(workers, ["r0"], ["w"], [(2,)], total_tokens=steps * M * batch * SEQ,
               seq_len=SEQ, depth=1)


G = {0: [torch.tensor([1.0, 0.0])], 1: [torch.tensor([0.0, 1.0])], 2: [torch.tensor([1.0, 1.0])]}
D = {0: [torch.tensor([0.1, 0.2])], 1: [torch.tensor([0.3, -0.1])], 2: [torch.tensor([0.0, 0.4])]}
THETA0 = [torch.tensor([1.0, -1.0])]


def logged(s: Script) -> list[str]:
    return s.calls("w0", "log")


# --------------------------------------------------------------------------- the batch tests


def test_norm_test_grows_the_batch_to_the_hand_computed_T():
    """One trainer of 3 nodes whose last-step gradients are g0 = (1, 0), g1 = (0, 1),
    g2 = (1, 1), b = 2, eta = 0.2: gbar = (2/3, 2/3), ||gbar||^2 = 8/9, sum ||g_m - gbar||^2 =
    5/9 + 5/9 + 2/9 = 4/3, V = b/(M-1) 4/3 = 4/3, T = ceil(V / (M eta^2 8/9)) =
    ceil(1 / (2 eta^2)) = ceil(12.5) = 13."""
    cfg = AdLoCoSettings(H=2, trainers=1, initial_batch=2, eta=0.2)
    s = Script(AdLoCo(cfg, job(3, steps=20)), THETA0, drift=D, gradients=G).run()
    # round 1: one step, then the last step's gradient apart; round 2 at b = 13
    assert [c[0] for c in s.calls("w1", "train")][:2] == [1, 1]
    assert [c[3] for c in s.calls("w1", "train")][:2] == [2, 13]
    assert "adloco round 1: trainer 0 b=13 nodes [0, 1, 2]" in logged(s)
    # what the nodes exchanged for it: the gradient (2 values < sketch_dim: exact) and ||g||^2
    stats = s.calls("w2", "all_reduce")[1]
    assert torch.equal(stats[0], G[2][0]) and stats[1].item() == pytest.approx(2.0)
    # the reference's formula on the same gradients
    g = torch.stack([G[m][0] for m in range(3)])
    gbar = g.mean(0)
    V = 2 / 2 * sum((x - gbar).norm() ** 2 for x in g)
    assert math.ceil(V / (3 * 0.2 ** 2 * gbar.norm() ** 2)) == 13


PARALLEL = {m: [torch.tensor([m + 1.0, 0.0])] for m in range(3)}


@pytest.mark.parametrize("grads, T_ip, T_orth", [(G, 18.75, 22.5), (PARALLEL, 25.0, 0.0)],
                         ids=["orthogonal-part-decides", "inner-product-decides"])
def test_inner_product_test_matches_the_reference_formulas(grads, T_ip, T_orth):
    """nu = 0.1. For G: x_m = <g_m, gbar> = 2/3, 2/3, 4/3, var = 4/27, T_ip = (4/27) /
    (nu^2 (8/9)^2) = 18.75; the orthogonal parts (1/2, -1/2), (-1/2, 1/2), (0, 0) have
    per-coordinate variance 1/5, T_orth = (1/5) / (nu^2 8/9) = 22.5: b = 23. For g_m =
    (1, 0), (2, 0), (3, 0): x = 2, 4, 6, var 4, T_ip = 4 / (nu^2 16) = 25, T_orth = 0: b = 25."""
    cfg = AdLoCoSettings(H=2, trainers=1, initial_batch=2, batch_test="inner_product", nu=0.1)
    s = Script(AdLoCo(cfg, job(3, steps=20)), THETA0, drift=D, gradients=grads).run()
    assert [c[3] for c in s.calls("w0", "train")][:2] == [2, math.ceil(max(T_ip, T_orth))]
    g = torch.stack([grads[m][0] for m in range(3)])  # calc_batch.py's statistics
    gbar = g.mean(0)
    gsq = (gbar.norm() ** 2).item()
    x = g @ gbar
    orth = g - (x / gsq).unsqueeze(1) * gbar
    assert torch.var(x, unbiased=True).item() / (0.1 ** 2 * gsq ** 2) == pytest.approx(T_ip)
    assert torch.var(orth, unbiased=True).item() / (0.1 ** 2 * gsq) == pytest.approx(T_orth)


def test_a_frozen_or_lone_node_keeps_its_batch_and_the_cap_holds():
    frozen = Script(AdLoCo(AdLoCoSettings(H=2, trainers=1, batch_test="none"), job(3, steps=8)),
                    THETA0, drift=D, gradients=G).run()
    assert {c[3] for c in frozen.calls("w0", "train")} == {4}
    assert not frozen.calls("w0", "gradients")  # nothing kept, nothing exchanged for it
    capped = Script(AdLoCo(AdLoCoSettings(H=2, trainers=1, initial_batch=2, eta=0.2,
                                          max_batch=5), job(3, steps=20)),
                    THETA0, drift=D, gradients=G).run()
    assert [c[3] for c in capped.calls("w0", "train")][:2] == [2, 5]


def test_count_sketch_is_linear_and_keeps_norms():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50_000, generator=g), torch.randn(50_000, generator=g)
    S = CountSketch(50_000, 1023)
    assert torch.allclose(S(x + y), S(x) + S(y), atol=1e-4)
    for v in (x, x.abs()):  # random signs: colliding coordinates cancel on average
        assert (S(v).norm() ** 2).item() == pytest.approx((v.norm() ** 2).item(), rel=0.15)  # sd sqrt(2/1023) = 4.4%
    assert torch.equal(S(x), CountSketch(50_000, 1023)(x))  # the same on every worker


# --------------------------------------------------------------------------- trainers


def test_node_counts_follow_demand_and_the_fewest_nodes_move():
    assert initial_trainers(4, 2) == {0: [0, 1], 1: [2, 3]}
    assert initial_trainers(3, 2) == {0: [0], 1: [1, 2]}  # round(1.5) = 2, fixed on trainer 0
    assert node_counts({0: 8, 1: 4}, 4) == {0: 3, 1: 1}  # 2.67 -> 3, 1.33 -> 1
    assert node_counts({0: 100, 1: 1, 2: 1, 3: 1}, 4) == {0: 1, 1: 1, 2: 1, 3: 1}  # never 0
    # trainer 1 grows from 2 to 3 nodes: trainer 0 gives up its highest-numbered node only
    assert distribute({0: [0, 1], 1: [2, 3]}, {0: 1, 1: 4}, 4) == {0: [0], 1: [1, 2, 3]}
    assert distribute({0: [0, 1], 1: [2, 3]}, {0: 2, 1: 2}, 4) == {0: [0, 1], 1: [2, 3]}
    members, batch = {0: [0], 1: [1, 2], 2: [3]}, {0: 4, 1: 2, 2: 1}
    assert pick_merge(members, batch, "worst_with_worst") == (0, 2)  # demands 4, 4, 1
    assert pick_merge(members, batch, "best_with_worst") == (0, 2)
    assert pick_merge({0: [0], 1: [1, 2]}, {0: 2, 1: 8}, "worst_with_worst") == (1, 0)


def test_merge_weights_are_nodes_times_batch():
    """Trainer 0 = {w0} keeps b = 2 (one node: no test); trainer 1 = {w1, w2} grows to
    b = ceil(2 / (2 eta^2 ||gbar||^2) * 1) = 8 (g1 = (1,0), g2 = (0,1), eta = 0.5). Demands 2
    and 16: after round 1 worst-with-worst merges trainer 0 into trainer 1 with weights 1/9 and
    8/9, theta = (2 theta_0 + 16 theta_1) / 18. Round 2 is one step of all three nodes."""
    grads = {0: [torch.tensor([5.0, 5.0])], 1: [torch.tensor([1.0, 0.0])],
             2: [torch.tensor([0.0, 1.0])]}
    cfg = AdLoCoSettings(H=2, trainers=2, initial_batch=2, eta=0.5, outer_lr=1.0,
                         merge_frequency=1)
    # budget: round 1 = 2 steps x 4 x (2 + 2 x 2) = 48 tokens, round 2 = 1 step x 4 x 24 = 96
    s = Script(AdLoCo(cfg, job(3, steps=6)), THETA0, drift=D, gradients=grads).run()
    theta_0 = THETA0[0] - 2 * D[0][0]  # two plain steps, outer lr 1
    theta_1 = THETA0[0] - ((D[1][0] + grads[1][0]) + (D[2][0] + grads[2][0])) / 2
    merged = (2 * theta_0 + 16 * theta_1) / 18
    assert "adloco round 1: merge trainer 0 (demand 2) into trainer 1 (demand 16), weights " \
           "0.1111 / 0.8889" in logged(s)
    # every trainer's new b reached every worker: slot m holds M b of worker m's trainer
    assert torch.equal(s.calls("w0", "all_reduce")[0][0], torch.tensor([6.0, 0.0, 0.0]))
    assert torch.equal(s.calls("w1", "all_reduce")[2][0], torch.tensor([0.0, 24.0, 0.0]))
    parts = [s.calls(f"w{m}", "all_reduce")[idx][0] for m, idx in ((0, 1), (1, 3), (2, 3))]
    assert torch.allclose(parts[0], theta_0 * 2 * 3 / 18)  # theta b (n_a + n_b) / (D_a + D_b)
    assert torch.allclose(parts[1], theta_1 * 8 * 3 / 18)
    assert torch.allclose(sum(parts) / 3, merged)
    # round 2 starts from the merged model: one gradient step per node, then the outer step
    final = s.calls("w0", "publish")[-1]
    expected = merged - sum(grads[m][0] for m in range(3)) / 3
    assert torch.allclose(final[0][0], expected, atol=1e-6) and final[2] == 2


def test_a_node_that_changes_trainer_receives_the_trainers_model():
    """4 nodes, two trainers: trainer 1's b grows, so w1 moves to it and gets theta_1 (and its
    momentum) from w2, the trainer's lowest-numbered staying node."""
    grads = {0: [torch.tensor([1.0, 1.0])], 1: [torch.tensor([1.0, 1.0])],
             2: [torch.tensor([1.0, 0.0])], 3: [torch.tensor([0.0, 1.0])]}
    drift = {**D, 3: [torch.tensor([0.2, 0.2])]}
    cfg = AdLoCoSettings(H=2, trainers=2, initial_batch=2, eta=0.5, outer_lr=0.5,
                         outer_momentum=0.5, merge_frequency=5)
    s = Script(AdLoCo(cfg, job(4, steps=16)), THETA0, drift=drift, gradients=grads).run()
    assert "adloco round 1: trainer 0 b=2 nodes [0]; trainer 1 b=8 nodes [1, 2, 3]" in logged(s)
    sent = s.calls("w2", "send")[0]
    assert sent[0] == "w1"
    mean = sum(drift[m][0] + grads[m][0] for m in (2, 3)) / 2
    theta_1 = THETA0[0] - 0.5 * (mean + 0.5 * mean)  # first Nesterov step: b = delta
    assert torch.allclose(sent[1].tensors[0], theta_1) and torch.allclose(sent[1].tensors[1], mean)
    assert s.calls("w0", "form_groups")[-1] == [(1, 2, 3)]
    # from then on w1 is one of trainer 1's nodes: in the final merge (no merge before, with
    # merges every 5 rounds) it contributes their model, theta_1 b_1 M / sum D, like w2
    final = [s.calls(f"w{m}", "all_reduce")[-1][0] for m in range(4)]
    assert "merge" not in " ".join(logged(s)[:-1]) and "adloco end" in logged(s)[-1]
    assert torch.equal(final[1], final[2]) and torch.equal(final[1], final[3])
    assert not torch.allclose(final[1] / 8, final[0] / 2)


# --------------------------------------------------------------------------- simulator


def test_frozen_batch_and_one_trainer_is_diloco_with_sgd_outer_steps():
    base = ["cluster.preset=two-datacenters", "cluster.size=4", "cluster.step_time_s=0.5",
            "train.tokens=12288", "algorithm.H=4", "algorithm.outer_lr=0.7",
            "algorithm.outer_momentum=0"]
    diloco = simulate(tiny_config("algorithm.name=diloco", *base))
    adloco = simulate(tiny_config("algorithm.name=adloco", *base, "algorithm.trainers=1",
                                  "algorithm.batch_test=none", "algorithm.initial_batch=8"))
    for k in diloco.params:  # the LR positions are computed differently: a rounding apart
        assert torch.allclose(diloco.params[k], adloco.params[k], atol=1e-6, rtol=0), k
    for key in ("bytes_sent", "bytes_inter_region", "tokens", "outer_updates", "sim_time_s"):
        assert adloco.summary[key] == diloco.summary[key], key


@pytest.mark.parametrize("setting, message", [
    ("algorithm.merge_frequency=0", "algorithm.merge_frequency must be >= 1"),
    ("algorithm.initial_batch=0", "algorithm.initial_batch must be >= 1"),
    ("algorithm.trainers=3", "algorithm.trainers = 3, but the cluster has 2 worker(s)"),
])
def test_bad_settings_are_one_line_errors(setting, message):
    cfg = tiny_config("algorithm.name=adloco", "algorithm.H=2", "cluster.preset=two-datacenters",
                      "cluster.size=2", setting)
    with pytest.raises(UserError) as e:
        build(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- both runtimes


def test_real_processes_give_the_simulators_parameters(tmp_path):
    """3 real processes: trainers {w0} and {w1, w2} (a group formed during the run), the norm
    test grows trainer 1's batch to 11 (accumulated over micro-batches of 4), every worker
    learns it from one all-reduce, and the trainers merge at round 2."""
    from test_real import launch

    custom = ["cluster.preset=custom", "cluster.size=3", "cluster.regions=['a', 'b']",
              "cluster.latency_s=[[0.0, 0.01], [0.01, 0.0]]",
              "cluster.bandwidth_gbps=[[0.0, 1.0], [1.0, 0.0]]",
              "cluster.workers=[{region='a', count=1}, {region='b', count=2}]"]
    proc, out, _ = launch(tmp_path, "algorithm.name=adloco", "algorithm.H=2", *custom,
                          "algorithm.initial_batch=4", "algorithm.eta=0.5",
                          "algorithm.device_batch=4", "train.tokens=4096")
    assert proc.returncode == 0, proc.stderr[-2000:]
    real, _, _, _ = load_checkpoint(out)
    sim = simulate(load_config(str(out / "config.toml"))[1])
    for k in real:
        assert torch.allclose(real[k], sim.params[k].cpu(), atol=1e-5, rtol=1e-4), k
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    real_log = [re.sub(r"^\[t=[0-9.]+s w0\] ", "", e["text"]) for e in lines if e["event"] == "log"]
    sim_log = [re.sub(r"^\[t=[0-9.]+s w0\] ", "", t) for t in sim.runtime.recorder.logs]
    assert real_log == sim_log
    assert "adloco round 1: trainer 0 b=4 nodes [0]; trainer 1 b=11 nodes [1, 2]" in sim_log
    assert any("merge trainer 0" in t for t in sim_log)


@pytest.mark.parametrize("trainers", [1, 3])
def test_an_interrupted_run_resumes_to_the_same_end(tmp_path, trainers):
    """The batch sizes come from small exchanged values (a 1024-value sketch and ||g||^2 in a
    trainer; M numbers between trainers), which a resumed run's replay feeds back, so it
    branches as the original did (run.py's resume)."""
    from locotrain.run import resume
    from test_resume import metrics, run

    case = ["algorithm.name=adloco", "algorithm.H=2", "algorithm.initial_batch=2",
            "cluster.size=6", f"algorithm.trainers={trainers}", "algorithm.eta=0.5"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    events = run(reference, case)
    texts = [e["text"] for e in metrics(reference) if e["event"] == "log"]
    assert len(texts) >= 2 and (trainers == 1 or any("merge" in t for t in texts))  # b grew
    assert run(out, case, stop_at=events // 2) is None
    resume(out)
    assert metrics(out) == metrics(reference)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_the_timeline_draws_the_merges_and_each_trainers_batch():
    """adloco.timeline_marks reads worker 0's log lines (as the simulator prefixes them):
    one mark per merge, and each trainer's b as a step series; other lines are ignored."""
    from locotrain.algorithms.adloco import timeline_marks

    logs = ["[t=0.00s w0] adloco round 0: trainer 0 b=4 nodes [0, 1]; trainer 1 b=4 nodes [2, 3]",
            "[t=0.80s w0] adloco round 1: trainer 0 b=5 nodes [0, 1]; trainer 1 b=7 nodes [2, 3]",
            "[t=0.90s w1] crashed",
            "[t=1.60s w0] adloco round 2: merge trainer 0 (demand 10) into trainer 1 (demand 14), "
            "weights 0.4167 / 0.5833",
            "[t=1.60s w0] adloco round 2: trainer 1 b=9 nodes [0, 1, 2, 3]",
            "[t=3.00s w0] adloco end: merge trainers 1, 2 (demands 36, 8) into the final model"]
    got = timeline_marks(logs)
    assert got["marks"] == [(1.6, "merge 0 \u2192 1"), (3.0, "merge 1, 2 \u2192 model")]
    assert got["series"] == {"trainer 0": [(0.0, 4), (0.8, 5)],
                             "trainer 1": [(0.0, 4), (0.8, 7), (1.6, 9)]}


def test_a_runs_timeline_carries_its_batch_schedule(tmp_path):
    """A finished run's folder: report.algorithm_overlay finds AdLoCo's marks in its
    metrics.jsonl, with the b each round logged, and timeline.png is drawn with them."""
    from locotrain import report

    out = tmp_path / "run"
    simulate(tiny_config("algorithm.name=adloco", "algorithm.H=2", "algorithm.trainers=2",
                         "algorithm.initial_batch=2", "cluster.preset=two-datacenters",
                         "cluster.size=4"), out)
    overlay = report.algorithm_overlay(out)
    logged = [e["text"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "log" and " b=" in e.get("text", "")]
    assert logged and set(overlay["series"]) >= {"trainer 0"}
    assert sum(len(v) for v in overlay["series"].values()) == sum(x.count(" b=") for x in logged)
    assert (out / "plots" / "timeline.png").stat().st_size > 10_000
