"""How a round's cohort is cut into sub-cohorts, each a SecAgg+ session of its own.

Why these rules: a worker sees its sub-cohort's sum unmasked, so each sub-sum alone must carry the
calibrated noise. The plan's t_honest is therefore the *sub-cohort's* (each device adds σ²/t_honest),
and a sub-cohort must be large enough that the SecAgg+ finder has a (k, t) for it and that its
honest contributors reach t_honest. The plan is signed before anyone answers, so the sizes are
fixed in two steps: ``plan_shards`` (before the plan, from the expected cohort) chooses the number
of parts and t_honest; ``split_cohort`` (once the Ready devices are known) cuts the real cohort into
balanced parts, fewer if the cohort came out smaller, never one that could not reach t_honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.noise_floor import expected_count, honest_contributors
from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.parameters import ThreatModel, choose_parameters

MAX_SEARCH = 100_000


class ShardingError(ConfigError):
    """The cohort cannot be split as asked (no sub-cohort size works for these fractions)."""


def smallest_sub_cohort(dropout: float, colluding: float, threat_model: ThreatModel | str = ThreatModel.ACTIVE) -> int:
    """The smallest n for which ``choose_parameters`` finds (k, t) and at least one honest contributor remains."""
    for n in range(2, MAX_SEARCH):
        if honest_contributors(n, dropout, colluding) < 1:
            continue
        try:
            choose_parameters(n, dropout, colluding, ThreatModel(threat_model))
        except SecAggConfigError:
            continue
        return n
    raise ShardingError(f"no sub-cohort below {MAX_SEARCH} devices supports dropout={dropout} and "
                        f"colluding={colluding}")


@dataclass(frozen=True)
class ShardPlan:
    """Fixed before the plan is signed: ``parts`` sub-cohorts of about ``size``, noise calibrated for ``t_honest``."""

    parts: int
    size: int
    t_honest: int


def plan_shards(expected_cohort: int, workers: int, sub_cohort_min: int, dropout: float, colluding: float,
                threat_model: ThreatModel | str = ThreatModel.ACTIVE) -> ShardPlan:
    """As many balanced parts as there are workers, each at least ``max(sub_cohort_min, smallest_sub_cohort)``."""
    if workers < 1:
        raise ShardingError(f"sharding needs at least one worker, got {workers}")
    floor = max(sub_cohort_min, smallest_sub_cohort(dropout, colluding, threat_model))
    if expected_cohort < floor:
        raise ShardingError(f"a cohort of {expected_cohort} is below the smallest sub-cohort of {floor} "
                            f"(sharding.sub_cohort_min={sub_cohort_min}, dropout={dropout}, colluding={colluding})")
    parts = max(1, min(workers, expected_cohort // floor))
    size = expected_cohort // parts
    return ShardPlan(parts, size, honest_contributors(size, dropout, colluding))


def split_cohort(cohort: Sequence[str], parts: int, t_honest: int, colluding: float,
                 sub_cohort_min: int) -> tuple[tuple[str, ...], ...]:
    """Balanced sub-cohorts (sizes differ by at most one) of the sorted cohort; () if not even one part works.

    A part of size s must be at least ``sub_cohort_min`` and keep s - ⌈γ s⌉ >= t_honest, the noise
    floor each device's SecAgg+ client enforces; fewer parts are tried until the smallest part does.
    """
    ordered = tuple(sorted(set(cohort)))
    n = len(ordered)
    for count in range(min(parts, n), 0, -1):
        smallest = n // count
        if smallest < max(sub_cohort_min, 2) or smallest - expected_count(colluding, smallest) < t_honest:
            continue
        base, extra = divmod(n, count)
        out, start = [], 0
        for i in range(count):
            size = base + (1 if i < extra else 0)
            out.append(ordered[start:start + size])
            start += size
        return tuple(out)
    return ()
