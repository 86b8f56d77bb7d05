"""Bit-for-bit repeatable CPU runs: two `loco run`s of every algorithm, in separate
processes with torch's default threads, write the same metrics and the same model bytes.

The known way to lose this is a parallel CPU kernel that adds in a varying order: the
backward of `wte[tokens]` (index_put with accumulate) goes parallel with atomic adds from
32,768 gradient values on 2+ threads; the backbone uses F.embedding, whose backward is
ordered. The last test pins that op directly (short runs can start from a zero head, whose
embedding gradients vanish for the first steps, and so do not always show it)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from locotrain.config import load_config
from locotrain.models.backbone import forward_one
from locotrain.workloads import build_workload
from locotrain.data import load_corpus

from conftest import TINY

WIDE = [*TINY, "model.width=128", "model.heads=4", "model.seq_len=32", "train.batch_size=16",
        "train.tokens=16384", "cluster.preset=two-datacenters", "cluster.size=2",
        "cluster.step_time_s=0.01", "eval.every=4096", "eval.windows=8"]

CASES = {
    "ddp": ["algorithm.name=ddp"],
    "diloco": ["algorithm.name=diloco", "algorithm.diloco.H=4"],
    "streaming-fp4": ["algorithm.name=streaming", "algorithm.streaming.H=4",
                      "algorithm.streaming.codec=fp4", "algorithm.streaming.tau=1",
                      "algorithm.streaming.alpha=0.5", "model.depth=2",
                      "algorithm.streaming.fragments=2"],
    "eager": ["algorithm.name=eager", "algorithm.eager.H=4"],
    "overlap": ["algorithm.name=overlap_local_sgd", "algorithm.overlap_local_sgd.H=4"],
    "async": ["algorithm.name=async_local_sgd", "algorithm.async_local_sgd.H=4"],
    "halos": ["algorithm.name=halos", "algorithm.halos.H=4", "algorithm.halos.K=2"],
}


def run(out, overrides):
    args = [sys.executable, "-m", "locotrain", "run", "quickstart", "--quiet", "--out", str(out)]
    args += sum((["--set", o] for o in [*WIDE, *overrides]), [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def metrics_without_wall_clock(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "time_s"} for e in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_two_runs_are_bit_identical(tmp_path, case):
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, CASES[case])
    run(b, CASES[case])
    assert metrics_without_wall_clock(a / "metrics.jsonl") == metrics_without_wall_clock(b / "metrics.jsonl")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_the_embedding_gradient_is_repeatable_with_two_threads():
    """20 backward passes in one process with 2 threads give one gradient, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config("quickstart", WIDE)[1]
        wl = build_workload(cfg, load_corpus("", 0.9, 33))
        g = torch.Generator().manual_seed(0)  # random weights: at init the head is zero
        params = {k: (torch.randn(v.shape, generator=g) * 0.1).requires_grad_(True)
                  for k, v in wl.init_params(0).items()}
        tokens = torch.randint(65, (16, 32), generator=torch.Generator().manual_seed(0))
        grads = set()
        for _ in range(20):
            params["wte"].grad = None
            logits, _ = forward_one(wl.spec, params, tokens, wl.rotary)
            logits.square().mean().backward()
            grads.add(params["wte"].grad.numpy().tobytes())
        assert len(grads) == 1
    finally:
        torch.set_num_threads(threads)


def test_threads_follow_what_other_programs_keep_busy_now(monkeypatch):
    """train.threads = 0 takes the cores nobody else is using at the moment it starts (read
    from /proc/stat), not the lagging load average, which still counted a run that had just
    ended and halved the threads of the next one."""
    import subprocess
    import sys

    from locotrain.config import load_config
    from locotrain.run import busy_cores, choose_threads

    cores = os.cpu_count() or 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        assert busy_cores(cores, interval_s=0.5) >= 0.6  # the spinner's core
    finally:
        spinner.kill()
        spinner.wait()
    cfg = load_config("quickstart", [])[1]
    monkeypatch.setattr("locotrain.run.busy_cores", lambda cores: 0.0)
    assert choose_threads(cfg) == cores
    monkeypatch.setattr("locotrain.run.busy_cores", lambda cores: cores - 0.3)
    assert choose_threads(cfg) == 1
    cfg = load_config("quickstart", ["train.threads=3"])[1]
    assert choose_threads(cfg) == 3
