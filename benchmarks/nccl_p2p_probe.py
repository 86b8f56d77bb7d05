"""Which point-to-point patterns of the pipeline runner complete on this machine: 1F1B's
communication for S = 2 stages and m = 8 micro-batches, with stand-in arithmetic (embedding,
rms_norm, a matmul, gelu; softmax and tanh for the backward) instead of the model, each
variant in its own pair of fresh processes (pipeline/spawn.py), stopped after a timeout.

    export PYTHONPATH=$PWD/src
    python benchmarks/nccl_p2p_probe.py                 # 2 GPUs, NCCL
    python benchmarks/nccl_p2p_probe.py --device cpu    # gloo, to check that it runs

Variants (--variants, comma-separated):
  prefetch-cold   the runner's pattern before its fix: a process group per link direction,
                  receives posted `prefetch` ahead with irecv, sends with isend, and the
                  arithmetic's kernels launched for the first time while those receives wait
                  on the GPU (CUDA's lazy module loading may then have to wait for them)
  prefetch-warm   the same after one pass of the arithmetic without communication, so every
                  kernel is loaded before any receive is posted (the runner's fix)
  prefetch-eager  the cold pattern in processes started with CUDA_MODULE_LOADING=EAGER (all
                  kernels loaded when CUDA starts; slow to start, not in the default list)
  batched         one process group per link, one batch_isend_irecv at each operation
                  boundary with the previous operation's send and this one's receive
                  (Megatron-LM's pairing), no receive posted ahead, cold kernels
  gloo-staged     the runner's transport = "gloo": gloo groups, each message copied to host
                  memory and back, receives posted ahead on the host, cold kernels

On the cpu every variant runs over gloo (there is nothing to load lazily); it checks the
probe itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # the ranks import locotrain too
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)

import torch
import torch.distributed as dist
import torch.nn.functional as F

VARIANTS = ("prefetch-cold", "prefetch-warm", "prefetch-eager", "batched", "gloo-staged")
DEFAULT = "prefetch-cold,prefetch-warm,batched,gloo-staged"


# ---------------------------------------------------------------------------- one rank


def rank_main(variant: str, job_file: str, result_file: str) -> int:
    from locotrain.pipeline.stage_process import DTYPES, _Inbox, _Wire
    from locotrain.pipeline.timeline import Pipeline, simulate
    from locotrain.runtime.launch import die_with_launcher

    die_with_launcher()
    job = torch.load(job_file, weights_only=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == 2
    cuda = job.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    staged = variant == "gloo-staged"
    dist.init_process_group("nccl" if cuda and not staged else "gloo")
    backend = "gloo" if staged else None
    if variant == "batched":  # both directions on one group: the batches pair them
        one = dist.new_group([0, 1], backend=backend)
        fwd_group = bwd_group = one
    else:
        fwd_group = dist.new_group([0, 1], backend=backend)
        bwd_group = dist.new_group([0, 1], backend=backend)
    peer = 1 - rank
    fwd = _Wire(peer, fwd_group, device, staged)  # activations 0 -> 1
    bwd = _Wire(peer, bwd_group, device, staged)  # gradients 1 -> 0

    m, dtype = job.micro_batches, DTYPES[job.dtype]
    shape = (job.micro_batch, job.spec.seq_len, job.spec.width)
    width = shape[-1]
    gen = torch.Generator().manual_seed(rank)
    table = (torch.randn(job.spec.vocab_in, width, generator=gen) * 0.1).to(device, dtype)
    w = (torch.randn(width, width, generator=gen) / width ** 0.5).to(device, dtype)
    tokens = torch.randint(0, job.spec.vocab_in, shape[:2], generator=gen).to(device)

    def forward(x):
        h = F.embedding(tokens, table) if rank == 0 else x
        return F.gelu(F.rms_norm(h, (width,)) @ w)

    def backward(g):
        return torch.softmax(g.float(), -1).to(dtype) * torch.tanh(g)

    # communicators up, as the runner's link timing does, before any arithmetic
    ping = torch.zeros(shape, dtype=dtype, device=device)
    if rank == 0:
        fwd.send(ping)
        bwd.recv(shape, dtype)
    else:
        bwd.send(fwd.recv(shape, dtype))
    if variant == "prefetch-warm":
        forward(ping), backward(ping)
    if cuda:
        torch.cuda.synchronize()

    order = simulate(Pipeline.uniform(2, m, 1.0, 1.0, 1.0), "1f1b").order(0, rank)
    t0 = time.perf_counter()
    for _ in range(job.runs[0].steps):
        if variant == "batched":
            _batched_step(rank, order, fwd_group, shape, dtype, device, forward, backward)
        else:
            _prefetch_step(rank, order, fwd, bwd, shape, dtype, m, job.prefetch, forward,
                           backward, _Inbox)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save({"variant": variant, "steps_s": seconds}, result_file)
    return 0


def _prefetch_step(rank, order, fwd, bwd, shape, dtype, m, ahead, forward, backward, Inbox):
    inbox = Inbox(fwd if rank == 1 else bwd, shape, dtype, m, ahead)
    sends = []
    for op in order:
        i = op.mbs[0]
        if op.kind == "F":
            x = inbox.take(i) if rank == 1 else None
            inbox.refill()
            y = forward(x)
            if rank == 0:
                sends.append(fwd.isend(y))
        else:
            g = inbox.take(i) if rank == 0 else torch.ones(shape, dtype=dtype, device=y.device)
            inbox.refill()
            gx = backward(g)
            if rank == 1:
                sends.append(bwd.isend(gx))
        sends = [(w, t) for w, t in sends if not w.is_completed()]
    for w, _ in sends:
        w.wait()
    assert inbox.done()


def _batched_step(rank, order, group, shape, dtype, device, forward, backward):
    peer, pending = 1 - rank, None
    for op in order:
        ops = []
        if pending is not None:
            ops.append(dist.P2POp(dist.isend, pending, peer, group=group))
        buf = None
        if (op.kind == "F") == (rank == 1):  # stage 1 receives for F, stage 0 for B
            buf = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, peer, group=group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if op.kind == "F":
            y = forward(buf)
            pending = y if rank == 0 else None
        else:
            g = buf if rank == 0 else torch.ones(shape, dtype=dtype, device=device)
            gx = backward(g)
            pending = gx if rank == 1 else None
    if pending is not None:
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, pending, peer, group=group)]):
            work.wait()


# ---------------------------------------------------------------------------- the driver


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:  # one rank of one variant; spawn.py appends the two files
        return rank_main(*argv[1:4])
    from locotrain.models.backbone import Backbone
    from locotrain.pipeline.distributed import Job, Run
    from locotrain.pipeline.spawn import spawn

    gpu = torch.cuda.device_count() >= 2
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if gpu else "cpu")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per variant")
    p.add_argument("--micro-batches", "-m", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None, help="default 32; 2 on the cpu")
    p.add_argument("--seq-len", type=int, default=None, help="default 256; 32 on the cpu")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"nccl_p2p_probe: unknown variant(s) {', '.join(bad)}; known: "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    spec = Backbone(65, 65, 2, a.width, max(1, a.width // 64), a.seq_len or (32 if cpu else 256),
                    causal=True)
    job = Job(spec, 2, a.micro_batches, a.micro_batch or (2 if cpu else 32),
              [Run("probe", steps=a.steps)], device=a.device,
              dtype="fp32" if cpu else "bf16", timeout_s=max(30.0, 2 * a.timeout))
    nbytes = job.micro_batch * spec.seq_len * spec.width * (4 if cpu else 2)
    print(f"1F1B, 2 stages, m = {job.micro_batches}, messages of {nbytes / 2**20:.2f} MiB, "
          f"{a.device} ({'NCCL' if not cpu else 'gloo'}), torch {torch.__version__}, "
          f"nccl {'.'.join(map(str, torch.cuda.nccl.version())) if not cpu else '-'}; "
          f"{a.timeout:g} s per variant", flush=True)
    rows = []
    for v in variants:
        old = os.environ.get("CUDA_MODULE_LOADING")
        if v == "prefetch-eager":
            os.environ["CUDA_MODULE_LOADING"] = "EAGER"
        t0 = time.monotonic()
        try:
            out = spawn(job, timeout_s=a.timeout, grace_s=2.0, quiet=True,
                        entry=[sys.executable, str(Path(__file__).resolve()), "--rank", v])
            verdict = f"completed ({a.steps} steps in {out['steps_s'] * 1e3:.1f} ms)"
        except RuntimeError as e:
            verdict = ("HUNG (stopped)" if "still running" in str(e) else f"FAILED: {e}")
        finally:
            if v == "prefetch-eager":
                if old is None:
                    os.environ.pop("CUDA_MODULE_LOADING", None)
                else:
                    os.environ["CUDA_MODULE_LOADING"] = old
        rows.append((v, verdict, time.monotonic() - t0))
        print(f"  {v:<15} {verdict}  [{rows[-1][2]:.1f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
