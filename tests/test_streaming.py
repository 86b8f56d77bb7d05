"""Streaming DiLoCo (algorithms/streaming.py): the DiLoCo oracle, payload and byte counts in
closed form, overlap on the virtual clock, fragment membership, config checks, the merge."""

import math
import re

import pytest
import torch

from conftest import tiny_config
from locotrain.codecs import make_codec
from locotrain.errors import UserError
from locotrain.run import build, simulate
from locotrain.runtime.network import ring_allreduce_time

TWO_DC = "cluster.preset=two-datacenters"  # 4 workers, 2 regions
FEW_EVALS = "eval.every=100000000"  # only the first and the final evaluation
TOKENS_PER_STEP = 4 * 8 * 16  # 4 workers x batch 8 x seq_len 16 (TINY)


def config(*overrides):
    # A 1% validation split: the final evaluation reads all of it and dominates a tiny run.
    return tiny_config("data.train_fraction=0.99", *overrides)


def streaming(*overrides):
    return config("algorithm.name=streaming", *overrides)


def fragment_numels(cfg) -> list[int]:
    setup = build(cfg)
    shapes = dict(zip(setup.job.param_names, setup.job.param_shapes))
    return [sum(math.prod(shapes[n]) for n in f) for f in setup.algorithm.fragments()]


def syncs(Q: int, H: int, tau: int, S: int) -> list[int]:
    """Fragment of every sync of a run, worked out from the schedule: fragment p sends at
    (p+1)H/Q + kH <= S; one still in flight at S is received then; every other fragment whose
    last send was before S syncs once more at S."""
    gap, out, last = H // Q, [], [0] * Q
    for t in range(gap, S + 1, gap):
        p = (t // gap - 1) % Q
        out.append(p)
        last[p] = S if t + tau > S else t
    return out + [p for p in range(Q) if last[p] < S]


# -- 1. with one fragment, tau = 0 and alpha = 0 it is DiLoCo, bit for bit -----------------

@pytest.mark.parametrize("tokens", [8192, 10 * TOKENS_PER_STEP])  # 16 steps; 10 (not k*H)
def test_one_fragment_is_diloco(tokens):
    common = [TWO_DC, "algorithm.H=4", "algorithm.outer_momentum=0.9", f"train.tokens={tokens}"]
    ref = simulate(config("algorithm.name=diloco", *common))
    got = simulate(streaming("algorithm.fragments=1", "algorithm.tau=0", "algorithm.alpha=0",
                             *common))
    assert ref.params.keys() == got.params.keys()
    for name in ref.params:
        assert torch.equal(ref.params[name], got.params[name]), name
    assert [e["val_loss"] for e in got.evals] == [e["val_loss"] for e in ref.evals]
    assert got.summary["outer_updates"] == ref.summary["outer_updates"] == math.ceil(tokens / TOKENS_PER_STEP / 4)
    assert got.runtime.network.bytes_sent == ref.runtime.network.bytes_sent


# -- 2. the largest payload is one fragment, encoded ---------------------------------------

def test_peak_payload_is_one_fragment():
    fp4 = make_codec("fp4")
    common = [TWO_DC, "model.depth=2", "train.tokens=4096", FEW_EVALS]
    diloco = simulate(config("algorithm.name=diloco", "algorithm.H=6", *common))
    numel = sum(fragment_numels(streaming("algorithm.fragments=1", "algorithm.H=6", *common)))
    assert diloco.runtime.peak_payload == 4 * numel
    block = 12 * 32 * 32  # wq, wk, wv, wo (width^2 each) and fc, proj (4 width^2 each)
    for embeddings, H, largest in [("own", 6, block), ("first", 4, None)]:
        cfg = streaming("algorithm.fragments=2", f"algorithm.embeddings={embeddings}",
                        f"algorithm.H={H}", "algorithm.tau=1", "algorithm.alpha=0.5",
                        "algorithm.codec=fp4", *common)
        sizes = fragment_numels(cfg)
        assert len(sizes) == (3 if embeddings == "own" else 2) and sum(sizes) == numel
        if largest:  # "own": the largest fragment is one block; "first" adds wte and head
            assert max(sizes) == largest
        peak = simulate(cfg).runtime.peak_payload
        assert peak == fp4.nbytes(max(sizes))
        ratio = peak / diloco.runtime.peak_payload
        assert ratio == fp4.nbytes(max(sizes)) / (4 * numel)
        assert ratio < max(sizes) / numel / 7  # 4 bits per value plus one scale per 128 values


# -- 3. bytes on the wire in closed form, end-of-run flush included ------------------------

@pytest.mark.parametrize("tau,steps", [(0, 14), (2, 13)])  # (2, 13): fragment 0 in flight at S
def test_bytes_sent_closed_form(tau, steps):
    cfg = streaming(TWO_DC, "model.depth=2", "algorithm.fragments=2", "algorithm.H=8",
                    f"algorithm.tau={tau}", "algorithm.codec=fp32",
                    f"train.tokens={steps * TOKENS_PER_STEP}", FEW_EVALS)
    sizes = fragment_numels(cfg)
    plan = syncs(2, 8, tau, steps)
    assert plan == ([0, 1, 0, 0, 1] if tau == 0 else [0, 1, 0, 1])
    res = simulate(cfg)
    M = 4  # a ring all-reduce of S bytes: members send 2(M-1) S bytes in all, split exactly
    assert res.runtime.network.bytes_sent == sum(2 * (M - 1) * 4 * sizes[p] for p in plan)
    assert res.summary["outer_updates"] == len(plan)


# -- 4. overlap hides the all-reduce when it takes less than tau steps ---------------------

def overlap_run(tau: int, gbps: float):
    return simulate(streaming(
        TWO_DC, "model.depth=2", "algorithm.fragments=2", "algorithm.H=8", f"algorithm.tau={tau}",
        "algorithm.alpha=0.5", "cluster.step_time_s=0.1", f"cluster.inter_gbps={gbps}",
        "cluster.inter_latency_s=0", "train.tokens=8192", FEW_EVALS))


def blocked(proc) -> list[tuple[float, float]]:
    return [(s, e) for kind, s, e in proc.spans if kind == "blocked"]


def test_overlap_hides_communication():
    step, S, frag = 0.1, 16, max(fragment_numels(streaming("model.depth=2", "algorithm.fragments=2")))
    fast, slow = 0.01, 0.002  # Gbit/s of the inter-region link
    assert ring_allreduce_time(4, 4 * frag, 1e-4, fast * 1e9) < 2 * step < ring_allreduce_time(4, 4 * frag, 1e-4, slow * 1e9)
    hidden, blocking, late = overlap_run(2, fast), overlap_run(0, fast), overlap_run(2, slow)
    for proc in hidden.runtime.procs:
        end_of_training = max(e for kind, s, e in proc.spans if kind == "compute")
        assert all(s >= end_of_training for s, e in blocked(proc)), blocked(proc)
    # tau = 0: every sync blocks for exactly one ring all-reduce alone on the link.
    sizes = fragment_numels(streaming("model.depth=2", "algorithm.fragments=2"))
    comm = sum(ring_allreduce_time(4, 4 * sizes[p], 1e-4, fast * 1e9) for p in syncs(2, 8, 0, S))
    assert blocking.summary["sim_time_s"] == pytest.approx(S * step + comm, rel=1e-9)
    assert hidden.summary["sim_time_s"] < blocking.summary["sim_time_s"] - 0.2
    for proc in late.runtime.procs:
        end_of_training = max(e for kind, s, e in proc.spans if kind == "compute")
        assert sum(e - s for s, e in blocked(proc) if s < end_of_training) > 0.1


# -- 5. which tensors each fragment holds ---------------------------------------------------

def block_sets(cfg):
    """(blocks, other tensors) of every fragment; block tensors are named h{i}.*"""
    out = []
    for f in build(cfg).algorithm.fragments():
        blocks = [re.match(r"h(\d+)\.", n) for n in f]
        out.append((sorted({int(m.group(1)) for m in blocks if m}),
                    [n for n, m in zip(f, blocks) if not m]))
    return out


@pytest.mark.parametrize("pattern,blocks", [("strided", [[0, 2], [1, 3]]),
                                            ("sequential", [[0, 1], [2, 3]])])
def test_fragment_membership(pattern, blocks):
    common = ["model.depth=4", "algorithm.fragments=2", f"algorithm.fragment_pattern={pattern}"]
    assert block_sets(streaming(*common, "algorithm.embeddings=first")) == [
        (blocks[0], ["wte", "head"]), (blocks[1], [])]
    assert block_sets(streaming(*common, "algorithm.embeddings=own", "algorithm.H=6")) == [
        (blocks[0], []), (blocks[1], []), ([], ["wte", "head"])]
    setup = build(streaming(*common))  # every tensor in exactly one fragment, in model order
    flat = [n for f in setup.algorithm.fragments() for n in f]
    assert sorted(flat) == sorted(setup.job.param_names) and len(flat) == len(set(flat))
    for f in setup.algorithm.fragments():
        assert f == [n for n in setup.job.param_names if n in f]


# -- 6. impossible settings are user errors that name their keys ---------------------------

@pytest.mark.parametrize("overrides,keys", [
    (["model.depth=3", "algorithm.fragments=2"], ["model.depth", "algorithm.fragments"]),
    (["model.depth=2", "algorithm.fragments=2", "algorithm.H=5"], ["algorithm.H", "divisible by the number of fragments (2)"]),
    (["model.depth=2", "algorithm.fragments=2", "algorithm.H=8", "algorithm.embeddings=own"], ["algorithm.H", "(3"]),
    (["model.depth=2", "algorithm.fragments=2", "algorithm.H=8", "algorithm.tau=4"], ["algorithm.tau"]),
    (["algorithm.alpha=1.5"], ["algorithm.alpha"]),
    (["algorithm.alpha=-0.1"], ["algorithm.alpha"]),
])
def test_bad_configs(overrides, keys):
    with pytest.raises(UserError) as err:
        build(streaming(*overrides))
    message = str(err.value)
    assert "\n" not in message and all(k in message for k in keys), message


def test_tau_just_below_limit_is_fine():
    setup = build(streaming("model.depth=2", "algorithm.fragments=2", "algorithm.H=8",
                            "algorithm.tau=3"))
    assert len(setup.algorithm.fragments()) == 2  # H / fragments = 4 > tau = 3


# -- 7. the merge phi <- alpha phi + (1 - alpha) theta, by hand on one worker -------------

def one_sync(alpha: float, outer_lr: float):
    """One worker, one fragment, S = H = 8: a single sync at the last step. Returns the
    initial, the final global and the worker's final parameters."""
    cfg = streaming("cluster.preset=single", "algorithm.H=8", "train.tokens=1024", FEW_EVALS,
                    "algorithm.tau=0", f"algorithm.alpha={alpha}", f"algorithm.outer_lr={outer_lr}",
                    "algorithm.outer_momentum=0")
    res = simulate(cfg)
    assert res.summary["inner_steps"] == 8 and res.summary["outer_updates"] == 1
    theta0 = build(cfg).workload.init_params(cfg.train.seed)
    return theta0, res.params, res.runtime.procs[0].worker.params


def test_alpha_mixes_local_and_global():
    theta0, g_keep, phi = one_sync(alpha=1.0, outer_lr=0.5)  # alpha=1 keeps the local params
    _, g_mix, w_mix = one_sync(alpha=0.5, outer_lr=0.5)
    _, g_one, w_one = one_sync(alpha=0.5, outer_lr=1.0)
    close = dict(rtol=0, atol=1e-6)
    for n in theta0:
        phi_n = phi[n].detach()
        # M=1: the mean outer gradient is exactly theta0 - phi, so theta = theta0 - lr (theta0 - phi)
        assert torch.allclose(g_keep[n], theta0[n] - 0.5 * (theta0[n] - phi_n), **close), n
        assert torch.equal(g_mix[n], g_keep[n])  # alpha changes nothing before the merge
        assert torch.allclose(w_mix[n].detach(), 0.5 * phi_n + 0.5 * g_mix[n], **close), n
        # outer_lr=1: theta lands on phi, so any merge leaves the worker on theta (= plain training)
        assert torch.allclose(g_one[n], phi_n, **close), n
        assert torch.allclose(w_one[n].detach(), g_one[n], **close), n
    moved = [n for n in theta0 if not torch.allclose(phi[n].detach(), theta0[n], **close)]
    assert moved and any(not torch.allclose(w_mix[n].detach(), phi[n].detach(), **close) for n in moved)


@pytest.mark.parametrize("algorithm", [
    ["algorithm.name=streaming", "algorithm.H=4", "algorithm.fragments=2", "algorithm.tau=1",
     "model.depth=2", "algorithm.codec=fp4"],
    ["algorithm.name=diloco", "algorithm.H=4"],
])
def test_layer_windows_change_the_timing_and_never_the_arithmetic(algorithm):
    """`layer_windows` (the papers' per-layer DAG, for plans) lets a worker compute into its
    next step while a sync is on the wire: the run can only end sooner, with the same
    model bit for bit and the same bytes."""
    slow_link = ["cluster.preset=two-datacenters", "cluster.size=2",
                 "cluster.inter_gbps=0.001", f"train.tokens={32 * 8 * 16 * 2}"]
    plain = simulate(tiny_config(*algorithm, *slow_link))
    windows = simulate(tiny_config(*algorithm, *slow_link, "algorithm.layer_windows=true"))
    assert windows.summary["sim_time_s"] < plain.summary["sim_time_s"]
    assert windows.summary["bytes_sent"] == plain.summary["bytes_sent"]
    for k in plain.params:
        assert torch.equal(plain.params[k], windows.params[k]), k
