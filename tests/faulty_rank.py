"""A rank entry point for fault-injection tests:

    python tests/faulty_rank.py RANK STEPS <the arguments of python -m locotrain.distributed>

runs a rank as `locotrain.distributed` does, except that rank RANK exits abruptly after
STEPS inner steps (no goodbye, as a killed process would). The launcher gets this command
from the test (runtime.launch.launch's `entry`), so the fault lives here, not in the
project's code."""

import os
import sys

from locotrain import distributed
from locotrain.runtime.engine import Engine

rank, steps = int(sys.argv[1]), int(sys.argv[2])
if int(os.environ["RANK"]) == rank:
    original = Engine._run

    def run(engine, group):
        original(engine, group)
        if sum(row.steps for row in engine.rows) >= steps:
            os._exit(17)

    Engine._run = run
sys.exit(distributed.main(sys.argv[3:]))
