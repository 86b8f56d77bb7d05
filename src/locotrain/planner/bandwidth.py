"""The inter-worker bandwidth at which an algorithm's compute utilisation reaches a target
(`loco plan --find-bandwidth`), as the Streaming DiLoCo paper's Table 4 asks it.

Compute utilisation (plan.py, steady state) grows with bandwidth: more bandwidth never makes
a transfer slower in the network model (runtime/network.py: max-min fair rates scale with
every capacity). So the search is a bisection on the bandwidth, in log space (the answers
span 0.1 to 1,000 Gbit/s), to 1%: it returns the lowest bandwidth found whose utilisation
reaches the target, at most 1% above the exact one. Every plan it runs is kept, so the
targets after the first start from a narrower bracket, and the points draw the curve of
plots/utilization.png.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import UserError

TOLERANCE = 1.01  # the answer is at most this factor above the exact bandwidth


class BandwidthSearch:
    """Compute utilisation as a function of bandwidth for one plan variant, with memory."""

    def __init__(self, utilization_at: Callable[[float], float], name: str,
                 lo: float, hi: float):
        if not 0 < lo < hi:
            raise UserError(f"plan.min_gbps and plan.max_gbps must satisfy 0 < min < max, got "
                            f"{lo} and {hi}")
        self.f, self.name, self.lo, self.hi = utilization_at, name, lo, hi
        self.points: dict[float, float] = {}  # Gbit/s -> compute utilisation

    def at(self, gbps: float) -> float:
        if gbps not in self.points:
            self.points[gbps] = self.f(gbps)
        return self.points[gbps]

    def find(self, target: float) -> float:
        """The bandwidth (Gbit/s) at which compute utilisation reaches `target`."""
        below = [g for g, u in self.points.items() if u < target]
        above = [g for g, u in self.points.items() if u >= target]
        lo = max(below, default=self.lo)
        hi = min(above, default=self.hi)
        if not above and self.at(hi) < target:
            best = max(self.points.items(), key=lambda p: (p[1], -p[0]))
            raise UserError(
                f"compute utilisation {target:g} is out of reach for {self.name}: the best found "
                f"is {best[1]:.4f}, at {best[0]:g} Gbit/s (plan.max_gbps = {self.hi:g}); "
                "latency or the algorithm's blocking communication caps it, so lower the "
                "target or change the plan (larger H, overlap, less latency)")
        if lo == self.lo and lo not in self.points and self.at(lo) >= target:
            return lo  # already there at the bottom of the range (plan.min_gbps)
        while hi / lo > TOLERANCE:
            mid = math.sqrt(lo * hi)
            if self.at(mid) >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def curve(self) -> list[tuple[float, float]]:
        return sorted(self.points.items())


def parse_targets(text: str) -> list[tuple[str, float]]:
    """'0.5,0.8,0.99' -> [('0.5', 0.5), ...]: each target as written and its value."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise UserError(f"--find-bandwidth takes compute utilisations in (0, 1], such as "
                            f"0.5,0.9,0.99; got '{item}'")
        out.append((item, value))
    if len({v for _, v in out}) != len(out):
        raise UserError(f"--find-bandwidth lists a target twice: {text}")
    return out
