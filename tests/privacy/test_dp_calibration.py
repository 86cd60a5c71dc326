"""Calibration: meets the target, warns on coarse quantisation, rejects bad parameters by name."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.accounting.accountant import epsilon_of
from aggregator.accounting.calibration import calibrate
from aggregator.accounting.calibration import honest_contributors as calibration_honest_contributors
from aggregator.accounting.events import round_dp_event
from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.noise_floor import expected_count, honest_contributors
from edge_sdk.privacy.participation import participation_event

BASE = dict(target_epsilon=3.0, delta=1e-6, cohort_size=100, rounds=100, dim=10**5, bits=20, population=10**5,
            dropout_fraction=0.05, colluding_fraction=0.05)


@pytest.mark.parametrize("mechanism", ["skellam", "discrete_gaussian"])
def test_calibration_meets_the_target_epsilon_tightly(mechanism):
    cal = calibrate(**BASE, mechanism=mechanism)
    assert cal.honest_contributors == 90
    assert 0.98 * 3.0 <= cal.epsilon <= 3.0
    # Recompute independently from the returned knobs.
    params = EncodingParams(dim=BASE["dim"], clip=cal.clip, gamma=cal.gamma, bits=20, rotation_seed=bytes(16))
    event = participation_event(params, "distributed", mechanism, cal.noise_multiplier, 90)
    assert epsilon_of({round_dp_event(event): 100}, 1e-6) == pytest.approx(cal.epsilon, rel=1e-9)
    # A slightly smaller noise multiplier would miss the target: the search returns the smallest one.
    weaker = participation_event(params, "distributed", mechanism, cal.noise_multiplier * 0.99, 90)
    assert epsilon_of({round_dp_event(weaker): 100}, 1e-6) > 3.0
    assert cal.wrap_probability <= 1e-4
    assert cal.warnings == ()


def test_self_selection_lowers_the_noise_needed():
    plain = calibrate(**BASE)
    sampled = calibrate(**BASE, self_selection=True)
    assert sampled.sampling_probability == pytest.approx(100 / 10**5)
    assert sampled.noise_multiplier < plain.noise_multiplier / 5
    assert sampled.epsilon <= 3.0


def test_coarse_quantisation_warns_that_gamma_sqrt_d_is_not_much_below_c(caplog):
    with caplog.at_level(logging.WARNING, logger="aggregator.accounting.calibration"):
        cal = calibrate(**{**BASE, "bits": 16})
    assert any("gamma*sqrt(d)" in w for w in cal.warnings)
    assert any("gamma*sqrt(d)" in r.message for r in caplog.records)
    assert cal.gamma * math.sqrt(10**5) > 0.1  # the encoded length is d itself: no padding


def test_a_gamma_that_wraps_too_often_is_warned_about():
    cal = calibrate(**BASE, gamma=1e-6)
    assert cal.wrap_probability > 1e-4
    assert any("modular clipping probability" in w for w in cal.warnings)


def test_too_few_bits_for_the_cohort_is_a_config_error():
    # 5000 devices' rounding errors alone (sub-Gaussian, proxy 1250) leave [-128, 128) with probability
    # 2 exp(-128^2 / 2500) ~ 3e-3 per coordinate, above the 1e-4 allowed, whatever gamma is.
    with pytest.raises(ConfigError, match="bits=8 is too few for a cohort of 5000"):
        calibrate(**{**BASE, "bits": 8, "cohort_size": 5000})


@pytest.mark.parametrize(
    "override, parameter",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": -1e-9}, "delta"),
        ({"delta": 1e-5}, "delta"),  # == 1 / population
        ({"delta": 0.5}, "delta"),
        ({"cohort_size": 0}, "cohort_size"),
        ({"rounds": 0}, "rounds"),
        ({"dim": 0}, "dim"),
        ({"bits": 40}, "bits"),
        ({"population": 0}, "population"),
        ({"dropout_fraction": 1.0}, "dropout_fraction"),
        ({"colluding_fraction": -0.1}, "colluding_fraction"),
        ({"dropout_fraction": 0.6, "colluding_fraction": 0.4}, "colluding_fraction"),
        ({"clip": 0.0}, "clip"),
        ({"mechanism": "gaussian"}, "mechanism"),
        ({"max_wrap_probability": 0.0}, "max_wrap_probability"),
    ],
)
def test_invalid_calibration_parameters_are_rejected_naming_the_parameter(override, parameter):
    with pytest.raises(ConfigError, match=parameter):
        calibrate(**{**BASE, **override})


def test_honest_contributors_discounts_dropouts_and_colluders():
    assert honest_contributors(100, 0.05, 0.05) == 90
    assert honest_contributors(1000, 0.1, 0.2) == 700
    assert honest_contributors(3, 0.5, 0.0) == 1


def test_honest_contributors_rounds_dropouts_and_colluders_up_like_the_secagg_finder():
    # 0.5 of a dropout and 0.5 of a colluder are one of each: 8 honest survivors at n = 10, not 9.
    assert honest_contributors(10, 0.05, 0.05) == 8
    assert honest_contributors(10, 0.0, 0.0) == 10
    assert calibrate(**{**BASE, "cohort_size": 10}).honest_contributors == 8
    assert calibration_honest_contributors is honest_contributors


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**6), fraction=st.floats(0.0, 0.999))
def test_expected_count_is_the_ceiling_of_the_expected_number(n, fraction):
    count = expected_count(fraction, n)
    assert count >= fraction * n - 1e-9 and count - 1 < fraction * n - 1e-9
    assert 0 <= count <= n


def test_calibration_divides_the_signal_by_the_rotations_spread_and_the_sensitivity_by_its_length():
    # At b = 20 the noise dominates the wrap bound, so the unpadded rotation's smaller spread (65,536
    # against 131,072) moves gamma by under 0.1%; its d = 10^5 rounded coordinates, fewer than 131,072,
    # lower the sensitivity and so the noise needed, most visibly at b = 16.
    new, old = calibrate(**BASE), calibrate(**BASE, rotation="hadamard-pow2")
    assert (new.rotation, old.rotation) == ("hadamard-overlap", "hadamard-pow2")
    assert new.gamma == pytest.approx(old.gamma, rel=1e-3) and new.gamma >= old.gamma
    assert new.noise_multiplier <= old.noise_multiplier
    coarse_new = calibrate(**{**BASE, "bits": 16})
    coarse_old = calibrate(**{**BASE, "bits": 16}, rotation="hadamard-pow2")
    assert coarse_new.noise_multiplier < 0.98 * coarse_old.noise_multiplier
    with pytest.raises(ConfigError, match="rotation"):
        calibrate(**BASE, rotation="dft")
