"""The randomized Hadamard rotation: known answers against scipy, exact inverse, public signs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.rotation import RandomizedHadamard, fwht, padded_dimension, rotation_signs

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dp_rotation_signs.json"


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
