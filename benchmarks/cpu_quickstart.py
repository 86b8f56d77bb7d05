"""The quickstart on this machine's CPU with each engine and thread count, idle or loaded.

    python benchmarks/cpu_quickstart.py --json results.json [--load N] [--runs 1]

Runs `loco run quickstart` (and optionally `loco compare quickstart`) as a user would, in a
fresh process each time, and records the wall time, the final bpc and the load average.
--load N starts N busy-looping processes for the duration (a machine "doing something
else"), so idle and loaded numbers come from the same script.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def burn(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "locotrain", *args], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return time.perf_counter() - started, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    ap.add_argument("--compare", action="store_true", help="also time `loco compare quickstart`")
    ap.add_argument("--cases", default="batched,sequential",
                    help="engine[@threads],...: threads = train.threads (0 = from the load)")
    args = ap.parse_args()
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,)) for _ in range(args.load)]
    for b in burners:
        b.start()
    results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load": args.load,
               "runs": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in args.cases.split(","):
                engine, _, threads = case.partition("@")  # e.g. batched@2: train.threads = 2
                extra = ["--set", f"train.threads={threads}"] if threads else []
                load_before = os.getloadavg()[0]
                seconds, line = run(["run", "quickstart", "--quiet", "--out", f"{tmp}/{case}",
                                     "--set", f"runtime.engine={engine}", *extra], os.environ)
                results["runs"].append({"command": f"loco run quickstart --set runtime.engine={engine}"
                                        + (f" --set train.threads={threads}" if threads else ""),
                                        "seconds": round(seconds, 1), "output": line,
                                        "loadavg_before": load_before})
                print(json.dumps(results["runs"][-1]), flush=True)
            if args.compare:
                seconds, line = run(["compare", "quickstart", "--quiet", "--out", f"{tmp}/cmp"], os.environ)
                results["runs"].append({"command": "loco compare quickstart", "seconds": round(seconds, 1)})
                print(json.dumps(results["runs"][-1]), flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join()
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
