"""A synchronous group that re-forms (cluster.on_crash = "drop" with ddp and diloco): an
all-reduce averages the workers alive when it completes, a crashed worker's unsynchronised
work is lost, and a worker that restarts or joins heals from a live peer. Times, tokens and
parameters are checked against hand computations on a cluster whose transfers are free and
whose steps take 1 s (test_churn.py's)."""

import pytest
import torch

from locotrain.errors import UserError
from locotrain.run import Simulation, engine_for, resume, simulate
from locotrain.setup import build

from conftest import tiny_config
from test_churn import ONE_REGION, TOK, crash

# DiLoCo, H = 2, 8 steps per worker: rounds end at 2, 4, 6 and 8 s.
DILOCO = ["algorithm.name=diloco", "algorithm.H=2", f"train.tokens={16 * TOK}",
          "cluster.on_crash=drop", *ONE_REGION]


def test_the_round_goes_on_without_a_crashed_worker_and_averages_those_alive():
    """Worker 1 crashes at 3 s, half way through round 2, for good. Round 1 averages both
    workers; from round 2 on, worker 0 is the group. Outer lr 1 and momentum 0 make an outer
    step `theta <- mean of the phi`, so the final model is, by hand: both workers train 2
    steps, average, then worker 0 alone trains 6 more steps from there."""
    averaging = ["algorithm.outer_lr=1.0", "algorithm.outer_momentum=0.0"]
    result = simulate(tiny_config(*DILOCO, *averaging, crash(1, 3.0)))
    s = result.summary
    assert s["sim_time_s"] == pytest.approx(8.0)  # nobody waits for the dead worker
    assert s["tokens_in_model"] == (2 * 2 + 3 * 2) * TOK
    assert s["tokens_lost"] == TOK  # the step worker 1 finished in round 2
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
    N = sum(p.numel() for p in result.params.values())
    assert s["bytes_sent"] == 2 * 4 * N  # round 1's ring of two; a ring of one sends nothing

    engine = engine_for(tiny_config(*DILOCO))
    by_hand = Simulation(tiny_config(*DILOCO, *averaging), engine)
    engine.start()
    w0, w1 = by_hand.rows
    for row in (w0, w1):
        engine.train(row, 2)
    with torch.no_grad():
        for n in w0.params:
            mean = (w0.params[n] + w1.params[n]) / 2
            w0.params[n].copy_(mean)
    engine.train(w0, 6)
    for n, p in w0.params.items():
        torch.testing.assert_close(result.params[n], p, rtol=1e-5, atol=1e-6)


def test_a_worker_that_crashes_while_it_waits_loses_its_round():
    """Worker 1 runs at half speed: worker 0 finishes round 1 at 2 s and waits for it; it
    crashes at 3 s, for good, while it waits. Its two finished steps never reached the model
    (lost); worker 1 averages round 1 alone at 4 s and goes on alone."""
    slow = ["cluster.workers=[{region='a'}, {region='a', speed=0.5}]"]
    s = simulate(tiny_config(*DILOCO, *slow, crash(0, 3.0))).summary
    assert s["tokens_lost"] == 2 * TOK
    assert s["tokens_in_model"] == 8 * TOK  # worker 1's four rounds
    assert isinstance(s["tokens"], int)  # computed tokens stay whole after the discard
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
    assert s["sim_time_s"] == pytest.approx(16.0)


def test_a_restarted_worker_heals_from_a_live_peer_and_the_replicas_agree():
    """Worker 1 crashes at 3 s and restarts at 5 s. It waits for worker 0's next outer step
    (6 s), copies theta, the outer momentum, its parameters and AdamW state, and both train
    round 4 together. Every replica ends with the same model, bit for bit; without the
    momentum in the heal they would not."""
    result = simulate(tiny_config(*DILOCO, crash(1, 3.0, 2.0)))
    s = result.summary
    assert s["sim_time_s"] == pytest.approx(8.0)
    assert s["tokens_in_model"] == (2 + 1 + 1 + 2) * 2 * TOK
    assert s["tokens_lost"] == TOK
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
    logs = result.runtime.recorder.logs
    assert any("[t=6.00s w1] heals from w0" in line for line in logs)
    # rounds 1 and 4 ring two workers; the heal sends parameters, two AdamW moments, theta
    # and the outer momentum (5 values per parameter) and a header
    N = sum(p.numel() for p in result.params.values())
    assert s["bytes_sent"] == 2 * (2 * 4 * N) + 5 * 4 * N + 64
    w0, w1 = result.runtime.worker_procs
    for n in w0.worker.params:
        assert torch.equal(w0.worker.params[n], w1.worker.params[n]), n
    assert w1.worker.steps == w0.worker.steps == 8  # the schedule position came with it
    # w1 is idle from its restart at 5 s until the heal at 6 s, then computes round 4
    assert ("compute", 6.0, 8.0) in [(k, pytest.approx(a), pytest.approx(b))
                                     for k, a, b in w1.spans]


def test_a_worker_that_joins_mid_run_takes_part_from_the_next_round():
    """Worker 1 joins at 3 s: rounds 1 and 2 are worker 0's alone, 3 and 4 both workers'."""
    joins = ["cluster.workers=[{region='a'}, {region='a', join_s=3.0}]"]
    result = simulate(tiny_config(*DILOCO, *joins))
    s = result.summary
    assert s["tokens_in_model"] == (2 + 2 + 4 + 4) * TOK
    assert s["tokens_lost"] == 0 and s["tokens_trained"] == s["tokens_in_model"]
    w0, w1 = result.runtime.worker_procs
    assert min(a for k, a, _ in w1.spans if k == "compute") == pytest.approx(4.0)
    for n in w0.worker.params:
        assert torch.equal(w0.worker.params[n], w1.worker.params[n]), n


def test_data_parallel_drops_a_worker_mid_step():
    """DDP, 8 steps of 1 s: worker 1 dies at 2.5 s, half way through step 3's gradient. Steps
    1-2 average both workers, steps 3-8 are worker 0's; half a step of worker 1 is lost."""
    cfg = tiny_config("algorithm.name=ddp", f"train.tokens={16 * TOK}", "cluster.on_crash=drop",
                      crash(1, 2.5), *ONE_REGION)
    s = simulate(cfg).summary
    assert s["sim_time_s"] == pytest.approx(8.0)
    assert s["tokens_in_model"] == (2 * 2 + 6) * TOK
    assert s["tokens_lost"] == TOK // 2
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]


def test_a_data_parallel_replica_heals_with_the_optimizer_state():
    """DDP replicas must be identical: a worker that restarts copies the parameters and the
    AdamW moments and step count of a live one, so the run ends with equal replicas."""
    cfg = tiny_config("algorithm.name=ddp", f"train.tokens={16 * TOK}", "cluster.on_crash=drop",
                      crash(1, 2.5, 1.0), *ONE_REGION)
    result = simulate(cfg)
    w0, w1 = result.runtime.worker_procs
    for n in w0.worker.params:
        assert torch.equal(w0.worker.params[n], w1.worker.params[n]), n
    s = result.summary
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
    assert s["tokens_in_model"] > (2 * 2 + 6) * TOK  # it took part again


def test_when_every_replica_is_gone_for_good_the_run_ends_with_what_was_averaged():
    """Both workers crash for good during round 2: the model is round 1's."""
    both = ("cluster.crashes=[{worker=0, at_s=3.0, restart_after_s=-1.0}, "
            "{worker=1, at_s=3.5, restart_after_s=-1.0}]")
    s = simulate(tiny_config(*DILOCO, both)).summary
    assert s["tokens_in_model"] == 4 * TOK
    assert s["tokens_lost"] == TOK + TOK * 3 // 2
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]


def test_when_every_replica_is_down_the_first_back_heals_from_the_state_left_behind():
    """Both workers crash in round 2 (at 3 s and 3.5 s) and come back 1 s later. Worker 1,
    the last to go, leaves round 1's shared state behind; worker 0 heals from it at 4 s
    (no peer, no transfer) and trains round 2 alone; worker 1 heals from worker 0 at 6 s;
    both train rounds 3 and 4, and the run ends at 10 s with equal replicas."""
    both = ("cluster.crashes=[{worker=0, at_s=3.0, restart_after_s=1.0}, "
            "{worker=1, at_s=3.5, restart_after_s=1.0}]")
    result = simulate(tiny_config(*DILOCO, both))
    s = result.summary
    assert s["sim_time_s"] == pytest.approx(10.0)
    assert s["tokens_in_model"] == (4 + 2 + 4 + 4) * TOK
    assert s["tokens_lost"] == TOK + TOK * 3 // 2
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
    logs = result.runtime.recorder.logs
    assert any("[t=4.00s w0] heals from the state the last member left" in x for x in logs)
    assert any("[t=6.00s w1] heals from w0" in x for x in logs)
    w0, w1 = result.runtime.worker_procs
    for n in w0.worker.params:
        assert torch.equal(w0.worker.params[n], w1.worker.params[n]), n


def test_algorithms_that_cannot_re_form_their_group_say_so():
    cfg = tiny_config("algorithm.name=streaming", "algorithm.H=2", "algorithm.fragments=1",
                      f"train.tokens={16 * TOK}", "cluster.on_crash=drop", crash(1, 3.0),
                      *ONE_REGION)
    with pytest.raises(UserError, match="re-forms around crashes and joins with ddp and diloco"):
        build(cfg)


def test_a_run_stopped_while_a_heal_is_on_the_wire_resumes_exactly(tmp_path):
    """Checkpoint and resume with the state transfer of a heal in flight: the resumed run
    ends with the uninterrupted run's metrics and model bytes."""
    from test_resume import CASES, metrics, run

    case = CASES["diloco-heal"]
    reference = tmp_path / "reference"
    assert run(reference, case) is not None
    stopped = tmp_path / "stopped"
    stop = _first_event_with_a_heal_in_flight(tmp_path / "probe", case)
    assert run(stopped, case, stop_at=stop) is None
    resume(stopped)
    assert metrics(stopped) == metrics(reference)
    assert (stopped / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _first_event_with_a_heal_in_flight(out, overrides) -> int:
    from locotrain.config import load_config
    from test_resume import BASE

    engine = engine_for(load_config("quickstart", BASE + overrides)[1])
    sim = Simulation(load_config("quickstart", BASE + overrides)[1], engine, out, force=True)
    engine.start()
    sim.start()
    found = []
    sim.runtime.pause = lambda rt: found.append(rt.events_done) if rt._heals else None
    sim.run()
    assert found, "no heal was ever on the wire"
    return found[0]


@pytest.mark.parametrize("algorithm", ["diloco", "ddp"])
@pytest.mark.parametrize("seed", [0, 3, 4])
def test_random_crashes_never_stop_the_group_and_every_token_is_accounted(algorithm, seed):
    """Three workers crashing at random (about 3 times each in the run) and back 2 s later:
    the group keeps re-forming, every run trains all its steps (16 s or more of 1 s steps),
    and trained = in model + lost. Seeds 3 and 4 once had every worker down at one moment."""
    one_region = [o for o in ONE_REGION if not o.startswith(("cluster.workers", "cluster.size"))]
    cfg = tiny_config(f"algorithm.name={algorithm}", f"train.tokens={48 * TOK}",
                      "cluster.on_crash=drop", *one_region,
                      "cluster.workers=[{region='a', count=3}]", "cluster.size=3",
                      "cluster.failures.horizon_s=20", "cluster.failures.crash_rate_per_hour=700",
                      "cluster.failures.restart_after_s=2", f"cluster.failures.seed={seed}",
                      *(["algorithm.H=2"] if algorithm == "diloco" else []))
    s = simulate(cfg).summary
    assert s["sim_time_s"] >= 16.0 - 1e-9
    assert s["tokens_lost"] > 0
    assert s["tokens_trained"] == s["tokens_in_model"] + s["tokens_lost"]
