"""benchmarks/pipeline_2bp.py's interleaved rounds: every ratio is taken within one round and
the summary is the median over rounds (a drifting machine must not favour one variant)."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("pipeline_2bp",
                                                  ROOT / "benchmarks" / "pipeline_2bp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(schedule, mode, step_ms, pred_ms):
    return {"schedule": schedule, "mode": mode, "step_ms": step_ms, "tokens_per_s": 1000 / step_ms,
            "predicted_step_ms": pred_ms, "prediction_rel_error": pred_ms / step_ms - 1,
            "stages": [{"peak_memory_bytes": None, "state_bytes": 2**20}]}


def test_ratios_are_taken_within_a_round_and_summarised_by_the_median():
    # round 1 is slow for everything, round 3 fast: pooled step times would mix the drift in
    runs = {"1f1b-plain": fake_run("1f1b", "plain", 200, 190),
            "1f1b-2bp-end": fake_run("1f1b", "stash", 100, 95),
            "1f1b-plain.r2": fake_run("1f1b", "plain", 150, 150),
            "1f1b-2bp-end.r2": fake_run("1f1b", "stash", 160, 150),
            "1f1b-plain.r3": fake_run("1f1b", "plain", 100, 90),
            "1f1b-2bp-end.r3": fake_run("1f1b", "stash", 125, 120)}
    out = bench().summarise(runs)
    end = out["1f1b-2bp-end"]
    assert end["rounds"] == 3
    assert end["ratios_over_plain"] == pytest.approx([2.0, 150 / 160, 0.8])
    assert end["ratio_over_plain"] == pytest.approx(150 / 160)  # the median round, not 2.0
    assert end["step_ms"] == 125 and end["predicted_step_ms"] == 120
    assert end["prediction_rel_error"] == pytest.approx(120 / 125 - 1)
    assert out["1f1b-plain"]["ratio_over_plain"] is None


def test_rounds_run_interleaved_on_the_cpu(tmp_path):
    mod = bench()
    out = tmp_path / "p.json"
    assert mod.main(["--device", "cpu", "--models", "2x32", "--rounds", "2", "--steps", "1",
                     "--warmup", "0", "--json", str(out)]) == 0
    model = json.loads(out.read_text())["models"][0]
    assert list(model["runs"]) == ["1f1b-plain", "1f1b-2bp-end", "1f1b-2bp-fill",
                                   "1f1b-plain.r2", "1f1b-2bp-end.r2", "1f1b-2bp-fill.r2"]
    fill = model["runs"]["1f1b-2bp-fill.r2"]
    assert fill["plan_from"] == "1f1b-2bp-end.r2"  # each round plans from its own 2BP run
    s = model["summary"]["1f1b-2bp-fill"]
    runs = model["runs"]
    assert s["ratios_over_plain"] == pytest.approx(
        [runs["1f1b-plain"]["step_ms"] / runs["1f1b-2bp-fill"]["step_ms"],
         runs["1f1b-plain.r2"]["step_ms"] / fill["step_ms"]])
    assert s["step_ms"] == pytest.approx(
        statistics.median([runs["1f1b-2bp-fill"]["step_ms"], fill["step_ms"]]))


def test_rounds_below_one_is_a_one_line_error(capsys):
    assert bench().main(["--device", "cpu", "--rounds", "0", "--json", "/tmp/x.json"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
