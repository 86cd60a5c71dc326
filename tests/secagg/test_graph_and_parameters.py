"""Self-drawn share holders, mask partners, and the (k, t) finder and checks."""

from __future__ import annotations

import hashlib
from collections import Counter
from fractions import Fraction

import pytest
from scipy.stats import chisquare, hypergeom

from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.graph import holder_seed, mask_partners, share_holders
from edge_sdk.secagg.parameters import (
    ThreatModel,
    check_parameters,
    choose_parameters,
    consistency_quorum,
    expected_count,
    hypergeometric_tail,
    noise_floor_shortfall,
)

COHORT = tuple(f"d{i:03d}" for i in range(50))


def _seed(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


def test_holders_are_distinct_other_cohort_members_and_fixed_by_the_seed():
    drawn = share_holders(COHORT, 7, 12, _seed(1))
    assert len(drawn) == len(set(drawn)) == 12 and "d007" not in drawn and set(drawn) <= set(COHORT)
    assert share_holders(COHORT, 7, 12, _seed(1)) == drawn
    assert share_holders(COHORT, 7, 12, _seed(2)) != drawn


def test_a_larger_k_extends_the_same_draw_so_choosing_k_rerolls_nothing():
    assert share_holders(COHORT, 3, 20, _seed(5))[:8] == share_holders(COHORT, 3, 8, _seed(5))


def test_k_beyond_the_cohort_takes_every_other_member():
    assert sorted(share_holders(COHORT[:5], 0, 30, _seed(3))) == ["d001", "d002", "d003", "d004"]


def test_holder_draws_are_uniform_over_the_other_members():
    counts = Counter(v for i in range(2000) for v in share_holders(COHORT, 0, 4, _seed(i)))
    assert "d000" not in counts
    observed = [counts[d] for d in COHORT[1:]]
    assert chisquare(observed).pvalue > 1e-4


def test_the_seed_binds_the_round_nonce_and_every_advert_field():
    base = ("dev", b"c" * 32, b"s" * 32, b"h" * 32)
    seed = holder_seed(b"n" * 32, *base)
    variants = [holder_seed(b"N" * 32, *base), holder_seed(b"n" * 32, "dew", *base[1:]),
                holder_seed(b"n" * 32, "dev", b"C" * 32, *base[2:]),
                holder_seed(b"n" * 32, *base[:2], b"S" * 32, base[3]),
                holder_seed(b"n" * 32, *base[:3], b"H" * 32)]
    assert len({seed, *variants}) == 6


def test_mask_partners_are_the_symmetric_union_of_draws_within_the_members():
    members = set(COHORT[:40])
    holders = {u: set(share_holders(COHORT, COHORT.index(u), 6, _seed(i))) & members
               for i, u in enumerate(sorted(members))}
    partners = mask_partners(holders, members)
    for u, ps in partners.items():
        assert u not in ps and set(ps) >= holders[u] and set(ps) <= members
        for v in ps:
            assert u in partners[v] and (v in holders[u] or u in holders[v])


def test_a_position_outside_the_cohort_is_refused():
    with pytest.raises(SecAggConfigError, match="outside a cohort"):
        share_holders(COHORT, 50, 3, _seed(0))


@pytest.mark.parametrize(
    ("n", "model", "k", "t"),
    [(100, "active", 12, 7), (1000, "active", 29, 17), (10_000, "active", 33, 19),
     (100, "honest-but-curious", 11, 6), (1000, "honest-but-curious", 29, 17)],
)
def test_finder_reproduces_the_reference_points_at_5_percent(n, model, k, t):
    params = choose_parameters(n, 0.05, 0.05, ThreatModel(model))
    assert (params.degree, params.threshold) == (k, t)


@pytest.mark.parametrize("n", [100, 1000])
def test_finder_choice_meets_both_bounds_the_majority_and_the_next_smaller_k_cannot(n):
    params = choose_parameters(n, 0.05, 0.05)
    bad = n * 5 // 100
    k, t = params.degree, params.threshold
    assert 2 * t > k + 1
    assert n * hypergeometric_tail(n - 1, bad, k, t) <= Fraction(1, 2**40)
    assert n * hypergeometric_tail(n - 1, bad, k, k - t + 1) <= Fraction(1, 2**20)
    smaller = k - 1
    acceptable = [u for u in range(2, smaller + 2) if 2 * u > smaller + 1
                  and n * hypergeometric_tail(n - 1, bad, smaller, u) <= Fraction(1, 2**40)]
    assert all(n * hypergeometric_tail(n - 1, bad, smaller, smaller - u + 1) > Fraction(1, 2**20)
               for u in acceptable)


def test_devices_refuse_a_server_chosen_k_or_t_weaker_than_their_own_assumptions():
    check_parameters(100, 12, 7, 0.05)
    with pytest.raises(SecAggConfigError, match="strict majority"):
        check_parameters(100, 12, 6, 0.05)  # the old honest-but-curious point
    with pytest.raises(SecAggConfigError, match="outside"):
        check_parameters(100, 12, 1, 0.05)
    with pytest.raises(SecAggConfigError, match="probability above 2\\^-40"):
        check_parameters(100, 2, 2, 0.05)  # t=2 of k=2: two colluders are enough
    with pytest.raises(SecAggConfigError, match="probability above"):
        check_parameters(100, 12, 7, 0.30)  # a device that assumes more collusion asks for more
    check_parameters(100, 11, 6, 0.05, ThreatModel.HONEST_BUT_CURIOUS)


def test_quorum_makes_any_two_views_share_an_honest_signer():
    for members, colluding in [(100, 5), (1000, 50), (11, 1), (2, 0)]:
        q = consistency_quorum(members, colluding, 2, ThreatModel.ACTIVE)
        assert 2 * q - members > colluding and q <= members
        assert 2 * (q - 1) - members <= colluding  # and it is the smallest such quorum
    assert consistency_quorum(100, 5, 7, ThreatModel.HONEST_BUT_CURIOUS) == 7


def test_noise_floor_discounts_colluders_and_rounds_them_up():
    assert expected_count(0.05, 10) == 1 and expected_count(0.05, 100) == 5 and expected_count(0.0, 100) == 0
    assert noise_floor_shortfall(95, 5, 90) is None
    assert "t_honest=90" in noise_floor_shortfall(94, 5, 90)


@pytest.mark.parametrize(
    ("population", "successes", "draws", "at_least"), [(99, 5, 12, 3), (999, 50, 30, 4), (50, 10, 8, 0)]
)
def test_exact_hypergeometric_tail_agrees_with_scipy(population, successes, draws, at_least):
    exact = hypergeometric_tail(population, successes, draws, at_least)
    assert float(exact) == pytest.approx(hypergeom.sf(at_least - 1, population, successes, draws), rel=1e-9)


def test_more_dropouts_need_a_larger_degree():
    assert choose_parameters(1000, 0.2, 0.05).degree > choose_parameters(1000, 0.05, 0.05).degree
    assert choose_parameters(100, 0.05, 0.05).degree >= choose_parameters(100, 0.05, 0.05, "honest-but-curious").degree


def test_finder_explains_impossible_requests():
    with pytest.raises(SecAggConfigError, match="no threshold"):
        choose_parameters(3, 0.05, 0.05)
    with pytest.raises(SecAggConfigError, match=r"dropout_fraction must be in \[0, 1\)"):
        choose_parameters(100, 1.0, 0.05)
    with pytest.raises(SecAggConfigError, match="at least 2 devices"):
        choose_parameters(1, 0.0, 0.0)
