"""`loco sweep`: points pooled in one engine equal the same points run alone; bad grids are
one-line errors before anything runs."""

import json

import pytest

from locotrain.cli import main
from locotrain.config import load_config
from locotrain.run import simulate

from conftest import TINY

BASE = [*TINY, "algorithm.name=diloco", "algorithm.H=4", "cluster.preset=two-datacenters",
        "cluster.size=2", "cluster.step_time_s=0.01", "eval.every=2048"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


def test_sweep_points_equal_the_same_runs_alone(tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "quickstart", "--quiet", "--out", str(out), *sets(*BASE),
                 "--grid", "algorithm.outer_lr=0.5,1.0", "--grid", "train.lr=0.003,0.01"])
    assert code == 0, capsys.readouterr().err
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots")
    assert folders == ["outer_lr-0.5_lr-0.003", "outer_lr-0.5_lr-0.01",
                       "outer_lr-1.0_lr-0.003", "outer_lr-1.0_lr-0.01"]
    for lr_outer, lr in [("0.5", "0.003"), ("0.5", "0.01"), ("1.0", "0.003"), ("1.0", "0.01")]:
        folder = f"outer_lr-{lr_outer}_lr-{lr}"
        alone = simulate(load_config("quickstart", [*BASE, f"algorithm.outer_lr={lr_outer}",
                                                    f"train.lr={lr}"])[1])
        pooled = [json.loads(x) for x in (out / folder / "metrics.jsonl").read_text().splitlines()]
        pooled = [e for e in pooled if e["event"] == "eval"]
        assert [e["tokens"] for e in pooled] == [e["tokens"] for e in alone.evals]
        for a, b in zip(alone.evals, pooled):
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
            assert b["sim_time_s"] == a["sim_time_s"] and b["bytes_sent"] == a["bytes_sent"]
    table = (out / "sweep.md").read_text()
    assert table.count("\n| 0.5 |") + table.count("\n| 1.0 |") == 4
    assert (out / "plots" / "sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("grid,message", [
    ("algorithm.outer_lrr=0.5,0.7", "outer_lrr"),
    ("algorithm.H=ten,20", "algorithm.H must be an integer"),
    ("algorithm.H=", "at least one value"),
    ("train.lr", "KEY=V1,V2"),
    ("algorithm.H=4,4", "lists a value twice"),
])
def test_bad_grids_are_one_line_errors_before_anything_runs(tmp_path, capsys, grid, message):
    out = tmp_path / "sw"
    code = main(["sweep", "quickstart", "--quiet", "--out", str(out), *sets(*BASE), "--grid", grid])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_seeds_alone_make_a_sweep_and_each_point_is_its_own_seed(tmp_path, capsys):
    """`--seeds 2` without a grid: the spread of one configuration over seeds 0 and 1, each
    point the same as `loco run --set train.seed=N`; neither a grid nor seeds is an error."""
    out = tmp_path / "sw"
    code = main(["sweep", "quickstart", "--quiet", "--out", str(out), *sets(*BASE), "--seeds", "2"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots") == \
        ["seed-0", "seed-1"]
    for seed in (0, 1):
        alone = simulate(load_config("quickstart", [*BASE, f"train.seed={seed}"])[1])
        summary = json.loads((out / f"seed-{seed}" / "summary.json").read_text())
        assert summary["final_val_bpc"] == pytest.approx(alone.summary["final_val_bpc"], rel=1e-5)
    code = main(["sweep", "quickstart", "--quiet", "--out", str(tmp_path / "none"), *sets(*BASE)])
    err = capsys.readouterr().err
    assert code == 2 and "--seeds N with N >= 2" in err and not (tmp_path / "none").exists()
