"""Renyi-DP curves and their conversion to (epsilon, delta), in numpy only, for the device ledger.

Why a device-side copy: a device must decide *before sending* whether a round fits its budget, and
it has no dp-accounting. The host accountant (``aggregator.accounting``) composes the same curves
with dp-accounting's machinery; a test cross-checks the two.

Curves (RDP epsilon at order alpha, add/remove-one adjacency):

- Skellam sum, ``Sk(mu, mu)`` with variance ``2 mu`` (Agarwal-Kairouz-Liu, NeurIPS'21, Thm 3.5),
  proven for integer alpha > 1; at a fractional order we use the value at ceil(alpha), valid because
  Renyi divergence is non-decreasing in its order::

      alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))

- Sum of n discrete Gaussians ``N_Z(0, s^2)`` in d dimensions (Kairouz-Liu-Steinke, ICML'21): the
  pointwise minimum over alpha of the curves their Thm 1 and Prop 14 give, all valid together, with
  ``a = D2 / (sqrt(n) s)``, ``b = D1 / (sqrt(n) s)``::

      Thm 1:   alpha (a^2 + tau d / 2) / 2,   alpha (a + tau sqrt(d))^2 / 2
      Prop 14: alpha a^2 / 2 + tau d,         alpha (a^2 + 2 b tau + tau^2 d) / 2
      tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))

  (Prop 14's third curve is Thm 1's second.) The minimum also takes one device's discrete Gaussian,
  ``alpha D2^2 / (2 s^2)`` (Canonne-Kamath-Steinke'20, any s > 0), valid because the other devices'
  noise is independent of the data, so adding it is post-processing; it wins when tau d is large.
  Thm 1 and Prop 14 need s >= 1/2; below that the one-device curve is the only one used.

- Gaussian, noise multiplier z: ``alpha / (2 z^2)``.
- Poisson subsampling with probability q: the general upper bound of Zhu & Wang (ICML'19, Thm 9)
  for integer alpha >= 2, valid for any mechanism given its RDP at orders 2..alpha (again
  ceil(alpha) at fractional orders, up to order 256), capped at every order by the curve without
  amplification (both bound the same divergence; Zhu-Wang's slack can exceed what sampling saves
  when q is large).

Conversion to epsilon: Canonne-Kamath-Steinke's improvement of Mironov's bound (the one
dp-accounting uses): ``eps = rdp + log1p(-1/a) - log(delta a) / (a - 1)``, minimised over orders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.participation import NO_NOISE, ParticipationEvent

# The same orders as dp-accounting's RdpAccountant default, so device and host agree.
DEFAULT_ORDERS = np.array(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], dtype=np.float64
)
MAX_SUBSAMPLED_ORDER = 256


def gaussian_rdp(orders: np.ndarray, noise_multiplier: float) -> np.ndarray:
    if noise_multiplier <= 0:
        return np.full(orders.shape, np.inf)
    return orders / (2.0 * noise_multiplier**2)


def skellam_rdp(orders: np.ndarray, l1: float, l2: float, mu: float) -> np.ndarray:
    """RDP of adding ``Sk(mu, mu)`` noise to a query with L1/L2 sensitivities ``l1``/``l2``."""
    orders = np.asarray(orders, dtype=np.float64)
    if mu <= 0:
        return np.full(orders.shape, np.inf)
    whole = np.maximum(np.ceil(orders - 1e-9), 2.0)  # proven at integers; monotone in between
    second = np.minimum(((2.0 * whole - 1.0) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu))
    return whole * l2 * l2 / (4.0 * mu) + second


MIN_DISCRETE_GAUSSIAN_SIGMA = 0.5  # KLS'21 Thm 1 and Prop 14 assume each device's s >= 1/2


def _discrete_gaussian_tau(local_sigma2: float, contributors: int) -> float:
    """KLS's tau: how far a sum of ``contributors`` discrete Gaussians is from one discrete Gaussian."""
    if contributors <= 1:
        return 0.0
    k = np.arange(1, contributors, dtype=np.float64)
    return 10.0 * float(np.sum(np.exp(-2.0 * math.pi**2 * local_sigma2 * k / (k + 1.0))))


def _sum_theorem_applies(local_sigma2: float, contributors: int) -> bool:
    return contributors <= 1 or local_sigma2 >= MIN_DISCRETE_GAUSSIAN_SIGMA**2


def discrete_gaussian_sum_epsilon(l2: float, local_sigma2: float, contributors: int, dim: int) -> float:
    """The concentrated-DP parameter e of a sum of ``contributors`` discrete Gaussians.

    KLS's Thm 1, or one device's ``D2 / s`` if smaller (and always when s < 1/2, outside Thm 1).
    """
    if local_sigma2 <= 0:
        return math.inf
    alone = l2 / math.sqrt(local_sigma2)
    if not _sum_theorem_applies(local_sigma2, contributors):
        return alone
    n = contributors
    tau = _discrete_gaussian_tau(local_sigma2, n)
    first = math.sqrt(l2 * l2 / (n * local_sigma2) + 0.5 * tau * dim)
    second = l2 / (math.sqrt(n) * math.sqrt(local_sigma2)) + tau * math.sqrt(dim)
    return min(first, second, alone)


def discrete_gaussian_sum_rdp(
    orders: np.ndarray, l1: float, l2: float, local_sigma2: float, contributors: int, dim: int
) -> np.ndarray:
    """The pointwise minimum of KLS's Thm 1 and Prop 14 curves and one device's (module docstring)."""
    orders = np.asarray(orders, dtype=np.float64)
    if local_sigma2 <= 0:
        return np.full(orders.shape, np.inf)
    alone = orders * (l2 * l2 / (2.0 * local_sigma2))
    if not _sum_theorem_applies(local_sigma2, contributors):
        return alone
    scale = math.sqrt(contributors * local_sigma2)
    a, b = l2 / scale, l1 / scale
    tau = _discrete_gaussian_tau(local_sigma2, contributors)
    half = orders / 2.0
    curves = np.stack([
        half * (a * a + 0.5 * tau * dim),
        half * (a + tau * math.sqrt(dim)) ** 2,
        half * a * a + tau * dim,
        half * (a * a + 2.0 * b * tau + tau * tau * dim),
        alone,
    ])
    return np.min(curves, axis=0)


def poisson_subsampled_rdp(orders: np.ndarray, q: float, base_rdp_at) -> np.ndarray:
    """Zhu-Wang's upper bound on the RDP of a Poisson-subsampled mechanism.

    ``base_rdp_at(int_orders)`` returns the mechanism's RDP at the given integer orders. A fractional
    order gets the bound at ``ceil(order)`` (monotonicity); orders above ``MAX_SUBSAMPLED_ORDER``
    come back as +inf (unused).
    """
    orders = np.asarray(orders, dtype=np.float64)
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"sampling_probability must be in (0, 1], got {q}")
    if q == 1.0:
        return base_rdp_at(orders)
    out = np.full(orders.shape, np.inf)
    whole = np.maximum(np.ceil(orders - 1e-9), 2.0)
    usable = whole <= MAX_SUBSAMPLED_ORDER
    if not usable.any():
        return out
    top = int(whole[usable].max())
    ls = np.arange(2, top + 1, dtype=np.float64)
    base = np.asarray(base_rdp_at(ls), dtype=np.float64)  # base[l - 2] = eps(l)
    log_q, log_1q = math.log(q), math.log1p(-q)
    log_factorial = np.array([math.lgamma(i + 1.0) for i in range(top + 1)])
    bound_at: dict[int, float] = {}
    for i in np.flatnonzero(usable):
        a = int(whole[i])
        if a in bound_at:
            out[i] = bound_at[a]
            continue
        ls_a = np.arange(2, a + 1)
        log_comb = log_factorial[a] - log_factorial[ls_a] - log_factorial[a - ls_a]
        # l = 2 has coefficient 1, l >= 3 has coefficient 3 (Zhu-Wang Thm 9).
        coefficient = np.where(ls_a == 2, 0.0, math.log(3.0))
        higher = coefficient + log_comb + ls_a * log_q + (a - ls_a) * log_1q + (ls_a - 1) * base[ls_a - 2]
        first = (a - 1) * log_1q + math.log(a * q - q + 1.0)
        terms_arr = np.concatenate(([first], higher))
        peak = float(np.max(terms_arr))
        out[i] = bound_at[a] = (peak + math.log(float(np.sum(np.exp(terms_arr - peak))))) / (a - 1)
    return out


def mechanism_rdp(event: ParticipationEvent, orders: np.ndarray, local_only: bool = False) -> np.ndarray:
    """The RDP curve of one event without subsampling: the honest sum's, or one device's own."""
    orders = np.asarray(orders, dtype=np.float64)
    if event.mechanism == NO_NOISE or not event.is_private:
        return np.full(orders.shape, np.inf)
    if event.mechanism == "skellam":
        variance = event.local_variance if local_only else event.central_variance
        return skellam_rdp(orders, event.l1_sensitivity, event.l2_sensitivity, variance / 2.0)
    if event.mechanism == "discrete_gaussian":
        contributors = 1 if local_only else event.honest_contributors
        return discrete_gaussian_sum_rdp(
            orders, event.l1_sensitivity, event.l2_sensitivity, event.local_variance, contributors, event.dim
        )
    raise ConfigError(f"no RDP curve for mechanism {event.mechanism!r}")


def event_rdp(event: ParticipationEvent, orders: np.ndarray = DEFAULT_ORDERS, local_only: bool = False) -> np.ndarray:
    """The RDP curve of one participation, with Poisson amplification when it was self-sampled.

    The amplified curve is capped at every order by the unamplified one: both are upper bounds, and
    Zhu-Wang's generic slack can exceed what sampling saves. Local-only figures never claim
    amplification: whoever sees a device's individual update knows that the device took part.
    """
    q = event.sampling_probability
    plain = mechanism_rdp(event, orders, local_only)
    if local_only or q is None or q >= 1.0:
        return plain
    return capped_subsampled_rdp(orders, q, lambda ls: mechanism_rdp(event, ls), plain)


def capped_subsampled_rdp(orders: np.ndarray, q: float, base_rdp_at, plain: np.ndarray | None = None) -> np.ndarray:
    """Zhu-Wang's subsampled curve, never above the curve without amplification (``plain``)."""
    orders = np.asarray(orders, dtype=np.float64)
    if plain is None:
        plain = np.asarray(base_rdp_at(orders), dtype=np.float64)
    return np.minimum(poisson_subsampled_rdp(orders, q, base_rdp_at), plain)


def epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """The smallest epsilon the RDP curve certifies at ``delta`` (CKS'20 Prop. 12 conversion)."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    orders = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    if np.all(rdp == 0) or np.any(delta * delta + np.expm1(-rdp) > 0):
        return 0.0  # as dp-accounting: an RDP this small is below delta via the KL bound
    valid = orders > 1.01
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
    eps = np.where(valid & np.isfinite(eps), eps, np.inf)
    return max(0.0, float(np.min(eps)))


def composed_rdp(
    counted_events: Iterable[tuple[ParticipationEvent, int]],
    orders: np.ndarray = DEFAULT_ORDERS,
    local_only: bool = False,
) -> np.ndarray:
    """RDP of the composition: each distinct event's curve times its count (composition by counts)."""
    total = np.zeros(np.asarray(orders).shape, dtype=np.float64)
    for event, count in counted_events:
        if count:
            total = total + count * event_rdp(event, orders, local_only)
    return total
