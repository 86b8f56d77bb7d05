"""`loco launch`: run a config on real processes on this machine.

It spawns one process per algorithm process (workers, then servers) with the environment
torchrun gives its ranks (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and hosts
the rendezvous store itself, as torchrun's agent does, on loopback. Unlike torchrun it does
not tear the whole group down when one rank dies: an asynchronous server carries on without a
dead worker, and ranks have deadlines of their own (gloo collectives and silent peers time out
after `runtime.timeout_s`), so the launcher waits for the ranks to end and prints one line for
each that failed. It stops ranks itself only when it is told to stop (SIGINT, SIGTERM,
SIGHUP), when a rank is stopped (SIGSTOP) and every other one has ended, or when a synchronous
run has lost a rank and the others are still running `runtime.timeout_s` + 15 s later (an
NCCL collective can wait forever for a dead peer); it says why each time. A rank dies with the
launcher even when the launcher is killed outright (SIGKILL). For several machines use
torchrun with `-m locotrain.distributed` (docs/runtime.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from ..config import to_toml
from ..errors import UserError
from ..files import atomic_write
from ..outputs import prepare_out_dir
from .transport import SECRET_ENV, is_loopback, resolve_secret

LAUNCHER_ENV = "LOCOTRAIN_LAUNCHER_PID"  # set in the ranks: die when this process dies
PROGRESS_ENV = "LOCOTRAIN_PROGRESS"  # "1": the rank that publishes the model shows progress
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping the ranks


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def launch(cfg, out: Path, procs: list, workers: int, synchronous: bool, nproc: int | None,
           force: bool, entry: list[str] | None = None, resume: bool = False,
           progress: bool = False) -> int:
    """Run the config's processes `procs` (the algorithm's, from the caller: this module
    imports no algorithm), of which the first `workers` are workers. `entry` is the command
    each rank runs, `python -m locotrain.distributed` unless a test passes its own (fault
    injection lives in the tests, not here). Returns the exit code: 0 when the run folder was
    written, 128 + N on signal N."""
    n = len(procs)
    if nproc is not None and nproc != n:
        raise UserError(f"{cfg.algorithm.name} on this cluster runs {n} processes ({workers} "
                        f"workers + {n - workers} server(s)); --nproc says {nproc}")
    # Messages between ranks are authenticated. When every rank listens on loopback a secret
    # made up for this run keeps out other local users; a non-loopback runtime.host means the
    # ranks are reachable from elsewhere, and then the user must choose the secret.
    secret = cfg.runtime.secret or os.environ.get(SECRET_ENV, "")
    if secret or (cfg.runtime.host and not is_loopback(cfg.runtime.host)):
        secret = resolve_secret(secret)
    else:
        secret = secrets.token_hex(32)
    # The children read the secret from their environment; it never goes into the run folder.
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, secret=""))
    if not resume:  # a resumed run continues in its folder, from its config.toml
        prepare_out_dir(out, force)
        atomic_write(out / "config.toml", to_toml(cfg))

    # torch's TCPStore has no bind address: given a host name it still listens on every
    # interface. It does take a socket we already bound (master_listen_fd), so the store
    # listens on loopback only, and the port is ours from the start (no free-port race).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
        listener.detach()  # the store owns the socket now, and closes it
    threads = max(1, (os.cpu_count() or 1) // n)
    gpu_ranks = workers if cfg.runtime.server_device == "cpu" else n
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": str(threads), "LOCOTRAIN_THREADS": str(threads),
            "LOCOTRAIN_GPU_RANKS": str(gpu_ranks), SECRET_ENV: secret,
            LAUNCHER_ENV: str(os.getpid()), PROGRESS_ENV: "1" if progress else "0"}
    if not cfg.runtime.host or is_loopback(cfg.runtime.host):
        # Left alone, gloo listens on the address the host name resolves to and NCCL on the
        # first non-loopback interface, and neither authenticates: keep them on loopback too.
        lo = _loopback_interface()
        if lo:
            base.setdefault("GLOO_SOCKET_IFNAME", lo)
            base.setdefault("NCCL_SOCKET_IFNAME", lo)
    cmd = (entry or [sys.executable, "-m", "locotrain.distributed"]) + [
        str(out / "config.toml"), "--out", str(out), "--prepared"] + (["--resume"] if resume else [])
    children: list[subprocess.Popen] = []
    previous = {}
    grace = _GRACE_S
    try:
        if threading.current_thread() is threading.main_thread():  # (signals need it)
            for s in _STOP_SIGNALS:
                previous[s] = signal.signal(s, _raise_stopped)
        # Own sessions: a Ctrl-C in the terminal reaches the launcher only, which stops the
        # ranks in order (and their process groups with them, e.g. compile workers), instead
        # of every rank printing its own KeyboardInterrupt at once.
        for r in range(n):
            children.append(subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                             start_new_session=True))
        # A synchronous run cannot finish without every worker, and not every backend ends
        # on its own when one is gone (a rank blocked in NCCL can wait forever).
        give_up = cfg.runtime.timeout_s + 15 if synchronous else None
        _wait(children, procs, give_up)
    except _Stopped as e:
        # The ranks stop at their next common checkpoint (SIGTERM asks them to): a
        # synchronous run's next common cut (dist_checkpoint.py) takes up to a round, a
        # snapshot of a parameter-server run (dist_snapshot.py) up to a task: that long.
        grace = cfg.runtime.timeout_s
        print(f"loco launch: got {e}; stopping every process at its next checkpoint "
              f"(within runtime.timeout_s = {grace:g} s)", file=sys.stderr)
        return 128 + e.signum  # after `finally` has stopped them
    finally:
        for s in previous:  # a late signal must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        stop_children(children, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
        del store
    return 0 if (out / "summary.json").is_file() else 1


def _wait(children: list[subprocess.Popen], procs, give_up_s: float | None) -> None:
    """Until every rank has ended; one line for each that failed. With `give_up_s`, ranks
    still running that long after one failed are stopped (a synchronous run cannot finish)."""
    codes: dict[int, int] = {}
    why: dict[int, str] = {}
    failed_at = None
    while len(codes) < len(children):
        for r, child in enumerate(children):
            if r in codes or child.poll() is None:
                continue
            codes[r] = child.returncode
            if child.returncode:
                failed_at = failed_at or (time.monotonic(), procs[r].name)
                reason = why.get(r) or (f"exited with code {child.returncode}" if child.returncode > 0
                                        else f"was killed by {signal.Signals(-child.returncode).name}")
                print(f"loco launch: process {procs[r].name} (rank {r}) {reason}", file=sys.stderr)
        left = [r for r in range(len(children)) if r not in codes and r not in why]
        # A stopped rank (SIGSTOP) cannot end on its own. Its peers declare it dead after
        # runtime.timeout_s; once every other rank has ended, nothing is left to resume it for.
        if codes and left and all(_stopped(children[r].pid) for r in left):
            for r in left:
                why[r] = "was stopped (SIGSTOP) when every other process had ended; killed it"
                _signal_group(children[r], signal.SIGKILL)
        elif left and 2 in codes.values():  # a rank found the config or the folder unusable:
            # the others cannot make a run of it (a resumed server waits on ranks that quit)
            first = procs[next(r for r, c in codes.items() if c == 2)].name
            for r in left:  # killed: on SIGTERM a rank would checkpoint a run gone wrong
                why[r] = f"was stopped: {first} could not run (exit code 2)"
                _signal_group(children[r], signal.SIGKILL)
        elif give_up_s is not None and failed_at and time.monotonic() > failed_at[0] + give_up_s:
            for r in left:
                why[r] = (f"was still running {give_up_s:g} s after {failed_at[1]} failed, "
                          "which a synchronous run cannot finish without; stopped it")
            stop_children([children[r] for r in left])
        time.sleep(0.1)


def stop_children(children: list[subprocess.Popen], grace_s: float = _GRACE_S) -> None:
    """Terminate, then kill `grace_s` later, every child still running (and its process
    group)."""
    alive = [c for c in children if c.poll() is None]
    for c in alive:
        _signal_group(c, signal.SIGTERM)
        _signal_group(c, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    end = time.monotonic() + grace_s
    for c in alive:
        try:
            c.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(c, signal.SIGKILL)
            c.wait()


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def _stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (Linux /proc; elsewhere: never known)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name in ("lo", "lo0")), None)


def die_with_launcher() -> None:
    """In a rank that `loco launch` started: end when the launcher ends, however it ends.

    The launcher stops its ranks when it is interrupted or terminated, but nothing runs in a
    process killed with SIGKILL. So each rank asks Linux for SIGKILL when its parent dies
    (PR_SET_PDEATHSIG; the rank is spawned from the launcher's main thread, which lives as long
    as the launcher). It does so here rather than in a preexec_fn, which is unsafe in a process
    with threads (the store's). The launcher may have died before this ran (starting Python
    and importing torch take seconds): then this process already has another parent, and ends.
    """
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher):
        print("loco: the launcher that started this process is gone; exiting", file=sys.stderr)
        os._exit(1)
