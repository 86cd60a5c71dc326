"""Cohort selection: how many devices to invite, and which of those who said Ready take part.

Why over-selection (Bonawitz et al., "Towards Federated Learning at Scale", SysML 2019): some invited
devices decline, time out or drop later, so the aggregator invites ``ceil(max_size * (1 + over_selection))``
and keeps the first ``max_size`` that answer Ready. Below ``min_size`` Ready devices the round is
abandoned before any training; the plan's ``check_back_after`` tells the others when to return, so
the fleet does not stampede the next plan.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class CohortPolicy:
    """Bounds of a round's SecAgg+ cohort and the over-selection that absorbs declines and dropouts."""

    min_size: int
    max_size: int
    over_selection: float = 0.3

    def __post_init__(self) -> None:
        if not 2 <= self.min_size <= self.max_size:
            raise ConfigError(f"cohort sizes need 2 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not (self.over_selection >= 0.0 and math.isfinite(self.over_selection)):
            raise ConfigError(f"over_selection must be a finite number >= 0, got {self.over_selection}")

    @property
    def invitations(self) -> int:
        return math.ceil(self.max_size * (1.0 + self.over_selection) - 1e-9)


def invite(available: Sequence[str], policy: CohortPolicy, rng: random.Random | None = None) -> tuple[str, ...]:
    """Choose whom the plan invites: a uniformly random subset of ``policy.invitations``, sorted.

    ``rng`` defaults to the OS CSPRNG; the simulator passes a seeded one so its cohorts follow the seed.
    """
    pool = sorted(set(available))
    if len(pool) < policy.min_size:
        raise ConfigError(f"only {len(pool)} devices are available, below the minimum cohort of {policy.min_size}")
    chosen = (rng or secrets.SystemRandom()).sample(pool, min(len(pool), policy.invitations))
    return tuple(sorted(chosen))


def admit(ready_in_order: Sequence[str], policy: CohortPolicy) -> tuple[str, ...]:
    """The SecAgg+ cohort: the first ``max_size`` devices that said Ready, sorted; empty below ``min_size``."""
    first = list(dict.fromkeys(ready_in_order))[: policy.max_size]
    return tuple(sorted(first)) if len(first) >= policy.min_size else ()
