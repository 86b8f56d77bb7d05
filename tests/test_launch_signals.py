"""`loco launch` and its ranks as processes: what listens where, what survives a signal to the
launcher (nothing), a stopped worker, and ranks that lose their peers. Every process these
tests start runs on this machine and talks over 127.0.0.1 only; each is killed at the end."""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import TINY

# gloo on the CPU on any machine: NCCL has deadlines of its own (docs/runtime.md, Failures)
BASE = list(TINY) + ["cluster.preset=two-datacenters", "cluster.size=2", "runtime.timeout_s=20",
                     "train.device=cpu"]
FOREVER = ["train.tokens=100000000", "eval.every=100000000"]  # ends only when told to


class Launch:
    """`loco launch` in its own session, with output in files (a full pipe would block it)."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.out, self.log = tmp_path / "run", tmp_path / "launcher.log"
        args = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet",
                "--out", str(self.out)]
        for o in BASE + list(overrides):
            args += ["--set", o]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.ranks: dict[int, int] = {}  # rank -> pid, as they are found

    def find_ranks(self, n: int, timeout: float = 120) -> dict[int, int]:
        """Wait until the n ranks exist and each listens for messages (so it has rendezvoused)."""
        def ready():
            self.ranks = {_rank(p): p for p in _pids() if _ppid(p) == self.proc.pid and _rank(p) >= 0}
            return len(self.ranks) == n and all(_listening(p) for p in self.ranks.values())
        _wait_for(ready, timeout, lambda: f"{n} ranks listening; log:\n{self.text()}")
        return self.ranks

    def text(self) -> str:
        return self.log.read_text()

    def kill_all(self) -> None:
        for pid in [self.proc.pid, *self.ranks.values()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def launches():
    started = []
    yield lambda *a: started.append(Launch(*a)) or started[-1]
    for launch in started:
        launch.kill_all()


# -- /proc ------------------------------------------------------------------------------------

def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else -1


def _alive(pid: int) -> bool:
    """Running or stopped; not gone, not a zombie waiting for a reaper."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _rank(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        return int(env[b"RANK"]) if b"LOCOTRAIN_LAUNCHER_PID" in env else -1
    except (OSError, KeyError, ValueError):
        return -1


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _listening(pid: int) -> list[ipaddress._BaseAddress]:
    """The addresses `pid`'s listening TCP sockets are bound to."""
    inodes, found = _socket_inodes(pid), []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(ipaddress.ip_address(raw))
    return found


def _loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _wait_for(condition, timeout: float, what) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.1)


# -- tests ------------------------------------------------------------------------------------

def test_everything_listens_on_loopback_and_sigterm_ends_every_rank(tmp_path, launches):
    launch = launches(tmp_path, *FOREVER)
    ranks = launch.find_ranks(2)
    addresses = {pid: _listening(pid) for pid in [launch.proc.pid, *ranks.values()]}
    assert addresses[launch.proc.pid], "the launcher's store should be listening"
    assert all(_loopback(a) for found in addresses.values() for a in found), addresses
    os.kill(launch.proc.pid, signal.SIGTERM)
    assert launch.proc.wait(60) == 128 + signal.SIGTERM
    assert "got SIGTERM; stopping every process" in launch.text()
    assert not any(_alive(pid) for pid in ranks.values())


def test_sigkill_of_the_launcher_takes_every_rank_with_it(tmp_path, launches):
    launch = launches(tmp_path, *FOREVER)
    ranks = launch.find_ranks(2)
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.proc.wait(10)
    _wait_for(lambda: not any(_alive(pid) for pid in ranks.values()), 10,
              lambda: f"ranks to die with the launcher: {ranks}")


def test_a_killed_worker_ends_a_synchronous_run_and_each_failure_is_one_line(tmp_path, launches):
    launch = launches(tmp_path, *FOREVER, "runtime.timeout_s=5")
    ranks = launch.find_ranks(2)
    os.kill(ranks[1], signal.SIGKILL)
    assert launch.proc.wait(120) == 1  # the launcher let w0 end on its own
    text = launch.text()
    assert "process w1 (rank 1) was killed by SIGKILL" in text
    assert "process w0 (rank 0) exited with code 1" in text
    assert "loco: w0: all-reduce failed or did not complete" in text
    assert "Traceback" not in text and "frame #" not in text
    assert not any(_alive(pid) for pid in ranks.values())


def test_a_rank_that_loses_its_peers_says_so_in_one_line(tmp_path):
    # Rank 0 of 2 with a store but no rank 1: the rendezvous cannot complete.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
        listener.detach()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
           "LOCOTRAIN_SECRET": "a-secret-for-tests-only-0123456789", "LOCOTRAIN_THREADS": "1"}
    args = [sys.executable, "-m", "locotrain.distributed", "quickstart", "--out",
            str(tmp_path / "run")]
    for o in BASE[:-1] + ["runtime.timeout_s=3"]:
        args += ["--set", o]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    del store
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("loco: rank 0: lost contact with the other processes"), lines
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr


def test_no_rank_starts_without_a_secret_unless_loco_launch_can_make_one_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LOCOTRAIN_SECRET"}
    env |= {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "locotrain.distributed", "quickstart"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "LOCOTRAIN_SECRET" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # `loco launch` makes up a secret only when every rank is on loopback
    launch = subprocess.run([sys.executable, "-m", "locotrain", "launch", "quickstart",
                             "--out", str(tmp_path / "x"), "--set", "runtime.host=192.0.2.1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert launch.returncode == 2 and "LOCOTRAIN_SECRET" in launch.stderr, launch.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_stopped_worker_is_declared_dead_and_the_run_ends(tmp_path, launches):
    launch = launches(tmp_path, "algorithm.name=async_local_sgd", "algorithm.H=4",
                      "train.tokens=262144", "eval.every=131072", "runtime.timeout_s=5")
    ranks = launch.find_ranks(3)  # w0, w1, the server
    os.kill(ranks[1], signal.SIGSTOP)
    assert launch.proc.wait(180) == 0, launch.text()[-3000:]
    summary = json.loads((launch.out / "summary.json").read_text())
    assert summary["dead_processes"] == ["w1"]
    assert "process w1 (rank 1) was stopped (SIGSTOP)" in launch.text()
    assert not any(_alive(pid) for pid in ranks.values())


def test_a_synchronous_run_that_lost_a_rank_is_stopped_if_the_others_hang(capsys):
    from locotrain.runtime.launch import _wait

    procs = [type("P", (), {"name": f"w{i}"}) for i in range(3)]
    children = [subprocess.Popen(["sleep", "60"], start_new_session=True),  # hangs
                subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),  # fails
                subprocess.Popen([sys.executable, "-c", "pass"])]  # finishes
    try:
        _wait(children, procs, give_up_s=1.0)
    finally:
        children[0].kill()
    err = capsys.readouterr().err.splitlines()
    assert "loco launch: process w1 (rank 1) exited with code 3" in err
    assert ("loco launch: process w0 (rank 0) was still running 1 s after w1 failed, which a "
            "synchronous run cannot finish without; stopped it") in err
    assert len(err) == 2  # w2 ended well
    assert children[0].returncode == -signal.SIGTERM
