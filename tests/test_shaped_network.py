"""Real processes in two network namespaces joined by a 20 Mbit/s veth link (tbf), against the
simulator's prediction for the same cluster. Slow (about a minute): run with -m slow."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
                       reason="building network namespaces needs root and iproute2 (ip, tc)"),
]


def test_wall_time_on_a_shaped_link_matches_the_simulator(tmp_path):
    from shaped_network import measure

    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    rows = measure(20.0, tmp_path)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert before == after  # nothing left behind
    for row in rows:
        assert row["bytes_real"] == row["bytes_sim"], row
        assert abs(row["error"]) < 0.15, row
