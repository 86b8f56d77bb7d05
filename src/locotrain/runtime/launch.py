"""`loco launch`: run a config on real processes on this machine.

It spawns one process per algorithm process (workers, then servers) with the environment
torchrun gives its ranks (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and hosts
the rendezvous store itself, as torchrun's agent does. Unlike torchrun it does not tear the
whole group down when one rank dies: an asynchronous server carries on without a dead
worker, and a synchronous run fails on its own within `runtime.timeout_s`; after that the
launcher kills whatever is left, so no process outlives it. For several machines use torchrun
with `-m locotrain.runtime.torchdist` (docs/runtime.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ..config import to_toml
from ..errors import UserError
from ..metrics import atomic_write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg, out: Path, nproc: int | None, force: bool) -> int:
    """Returns the exit code: 0 when the run folder was written."""
    from ..run import build, prepare_out_dir

    setup = build(cfg)
    procs = setup.algorithm.processes()
    n = len(procs)
    if nproc is not None and nproc != n:
        raise UserError(f"{cfg.algorithm.name} on this cluster runs {n} processes ({setup.job.M} "
                        f"workers + {n - setup.job.M} server(s)); --nproc says {nproc}")
    prepare_out_dir(out, force)
    atomic_write(out / "config.toml", to_toml(cfg))
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    threads = max(1, (os.cpu_count() or 1) // n)
    gpu_ranks = setup.job.M if cfg.runtime.server_device == "cpu" else n
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": str(threads), "LOCOTRAIN_THREADS": str(threads),
            "LOCOTRAIN_GPU_RANKS": str(gpu_ranks)}
    cmd = [sys.executable, "-m", "locotrain.runtime.torchdist", str(out / "config.toml"),
           "--out", str(out), "--prepared"]
    children = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                 start_new_session=True) for r in range(n)]
    codes: dict[int, int] = {}
    deadline = None
    try:
        while len(codes) < n:
            for r, child in enumerate(children):
                if r not in codes and child.poll() is not None:
                    codes[r] = child.returncode
                    if child.returncode != 0:
                        print(f"loco launch: process {procs[r].name} (rank {r}) exited with "
                              f"code {child.returncode}", file=sys.stderr)
                        if deadline is None:  # give the others time to notice and finish
                            deadline = time.monotonic() + cfg.runtime.timeout_s + 15
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("loco launch: interrupted; stopping every process", file=sys.stderr)
    finally:
        _stop(children)
        del store
    return 0 if (out / "summary.json").is_file() else 1


def _stop(children: list[subprocess.Popen]) -> None:
    """Terminate, then kill, every child still running (and its process group)."""
    alive = [c for c in children if c.poll() is None]
    for c in alive:
        os.killpg(c.pid, signal.SIGTERM)
    end = time.monotonic() + 5
    for c in alive:
        try:
            c.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(c.pid, signal.SIGKILL)
            c.wait()
