"""Encoder and decoder: round trips, rounding error against its analytic variance, wrap-around."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.accounting.calibration import calibrate, smallest_gamma, wrap_probability
from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import (
    EncodingParams,
    centre,
    clip_l2,
    decode_sum,
    encode_update,
    scale,
)
from edge_sdk.privacy.modes import PrivacyMode, local_noise_variance
from edge_sdk.privacy.noise import noise_mechanism

SEED = bytes(range(16))
SKELLAM = noise_mechanism("skellam")


def modular_sum(vectors, bits):
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v  # uint32 wraps mod 2^32, and 2^bits divides 2^32
    return total & np.uint32((1 << bits) - 1) if bits < 32 else total


@pytest.mark.parametrize("rotation, length", [("hadamard-overlap", 1000), ("hadamard-pow2", 1024)])
def test_encoded_update_is_uint32_mod_2_to_the_bits_of_the_rotations_length(rotation, length):
    params = EncodingParams(dim=1000, clip=1.0, gamma=1e-3, bits=16, rotation_seed=SEED, rotation=rotation)
    x = np.random.default_rng(0).standard_normal(1000)
    encoded = encode_update(x, params, SKELLAM, 25.0, np.random.default_rng(1))
    assert encoded.dtype == np.uint32 and encoded.shape == (length,) == (params.padded_dim,)
    assert int(encoded.max()) < 1 << 16


def test_the_default_rotation_encodes_without_padding():
    params = EncodingParams(dim=10**5, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED)
    assert params.rotation == "hadamard-overlap"
    assert params.padded_dim == 10**5 and params.spread_dim == 65536
    legacy = EncodingParams(dim=10**5, clip=1.0, gamma=1e-3, bits=20, rotation_seed=SEED, rotation="hadamard-pow2")
    assert legacy.padded_dim == legacy.spread_dim == 131072
    assert params.l2_sensitivity < legacy.l2_sensitivity  # fewer rounded coordinates, smaller rounded-norm bound


def test_round_trip_at_d_1e5_without_padding_decodes_the_mean_within_the_quantisation_bound():
    rng = np.random.default_rng(100)
    dim, devices, bits, gamma = 100_000, 8, 20, 2e-4
    params = EncodingParams(dim=dim, clip=1.0, gamma=gamma, bits=bits, rotation_seed=SEED)
    updates = [clip_l2(rng.standard_normal(dim) * (0.3 + 0.1 * k) / np.sqrt(dim), 1.0).copy() for k in range(devices)]
    updates[0][-1] = 0.5  # a spike in the coordinates only the second window reaches
    encoded = [encode_update(u, params, SKELLAM, 0.0, rng) for u in updates]
    assert all(e.shape == (dim,) and e.dtype == np.uint32 for e in encoded)  # what SecAgg+ masks: d entries
    mean = decode_sum(modular_sum(encoded, bits), params, devices)
    assert mean.shape == (dim,)
    err = float(np.linalg.norm(mean - np.mean(updates, axis=0)))
    assert err <= gamma * np.sqrt(dim) / np.sqrt(devices)  # about gamma*sqrt(d/(4n)) expected: half the bound
    assert err >= 0.2 * gamma * np.sqrt(dim / (4 * devices))  # and the rounding really happened


def test_encoding_params_round_trip_through_plain_data_and_old_records_mean_pow2():
    params = EncodingParams(dim=1000, clip=1.5, gamma=1e-3, bits=16, rotation_seed=SEED)
    assert EncodingParams.from_dict(params.to_dict()) == params
    old = {k: v for k, v in params.to_dict().items() if k != "rotation"}  # written before the field existed
    assert EncodingParams.from_dict(old).rotation == "hadamard-pow2"
    assert EncodingParams.from_dict(old).padded_dim == 1024
    with pytest.raises(ConfigError, match="malformed encoding parameters"):
        EncodingParams.from_dict({"dim": 10})
    with pytest.raises(ConfigError, match="rotation"):
        EncodingParams.from_dict({**params.to_dict(), "rotation": "dft"})


def test_pow2_encodings_still_decode():
    rng = np.random.default_rng(4)
    params = EncodingParams(dim=300, clip=1.0, gamma=1e-4, bits=24, rotation_seed=SEED, rotation="hadamard-pow2")
    update = clip_l2(rng.standard_normal(300), 1.0).copy()
    mean = decode_sum(encode_update(update, params, SKELLAM, 0.0, rng), params, 1)
    assert mean.shape == (300,)
    assert float(np.linalg.norm(mean - update)) <= 1e-4 * np.sqrt(512)


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 2000),
    devices=st.integers(1, 12),
    bits=st.integers(18, 32),
    seed=st.integers(0, 2**31),
    rotation=st.sampled_from(["hadamard-overlap", "hadamard-pow2"]),
)
def test_noiseless_round_trip_is_within_the_quantisation_bound(dim, devices, bits, seed, rotation):
    rng = np.random.default_rng(seed)
    gamma = 1e-3
    params = EncodingParams(dim=dim, clip=1.0, gamma=gamma, bits=bits, rotation_seed=SEED, rotation=rotation)
    updates = [clip_l2(rng.standard_normal(dim), 1.0).copy() for _ in range(devices)]
    encoded = [encode_update(u, params, SKELLAM, 0.0, rng) for u in updates]
    mean = decode_sum(modular_sum(encoded, bits), params, devices)
    # Each device's rounding error has L2 norm <= (its conditional bound - unrounded norm) <= gamma * sqrt(D);
    # the decoded mean's error is the average of those, rotated back (an isometry).
    err = float(np.linalg.norm(mean - np.mean(updates, axis=0)))
    assert err <= gamma * np.sqrt(params.padded_dim) + 1e-4


def test_round_trip_mse_matches_the_analytic_rounding_variance():
    rng = np.random.default_rng(11)
    dim, devices, gamma = 4000, 5, 2e-3
    params = EncodingParams(dim=dim, clip=1.0, gamma=gamma, bits=24, rotation_seed=SEED)
    updates = [clip_l2(rng.standard_normal(dim) * 0.02, 1.0).copy() for _ in range(devices)]
    # Analytic: the rotated, scaled value v rounds with error variance f(1-f), f = v - floor(v). The inverse
    # rotation gives every output coordinate the average of those variances, and the mean divides by n^2.
    frac_var = 0.0
    for u in updates:
        v = scale(params.rotator.rotate(u), gamma).astype(np.float64)
        f = v - np.floor(v)
        frac_var += float(np.sum(f * (1 - f)))
    predicted = gamma**2 * frac_var / params.padded_dim / devices**2
    assert predicted <= gamma**2 / 4 / devices
    mses = []
    for _ in range(3):
        encoded = [encode_update(u, params, SKELLAM, 0.0, rng) for u in updates]
        mean = decode_sum(modular_sum(encoded, 24), params, devices)
        mses.append(float(np.mean((mean - np.mean(updates, axis=0)) ** 2)))
    # 3 x 4000 coordinates: the relative standard error of the MSE is about sqrt(2 / 12000) = 1.3%.
    assert float(np.mean(mses)) == pytest.approx(predicted, rel=0.08)


def test_decoded_noise_of_distributed_mode_has_the_central_variance():
    rng = np.random.default_rng(5)
    dim, devices, t_honest, gamma, sigma = 2048, 10, 8, 1e-3, 0.05
    params = EncodingParams(dim=dim, clip=1.0, gamma=gamma, bits=24, rotation_seed=SEED)
    central_int = (sigma / gamma) ** 2
    local = local_noise_variance(PrivacyMode.DISTRIBUTED, central_int, t_honest)
    zero = np.zeros(dim)
    encoded = [encode_update(zero, params, SKELLAM, local, rng) for _ in range(devices)]
    total = decode_sum(modular_sum(encoded, 24), params, 1)  # the sum, not the mean
    # Noise of all 10 devices: 10/8 of the central variance (each honest device adds sigma^2 / 8).
    expected = sigma**2 * devices / t_honest
    assert float(np.var(total)) == pytest.approx(expected, rel=0.1)


def test_centre_maps_the_modular_sum_to_signed_integers():
    bits = 8
    values = np.array([0, 1, 127, 128, 255], dtype=np.uint32)
    assert centre(values, bits).tolist() == [0, 1, 127, -128, -1]


def test_wrap_around_rate_at_the_calibrated_gamma_stays_under_the_configured_probability():
    cohort, dim, bits = 30, 1024, 14
    cal = calibrate(target_epsilon=8.0, delta=1e-5, cohort_size=cohort, rounds=5, dim=dim, bits=bits,
                    population=10**4, dropout_fraction=0.1)
    assert cal.wrap_probability <= 1e-4
    params = EncodingParams(dim=dim, clip=cal.clip, gamma=cal.gamma, bits=bits, rotation_seed=SEED)
    central_int = (cal.noise_multiplier * cal.clip / cal.gamma) ** 2
    local = local_noise_variance(PrivacyMode.DISTRIBUTED, central_int, cal.honest_contributors)
    rng = np.random.default_rng(3)
    direction = rng.standard_normal(dim)  # worst case for wrapping: every device sends the same update
    half = 1 << (bits - 1)

    def wrapped_vectors(gamma: float, trials: int) -> int:
        p = EncodingParams(dim=dim, clip=cal.clip, gamma=gamma, bits=bits, rotation_seed=SEED)
        noise = local * (cal.gamma / gamma) ** 2  # same float-domain noise at the other gamma
        count = 0
        for _ in range(trials):
            exact = np.zeros(p.padded_dim, dtype=np.int64)
            for _ in range(cohort):
                enc = encode_update(direction, p, SKELLAM, noise, rng).astype(np.int64)
                exact += np.where(enc >= half, enc - (1 << bits), enc)  # undo each device's own reduction
            count += bool(np.any((exact < -half) | (exact >= half)))
        return count

    # With P(wrap) <= 1e-4 per vector, 3 or more wraps in 60 vectors has probability < 4e-8.
    assert wrapped_vectors(params.gamma, 60) <= 2
    # The check can fail: at a third of the calibrated gamma the sum wraps.
    assert wrapped_vectors(params.gamma / 3, 5) >= 4


def test_wrap_bound_is_the_configured_probability_at_the_smallest_gamma():
    g = smallest_gamma(1.0, 2.0, 100, 80, 1 << 16, 20, 1e-4)
    assert wrap_probability(g, 1.0, 2.0, 100, 80, 1 << 16, 20) == pytest.approx(1e-4, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"dim": 0}, "dim"),
        ({"clip": 0.0}, "clip"),
        ({"gamma": -1.0}, "gamma"),
        ({"bits": 33}, "bits"),
        ({"bits": 1}, "bits"),
        ({"rotation_seed": b"x"}, "rotation_seed"),
        ({"beta": 1.0}, "beta"),
        ({"rotation": "dft"}, "rotation"),
    ],
)
def test_invalid_encoding_parameters_are_rejected_naming_the_parameter(kwargs, parameter):
    base = {"dim": 10, "clip": 1.0, "gamma": 0.01, "bits": 16, "rotation_seed": SEED}
    with pytest.raises(ConfigError, match=parameter):
        EncodingParams(**{**base, **kwargs})


def test_update_of_the_wrong_size_or_with_nan_is_refused():
    params = EncodingParams(dim=10, clip=1.0, gamma=0.01, bits=16, rotation_seed=SEED)
    with pytest.raises(ConfigError, match="dim"):
        encode_update(np.zeros(11), params, SKELLAM, 0.0, np.random.default_rng(0))
    bad = np.zeros(10)
    bad[3] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        encode_update(bad, params, SKELLAM, 0.0, np.random.default_rng(0))


def test_clipping_never_modifies_the_callers_update():
    update = np.full(100, 10.0, dtype=np.float32)
    clipped = clip_l2(update, 1.0)
    assert np.all(update == 10.0)
    assert float(np.linalg.norm(clipped)) <= 1.0
    np.testing.assert_allclose(clipped / np.linalg.norm(clipped), update / np.linalg.norm(update), rtol=1e-6)


def test_wide_sums_at_32_bits_decode_without_float32_precision_loss():
    rng = np.random.default_rng(21)
    dim, devices, gamma = 16, 200, 1e-6
    params = EncodingParams(dim=dim, clip=1.0, gamma=gamma, bits=32, rotation_seed=SEED)
    direction = clip_l2(rng.standard_normal(dim), 1.0).copy()  # aligned updates: the sum reaches ~1e8 steps
    encoded = [encode_update(direction, params, SKELLAM, 0.0, rng) for _ in range(devices)]
    mean = decode_sum(modular_sum(encoded, 32), params, devices)
    assert float(np.linalg.norm(mean - direction)) <= gamma * np.sqrt(params.padded_dim)
