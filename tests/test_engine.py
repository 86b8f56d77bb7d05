"""The batched engine (runtime/engine.py) against the sequential one, and the stacked
optimizers against torch's."""

import pytest
import torch

from locotrain.errors import UserError
from locotrain.optim import Lion, adamw_stacked, clip_stacked, lion_stacked
from locotrain.run import Simulation, simulate
from locotrain.runtime.engine import Engine
from locotrain.workloads import Workload

from conftest import tiny_config

FOUR = ["cluster.preset=two-datacenters", "cluster.size=4", "cluster.step_time_s=0.01",
        "train.tokens=51200"]  # 100 steps per worker (4 x 8 x 16 tokens per step)
HETERO = ["cluster.preset=halos-4x4", "train.tokens=51200"]  # 16 workers, 8.5x speed spread

def relative_difference(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


CASES = {
    "ddp": ["algorithm.name=ddp", *FOUR],
    "diloco": ["algorithm.name=diloco", "algorithm.H=10", *FOUR],
    "diloco-dylu": ["algorithm.name=diloco", "algorithm.H=10", "algorithm.dylu=true", *HETERO],
    "streaming": ["algorithm.name=streaming", "algorithm.H=10", "algorithm.fragments=2",
                  "algorithm.tau=2", "algorithm.alpha=0.5", "model.depth=2", *FOUR],
    "eager": ["algorithm.name=eager", "algorithm.H=10", *FOUR],
    "overlap": ["algorithm.name=overlap_local_sgd", "algorithm.H=5", *FOUR],
    "async-dylu": ["algorithm.name=async_local_sgd", "algorithm.H=6", *HETERO],
    "halos": ["algorithm.name=halos", "algorithm.H=6", "algorithm.K=4", *HETERO],
    "diffusion": ["algorithm.name=diloco", "algorithm.H=10", "workload.name=masked_diffusion",
                  "workload.loopholing=true", "workload.self_cond_rate=0.5", *FOUR],
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_engine_equals_sequential(case):
    """The same run with every worker stepped alone and with workers stepped together: the
    same final model (float32, within 1e-5 relative) and the same metrics."""
    runs = {}
    for engine in ("sequential", "batched"):
        runs[engine] = simulate(tiny_config(*CASES[case], f"runtime.engine={engine}"))
    seq, bat = runs["sequential"], runs["batched"]
    for k in seq.params:
        assert relative_difference(bat.params[k], seq.params[k]) < 1e-5, k
    for a, b in zip(seq.evals, bat.evals, strict=True):
        assert a["tokens"] == b["tokens"] and a["sim_time_s"] == b["sim_time_s"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert seq.summary["bytes_sent"] == bat.summary["bytes_sent"]
    # and the batched engine really batched: some steps ran several workers at once
    widths = [w for w, _, _ in bat.runtime.engine.chunks]
    assert max(widths) > 1 and max(w for w, _, _ in seq.runtime.engine.chunks) == 1


def test_workers_with_different_batch_sizes_group_by_batch_size():
    cfg = tiny_config("algorithm.name=diloco", "algorithm.H=4", "cluster.preset=custom",
                      "cluster.regions=['a']", "cluster.latency_s=[[0.0]]",
                      "cluster.bandwidth_gbps=[[0.0]]", "cluster.step_time_s=0.01",
                      "cluster.workers=[{region='a', batch_size=4, count=2}, "
                      "{region='a', batch_size=8, count=2}]", "train.tokens=8192")
    batched = simulate(cfg)
    cfg.runtime.engine = "sequential"
    ref = simulate(cfg)
    for k in ref.params:
        assert relative_difference(batched.params[k], ref.params[k]) < 1e-5, k
    assert {w for w, _, _ in batched.runtime.engine.chunks} == {2}  # two groups of two


def _grads(shapes, W, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(W, *s, generator=g) for s in shapes]


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_stacked_optimizers_are_torchs_per_worker(optimizer):
    """Three workers, each with its own lr and step count, 5 steps: the stacked update equals
    torch.optim.AdamW (or our Lion) run on each worker alone, decay on matrices only."""
    shapes, W = [(6, 4), (4,)], 3
    params = _grads(shapes, W, 0)
    lrs, decay, betas = [1e-2, 3e-3, 1e-3], 0.1, (0.9, 0.95)
    refs = []
    for w in range(W):
        ps = [p[w].clone().requires_grad_(True) for p in params]
        groups = [{"params": [ps[0]], "weight_decay": decay}, {"params": [ps[1]], "weight_decay": 0.0}]
        opt = (torch.optim.AdamW(groups, lr=lrs[w], betas=betas) if optimizer == "adamw"
               else Lion(groups, lr=lrs[w], betas=betas))
        refs.append((ps, opt))
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    for step in range(1, 6):
        grads = _grads(shapes, W, step)
        for w, (ps, opt) in enumerate(refs):
            for p, g in zip(ps, grads):
                p.grad = g[w].clone()
            opt.step()
        lr = torch.tensor(lrs)
        wd = torch.full((W,), decay)
        if optimizer == "adamw":
            adamw_stacked(params, grads, exp_avg, exp_avg_sq, [True, False],
                          torch.full((W,), float(step)), lr, betas, wd)
        else:
            lion_stacked(params, grads, exp_avg, [True, False], lr, betas, wd)
    for w, (ps, _) in enumerate(refs):
        for p, ref in zip(params, ps):
            torch.testing.assert_close(p[w], ref.detach(), rtol=1e-6, atol=1e-7)


def test_stacked_clipping_is_clip_grad_norm_per_worker():
    shapes, W = [(6, 4), (4,)], 3
    grads = _grads(shapes, W, 7)
    grads[0][1] *= 0.01  # worker 1 stays under the limit, the others are clipped
    grads[1][1] *= 0.01
    expected = []
    for w in range(W):
        ps = [torch.zeros_like(g[w], requires_grad=True) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g[w].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        expected.append([p.grad for p in ps])
    clip_stacked(grads, 1.0)
    for w in range(W):
        for g, e in zip(grads, expected[w]):
            torch.testing.assert_close(g[w], e, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch._dynamo's import
def test_cuda_graphs_recompile_for_replay_and_change_no_result(monkeypatch):
    """What runtime.cuda_graphs = "on" does to the batched engine, checked on the CPU with
    torch.compile stubbed out (graphs themselves need a GPU: benchmarks/cuda_graphs.py):
    the optimizer and the workload's forward are compiled in "reduce-overhead" mode, the
    banks' stacked tensors are marked static, and DDP (gradients jobs) ends with the same
    model as without graphs."""
    modes, static = [], []
    monkeypatch.setattr(torch, "compile",
                        lambda f, mode=None: modes.append((f.__name__, mode)) or f)
    monkeypatch.setattr(torch._dynamo, "mark_static_address", static.append)
    monkeypatch.setattr(Workload, "cuda_graphs",
                        property(lambda self: self.cfg.runtime.cuda_graphs == "on"))
    runs = {}
    for graphs in ("off", "on"):
        cfg = tiny_config(*CASES["ddp"], f"runtime.cuda_graphs={graphs}", "train.compile=true")
        engine = Engine("batched")
        engine.compile()
        sim = Simulation(cfg, engine)
        engine.start()
        sim.start()
        sim.run()
        runs[graphs] = sim.finish()
        assert engine.graphs == (graphs == "on")
    assert {("forward", "reduce-overhead"), ("adamw_stacked", "reduce-overhead")} <= set(modes)
    # never the reference engine, nor an engine that does not compile
    for engine, compiled in ((Engine("sequential"), True), (Engine("batched"), False)):
        if compiled:
            engine.compile()
        Simulation(cfg, engine)
        engine.start()
        assert not engine.graphs
    assert len(static) == 3 * len(runs["on"].params)  # parameters and both AdamW moments
    for k in runs["off"].params:
        assert torch.equal(runs["on"].params[k], runs["off"].params[k]), k


def test_cuda_graphs_change_nothing_on_a_cpu():
    on = simulate(tiny_config(*CASES["diloco"], "runtime.cuda_graphs=on", "train.compile=true"))
    assert not on.runtime.engine.graphs


@pytest.mark.parametrize("setting,message", [
    ("runtime.cuda_graphs=yes", "runtime.cuda_graphs = 'yes' is not one of: auto, on, off"),
    ("runtime.eval_batch=-1", "runtime.eval_batch must be >= 0"),
])
def test_runtime_settings_are_checked(setting, message):
    with pytest.raises(UserError, match=message):
        tiny_config(setting)
    with pytest.raises(UserError, match="set train.compile = true too"):
        tiny_config("runtime.cuda_graphs=on", "train.compile=false")
