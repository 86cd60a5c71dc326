"""Choose the noise multiplier, gamma and C for a target (epsilon, delta) over a training run.

Why a helper: the three knobs interact. More noise needs a larger quantisation step gamma to stay
inside 2^b without wrapping, a larger gamma inflates the rounded vector's norm (the sensitivity),
and that costs epsilon. The helper searches the noise multiplier z (central noise std ``z * C``)
and, for each z, takes the smallest gamma whose modular-wrap probability is within bounds.

Wrap model (per coordinate of the mod-2^b sum, in the integer domain, union-bounded over the D
padded coordinates): the n = cohort signals share one rotation, so their sum has L2 norm <= nC and
each rotated coordinate is sub-Gaussian with variance proxy (nC/gamma)^2 / D (Hoeffding over the
random signs); each device's rounding adds a zero-mean value in [-1, 1] (proxy 1/4); the noise of
all n survivors has variance n sigma^2 / t_honest (treated as Gaussian, which Skellam and
discrete-Gaussian sums are close to at the variances used). So::

    P(wrap) <= 2 D exp(-(2^(b-1))^2 / (2 V)),  V = (nC/gamma)^2 / D + n / 4 + n (zC/gamma)^2 / t_honest
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from aggregator.accounting.accountant import epsilon_of
from aggregator.accounting.events import round_dp_event
from edge_sdk.errors import ConfigError
from edge_sdk.modulus import check_bits
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.noise import NOISE_MECHANISMS
from edge_sdk.privacy.noise_floor import honest_contributors
from edge_sdk.privacy.participation import participation_event
from edge_sdk.privacy.rotation import padded_dimension
from edge_sdk.privacy.rounding import DEFAULT_BETA

log = logging.getLogger(__name__)

__all__ = ["Calibration", "calibrate", "honest_contributors", "smallest_gamma", "wrap_probability"]

DEFAULT_CLIP = 1.0
MAX_WRAP_PROBABILITY = 1e-4
GAMMA_SQRT_D_RATIO = 0.1  # warn when gamma * sqrt(D) > this * C: not "much smaller" than C
_CALIBRATION_SEED = b"fleetlearn/calibration/0"  # any 16+ bytes: the rotation seed does not affect accounting


@dataclass(frozen=True)
class Calibration:
    """The chosen knobs, the figures they achieve, and any warnings."""

    noise_multiplier: float
    gamma: float
    clip: float
    bits: int
    mechanism: str
    honest_contributors: int
    sampling_probability: float | None
    epsilon: float
    delta: float
    wrap_probability: float
    warnings: tuple[str, ...]


def wrap_probability(gamma: float, clip: float, noise_multiplier: float, cohort: int, t_honest: int,
                     padded_dim: int, bits: int) -> float:
    """The union bound above on the chance that any coordinate of the sum wraps mod 2^b."""
    variance = _sum_variance_proxy(gamma, clip, noise_multiplier, cohort, t_honest, padded_dim)
    half = float(1 << (bits - 1))
    return min(1.0, 2.0 * padded_dim * math.exp(-half * half / (2.0 * variance)))


def _sum_variance_proxy(gamma, clip, z, cohort, t_honest, padded_dim) -> float:
    scaled = clip / gamma
    return (cohort * scaled) ** 2 / padded_dim + cohort / 4.0 + cohort * (z * scaled) ** 2 / t_honest


def smallest_gamma(clip: float, noise_multiplier: float, cohort: int, t_honest: int, padded_dim: int,
                   bits: int, max_wrap: float) -> float:
    """The smallest gamma whose wrap bound is <= ``max_wrap``; ConfigError if no gamma can do it."""
    half = float(1 << (bits - 1))
    budget = half * half / (2.0 * math.log(2.0 * padded_dim / max_wrap))  # the largest V allowed
    room = budget - cohort / 4.0  # what the rounding of the cohort leaves for signal and noise
    if room <= 0:
        raise ConfigError(
            f"bits={bits} is too few for a cohort of {cohort}: the rounding errors alone would wrap "
            f"mod 2^{bits} with probability above {max_wrap:g}; raise bits or shrink the cohort"
        )
    a = (cohort * clip) ** 2 / padded_dim + cohort * (noise_multiplier * clip) ** 2 / t_honest
    return math.sqrt(a / room) * (1.0 + 1e-9)  # a hair above, so the bound holds after float rounding


def _validate(target_epsilon, delta, cohort_size, rounds, dim, bits, population, dropout_fraction,
              colluding_fraction, clip, mechanism, max_wrap) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if population < 1:
        raise ConfigError(f"population must be >= 1, got {population}")
    if not 0.0 < delta < 1.0 / population:
        raise ConfigError(f"delta must be in (0, 1/population) = (0, {1.0 / population:.3g}), got {delta}")
    if not 1 <= cohort_size <= population:
        raise ConfigError(f"cohort_size must be in [1, population={population}], got {cohort_size}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    check_bits(bits)
    if not 0.0 <= dropout_fraction < 1.0:
        raise ConfigError(f"dropout_fraction must be in [0, 1), got {dropout_fraction}")
    if not 0.0 <= colluding_fraction < 1.0:
        raise ConfigError(f"colluding_fraction must be in [0, 1), got {colluding_fraction}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip must be a finite number > 0, got {clip}")
    if mechanism not in NOISE_MECHANISMS:
        raise ConfigError(f"mechanism {mechanism!r} is unknown; choose one of {sorted(NOISE_MECHANISMS)}")
    if not 0.0 < max_wrap < 1.0:
        raise ConfigError(f"max_wrap_probability must be in (0, 1), got {max_wrap}")


def calibrate(
    target_epsilon: float,
    delta: float,
    cohort_size: int,
    rounds: int,
    dim: int,
    bits: int,
    population: int,
    dropout_fraction: float = 0.0,
    colluding_fraction: float = 0.0,
    clip: float | None = None,
    mechanism: str = "skellam",
    self_selection: bool = False,
    max_wrap_probability: float = MAX_WRAP_PROBABILITY,
    gamma: float | None = None,
) -> Calibration:
    """The smallest noise multiplier meeting ``target_epsilon`` after ``rounds`` rounds, with its gamma.

    ``self_selection`` means devices join each round by a CSPRNG coin of probability
    cohort_size / population (Poisson sampling), which the accounting then amplifies. ``gamma``
    overrides the wrap-driven choice (a warning is given if it wraps too often).
    """
    clip = DEFAULT_CLIP if clip is None else clip
    _validate(target_epsilon, delta, cohort_size, rounds, dim, bits, population, dropout_fraction,
              colluding_fraction, clip, mechanism, max_wrap_probability)
    t_honest = honest_contributors(cohort_size, dropout_fraction, colluding_fraction)
    if t_honest < 1:
        raise ConfigError(
            f"dropout_fraction={dropout_fraction} and colluding_fraction={colluding_fraction} leave no honest "
            f"contributor in a cohort of {cohort_size}"
        )
    q = cohort_size / population if self_selection else None
    padded = padded_dimension(dim)

    def knobs(z: float) -> tuple[float, float]:
        g = gamma if gamma is not None else smallest_gamma(
            clip, z, cohort_size, t_honest, padded, bits, max_wrap_probability
        )
        params = EncodingParams(dim=dim, clip=clip, gamma=g, bits=bits, rotation_seed=_CALIBRATION_SEED,
                                beta=DEFAULT_BETA)
        event = participation_event(params, "distributed", mechanism, z, t_honest, q)
        return g, epsilon_of({round_dp_event(event): rounds}, delta, "rdp")

    z_low, z_high = None, 0.05
    eps = knobs(z_high)[1]
    while eps > target_epsilon:
        z_low, z_high = z_high, z_high * 1.5
        if z_high > 1e4:
            raise ConfigError(
                f"target_epsilon={target_epsilon} is out of reach with bits={bits} for dim={dim} and this cohort: "
                "quantisation inflates the sensitivity as fast as noise is added; raise bits or target_epsilon"
            )
        eps = knobs(z_high)[1]
    if z_low is not None:
        for _ in range(40):
            mid = 0.5 * (z_low + z_high)
            if knobs(mid)[1] <= target_epsilon:
                z_high = mid
            else:
                z_low = mid
            if z_high - z_low < 1e-4 * z_high:
                break
    z = z_high
    g, eps = knobs(z)
    wrap = wrap_probability(g, clip, z, cohort_size, t_honest, padded, bits)
    warnings = []
    if g * math.sqrt(padded) > GAMMA_SQRT_D_RATIO * clip:
        warnings.append(
            f"gamma*sqrt(d) = {g * math.sqrt(padded):.3g} is not much smaller than C = {clip:g}: rounding "
            f"noise is a sizeable part of the update; raise bits (now {bits})"
        )
    if wrap > max_wrap_probability:
        warnings.append(
            f"modular clipping probability {wrap:.2e} exceeds {max_wrap_probability:.0e}: raise gamma or bits"
        )
    for message in warnings:
        log.warning("calibration: %s", message)
    return Calibration(
        noise_multiplier=z, gamma=g, clip=clip, bits=bits, mechanism=mechanism, honest_contributors=t_honest,
        sampling_probability=q, epsilon=eps, delta=delta, wrap_probability=wrap, warnings=tuple(warnings),
    )
