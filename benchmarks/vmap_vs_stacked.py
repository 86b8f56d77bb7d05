"""Two ways to step W models at once: the stacked backbone the engine uses (batched matmuls
over a leading worker dimension) against torch.func.vmap of one model's gradient.

    PYTHONPATH=src python benchmarks/vmap_vs_stacked.py --json results.json [--tiny]

Both compute every worker's loss gradient for its own batch (forward + backward, bf16
autocast on CUDA) with the same parameters and tokens; the check column is the largest
relative difference between the two gradients. Median of 20 timed iterations after 5 warm-up
ones, eager and under torch.compile. The optimizer step is left out: it is the same stacked
AdamW in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from locotrain.models.backbone import Backbone, forward, forward_one, init_params, rotary_tables  # noqa: E402


def timed(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--tiny", action="store_true", help="a small model (a CPU check)")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    depth, width, heads, T = (2, 64, 2, 32) if args.tiny else (6, 384, 6, 256)
    spec = Backbone(vocab_in=65, vocab_out=65, depth=depth, width=width, heads=heads,
                    seq_len=T, causal=True)
    W, B = args.workers, args.batch
    gen = torch.Generator().manual_seed(0)
    one = [init_params(spec, gen) for _ in range(W)]
    params = {k: torch.stack([p[k] for p in one]).to(device).requires_grad_() for k in one[0]}
    tokens = torch.randint(0, 65, (W, B, T + 1), generator=gen).to(device)
    x, y = tokens[..., :-1], tokens[..., 1:]
    rotary = rotary_tables(spec, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else \
        torch.autocast("cpu", enabled=False)

    def stacked_grads(p):
        with amp:
            logits, _ = forward(spec, p, x, rotary)
        # sum over workers of each worker's mean loss: each worker's gradient is its own
        loss = F.cross_entropy(logits.reshape(W * B * T, -1), y.reshape(-1), reduction="none")
        return torch.autograd.grad(loss.view(W, -1).mean(1).sum(), list(p.values()))

    def loss_one(p, xs, ys):
        with amp:
            logits, _ = forward_one(spec, p, xs, rotary)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))

    vmapped = torch.func.vmap(torch.func.grad(loss_one))

    def vmap_grads(p):
        detached = {k: v.detach() for k, v in p.items()}
        g = vmapped(detached, x, y)
        return [g[k] for k in p]

    a, b = stacked_grads(params), vmap_grads(params)
    check = max(((u.float() - v.float()).norm() / u.float().norm().clamp_min(1e-30)).item()
                for u, v in zip(a, b))
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()
               if device == "cuda" else "cpu", "torch": torch.__version__, "workers": W,
               "batch": B, "model": f"{depth} x {width}, context {T}",
               "max_relative_gradient_difference": check, "cases": {}}
    tokens_per_step = W * B * T
    for compiled in (False, True):
        for name, fn in (("stacked backbone", stacked_grads), ("vmap(grad(one model))", vmap_grads)):
            label = name + (", compiled" if compiled else "")
            try:
                f = torch.compile(fn) if compiled else fn
                seconds = timed(lambda: f(params))
                results["cases"][label] = {"step_s": seconds, "tokens_per_s": tokens_per_step / seconds}
            except Exception as e:  # a transform torch cannot compile here: say so, carry on
                results["cases"][label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(json.dumps({label: results["cases"][label]}), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"max relative gradient difference: {check:.2e}")


if __name__ == "__main__":
    main()
