"""Yuan et al.'s decentralized scheduler (pipeline/matching.py, path.py, placement.py,
search.py, scenarios.py) and `loco place` (pipeline/cli.py)."""

import itertools
import json
import random

import numpy as np
import pytest

from locotrain.cli import main as loco
from locotrain.pipeline.cli import PlaceSettings, parse_settings
from locotrain.pipeline.matching import bottleneck_matching
from locotrain.pipeline.path import open_path
from locotrain.pipeline.placement import CostModel, device_classes
from locotrain.pipeline.scenarios import SCENARIOS, GPTSizes, cluster_from_dict
from locotrain.pipeline.search import crossover, groups_of, random_labels, search, seed_labels

XL = GPTSizes()
C_DP, C_PP = XL.stage_param_bytes(3), XL.activation_bytes(32)


def random_cluster(n, seed, sites=None):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(0.001, 0.1, (n, n))
    bw = rng.uniform(0.3, 5.0, (n, n))
    lat, bw = (lat + lat.T) / 2, (bw + bw.T) / 2
    np.fill_diagonal(lat, 0.0)
    return cluster_from_dict("random", {"latency_s": lat.tolist(), "bandwidth_gbps": bw.tolist(),
                                        **({"sites": sites} if sites else {})})


# --------------------------------------------------------------------------- the pieces


def test_bottleneck_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(40):  # integer costs: many ties, the hard case for a threshold method
            c = rng.integers(0, 12, (n, n)).astype(float)
            value, perm = bottleneck_matching(c)
            brute = min(max(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert value == brute
            assert sorted(perm) == list(range(n)) and max(c[i, perm[i]] for i in range(n)) == value


def test_open_path_equals_brute_force():
    rng = np.random.default_rng(1)
    for n in range(1, 8):
        for _ in range(10):
            c = rng.random((n, n))
            c = c + c.T
            value, order = open_path(c)
            brute = min(sum(c[p[k], p[k + 1]] for k in range(n - 1))
                        for p in itertools.permutations(range(n)))
            assert value == pytest.approx(brute, abs=1e-12)
            assert sorted(order) == list(range(n))
            assert sum(c[order[k], order[k + 1]] for k in range(n - 1)) == pytest.approx(value)


def test_device_classes_find_interchangeable_devices():
    counts = {name: len(set(device_classes(c.latency_s, c.bandwidth_gbps)))
              for name, c in ((n, f()) for n, f in SCENARIOS.items())}
    # spot: 8 instances, and all 32 single GPUs look alike
    assert counts == {"dc-ondemand": 8, "spot": 9, "two-universities": 2, "us-regions": 4,
                      "world-8": 8}
    c = random_cluster(6, 0)
    assert device_classes(c.latency_s, c.bandwidth_gbps) == list(range(6))


def brute_force_cost(model, groups):
    """DP + 2 PP straight from the definition: every order, every matching."""
    dp = max(sum(model.dp[d, e] for e in g if e != d) for g in groups for d in g)
    best_pp = min(
        sum(min(max(model.pp[a[i], b[p[i]]] for i in range(len(a)))
                for p in itertools.permutations(range(len(b))))
            for a, b in zip(order, order[1:]))
        for order in itertools.permutations(groups))
    return dp + 2 * best_pp


def all_partitions(items, size):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = [x for x in rest if x not in others]
        for tail in all_partitions(left, size):
            yield [[first, *others], *tail]


def test_cost_model_and_search_against_brute_force():
    # 9 devices, 3 stages x 3 replicas: 280 partitions, every order and matching enumerated
    cluster = random_cluster(9, 3)
    model = CostModel(cluster, 3, 3, 1e8, 2e8)
    costs = []
    for groups in all_partitions(list(range(9)), 3):
        cost = model.cost(groups)[0]
        assert cost == pytest.approx(brute_force_cost(model, groups), rel=1e-12)
        costs.append(cost)
    found = search(model, seed=0, population=10, offspring=60).best
    assert found.cost == pytest.approx(min(costs), rel=1e-12)
    # the allocation realises its cost: its order and matchings are the optimal ones
    fixed = model.fixed(found.stages)
    assert fixed.cost == pytest.approx(found.cost, rel=1e-12)


def test_in_order_baseline_is_scored_as_given():
    # 4 devices, 2 stages x 2 replicas; group 0 = {0, 1}, group 1 = {2, 3}, pipes 0->2, 1->3
    lat = [[0, .01, .02, .03], [.01, 0, .04, .05], [.02, .04, 0, .06], [.03, .05, .06, 0]]
    bw = [[1, 1, 2, 1], [1, 1, 1, 4], [2, 1, 1, 1], [1, 4, 1, 1]]
    c = cluster_from_dict("hand", {"latency_s": lat, "bandwidth_gbps": bw})
    model = CostModel(c, 2, 2, 1e9, 5e8)
    a = model.in_order()
    dp = max(2 * (.01 + 8e9 / (2 * 1e9)), 2 * (.06 + 8e9 / (2 * 1e9)))
    pp = max(.02 + 4e9 / 2e9, .05 + 4e9 / 4e9)
    assert a.stages == [[0, 1], [2, 3]]
    assert a.dp == pytest.approx(dp) and a.pp == pytest.approx(pp)
    assert a.cost == pytest.approx(dp + 2 * pp)


def test_crossover_and_seeds_keep_groups_equal():
    rng = random.Random(0)
    for _ in range(50):
        p1, p2 = random_labels(24, 4, rng), random_labels(24, 4, rng)
        child = crossover(p1, p2, 4, rng)
        assert sorted(child.count(g) for g in range(4)) == [6] * 4
    model = CostModel(SCENARIOS["spot"](), 8, 8, C_DP, C_PP)
    for labels in seed_labels(model):
        assert [len(g) for g in groups_of(labels, 8)] == [8] * 8


# --------------------------------------------------------------------------- the search


def test_search_is_deterministic_for_a_seed():
    def run(seed):
        model = CostModel(SCENARIOS["us-regions"](), 8, 8, C_DP, C_PP)
        r = search(model, seed=seed, population=12, offspring=15)
        return r.best.stages, r.best.cost, r.history

    assert run(3) == run(3)
    cluster = random_cluster(16, 5)
    a = search(CostModel(cluster, 4, 4, C_DP, C_PP), seed=1, population=8, offspring=20).best
    b = search(CostModel(cluster, 4, 4, C_DP, C_PP), seed=1, population=8, offspring=20).best
    assert (a.stages, a.cost) == (b.stages, b.cost)


def test_search_improves_on_a_random_start_without_seeds():
    # the evolutionary part alone (no constructed partitions) must still find better ones
    model = CostModel(SCENARIOS["world-8"](), 8, 8, C_DP, C_PP)
    r = search(model, seed=0, population=10, offspring=40, seeds=False)
    assert r.history[-1] < 0.95 * r.history[0]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_optimised_beats_random_on_every_scenario(name):
    model = CostModel(SCENARIOS[name](), 8, 8, C_DP, C_PP)
    best = search(model, seed=0, population=10, offspring=10).best
    rng = random.Random(0)
    randoms = []
    for _ in range(100):
        perm = list(range(64))
        rng.shuffle(perm)
        randoms.append(model.in_order(perm).cost)
    assert best.cost < np.mean(randoms)
    assert best.cost <= min(randoms) and best.cost <= model.in_order().cost


def test_scenario_numbers():
    w = SCENARIOS["world-8"]()
    assert w.N == 64 and w.sites[0] == "oregon" and w.sites[8] == "virginia"
    assert (w.latency_s[0, 8], w.bandwidth_gbps[0, 8]) == (0.067, 0.79)  # Oregon-Virginia
    assert (w.latency_s[0, 1], w.bandwidth_gbps[0, 1]) == (0.005, 2.0)  # inside a city
    u = SCENARIOS["two-universities"]()
    assert (u.latency_s[0, 40], u.bandwidth_gbps[0, 40]) == (0.011, 1.12)
    d = SCENARIOS["dc-ondemand"]()
    assert (d.bandwidth_gbps[0, 7], d.bandwidth_gbps[0, 8]) == (100.0, 3.125)
    for c in (f() for f in SCENARIOS.values()):
        assert c.N == 64 and np.array_equal(c.latency_s, c.latency_s.T)
        assert np.array_equal(c.bandwidth_gbps, c.bandwidth_gbps.T)


# --------------------------------------------------------------------------- loco place


def place(argv, capsys):
    code = loco(["place", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_cluster(path, lat, bw, **extra):
    path.write_text(json.dumps({"latency_s": lat, "bandwidth_gbps": bw, **extra}))
    return str(path)


def test_place_writes_placement_json_and_pictures(tmp_path, capsys):
    c = random_cluster(8, 7, sites=["a"] * 4 + ["b"] * 4)
    src = write_cluster(tmp_path / "c.json", c.latency_s.tolist(),
                        np.where(np.isinf(c.bandwidth_gbps), 1.0, c.bandwidth_gbps).tolist(),
                        sites=c.sites)
    out = tmp_path / "out"
    sets = ["stages=4", "layers=8", "population=6", "offspring=5", "random_samples=20",
            "simulate_random=2", "sequences=4", "schedule='1f1b'", "twobp=true"]
    code, stdout, err = place([src, "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                              capsys)
    assert code == 0, err
    r = json.loads((out / "placement.json").read_text())
    for key in ("cost_optimised", "cost_random_mean", "cost_random_best", "cost_in_order"):
        assert r[key] > 0
    assert r["cost_optimised"] <= r["cost_random_best"] <= r["cost_random_mean"]
    assert sorted(d for p in r["allocation"]["pipelines"] for d in p) == list(range(8))
    assert len(r["allocation"]["stages"]) == 4 and r["replicas"] == 2
    assert set(r["step_time_s"]) == {"optimised", "in_order", "random_best", "random_mean"}
    for png in ("placement.png", "gantt.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "optimised" in stdout and str(out) in stdout


def test_place_rejects_bad_input_in_one_line(tmp_path, capsys):
    good = np.ones((4, 4)).tolist()
    cases = {
        "no scenario or cluster file named 'wrold-8'; did you mean 'world-8'?":
            ["wrold-8"],
        "larger than the model's 24 layers":
            ["world-8", "--set", "stages=25"],
        "must be square: it has 4 rows but row 2 has 3 entries":
            [write_cluster(tmp_path / "ns.json", good, [[1] * 4, [1] * 4, [1] * 3, [1] * 4])],
        "latency_s is 4 x 4 but bandwidth_gbps is 2 x 2":
            [write_cluster(tmp_path / "sh.json", good, [[1, 1], [1, 1]])],
        "must be symmetric":
            [write_cluster(tmp_path / "sy.json", [[0, 1, 0, 0]] + [[0] * 4] * 3, good)],
        "the cluster's 4 devices do not split into 8 stages x 1 replicas":
            [write_cluster(tmp_path / "n.json", good, good)],
        "unknown --set key 'stage'": ["world-8", "--set", "stage=4"],
        "--set mfu=yes: expected float": ["world-8", "--set", "mfu=yes"],
        "known schedules gpipe, 1f1b": ["world-8", "--set", "schedule=zb"],
    }
    for message, argv in cases.items():
        code, _, err = place(argv, capsys)
        assert code == 2, message
        assert err.startswith("loco: error: ") and err.count("\n") == 1, err
        assert message in err, err


def test_settings_defaults_are_the_papers_setup():
    s = parse_settings([])
    assert (s.stages, s.layers, s.width, s.seq_len, s.sequences, s.population) == (
        8, 24, 2048, 2048, 32, 100)
    assert parse_settings(["mfu=1"]).mfu == 1.0 and isinstance(PlaceSettings().mfu, float)
