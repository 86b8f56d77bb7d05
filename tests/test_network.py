"""The network-time model (runtime/network.py): exact finish times worked out by hand."""

import math

import pytest

from locotrain.cluster import Cluster
from locotrain.config import ClusterConfig, OutageSpec, TraceSpec, WorkerSpec
from locotrain.runtime.network import Network, _Spec, ring_allreduce_time

GBIT = 125_000_000  # bytes in 1e9 bits


def make(regions, latency, gbps, hosts, outages=(), traces=()):
    """A custom cluster and a network whose hosts are {name: region name}."""
    cfg = ClusterConfig(preset="custom", regions=list(regions), latency_s=latency,
                        bandwidth_gbps=gbps,
                        workers=[WorkerSpec(region=r, count=1) for r in regions],
                        outages=list(outages), traces=list(traces))
    cluster = Cluster(cfg, default_batch=1)
    return Network(cluster, {h: cluster.regions.index(r) for h, r in hosts.items()})


def two_regions(inter_gbps=1.0, inter_lat=0.03, intra_gbps=100.0, intra_lat=1e-4, **kw):
    hosts = {"a0": "A", "a1": "A", "b0": "B", "b1": "B"}
    return make(["A", "B"], [[intra_lat, inter_lat], [inter_lat, intra_lat]],
                [[intra_gbps, inter_gbps], [inter_gbps, intra_gbps]], hosts, **kw)


def drain(net):
    """Run the network until nothing is pending: [(tag, completion time)] in hand-out order."""
    out = []
    while (t := net.next_time()) < math.inf:
        out += [(tag, t) for tag in net.advance(t)]
    return out


def times(net):
    return dict(drain(net))


def test_single_message_alone():
    net = two_regions()
    net.send(0.0, "a0", "b0", GBIT, "wan")  # 1e9 bits over the 1 Gbit/s pipe
    assert times(net) == {"wan": pytest.approx(0.03 + 1.0, rel=1e-12)}
    net.send(2.0, "a0", "a1", 10 * GBIT, "lan")  # 1e10 bits at 100 Gbit/s, inside A
    assert times(net) == {"lan": pytest.approx(2.0 + 1e-4 + 0.1, rel=1e-12)}


def test_shared_pipe_is_split_fairly_and_separate_pipes_do_not_interact():
    net = two_regions()
    net.send(0.0, "a0", "b0", GBIT, "x")
    net.send(0.0, "a1", "b1", GBIT, "y")  # same pipe A->B: 0.5 Gbit/s each
    assert net.next_time() == pytest.approx(2.0)
    assert drain(net) == [("x", pytest.approx(2.03)), ("y", pytest.approx(2.03))]

    hosts = {"a0": "A", "a1": "A", "b0": "B", "c0": "C"}
    lat = [[0, 0.03, 0.03], [0.03, 0, 0.03], [0.03, 0.03, 0]]
    gbps = [[100, 1, 1], [1, 100, 1], [1, 1, 100]]
    net = make(["A", "B", "C"], lat, gbps, hosts)
    net.send(0.0, "a0", "b0", GBIT, "ab")
    net.send(0.0, "a1", "c0", GBIT, "ac")  # another pipe out of A
    net.send(0.0, "b0", "a1", GBIT, "ba")  # the reverse direction is its own pipe
    assert times(net) == {k: pytest.approx(1.03) for k in ("ab", "ac", "ba")}


def test_message_started_halfway_through_another():
    net = two_regions()
    net.send(0.0, "a0", "b0", GBIT, "first")
    assert net.next_time() == pytest.approx(1.0)
    net.send(0.5, "a1", "b1", GBIT, "second")
    # first: 0.5e9 bits left at 0.5 Gbit/s -> drained at 1.5; second then has 0.5e9 bits
    # left, alone at 1 Gbit/s -> drained at 2.0. Both add 30 ms of latency.
    assert net.next_time() == pytest.approx(1.5)
    assert drain(net) == [("first", pytest.approx(1.53)), ("second", pytest.approx(2.03))]


def test_max_min_rates_with_different_bottlenecks():
    # X's NICs carry 4 Gbit/s; pipe X->Y 1 Gbit/s, pipe X->Z 10 Gbit/s.
    hosts = {"x0": "X", "x1": "X", "y0": "Y", "y1": "Y", "z0": "Z"}
    lat = [[0, 0.01, 0.01], [0.01, 0, 0.01], [0.01, 0.01, 0]]
    gbps = [[4, 1, 10], [1, 100, 1], [10, 1, 100]]
    net = make(["X", "Y", "Z"], lat, gbps, hosts)
    net.send(0.0, "x0", "y0", GBIT, "f1")  # bottleneck pipe X->Y: 0.5
    net.send(0.0, "x1", "y1", GBIT, "f2")  # bottleneck pipe X->Y: 0.5
    net.send(0.0, "x1", "z0", 14 * GBIT, "f3")  # out(x1) has 4 - 0.5 = 3.5 left
    # f1, f2 drain 1e9 bits at 0.5 -> t=2. f3 sent 7e9 by then, then alone at min(4, 10):
    # 7e9 / 4e9 = 1.75 s more -> drained at 3.75.
    assert times(net) == {"f1": pytest.approx(2.01), "f2": pytest.approx(2.01),
                          "f3": pytest.approx(3.76)}
    assert net.peak_link_bps[(0, 1)] == pytest.approx(1e9)
    assert net.peak_link_bps[(0, 2)] == pytest.approx(4e9)  # f3 alone, NIC-bound


def test_two_worker_all_reduce_across_regions_matches_closed_form():
    net = two_regions()
    S = 100_000_000
    net.all_reduce(0.0, ["a0", "b0"], S, "ar")
    expected = ring_allreduce_time(2, S, 0.03, 1e9)
    assert expected == pytest.approx(2 * 0.03 + 0.8)  # 2 latencies + 8e8 bits at 1 Gbit/s
    assert times(net) == {"ar": pytest.approx(expected, rel=1e-12)}


def test_ring_of_four_in_one_region_matches_closed_form():
    hosts = {f"h{i}": "A" for i in range(4)}
    net = make(["A"], [[1e-4]], [[10]], hosts)
    S = 100_000_000
    net.all_reduce(1.0, list(hosts), S, "ar")
    expected = ring_allreduce_time(4, S, 1e-4, 10e9)
    assert expected == pytest.approx(6e-4 + 1.5 * 8e8 / 10e9)
    assert times(net) == {"ar": pytest.approx(1.0 + expected, rel=1e-12)}


def test_ring_order_picks_the_high_bandwidth_cycle():
    # A->B->C->A is 10 Gbit/s at every hop; the reverse cycle is 1 Gbit/s. The ring's
    # latency term uses its slowest hop, B->C at 50 ms.
    hosts = {"a0": "A", "a1": "A", "b0": "B", "c0": "C"}
    lat = [[1e-4, 0.02, 0.01], [0.02, 1e-4, 0.05], [0.01, 0.05, 1e-4]]
    gbps = [[100, 10, 1], [1, 100, 10], [10, 1, 100]]
    net = make(["A", "B", "C"], lat, gbps, hosts)
    # Regions first appear as A, C, B; the same-region hosts stay together and in order.
    assert net.ring_order(["a0", "c0", "a1", "b0"], 0.0) == ["a0", "a1", "b0", "c0"]
    S = 50_000_000
    net.all_reduce(0.0, ["a0", "c0", "a1", "b0"], S, "ar")
    assert times(net) == {"ar": pytest.approx(ring_allreduce_time(4, S, 0.05, 10e9))}

    flipped = make(["A", "B", "C"], lat, [list(r) for r in zip(*gbps)], hosts)
    assert flipped.ring_order(["a0", "b0", "c0"], 0.0) == ["a0", "c0", "b0"]


def test_hierarchical_is_the_sum_of_its_phases():
    net = two_regions(inter_gbps=1.0, inter_lat=0.03, intra_gbps=10.0, intra_lat=1e-3)
    S = 100_000_000
    net.all_reduce(0.0, ["a0", "a1", "b0", "b1"], S, "h", mode="hierarchical")
    # reduce-scatter + all-gather inside each region make one intra ring all-reduce; the
    # leaders' ring runs in between. 0.041 + 0.86 + 0.041.
    expected = ring_allreduce_time(2, S, 1e-3, 10e9) + ring_allreduce_time(2, S, 0.03, 1e9)
    assert expected == pytest.approx(0.942)
    assert times(net) == {"h": pytest.approx(expected, rel=1e-12)}
    # in each region both members send S/2 twice; the leaders send S each across.
    assert net.bytes_by_host == {"a0": 2 * S, "a1": S, "b0": 2 * S, "b1": S}
    assert net.bytes_inter_region == 2 * S


def test_a_resource_used_twice_costs_twice_the_rate():
    # White-box: the public API never builds such a flow (rings visit each pipe once), so
    # start one directly. Pipe A->B, 1 Gbit/s: "double" uses it twice, "single" once.
    # Progressive filling: 2r + r = 1 Gbit/s -> r = 1/3 Gbit/s for both.
    net = two_regions(inter_lat=0.0)
    link = ("link", 0, 1)
    net._start_job("double", [lambda t: [_Spec({link: 2}, 1e9, 0.0, {}, 0)]])
    net._start_job("single", [lambda t: [_Spec({link: 1}, 2e9, 0.0, {}, 0)]])
    # double drains 1e9 bits at 1/3 -> t=3; single has 1e9 left, then alone at 1 -> t=4.
    assert times(net) == {"double": pytest.approx(3.0), "single": pytest.approx(4.0)}
    assert net.peak_link_bps[(0, 1)] == pytest.approx(1e9)


def test_outage_stalls_a_flow_until_the_link_returns():
    net = two_regions(outages=[OutageSpec(src="A", dst="B", start_s=1.0, end_s=3.0)])
    net.send(0.0, "a0", "b0", 2 * GBIT, "m")  # 2 s of work, half done when the link goes
    assert net.next_time() == pytest.approx(1.0)  # the outage starts
    assert net.advance(1.0) == []
    assert net.next_time() == pytest.approx(3.0)  # stalled until the link returns
    assert net.advance(3.0) == []
    assert times(net) == {"m": pytest.approx(4.03)}


def test_trace_halving_bandwidth_mid_transfer():
    tr = TraceSpec(src="A", dst="B", times_s=[1.0], gbps=[0.5])
    net = two_regions(traces=[tr])
    net.send(0.0, "a0", "b0", 2 * GBIT, "m")  # 1e9 bits at 1 Gbit/s, 1e9 bits at 0.5
    assert times(net) == {"m": pytest.approx(3.03)}
    assert net.peak_link_bps[(0, 1)] == pytest.approx(1e9)


def test_unlimited_bandwidth_costs_latency_only():
    hosts = {"a0": "A", "a1": "A", "b0": "B"}
    net = make(["A", "B"], [[1e-3, 0.05], [0.05, 1e-3]], [[0, 0], [0, 0]], hosts)
    net.send(0.0, "a0", "b0", 10**12, "m")
    net.all_reduce(0.0, ["a0", "a1", "b0"], 10**12, "ar")
    assert times(net) == {"m": pytest.approx(0.05), "ar": pytest.approx(4 * 0.05)}


def test_single_member_all_reduce_and_self_send_are_immediate():
    net = two_regions()
    net.all_reduce(2.0, ["a0"], 10**9, "solo")
    net.send(2.0, "b0", "b0", 10**9, "self")
    assert net.next_time() == 2.0
    assert net.advance(2.0) == ["solo", "self"]
    assert net.next_time() == math.inf
    assert net.bytes_sent == 0 and net.bytes_inter_region == 0


def test_byte_counters_for_a_four_member_ring_across_two_regions():
    net = two_regions()
    S = 1000
    V = 1500  # 2(M-1)/M * S
    net.all_reduce(0.0, ["a0", "b0", "a1", "b1"], S, "ar")
    assert net.bytes_sent == 4 * V
    assert net.bytes_inter_region == 2 * V  # hops a1->b0 and b1->a0 cross
    assert net.bytes_by_host == {h: V for h in ("a0", "a1", "b0", "b1")}
    net.send(0.0, "a0", "b1", 7, "m")
    net.send(0.0, "b0", "b1", 5, "n")
    assert (net.bytes_sent, net.bytes_inter_region) == (4 * V + 12, 2 * V + 7)
    assert net.bytes_by_host["a0"] == V + 7 and net.bytes_by_host["b0"] == V + 5


def test_ties_are_handed_out_in_start_order_and_runs_repeat_exactly():
    def scenario():
        net = two_regions(traces=[TraceSpec(src="B", dst="A", times_s=[0.7], gbps=[0.3])])
        net.send(0.0, "b1", "a1", GBIT, "late")
        net.send(0.0, "a0", "b0", GBIT, "x")
        net.send(0.0, "a1", "b1", GBIT, "y")
        net.all_reduce(0.2, ["a0", "a1", "b0", "b1"], 3 * GBIT // 10, "ar")
        net.all_reduce(0.4, ["a0", "a1", "b0", "b1"], GBIT // 7, "h", mode="hierarchical")
        out = drain(net)
        return out, net.bytes_sent, net.bytes_inter_region, net.bytes_by_host, net.peak_link_bps

    first, second = scenario(), scenario()
    assert first == second
    order = [tag for tag, _ in first[0]]
    assert order.index("x") + 1 == order.index("y")  # same finish time, start order
    assert sorted(order) == ["ar", "h", "late", "x", "y"]


def test_rejects_moving_past_a_pending_event():
    net = two_regions()
    net.send(0.0, "a0", "b0", GBIT, "m")
    with pytest.raises(ValueError):
        net.advance(5.0)
    with pytest.raises(ValueError):
        net.all_reduce(0.0, ["a0"], 1, "bad", mode="tree")
