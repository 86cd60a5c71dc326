"""Unbiased stochastic rounding to integers, and its conditional (norm-bounded) variant.

Why conditional: the sensitivity the accountant uses is the L2 norm of the *rounded* vector. Plain
stochastic rounding can, with small probability, inflate the norm a lot; Kairouz-Liu-Steinke
(ICML'21, "conditional randomized rounding") re-draw the rounding until the rounded norm is within
``rounded_l2_bound``, which makes the bound a hard guarantee at the cost of a tiny bias.
"""

from __future__ import annotations

import math

import numpy as np

from edge_sdk.errors import ConfigError, FleetlearnError

DEFAULT_BETA = math.exp(-0.5)  # KLS's choice: each draw passes with probability >= 1 - beta
DEFAULT_MAX_TRIES = 1000


class RoundingError(FleetlearnError):
    """Conditional rounding did not meet the norm bound within the allowed number of draws."""


def rounded_l2_bound(scaled_l2_bound: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """An L2 bound on a stochastically rounded vector whose unrounded norm is <= ``scaled_l2_bound``.

    The minimum of the deterministic bound ``c + sqrt(d)`` and KLS's high-probability bound
    ``sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2))``, which conditional rounding enforces.
    """
    if scaled_l2_bound < 0:
        raise ConfigError(f"scaled_l2_bound must be >= 0, got {scaled_l2_bound}")
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"beta must be in (0, 1), got {beta}")
    c = float(scaled_l2_bound)
    root_d = math.sqrt(dim)
    deterministic = c + root_d
    squared = c * c + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * root_d)
    return min(deterministic, math.sqrt(squared))


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each entry up with probability equal to its fractional part (unbiased), as int64."""
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    floor = np.floor(x, dtype=dtype)
    frac = np.subtract(x, floor, dtype=dtype)
    out = floor.astype(np.int64)
    out += rng.random(x.shape, dtype=dtype) < frac
    return out


def conditional_stochastic_round(
    x: np.ndarray,
    l2_bound: float,
    rng: np.random.Generator,
    max_tries: int = DEFAULT_MAX_TRIES,
) -> np.ndarray:
    """Stochastically round ``x``, re-drawing until the rounded L2 norm is <= ``l2_bound``."""
    bound_sq = float(l2_bound) ** 2
    for _ in range(max_tries):
        rounded = stochastic_round(x, rng)
        if float(np.dot(rounded, rounded)) <= bound_sq:
            return rounded
    raise RoundingError(
        f"conditional rounding exceeded the L2 bound {l2_bound:.3f} in {max_tries} draws; the input norm "
        f"{float(np.linalg.norm(x)):.3f} is too close to the bound (check clip and gamma)"
    )
