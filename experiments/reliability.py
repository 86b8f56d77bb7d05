"""Faults injected, runs completed, tokens lost, time to detect and to recover, and what a
checkpoint costs; the tables of docs/reliability.md.

    python experiments/reliability.py --out docs/results/reliability

Simulation: every algorithm on two-datacenters (4 workers, quickstart-size model), one
worker crashing mid-run and restarting 30 s later (cluster.on_crash = "wait"; for the
parameter-server algorithms, ddp and diloco also "drop", in which the process dies and comes
back fresh: the servers give its task back, the synchronous group re-forms without it).
Real runs (CPU, gloo, loopback): a worker killed (SIGKILL) mid-run and a worker stopped
(SIGSTOP), with runtime.timeout_s = 10; the time to detect is when the survivors' log says
so, after the fault. Snapshots: real parameter-server runs stopped (SIGTERM) or killed
(SIGKILL of the launcher) after their first scheduled snapshot, then resumed. Checkpoints:
the seconds and bytes of one checkpoint of the quickstart and of the nanoGPT-size model
(two-datacenters preset), on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from locotrain.config import load_config
from locotrain.run import Simulation, engine_for, simulate

SMALL = ["train.tokens=262144", "eval.windows=50", "sample.chars=20", "cluster.size=4",
         "cluster.step_time_s=0.05"]
ALGORITHMS = {"ddp": [], "diloco": ["algorithm.H=20"], "streaming": ["algorithm.H=20",
              "algorithm.fragments=2", "algorithm.tau=1"], "eager": ["algorithm.H=20"],
              "overlap_local_sgd": ["algorithm.H=20"], "async_local_sgd": ["algorithm.H=20"],
              "halos": ["algorithm.H=20", "algorithm.K=4"]}


def simulated() -> list[dict]:
    rows = []
    for name, extra in ALGORITHMS.items():
        base = ["algorithm.name=" + name, *extra, *SMALL]
        plain = simulate(load_config("quickstart", base)[1]).summary
        modes = ["wait"] + (["drop"] if name in ("ddp", "diloco", "async_local_sgd", "halos") else [])
        for mode in modes:
            crash_at = round(plain["sim_time_s"] / 2, 2)
            cfg = load_config("quickstart", base + [
                f"cluster.on_crash={mode}",
                f"cluster.crashes=[{{worker=1, at_s={crash_at}, restart_after_s=30.0}}]"])[1]
            s = simulate(cfg).summary
            rows.append({"algorithm": name, "on_crash": mode, "faults": 1, "completed": True,
                         "crash_at_s": crash_at, "down_s": 30.0,
                         "sim_time_s": s["sim_time_s"], "sim_time_without_s": plain["sim_time_s"],
                         "tokens_trained": s["tokens_trained"], "tokens_in_model": s["tokens_in_model"],
                         "tokens_lost": s["tokens_lost"], "final_val_bpc": s["final_val_bpc"],
                         "final_val_bpc_without": plain["final_val_bpc"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _rank_pids(out: Path) -> dict[int, int]:
    """RANK -> pid of the ranks of the `loco launch` writing to `out`."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"locotrain.distributed" in b" ".join(cmd) and str(out).encode() in b" ".join(cmd):
            for kv in env:
                if kv.startswith(b"RANK="):
                    pids[int(kv[5:])] = int(entry.name)
    return pids


def real(fault: str, algorithm: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = ["model.depth=1", "model.width=64", "model.heads=2", "model.seq_len=32",
                "train.batch_size=8", "train.tokens=4000000", "eval.windows=20",
                "sample.chars=10", "cluster.size=2", "runtime.timeout_s=10",
                f"algorithm.name={algorithm}", "algorithm.H=8", "train.threads=1"]
        cmd = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet", "--out",
               str(out)] + sum((["--set", s] for s in sets), [])
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (out / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(3)
        pids = _rank_pids(out)
        fault_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        ended = time.monotonic()
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                if '"log"' in x] if (out / "metrics.jsonl").exists() else []
        detected = next((e["time_s"] for e in logs if "died" in e["text"] or "gone" in e["text"]), None)
        returned = [int(m.group(1).replace(",", "")) for e in logs
                    for m in [re.search(r"([\d,]+) tokens of its task go back", e["text"])] if m]
        return {"algorithm": algorithm, "fault": fault, "exit_code": proc.returncode,
                "completed": summary is not None, "seconds_after_fault_to_end": round(ended - fault_at, 1),
                "log_time_of_detection_s": detected,
                "tokens": summary["tokens"] if summary else None,
                "tokens_in_model": summary["tokens_in_model"] if summary else None,
                "tokens_back_to_budget": sum(returned),
                "dead_processes": summary.get("dead_processes") if summary else None,
                "stderr_tail": err.strip().splitlines()[-2:], "wall_s": round(ended - started, 1)}


def real_resume(algorithm: str) -> dict:
    """A synchronous real run checkpointing every 16 steps of both workers; rank 1 killed
    (SIGKILL) after the first checkpoint, the launcher ends the run, `loco resume` finishes
    it. The resumed model is compared byte for byte with a run never interrupted."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["model.depth=1", "model.width=64", "model.heads=2", "model.seq_len=32",
                "train.batch_size=8", "train.tokens=1048576", "train.checkpoint_every=32768",
                "eval.windows=20", "sample.chars=10", "cluster.size=2", "runtime.timeout_s=10",
                f"algorithm.name={algorithm}", "algorithm.H=8", "train.threads=1"]
        if algorithm == "streaming":
            sets.append("algorithm.fragments=1")  # one block: one fragment

        def launch(out: Path) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet",
                   "--out", str(out)] + sum((["--set", s] for s in sets), [])
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        whole, out = Path(tmp) / "whole", Path(tmp) / "killed"
        started = time.monotonic()
        launch(whole).communicate()
        whole_s = time.monotonic() - started
        proc = launch(out)
        manifest = out / "checkpoint" / "real.json"
        while not manifest.exists() and proc.poll() is None:
            time.sleep(0.05)
        checkpoint_at = time.time()
        time.sleep(0.5)
        pids = _rank_pids(out)
        if 1 not in pids:
            raise RuntimeError(f"no rank 1 to kill: {proc.communicate()}")
        fault_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        ended = time.monotonic()
        redone = round(time.time() - checkpoint_at - (ended - fault_at), 1)
        resumed_at = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out), "--quiet"],
                              capture_output=True, text=True, timeout=600)
        same = ((out / "model.safetensors").exists() and
                (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes())
        return {"algorithm": algorithm, "fault": "kill, then loco resume",
                "launcher_exit_code": proc.returncode, "stderr_tail": err.strip().splitlines()[-1:],
                "seconds_after_fault_to_end": round(ended - fault_at, 1),
                "seconds_of_work_redone": redone, "resume_exit_code": done.returncode,
                "resume_stderr_tail": done.stderr.strip().splitlines()[-2:],
                "resume_wall_s": round(time.monotonic() - resumed_at, 1),
                "uninterrupted_wall_s": round(whole_s, 1), "model_identical": same}


def real_snapshot(algorithm: str, fault: str) -> dict:
    """A parameter-server run on 4 workers snapshotting every 65,536 tokens; once the first
    snapshot is named, the launcher gets SIGTERM (every process stops at a new snapshot) or
    SIGKILL (a preemption without notice: the ranks die with it), then `loco resume`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = ["model.depth=1", "model.width=64", "model.heads=2", "model.seq_len=32",
                "train.batch_size=8", "train.tokens=1048576", "train.checkpoint_every=65536",
                "eval.windows=20", "sample.chars=10", "cluster.size=4", "runtime.timeout_s=10",
                f"algorithm.name={algorithm}", "algorithm.H=8", "algorithm.halos.K=4",
                "train.threads=1"]
        cmd = [sys.executable, "-m", "locotrain", "launch", "quickstart", "--quiet", "--out",
               str(out)] + sum((["--set", s] for s in sets), [])
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        manifest = out / "checkpoint" / "real.json"
        while not manifest.exists() and proc.poll() is None:
            time.sleep(0.05)
        fault_at = time.monotonic()
        if fault == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        ended = time.monotonic()
        gone = time.monotonic() + 30
        while _rank_pids(out) and time.monotonic() < gone:  # they die with the launcher
            time.sleep(0.1)
        snapshot = json.loads(manifest.read_text())["snapshot"]
        resumed_at = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "locotrain", "resume", str(out), "--quiet"],
                              capture_output=True, text=True, timeout=600)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        return {"algorithm": algorithm, "fault": fault, "launcher_exit_code": proc.returncode,
                "seconds_before_fault": round(fault_at - started, 1),
                "seconds_from_fault_to_exit": round(ended - fault_at, 1),
                "snapshot_resumed": snapshot, "stderr_tail": err.strip().splitlines()[-1:],
                "resume_exit_code": done.returncode, "resume_wall_s": round(time.monotonic() - resumed_at, 1),
                **{k: summary.get(k) for k in ("tokens_in_model", "tokens_trained", "tokens_lost")}}


def checkpoint_cost(preset: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, overrides)[1]
        engine = engine_for(cfg)
        sim = Simulation(cfg, engine, Path(tmp) / "run")
        engine.start()
        sim.start()
        started = time.perf_counter()
        sim.checkpoint()
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoint").iterdir())
        return {"preset": preset, "params": sim.setup.workload.num_params(),
                "workers": sim.setup.job.M, "seconds": round(seconds, 3), "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="simulated,checkpoints,real,snapshots",
                    help="which tables to (re)measure; the others are kept from results.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = {
        "simulated": simulated,
        "checkpoints": lambda: [checkpoint_cost("quickstart", []),
                                checkpoint_cost("two-datacenters", ["train.compile=false"])],
        "real": lambda: ([real(f, a) for a in ("diloco", "async_local_sgd") for f in ("kill", "stop")]
                         + [real_resume(a) for a in ("diloco", "streaming")]),
        "snapshots": lambda: [real_snapshot(a, f) for a in ("async_local_sgd", "halos")
                              for f in ("sigterm", "sigkill")],
    }
    for part in args.parts.split(","):
        results.update({"date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0]})
        results[part] = parts[part]()
        print(json.dumps(results[part]), flush=True)
        path.write_text(json.dumps(results, indent=2))  # after each part: a failure keeps the rest


if __name__ == "__main__":
    main()
