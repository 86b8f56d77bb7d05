"""What a new user meets in the first hour: a fast `loco list`, one-line errors for every
file-system failure, interrupted runs that say so, nonsense settings refused with the fix,
`loco sample` checked like `--set`, messages that point at the right key."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locotrain.cli import main
from locotrain.config import load_config
from locotrain.errors import UserError

from conftest import TINY, tiny_config


def sets(*overrides):
    return [x for o in list(TINY) + list(overrides) for x in ("--set", o)]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(capsys, argv, *fragments) -> str:
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loco: error: "), (code, err)
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["run", "--quiet", "--out", str(out), *sets()]) == 0
    return out


# --------------------------------------------------------------------------- 1. fast answers


@pytest.mark.parametrize("argv", [["list"], ["--help"], ["run", "--help"]])
def test_list_and_help_import_neither_torch_nor_matplotlib(argv):
    code = ("import sys\nfrom locotrain.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = {'torch', 'matplotlib'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_list_shows_each_workloads_own_summary(capsys):
    from locotrain.workloads import WORKLOADS

    _, text, _ = run(["list"], capsys)
    for name, cls in WORKLOADS.items():
        assert f"{name:<18} {cls.summary}" in text


# --------------------------------------------------------------------------- 2. file system


def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder is needed")
    one_error_line(capsys, ["run", "--quiet", "--out", str(blocker / "run"), *sets()],
                   f"'{blocker}' is a file", "choose another path")


@pytest.mark.parametrize("code,fragment", [
    (errno.ENOSPC, "free some space"),
    (errno.EACCES, "fix its permissions"),
    (errno.EROFS, "on a disk you can write to"),
])
def test_failing_writes_are_one_line_and_leave_no_temporary_file(tmp_path, capsys,
                                                                 monkeypatch, code, fragment):
    def fail(src, dst):  # what os.replace raises on a full, forbidden or read-only disk
        raise OSError(code, os.strerror(code), src, None, dst)

    monkeypatch.setattr(os, "replace", fail)
    out = tmp_path / "run"
    one_error_line(capsys, ["run", "--quiet", "--out", str(out), *sets()],
                   f"'{out / 'config.toml'}'", os.strerror(code), fragment)
    assert not list(out.glob(".*.tmp"))


def test_a_write_without_a_path_names_the_output_folder(tmp_path, capsys, monkeypatch):
    def full(self, obj):  # appending to metrics.jsonl on a full disk: no file name in the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("locotrain.metrics.Recorder._write", full)
    out = tmp_path / "run"
    one_error_line(capsys, ["run", "--quiet", "--out", str(out), *sets()],
                   f"'{out}'", "No space left", "free some space")


# --------------------------------------------------------------------------- 3. interruptions


def test_sigterm_leaves_a_marked_incomplete_run_that_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "locotrain", "run", "--quiet", "--out", str(out),
           *sets("train.tokens=100000000", "eval.every=1024")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"loco: interrupted; {out} holds an incomplete run: "
                                            f"continue it with `loco resume {out}`")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and not status["complete"]
    assert not (out / "summary.json").exists()
    assert (out / "checkpoint").is_dir()  # run.py's, for `loco resume`
    one_error_line(capsys, ["run", "--quiet", "--out", str(out), *sets()],
                   "holds an interrupted (incomplete) run", "loco resume", "--force", "another --out")
    assert run(["run", "--quiet", "--force", "--out", str(out), *sets()], capsys)[0] == 0
    assert (out / "summary.json").exists()
    assert not (out / "status.json").exists() and not (out / "checkpoint").exists()


def test_a_folder_left_by_a_crash_or_kill_is_called_incomplete(tmp_path, capsys):
    out = tmp_path / "run"  # what SIGKILL or a power cut leaves: no summary.json, no marker
    out.mkdir()
    (out / "config.toml").write_text("")
    (out / "metrics.jsonl").write_text("")
    one_error_line(capsys, ["run", "--quiet", "--out", str(out), *sets()],
                   "holds an incomplete run (no summary.json", "--force")


@pytest.mark.parametrize("argv,marked", [
    (["compare", "--algorithms", "ddp,diloco"], [".", "ddp"]),  # diloco never started
    (["sweep", "--grid", "train.lr=0.001,0.002"], ["lr-0.001", "lr-0.002"]),
])
def test_sigterm_during_compare_or_sweep_marks_every_unfinished_folder(tmp_path, capsys,
                                                                       monkeypatch, argv, marked):
    from locotrain.run import Simulation

    def killed(self):  # SIGTERM arrives as the first simulation finishes training
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    def unhandled(signum, frame):  # rather than let the default action end pytest
        raise AssertionError("loco left SIGTERM to its default action: the process would die")

    monkeypatch.setattr(Simulation, "finish", killed)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "out"
        code, _, err = run([*argv, "--quiet", "--out", str(out), *sets("algorithm.diloco.H=8")],
                           capsys)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored for main()'s caller
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 130 and err.strip() == f"loco: interrupted; {out} holds an incomplete run"
    assert sorted(str(p.parent.relative_to(out)) for p in out.rglob("status.json")) == marked
    assert json.loads((out / marked[-1] / "status.json").read_text())["state"] == "interrupted"


# --------------------------------------------------------------------------- 4. nonsense


def test_cluster_size_zero_records_the_real_size(tmp_path):
    assert load_config("quickstart", ["cluster.size=0"])[1].cluster.size == 4  # the preset's
    assert tiny_config("cluster.preset=halos-4x4").cluster.size == 16
    with pytest.raises(UserError, match=r"cluster.size = 3, but this cluster has 16 workers"):
        tiny_config("cluster.preset=halos-4x4", "cluster.size=3")
    with pytest.raises(UserError, match="cluster.size must be >= 0"):
        tiny_config("cluster.size=-1")


@pytest.mark.parametrize("settings,fragments", [
    (["train.tokens=10"], ["train.tokens = 10 is less than one inner step", ">= 128"]),
    (["algorithm.name=diloco", "algorithm.H=100000"],
     ["algorithm.H = 100000", "64 inner steps per worker", "algorithm.H <= 64"]),
    (["algorithm.name=diloco", "algorithm.outer_lr=-5"], ["algorithm.outer_lr must be > 0"]),
    (["algorithm.name=streaming", "algorithm.outer_momentum=1"],
     ["algorithm.outer_momentum must be in [0, 1)"]),
    (["algorithm.name=halos", "algorithm.global_lr=0"], ["algorithm.global_lr must be > 0"]),
    (["model.seq_len=100000"], ["model.seq_len = 100000 is too long",
                                "the largest model.seq_len that works is"]),
    (["train.tokens=8200", "algorithm.name=diloco", "algorithm.H=100000"],  # no rounding note
     ["algorithm.H = 100000"]),
])
def test_nonsense_is_refused_before_anything_is_written(tmp_path, capsys, settings, fragments):
    out = tmp_path / "x"
    one_error_line(capsys, ["run", "--out", str(out), *sets(*settings)], *fragments)
    assert not out.exists()


def test_the_largest_seq_len_named_is_the_largest_that_works():
    from locotrain.data import load_corpus, val_windows
    from locotrain.setup import MIN_VAL_WINDOWS, build

    with pytest.raises(UserError) as e:
        build(tiny_config("model.seq_len=100000"))
    largest = int(str(e.value).rsplit(" ", 1)[1])
    build(tiny_config(f"model.seq_len={largest}", "train.tokens=1000000"))
    with pytest.raises(UserError, match="too long"):
        build(tiny_config(f"model.seq_len={largest + 1}", "train.tokens=1000000"))
    val = load_corpus("", 0.9).val  # windows are seq_len + 1 long; one worker: val binds
    assert len(val_windows(val, largest + 1)) == MIN_VAL_WINDOWS
    assert len(val_windows(val, largest + 2)) < MIN_VAL_WINDOWS


def test_a_budget_between_steps_is_rounded_up_with_one_note(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["run", "--quiet", "--out", str(out), *sets("train.tokens=8200")], capsys)
    assert code == 0
    assert err.count("loco: note:") == 1
    assert "train.tokens = 8,200 was rounded up to 8,320, a whole number of inner steps" in err
    assert json.loads((out / "summary.json").read_text())["tokens"] == 8320


# --------------------------------------------------------------------------- 5. sample


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--threshold", "2"], "--threshold must be in (0, 1]"),
    (["--chars", "0"], "--chars must be positive"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_sample_flags_get_the_configs_checks(trained, tmp_path, capsys, flags, fragment):
    one_error_line(capsys, ["sample", str(trained), *flags], fragment)
    setting = f"sample.{flags[0][2:]}={flags[1]}"
    one_error_line(capsys, ["run", "--out", str(tmp_path / "x"), *sets(setting)],
                   fragment.replace("--", "sample."))


# --------------------------------------------------------------------------- 6. messages


@pytest.mark.parametrize("setting,fragments,not_in", [
    ("train.foo=1", ["'train.foo'", "train has: tokens, batch_size"], "did you mean 'train'"),
    ("train.tokenz=1", ["did you mean 'train.tokens'?"], None),
    ("modle.depth=1", ["did you mean 'model'?"], None),
    ("model.depth.x=1", ["'model.depth' is a value, not a table"], None),
    ("cluster.workers=[{regoin='r0'}]", ["did you mean 'cluster.workers[0].region'?"], None),
    ("cluster.inter_gbps=-1", ["cluster.inter_gbps must be >= 0"], "bandwidth_gbps"),
    ("algorithm.xyz=1", ["ddp has no setting 'xyz'", "ddp reads: codec"], None),
    ("algorithm.diloco.xyz=1", ["algorithm.diloco.xyz", "diloco has no setting 'xyz'"], None),
])
def test_messages_point_at_the_right_key(tmp_path, capsys, setting, fragments, not_in):
    line = one_error_line(capsys, ["run", "--out", str(tmp_path / "x"), *sets(setting)],
                          *fragments)
    assert not_in is None or not_in not in line


def test_a_folder_as_corpus_is_called_a_folder(tmp_path, capsys):
    one_error_line(capsys, ["run", "--out", str(tmp_path / "x"), *sets(f"data.path='{tmp_path}'")],
                   f"data.path '{tmp_path}' is a folder")


def test_cluster_blames_inter_gbps_even_without_the_config_checks():
    from locotrain.cluster import Cluster
    from locotrain.config import ClusterConfig

    with pytest.raises(UserError, match=r"^cluster.inter_gbps has a negative entry"):
        Cluster(ClusterConfig(preset="two-datacenters", inter_gbps=-1.0), 8)


# --------------------------------------------------------------------------- 7. README


def test_readme_install_hint_names_no_unreachable_index():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    hint = readme.split("locotrain answers one question")[0]
    assert "download.pytorch.org" not in hint and "--index-url" not in hint
    assert "pip install" in hint and "+cpu" in hint


def test_run_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    """atomic_write makes its temporary file with mkstemp (mode 0600); the file it leaves
    must have the mode open() would give it (0644 under umask 022)."""
    from locotrain.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_compare_names_the_variant_that_cannot_run(tmp_path, capsys):
    """Several variants share the flags; the one whose settings do not fit is named."""
    one_error_line(capsys, ["compare", "--algorithms", "ddp,diloco+H=4,eager+H=5000",
                            "--quiet", "--out", str(tmp_path / "c"), *sets()],
                   "variant 'eager+H=5000': algorithm.H = 5000")
    assert not (tmp_path / "c").exists()  # checked before anything ran


def test_command_line_mistakes_are_one_line_too(capsys):
    for argv, fragment in [(["run", "quickstart", "train.tokens=1000"], "goes after --set"),
                           (["runn"], "invalid choice: 'runn'"),
                           (["plan", "--quiet"], "unrecognized arguments: --quiet")]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(lines) == 1, err
        assert lines[0].startswith("loco: error: ") and fragment in lines[0], lines[0]
