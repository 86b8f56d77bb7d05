"""The `loco` command end to end, and every bad input a user can give it."""

import json
import subprocess
import sys

import pytest

from locotrain.cli import main

from conftest import TINY


def sets(*overrides):
    out = []
    for o in list(TINY) + list(overrides):
        out += ["--set", o]
    return out


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("workload", ["ar_gpt", "masked_diffusion"])
def test_run_then_sample(tmp_path, capsys, workload):
    out = tmp_path / "run"
    code, stdout, _ = run(["run", "--quiet", "--out", str(out), *sets(f"workload.name={workload}")],
                          capsys)
    assert code == 0, stdout
    for name in ["config.toml", "metrics.jsonl", "summary.json", "model.safetensors",
                 "checkpoint.json", "samples.txt", "plots/loss.png", "plots/timeline.png"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ["params", "tokens", "time_s", "tokens_per_s", "best_val_bpc", "final_val_bpc"]:
        assert key in summary
    assert summary["tokens"] == 8192 and summary["workload"] == workload
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert len(evals) >= 3
    for e in evals:
        for key, kind in [("step", int), ("tokens", int), ("time_s", float),
                          ("val_loss", float), ("val_bpc", float)]:
            assert isinstance(e[key], kind), key
        assert e["val_bpc"] == pytest.approx(e["val_loss"] / 0.6931471805599453)
    assert evals[-1]["final"] and evals[-1]["val_bpc"] == summary["final_val_bpc"]
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"]  # it learned something
    code, text, err = run(["sample", str(out), "--prompt", "ROMEO:", "--chars", "25"], capsys)
    assert code == 0
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= 31
    assert "per character" in err


def test_resolved_config_round_trips(tmp_path, capsys):
    from locotrain.config import load_config
    from locotrain.setup import build

    out = tmp_path / "run"
    assert run(["run", "--quiet", "--out", str(out), *sets("model.width=48")], capsys)[0] == 0
    _, again = load_config(str(out / "config.toml"))
    _, original = load_config("quickstart", list(TINY) + ["model.width=48"])
    build(original)  # a run also records its corpus's content: data.sha256, data.chars
    assert again == original


def test_list_shows_presets_workloads_algorithms(capsys):
    code, text, _ = run(["list"], capsys)
    assert code == 0
    for word in ["quickstart", "ar_gpt", "masked_diffusion", "diloco", "ddp"]:
        assert word in text


# --------------------------------------------------------------------------- bad input


def assert_user_error(capsys, argv, *fragments):
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loco: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_unknown_key_suggests_the_nearest(tmp_path, capsys):
    assert_user_error(capsys, ["run", "--out", str(tmp_path / "x"), "--set", "model.dept=3"],
                      "model.dept", "did you mean 'model.depth'")
    assert not (tmp_path / "x").exists()  # nothing written


def test_unknown_section_key_in_toml(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlearning_rate = 0.1\n")
    assert_user_error(capsys, ["run", str(cfg)], "train.learning_rate")


@pytest.mark.parametrize("setting,fragment", [
    ("model.depth=two", "model.depth must be an integer"),
    ("train.tokens=1.5", "train.tokens must be an integer"),
    ("workload.name=gpt5", "workload.name"),
    ("model.width=30", "model.width"),
    ("algorithm.codec=fp7", "fp7"),
])
def test_wrong_values(tmp_path, capsys, setting, fragment):
    assert_user_error(capsys, ["run", "--out", str(tmp_path / "x"), *sets(setting)], fragment)
    assert not (tmp_path / "x").exists()


def test_unknown_preset_and_invalid_toml(tmp_path, capsys):
    assert_user_error(capsys, ["run", "quikstart"], "did you mean 'quickstart'")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndepth = 2\n")
    assert_user_error(capsys, ["run", str(bad)], "not valid TOML")


@pytest.mark.parametrize("content,fragment", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"),
    ("caf\u00e9 au lait ".encode("latin-1") * 40, "not UTF-8"),
    (b"too short", "too short"),
])
def test_bad_corpus(tmp_path, capsys, content, fragment):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    assert_user_error(capsys, ["run", "--out", str(tmp_path / "x"),
                               *sets(f"data.path='{path}'")], fragment)
    assert not (tmp_path / "x").exists()


def test_any_utf8_text_file_trains(tmp_path, capsys):
    path = tmp_path / "poem.txt"
    path.write_text("Ünïcödé lines of verse, über and über again.\n" * 300, encoding="utf-8")
    out = tmp_path / "run"
    assert run(["run", "--quiet", "--out", str(out), *sets(f"data.path='{path}'")], capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"] == "poem.txt"


def test_out_folder_holding_a_run_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["run", "--quiet", "--out", str(out), *sets()], capsys)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    assert_user_error(capsys, ["run", "--quiet", "--out", str(out), *sets()],
                      "already holds a run", "--force")
    assert (out / "metrics.jsonl").read_text() == before  # untouched
    assert run(["run", "--quiet", "--force", "--out", str(out), *sets()], capsys)[0] == 0


def test_sample_from_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert_user_error(capsys, ["sample", str(tmp_path / "nope")], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(capsys, ["sample", str(empty)], "holds no finished model", "finished?")
    (empty / "checkpoint").mkdir()  # what an interrupted run leaves
    assert_user_error(capsys, ["sample", str(empty)], f"loco resume {empty}")
    out = tmp_path / "run"
    assert run(["run", "--quiet", "--out", str(out), *sets()], capsys)[0] == 0
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert_user_error(capsys, ["sample", str(out)], "corrupt")
    weights.write_bytes(b"\x00" * 64)
    assert_user_error(capsys, ["sample", str(out)], "corrupt")
    weights.write_bytes(good)
    meta = out / "checkpoint.json"
    meta.write_text("{not json")
    assert_user_error(capsys, ["sample", str(out)], "corrupt")


def test_checkpoint_round_trip_gives_identical_evaluation(tmp_path, capsys):
    import torch

    from locotrain.checkpoint import load_checkpoint
    from locotrain.data import load_corpus
    from locotrain.workloads import build_workload

    out = tmp_path / "run"
    assert run(["run", "--quiet", "--out", str(out), *sets("eval.windows=0")], capsys)[0] == 0
    params, cfg, vocab, _ = load_checkpoint(out)
    wl = build_workload(cfg, load_corpus(cfg.data.path, cfg.data.train_fraction))
    result = wl.evaluate({k: v.to(torch.float32) for k, v in params.items()})
    summary = json.loads((out / "summary.json").read_text())
    assert result.val_bpc == summary["final_val_bpc"]  # bit-identical


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "locotrain", "run", "--set", "train.tokenz=5"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "loco: error: unknown config key 'train.tokenz' (did you mean 'train.tokens'?)"]
