"""The simulator's data split: every sample at most once, deterministic, and as skewed as each scheme says."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aggregator.simulator.partition import MIN_SAMPLES, partition
from aggregator.simulator.scenario import ScenarioError
from edge_sdk.errors import ConfigError


def digits_like(n: int = 1437, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """The mean over devices of the entropy (bits) of the device's label histogram."""
    entropies = []
    for p in parts:
        counts = np.bincount(labels[p])
        q = counts[counts > 0] / len(p)
        entropies.append(float(-(q * np.log2(q)).sum()))
    return float(np.mean(entropies))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), devices=st.integers(1, 10), classes=st.integers(1, 8),
       scheme=st.sampled_from(["iid", "dirichlet", "shards"]), alpha=st.floats(0.05, 50.0),
       shards=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_every_sample_at_most_once_and_every_device_served(n, devices, classes, scheme, alpha, shards, seed):
    assume(scheme != "shards" or n >= devices * shards)  # fewer samples than shards is refused (tested below)
    labels = digits_like(n, classes, seed % 1000)
    parts = partition(labels, devices, scheme, alpha=alpha, shards_per_device=shards, seed=seed)
    assert len(parts) == devices
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a sample went to two devices"
    assert joined.min() >= 0 and joined.max() < n
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert len(joined) == n, "every scheme uses every sample"
    assert min(len(p) for p in parts) >= (1 if scheme == "shards" else MIN_SAMPLES)
    if scheme == "iid":
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_deterministic_for_a_seed_and_different_across_seeds(scheme):
    labels = digits_like()
    first = partition(labels, 30, scheme, alpha=0.5, shards_per_device=2, seed=7)
    again = partition(labels, 30, scheme, alpha=0.5, shards_per_device=2, seed=7)
    other = partition(labels, 30, scheme, alpha=0.5, shards_per_device=2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_smaller_alpha_gives_more_skewed_label_histograms():
    labels = digits_like()
    entropy = {alpha: np.mean([mean_label_entropy(labels, partition(labels, 50, "dirichlet", alpha=alpha, seed=s))
                               for s in range(3)])
               for alpha in (0.05, 0.5, 5.0, 100.0)}
    iid = mean_label_entropy(labels, partition(labels, 50, "iid", seed=0))
    assert entropy[0.05] < entropy[0.5] < entropy[5.0] < entropy[100.0]
    assert entropy[0.05] < 1.0  # about one or two labels a device
    assert abs(entropy[100.0] - iid) < 0.25  # large alpha approaches IID


def test_dirichlet_tops_up_devices_a_draw_leaves_short():
    # 25 devices over 60 samples at alpha 0.01: almost every draw leaves some device empty.
    labels = digits_like(60, 3)
    parts = partition(labels, 25, "dirichlet", alpha=0.01, seed=3)
    assert min(len(p) for p in parts) >= MIN_SAMPLES
    assert sum(len(p) for p in parts) == 60


@pytest.mark.parametrize("per_device", [1, 2, 3])
def test_shards_give_each_device_at_most_its_shard_count_of_labels(per_device):
    labels = digits_like()
    parts = partition(labels, 100, "shards", shards_per_device=per_device, seed=1)
    assert max(len(np.unique(labels[p])) for p in parts) <= per_device
    assert sum(len(p) for p in parts) == len(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 2 * min(sizes)  # shards are nearly equal


def test_impossible_requests_are_scenario_errors_naming_the_field():
    labels = digits_like(30)
    with pytest.raises(ScenarioError, match="devices=20: 30 training samples"):
        partition(labels, 20, "iid", seed=0)
    with pytest.raises(ScenarioError, match="partition='zipf'"):
        partition(labels, 2, "zipf", seed=0)
    with pytest.raises(ScenarioError, match="alpha=0"):
        partition(labels, 2, "dirichlet", alpha=0.0, seed=0)
    with pytest.raises(ScenarioError, match="shards_per_device=0"):
        partition(labels, 2, "shards", shards_per_device=0, seed=0)
    with pytest.raises(ScenarioError, match="30 samples cannot make 33 shards"):
        partition(labels, 11, "shards", shards_per_device=3, seed=0)
    with pytest.raises(ScenarioError, match="labels must be a 1-D array"):
        partition(labels.reshape(5, 6), 2, "iid", seed=0)
    assert issubclass(ScenarioError, ConfigError)
