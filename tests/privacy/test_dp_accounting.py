"""Accountant figures against independent formulas, and the RDP curves at known points."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special, stats

from aggregator.accounting.accountant import FleetAccountant, FleetRdpAccountant, epsilon_of, make_accountant
from aggregator.accounting.events import DistributedDiscreteGaussianDpEvent, SkellamDpEvent, round_dp_event
from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.participation import participation_event
from edge_sdk.privacy.rdp import (
    DEFAULT_ORDERS,
    composed_rdp,
    discrete_gaussian_sum_epsilon,
    discrete_gaussian_sum_rdp,
    epsilon_from_rdp,
    gaussian_rdp,
    mechanism_rdp,
    poisson_subsampled_rdp,
    skellam_rdp,
)

SEED = bytes(16)


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang 2018: the exact epsilon of a Gaussian with sensitivity/std ratio mu."""

    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0.0, 500.0, xtol=1e-12)


def classic_rdp_bound(rounds: int, z: float, delta: float) -> float:
    alphas = np.linspace(1.0001, 2000, 400000)
    return float(np.min(rounds * alphas / (2 * z * z) + math.log(1 / delta) / (alphas - 1)))


@pytest.mark.parametrize("rounds, z, delta", [(100, 10.0, 1e-5), (1000, 20.0, 1e-6), (10, 1.0, 1e-5)])
def test_composed_gaussian_epsilon_lies_between_the_analytic_gaussian_and_the_classic_rdp_bound(rounds, z, delta):
    mu = math.sqrt(rounds) / z
    exact = analytic_gaussian_epsilon(mu, delta)
    classic = classic_rdp_bound(rounds, z, delta)
    counts = {dp_event.GaussianDpEvent(z): rounds}
    rdp_eps = epsilon_of(counts, delta, "rdp")
    pld_eps = epsilon_of(counts, delta, "pld")
    assert exact <= rdp_eps <= classic + 1e-9
    assert exact <= pld_eps <= classic + 1e-9
    assert pld_eps == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("q, z, rounds", [(0.01, 1.0, 1000), (0.05, 2.0, 200)])
def test_poisson_sampled_figures_match_dp_accountings_pld_accountant(q, z, rounds):
    delta = 1e-6
    sampled = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    reference = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    reference.compose(sampled, rounds)
    fine = reference.get_epsilon(delta)
    ours = epsilon_of({sampled: rounds}, delta, "pld")
    assert ours == pytest.approx(fine, rel=0.01)
    # Our generic Zhu-Wang subsampling bound (what Skellam rounds use), fed the Gaussian's curve through the
    # exactly equivalent zCDP event, never undercuts the PLD figure and still amplifies.
    zw = epsilon_of({dp_event.PoissonSampledDpEvent(q, dp_event.ZCDpEvent(rho=1 / (2 * z * z))): rounds}, delta)
    unsampled = epsilon_of({dp_event.GaussianDpEvent(z): rounds}, delta)
    assert fine * 0.99 <= zw < unsampled / 3


@settings(max_examples=12, deadline=None)
@given(q=st.floats(0.001, 0.5), z=st.floats(0.7, 5.0))
def test_zhu_wang_bound_brackets_the_exact_subsampled_gaussian_rdp(q, z):
    orders = np.arange(2, 65, dtype=np.float64)
    exact = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
    bound = poisson_subsampled_rdp(orders, q, lambda ls: gaussian_rdp(ls, z))
    # For the Gaussian the exact binomial expansion has the same terms with coefficient 1 where Zhu-Wang
    # has 3 (for l >= 3), so exact <= bound <= exact + log(3) / (alpha - 1).
    assert np.all(bound >= exact - 1e-9)
    assert np.all(bound <= exact + math.log(3.0) / (orders - 1) + 1e-9)


def skellam_renyi_divergence(alpha: int, shift: int, mu: float) -> float:
    """D_alpha(Sk(mu,mu) + shift || Sk(mu,mu)) by direct summation over the pmf (1-D)."""
    k = np.arange(-int(40 * math.sqrt(mu)) - 40, int(40 * math.sqrt(mu)) + 40 + shift)
    log_p = stats.skellam.logpmf(k - shift, mu, mu)
    log_q = stats.skellam.logpmf(k, mu, mu)
    finite = np.isfinite(log_p) & np.isfinite(log_q)  # far tails underflow; they carry nothing
    return float(special.logsumexp(alpha * log_p[finite] + (1 - alpha) * log_q[finite]) / (alpha - 1))


@pytest.mark.parametrize("mu, shift", [(2.0, 1), (10.0, 2), (50.0, 5)])
@pytest.mark.parametrize("alpha", [2, 3, 8])
def test_skellam_rdp_bounds_the_exact_renyi_divergence(mu, shift, alpha):
    exact = skellam_renyi_divergence(alpha, shift, mu)
    bound = float(skellam_rdp(np.array([alpha], dtype=float), shift, shift, mu)[0])
    assert exact <= bound
    assert bound <= 2 * exact  # and is not vacuous (it tends to the Gaussian's alpha D^2 / (4 mu))


def test_skellam_rdp_known_answer():
    # alpha=3, D1=4, D2=2, mu=10: 3*4/40 + min((5*4 + 24)/1600, 12/40) = 0.3 + 0.0275.
    assert skellam_rdp(np.array([3.0]), 4.0, 2.0, 10.0)[0] == pytest.approx(0.3275, rel=1e-12)
    # A fractional order takes the next integer's value (Renyi divergence is monotone in its order).
    assert skellam_rdp(np.array([2.5]), 4.0, 2.0, 10.0)[0] == pytest.approx(0.3275, rel=1e-12)


def test_skellam_rdp_approaches_the_gaussian_at_large_mu():
    orders = np.array([2.0, 8.0, 32.0])
    mu = 1e8
    gaussian = gaussian_rdp(orders, math.sqrt(2 * mu) / 100.0)
    np.testing.assert_allclose(skellam_rdp(orders, 100.0 * 10, 100.0, mu), gaussian, rtol=1e-4)


def test_discrete_gaussian_sum_known_answers():
    # One device: tau = 0, so e = D2 / sigma exactly (the Gaussian's zCDP).
    assert discrete_gaussian_sum_epsilon(3.0, 4.0, 1, 1000) == pytest.approx(1.5, rel=1e-12)
    # Two devices with sigma^2 = 0.25: tau = 10 exp(-2 pi^2 * 0.25 / 2), e = min(sqrt(D^2/(n s^2) + tau d/2), ...).
    tau = 10 * math.exp(-(math.pi**2) / 4)
    first = math.sqrt(4.0 / 0.5 + tau * 10 / 2)
    second = 2.0 / math.sqrt(0.5) + tau * math.sqrt(10)
    assert discrete_gaussian_sum_epsilon(2.0, 0.25, 2, 10) == pytest.approx(min(first, second), rel=1e-12)


def test_discrete_gaussian_event_carries_the_sum_and_the_host_uses_the_device_curve():
    params = EncodingParams(dim=500, clip=1.0, gamma=0.01, bits=20, rotation_seed=SEED)
    event = participation_event(params, "distributed", "discrete_gaussian", 1.0, 10)
    dp = round_dp_event(event)
    assert dp == DistributedDiscreteGaussianDpEvent(
        event.l1_sensitivity, event.l2_sensitivity, event.local_variance, 10, event.dim
    )
    acc = FleetRdpAccountant()
    acc.compose(dp, 3)
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
    expected = 3 * discrete_gaussian_sum_rdp(orders, event.l1_sensitivity, event.l2_sensitivity,
                                             event.local_variance, 10, event.dim)
    np.testing.assert_allclose(acc.rdp, expected, rtol=1e-12)


def _kls_curves(orders, l1, l2, sigma2, n, dim):
    """The four curves of KLS Thm 1 and Prop 14, written out independently."""
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)) for k in range(1, n))
    a, b = l2 / math.sqrt(n * sigma2), l1 / math.sqrt(n * sigma2)
    thm1 = [orders * (a * a + tau * dim / 2) / 2, orders * (a + tau * math.sqrt(dim)) ** 2 / 2]
    prop14 = [orders * a * a / 2 + tau * dim, orders * (a * a + 2 * b * tau + tau * tau * dim) / 2]
    return thm1, prop14


@settings(max_examples=60, deadline=None)
@given(sigma2=st.floats(0.25, 4.0), n=st.integers(2, 200), l2=st.floats(1.0, 50.0), dim=st.integers(1, 10**5))
def test_discrete_gaussian_curve_is_the_pointwise_minimum_of_thm1_and_prop14(sigma2, n, l2, dim):
    orders = DEFAULT_ORDERS
    l1 = min(l2 * l2, math.sqrt(dim) * l2)
    thm1, prop14 = _kls_curves(orders, l1, l2, sigma2, n, dim)
    curve = discrete_gaussian_sum_rdp(orders, l1, l2, sigma2, n, dim)
    alone = orders * l2 * l2 / (2 * sigma2)  # one device's discrete Gaussian, the others' noise post-processing
    np.testing.assert_allclose(curve, np.min(np.stack([*thm1, *prop14, alone]), axis=0), rtol=1e-12)
    # Never above Thm 1 (the zCDP statement used before), and the two bounds' e agree where Thm 1 rules.
    e = discrete_gaussian_sum_epsilon(l2, sigma2, n, dim)
    assert np.all(curve <= orders * e * e / 2 * (1 + 1e-12))


def test_thm1_rules_at_low_orders_and_prop14_at_high_ones_so_the_minimum_beats_both():
    # Small dim and s^2 = 0.55 (tau ~ 0.08): Thm 1 wins at orders 1.5 and 2, Prop 14 at 8 and above.
    orders = np.array([1.5, 2.0, 8.0, 1024.0])
    l2, sigma2, n, dim = 36.5, 0.55, 85, 228
    l1 = min(l2 * l2, math.sqrt(dim) * l2)
    thm1, prop14 = _kls_curves(orders, l1, l2, sigma2, n, dim)
    curve = discrete_gaussian_sum_rdp(orders, l1, l2, sigma2, n, dim)
    best_thm1, best_prop14 = np.minimum(*thm1), np.minimum(*prop14)
    np.testing.assert_allclose(curve[:2], best_thm1[:2], rtol=1e-12)
    np.testing.assert_allclose(curve[2:], best_prop14[2:], rtol=1e-12)
    assert np.all(best_thm1[:2] < best_prop14[:2] * 0.95) and np.all(best_prop14[2:] < best_thm1[2:] * 0.9)


def test_below_sigma_one_half_the_sum_is_accounted_as_one_devices_discrete_gaussian():
    orders = np.array([2.0, 10.0])
    # s = 0.4 < 1/2: Thm 1 and Prop 14 do not apply, whatever n is.
    curve = discrete_gaussian_sum_rdp(orders, 4.0, 2.0, 0.16, 100, 1000)
    np.testing.assert_allclose(curve, orders * 4.0 / (2 * 0.16), rtol=1e-12)
    assert discrete_gaussian_sum_epsilon(2.0, 0.16, 100, 1000) == pytest.approx(2.0 / 0.4)
    # At s = 1/2 the theorems apply, and with few devices in few dimensions they beat one device alone;
    # with 100 devices in 1000 dimensions tau d is so large that one device alone is the better bound.
    assert discrete_gaussian_sum_rdp(orders, 4.0, 2.0, 0.25, 3, 2)[0] < 2.0 * 4.0 / (2 * 0.25)
    np.testing.assert_allclose(discrete_gaussian_sum_rdp(orders, 4.0, 2.0, 0.25, 100, 1000), orders * 4.0 / 0.5)


def test_discrete_gaussian_with_negligible_tau_matches_dp_accountings_gaussian():
    # s^2 = 100 per device: tau ~ 1e-855, so the curve is the Gaussian's of noise multiplier sqrt(n) s / D2.
    event = DistributedDiscreteGaussianDpEvent(500.0, 50.0, 100.0, 20, 4096)
    ours, theirs = FleetRdpAccountant(), rdp_privacy_accountant.RdpAccountant()
    ours.compose(event, 40)
    theirs.compose(dp_event.GaussianDpEvent(math.sqrt(20 * 100.0) / 50.0), 40)
    np.testing.assert_allclose(ours.rdp, theirs.rdp, rtol=1e-12)
    assert ours.get_epsilon(1e-6) == pytest.approx(theirs.get_epsilon(1e-6), rel=1e-12)
    exact = analytic_gaussian_epsilon(math.sqrt(40) * 50.0 / math.sqrt(2000.0), 1e-6)
    assert exact <= ours.get_epsilon(1e-6) <= exact * 1.25


@pytest.mark.parametrize("mechanism", ["skellam", "discrete_gaussian"])
def test_claiming_amplification_never_reports_more_than_claiming_none(mechanism):
    # q = 0.95 over 10 rounds: Zhu-Wang's generic bound alone gave 11.438 against 8.866 (Skellam) and
    # 8.857 (discrete Gaussian) without amplification; capped per order it can only be lower.
    params = EncodingParams(dim=4096, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    sampled = participation_event(params, "distributed", mechanism, 2.0, 90, sampling_probability=0.95)
    plain = participation_event(params, "distributed", mechanism, 2.0, 90)
    inner = mechanism_rdp(sampled, DEFAULT_ORDERS)
    uncapped = epsilon_from_rdp(DEFAULT_ORDERS, 10 * poisson_subsampled_rdp(
        DEFAULT_ORDERS, 0.95, lambda ls: mechanism_rdp(sampled, ls)), 1e-6)
    without = epsilon_from_rdp(DEFAULT_ORDERS, 10 * inner, 1e-6)
    assert uncapped > without + 2.0  # the inversion the cap removes
    host = epsilon_of({round_dp_event(sampled): 10}, 1e-6)
    device = epsilon_from_rdp(DEFAULT_ORDERS, composed_rdp([(sampled, 10)]), 1e-6)
    assert host == pytest.approx(device, rel=1e-9)
    assert host <= epsilon_of({round_dp_event(plain): 10}, 1e-6) * (1 + 1e-12)
    assert host == pytest.approx(without, rel=1e-9)  # here the cap binds at the optimal order


@settings(max_examples=25, deadline=None)
@given(q=st.floats(0.001, 1.0), z=st.floats(0.3, 5.0), rounds=st.integers(1, 200))
def test_amplified_epsilon_is_never_above_the_unamplified_one(q, z, rounds):
    params = EncodingParams(dim=1024, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    sampled = participation_event(params, "distributed", "skellam", z, 50, sampling_probability=q)
    plain = participation_event(params, "distributed", "skellam", z, 50)
    assert epsilon_of({round_dp_event(sampled): rounds}, 1e-6) <= epsilon_of({round_dp_event(plain): rounds}, 1e-6)


def test_device_rdp_and_host_accountant_agree():
    params = EncodingParams(dim=2000, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    for mechanism in ("skellam", "discrete_gaussian"):
        for q in (None, 0.02):
            event = participation_event(params, "distributed", mechanism, 1.2, 20, q)
            device = epsilon_from_rdp(DEFAULT_ORDERS, composed_rdp([(event, 300)]), 1e-6)
            host = epsilon_of({round_dp_event(event): 300}, 1e-6)
            assert device == pytest.approx(host, rel=1e-9), (mechanism, q)


def test_skellam_without_a_self_selection_coin_gets_no_amplification():
    params = EncodingParams(dim=2000, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    plain = participation_event(params, "distributed", "skellam", 1.0, 20)
    coin = participation_event(params, "distributed", "skellam", 1.0, 20, sampling_probability=0.01)
    assert isinstance(round_dp_event(plain), SkellamDpEvent)
    assert isinstance(round_dp_event(coin), dp_event.PoissonSampledDpEvent)
    assert isinstance(round_dp_event(coin, local_only=True), SkellamDpEvent)  # local never amplified
    assert epsilon_of({round_dp_event(coin): 100}, 1e-6) < epsilon_of({round_dp_event(plain): 100}, 1e-6) / 5


def test_fleet_accountant_reports_fleet_and_local_epsilon_every_round():
    params = EncodingParams(dim=4096, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    fleet = participation_event(params, "distributed", "skellam", 2.0, 50)
    accountant = FleetAccountant(delta=1e-6)
    reports = []
    for r in range(6):
        participants = {"dev-a": fleet} if r % 2 else {"dev-a": fleet, "dev-b": fleet}
        reports.append(accountant.record_round(f"round-{r}", fleet, participants))
    eps = [rep.epsilon for rep in reports]
    assert eps == sorted(eps) and eps[0] > 0
    last = reports[-1]
    assert last.rounds == 6
    # dev-b took part in 3 rounds, dev-a in 6; each device's own noise (1/50 of the total) is weak.
    assert last.local_epsilon["dev-b"] < last.local_epsilon["dev-a"]
    assert last.local_epsilon["dev-a"] > last.epsilon
    expected_local = epsilon_of({round_dp_event(fleet, local_only=True): 6}, 1e-6)
    assert last.local_epsilon["dev-a"] == pytest.approx(expected_local, rel=1e-9)


def test_off_mode_rounds_are_accounted_as_non_private():
    params = EncodingParams(dim=100, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    off = participation_event(params, "off", "skellam", 1.0, 10)
    assert isinstance(round_dp_event(off), dp_event.NonPrivateDpEvent)
    assert math.isinf(epsilon_of({round_dp_event(off): 1}, 1e-6))


def test_pld_accountant_says_plainly_it_cannot_handle_skellam():
    with pytest.raises(dp_accounting.UnsupportedEventError):
        epsilon_of({SkellamDpEvent(10.0, 5.0, 100.0): 3}, 1e-6, "pld")


def test_fleet_rdp_accountant_composes_skellam_by_count():
    event = SkellamDpEvent(10.0, 5.0, 100.0)
    by_count = FleetRdpAccountant()
    by_count.compose(dp_event.SelfComposedDpEvent(event, 50))
    one_by_one = FleetRdpAccountant()
    for _ in range(50):
        one_by_one.compose(event)
    np.testing.assert_allclose(by_count.rdp, one_by_one.rdp, rtol=1e-12)


def test_unknown_accountant_and_bad_delta_are_config_errors():
    with pytest.raises(ConfigError, match="accountant"):
        make_accountant("prv")
    with pytest.raises(ConfigError, match="delta"):
        FleetAccountant(delta=0.0)


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(1e-4, 50.0),
    power=st.floats(0.5, 2.0),
    delta=st.floats(1e-12, 1e-2),
)
def test_device_epsilon_conversion_equals_dp_accountings(scale, power, delta):
    orders = DEFAULT_ORDERS
    rdp = scale * orders**power
    ours = epsilon_from_rdp(orders, rdp, delta)
    theirs = rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(mu=st.floats(1.0, 1e7), l2=st.floats(0.5, 1e3), dim=st.integers(1, 10**6))
def test_skellam_rdp_is_never_below_the_gaussian_of_equal_variance(mu, l2, dim):
    l1 = min(l2 * l2, math.sqrt(dim) * l2)
    orders = np.arange(2, 40, dtype=np.float64)
    gaussian = gaussian_rdp(orders, math.sqrt(2 * mu) / l2)
    assert np.all(skellam_rdp(orders, l1, l2, mu) >= gaussian * (1 - 1e-12))


@settings(max_examples=30, deadline=None)
@given(sigma2=st.floats(4.0, 1e6), n=st.integers(1, 1000), l2=st.floats(1.0, 100.0))
def test_discrete_gaussian_sum_tends_to_the_gaussian_of_the_summed_variance(sigma2, n, l2):
    e = discrete_gaussian_sum_epsilon(l2, sigma2, n, 10**6)
    gaussian_e = l2 / math.sqrt(n * sigma2)
    assert e >= gaussian_e * (1 - 1e-12)
    # With local sigma^2 >= 4 the tau term is below 10 n exp(-4 pi^2) ~ 1e-14 n: negligible.
    assert e == pytest.approx(gaussian_e, rel=1e-6)
