"""The rotations: known answers against scipy, exact inverse, orthogonality, flatness, public signs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.rotation import (
    OVERLAP,
    POW2,
    ROTATIONS,
    OverlappingHadamard,
    RandomizedHadamard,
    fwht,
    make_rotation,
    padded_dimension,
    rotation_signs,
    window_dimension,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dp_rotation_signs.json"
OVERLAP_VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dp_rotation_overlap.json"
FLATNESS_DELTA = 1e-9  # the documented max-coordinate bound fails with probability <= this per input


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64, 256, 2048])
def test_fwht_matches_scipy_hadamard_matrix(n):
    x = np.random.default_rng(n).standard_normal(n)
    expected = scipy.linalg.hadamard(n) @ x
    np.testing.assert_allclose(fwht(x.copy()), expected, rtol=1e-12, atol=1e-9)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(fwht(x32.copy()), expected, rtol=1e-4, atol=1e-3 * np.sqrt(n))


def test_fwht_rejects_length_that_is_not_a_power_of_two():
    with pytest.raises(ConfigError, match="power of two"):
        fwht(np.zeros(12))


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 3000), seed=st.binary(min_size=16, max_size=32))
def test_unrotate_inverts_rotate_and_rotation_preserves_norm(dim, seed):
    x = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    rotation = RandomizedHadamard(seed, dim)
    y = rotation.rotate(x)
    assert y.shape == (padded_dimension(dim),)
    np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(rotation.unrotate(y), x, atol=1e-5 * max(1.0, float(np.abs(x).max())))


def test_rotation_spreads_a_spike_evenly_over_all_coordinates():
    dim = 1000
    x = np.zeros(dim, dtype=np.float32)
    x[17] = 3.0
    y = RandomizedHadamard(b"r" * 16, dim).rotate(x)
    np.testing.assert_allclose(np.abs(y), 3.0 / np.sqrt(1024), rtol=1e-6)


def test_rotation_signs_match_pinned_vectors():
    for case in json.loads(VECTORS.read_text())["cases"]:
        signs = rotation_signs(bytes.fromhex(case["seed_hex"]), case["n"])
        bits = "".join("1" if s < 0 else "0" for s in signs)
        assert bits == case["negative_bits"]


def test_rotation_signs_differ_between_seeds_and_are_balanced():
    a = rotation_signs(b"a" * 16, 1 << 16)
    b = rotation_signs(b"b" * 16, 1 << 16)
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 5 / np.sqrt(1 << 16)  # 5 standard deviations
    assert float(np.mean(a == b)) < 0.52


def test_rotation_seed_shorter_than_128_bits_is_rejected():
    with pytest.raises(ConfigError, match="rotation seed"):
        rotation_signs(b"short", 8)


def test_overlap_rotation_matches_the_pinned_known_answers():
    cases = json.loads(OVERLAP_VECTORS.read_text())["cases"]
    assert {c["d"] for c in cases} >= {1, 5, 8, 12, 33, 63}
    for case in cases:
        rotation = OverlappingHadamard(bytes.fromhex(case["seed_hex"]), case["d"])
        x = np.array(case["x"], dtype=np.float32)
        np.testing.assert_allclose(rotation.rotate(x), case["y"], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(rotation.unrotate(np.array(case["y"])), case["x"], atol=1e-9)


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 12, 100, 127, 129, 255])
def test_overlap_rotation_is_an_orthogonal_matrix_on_exactly_dim_coordinates(dim):
    rotation = OverlappingHadamard(b"o" * 16, dim)
    matrix = np.stack([rotation.rotate(e) for e in np.eye(dim, dtype=np.float32)], axis=1)
    assert matrix.shape == (dim, dim)
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(dim), atol=1e-6)
    inverse = np.stack([rotation.unrotate(e) for e in np.eye(dim)], axis=1)  # float64 path
    np.testing.assert_allclose(inverse, matrix.T, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 5000), seed=st.binary(min_size=16, max_size=32), name=st.sampled_from(sorted(ROTATIONS)))
def test_every_rotation_inverts_exactly_and_preserves_the_norm(dim, seed, name):
    x = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    rotation = make_rotation(name, seed, dim)
    y = rotation.rotate(x)
    assert y.shape == (rotation.encoded_dim,)
    np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(rotation.unrotate(y), x, atol=1e-5 * max(1.0, float(np.abs(x).max())))
    wide = rotation.unrotate(y.astype(np.float64))  # the decoder's float64 path inverts to float64 precision
    assert wide.dtype == np.float64
    np.testing.assert_allclose(wide, x, atol=1e-5 * max(1.0, float(np.abs(x).max())))


@pytest.mark.parametrize("dim, encoded, spread", [(1, 1, 1), (1000, 1000, 512), (1024, 1024, 1024),
                                                  (10**5, 10**5, 65536), (131072, 131072, 131072)])
def test_overlap_rotation_encodes_dim_coordinates_and_spreads_over_the_window(dim, encoded, spread):
    rotation = OverlappingHadamard(b"o" * 16, dim)
    assert (rotation.encoded_dim, rotation.spread_dim) == (encoded, spread)
    assert window_dimension(dim) == spread and dim < 2 * spread
    pow2 = RandomizedHadamard(b"o" * 16, dim)
    assert pow2.encoded_dim == pow2.spread_dim == padded_dimension(dim)


@pytest.mark.parametrize("dim", [1, 2, 64, 4096])
def test_overlap_rotation_of_a_power_of_two_is_the_pow2_rotation(dim):
    x = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    np.testing.assert_array_equal(OverlappingHadamard(b"p" * 16, dim).rotate(x),
                                  RandomizedHadamard(b"p" * 16, dim).rotate(x))


def flatness_bound(norm: float, dim: int) -> float:
    """docs/privacy.md: each coordinate is sub-Gaussian with proxy norm^2/n, so with probability
    >= 1 - delta every one of the dim coordinates is below norm * sqrt(2 log(2 dim / delta) / n)."""
    return norm * math.sqrt(2.0 * math.log(2.0 * dim / FLATNESS_DELTA) / window_dimension(dim))


@st.composite
def worst_case_inputs(draw):
    """Spikes (mostly in the last coordinates, which only the second window reaches), a few-spike
    mix, and structured dense vectors; each of norm > 0."""
    dim = draw(st.integers(2, 6000))
    kind = draw(st.sampled_from(["last", "spike", "spikes", "ones", "alternating", "ramp"]))
    x = np.zeros(dim, dtype=np.float32)
    if kind == "last":
        x[dim - 1 - draw(st.integers(0, min(dim - 1, 8)))] = draw(st.floats(0.1, 1e3))
    elif kind == "spike":
        x[draw(st.integers(0, dim - 1))] = -1.0
    elif kind == "spikes":
        for i in draw(st.lists(st.integers(0, dim - 1), min_size=2, max_size=5)):
            x[i] += 1.0
        x[-1] += 1.0
    elif kind == "ones":
        x[:] = 1.0
    elif kind == "alternating":
        x[::2], x[1::2] = 1.0, -1.0
    else:
        x[:] = np.arange(dim, dtype=np.float32) / dim
    return x, draw(st.binary(min_size=16, max_size=16))


@settings(max_examples=150, deadline=None)
@given(case=worst_case_inputs())
def test_no_input_concentrates_after_the_overlap_rotation_beyond_the_documented_bound(case):
    x, seed = case
    y = OverlappingHadamard(seed, x.size).rotate(x)
    norm = float(np.linalg.norm(x))
    assert float(np.abs(y).max()) <= flatness_bound(norm, x.size) * (1 + 1e-5)
    assert flatness_bound(norm, x.size) < norm * math.sqrt(4.0 * math.log(2.0 * x.size / FLATNESS_DELTA) / x.size)


@pytest.mark.parametrize("dim", [3, 1000, 6000, 100_000])
def test_a_spike_in_the_last_coordinate_is_spread_evenly_over_the_second_window(dim):
    # The tight case: |y| = ||x||/sqrt(n) exactly on [dim - n, dim) (so the proxy 1/n cannot be 1/dim),
    # and the first window's own coordinates [0, dim - n) are untouched.
    n = window_dimension(dim)
    x = np.zeros(dim, dtype=np.float32)
    x[-1] = 3.0
    y = OverlappingHadamard(b"s" * 16, dim).rotate(x)
    np.testing.assert_allclose(np.abs(y[dim - n:]), 3.0 / np.sqrt(n), rtol=1e-6)
    assert not np.any(y[: dim - n])


def test_each_coordinate_has_variance_at_most_the_proxy_over_the_signs():
    # Over many public seeds the second moment of every coordinate is <= ||x||^2 / n (Hoeffding's
    # proxy bounds the variance); a spike in the overlap region is the case that uses both windows.
    dim, trials = 100, 4000
    n = window_dimension(dim)
    x = np.zeros(dim, dtype=np.float32)
    x[50] = 1.0
    ys = np.stack([OverlappingHadamard(i.to_bytes(16, "little"), dim).rotate(x) for i in range(trials)])
    second_moment = np.mean(ys.astype(np.float64) ** 2, axis=0)
    assert float(second_moment.max()) <= (1.0 / n) * (1 + 6 * math.sqrt(2.0 / trials))
    assert float(second_moment.sum()) == pytest.approx(1.0, rel=1e-5)  # the norm is preserved every time


def test_an_unknown_rotation_name_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="hadamard-overlap"):
        make_rotation("dft", b"s" * 16, 10)
    assert {POW2, OVERLAP} == set(ROTATIONS)
