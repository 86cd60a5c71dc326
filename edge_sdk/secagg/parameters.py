"""Choosing SecAgg+ degree k and threshold t from n, dropout rate and collusion rate.

Conditions (Bell et al., CCS'20, adapted to a Harary graph where a device's k neighbours are,
from its point of view, k draws without replacement from the other n - 1 devices; so the number
of bad neighbours is hypergeometric and we use its exact tail with Python integers):

* security (2^-40): no device has t or more colluding neighbours, which together with the server
  could rebuild both its self-mask seed and its mask key. Union bound over the n devices:
  n * P[Hyp(n-1, ceil(gamma*n), k) >= t] <= 2^-40.
* correctness (2^-20): no device loses more than k - t neighbours to dropouts, so its secrets
  stay reconstructible: n * P[Hyp(n-1, ceil(delta*n), k) >= k - t + 1] <= 2^-20.

The finder takes the smallest even k (a Harary ring needs k/2 per side), and for it the smallest
t >= 2 meeting security (the largest dropout tolerance). With 5% and 5% this gives
(n, k, t) = (100, 12, 6), (1000, 30, 17), (10^4, 34, 20). When k would reach n - 1 the graph is
complete (k = n - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from math import comb

from edge_sdk.secagg.errors import SecAggConfigError

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
MIN_THRESHOLD = 2


@dataclass(frozen=True)
class SecAggParameters:
    """The graph degree k and Shamir threshold t for a roster of n devices."""

    n: int
    degree: int
    threshold: int

    @property
    def complete_graph(self) -> bool:
        return self.degree >= self.n - 1


def hypergeometric_tail(population: int, successes: int, draws: int, at_least: int) -> Fraction:
    """Exact P[X >= at_least] for X ~ Hypergeometric(population, successes, draws)."""
    lo = max(at_least, 0)
    hi = min(successes, draws)
    if lo > hi:
        return Fraction(0)
    count = sum(comb(successes, i) * comb(population - successes, draws - i) for i in range(lo, hi + 1))
    return Fraction(count, comb(population, draws))


def _secure(n: int, colluding: int, k: int, t: int) -> bool:
    return n * hypergeometric_tail(n - 1, colluding, k, t) <= Fraction(1, 1 << SECURITY_BITS)


def _correct(n: int, dropped: int, k: int, t: int) -> bool:
    return n * hypergeometric_tail(n - 1, dropped, k, k - t + 1) <= Fraction(1, 1 << CORRECTNESS_BITS)


def _smallest_threshold(n: int, colluding: int, dropped: int, k: int) -> int | None:
    for t in range(MIN_THRESHOLD, k + 1):
        if _secure(n, colluding, k, t):
            return t if _correct(n, dropped, k, t) else None
    return None


def choose_parameters(n: int, dropout_fraction: float, colluding_fraction: float) -> SecAggParameters:
    """The smallest (k, t) meeting 2^-40 security and 2^-20 correctness; see the module doc."""
    if n < 2:
        raise SecAggConfigError(f"secure aggregation needs at least 2 devices, got n={n}")
    for name, value in (("dropout_fraction", dropout_fraction), ("colluding_fraction", colluding_fraction)):
        if not 0.0 <= value < 1.0:
            raise SecAggConfigError(f"{name} must be in [0, 1), got {value}")
    # Round up (a 5% cohort of 10 still expects one dropout); the epsilon absorbs float noise.
    colluding = math.ceil(colluding_fraction * n - 1e-9)
    dropped = math.ceil(dropout_fraction * n - 1e-9)
    for k in range(2, n - 1, 2):
        t = _smallest_threshold(n, colluding, dropped, k)
        if t is not None:
            return SecAggParameters(n=n, degree=k, threshold=t)
    k = n - 1
    t = _smallest_threshold(n, colluding, dropped, k) if k >= MIN_THRESHOLD else None
    if t is None:
        raise SecAggConfigError(
            f"no threshold is both secure and correct for n={n}, dropout={dropout_fraction}, "
            f"colluding={colluding_fraction}: lower the fractions or enlarge the cohort"
        )
    return SecAggParameters(n=n, degree=k, threshold=t)
