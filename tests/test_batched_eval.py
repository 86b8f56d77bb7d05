"""Batched evaluation: several models through one stacked computation give what each gives
alone (workloads.py's evaluate_many), and a sweep that defers its evaluations into one queue
(metrics.EvalQueue) writes the same metrics lines as its points run alone."""

import json
import math

import pytest
import torch

from locotrain.cli import main
from locotrain.config import load_config
from locotrain.data import load_corpus
from locotrain.metrics import EvalQueue, Recorder
from locotrain.run import simulate
from locotrain.sweep import eval_batch
from locotrain.workloads import EvalResult, Workload, build_workload

from conftest import TINY, tiny_config

WORKLOADS = {
    "ar_gpt": [],
    "masked_diffusion": ["workload.name=masked_diffusion", "workload.context_len=2"],
    "loopholing": ["workload.name=masked_diffusion", "workload.loopholing=true"],
}


def distinct_models(workload, n: int) -> list[dict]:
    """n different models; the head and residual projections start at zero, so every tensor
    gets noise (else all models would predict the same uniform distribution)."""
    models = []
    for seed in range(n):
        g = torch.Generator().manual_seed(100 + seed)
        params = workload.init_params(seed)
        models.append({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    return models


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("limit", [5, 0])
def test_evaluate_many_equals_one_at_a_time(name, limit):
    """Three models stacked: the same loss (float32, 1e-5 relative), the same Monte-Carlo
    error and windows as each evaluated alone, on a window subset and on all of them (more
    windows than one chunk of eval.batch_size)."""
    cfg = tiny_config(*WORKLOADS[name], "eval.batch_size=8")
    workload = build_workload(cfg, load_corpus(cfg.data.path, cfg.data.train_fraction))
    models = distinct_models(workload, 3)
    together = workload.evaluate_many(models, limit)
    alone = [workload.evaluate(m, limit) for m in models]
    assert len({round(r.val_loss, 3) for r in alone}) == 3  # the models really differ
    for a, b in zip(alone, together, strict=True):
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-5)
        assert b.stderr_bpc == pytest.approx(a.stderr_bpc, rel=1e-4, abs=1e-9)
        assert (b.windows, b.is_bound) == (a.windows, a.is_bound)


# Three AdLoCo points (it logs its trainers between evaluations, so the order of log and
# eval lines is tested too) with a queue of 4 models: flushes mid-run, mixing points.
SWEEP = [*TINY, "algorithm.name=adloco", "algorithm.H=4", "cluster.preset=two-datacenters",
         "cluster.size=2", "cluster.step_time_s=0.01", "eval.every=2048", "runtime.eval_batch=4"]
LRS = ("0.003", "0.006", "0.01")
WALL_CLOCK = {"time_s"}


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_lines(pooled: list[dict], alone: list[dict]) -> None:
    assert [e["event"] for e in pooled] == [e["event"] for e in alone]
    for a, b in zip(alone, pooled):
        assert set(a) == set(b)
        for key in set(a) - WALL_CLOCK:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
            else:
                assert b[key] == a[key], key


def test_sweep_with_batched_evaluation_equals_the_points_alone(tmp_path, capsys, monkeypatch):
    stacks = []
    original = Workload.evaluate_many

    def counting(self, models, limit=0):
        stacks.append(len(models))
        return original(self, models, limit)

    monkeypatch.setattr(Workload, "evaluate_many", counting)
    out = tmp_path / "sw"
    args = [a for s in SWEEP for a in ("--set", s)]
    code = main(["sweep", "quickstart", "--quiet", "--out", str(out), *args,
                 "--grid", f"train.lr={','.join(LRS)}"])
    assert code == 0, capsys.readouterr().err
    evaluations = 0
    for lr in LRS:
        alone = tmp_path / f"alone-{lr}"
        simulate(load_config("quickstart", [*SWEEP, f"train.lr={lr}"])[1], alone)
        assert_same_lines(lines(out / f"lr-{lr}" / "metrics.jsonl"), lines(alone / "metrics.jsonl"))
        pooled = json.loads((out / f"lr-{lr}" / "summary.json").read_text())
        single = json.loads((alone / "summary.json").read_text())
        assert pooled["final_val_bpc"] == pytest.approx(single["final_val_bpc"], rel=1e-5)
        evaluations += sum(e["event"] == "eval" for e in lines(alone / "metrics.jsonl"))
    # every evaluation went through the queue, and several ran stacked
    assert sum(stacks) == evaluations and max(stacks) == 4


@pytest.mark.parametrize("setting", ["runtime.eval_batch=1", "runtime.eval_batch=0"])
def test_a_sweep_evaluates_one_model_at_a_time_if_asked_or_on_a_cpu(tmp_path, capsys,
                                                                     monkeypatch, setting):
    """runtime.eval_batch = 1 is the reference: nothing is queued or stacked. So is the
    default (0) on a CPU, where stacking is slower; on a GPU it stacks 8."""
    monkeypatch.setattr(Workload, "evaluate_many", None)  # would fail if called
    args = [a for s in [*SWEEP, setting] for a in ("--set", s)]
    code = main(["sweep", "quickstart", "--quiet", "--out", str(tmp_path / "sw"), *args,
                 "--grid", "train.lr=0.003,0.01"])
    assert code == 0, capsys.readouterr().err
    assert eval_batch(tiny_config(), torch.device("cuda")) == 8


class Counting:
    """A workload that evaluates instantly; each model's loss is its parameter's value."""

    def __init__(self):
        self.stacks = []

    def evaluate_many(self, models, limit=0):
        self.stacks.append(len(models))
        return [EvalResult(float(m["w"]), float(m["w"]) / math.log(2), 0.0, False, limit or 9)
                for m in models]

    def eval_key(self, limit):
        return limit


def deferred(queue, workload, path=None):
    recorder = Recorder(workload, ["w"], 1000, 100, 5, path, quiet=True)
    recorder.defer_to(queue)
    return recorder


def test_the_queue_holds_at_most_its_cap_and_copies_the_model():
    """Memory: never more than `cap` model copies wait. The copy is taken when the
    evaluation falls due, so a model changed in place later is evaluated as it was."""
    workload, queue = Counting(), EvalQueue(3)
    recorder = deferred(queue, workload)
    model = torch.tensor(0.0)
    for step in range(7):
        model.fill_(step)
        recorder.publish([model], 100 * step, step, dict)
        assert len(queue.waiting) < 3
    assert workload.stacks == [3, 3]
    assert [e["val_loss"] for e in recorder.evals] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    recorder.finish()
    # the last regular evaluation, then the final one (all windows: a stack of its own)
    assert workload.stacks == [3, 3, 1, 1] and recorder.evals[-1]["val_loss"] == 6.0


def test_a_checkpoint_evaluates_what_is_queued_and_writes_it_first(tmp_path):
    """A checkpoint reads the evaluations so far (Recorder.state) and the metrics file's
    length: both must include the evaluations still queued, and a log line written after a
    queued evaluation must follow it in the file."""
    path = tmp_path / "metrics.jsonl"
    recorder = deferred(EvalQueue(100), Counting(), path)
    recorder.publish([torch.tensor(1.0)], 0, 0, dict)
    recorder.log("between")
    recorder.publish([torch.tensor(2.0)], 100, 1, dict)
    assert not path.exists()  # everything waits behind the first evaluation
    state = recorder.state()
    assert [e["val_loss"] for e in state["evals"]] == [1.0, 2.0]
    assert [e["event"] for e in lines(path)] == ["eval", "log", "eval"]
