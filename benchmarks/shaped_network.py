"""Real processes on a shaped network against the simulator's prediction.

    sudo python benchmarks/shaped_network.py [--mbit 20] [--out DIR]

Two ranks run in two network namespaces joined by a veth pair whose both ends are limited to
`--mbit` with the tbf queueing discipline (no netem here: latency is the veth's, ~0). For
DiLoCo and data-parallel it measures the run's wall time (the last rank's end of training,
excluding the final evaluation and writing) and asks the simulator for the same cluster
description: two regions joined by the shaped link, the measured step time of the workers.
Prints measured, predicted and the error; namespaces are always removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from locotrain.config import load_config, to_toml  # noqa: E402
from locotrain.run import simulate  # noqa: E402

BASE = [
    "model.depth=2", "model.width=64", "model.heads=2", "model.seq_len=32", "train.batch_size=8",
    "eval.every=100000000", "eval.windows=4", "sample.chars=20", "data.train_fraction=0.99",
    "cluster.preset=custom", "cluster.regions=['a', 'b']", "cluster.latency_s=[[0.0, 0.0], [0.0, 0.0]]",
    "cluster.workers=[{region='a'}, {region='b'}]", "runtime.timeout_s=60",
]
RUNS = {
    "ddp": ["algorithm.name=ddp", "train.tokens=40960"],  # 80 steps of 2 x 8 x 32
    "diloco H=10": ["algorithm.name=diloco", "algorithm.H=10", "train.tokens=81920"],  # 160 steps
}


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True)


class Namespaces:
    """Two namespaces ns0/ns1 joined by veth a0/a1 at 10.123.0.1/.2, tbf on both ends."""

    def __init__(self, mbit: float):
        tag = os.getpid() % 10000
        self.ns = [f"loco{tag}n0", f"loco{tag}n1"]
        self.dev = [f"lc{tag}a0", f"lc{tag}a1"]
        self.ip = ["10.123.0.1", "10.123.0.2"]
        self.mbit = mbit

    def __enter__(self):
        for ns in self.ns:
            sh(f"ip netns add {ns}")
        sh(f"ip link add {self.dev[0]} type veth peer name {self.dev[1]}")
        for i in range(2):
            ns, dev = self.ns[i], self.dev[i]
            sh(f"ip link set {dev} netns {ns}")
            sh(f"ip -n {ns} addr add {self.ip[i]}/24 dev {dev}")
            sh(f"ip -n {ns} link set {dev} up && ip -n {ns} link set lo up")
            sh(f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {self.mbit}mbit "
               f"burst 32kb latency 1s")
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def run_ranks(self, config: Path, out: Path, port: int) -> list[tuple[int, str]]:
        procs = []
        for r in range(2):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                   "MASTER_ADDR": self.ip[0], "MASTER_PORT": str(port),
                   "GLOO_SOCKET_IFNAME": self.dev[r], "LOCOTRAIN_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.ns[r], sys.executable, "-m",
                 "locotrain.distributed", str(config), "--out", str(out), "--force"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return [_finish(p) for p in procs]


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    output = p.communicate(timeout=600)[0]
    return p.returncode, output


def measure(mbit: float, workdir: Path) -> list[dict]:
    rows = []
    with Namespaces(mbit) as net:
        for i, (name, extra) in enumerate(RUNS.items()):
            _, cfg = load_config("quickstart", BASE + extra + [
                f"cluster.bandwidth_gbps=[[0.0, {mbit / 1000}], [{mbit / 1000}, 0.0]]"])
            config = workdir / f"{i}.toml"
            config.write_text(to_toml(cfg))
            out = workdir / f"run{i}"
            results = net.run_ranks(config, out, 29600 + i)
            if any(code for code, _ in results):
                raise RuntimeError(f"{name} failed:\n" + "\n".join(text for _, text in results))
            real = json.loads((out / "summary.json").read_text())
            steps = real["step_time_by_worker_s"]
            _, sim_cfg = load_config(str(config), [f"cluster.step_time_s={sum(steps) / len(steps)}"])
            sim = simulate(sim_cfg).summary
            rows.append({"run": name, "mbit": mbit, "measured_s": real["time_s"],
                         "predicted_s": sim["sim_time_s"], "step_time_s": steps,
                         "bytes_real": real["bytes_sent"], "bytes_sim": sim["bytes_sent"],
                         "error": real["time_s"] / sim["sim_time_s"] - 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbit", type=float, default=20.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.mbit, Path(tmp))
    print(f"{'run':<14}{'Mbit/s':>8}{'measured s':>12}{'predicted s':>13}{'error':>8}{'bytes':>12}")
    for r in rows:
        print(f"{r['run']:<14}{r['mbit']:>8.0f}{r['measured_s']:>12.2f}{r['predicted_s']:>13.2f}"
              f"{r['error']:>+8.1%}{r['bytes_real']:>12,}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
