"""A rank entry point for fault-injection tests:

    python tests/faulty_rank.py RANK STEPS <the arguments of python -m locotrain.distributed>
    python tests/faulty_rank.py RANK term:STEPS <...>

runs a rank as `locotrain.distributed` does, except that rank RANK, after STEPS inner steps,
either exits abruptly (no goodbye, as a killed process would), or (`term:`) sends SIGTERM to
the launcher, as a user stopping the run would, and holds still until the launcher has
passed the signal on to every rank, so that the stop lands mid-run on any machine. The
launcher gets this command from the test (runtime.launch.launch's `entry`), so the fault
lives here, not in the project's code."""

import os
import signal
import sys
import time

from locotrain import distributed
from locotrain.runtime.engine import Engine

rank, when = int(sys.argv[1]), sys.argv[2]
stop_launcher = when.startswith("term:")
steps = int(when.removeprefix("term:"))
if int(os.environ["RANK"]) == rank:
    original = Engine._run
    fired = []

    def run(engine, group):
        original(engine, group)
        if sum(row.steps for row in engine.rows) < steps or fired:
            return
        if not stop_launcher:
            os._exit(17)
        fired.append(True)
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(3.0)  # the launcher polls every 0.1 s; this rank's handler runs meanwhile

    Engine._run = run
sys.exit(distributed.main(sys.argv[3:]))
