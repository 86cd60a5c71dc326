"""The calibrated gamma keeps the realised fraction of wrapped coordinates under the tail bound.

Real updates go through the real encoder at the calibrated gamma and bits; n devices' encodings are
summed mod 2^b, and a coordinate counts as wrapped when the true integer sum (the same encodings
at 32 bits, same randomness) lies outside [-2^(b-1), 2^(b-1)). The check is a one-sided
Clopper-Pearson bound at confidence 1 - 1e-6; a control at half the gamma shows it can fail.
DIM is not a power of two: the encoding has exactly DIM entries and the bound divides the signal by
the rotation's spread (its window, 4096), not by DIM.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aggregator.accounting.calibration import smallest_gamma, wrap_probability
from edge_sdk.privacy.encoding import EncodingParams, centre, encode_update
from edge_sdk.privacy.noise import noise_mechanism
from edge_sdk.privacy.participation import participation_event
from edge_sdk.privacy.rotation import window_dimension

N_DEVICES, T_HONEST, DIM, BITS, CLIP, Z = 20, 18, 6000, 12, 1.0, 1.0
SPREAD = window_dimension(DIM)  # 4096: the overlap rotation's spread_dim
MAX_WRAP = 0.02  # large enough that wraps are counted in the hundreds, so the test has power
TRIALS = 12
CONFIDENCE = 1e-6


def common_update(shape: str, rng: np.random.Generator) -> np.ndarray:
    """What every device sends: a dense direction, or a spike on the last coordinate, which the
    second window alone spreads, so its coordinates sit exactly at the proxy ||x||^2 / SPREAD."""
    if shape == "spike":
        update = np.zeros(DIM)
        update[-1] = 1.0
    else:
        update = rng.standard_normal(DIM)
    return update * (0.999 * CLIP / np.linalg.norm(update))


def wrapped_and_total(gamma: float, mechanism: str, seed: int, shape: str = "dense") -> tuple[int, int]:
    """Wrapped coordinates over TRIALS rounds of N_DEVICES identical updates (the worst-case signal)."""
    rng = np.random.default_rng(seed)
    half = 1 << (BITS - 1)
    wrapped = total = 0
    for _ in range(TRIALS):
        rotation_seed = rng.bytes(16)
        narrow = EncodingParams(dim=DIM, clip=CLIP, gamma=gamma, bits=BITS, rotation_seed=rotation_seed)
        wide = EncodingParams(dim=DIM, clip=CLIP, gamma=gamma, bits=32, rotation_seed=rotation_seed)
        assert (narrow.padded_dim, narrow.spread_dim) == (DIM, SPREAD)
        variance = participation_event(narrow, "distributed", mechanism, Z, T_HONEST).local_variance
        update = common_update(shape, rng)  # every device sends the same full-norm update
        modular = np.zeros(DIM, dtype=np.int64)
        exact = np.zeros(DIM, dtype=np.int64)
        for _device in range(N_DEVICES):
            device_seed = int(rng.integers(1 << 62))
            encoded = encode_update(update, narrow, noise_mechanism(mechanism), variance,
                                    np.random.default_rng(device_seed))
            encoded_wide = encode_update(update, wide, noise_mechanism(mechanism), variance,
                                         np.random.default_rng(device_seed))
            assert np.array_equal(encoded_wide & ((1 << BITS) - 1), encoded)  # same randomness, same values
            modular = (modular + encoded) % (1 << BITS)
            exact += centre(encoded_wide, 32)
        outside = (exact < -half) | (exact >= half)
        # Where nothing wrapped the modular sum is the exact sum; where it wrapped it is not.
        assert np.array_equal(centre(modular, BITS)[~outside], exact[~outside])
        assert not np.any(centre(modular, BITS)[outside] == exact[outside])
        wrapped += int(outside.sum())
        total += DIM
    return wrapped, total


@pytest.mark.parametrize("shape", ["dense", "spike"])
@pytest.mark.parametrize("mechanism", ["skellam", "discrete_gaussian"])
def test_realised_wrap_rate_is_within_the_tail_bound_at_the_calibrated_gamma(mechanism, shape):
    gamma = smallest_gamma(CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, MAX_WRAP, mechanism)
    bound = wrap_probability(gamma, CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, mechanism)
    assert bound == pytest.approx(MAX_WRAP, rel=1e-6)  # the smallest gamma meets the target exactly
    wrapped, total = wrapped_and_total(gamma, mechanism, seed=7, shape=shape)
    upper = stats.beta.ppf(1 - CONFIDENCE, wrapped + 1, total - wrapped)  # Clopper-Pearson, one-sided
    assert wrapped > 0  # the bound is exercised, not vacuous
    assert upper <= bound, f"{wrapped}/{total} wrapped: rate up to {upper:.4g} against the bound {bound:.4g}"


@pytest.mark.parametrize("mechanism", ["skellam", "discrete_gaussian"])
def test_the_wrap_rate_check_fails_at_half_the_calibrated_gamma(mechanism):
    gamma = smallest_gamma(CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, MAX_WRAP, mechanism) / 2
    wrapped, total = wrapped_and_total(gamma, mechanism, seed=8)
    lower = stats.beta.ppf(CONFIDENCE, wrapped, total - wrapped + 1)
    assert lower > MAX_WRAP  # the realised rate is certainly above the target: the test above can fail


def test_skellam_tail_is_heavier_than_the_gaussian_so_it_needs_a_larger_gamma():
    gaussian = smallest_gamma(CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, 1e-6, "discrete_gaussian")
    skellam = smallest_gamma(CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, 1e-6, "skellam")
    assert skellam > gaussian


def test_wrap_bound_known_answer_for_a_sub_gaussian_sum():
    # Discrete Gaussian: proxy s = (nC/g)^2/S + n/4 + n (zC/g)^2/t; P <= 2 exp(-h^2 / (2 s)).
    g = 0.01
    s = (N_DEVICES * CLIP / g) ** 2 / SPREAD + N_DEVICES / 4 + N_DEVICES * (Z * CLIP / g) ** 2 / T_HONEST
    expected = 2 * np.exp(-(2048.0**2) / (2 * s))
    assert wrap_probability(g, CLIP, Z, N_DEVICES, T_HONEST, SPREAD, BITS, "discrete_gaussian") == pytest.approx(
        expected, rel=1e-12
    )
