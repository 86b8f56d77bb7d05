"""2BP over torch.distributed (pipeline/distributed.py, spawn.py): one process per stage, gloo
on loopback, a tiny char GPT. The gradients must be plain backprop's, each stage must run the
time model's order, and no process may outlive a run, a failed one included."""

import os
import sys
import time

import pytest
import torch

from locotrain.errors import UserError
from locotrain.models.backbone import Backbone, init_params
from locotrain.pipeline.distributed import Job, Run
from locotrain.pipeline.inprocess import reference_grads
from locotrain.pipeline.schedules import Op
from locotrain.pipeline.spawn import spawn
from locotrain.pipeline.timeline import Link, Pipeline, StageTimes, simulate

SPEC = Backbone(vocab_in=65, vocab_out=65, depth=4, width=32, heads=2, seq_len=16, causal=True)
S, M = 2, 4
RUNS = [Run("plain"), Run("2bp-end", mode="stash"), Run("2bp-fill", mode="stash", p2="fill"),
        Run("gpipe-2bp-concat", schedule="gpipe", mode="stash", concat=True)]

# A rank that first leaves its pid in a folder (argv[1]), so the tests can see it is gone, and
# then, if it is rank FAIL (argv[2], -1 for none), fails before joining the group: its peer is
# left waiting at the rendezvous and must be stopped by the launcher.
RANK_ENTRY = """
import os, sys
folder, fail = sys.argv[1], int(sys.argv[2])
rank = int(os.environ["RANK"])
open(os.path.join(folder, str(rank)), "w").write(str(os.getpid()))
if rank == fail:
    raise SystemExit("injected failure of rank %d" % rank)
from locotrain.pipeline.distributed import main
sys.exit(main(sys.argv[3:]))
"""


def _entry(folder, fail=-1):
    return [sys.executable, "-c", RANK_ENTRY, str(folder), str(fail)]


def _gone(folder) -> bool:
    pids = [int(p.read_text()) for p in folder.iterdir()]
    assert pids, "no rank started"
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.fixture(scope="module")
def model():
    params = init_params(SPEC, torch.Generator().manual_seed(0))
    # random weights everywhere: nanochat's zero-initialised head and projections would give
    # zero gradients that a wrong runner could also produce
    gen = torch.Generator().manual_seed(1)
    params = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in params.items()}
    batch = torch.randint(0, 65, (M, 2, SPEC.seq_len + 1), generator=gen)
    return params, batch


@pytest.fixture(scope="module")
def ran(model, tmp_path_factory):
    params, batch = model
    pids = tmp_path_factory.mktemp("pids")
    job = Job(SPEC, S, M, 2, RUNS, params=params, batch=batch, keep_grads=True)
    report = spawn(job, entry=_entry(pids), quiet=True)
    runs = {r["name"]: r for r in report["runs"]}
    return runs, report, reference_grads(SPEC, params, batch), pids


def _max_rel_err(grads, ref):
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


@pytest.mark.parametrize("name", [r.name for r in RUNS])
def test_distributed_gradients_equal_plain_backprop(ran, name):
    runs, _, (ref, ref_loss), _ = ran
    r = runs[name]
    assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert set(r["grads"]) == set(ref)
    assert _max_rel_err(r["grads"], ref) < 1e-5  # float32 round-off, nothing more
    # and 2BP's gradients are plain 1F1B's over the same processes
    assert _max_rel_err(r["grads"], runs["plain"]["grads"]) < 1e-5


def test_each_stage_runs_the_time_models_order(ran):
    runs, _, _, _ = ran
    for run in RUNS:
        plan = simulate(Pipeline.uniform(S, M, 1.0, 1.0, 1.0), run.schedule,
                        twobp=run.mode == "stash", p2=run.p2, concat=run.concat)
        for s, st in enumerate(runs[run.name]["stages"]):
            assert st["order"] == [str(op) for op in plan.order(0, s)]
    # under "fill" stage 0 runs a p2 in the wait for its last gradient, not only at the end
    assert runs["2bp-fill"]["stages"][0]["order"][-5:] == ["P2:0", "P1:3", "P2:1", "P2:2", "P2:3"]
    # memory: 1F1B holds S - s micro-batches, 2BP all m until their p2, and keeps more bytes
    assert [st["peak_held"] for st in runs["plain"]["stages"]] == [S - s for s in range(S)]
    assert [st["peak_held"] for st in runs["2bp-end"]["stages"]] == [M] * S
    for plain, twobp in zip(runs["plain"]["stages"], runs["2bp-end"]["stages"]):
        assert 0 < plain["state_bytes"] < twobp["state_bytes"]


def test_report_has_measured_times_and_the_models_prediction(ran):
    runs, report, _, _ = ran
    assert len(report["link_one_way_s"]) == S - 1 and report["link_one_way_s"][0] > 0
    assert report["message_bytes"] == 2 * SPEC.seq_len * SPEC.width * 4
    for r in runs.values():
        kinds = {"F", "B"} if r["mode"] == "plain" else {"F", "P1", "P2"}
        for st in r["stages"]:
            assert set(st["op_s"]) == kinds and min(st["op_s"].values()) > 0
            assert all(len(v) == M and min(v) > 0 for v in st["per_mb_s"].values())
        assert r["step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(M * 2 * SPEC.seq_len / r["step_s"])
        # the prediction: the model fed this run's measured times (a plain B as p1 + 0) and
        # the measured link, timing the order the stages executed
        times = [[StageTimes(st["op_s"]["F"], st["op_s"].get("B", st["op_s"].get("P1")),
                             st["op_s"].get("P2", 0.0)) for st in r["stages"]]]
        one_way = report["link_one_way_s"][0]
        link = Link(0.0, 8 * report["message_bytes"] / one_way / 1e9)
        orders = [[Op(k, tuple(map(int, mbs.split(","))))
                   for k, mbs in (o.split(":") for o in st["order"])] for st in r["stages"]]
        model = simulate(Pipeline(times, [[link]], M, report["message_bytes"]), orders=orders)
        assert r["predicted_step_s"] == pytest.approx(model.step_time_s, rel=1e-9)
        assert model.step_time_s > sum(max(t.forward, t.backward) for t in times[0])
        assert r["prediction_rel_error"] == pytest.approx(r["predicted_step_s"] / r["step_s"] - 1)


def test_host_staged_transport_gives_the_same_gradients(model, ran):
    # transport = "gloo": every message copied to host memory, over gloo groups, copied back
    # (on the cpu the copies are made too, so this is the path GPUs take without NCCL)
    params, batch = model
    runs = [Run("plain"), Run("2bp-fill", mode="stash", p2="fill")]
    job = Job(SPEC, S, M, 2, runs, params=params, batch=batch, keep_grads=True,
              transport="gloo", prefetch=1)
    report = spawn(job, quiet=True)
    direct = ran[0]
    assert report["link_one_way_s"][0] > 0
    for r in report["runs"]:
        assert r["loss"] == pytest.approx(direct[r["name"]]["loss"], rel=1e-6)
        assert _max_rel_err(r["grads"], direct[r["name"]]["grads"]) < 1e-6
        assert [st["order"] for st in r["stages"]] == \
            [st["order"] for st in direct[r["name"]]["stages"]]


def test_a_transport_must_be_known():
    with pytest.raises(UserError, match="transport must be one of nccl, gloo"):
        spawn(Job(SPEC, S, M, 2, [Run("plain")], transport="tcp"))


def test_no_rank_outlives_its_run(ran):
    assert _gone(ran[3])


def test_a_failed_rank_stops_the_others(model, tmp_path):
    params, batch = model
    job = Job(SPEC, S, M, 2, [Run("plain")], params=params, batch=batch)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed.*injected failure of rank 1"):
        spawn(job, entry=_entry(tmp_path, fail=1), grace_s=1.0, quiet=True)
    # rank 0 waits for its peer at the rendezvous (for job.timeout_s) unless it is stopped
    assert time.monotonic() - t0 < 30
    assert _gone(tmp_path)


@pytest.mark.parametrize("stages,nproc,depth,match", [
    (5, 5, 4, "5 stages for a model of 4 blocks"),
    (2, 1, 4, "2 stages need 2 processes"),
    (3, 2, 4, "3 stages need 3 processes")])
def test_bad_input_is_a_one_line_error(stages, nproc, depth, match):
    spec = Backbone(65, 65, depth, 32, 2, 16, True)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=match) as err:
        spawn(Job(spec, stages, M, 2, [Run("plain")]), nproc)
    assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 1  # refused before any process starts


def test_a_fill_plan_must_come_from_a_2bp_run():
    runs = [Run("plain"), Run("fill", mode="stash", p2="fill", plan_from="plain")]
    with pytest.raises(UserError, match="plan_from must name an earlier 2BP"):
        spawn(Job(SPEC, S, M, 2, runs))


def test_the_time_model_times_an_executed_order():
    # The step of tests/test_pipeline.py drawn by hand (S = 2, m = 2, unit times): 8 with the
    # p2s at the end, 7 with stage 0's first p2 in its wait. Given the fill order from
    # outside, the model times that order (7) whatever policy it is told.
    pipe = Pipeline.uniform(2, 2, 1.0, 1.0, 1.0)
    fill = simulate(pipe, "1f1b", twobp=True, p2="fill")
    orders = [fill.order(0, s) for s in range(2)]
    given = simulate(pipe, "1f1b", twobp=True, p2="end", orders=orders)
    assert given.step_time_s == fill.step_time_s == 7.0
    assert [given.order(0, s) for s in range(2)] == orders
