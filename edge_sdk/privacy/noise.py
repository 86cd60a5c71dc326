"""Integer DP noise: one interface, a registry by name, and the per-round noise generator.

Why integer noise: the noisy update is summed mod 2^b under SecAgg, so the noise must live on the
integers too. Each device adds a *share* of the target variance (``sigma^2 / t_honest``); the sum
of ``t_honest`` honest shares carries at least ``sigma^2``.

- ``skellam`` (default): ``Poisson(mu) - Poisson(mu)``, variance ``2 mu``. Sums of Skellam are
  Skellam with the summed parameter, so the aggregate noise has exactly the accounted law
  (Agarwal-Kairouz-Liu, NeurIPS'21).
- ``discrete_gaussian``: ``N_Z(0, s^2)`` by Canonne-Kamath-Steinke's rejection sampler from a
  discrete Laplace (NeurIPS'20, Algorithm 3), vectorised. Sums are *close* to a discrete
  Gaussian; the accountant uses Kairouz-Liu-Steinke's bound for that (ICML'21).

See docs/privacy.md for the generator's threat model.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_sdk.errors import ConfigError

NOISE_SEED_BITS = 128


def fresh_noise_generator() -> np.random.Generator:
    """A new PCG64 generator seeded with 128 bits of OS entropy; make one per round, never reuse it."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(NOISE_SEED_BITS)))


class NoiseMechanism(Protocol):
    """Adds integer noise of a given per-coordinate variance."""

    name: str

    def sample(self, size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
        """``size`` i.i.d. int64 noise values of the given variance (0 gives zeros)."""
        ...


def _check_variance(variance: float) -> None:
    if not (variance >= 0.0 and math.isfinite(variance)):
        raise ConfigError(f"noise variance must be finite and >= 0, got {variance}")


@dataclass(frozen=True)
class SkellamNoise:
    """Symmetric Skellam noise ``Poisson(v/2) - Poisson(v/2)`` of variance ``v``."""

    name: str = "skellam"

    def sample(self, size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
        _check_variance(variance)
        if variance == 0.0:
            return np.zeros(size, dtype=np.int64)
        mu = variance / 2.0
        out = rng.poisson(mu, size)
        out -= rng.poisson(mu, size)
        return out


@dataclass(frozen=True)
class DiscreteGaussianNoise:
    """Discrete Gaussian ``N_Z(0, s^2)``: P(x) proportional to exp(-x^2 / (2 s^2)) on the integers.

    CKS Algorithm 3: draw Y from a discrete Laplace of scale ``t = floor(s) + 1`` and accept it with
    probability ``exp(-(|Y| - s^2/t)^2 / (2 s^2))``. The discrete Laplace is the difference of two
    i.i.d. geometric variables. Unlike CKS's reference sampler the Bernoulli trials use float64
    uniforms, so the law is exact up to float64 rounding (~2^-53), not bit-exact.
    ``variance`` is the parameter ``s^2``; the true variance is at most ``s^2`` and below it by a
    relative ~``4 pi^2 s^2 exp(-2 pi^2 s^2)`` (about 1e-7 at s = 1, CKS), negligible for s >= 1.
    """

    name: str = "discrete_gaussian"

    def sample(self, size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
        _check_variance(variance)
        out = np.zeros(size, dtype=np.int64)
        if variance == 0.0 or size == 0:
            return out
        sigma = math.sqrt(variance)
        t = math.floor(sigma) + 1
        p = -math.expm1(-1.0 / t)  # success probability of each geometric
        filled = 0
        while filled < size:
            want = size - filled
            batch = int(want * 1.6) + 64  # CKS: acceptance rate is >= ~0.6 for sigma >= 1
            y = rng.geometric(p, batch) - rng.geometric(p, batch)
            shifted = np.abs(y) - variance / t
            accept = rng.random(batch) < np.exp(-(shifted * shifted) / (2.0 * variance))
            accepted = y[accept][:want]
            out[filled : filled + accepted.size] = accepted
            filled += accepted.size
        return out


NOISE_MECHANISMS: dict[str, NoiseMechanism] = {
    "skellam": SkellamNoise(),
    "discrete_gaussian": DiscreteGaussianNoise(),
}
DEFAULT_NOISE = "skellam"


def noise_mechanism(name: str) -> NoiseMechanism:
    """The registered mechanism called ``name``; ConfigError naming the choices otherwise."""
    try:
        return NOISE_MECHANISMS[name]
    except KeyError:
        raise ConfigError(
            f"noise mechanism {name!r} is unknown; choose one of {sorted(NOISE_MECHANISMS)}"
        ) from None
