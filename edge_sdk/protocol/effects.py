"""Effects: what a round machine asks its shell to do, since the machine itself does no I/O.

Why explicit values: the machine stays pure and testable, and the *order* of side effects becomes a
property of one place, the pump (``edge_sdk.protocol.pump``). The pump runs a step's effects first
and feeds each result back to the machine (``resolve``) before it publishes any send of that step.
That is what puts the ledger entry on disk before the masked update leaves: the device machine
emits ``RecordParticipation`` and produces the MaskedInput only from the ``LedgerHead`` the handler
returns, after the fsync.

A handler that raises a ``FleetlearnError`` (a budget exceeded, a corrupt ledger, training that
diverged) is fed back as ``EffectFailed``, so the machine decides what failure means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sdk.errors import FleetlearnError
from edge_sdk.privacy.participation import ParticipationEvent
from edge_sdk.protocol.plan import RoundPlan


@dataclass(frozen=True, eq=False)
class Train:
    """Train ``params`` locally as ``plan.training`` says; the result is the trained parameters (name -> array)."""

    plan: RoundPlan
    params: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class CheckEligibility:
    """May this device take part (budget for ``event``, local policies)? The result is an ``Eligibility``."""

    plan: RoundPlan
    event: ParticipationEvent


@dataclass(frozen=True)
class Eligibility:
    """A ``CheckEligibility`` answer; ``reason`` is a ``DeclineReason`` when not eligible."""

    eligible: bool
    reason: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class RecordParticipation:
    """Durably record the participation (fsync) before the update leaves; the result is the new ``LedgerHead``."""

    round_id: str
    event: ParticipationEvent


@dataclass(frozen=True)
class PersistRound:
    """Persist where a round stands (role, round, stage and small JSON-able facts) for resumption and audit."""

    role: str
    round_id: str
    stage: str
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class PersistModel:
    """Persist a verified (device) or published (aggregator) model: its version, digest and parameter bytes."""

    version: int
    digest: bytes
    parameters: bytes


@dataclass(frozen=True)
class AccountRound:
    """Aggregator: account a summed round (fleet epsilon, each contributor's ledger head); result: a report."""

    round_id: str
    event: ParticipationEvent
    contributors: tuple[str, ...]
    ledger_heads: Mapping[str, bytes]


@dataclass(frozen=True)
class Metric:
    """A measurement for the shell's metrics and logs (``labels`` as sorted (key, value) pairs)."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class EffectFailed:
    """Fed back instead of a result when the effect's handler raised a ``FleetlearnError``."""

    error: FleetlearnError


Effect = Train | CheckEligibility | RecordParticipation | PersistRound | PersistModel | AccountRound | Metric
