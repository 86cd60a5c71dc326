"""Integer noise: the summed noise has the intended variance and law, for both mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.modes import PrivacyMode, local_noise_variance
from edge_sdk.privacy.noise import (
    NOISE_MECHANISMS,
    DiscreteGaussianNoise,
    SkellamNoise,
    fresh_noise_generator,
    noise_mechanism,
)


def variance_in_99_band(samples: np.ndarray, sigma2: float) -> bool:
    """Chi-square 99% confidence band for the variance of (near-)normal samples with known mean 0."""
    n = samples.size
    s = float(np.sum(samples.astype(np.float64) ** 2))
    low, high = stats.chi2.ppf([0.005, 0.995], n)
    return low * sigma2 / n <= s / n <= high * sigma2 / n


@pytest.mark.parametrize("name", sorted(NOISE_MECHANISMS))
def test_summed_noise_of_many_devices_has_the_central_variance(name):
    mechanism = noise_mechanism(name)
    rng = np.random.default_rng(2024)
    sigma2, devices, coords = 400.0, 50, 4000
    total = np.zeros(coords, dtype=np.int64)
    for _ in range(devices):
        total += mechanism.sample(coords, sigma2 / devices, rng)
    assert variance_in_99_band(total, sigma2)
    # ...and the band is tight enough to catch a variance that is 10% off.
    assert not variance_in_99_band(total, 1.1 * sigma2)
    assert not variance_in_99_band(total, 0.9 * sigma2)


def test_sum_of_skellam_noise_is_skellam_with_the_summed_parameter():
    rng = np.random.default_rng(99)
    devices, mu_each, n = 8, 0.75, 60000
    total = sum(SkellamNoise().sample(n, 2 * mu_each, rng) for _ in range(devices))
    mu = devices * mu_each
    values, counts = np.unique(total, return_counts=True)
    expected = stats.skellam.pmf(values, mu, mu) * n
    keep = expected >= 20  # pool the tails
    observed = np.append(counts[keep], counts[~keep].sum())
    expected_pooled = np.append(expected[keep], n - expected[keep].sum())
    chi2 = float(np.sum((observed - expected_pooled) ** 2 / expected_pooled))
    assert stats.chi2.sf(chi2, observed.size - 1) > 1e-3
    # The same test rejects the law of a Skellam whose parameter is 20% off.
    wrong = stats.skellam.pmf(values, 1.2 * mu, 1.2 * mu) * n
    wrong_pooled = np.append(wrong[keep], n - wrong[keep].sum())
    chi2_wrong = float(np.sum((observed - wrong_pooled) ** 2 / wrong_pooled))
    assert stats.chi2.sf(chi2_wrong, observed.size - 1) < 1e-6


@pytest.mark.parametrize("sigma2", [0.3, 2.0, 30.0])
def test_discrete_gaussian_sampler_matches_its_pmf(sigma2):
    n = 50000
    samples = DiscreteGaussianNoise().sample(n, sigma2, np.random.default_rng(int(sigma2 * 10)))
    support = np.arange(-int(12 * math.sqrt(sigma2)) - 3, int(12 * math.sqrt(sigma2)) + 4)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma2))
    pmf = weights / weights.sum()
    values, counts = np.unique(samples, return_counts=True)
    observed = np.zeros(support.size)
    observed[np.searchsorted(support, values)] = counts
    expected = pmf * n
    keep = expected >= 20
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], n - expected[keep].sum())
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    assert stats.chi2.sf(chi2, obs.size - 1) > 1e-3


def test_zero_variance_adds_no_noise_and_negative_variance_is_rejected():
    for mechanism in NOISE_MECHANISMS.values():
        assert not mechanism.sample(100, 0.0, np.random.default_rng(0)).any()
        with pytest.raises(ConfigError, match="variance"):
            mechanism.sample(10, -1.0, np.random.default_rng(0))


def test_unknown_mechanism_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="discrete_gaussian.*skellam"):
        noise_mechanism("laplace")


def test_fresh_noise_generators_are_independent_streams():
    a = fresh_noise_generator().integers(0, 2**63, 4)
    b = fresh_noise_generator().integers(0, 2**63, 4)
    assert not np.array_equal(a, b)


def test_each_mode_sets_the_local_variance_for_its_trust_model():
    assert local_noise_variance(PrivacyMode.DISTRIBUTED, 100.0, 20) == pytest.approx(5.0)
    assert local_noise_variance(PrivacyMode.LOCAL, 100.0, 20) == pytest.approx(100.0)
    assert local_noise_variance(PrivacyMode.OFF, 100.0, 20) == 0.0
    with pytest.raises(ConfigError, match="t_honest"):
        local_noise_variance(PrivacyMode.DISTRIBUTED, 100.0, 0)
    with pytest.raises(ConfigError, match="privacy mode"):
        PrivacyMode.parse("central")


def test_noise_generator_is_seeded_with_128_bits_of_os_entropy(monkeypatch):
    import edge_sdk.privacy.noise as noise_module

    calls = []

    def fake_randbits(k):
        calls.append(k)
        return (1 << 127) | 12345

    monkeypatch.setattr(noise_module.secrets, "randbits", fake_randbits)
    generator = fresh_noise_generator()
    assert calls == [128]
    assert generator.bit_generator.seed_seq.entropy == (1 << 127) | 12345


def test_self_selection_coin_has_the_configured_probability():
    from edge_sdk.privacy.sampling import self_select

    flips = [self_select(0.3) for _ in range(20000)]
    assert abs(sum(flips) / 20000 - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)
    assert all(self_select(1.0) for _ in range(100))
    with pytest.raises(ConfigError, match="sampling_probability"):
        self_select(0.0)
