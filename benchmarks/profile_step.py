"""Where does one training step of the nanoGPT-size char GPT spend its time on a GPU?

    python benchmarks/profile_step.py [--nanogpt PATH/TO/nanoGPT]

Runs the locotrain inner step (the same WorkerState the simulator uses) with bf16 autocast
and torch.compile, warms up, then profiles 50 steps with the PyTorch profiler and prints:
host time per step, GPU kernel time per step by category (matrix multiplies, attention,
optimizer, the rest), and the GPU's idle share. With --nanogpt, nanoGPT's model and fused
AdamW get the same treatment (its code is read from the given checkout, never copied here).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain.config import load_config  # noqa: E402
from locotrain.data import load_corpus, make_shards  # noqa: E402
from locotrain.runtime.worker import WorkerState  # noqa: E402
from locotrain.workloads import build_workload  # noqa: E402

STEPS = 50


def category(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "matmul" in n or "sm90_xmma" in n or "cutlass" in n or "nvjet" in n:
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    return "other (norms, activations, copies, loss)"


def measure(label: str, step) -> None:
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / STEPS
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    count = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[category(e.name)] += e.device_time / 10 / 1000  # ms per step
            count += 1
    busy = sum(kernels.values())
    print(f"\n{label}: {wall * 1000:.2f} ms per step (synchronised), {16384 / wall:,.0f} tok/s, "
          f"{count / 10:.0f} kernels per step")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<42}{v:7.2f} ms  {v / (wall * 1000):6.1%}")
    print(f"  {'GPU idle (launch and host overhead)':<42}{wall * 1000 - busy:7.2f} ms  "
          f"{1 - busy / (wall * 1000):6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", type=Path)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    _, cfg = load_config("shakespeare-char")
    corpus = load_corpus("", 0.9)
    wl = build_workload(cfg, corpus, "cuda")
    wl.compile()
    shard = make_shards(corpus.train.cuda(), 1, "iid", wl.window, 0)[0]
    worker = WorkerState(0, wl, wl.init_params(0), shard, 64, cfg.train, 5000)
    measure("locotrain ar_gpt (compiled forward, fused AdamW)", lambda: worker.train(1))
    small = WorkerState(1, wl, wl.init_params(0), shard, 16, cfg.train, 5000)
    for _ in range(30):
        small.train(1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        small.train(1)
    torch.cuda.synchronize()
    print(f"\nbatch 16 (the two-datacenters preset's worker): "
          f"{(time.perf_counter() - started) / STEPS * 1000:.2f} ms per step")

    if args.nanogpt:
        sys.path.insert(0, str(args.nanogpt))
        from model import GPT, GPTConfig  # nanoGPT's model.py

        model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                              dropout=0.2, bias=False)).cuda()
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cuda")
        cmodel = torch.compile(model)
        g = torch.Generator().manual_seed(0)

        def step():
            batch = shard.batch(64, 257, g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = cmodel(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        measure("nanoGPT (whole model compiled, fused AdamW)", step)


if __name__ == "__main__":
    main()
