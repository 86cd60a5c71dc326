"""Stochastic rounding is unbiased; conditional rounding enforces its L2 bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.privacy.rounding import (
    RoundingError,
    conditional_stochastic_round,
    rounded_l2_bound,
    stochastic_round,
)


def test_stochastic_rounding_is_unbiased_per_coordinate():
    rng = np.random.default_rng(7)
    x = np.array([0.25, -1.75, 3.5, 10.0, -0.1], dtype=np.float64)
    draws = np.stack([stochastic_round(x, rng) for _ in range(20000)])
    assert set(np.unique(draws[:, 0])) == {0, 1}
    assert np.all(draws[:, 3] == 10)
    # Each mean is a Bernoulli(frac) average: 6 standard deviations of 20000 draws, <= 0.5/sqrt(20000).
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=6 * 0.5 / math.sqrt(20000))


def test_stochastic_rounding_error_variance_is_frac_times_one_minus_frac():
    rng = np.random.default_rng(8)
    x = rng.uniform(-50, 50, 200000).astype(np.float32)
    err = stochastic_round(x, rng) - x.astype(np.float64)
    frac = x - np.floor(x)
    expected = float(np.mean(frac * (1 - frac)))
    assert abs(float(np.mean(err**2)) - expected) < 0.01 * expected


def test_rounded_l2_bound_known_answer():
    # c = 10, d = 100, beta = exp(-0.5): sqrt(2 log(1/beta)) = 1, so bound^2 = 100 + 25 + (10 + 5) = 140.
    assert rounded_l2_bound(10.0, 100, math.exp(-0.5)) == pytest.approx(math.sqrt(140.0), rel=1e-12)
    # Tiny c: the deterministic bound c + sqrt(d) = 0 + 1 is the smaller one for d = 1.
    assert rounded_l2_bound(0.0, 1) == pytest.approx(min(1.0, math.sqrt(0.25 + 0.5)))


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 500), norm=st.floats(0.0, 200.0), seed=st.integers(0, 2**32 - 1))
def test_conditional_rounding_always_respects_its_bound(dim, norm, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dim)
    x *= norm / max(np.linalg.norm(x), 1e-12)
    bound = rounded_l2_bound(norm, dim)
    rounded = conditional_stochastic_round(x, bound, rng)
    assert rounded.dtype == np.int64
    assert float(np.linalg.norm(rounded)) <= bound + 1e-9
    assert np.all(np.abs(rounded - x) < 1.0)


def test_conditional_rounding_raises_when_the_bound_is_unreachable():
    x = np.full(16, 0.5)
    with pytest.raises(RoundingError, match="L2 bound"):
        conditional_stochastic_round(x, 0.1, np.random.default_rng(0), max_tries=20)
