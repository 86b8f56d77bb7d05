"""How close AdLoCo's sketched norm test is to the exact one, on the same gradients.

    python -m locotrain run quickstart --out runs/sketch_probe/sketch_0 --set cluster.size=4 \
        --set algorithm.name=adloco --set algorithm.H=20 --set algorithm.initial_batch=4 \
        --set algorithm.trainers=1 --set algorithm.sketch_dim=0 --set train.tokens=491520
    python experiments/adloco_sketch_check.py [RUN]      # default runs/sketch_probe/sketch_0

From RUN's final model, 4 nodes (the run's shards) each take one gradient at batch b; the norm
test's T = b/(M-1) sum ||g_m - gbar||^2 / (M eta^2 ||gbar||^2) (eta 0.8, before max(b, .)) is
computed exactly and with ||S gbar||^2 from three count sketches of 1023 values (different
seeds). Output: docs/results/adloco/sketch_check.txt."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain.algorithms.adloco import CountSketch  # noqa: E402
from locotrain.checkpoint import load_checkpoint  # noqa: E402
from locotrain.codecs import flatten  # noqa: E402
from locotrain.data import make_shards, windows_at  # noqa: E402
from locotrain.setup import build  # noqa: E402

M, ETA = 4, 0.8


def T(b: int, mean_sq: float, gbar_sq: float) -> float:
    return b / (M - 1) * (M * mean_sq - M * gbar_sq) / (M * ETA ** 2 * gbar_sq)


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "sketch_probe" / "sketch_0"
    params, cfg, _, _ = load_checkpoint(run)
    setup = build(cfg)
    wl, names = setup.workload, setup.job.param_names
    shards = make_shards(setup.corpus.train, M, cfg.data.shards, wl.window, cfg.train.seed)
    numel = sum(p.numel() for p in params.values())
    sketches = [CountSketch(numel, 1023, seed) for seed in range(3)]
    g = torch.Generator().manual_seed(1)
    lines = [f"model: {run} ({numel:,} parameters), M = {M}, eta = {ETA}; T before max(b, T)",
             "b | exact T | T from 3 sketches (1023 values) | ||gbar||^2 / mean ||g_m||^2"]
    for b in (4, 16, 64):
        for _ in range(3):
            grads = []
            for m in range(M):
                ps = {n: params[n].clone().unsqueeze(0).requires_grad_(True) for n in names}
                starts = shards[m].starts(b, wl.window, g)
                batch = windows_at(shards[m].tokens, starts.unsqueeze(0), wl.window)
                wl.loss(ps, batch, [torch.Generator().manual_seed(m)]).sum().backward()
                grads.append(flatten([ps[n].grad[0] for n in names]))
            G = torch.stack(grads).double()
            mean_sq, gbar_sq = G.pow(2).sum(1).mean().item(), G.mean(0).pow(2).sum().item()
            est = [T(b, mean_sq, torch.stack([S(x) for x in grads]).double().mean(0).pow(2).sum().item())
                   for S in sketches]
            lines.append(f"{b} | {T(b, mean_sq, gbar_sq):.1f} | "
                         f"{', '.join(f'{t:.1f}' for t in est)} | {gbar_sq / mean_sq:.3f}")
    out = ROOT / "docs" / "results" / "adloco" / "sketch_check.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
