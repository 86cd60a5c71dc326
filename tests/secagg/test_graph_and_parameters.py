"""The neighbour graph and the (k, t) parameter finder."""

from __future__ import annotations

from fractions import Fraction

import pytest
from scipy.stats import hypergeom

from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.graph import neighbour_graph, neighbours_of, ring_order
from edge_sdk.secagg.parameters import choose_parameters, hypergeometric_tail

MEMBERS = [f"d{i:03d}" for i in range(50)]


def test_graph_is_k_regular_and_symmetric():
    graph = neighbour_graph(MEMBERS, 8, b"\x01" * 32)
    for device, neighbours in graph.items():
        assert len(neighbours) == 8 and device not in neighbours
        for other in neighbours:
            assert device in graph[other]


def test_graph_is_fixed_by_the_session_id_and_changes_with_it():
    a = neighbour_graph(MEMBERS, 8, b"\x01" * 32)
    assert neighbour_graph(MEMBERS, 8, b"\x01" * 32) == a
    assert neighbour_graph(MEMBERS, 8, b"\x02" * 32) != a


@pytest.mark.parametrize(("n", "k"), [(50, 8), (50, 2), (5, 4), (5, 30)], ids=["sparse", "ring", "full", "k>n"])
def test_one_devices_neighbours_match_the_servers_whole_graph(n, k):
    graph = neighbour_graph(MEMBERS[:n], k, b"\x03" * 32)
    assert {m: neighbours_of(MEMBERS[:n], k, b"\x03" * 32, m) for m in MEMBERS[:n]} == graph


def test_ring_order_is_a_permutation_drawn_without_bias_towards_identity():
    orders = [ring_order(50, bytes([i]) * 32) for i in range(20)]
    for order in orders:
        assert sorted(order) == list(range(50))
    fixed_points = sum(sum(o[i] == i for i in range(50)) for o in orders)
    assert fixed_points < 20 * 5  # a random permutation has 1 fixed point on average


def test_small_cohorts_get_the_complete_graph():
    graph = neighbour_graph(MEMBERS[:5], 4, b"s" * 32)
    assert graph["d000"] == ("d001", "d002", "d003", "d004")
    assert neighbour_graph(MEMBERS[:5], 30, b"s" * 32) == graph


def test_odd_degree_below_n_minus_1_is_refused():
    with pytest.raises(SecAggConfigError, match="even degree"):
        neighbour_graph(MEMBERS, 7, b"s" * 32)


@pytest.mark.parametrize(("n", "k", "t"), [(100, 12, 6), (1000, 30, 17), (10_000, 34, 20)])
def test_finder_reproduces_the_reference_points_at_5_percent(n, k, t):
    params = choose_parameters(n, 0.05, 0.05)
    assert (params.degree, params.threshold) == (k, t)


@pytest.mark.parametrize("n", [100, 1000])
def test_finder_choice_meets_both_bounds_and_the_next_smaller_degree_cannot(n):
    params = choose_parameters(n, 0.05, 0.05)
    bad = n * 5 // 100
    k, t = params.degree, params.threshold
    assert n * hypergeometric_tail(n - 1, bad, k, t) <= Fraction(1, 2**40)
    assert n * hypergeometric_tail(n - 1, bad, k, k - t + 1) <= Fraction(1, 2**20)
    assert n * hypergeometric_tail(n - 1, bad, k, t - 1) > Fraction(1, 2**40)  # t is the smallest secure
    smaller = k - 2
    secure_ts = [
        u for u in range(2, smaller + 1) if n * hypergeometric_tail(n - 1, bad, smaller, u) <= Fraction(1, 2**40)
    ]
    assert all(n * hypergeometric_tail(n - 1, bad, smaller, smaller - u + 1) > Fraction(1, 2**20) for u in secure_ts)


@pytest.mark.parametrize(
    ("population", "successes", "draws", "at_least"), [(99, 5, 12, 3), (999, 50, 30, 4), (50, 10, 8, 0)]
)
def test_exact_hypergeometric_tail_agrees_with_scipy(population, successes, draws, at_least):
    exact = hypergeometric_tail(population, successes, draws, at_least)
    assert float(exact) == pytest.approx(hypergeom.sf(at_least - 1, population, successes, draws), rel=1e-9)


def test_more_dropouts_need_a_larger_degree():
    assert choose_parameters(1000, 0.2, 0.05).degree > choose_parameters(1000, 0.05, 0.05).degree


def test_finder_explains_impossible_requests():
    with pytest.raises(SecAggConfigError, match="no threshold"):
        choose_parameters(3, 0.05, 0.05)
    with pytest.raises(SecAggConfigError, match=r"dropout_fraction must be in \[0, 1\)"):
        choose_parameters(100, 1.0, 0.05)
    with pytest.raises(SecAggConfigError, match="at least 2 devices"):
        choose_parameters(1, 0.0, 0.0)
