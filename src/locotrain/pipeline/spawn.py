"""Start one process per pipeline stage on this machine and collect rank 0's report.

    report = spawn(job)          # job: distributed.Job; blocks until every rank has ended

Everything listens on loopback only: the rendezvous store is hosted here on a socket bound to
127.0.0.1 (torch's TCPStore, given a host name, would listen on every interface, but it takes
a socket already bound), and gloo and NCCL are pointed at the loopback interface. Nothing is
left behind: each rank runs in its own session, dies with this process even when it is
killed outright (runtime.launch.die_with_launcher), and when one rank fails the others get
`grace_s` to end on their own before they are stopped (a rank blocked in a receive from a dead
peer may never notice), as they are on a timeout or an interrupt.

torchrun works as well (`torchrun --nproc-per-node S -m locotrain.pipeline.distributed JOB.pt
RESULT.pt`, with a job saved by `save_job`); then binding to loopback is torchrun's business
(`--master-addr 127.0.0.1`, GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.launch import LAUNCHER_ENV, stop_children
from .distributed import Job, check_job


def save_job(job: Job, path: str | Path) -> None:
    torch.save(job, path)


def spawn(job: Job, nproc: int | None = None, *, timeout_s: float = 600.0,
          grace_s: float = 5.0, entry: list[str] | None = None, quiet: bool = False) -> dict:
    """Run `job` on `nproc` processes (default: one per stage). `entry` is the command a rank
    runs, `python -m locotrain.pipeline.distributed` unless a test injects a fault; the job
    and result files are appended. Rank 0's stdout is this process's, and a failed rank's
    stderr is shown, unless `quiet`.
    Bad input raises UserError (one line) before anything starts; a failed rank, RuntimeError
    with the last line it wrote to stderr."""
    nproc = job.stages if nproc is None else nproc
    check_job(job, nproc)
    entry = entry or [sys.executable, "-m", "locotrain.pipeline.distributed"]
    with tempfile.TemporaryDirectory(prefix="locotrain-pipeline-") as tmp:
        tmp = Path(tmp)
        job_file, result_file = tmp / "job.pt", tmp / "result.pt"
        save_job(job, job_file)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                  master_listen_fd=listener.fileno())
            listener.detach()  # the store owns the socket now
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               # the ranks join the store hosted here instead of rank 0 hosting one
               "TORCHELASTIC_USE_AGENT_STORE": "True",
               "OMP_NUM_THREADS": str(threads), LAUNCHER_ENV: str(os.getpid())}
        if "lo" in [name for _, name in socket.if_nameindex()]:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        procs: list[subprocess.Popen] = []
        with contextlib.ExitStack() as logs_open:
            logs = [logs_open.enter_context(open(tmp / f"rank{r}.err", "wb"))
                    for r in range(nproc)]
            try:
                for r in range(nproc):
                    procs.append(subprocess.Popen(
                        entry + [str(job_file), str(result_file)],
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                        stdout=subprocess.DEVNULL if quiet or r else None, stderr=logs[r],
                        start_new_session=True))
                failed, timed_out = _wait(procs, timeout_s, grace_s)
            finally:
                stop_children(procs, grace_s=3.0)
                del store
        if failed is not None:
            r, code = failed
            if not quiet:  # the whole story, for whoever reads the terminal
                tail = (tmp / f"rank{r}.err").read_text(errors="replace").splitlines()[-30:]
                print("\n".join([f"--- stderr of pipeline rank {r} (end) ---", *tail]),
                      file=sys.stderr)
            raise RuntimeError(f"pipeline rank {r} failed (exit code {code}): "
                               f"{_last_line(tmp / f'rank{r}.err')}")
        if timed_out:
            raise RuntimeError(f"pipeline ranks still running after {timeout_s:g} s; stopped them")
        return torch.load(result_file, weights_only=False)


def _wait(procs: list[subprocess.Popen], timeout_s: float, grace_s: float):
    """Until every rank has ended, one has failed and the others had `grace_s` to end, or the
    timeout. Returns ((rank, code) of the first failure or None, timed out)."""
    deadline = time.monotonic() + timeout_s
    failed, failed_at = None, None
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed, failed_at = bad[0], time.monotonic()
        if all(c is not None for c in codes):
            return failed, False
        now = time.monotonic()
        if failed is not None and now > failed_at + grace_s:
            return failed, False
        if now > deadline:
            return failed, True
        time.sleep(0.05)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(nothing on stderr)"
