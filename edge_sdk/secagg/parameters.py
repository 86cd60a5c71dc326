"""Choosing and checking the share-holder count k and Shamir threshold t, and the consistency quorum.

Each device hands Shamir shares of its two secrets to k share holders that it draws itself from the
round's cohort (see ``graph``), so from its point of view the number of colluding or dropped holders
is hypergeometric: k draws without replacement from the other n - 1 cohort members. We use the
exact tail with Python integers (Bell et al., CCS'20, adapted to self-chosen holders):

* security (2^-40): no device has t or more colluding holders, which together with the server could
  rebuild both its self-mask seed and its mask key. Union bound over the n devices:
  n * P[Hyp(n-1, ceil(gamma*n), k) >= t] <= 2^-40.
* correctness (2^-20): no device loses more than k - t holders to dropouts, so its secrets stay
  reconstructible: n * P[Hyp(n-1, ceil(delta*n), k) >= k - t + 1] <= 2^-20.

Two threat models, named so nobody gets the weaker one by accident:

* ``active`` (the default): the aggregator may deviate arbitrarily. t must also be a strict majority
  of the k + 1 holders (2t > k + 1), so two disjoint groups of holders cannot both reach t, and
  unmasking needs the consistency signatures of a quorum of the roster (``consistency_quorum``).
* ``honest-but-curious`` (opt-in): the aggregator follows the protocol but reads everything it
  sees. t only needs security against colluders, and t consistency signatures suffice.

A device checks the server's (k, t) against the same criteria with its *own* configured fractions
(``check_parameters``): a server cannot talk it into weaker assumptions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction
from math import comb

from edge_sdk.privacy.noise_floor import expected_count
from edge_sdk.secagg.errors import SecAggConfigError

__all__ = [
    "ThreatModel", "SecAggParameters", "choose_parameters", "check_parameters", "consistency_quorum",
    "expected_count", "hypergeometric_tail", "majority_threshold", "noise_floor_shortfall",
]

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
MIN_THRESHOLD = 2


class ThreatModel(str, enum.Enum):
    """What the aggregator is assumed to do; ``ACTIVE`` unless a deployment opts out by name."""

    ACTIVE = "active"
    HONEST_BUT_CURIOUS = "honest-but-curious"


@dataclass(frozen=True)
class SecAggParameters:
    """The share-holder count k and Shamir threshold t for a cohort of n devices."""

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


def majority_threshold(degree: int) -> int:
    """The smallest t that is a strict majority of the k + 1 holders (2t > k + 1)."""
    return (degree + 1) // 2 + 1


def _smallest_threshold(n: int, colluding: int, dropped: int, k: int, model: ThreatModel) -> int | None:
    low = MIN_THRESHOLD if model is ThreatModel.HONEST_BUT_CURIOUS else max(MIN_THRESHOLD, majority_threshold(k))
    for t in range(low, k + 2):
        if _secure(n, colluding, k, t):
            return t if _correct(n, dropped, k, t) else None
    return None


def _check_fractions(n: int, dropout_fraction: float, colluding_fraction: float) -> None:
    if n < 2:
        raise SecAggConfigError(f"secure aggregation needs at least 2 devices, got n={n}")
    for name, value in (("dropout_fraction", dropout_fraction), ("colluding_fraction", colluding_fraction)):
        if not 0.0 <= value < 1.0:
            raise SecAggConfigError(f"{name} must be in [0, 1), got {value}")


def choose_parameters(
    n: int, dropout_fraction: float, colluding_fraction: float, threat_model: ThreatModel = ThreatModel.ACTIVE
) -> SecAggParameters:
    """The smallest (k, t) meeting 2^-40 security and 2^-20 correctness; see the module doc."""
    _check_fractions(n, dropout_fraction, colluding_fraction)
    model = ThreatModel(threat_model)
    colluding = expected_count(colluding_fraction, n)
    dropped = expected_count(dropout_fraction, n)
    for k in range(MIN_THRESHOLD, n):
        t = _smallest_threshold(n, colluding, dropped, k, model)
        if t is not None:
            return SecAggParameters(n=n, degree=k, threshold=t)
    raise SecAggConfigError(
        f"no threshold is both secure and correct for n={n}, dropout={dropout_fraction}, "
        f"colluding={colluding_fraction} ({model.value} aggregator): lower the fractions or enlarge the cohort"
    )


def check_parameters(
    n: int, degree: int, threshold: int, colluding_fraction: float, threat_model: ThreatModel = ThreatModel.ACTIVE
) -> None:
    """Refuse a server-chosen (k, t) that is weaker than this device's own assumptions allow.

    Correctness (enough holders survive) is the server's problem; privacy is the device's, so only
    the security condition and, against an active server, the strict majority are checked.
    """
    model = ThreatModel(threat_model)
    if not 1 <= degree <= n - 1:
        raise SecAggConfigError(f"share-holder count k={degree} is outside [1, n-1={n - 1}]")
    if not MIN_THRESHOLD <= threshold <= degree + 1:
        raise SecAggConfigError(f"threshold t={threshold} is outside [{MIN_THRESHOLD}, k+1={degree + 1}]")
    if model is ThreatModel.ACTIVE and threshold < majority_threshold(degree):
        raise SecAggConfigError(
            f"threshold t={threshold} is not a strict majority of the k+1={degree + 1} share holders "
            "(2t > k+1), which an active aggregator requires"
        )
    colluding = expected_count(colluding_fraction, n)
    if not _secure(n, colluding, degree, threshold):
        raise SecAggConfigError(
            f"(k={degree}, t={threshold}) lets {colluding} colluding devices of n={n} reach t holders of some "
            f"device with probability above 2^-{SECURITY_BITS}: weaker than this device accepts"
        )


def consistency_quorum(members: int, colluding: int, threshold: int, threat_model: ThreatModel) -> int:
    """How many roster members must have signed one survivor view before a device unmasks.

    Against an active server two different views must not both gather a quorum from honest devices,
    each of which signs only one view: 2Q - members > colluding, so any two quorums share an honest
    signer. An honest-but-curious server shows one view anyway, and t signatures (t devices still
    there to answer) are enough.
    """
    if ThreatModel(threat_model) is ThreatModel.HONEST_BUT_CURIOUS:
        return threshold
    return max(threshold, (members + colluding) // 2 + 1)


def noise_floor_shortfall(contributors: int, colluding: int, t_honest: int) -> str | None:
    """Why a sum of ``contributors`` inputs would carry less DP noise than calibrated, or None.

    Each device adds noise of variance sigma^2 / t_honest, so the sum carries sigma^2 only if at least
    t_honest of its inputs come from honest devices; ``colluding`` of them may not.
    """
    if contributors - colluding < t_honest:
        return (f"{contributors} contributors minus {colluding} possible colluders is below t_honest={t_honest}, "
                "the count the DP noise was calibrated for")
    return None
