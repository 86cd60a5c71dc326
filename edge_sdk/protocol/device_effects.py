"""Effect handlers for a device: train with onnxruntime, check and write the privacy ledger.

Why here: the device agent, the in-memory fleet of the example and the tests all need the same
handlers, and the ledger's write-ahead rule lives in ``record``: it returns the head only after
``DeviceLedger.record`` has fsynced the entry and its head file. Persistence and metrics are the
shell's business; by default these handlers keep them in lists for whoever asks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.protocol.effects import (
    CheckEligibility,
    Eligibility,
    Metric,
    PersistModel,
    PersistRound,
    RecordParticipation,
    Train,
)
from edge_sdk.protocol.messages import DeclineReason


@dataclass
class DeviceEffectHandlers:
    """Handlers over one device's training state, data and ledger (the training state may be shared)."""

    training: Any  # edge_sdk.training.TrainingState
    data: Any  # edge_sdk.training.Dataset
    ledger: DeviceLedger
    persisted: list[Any] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)

    def train(self, effect: Train) -> dict:
        from edge_sdk.training import TrainConfig, train_local

        t = effect.plan.training
        self.training.set_params(effect.params)
        self.training.reset_optimizer_state()
        train_local(self.training, self.data, TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                                          seed=t.seed))
        return self.training.get_params()

    def check(self, effect: CheckEligibility) -> Eligibility:
        decision = self.ledger.check(effect.event)
        return Eligibility(decision.accepted, None if decision.accepted else DeclineReason.BUDGET, decision.reason)

    def record(self, effect: RecordParticipation) -> LedgerHead:
        self.ledger.record(effect.round_id, effect.event)  # fsyncs the record and the head file
        return self.ledger.head()

    def as_mapping(self) -> dict[type, Callable[[Any], Any]]:
        return {Train: self.train, CheckEligibility: self.check, RecordParticipation: self.record,
                PersistRound: self.persisted.append, PersistModel: self.persisted.append,
                Metric: self.metrics.append}
