"""How a simulated fleet's training data is split over its devices: IID, Dirichlet label skew, or shards.

Why a module of its own: federated results depend on the split as much as on the model, so the
simulator, the examples and the tuning experiments must split the same way for the same seed.
Each scheme returns, per device, the indices of its samples into ``labels``; every index is used
at most once, and the result is a pure function of the arguments.

- ``iid``: a shuffled, equal split (sizes differ by at most one); every sample is used.
- ``dirichlet``: the standard label-skew scheme of Hsu, Qi and Brown (2019, "Measuring the effects
  of non-identical data distribution for federated visual classification"): for every class, a
  proportion vector over the devices is drawn from Dirichlet(alpha * 1) and the class's shuffled
  samples are cut in those proportions. Small alpha gives each device few classes; large alpha
  approaches IID. Every sample is used. A device left with fewer than ``min_samples`` samples makes
  the whole draw be *redrawn* (the next draws of the same generator, so still deterministic), as in
  the reference implementations; after ``MAX_REDRAWS`` failed draws the devices that are still short
  are *topped up* by taking samples, one at a time, from the currently largest devices, which keeps
  the skew of everyone else. So every device ends with at least ``min_samples`` samples.
- ``shards``: McMahan et al. (2017, "Communication-efficient learning of deep networks from
  decentralized data"): sort by label, cut into ``devices * shards_per_device`` equal shards, and
  deal each device ``shards_per_device`` random shards. The shards are cut within classes (each
  class gets a share of the shards proportional to its size, at least one), so every shard holds
  one label and a device sees at most ``shards_per_device`` labels; with fewer shards than labels
  it is McMahan's plain equal cut of the label-sorted samples.
"""

from __future__ import annotations

import numpy as np

from aggregator.simulator.scenario import PARTITIONS, ScenarioError

MIN_SAMPLES = 2  # a device needs at least this many samples for a local step and a held-out look
MAX_REDRAWS = 100


def partition(labels: np.ndarray, devices: int, scheme: str, *, alpha: float = 0.5, shards_per_device: int = 2,
              seed: int = 0, min_samples: int = MIN_SAMPLES) -> list[np.ndarray]:
    """Per device, the sorted int64 indices into ``labels`` of its samples (disjoint; see the module doc)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ScenarioError(f"labels must be a 1-D array, got shape {labels.shape}")
    if scheme not in PARTITIONS:
        raise ScenarioError(f"partition={scheme!r}: choose one of {', '.join(PARTITIONS)}")
    if devices < 1:
        raise ScenarioError(f"devices={devices}: need at least 1 device")
    if min_samples < 1:
        raise ScenarioError(f"min_samples={min_samples}: need at least 1")
    n = len(labels)
    if n < devices * min_samples:
        raise ScenarioError(f"devices={devices}: {n} training samples cannot give every device {min_samples} "
                            f"(need at least {devices * min_samples}); use fewer devices or more data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), devices)
    elif scheme == "dirichlet":
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ScenarioError(f"alpha={alpha!r}: need a finite alpha > 0")
        parts = _dirichlet(labels, devices, alpha, min_samples, rng)
    else:
        if shards_per_device < 1:
            raise ScenarioError(f"shards_per_device={shards_per_device}: need at least 1")
        shards = devices * shards_per_device
        if n < shards * max(1, -(-min_samples // shards_per_device)):
            raise ScenarioError(f"shards_per_device={shards_per_device}: {n} samples cannot make {shards} shards "
                                f"of {-(-min_samples // shards_per_device)}+ samples for {devices} devices")
        parts = _shards(labels, devices, shards_per_device, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, devices: int, alpha: float, min_samples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    parts: list[list[int]] = []
    for _ in range(MAX_REDRAWS):
        parts = [[] for _ in range(devices)]
        for members in by_class:
            proportions = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.asarray(p) for p in parts]
    for device in range(devices):  # top up: move samples from the largest devices to the short ones
        while len(parts[device]) < min_samples:
            donor = max(range(devices), key=lambda d: len(parts[d]))
            parts[device].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.asarray(p) for p in parts]


def _shard_sizes(counts: np.ndarray, shards: int) -> np.ndarray:
    """Shards per class: proportional to the class's size by largest remainder, at least one each."""
    exact = counts / counts.sum() * shards
    sizes = np.maximum(1, np.floor(exact).astype(int))
    while sizes.sum() > shards:  # the minimum of one pushed it over: take from the largest
        sizes[np.argmax(sizes - exact)] -= 1
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable")[: shards - sizes.sum()]:
        sizes[c] += 1
    while sizes.sum() < shards:
        sizes[np.argmax(exact - sizes)] += 1
    return sizes


def _shards(labels: np.ndarray, devices: int, shards_per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    shards = devices * shards_per_device
    classes, counts = np.unique(labels, return_counts=True)
    if shards >= len(classes):  # cut within classes: every shard holds one label
        sizes = _shard_sizes(counts, shards)
        pieces = []
        for c, k in zip(classes, sizes, strict=True):
            pieces.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), k))
    else:  # fewer shards than labels: McMahan's plain equal cut of the label-sorted samples
        shuffled = rng.permutation(len(labels))
        pieces = np.array_split(shuffled[np.argsort(labels[shuffled], kind="stable")], shards)
    dealt = rng.permutation(shards).reshape(devices, shards_per_device)
    return [np.concatenate([pieces[s] for s in row]) for row in dealt]
