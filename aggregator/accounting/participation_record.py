"""The aggregator's own record of who was in each sum, and the last ledger head each device reported.

Why: a device's ledger is the device's own evidence, and a ledger restored together with its head
from an older copy is consistent with itself, so no local check can see the loss. The aggregator
knows who was in every sum it released. Each masked input carries the device's signed ledger head
(taken right after the participation was recorded), and heads only ever grow, so a head that does
not exceed the last one accepted from that device proves its ledger lost records.

The rule is monotonicity, not equality: a device's ledger may hold participations the aggregator
never saw (rounds aborted before its input arrived), so its sequence may jump by more than one.
A head below 2 records cannot cover the participation it comes with (the opening record and that
participation), so it is refused for every device: a deleted or emptied ledger.

A refusal is remembered. Each retry of a rolled-back device records its participation locally and
so raises its sequence; without the memory a device would climb back past the records it lost.
``reinstate`` clears it once an operator has restored the device's ledger.

Pure data, no I/O: ``to_dict``/``from_dict`` give the JSON the aggregator's store persists.
Epsilon is computed with the device's own accountant (``edge_sdk.privacy.rdp``), so the figure in
a refusal is the one the device's ledger would show had it not lost records.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from edge_sdk.errors import ConfigError, FleetlearnError
from edge_sdk.privacy.ledger import LedgerRollbackError
from edge_sdk.privacy.ledger_head import LedgerHead, LedgerHeadError
from edge_sdk.privacy.participation import ParticipationEvent
from edge_sdk.privacy.rdp import DEFAULT_ORDERS, composed_rdp, epsilon_from_rdp

RECORD_FORMAT = 1
MIN_PARTICIPATING_SEQUENCE = 2  # the opening record and the participation itself


class ParticipationRecordError(FleetlearnError):
    """The participation record is asked something inconsistent (a round recorded twice differently)."""


@dataclass(frozen=True)
class KnownParticipation:
    """One participation the aggregator accepted: the round, its privacy event, the head sent with it."""

    round_id: str
    event: ParticipationEvent
    head: LedgerHead

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round_id, "event": self.event.to_dict(), "head": self.head.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnownParticipation:
        return cls(str(data["round"]), ParticipationEvent.from_dict(data["event"]), LedgerHead.from_dict(data["head"]))


@dataclass(frozen=True)
class DeviceSpend:
    """What the aggregator's record says one device has spent."""

    participations: int
    epsilon: float
    delta: float


class ParticipationRecord:
    """Per device: the participations the aggregator accepted and the ledger heads they came with."""

    def __init__(self, delta: float) -> None:
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self._known: dict[str, list[KnownParticipation]] = {}
        self._refused: dict[str, str] = {}

    # -- queries -------------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return sorted(self._known.keys() | self._refused.keys())

    def participations(self, device_id: str) -> tuple[KnownParticipation, ...]:
        return tuple(self._known.get(device_id, ()))

    def last_head(self, device_id: str) -> LedgerHead | None:
        """The head of the device's last accepted participation, or None for a device never seen."""
        known = self._known.get(device_id)
        return known[-1].head if known else None

    def spent(self, device_id: str) -> DeviceSpend:
        """The device's spend by the aggregator's record (the device's accountant, this record's delta)."""
        known = self._known.get(device_id, [])
        if not known:
            return DeviceSpend(0, 0.0, self.delta)
        counts = Counter(p.event for p in known)
        epsilon = epsilon_from_rdp(DEFAULT_ORDERS, composed_rdp(counts.items()), self.delta)
        return DeviceSpend(len(known), epsilon, self.delta)

    def refusal(self, device_id: str) -> str | None:
        """Why the device is refused until reinstated, or None."""
        return self._refused.get(device_id)

    # -- the checks ----------------------------------------------------------------------------
    def check(self, device_id: str, head: LedgerHead) -> None:
        """Raise ``LedgerRollbackError`` unless ``head`` exceeds every head accepted from the device.

        A refusal is remembered (see the module docstring) until ``reinstate``.
        """
        if device_id in self._refused:
            raise self._rollback(device_id, head, f"it was refused before ({self._refused[device_id]}) and has "
                                                  "not been reinstated")
        last = self.last_head(device_id)
        if head.sequence < MIN_PARTICIPATING_SEQUENCE:
            reason = (
                f"its ledger head #{head.sequence} cannot hold the participation it comes with, so its ledger "
                "is missing or empty"
            )
        elif last is not None and head.sequence <= last.sequence:
            reason = (
                f"it reported ledger head sequence {head.sequence} but the aggregator already accepted sequence "
                f"{last.sequence} from it (round {self._known[device_id][-1].round_id}), so its ledger was "
                "rolled back"
            )
        else:
            return
        self._refused[device_id] = reason
        raise self._rollback(device_id, head, reason)

    def record(self, device_id: str, round_id: str, head: LedgerHead, event: ParticipationEvent) -> bool:
        """Record the device's accepted input to ``round_id``; False if it was already recorded.

        Idempotent for a (device, round) pair, so a duplicate never double-counts; the same round
        with a different head or event is a ``ParticipationRecordError``.
        """
        round_id = str(round_id)
        for known in self._known.get(device_id, ()):
            if known.round_id == round_id:
                if known.head != head or known.event != event:
                    raise ParticipationRecordError(
                        f"device {device_id} is already recorded in round {round_id} with head {known.head}; "
                        f"recording it again with head {head} and another event would count it twice"
                    )
                return False
        self.check(device_id, head)
        self._known.setdefault(device_id, []).append(KnownParticipation(round_id, event, head))
        return True

    def ledger_check(self, device_id: str, head_bytes: bytes) -> str | None:
        """The SecAgg+ server's ``LedgerCheck``: why the head a masked input carries is refused, or None.

        It only checks; ``record`` runs once the round knows the device's input was summed.
        """
        try:
            self.check(device_id, LedgerHead.from_bytes(head_bytes))
        except (LedgerRollbackError, LedgerHeadError) as exc:
            return str(exc)
        return None

    def reinstate(self, device_id: str) -> None:
        """Clear a remembered refusal once an operator has restored the device's ledger."""
        self._refused.pop(device_id, None)

    def _rollback(self, device_id: str, head: LedgerHead, reason: str) -> LedgerRollbackError:
        spend = self.spent(device_id)
        last = self.last_head(device_id)
        figures = (
            f"by the aggregator's record it has spent epsilon={spend.epsilon:.4g} at delta={spend.delta:g} over "
            f"{spend.participations} participation(s)" if spend.participations else "the aggregator has no "
            "participation of it on record"
        )
        return LedgerRollbackError(
            f"refusing device {device_id}: {reason}; {figures}. Restore its ledger from its newest copy; its input "
            "is refused until then",
            reported=head, last_seen=last, spent_participations=spend.participations,
            spent_epsilon=spend.epsilon if math.isfinite(spend.epsilon) else None,
        )

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: events as their dicts, digests in hex."""
        return {
            "format": RECORD_FORMAT,
            "delta": self.delta,
            "devices": {
                device: {
                    "participations": [p.to_dict() for p in self._known.get(device, [])],
                    "refused": self._refused.get(device),
                }
                for device in self.devices()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParticipationRecord:
        if data.get("format") != RECORD_FORMAT:
            raise ParticipationRecordError(f"participation record has unknown format {data.get('format')!r}")
        record = cls(float(data["delta"]))
        try:
            for device, entry in data["devices"].items():
                known = [KnownParticipation.from_dict(p) for p in entry["participations"]]
                if any(b.head.sequence <= a.head.sequence for a, b in pairwise(known)):
                    raise ParticipationRecordError(f"participation record of device {device} has heads out of order")
                if known:
                    record._known[str(device)] = known
                if entry.get("refused") is not None:
                    record._refused[str(device)] = str(entry["refused"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ParticipationRecordError(f"malformed participation record: {exc!r}") from None
        return record
