"""Pipeline schedules as a time model (pipeline/timeline.py), checked against timelines drawn
by hand, and 2BP for real on the char GPT (pipeline/stages.py, inprocess.py)."""

import math

import pytest
import torch

from locotrain.models.backbone import Backbone, forward_one, init_params, rotary_tables
from locotrain.pipeline.inprocess import reference_grads, run_schedule
from locotrain.pipeline.plots import gantt
from locotrain.pipeline.schedules import Op, stage_order
from locotrain.pipeline.stages import Ops, stage_forward, weight_grads
from locotrain.pipeline.timeline import Link, Pipeline, StageTimes, simulate
from locotrain.runtime.network import ring_allreduce_time


def names(ops):
    return [str(op) for op in ops]


# --------------------------------------------------------------------------- time model


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,m", [(2, 2), (3, 5), (4, 8), (4, 1)])
def test_bubble_of_equal_stages_on_free_links(schedule, S, m):
    # Forward 1, backward 2: the step is (m + S - 1) (F + B) and every device idles S - 1
    # slots of F + B, the textbook bubble (S-1)/(m+S-1) (GPipe paper, Huang et al. 2019).
    t = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), schedule)
    assert t.step_time_s == pytest.approx((m + S - 1) * 3)
    assert t.bubble_fraction == pytest.approx((S - 1) / (m + S - 1))
    assert all(b == pytest.approx(3 * m) for b in t.busy_s[0])


def test_1f1b_order_and_peak_memory():
    S, m = 4, 6
    assert names(stage_order("1f1b", S, m, 0)) == [
        "F:0", "F:1", "F:2", "F:3", "B:0", "F:4", "B:1", "F:5", "B:2", "B:3", "B:4", "B:5"]
    assert names(stage_order("1f1b", S, m, S - 1)) == [
        "F:0", "B:0", "F:1", "B:1", "F:2", "B:2", "F:3", "B:3", "F:4", "B:4", "F:5", "B:5"]
    assert names(stage_order("gpipe", S, m, 2)) == [f"F:{i}" for i in range(m)] + [
        f"B:{i}" for i in range(m)]
    one = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), "1f1b")
    gpipe = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), "gpipe")
    assert one.peak_held_per_stage() == [S - s for s in range(S)]  # 4, 3, 2, 1
    assert gpipe.peak_held_per_stage() == [m] * S
    assert one.order(0, 1) == stage_order("1f1b", S, m, 1)  # it ran what it was told
    assert one.step_time_s == gpipe.step_time_s  # same bubble, less memory


def test_2bp_on_a_two_stage_timeline_drawn_by_hand():
    # F = P1 = P2 = 1 (B = 2), S = 2, m = 2, 1F1B.
    # plain:      s0 F0[0,1] F1[1,2]           B0[4,6]   B1[7,9]        -> 9
    #             s1         F0[1,2] B0[2,4] F1[4,5] B1[5,7]
    # 2BP, end:   s0 F0 F1   P1:0[3,4]  P1:1[5,6] P2:0[6,7] P2:1[7,8]  -> 8
    #             s1 F0[1,2] P1:0[2,3] F1[3,4] P1:1[4,5] P2:0[5,6] P2:1[6,7]
    # 2BP, fill:  s0 waits for P1:1's gradient in [4,5] and runs P2:0 there -> 7
    pipe = Pipeline.uniform(2, 2, 1.0, 1.0, 1.0)
    plain = simulate(pipe, "1f1b")
    end = simulate(pipe, "1f1b", twobp=True)
    fill = simulate(pipe, "1f1b", twobp=True, p2="fill")
    assert (plain.step_time_s, end.step_time_s, fill.step_time_s) == (9.0, 8.0, 7.0)
    assert names(end.order(0, 0)) == ["F:0", "F:1", "P1:0", "P1:1", "P2:0", "P2:1"]
    assert names(end.order(0, 1)) == ["F:0", "P1:0", "F:1", "P1:1", "P2:0", "P2:1"]
    assert names(fill.order(0, 0)) == ["F:0", "F:1", "P1:0", "P2:0", "P1:1", "P2:1"]
    spans = {(sp.stage, str(Op(sp.kind, sp.mbs))): (sp.start, sp.end) for sp in end.spans}
    assert spans[(0, "P1:0")] == (3.0, 4.0) and spans[(0, "P2:1")] == (7.0, 8.0)
    # 2BP keeps p2's inputs: every micro-batch is held until the end of the step
    assert end.peak_held_per_stage() == [2, 2] and plain.peak_held_per_stage() == [2, 1]
    assert end.peak_awaiting_p1 == [[2, 1]]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p2", ["end", "fill"])
def test_2bp_moves_exactly_the_weight_gradient_work(schedule, p2):
    # unequal stages, slow links: every device does the same work, only p2 moves
    times = [[StageTimes(0.7, 0.5, 0.9), StageTimes(1.1, 0.8, 0.6), StageTimes(0.4, 0.3, 1.3)]]
    links = [[Link(0.2, 4.0), Link(0.05, 1.0)]]
    pipe = Pipeline(times, links, m=5, message_bytes=1e8)
    plain = simulate(pipe, schedule)
    split = simulate(pipe, schedule, twobp=True, p2=p2)
    for s in range(3):
        t = times[0][s]
        assert split.busy_s[0][s] == pytest.approx(plain.busy_s[0][s])
        mine = [sp for sp in split.spans if sp.stage == s]
        assert sum(sp.end - sp.start for sp in mine if sp.kind == "P2") == pytest.approx(5 * t.p2)
        assert sum(sp.end - sp.start for sp in mine if sp.kind == "P1") == pytest.approx(5 * t.p1)
        assert sorted(sp.mbs for sp in mine if sp.kind == "P2") == [(i,) for i in range(5)]
        forwards = [str(op) for op in split.order(0, s) if op.kind == "F"]
        assert forwards == [str(op) for op in plain.order(0, s) if op.kind == "F"]
    assert split.step_time_s < plain.step_time_s  # p2 left the critical path


@pytest.mark.parametrize("schedule,S,m", [("gpipe", 4, 6), ("gpipe", 2, 6), ("1f1b", 2, 2)])
def test_link_latency_adds_once_per_hop_each_way(schedule, S, m):
    # GPipe streams: latency below a forward never stalls it, so the fill and the drain each
    # pay it once per hop. 1F1B with S = 2 by hand (F = 1, B = 2, L = 0.25, m = 2):
    # s0 F0[0,1] F1[1,2] B0[4.5,6.5] B1[7.5,9.5]; s1 F0[1.25,2.25] B0[2.25,4.25]
    # F1[4.25,5.25] B1[5.25,7.25] -> 9.5 = 9 + 2 L.
    lat = 0.25
    base = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), schedule).step_time_s
    slow = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0, link=Link(lat)), schedule)
    assert slow.step_time_s == pytest.approx(base + 2 * (S - 1) * lat)
    assert all(msg.arrive - msg.start == pytest.approx(lat) for msg in slow.messages)


def test_1f1b_pays_latency_on_every_round_trip_when_deep():
    # With S - s - 1 warm-up forwards, stage s has just enough work in flight to cover the
    # compute of a round trip to the last stage, not its latency: in steady state each
    # backward waits for it. So 1F1B loses more than GPipe's 2 (S - 1) L.
    S, m, lat = 4, 6, 0.25
    pipe, slow = Pipeline.uniform(S, m, 1.0, 1.0, 1.0), Pipeline.uniform(
        S, m, 1.0, 1.0, 1.0, link=Link(lat))
    extra = simulate(slow, "1f1b").step_time_s - simulate(pipe, "1f1b").step_time_s
    assert extra > 2 * (S - 1) * lat + 1.0
    assert simulate(slow, "gpipe").step_time_s < simulate(slow, "1f1b").step_time_s


def test_a_slow_link_paces_the_pipeline_by_hand():
    # S = 2, m = 3, GPipe, F = B = 1 (p1 = p2 = 0.5), each message drains for 2 s, no latency.
    # link 0->1: [1,3] [3,5] [5,7]; s1 F at 3, 5, 7, B at 8, 9, 10; grads 1->0: [9,11]
    # [11,13] [13,15]; s0 B at [11,12] [13,14] [15,16] -> 16
    pipe = Pipeline.uniform(2, 3, 1.0, 0.5, 0.5, link=Link(0.0, 1.0), message_bytes=0.25e9)
    t = simulate(pipe, "gpipe")
    assert t.step_time_s == pytest.approx(16.0)
    starts = sorted((sp.stage, sp.kind, sp.start) for sp in t.spans)
    assert starts == [(0, "B", 11.0), (0, "B", 13.0), (0, "B", 15.0), (0, "F", 0.0),
                      (0, "F", 1.0), (0, "F", 2.0), (1, "B", 8.0), (1, "B", 9.0),
                      (1, "B", 10.0), (1, "F", 3.0), (1, "F", 5.0), (1, "F", 7.0)]


def test_concatenated_p2_is_one_call_and_saves_the_call_overheads():
    pipe = Pipeline.uniform(3, 4, 1.0, 1.0, 1.0)
    many = simulate(pipe, "1f1b", twobp=True, op_overhead_s=0.1)
    one = simulate(pipe, "1f1b", twobp=True, concat=True, op_overhead_s=0.1)
    for s in range(3):
        assert [sp.mbs for sp in one.spans if sp.stage == s and sp.kind == "P2"] == [(0, 1, 2, 3)]
    # stage 0 ends the step with its p2 calls: 3 overheads fewer
    assert one.step_time_s == pytest.approx(many.step_time_s - 3 * 0.1)


def test_data_parallel_allreduce_follows_the_last_weight_gradient():
    M, nbytes, lat, gbps = 3, 5e8, 0.01, 2.0
    ar = ring_allreduce_time(M, nbytes, lat, gbps * 1e9)
    assert ar == pytest.approx(2 * (M - 1) * lat + 2 * (M - 1) / M * 8 * nbytes / (gbps * 1e9))
    pipe = Pipeline.uniform(2, 3, 1.0, 1.0, 1.0, R=M, allreduce_s=ar)
    t = simulate(pipe, "1f1b")
    assert t.pipeline_time_s == pytest.approx(12.0)  # (3 + 1) x 3
    last_s1 = max(sp.end for sp in t.spans if sp.stage == 1 and sp.kind != "AR")
    ar_s1 = [sp for sp in t.spans if sp.stage == 1 and sp.kind == "AR"]
    assert len(ar_s1) == M and ar_s1[0].start == pytest.approx(last_s1)
    assert t.step_time_s == pytest.approx(12.0 + ar)  # stage 0 finishes last


def test_gantt_chart_is_a_png(tmp_path):
    t = simulate(Pipeline.uniform(3, 4, 1.0, 1.0, 1.0, R=2, allreduce_s=1.0), "1f1b",
                 twobp=True)
    gantt(t, tmp_path / "g.png", "test")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- 2BP for real

SPEC = Backbone(vocab_in=65, vocab_out=65, depth=4, width=32, heads=2, seq_len=16, causal=True)


@pytest.fixture(scope="module")
def model():
    params = init_params(SPEC, torch.Generator().manual_seed(0))
    # nanochat's init zeroes the head and residual projections; random weights make every
    # gradient non-trivial, so a wrong one cannot hide behind a zero
    gen = torch.Generator().manual_seed(1)
    params = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in params.items()}
    batch = torch.randint(0, 65, (6, 2, SPEC.seq_len + 1), generator=gen)
    return params, batch, reference_grads(SPEC, params, batch)


def test_stages_in_sequence_are_the_backbone(model):
    params, batch, _ = model
    rotary = rotary_tables(SPEC, "cpu")
    x = h = batch[0, :, :-1]
    for s in range(3):
        h = stage_forward(SPEC, params, 3, s, h, rotary, Ops())
    logits, _ = forward_one(SPEC, params, x, rotary)
    torch.testing.assert_close(h, logits, rtol=1e-5, atol=1e-5)


def _max_rel_err(grads, ref):
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)


@pytest.mark.parametrize("schedule,mode,concat", [
    ("1f1b", "plain", False), ("1f1b", "stash", False), ("1f1b", "stash", True),
    ("1f1b", "autograd", False), ("gpipe", "stash", False), ("gpipe", "autograd", True)])
def test_pipelined_gradients_equal_plain_backprop(model, schedule, mode, concat):
    params, batch, (ref, ref_loss) = model
    r = run_schedule(SPEC, params, batch, 4, schedule, mode, concat)
    assert r.loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(r.grads) == set(ref)
    assert _max_rel_err(r.grads, ref) < 1e-5  # float32 round-off, nothing more


def test_memory_held_per_stage_matches_the_time_model(model):
    params, batch, _ = model
    S, m = 4, batch.shape[0]
    plain = run_schedule(SPEC, params, batch, S, "1f1b", "plain")
    stash = run_schedule(SPEC, params, batch, S, "1f1b", "stash")
    grad = run_schedule(SPEC, params, batch, S, "1f1b", "autograd")
    assert plain.peak_held == [S - s for s in range(S)]
    assert stash.peak_held == grad.peak_held == [m] * S
    predicted = simulate(Pipeline.uniform(S, m, 1.0, 1.0, 1.0), "1f1b", twobp=True)
    assert stash.peak_held == predicted.peak_held_per_stage()
    assert plain.orders[0] == ["F:0", "F:1", "F:2", "F:3", "B:0", "F:4", "B:1", "F:5", "B:2",
                               "B:3", "B:4", "B:5"]
    for s in range(S):  # 2BP keeps more; keeping the whole graph keeps the most
        assert plain.peak_bytes[s] < stash.peak_bytes[s] <= grad.peak_bytes[s]
    # the last stage holds one micro-batch without 2BP, all m with it
    assert stash.peak_bytes[-1] > 3 * plain.peak_bytes[-1]


def test_p2_concatenated_equals_p2_per_micro_batch():
    gen = torch.Generator().manual_seed(2)
    entries = [("w", torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen))
               for _ in range(3)]
    entries += [("e", torch.randint(0, 6, (2, 5), generator=gen),
                 torch.randn(2, 5, 4, generator=gen)) for _ in range(3)]
    shapes = {"w": (4, 3), "e": (6, 4)}
    apart, joined = weight_grads(entries, shapes), weight_grads(entries, shapes, concat=True)
    want = sum(gy.t() @ x for n, x, gy in entries if n == "w")
    torch.testing.assert_close(apart["w"], want)
    torch.testing.assert_close(joined["w"], want)
    torch.testing.assert_close(joined["e"], apart["e"])
    assert not math.isclose(float(apart["e"].abs().sum()), 0.0)


def test_the_2bp_stash_leaves_nothing_behind():
    """What 2BP's p1 stashes for p2 must not keep the autograd graph alive. A stashed input
    that still carried its grad_fn made a cycle through C++ that Python's gc cannot break
    (stash -> a later layer's input -> its grad_fn chain -> an earlier layer's node -> its ctx
    -> the same stash), and every step's stash leaked: 64 GB of GPU memory at 6 x 384."""
    import gc
    import weakref

    stash = []
    ops = Ops(stash)
    x = torch.randn(4, 8, requires_grad=True)
    w1, w2 = torch.randn(8, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    y = ops.linear(ops.linear(x * 2.0, w1, "w1"), w2, "w2")  # two layers share one stash
    y.sum().backward()
    refs = [weakref.ref(t) for _, a, b in stash for t in (a, b)]
    del stash, ops, y
    gc.collect()
    assert refs and all(r() is None for r in refs)
