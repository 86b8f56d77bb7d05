"""The real runtime: the same algorithm files on real processes over torch.distributed (gloo
on loopback), against the simulator, with dead workers and clean shutdowns."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locotrain.checkpoint import load_checkpoint
from locotrain.config import load_config
from locotrain.run import simulate

from conftest import TINY

REAL = list(TINY) + ["train.tokens=8192", "eval.every=4096", "cluster.preset=two-datacenters",
                     "cluster.size=2", "runtime.timeout_s=20"]


def launch(tmp_path, *overrides, env=None, name="run"):
    out = tmp_path / name
    args = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet", "--out", str(out)]
    for o in REAL + list(overrides):
        args += ["--set", o]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})
    return proc, out, time.monotonic() - started


FAULTY = f"""
import sys
from pathlib import Path
from locotrain.config import load_config
from locotrain.runtime.launch import launch
from locotrain.setup import build
rank, steps, out, *sets = sys.argv[1:]
cfg = load_config("quickstart", sets)[1]
setup = build(cfg)
entry = [sys.executable, {str(Path(__file__).parent / "faulty_rank.py")!r}, rank, steps]
sys.exit(launch(cfg, Path(out), setup.algorithm.processes(), setup.job.M,
                setup.algorithm.synchronous, None, False, entry=entry))
"""


def launch_with_fault(tmp_path, rank, steps, *overrides):
    """`loco launch`, with rank `rank` dying abruptly after `steps` inner steps, or, for
    steps = "term:N", sending the launcher SIGTERM after N (tests/faulty_rank.py)."""
    out = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", FAULTY, str(rank), str(steps), str(out),
                           *REAL, *overrides], capture_output=True, text=True, timeout=180)
    return proc, out, time.monotonic() - started


def no_stray_processes(out):
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return str(out) not in ps


@pytest.mark.parametrize("overrides", [
    ["algorithm.name=ddp"],
    ["algorithm.name=diloco", "algorithm.H=4"],
    ["algorithm.name=diloco", "algorithm.H=4", "algorithm.codec=fp4", "cluster.size=4"],
    ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=1", "algorithm.tau=0",
     "model.depth=2"],
    ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=2", "algorithm.tau=1",
     "algorithm.alpha=0.5", "model.depth=2"],
    ["algorithm.name=eager", "algorithm.H=4"],
    ["algorithm.name=overlap_local_sgd", "algorithm.H=4"],
], ids=["ddp", "diloco", "diloco-fp4-4workers", "streaming-tau0", "streaming-overlapped",
        "eager", "overlap"])
def test_deterministic_algorithms_match_the_simulator(tmp_path, overrides):
    proc, out, _ = launch(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real, cfg, _, _ = load_checkpoint(out)
    sim = simulate(load_config(str(out / "config.toml"))[1])
    for k in real:
        assert torch.allclose(real[k], sim.params[k].cpu(), atol=1e-5, rtol=1e-4), k
    summary = json.loads((out / "summary.json").read_text())
    assert "sim_time_s" not in summary
    assert summary["tokens"] == sim.summary["tokens"]
    assert summary["bytes_sent"] == sim.summary["bytes_sent"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert len(evals) >= 2 and all("sim_time_s" not in e for e in evals)
    for name in ["config.toml", "summary.json", "model.safetensors", "samples.txt",
                 "timeline.json", "plots/loss.png", "plots/timeline.png"]:
        assert (out / name).is_file(), name
    assert no_stray_processes(out)


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8", "fp4"])
def test_every_codec_sends_and_computes_what_the_simulator_does(tmp_path, codec, M):
    """runtime/collectives.py's exchange for real (ring, quantised reduce-scatter + all-gather,
    quantised all-gather) against the simulator's arithmetic and byte count."""
    regions = "['a', 'b']" if M != 3 else "['a']"
    custom = ["cluster.preset=custom", f"cluster.size={M}", f"cluster.regions={regions}",
              "cluster.latency_s=" + ("[[0.0, 0.0], [0.0, 0.0]]" if M != 3 else "[[0.0]]"),
              "cluster.bandwidth_gbps=" + ("[[0.0, 0.0], [0.0, 0.0]]" if M != 3 else "[[0.0]]"),
              f"cluster.workers=[{{region='a', count={M // 2 if M != 3 else 3}}}"
              + (f", {{region='b', count={M // 2}}}]" if M != 3 else "]")]
    proc, out, _ = launch(tmp_path, "algorithm.name=diloco", "algorithm.H=4",
                          f"algorithm.codec={codec}", "train.tokens=6144", *custom)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real, _, _, _ = load_checkpoint(out)
    sim = simulate(load_config(str(out / "config.toml"))[1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes_sent"] == sim.summary["bytes_sent"] > 0
    assert summary["workers"] == M
    for k in real:
        assert torch.allclose(real[k], sim.params[k].cpu(), atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("algorithm", ["async_local_sgd", "halos"])
def test_asynchronous_algorithms_account_for_every_update(tmp_path, algorithm):
    proc, out, _ = launch(tmp_path, f"algorithm.name={algorithm}", "algorithm.H=4",
                          "algorithm.halos.K=2", "algorithm.dylu=true", "cluster.size=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in evals if e.get("final")][0]
    # the global model has seen every token the workers trained, and nothing more
    assert final["tokens"] == summary["tokens"] == 8192
    spans = json.loads((out / "timeline.json").read_text())
    pushes = sum(1 for s in spans if s["process"].startswith("w") and s["kind"] == "compute")
    if algorithm == "async_local_sgd":  # the server applied exactly one update per push
        assert final["outer_updates"] == pushes
    assert summary["bytes_sent"] > 0 and "dead_processes" not in summary
    assert no_stray_processes(out)


def test_a_dead_worker_fails_a_synchronous_run_within_the_timeout(tmp_path):
    proc, out, elapsed = launch_with_fault(tmp_path, 1, 4, "algorithm.name=diloco",
                                           "algorithm.H=2", "runtime.timeout_s=5")
    assert proc.returncode != 0
    assert "w1 (rank 1) exited with code 17" in proc.stderr
    assert "all-reduce failed or did not complete" in proc.stderr
    assert elapsed < 60
    assert not (out / "summary.json").exists()
    assert no_stray_processes(out)


def test_an_asynchronous_server_carries_on_without_a_dead_worker(tmp_path):
    proc, out, _ = launch_with_fault(tmp_path, 2, 4, "algorithm.name=async_local_sgd",
                                     "algorithm.H=2", "cluster.size=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dead_processes"] == ["w2"]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "log" and "worker w2 died" in e["text"] for e in log)
    assert summary["tokens"] >= 8192 - 4 * 8 * 16  # at most the dead worker's last task is lost
    # The server handed the dead worker's task to the others: the model has the whole budget,
    # and the dead worker's own tokens (left in the store) are counted: trained = model + lost.
    assert summary["tokens_in_model"] == 8192
    assert summary["tokens_trained"] == summary["tokens_in_model"] + summary["tokens_lost"]
    assert summary["tokens_trained"] >= 8192
    assert no_stray_processes(out)


def test_launch_checks_the_process_count(tmp_path, capsys):
    from locotrain.cli import main

    # async Local-SGD on 2 workers runs 3 processes: the workers and the parameter server
    code = main(["launch", "quickstart", "--nproc", "2", "--out", str(tmp_path / "x"),
                 *sum((["--set", o] for o in REAL + ["algorithm.name=async_local_sgd"]), [])])
    err = capsys.readouterr().err
    assert code == 2 and "runs 3 processes (2 workers + 1 server(s))" in err and "--nproc says 2" in err
    assert not (tmp_path / "x").exists()


STREAMING = ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=2",
             "algorithm.tau=1", "algorithm.alpha=0.5", "model.depth=2"]


@pytest.mark.parametrize("algorithm,every", [
    (["algorithm.name=diloco", "algorithm.H=4"], 4096), (STREAMING, 4096),
    (["algorithm.name=eager", "algorithm.H=4"], 4096), (["algorithm.name=ddp"], 4096),
    (["algorithm.name=diloco", "algorithm.H=4"], 0), (["algorithm.name=ddp"], 0),
], ids=["diloco", "streaming", "eager", "ddp", "diloco-no-schedule", "ddp-no-schedule"])
def test_a_stopped_real_run_resumes_from_its_checkpoint_to_the_same_end(tmp_path, algorithm, every):
    """The launcher gets SIGTERM at inner step 24 of rank 0 (after the first scheduled
    checkpoint at 4096 tokens, if any): every rank stops at the next common cut with a
    checkpoint, exit 143 and one line saying how to continue; `loco resume` ends with the
    same metrics, bytes and model as a run never stopped."""
    sets = [*algorithm, "train.tokens=65536", f"train.checkpoint_every={every}",
            "train.threads=1"]
    proc, whole, _ = launch(tmp_path, *sets, name="whole")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stopped, out, _ = launch_with_fault(tmp_path, 0, "term:24", *sets)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert f"loco resume {out}" in stopped.stderr and not (out / "summary.json").exists()
    assert (out / "checkpoint" / "real.json").exists()
    # What a rank leaves when it dies while saving a checkpoint that real.json never named:
    # the resume must take the named one.
    (out / "checkpoint" / "rank1-999999.json").write_text("{}")
    done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]

    def evals(folder):
        return [(e["tokens"], e["val_loss"], e["bytes_sent"]) for e in
                map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if e["event"] == "eval"]

    assert evals(out) == evals(whole)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    a, b = (json.loads((f / "summary.json").read_text()) for f in (whole, out))
    assert a["bytes_sent"] == b["bytes_sent"] and a["tokens"] == b["tokens"]
    assert no_stray_processes(out)


@pytest.mark.parametrize("algorithm", [["algorithm.name=diloco", "algorithm.H=2"],
                                       ["algorithm.name=async_local_sgd", "algorithm.H=2"]])
def test_launch_shows_progress_with_every_workers_tokens_unless_quiet(tmp_path, algorithm):
    """Without --quiet the rank that publishes the model reports progress (one line per
    evaluation when stderr is not a terminal), counting every worker's tokens; with --quiet
    nothing but failures reaches stderr."""
    out = tmp_path / "loud"
    args = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--out", str(out)]
    for o in REAL + algorithm:
        args += ["--set", o]
    loud = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert loud.returncode == 0, loud.stderr[-2000:]
    lines = [x for x in loud.stderr.splitlines() if "tokens (" in x]
    assert lines and lines[-1].split(":")[1].strip().startswith("8,192/8,192 tokens (100%)"), \
        loud.stderr
    quiet, _, _ = launch(tmp_path, *algorithm, name="quiet")
    assert quiet.returncode == 0 and "tokens (" not in quiet.stderr


@pytest.mark.parametrize("algorithm,every", [("async_local_sgd", 0), ("halos", 16384)])
def test_a_stopped_parameter_server_run_resumes_with_every_token_once(tmp_path, algorithm, every):
    """SIGTERM mid-run (rank 0's inner step 16): the processes take a snapshot of themselves
    and of the messages between them (runtime/dist_snapshot.py), exit 143 with one line
    saying how to continue, and `loco resume` trains the rest. Arrival order is up to the
    machine, so no two runs match bit for bit; what must hold is that the model got every
    token of the budget exactly once: no task lost at the cut, none trained or applied twice."""
    # (a budget large enough that rank 0 gets to step 16 even when dynamic local updates
    # find it the slowest and shrink its tasks)
    sets = [f"algorithm.name={algorithm}", "algorithm.H=4", "algorithm.halos.K=2",
            "cluster.size=4", "train.tokens=131072", f"train.checkpoint_every={every}",
            "train.threads=1"]
    stopped, out, _ = launch_with_fault(tmp_path, 0, "term:16", *sets)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.count(f"loco resume {out}") == 1 and "died" not in stopped.stderr
    assert not (out / "summary.json").exists()
    named = json.loads((out / "checkpoint" / "real.json").read_text())["snapshot"]
    cut = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # A copy with one rank's part damaged: that rank says so in one line, and the launcher
    # stops the others instead of leaving them waiting for it.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "checkpoint" / f"rank2-s{named}.json").write_text("{")
    bad = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "is corrupt" in bad.stderr and "Traceback" not in bad.stderr
    assert no_stray_processes(broken)
    done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_in_model"] == summary["tokens_trained"] == 131072
    assert summary["tokens_lost"] == 0 and "dead_processes" not in summary
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "eval"]
    tokens = [e["tokens"] for e in evals if not e.get("final")]
    assert tokens == sorted(set(tokens)) and tokens[-1] == evals[-1]["tokens"] == 131072
    assert named >= 1 and len([e for e in cut if e["event"] == "eval"]) < len(evals)
    assert no_stray_processes(out)


def test_a_stopped_parameter_server_run_with_one_worker_resumes_bit_for_bit(tmp_path):
    """With one worker the arrival order is fixed, so a run stopped at a snapshot and resumed
    must end exactly as a run never stopped: the same evaluations and model bytes."""
    sets = ["algorithm.name=async_local_sgd", "algorithm.H=4", "cluster.preset=single",
            "cluster.size=1", "train.tokens=32768", "train.threads=1"]
    proc, whole, _ = launch(tmp_path, *sets, name="whole")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stopped, out, _ = launch_with_fault(tmp_path, 0, "term:24", *sets)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]

    def evals(folder):
        return [(e["tokens"], e["val_loss"]) for e in
                map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if e["event"] == "eval"]

    assert evals(out) == evals(whole)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_parameter_server_run_killed_without_notice_resumes_from_its_last_snapshot(tmp_path):
    """SIGKILL of the launcher (a preemption without notice) after the first scheduled
    snapshot: every rank dies with it, and `loco resume` continues from that snapshot."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet", "--out", str(out)]
    for o in REAL + ["algorithm.name=async_local_sgd", "algorithm.H=4", "cluster.size=4",
                     "train.tokens=131072", "train.checkpoint_every=16384", "train.threads=1"]:
        args += ["--set", o]
    launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    manifest = out / "checkpoint" / "real.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(10)
    assert manifest.exists() and not (out / "summary.json").exists()
    deadline = time.monotonic() + 10
    while not no_stray_processes(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_in_model"] == summary["tokens_trained"] == 131072
    assert no_stray_processes(out)


def test_a_parameter_server_run_with_a_dead_worker_takes_no_more_snapshots(tmp_path):
    """A resumed run would have to bring the dead worker back as dead: not supported, said once."""
    proc, out, _ = launch_with_fault(tmp_path, 2, 4, "algorithm.name=async_local_sgd",
                                     "algorithm.H=2", "cluster.size=4",
                                     "train.checkpoint_every=2048")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [e["text"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if e["event"] == "log"]
    assert sum("no more checkpoints" in t for t in log) == 1
    assert json.loads((out / "summary.json").read_text())["dead_processes"] == ["w2"]
