"""Checkpoint and resume (run.py, runtime/snapshot.py): a run interrupted anywhere, then
resumed, ends with the same metrics (less wall-clock fields) and the same model bytes as the
run that was never interrupted, for every algorithm, on the CPU."""

import json
from pathlib import Path

import pytest

from locotrain.checkpoint import STATE_DIR, STATE_META
from locotrain.config import load_config
from locotrain.errors import UserError
from locotrain.run import Interrupted, Simulation, engine_for, resume

from conftest import TINY

BASE = [*TINY, "cluster.preset=two-datacenters", "cluster.size=4", "cluster.step_time_s=0.01",
        "train.tokens=16384", "eval.every=2048"]
CASES = {
    "ddp": ["algorithm.name=ddp"],
    "diloco": ["algorithm.name=diloco", "algorithm.H=4"],
    # worker 2 crashes mid-round and heals from a live peer (cluster.on_crash = "drop")
    "diloco-heal": ["algorithm.name=diloco", "algorithm.H=4", "cluster.on_crash=drop",
                    "cluster.crashes=[{worker=2, at_s=0.25, restart_after_s=0.3}]"],
    "streaming": ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=2",
                  "algorithm.tau=1", "algorithm.alpha=0.5", "model.depth=2"],
    "eager": ["algorithm.name=eager", "algorithm.H=4"],
    "overlap": ["algorithm.name=overlap_local_sgd", "algorithm.H=4"],
    "async": ["algorithm.name=async_local_sgd", "algorithm.H=4"],
    "halos": ["algorithm.name=halos", "algorithm.H=4", "algorithm.K=2"],
    "diffusion": ["algorithm.name=diloco", "algorithm.H=4", "workload.name=masked_diffusion",
                  "workload.loopholing=true", "workload.self_cond_rate=0.5"],
}


def run(out: Path, overrides, stop_at=None, seen=None):
    """A run into `out`; with `stop_at`, interrupted (as a signal would) after that event.
    Returns the number of events, or None when interrupted. `seen` gets, after every event
    (or at the interruption), what was in flight: (messages, all-reduces, pending jobs)."""
    cfg = load_config("quickstart", BASE + overrides)[1]
    engine = engine_for(cfg)
    sim = Simulation(cfg, engine, out, force=True)
    engine.start()
    sim.start()
    pause = sim._pause

    def watch(rt):
        if seen is not None and stop_at in (None, rt.events_done):
            seen.append((len(rt._messages), len(rt._collectives), len(rt.engine.pending)))
        if rt.events_done == stop_at:
            sim.stop_requested = True
        pause(rt)

    sim.runtime.pause = watch
    try:
        sim.run()
    except Interrupted:
        return None
    sim.finish()
    return sim.runtime.events_done


def metrics(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "time_s"} for e in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_runs_equal_the_uninterrupted_run(tmp_path, case):
    reference, flights = tmp_path / "reference", []
    events = run(reference, CASES[case], seen=flights)
    # Interrupt early, with something on the wire (an all-reduce or a message) if ever, in
    # the middle, and near the end.
    wire = [k + 1 for k, (m, c, _) in enumerate(flights) if m or c]
    seen = []
    for k, stop in enumerate([wire[len(wire) // 3] if wire else events // 7, events // 2,
                              events - 3]):
        out = tmp_path / f"stopped-{k}"
        assert run(out, CASES[case], stop_at=stop, seen=seen) is None
        assert (out / STATE_DIR / STATE_META).is_file() and not (out / "model.safetensors").exists()
        resume(out)
        assert metrics(out) == metrics(reference), (case, stop)
        assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    if case in ("async", "halos"):  # some interruption caught messages in flight
        assert any(messages for messages, _, _ in seen)
    if case in ("streaming", "overlap", "eager"):  # ... and all-reduces in flight
        assert any(collectives for _, collectives, _ in seen)
    assert any(pending for _, _, pending in seen)  # ... and compute not yet run


def test_a_resumed_run_can_be_interrupted_and_resumed_again(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "twice"
    events = run(reference, CASES["async"])
    assert run(out, CASES["async"], stop_at=events // 3) is None
    cfg_text = (out / "config.toml").read_text()
    # resume, interrupted again later: resume's Simulation honours the same stop request
    import locotrain.run as run_module

    original = run_module.Simulation._pause

    def stop_later(self, rt):
        if rt.events_done == (2 * events) // 3:
            self.stop_requested = True
        original(self, rt)

    run_module.Simulation._pause = stop_later
    try:
        with pytest.raises(Interrupted):
            resume(out)
    finally:
        run_module.Simulation._pause = original
    assert (out / "config.toml").read_text() == cfg_text
    resume(out)
    assert metrics(out) == metrics(reference)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_scheduled_checkpoints_change_nothing_and_resume(tmp_path):
    """checkpoint_every writes checkpoints along the way without changing the run; a copy of
    the folder taken mid-run (the state on disk at that moment) resumes to the same end."""
    plain, scheduled = tmp_path / "plain", tmp_path / "scheduled"
    run(plain, CASES["streaming"])
    run(scheduled, CASES["streaming"] + ["train.checkpoint_every=4096"])
    assert metrics(scheduled) == metrics(plain)
    state = json.loads((scheduled / STATE_DIR / STATE_META).read_text())
    assert state["sim"]["tokens"] >= 12288  # the last one, past the last multiple


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint"):
        resume(tmp_path)
    with pytest.raises(UserError, match="there is no run folder"):
        resume(tmp_path / "no-such-run")
    out = tmp_path / "stopped"
    events = run(tmp_path / "ref", CASES["diloco"])
    run(out, CASES["diloco"], stop_at=events // 2)
    with pytest.raises(UserError, match="only eval"):
        resume(out, ["train.lr=0.1"])
    state = out / STATE_DIR / STATE_META
    tensors = out / STATE_DIR / json.loads(state.read_text())["tensors"]
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt"):
        resume(out)
    config = out / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.003", "lr = 0.004"))
    with pytest.raises(UserError, match="changed since the checkpoint|corrupt"):
        resume(out)
