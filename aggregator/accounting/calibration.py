"""Choose the noise multiplier, gamma and C for a target (epsilon, delta) over a training run.

Why a helper: the three knobs interact. More noise needs a larger quantisation step gamma to stay
inside 2^b without wrapping, a larger gamma inflates the rounded vector's norm (the sensitivity),
and that costs epsilon. The helper searches the noise multiplier z (central noise std ``z * C``)
and, for each z, takes the smallest gamma whose modular-wrap probability is within bounds.

Wrap model (in the style of Kairouz-Liu-Steinke's reference code, which fits k standard deviations
of a sub-Gaussian aggregate in 2^b): a tail bound on *one* coordinate of the mod-2^b sum, so the
criterion is the expected fraction of wrapped coordinates, not a union bound over all D of them.
One coordinate S of the integer sum of n = cohort encodings is the sum of three independent parts:

- the signal: the n signals share one rotation, so their sum has L2 norm <= nC/gamma and each
  rotated coordinate is sub-Gaussian with proxy (nC/gamma)^2 / S (Hoeffding over the signs), S the
  rotation's ``spread_dim``: the padded length D for "hadamard-pow2", the window 2^m <= d for
  "hadamard-overlap" (docs/privacy.md, section 1, proves both);
- the rounding: each device's is zero-mean in an interval of length 1, proxy 1/4 (Hoeffding's lemma);
- the noise of the n survivors, each adding sigma^2/t_honest: a discrete Gaussian is sub-Gaussian
  with proxy its parameter (Canonne-Kamath-Steinke'20); a Skellam sum ``Sk(mu, mu)`` has the exact
  moment generating function ``exp(2 mu (cosh l - 1))``, heavier than any Gaussian's.

So, with s the summed sub-Gaussian proxies, mu the Skellam part and h = 2^(b-1) (Chernoff)::

    P(S outside [-h, h)) <= 2 min_l exp(l^2 s / 2 + 2 mu (cosh l - 1) - l h)

Conditional rounding's re-draws are ignored here (they only keep the rounded norm small).
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
from edge_sdk.privacy.rotation import DEFAULT_ROTATION, check_rotation_name, make_rotation
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
    rotation: str = DEFAULT_ROTATION


def wrap_probability(gamma: float, clip: float, noise_multiplier: float, cohort: int, t_honest: int,
                     spread_dim: int, bits: int, mechanism: str = "skellam") -> float:
    """The tail bound above: the chance that one coordinate of the sum wraps mod 2^b.

    That is also the expected fraction of the encoded coordinates that wrap. ``spread_dim`` is
    the rotation's (``EncodingParams.spread_dim``), not the encoded length.
    """
    sub_gaussian, mu = _sum_tail_parts(gamma, clip, noise_multiplier, cohort, t_honest, spread_dim, mechanism)
    return _chernoff_two_sided(float(1 << (bits - 1)), sub_gaussian, mu)


def _sum_tail_parts(gamma, clip, z, cohort, t_honest, spread_dim, mechanism) -> tuple[float, float]:
    """(sub-Gaussian proxy, Skellam mu) of one coordinate of the integer-domain sum."""
    scaled = clip / gamma
    sub_gaussian = (cohort * scaled) ** 2 / spread_dim + cohort / 4.0
    noise_variance = cohort * (z * scaled) ** 2 / t_honest
    if mechanism == "discrete_gaussian":
        return sub_gaussian + noise_variance, 0.0
    return sub_gaussian, noise_variance / 2.0


def _chernoff_two_sided(h: float, sub_gaussian: float, mu: float) -> float:
    """``2 min_l exp(l^2 s/2 + 2 mu (cosh l - 1) - l h)``, capped at 1."""
    if mu <= 0:  # purely sub-Gaussian: the minimum is at l = h / s
        return min(1.0, 2.0 * math.exp(-h * h / (2.0 * sub_gaussian)))

    def slope(lam: float) -> float:  # the exponent's derivative: increasing, negative at 0
        return lam * sub_gaussian + 2.0 * mu * math.sinh(lam) - h

    high = min(h / sub_gaussian if sub_gaussian > 0 else math.inf, math.asinh(h / (2.0 * mu)))
    low = 0.0
    for _ in range(200):  # bisection on the slope's root; the exponent is convex
        mid = 0.5 * (low + high)
        if slope(mid) > 0:
            high = mid
        else:
            low = mid
        if high - low <= 1e-12 * high:
            break
    lam = low  # any lambda gives a valid bound; this one is within float noise of the best
    exponent = 0.5 * lam * lam * sub_gaussian + 2.0 * mu * (math.cosh(lam) - 1.0) - lam * h
    return min(1.0, 2.0 * math.exp(exponent))


def smallest_gamma(clip: float, noise_multiplier: float, cohort: int, t_honest: int, spread_dim: int,
                   bits: int, max_wrap: float, mechanism: str = "skellam") -> float:
    """The smallest gamma whose wrap bound is <= ``max_wrap``; ConfigError if no gamma can do it."""
    half = float(1 << (bits - 1))
    if _chernoff_two_sided(half, cohort / 4.0, 0.0) > max_wrap:  # gamma -> infinity leaves the rounding only
        raise ConfigError(
            f"bits={bits} is too few for a cohort of {cohort}: the rounding errors alone would wrap a coordinate "
            f"mod 2^{bits} with probability above {max_wrap:g}; raise bits or shrink the cohort"
        )

    def fits(g: float) -> bool:
        return wrap_probability(g, clip, noise_multiplier, cohort, t_honest, spread_dim, bits, mechanism) <= max_wrap

    # Treating every part as sub-Gaussian gives a closed form that no larger bound can beat: start there.
    budget = half * half / (2.0 * math.log(2.0 / max_wrap)) - cohort / 4.0
    a = (cohort * clip) ** 2 / spread_dim + cohort * (noise_multiplier * clip) ** 2 / t_honest
    low = math.sqrt(a / budget) * (1.0 - 1e-9) if budget > 0 else 1e-300
    high = max(low, 1e-300) * 2.0
    while not fits(high):
        low, high = high, high * 2.0
    for _ in range(100):
        mid = math.sqrt(low * high)
        if fits(mid):
            high = mid
        else:
            low = mid
        if high - low <= 1e-9 * high:
            break
    return high


def _validate(target_epsilon, delta, cohort_size, rounds, dim, bits, population, dropout_fraction,
              colluding_fraction, clip, mechanism, max_wrap, rotation) -> None:
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
    check_rotation_name(rotation)


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
    rotation: str = DEFAULT_ROTATION,
) -> Calibration:
    """The smallest noise multiplier meeting ``target_epsilon`` after ``rounds`` rounds, with its gamma.

    ``self_selection`` means devices join each round by a CSPRNG coin of probability
    cohort_size / population (Poisson sampling), which the accounting then amplifies. ``gamma``
    overrides the wrap-driven choice (a warning is given if it wraps too often). ``rotation`` is
    the one the round's ``EncodingParams`` will name: its spread enters the wrap bound, its encoded
    length the sensitivity.
    """
    clip = DEFAULT_CLIP if clip is None else clip
    _validate(target_epsilon, delta, cohort_size, rounds, dim, bits, population, dropout_fraction,
              colluding_fraction, clip, mechanism, max_wrap_probability, rotation)
    t_honest = honest_contributors(cohort_size, dropout_fraction, colluding_fraction)
    if t_honest < 1:
        raise ConfigError(
            f"dropout_fraction={dropout_fraction} and colluding_fraction={colluding_fraction} leave no honest "
            f"contributor in a cohort of {cohort_size}"
        )
    q = cohort_size / population if self_selection else None
    rotator = make_rotation(rotation, _CALIBRATION_SEED, dim)
    spread, encoded = rotator.spread_dim, rotator.encoded_dim

    def knobs(z: float) -> tuple[float, float]:
        g = gamma if gamma is not None else smallest_gamma(
            clip, z, cohort_size, t_honest, spread, bits, max_wrap_probability, mechanism
        )
        params = EncodingParams(dim=dim, clip=clip, gamma=g, bits=bits, rotation_seed=_CALIBRATION_SEED,
                                beta=DEFAULT_BETA, rotation=rotation)
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
    wrap = wrap_probability(g, clip, z, cohort_size, t_honest, spread, bits, mechanism)
    warnings = []
    if g * math.sqrt(encoded) > GAMMA_SQRT_D_RATIO * clip:  # the rounding error's norm is about gamma*sqrt(d)/2
        warnings.append(
            f"gamma*sqrt(d) = {g * math.sqrt(encoded):.3g} is not much smaller than C = {clip:g}: rounding "
            f"noise is a sizeable part of the update; raise bits (now {bits})"
        )
    if wrap > max_wrap_probability:
        warnings.append(
            f"modular clipping probability {wrap:.2e} per coordinate exceeds {max_wrap_probability:.0e}: "
            "raise gamma or bits"
        )
    for message in warnings:
        log.warning("calibration: %s", message)
    return Calibration(
        noise_multiplier=z, gamma=g, clip=clip, bits=bits, mechanism=mechanism, honest_contributors=t_honest,
        sampling_probability=q, epsilon=eps, delta=delta, wrap_probability=wrap, warnings=tuple(warnings),
        rotation=rotation,
    )
