"""The aggregator's effect handlers over the store and the metrics: what HostRound asks, made durable.

Why here and not in the machine: HostRound only says what must happen (``PersistRound``,
``PersistModel``, ``AccountRound``, ``Metric``); the service decides where it goes. Accounting a
round is one store transaction: the fleet's privacy event, the participation record with every
contributor's ledger head, so a crash never leaves a sum accounted for in one and not the other.
The clock is passed in (the service's), so the same handlers run on a virtual clock in tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from aggregator.accounting.accountant import FleetAccountant, RoundPrivacyReport
from aggregator.accounting.participation_record import ParticipationRecord
from aggregator.service.metrics import ServiceMetrics
from aggregator.store import RoundRecord, RoundStatus, StageRecord, Store, StoreError
from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.protocol.effects import AccountRound, Metric, PersistModel, PersistRound

FINAL_STAGES = {"publish": RoundStatus.COMPLETED, "aborted": RoundStatus.ABORTED}


def round_index_of(round_id: str) -> int:
    """``<fleet>/round-<n>`` (``RoundPlan.round_id``) -> n."""
    _, _, tail = round_id.rpartition("/round-")
    if not tail.isdigit():
        raise StoreError(f"round id {round_id!r} is not of the form <fleet>/round-<n>")
    return int(tail)


class HostEffectHandlers:
    """Handlers for one aggregator; ``record`` and ``accountant`` are rebuilt from the store at start-up."""

    def __init__(self, store: Store, metrics: ServiceMetrics, delta: float, clock: Callable[[], float]) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.record: ParticipationRecord = store.participation(delta)
        self.accountant = FleetAccountant(delta)
        from edge_sdk.privacy.participation import ParticipationEvent

        for stored in store.accounting_events():  # replay: the accountant composes by count
            event = ParticipationEvent.from_dict(stored.event["event"])
            self.accountant.record_round(str(stored.round_index), event,
                                         {d: event for d in stored.event["contributors"]})

    def ledger_check(self, device_id: str, head_bytes: bytes) -> str | None:
        """The SecAgg+ server's ``LedgerCheck`` against the stored participation record."""
        return self.record.ledger_check(device_id, head_bytes)

    def account(self, effect: AccountRound) -> RoundPrivacyReport:
        index = round_index_of(effect.round_id)
        with self.store.transaction():
            for device in effect.contributors:
                head = LedgerHead.from_bytes(effect.ledger_heads[device])
                self.record.record(device, effect.round_id, head, effect.event)
            report = self.accountant.record_round(effect.round_id, effect.event,
                                                  {d: effect.event for d in effect.contributors})
            self.store.add_accounting_event(index, {
                "round_id": effect.round_id, "event": effect.event.to_dict(),
                "contributors": list(effect.contributors), "fleet_epsilon": report.epsilon,
            }, now=self.clock())
            self.store.save_participation(self.record)
        self.metrics.set_epsilon(report.epsilon)
        return report

    def persist_round(self, effect: PersistRound) -> None:
        index = round_index_of(effect.round_id)
        now = self.clock()
        facts = json.dumps(dict(effect.facts), sort_keys=True, default=str).encode()
        with self.store.transaction():
            existing = self.store.round(index)
            started = existing.started_at if existing is not None else now
            status = FINAL_STAGES.get(effect.stage, RoundStatus.RUNNING)
            detail = str(effect.facts.get("reason", "")) if status is RoundStatus.ABORTED else ""
            self.store.save_round(RoundRecord(index, existing.session if existing else bytes(32), effect.stage,
                                              status, started, now, facts, detail))
            cohort = effect.facts.get("cohort") or effect.facts.get("contributors") or ()
            self.store.record_stage(StageRecord(index, effect.stage, now, len(cohort), 0))
        if status is not RoundStatus.RUNNING:
            self.metrics.round_finished("completed" if status is RoundStatus.COMPLETED else "aborted",
                                        now - started, len(effect.facts.get("contributors", ())))

    def persist_model(self, effect: PersistModel) -> None:
        if hashlib.sha256(effect.parameters).digest() != effect.digest:
            raise StoreError(f"model version {effect.version}: its digest does not match its parameters")
        self.store.put_model(effect.version, effect.parameters, now=self.clock())
        self.metrics.set_model(effect.version)

    def metric(self, effect: Metric) -> None:
        self.metrics.machine_metric(effect.name, effect.value, dict(effect.labels))

    def as_mapping(self) -> dict[type, Callable[[Any], Any]]:
        return {AccountRound: self.account, PersistRound: self.persist_round, PersistModel: self.persist_model,
                Metric: self.metric}
