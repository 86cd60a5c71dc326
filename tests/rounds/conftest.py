"""A small fleet on the round layer: real ledgers on disk, real signatures, a trivial local update.

Training is replaced by a fixed per-device step (the round layer does not care how the update was
made), so each round takes milliseconds and the expected FedAvg is known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from aggregator.rounds.cohort import CohortPolicy
from aggregator.rounds.host_round import HostConfig, draft_plan
from aggregator.rounds.memory_fleet import MemoryFleet
from aggregator.strategy import make_strategy
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.protocol.device_effects import DeviceEffectHandlers
from edge_sdk.protocol.device_round import DeviceConfig
from edge_sdk.protocol.effects import AccountRound, Metric, PersistModel, PersistRound, Train
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.plan import Sampling, SecAggPolicy, TrainingPlan
from edge_sdk.protocol.routing import limits_for
from edge_sdk.secagg.keys import IdentityKey

FLEET = "testfleet"
NOISE = 1e-3  # a tiny noise multiplier: a finite epsilon the ledger accepts, and a sum close to exact
PARAMS = {"bias": np.zeros(3, dtype=np.float32), "weight": np.zeros((3, 4), dtype=np.float32)}


@dataclass
class SmallFleet:
    fleet: MemoryFleet
    host_config: HostConfig
    aggregator_key: IdentityKey
    identities: dict[str, IdentityKey]
    ledgers: dict[str, DeviceLedger]
    steps: dict[str, np.ndarray]  # each device's local update
    layout: ParameterLayout
    accounted: list[AccountRound] = field(default_factory=list)

    def plan(self, round_index: int = 1, t_honest: int = 3, model_version: int = 0, params=None, **terms):
        encoding = EncodingParams(dim=self.layout.dim, clip=10.0, gamma=1e-4, bits=24, rotation_seed=bytes(range(16)))
        values = dict(round_index=round_index, model_version=model_version,
                      training=TrainingPlan(epochs=1, batch_size=4, lr=0.1, seed=round_index), encoding=encoding,
                      mechanism="skellam", noise_multiplier=NOISE, t_honest=t_honest, privacy_mode="distributed",
                      sampling=Sampling.server(sorted(self.identities)),
                      secagg=SecAggPolicy(dropout_fraction=0.1, colluding_fraction=0.0, stage_timeout=10.0,
                                          degree=len(self.identities) - 1, threshold=4))
        values.update(terms)
        return draft_plan(self.host_config, params or PARAMS, **values)


def build_small_fleet(tmp_path, n: int = 6, budget: float = 1e9) -> SmallFleet:
    ids = [f"dev-{i}" for i in range(n)]
    identities = {d: IdentityKey.generate() for d in ids}
    enrolled = {d: k.public for d, k in identities.items()}
    aggregator_key = IdentityKey.generate()
    layout = ParameterLayout.of(PARAMS)
    rng = np.random.default_rng(5)
    steps = {d: rng.normal(0, 0.1, layout.dim).astype(np.float32) for d in ids}
    ledgers = {d: DeviceLedger.open(tmp_path / f"{d}.ledger", budget, 1e-5) for d in ids}
    accounted: list[AccountRound] = []

    def device_handlers(d):
        def train(effect: Train):
            flat = layout.flatten(effect.params) + steps[d]
            return layout.unflatten(flat)

        # The real ledger handlers (check, and record with its fsync); only training is replaced.
        return {**DeviceEffectHandlers(None, None, ledgers[d]).as_mapping(), Train: train}

    host_config = HostConfig(FLEET, aggregator_key, enrolled, layout, make_strategy("fedavg"),
                             CohortPolicy(min_size=3, max_size=n, over_selection=0.0))
    host_handlers = {AccountRound: lambda e: accounted.append(e) or "accounted", PersistRound: lambda e: None,
                     PersistModel: lambda e: None, Metric: lambda e: None}
    devices = {d: (DeviceConfig(FLEET, d, identities[d], aggregator_key.public, enrolled, layout,
                                colluding_fraction=0.0), device_handlers(d)) for d in ids}
    padded = EncodingParams(layout.dim, 1.0, 1.0, 24, bytes(16)).padded_dim
    fleet = MemoryFleet(host_config, host_handlers, devices, limits_for(padded, 24, n, 4 * layout.dim))
    return SmallFleet(fleet, host_config, aggregator_key, identities, ledgers, steps, layout, accounted)


@pytest.fixture
def small_fleet(tmp_path):
    return build_small_fleet(tmp_path)
