"""Network time for the simulated runtime: fluid flows sharing NICs and WAN pipes max-min fairly.

A passive object driven by the event loop: the loop asks `next_time()`, calls `advance(t)` and
gets back the tags of transfers and collectives that completed at t. `send` and `all_reduce`
start new ones at the current virtual time.

The model (this is the contract; tests/test_network.py checks it)

* Hosts are named strings (workers, parameter servers), each in a region.
* Resources. Every host has a NIC with an egress resource ("out", host) and an ingress
  resource ("in", host), both of capacity `cluster.bandwidth[r][r]` for its region r: the
  datacentre fabric is taken as non-blocking, so hosts contend only at their own NICs. Every
  ordered pair of different regions (r, s) has one shared directional WAN pipe
  ("link", r, s) of capacity `cluster.link_bandwidth(r, s, t)`, which varies with traces and
  outages. math.inf capacity means unlimited.
* A message of S bytes from host a (region r) to host b (region s) is one fluid flow over
  {out(a), in(b)}, plus link(r, s) if r != s. It drains its 8 S bits at its current fair
  rate, then completes latency[r][s] seconds later (propagation). Alone on idle resources it
  takes exactly latency[r][s] + 8 S / min(capacities). A message to oneself completes at
  once and sends no bytes.
* Rates are max-min fair (progressive filling) over all flows that are draining, recomputed
  whenever a flow starts, finishes draining, or a capacity breakpoint passes. A flow that
  uses a resource k times consumes k times its rate there. Unlimited resources impose no
  limit; a flow with no finite resource drains instantly. A flow whose fair rate is 0 (an
  outage on its pipe) stalls until capacity returns.
* Ring all-reduce of S bytes per member over M hosts: M == 1 completes at once with no
  bytes. Otherwise the ring is ordered by `ring_order` (hosts grouped by region, region
  order maximising the ring's bottleneck bandwidth at the start time) and hops go
  i -> i+1 mod M. It is ONE fluid flow over the union of its hops' resources (out(a_i),
  in(a_i+1), link(r_i, r_i+1) if cross-region) with volume V = 2(M-1)/M * S bytes, then a
  latency term 2(M-1) * l_ring, l_ring = the largest hop latency. Alone it takes exactly
  `ring_allreduce_time(M, S, l_ring, B_ring)`, B_ring = the bottleneck hop bandwidth.
* Hierarchical all-reduce (mode="hierarchical"), three sequential phases: (1) in every
  region with n_r >= 2 members, a ring reduce-scatter flow over its members (in the given
  order) with volume (n_r-1)/n_r * S and latency (n_r-1) * latency[r][r], all regions in
  parallel; (2) a ring all-reduce as above among the region leaders (each region's first
  member), ordered at the phase's start, skipped if there is one region; (3) a ring
  all-gather in every region, like (1). A phase starts when the previous one's last flow
  completes; the tag is handed out when phase 3 ends.
* Copies (the planner's representatives, runtime/sim.py): a host may stand for k identical
  hosts of its region (`copies`), which would sit next to each other in a ring and do the
  same thing at the same time. A ring then behaves as the ring of all copies: every NIC and
  WAN pipe carries the same rate (each copy has one outgoing and one incoming hop, and the
  ring crosses each region boundary once either way), the latency term takes the intra-region
  hops between copies into account, and a host's bytes are those of all its copies (only its
  last copy's share crosses a WAN pipe). Only `ring` takes copies; a point-to-point message
  or a hierarchical all-reduce from a host with copies is an error.
* Byte accounting, exact integers from the model, counted when a flow starts:
  `bytes_sent` (all hosts), `bytes_by_host`, `bytes_inter_region` (bytes that crossed a WAN
  pipe). In a ring the members together send steps * S bytes (steps = 2(M-1) for an
  all-reduce, M-1 for a reduce-scatter or all-gather), split as evenly as integers allow
  (each about V); a member's share crosses a WAN pipe when its outgoing hop does.
  `peak_link_bps[(r, s)]` is the largest total rate seen on each WAN pipe.

This differs on purpose from the HALoS simulator (github.com/utnslab/halos), which gives
every transfer the full link bandwidth, with no contention between transfers and no latency.

Rates are recomputed only where something changed: max-min fairness splits exactly along the
connected components of the graph of flows and the resources they share, so when flows start
or finish draining only the component holding their resources is recomputed (every flow
after a capacity breakpoint). This keeps a plan of a thousand workers with a thousand
concurrent transfers (HALoS, planner/) from recomputing every flow at every event.

Ties: tags completing at the same instant are handed out in the order their transfers were
started. Times are compared with a relative tolerance of 1e-12 so that advancing exactly to
a computed drain time always drains the flow (float remainders are snapped to zero).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

_REL_TOL = 1e-12


def _tol(t: float) -> float:
    return _REL_TOL * max(1.0, abs(t))


def ring_allreduce_time(M: int, nbytes: float, latency: float, bandwidth_bps: float) -> float:
    """Closed form of a ring all-reduce alone on idle links: 2(M-1) latency terms plus
    2(M-1)/M of the payload through the bottleneck hop."""
    if M <= 1:
        return 0.0
    transfer = 0.0 if bandwidth_bps == math.inf else 2 * (M - 1) / M * 8 * nbytes / bandwidth_bps
    return 2 * (M - 1) * latency + transfer


@dataclass
class _Spec:
    """What one flow will be: resources used (with multiplicity), volume, latency, bytes."""
    usage: dict[tuple, int]
    bits: float
    latency: float
    sent: dict[str, int]  # bytes each host sends
    inter: int  # bytes that cross a WAN pipe


@dataclass
class _Job:
    """One send or all-reduce: a sequence of phases, each a set of flows started together."""
    seq: int
    tag: Any
    phases: Any  # iterator of callables (start time) -> list[_Spec]
    open: int = 0  # flows of the current phase not yet completed


@dataclass
class _Flow:
    id: int
    job: _Job
    usage: dict[tuple, int]
    bits: float  # still to drain
    total_bits: float
    latency: float
    rate: float = 0.0
    drain_at: float = math.inf  # valid while draining, from the last rate computation
    arrive_at: float = math.inf  # valid once drained
    finite: list = field(default_factory=list)


class Network:
    def __init__(self, cluster, host_regions: dict[str, int],
                 host_workers: dict[str, int] | None = None,
                 copies: dict[str, int] | None = None):
        self.cluster = cluster
        self.host_regions = dict(host_regions)
        self.host_workers = dict(host_workers or {})  # hosts that are workers (which can be down)
        self.copies = {h: k for h, k in (copies or {}).items() if k != 1}  # hosts standing for k
        R = len(cluster.regions)
        for h, r in self.host_regions.items():
            if not 0 <= r < R:
                raise ValueError(f"host '{h}' is in region {r}, but the cluster has {R} regions")
        self.now = 0.0
        self._job_seq = itertools.count()
        self._flow_id = itertools.count()
        self._draining: dict[int, _Flow] = {}  # by id; dicts keep creation order
        self._flying: dict[int, _Flow] = {}  # drained, waiting out their latency
        self._done: list[tuple[int, Any]] = []  # (job seq, tag) completed, not yet handed out
        self._breaks = cluster.capacity_breakpoints()
        self._users: dict[tuple, set[int]] = {}  # resource -> ids of draining flows using it
        self._dirty: set[tuple] = set()  # resources whose flows need new rates
        self._epoch = -1  # breakpoints passed when rates were last computed (all of them)
        self._caps: dict[tuple, float] = {}  # resource capacities until the next breakpoint
        self._next: float | None = None  # next_time(), until something changes
        self.bytes_sent = 0
        self.bytes_inter_region = 0
        self.bytes_by_host: dict[str, int] = {h: 0 for h in self.host_regions}
        self.peak_link_bps: dict[tuple[int, int], float] = {}

    # -- starting work --------------------------------------------------------------
    def send(self, now: float, src: str, dst: str, nbytes: int, tag) -> None:
        """Start a point-to-point message of `nbytes` from `src` to `dst` at time `now`."""
        self._check_bytes(nbytes)
        self._single(src, dst)
        r, s = self._region(src), self._region(dst)
        self._catch_up(now)
        phases = []
        if src != dst:
            usage = {("out", src): 1, ("in", dst): 1}
            if r != s:
                usage[("link", r, s)] = 1
            spec = _Spec(usage, 8 * nbytes, self.cluster.latency[r][s], {src: nbytes},
                         nbytes if r != s else 0)
            phases.append(lambda t: [spec])
        self._start_job(tag, phases)

    def all_reduce(self, now: float, hosts: list[str], nbytes: int, tag,
                   mode: str = "ring") -> None:
        """Start an all-reduce of `nbytes` per member among `hosts` at time `now`."""
        if mode not in ("ring", "hierarchical"):
            raise ValueError(f"unknown all-reduce mode '{mode}'; use 'ring' or 'hierarchical'")
        if not hosts:
            raise ValueError("all_reduce needs at least one host")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"all_reduce hosts repeat: {hosts}")
        self._check_bytes(nbytes)
        self._single(*hosts)
        for h in hosts:
            self._region(h)
        self._catch_up(now)
        hosts = list(hosts)
        phases: list[Callable[[float], list[_Spec]]] = []
        if len(hosts) > 1 and mode == "ring":
            steps = 2 * (len(hosts) - 1)
            phases.append(lambda t: [self._ring(self.ring_order(hosts, t), steps * nbytes, steps)])
        elif len(hosts) > 1:
            groups = self._groups(hosts)

            def local(t: float) -> list[_Spec]:  # reduce-scatter / all-gather inside regions
                return [self._ring(m, (len(m) - 1) * nbytes, len(m) - 1)
                        for m in groups.values() if len(m) >= 2]

            def leaders(t: float) -> list[_Spec]:
                heads = [m[0] for m in groups.values()]
                if len(heads) < 2:
                    return []
                steps = 2 * (len(heads) - 1)
                return [self._ring(self.ring_order(heads, t), steps * nbytes, steps)]

            phases = [local, leaders, local]
        self._start_job(tag, phases)

    def ring(self, now: float, hosts: list[str], per_member: int, hops: int, tag) -> None:
        """Start a ring collective in which every member sends `per_member` bytes over `hops`
        sequential steps (runtime/collectives.py says how many for each scheme): one fluid
        flow over the ring's hops, then hops x the ring's worst hop latency."""
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"ring collective needs distinct hosts, got {hosts}")
        self._check_bytes(per_member)
        for h in hosts:
            self._region(h)
        self._catch_up(now)
        phases = []
        members = sum(self.copies.get(h, 1) for h in hosts)
        if members > 1:
            phases.append(lambda t: [self._ring(self.ring_order(list(hosts), t),
                                                per_member * members, hops)])
        self._start_job(tag, phases)

    # -- the event-loop interface ---------------------------------------------------
    def next_time(self) -> float:
        """Earliest time something happens; math.inf if nothing is pending."""
        if self._done:
            return self.now
        if self._next is not None:
            return self._next
        t = math.inf
        for f in self._draining.values():
            t = min(t, f.drain_at)
        for f in self._flying.values():
            t = min(t, f.arrive_at)
        if self._draining:  # a capacity change re-times draining flows (and unstalls them)
            i = bisect.bisect_right(self._breaks, self.now)
            if i < len(self._breaks):
                t = min(t, self._breaks[i])
        self._next = t
        return t

    def advance(self, t: float) -> list:
        """Move to time t and return the tags completed at t, in the order they were started."""
        self._catch_up(t)
        done, self._done = sorted(self._done, key=lambda d: d[0]), []
        return [tag for _, tag in done]

    # -- ring ordering --------------------------------------------------------------
    def ring_order(self, hosts: list[str], now: float) -> list[str]:
        """Hosts grouped by region (given order inside a region); the region order maximises
        the ring's bottleneck bandwidth at `now` (ties: smaller largest-hop latency, then the
        first order found). Exhaustive with the first region fixed up to 7 regions, else
        greedy from the first region."""
        groups = self._groups(hosts)
        regions = list(groups)
        if 3 <= len(regions) <= 7:
            best = None
            for perm in itertools.permutations(regions[1:]):
                cycle = [regions[0], *perm]
                key = self._cycle_key(cycle, now)
                if best is None or key < best[0]:
                    best = (key, cycle)
            regions = best[1]
        elif len(regions) > 7:
            order, left = [regions[0]], regions[1:]
            while left:
                r = order[-1]
                nxt = min(left, key=lambda s: (-self._hop_bw(r, s, now), self.cluster.latency[r][s]))
                order.append(nxt)
                left.remove(nxt)
            regions = order
        return [h for r in regions for h in groups[r]]

    def _hop_bw(self, r: int, s: int, t: float) -> float:
        """Bandwidth of one hop from a host in region r to a host in region s, alone."""
        bw = self.cluster.bandwidth
        return min(bw[r][r], bw[s][s], self.cluster.link_bandwidth(r, s, t))

    def _cycle_key(self, cycle: list[int], t: float) -> tuple[float, float]:
        # Only the cross-region hops depend on the order, so only they are scored.
        hops = list(zip(cycle, cycle[1:] + cycle[:1]))
        return (-min(self._hop_bw(r, s, t) for r, s in hops),
                max(self.cluster.latency[r][s] for r, s in hops))

    # -- internals ------------------------------------------------------------------
    def _region(self, host: str) -> int:
        if host not in self.host_regions:
            raise ValueError(f"unknown host '{host}'; the network knows {', '.join(self.host_regions)}")
        return self.host_regions[host]

    def _single(self, *hosts: str) -> None:
        for h in hosts:
            if h in self.copies:
                raise ValueError(f"host '{h}' stands for {self.copies[h]} copies; only ring "
                                 "collectives can be run on representatives")

    @staticmethod
    def _check_bytes(nbytes) -> None:
        if not nbytes >= 0:
            raise ValueError(f"message size must be >= 0 bytes, got {nbytes}")

    def _groups(self, hosts: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for h in hosts:
            groups.setdefault(self.host_regions[h], []).append(h)
        return groups

    def _ring(self, order: list[str], total: int, steps: int) -> _Spec:
        """One fluid flow for a ring collective in which the members together send `total`
        bytes (each about total / M, split exactly so the counters stay integers) over
        `steps` sequential steps (2(M-1) for an all-reduce, M-1 for a reduce-scatter or
        all-gather), among hosts in `order`; a host with copies is that many members in a
        row (see the module docstring)."""
        counts = [self.copies.get(a, 1) for a in order]
        M = sum(counts)
        lat = self.cluster.latency
        usage: Counter = Counter()
        sent: dict[str, int] = {}
        inter, l_ring = 0, 0.0
        base, extra = divmod(total, M)
        slot = 0  # the member index of each host's first copy
        for i, a in enumerate(order):
            b = order[(i + 1) % len(order)]
            ra, rb = self.host_regions[a], self.host_regions[b]
            k = counts[i]
            if a != b or k > 1:  # (a lone host with copies is a ring of its copies)
                usage[("out", a)] += 1
                usage[("in", b)] += 1
            sent[a] = k * base + max(0, min(extra, slot + k) - slot)
            if k > 1:  # the hops between its copies stay in its region
                l_ring = max(l_ring, lat[ra][ra])
            if ra != rb:
                usage[("link", ra, rb)] += 1
                inter += base + (1 if slot + k - 1 < extra else 0)  # its last copy's share
            if a != b:
                l_ring = max(l_ring, lat[ra][rb])
            slot += k
        return _Spec(dict(usage), 8 * total / M, steps * l_ring, sent, inter)

    def _start_job(self, tag, phases: list) -> None:
        job = _Job(next(self._job_seq), tag, iter(phases))
        self._next_phase(job)
        self._settle()

    def _next_phase(self, job: _Job) -> None:
        for build in job.phases:
            specs = build(self.now)
            if specs:
                job.open = len(specs)
                for spec in specs:
                    self._add_flow(job, spec)
                return
        self._done.append((job.seq, job.tag))

    def _add_flow(self, job: _Job, spec: _Spec) -> None:
        for h, n in spec.sent.items():
            self.bytes_by_host[h] += n
            self.bytes_sent += n
        self.bytes_inter_region += spec.inter
        f = _Flow(next(self._flow_id), job, spec.usage, spec.bits, spec.bits, spec.latency)
        self._draining[f.id] = f
        for res in f.usage:
            self._users.setdefault(res, set()).add(f.id)
        self._dirty.update(f.usage)

    def _catch_up(self, t: float) -> None:
        """Move the clock to t, which must not skip a pending event, and settle everything
        that happens at t. Completed tags wait in self._done for advance()."""
        if t < self.now - _tol(self.now):
            raise ValueError(f"time goes backwards: {t} < current network time {self.now}")
        nt = self.next_time()
        if t > nt + _tol(nt):
            raise ValueError(f"cannot move to {t}: something happens at {nt} first "
                             "(advance to next_time() before starting work later)")
        if t > self.now:
            dt, tol = t - self.now, _tol(t)
            self._next = None
            for f in self._draining.values():
                if f.rate == math.inf or t >= f.drain_at - tol:
                    f.bits = 0.0  # reached (or within rounding of) its drain time
                else:
                    f.bits -= f.rate * dt
                    if f.bits <= _REL_TOL * f.total_bits:
                        f.bits = 0.0
            self.now = t
        self._settle()

    def _settle(self) -> None:
        """Apply everything that happens at self.now: flows that finished draining start
        their latency, flows whose latency is over complete (which may start a job's next
        phase), and rates are recomputed. Repeats until nothing changes at this instant."""
        self._next = None
        while True:
            changed = False
            for f in list(self._draining.values()):
                if f.bits <= 0:
                    del self._draining[f.id]
                    for res in f.usage:
                        self._users[res].discard(f.id)
                    self._dirty.update(f.usage)
                    f.arrive_at = self.now + f.latency
                    self._flying[f.id] = f
                    changed = True
            for f in sorted(self._flying.values(), key=lambda f: f.id):  # creation order
                if f.arrive_at <= self.now + _tol(self.now):
                    del self._flying[f.id]
                    changed = True
                    f.job.open -= 1
                    if f.job.open == 0:
                        self._next_phase(f.job)
            self._rates()
            for f in self._draining.values():
                if f.rate == math.inf:  # nothing finite on its path: drains instantly
                    f.bits = 0.0
                    changed = True
            if not changed:
                return

    def _capacity(self, res: tuple) -> float:
        if res[0] == "link":
            return self.cluster.link_bandwidth(res[1], res[2], self.now)
        worker = self.host_workers.get(res[1])
        if worker is not None and self.cluster.is_down(worker, self.now):
            return 0.0  # a crashed worker's NIC carries nothing until it is back
        r = self.host_regions[res[1]]
        return self.cluster.bandwidth[r][r]

    def stalled(self) -> bool:
        """Whether some transfer is waiting for a capacity that will never come back."""
        return any(f.rate == 0 for f in self._draining.values())

    def _changed_flows(self) -> list[_Flow]:
        """The draining flows whose rates may have changed: all of them after a capacity
        breakpoint, else the connected components of the resources marked dirty."""
        epoch = bisect.bisect_right(self._breaks, self.now)
        dirty, self._dirty = self._dirty, set()
        if epoch != self._epoch:
            self._epoch, self._caps = epoch, {}
            return list(self._draining.values())
        ids: set[int] = set()
        seen: set[tuple] = set()
        stack = list(dirty)
        while stack:
            res = stack.pop()
            if res in seen:
                continue
            seen.add(res)
            for i in self._users.get(res, ()):
                if i not in ids:
                    ids.add(i)
                    stack.extend(self._draining[i].usage)
        return [self._draining[i] for i in sorted(ids)]  # creation order, as a full pass

    def _rates(self) -> None:
        """Max-min fair rates by progressive filling: raise every unfrozen flow's rate
        together until some resource is full, freeze the flows crossing it, repeat."""
        flows = self._changed_flows()
        if not flows:
            return
        left: dict[tuple, float] = {}  # capacity not yet taken by frozen flows
        weight: dict[tuple, int] = {}  # sum of multiplicities of unfrozen flows
        unfrozen = []
        caps = self._caps
        for f in flows:
            for res in f.usage:
                if res not in left:
                    if res not in caps:
                        caps[res] = self._capacity(res)
                    left[res] = caps[res]
            f.finite = [res for res in f.usage if left[res] != math.inf]
            if f.finite:
                unfrozen.append(f)
                for res in f.finite:
                    weight[res] = weight.get(res, 0) + f.usage[res]
            else:
                f.rate = math.inf
        while unfrozen:
            share = {res: max(left[res], 0.0) / w for res, w in weight.items() if w > 0}
            level = min(share.values())
            tight = {res for res, v in share.items() if v <= level * (1 + _REL_TOL)}
            still = []
            for f in unfrozen:
                if any(res in tight for res in f.finite):
                    f.rate = level
                    for res in f.finite:
                        left[res] -= level * f.usage[res]
                        weight[res] -= f.usage[res]
                else:
                    still.append(f)
            unfrozen = still
        for f in flows:
            f.drain_at = (self.now if f.rate == math.inf or f.bits <= 0 else
                          self.now + f.bits / f.rate if f.rate > 0 else math.inf)
        # Record the load on each WAN pipe (instantaneous flows carry no rate to speak of).
        load: dict[tuple, float] = {}
        for f in flows:
            if f.rate != math.inf:
                for res, k in f.usage.items():
                    if res[0] == "link":
                        load[res] = load.get(res, 0.0) + f.rate * k
        for (_, r, s), v in load.items():
            if v > self.peak_link_bps.get((r, s), -1.0):
                self.peak_link_bps[(r, s)] = v
