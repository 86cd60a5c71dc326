"""A real in-memory round (HostRound, DeviceRounds, the pump) with the service's store-backed handlers.

The round's model, its stages, its accounting event and every contributor's ledger head end up
in a real SQLite file, and a restarted service rebuilds its accountant and participation record
from it.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_model
from aggregator.rounds.cohort import CohortPolicy
from aggregator.rounds.host_round import HostConfig, draft_plan
from aggregator.rounds.memory_fleet import MemoryFleet
from aggregator.service.host_effects import HostEffectHandlers
from aggregator.service.metrics import ServiceMetrics
from aggregator.store import RoundStatus, open_store
from aggregator.strategy import make_strategy
from edge_sdk.privacy import DeviceLedger, EncodingParams
from edge_sdk.protocol.device_effects import DeviceEffectHandlers
from edge_sdk.protocol.device_round import DeviceConfig
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.plan import Sampling, SecAggPolicy, TrainingPlan
from edge_sdk.protocol.routing import limits_for
from edge_sdk.secagg import IdentityKey
from edge_sdk.training import ModelSession, TrainingState, prepare_dataset

FLEET = "digits"
N = 5


def test_a_round_is_persisted_and_a_restart_rebuilds_the_accounts(tmp_path):
    rng = np.random.default_rng(0)
    bundle = tmp_path / "bundle"
    compile_model(model_zoo.mlp((64, 16, 10), seed=0), bundle, loss="cross_entropy", optimizer="sgd")
    session = ModelSession.open(bundle, threads=1)
    state = TrainingState(session)
    params = state.get_params()
    layout = ParameterLayout.of(params)
    ids = [f"dev-{i}" for i in range(N)]
    identities = {d: IdentityKey.generate() for d in ids}
    aggregator_key = IdentityKey.generate()
    store = open_store(tmp_path / "aggregator.sqlite")
    for d in ids:
        store.enrol(d, identities[d].public, now=0.0)
    metrics = ServiceMetrics(FLEET)
    handlers = HostEffectHandlers(store, metrics, 1e-5, clock=lambda: 100.0)
    enrolled = dict(store.directory())
    devices = {}
    for d in ids:
        x = rng.random((20, 64)).astype(np.float32)
        y = rng.integers(0, 10, 20)
        ledger = DeviceLedger.open(tmp_path / f"{d}.ledger", 1e9, 1e-5)
        devices[d] = (DeviceConfig(FLEET, d, identities[d], aggregator_key.public, enrolled, layout),
                      DeviceEffectHandlers(state, prepare_dataset(session.manifest, x, y), ledger).as_mapping())
    host = HostConfig(FLEET, aggregator_key, enrolled, layout, make_strategy("fedavg"),
                      CohortPolicy(min_size=2, max_size=N, over_selection=0.0), ledger_check=handlers.ledger_check)
    encoding = EncodingParams(dim=layout.dim, clip=1.0, gamma=1e-3, bits=20, rotation_seed=secrets.token_bytes(16))
    fleet = MemoryFleet(host, handlers.as_mapping(), devices, limits_for(encoding.padded_dim, 20, N, 4 * layout.dim))
    plan = draft_plan(host, params, round_index=1, model_version=0,
                      training=TrainingPlan(epochs=1, batch_size=10, lr=0.1, seed=1), encoding=encoding,
                      mechanism="skellam", noise_multiplier=0.5, t_honest=2, privacy_mode="distributed",
                      sampling=Sampling.server(ids), secagg=SecAggPolicy(dropout_fraction=0.05))
    outcome = fleet.run_round(plan, params)
    assert outcome.published, outcome.host.abort_reason

    record = store.round(1)
    assert record.status is RoundStatus.COMPLETED and record.stage == "publish"
    assert [s.stage for s in store.stages(1)] == ["plan", "train", "secagg", "publish"]
    model = store.model(1)
    assert model.payload == outcome.host.new_model.parameters
    (event,) = store.accounting_events()
    assert sorted(event.event["contributors"]) == sorted(outcome.host.contributors)
    epsilon = event.event["fleet_epsilon"]
    assert b"fleetlearn_epsilon_spent" in metrics.render()
    store.close()

    with open_store(tmp_path / "aggregator.sqlite") as again:  # the service restarts
        restarted = HostEffectHandlers(again, ServiceMetrics(FLEET), 1e-5, clock=lambda: 200.0)
        assert restarted.accountant.report().epsilon == pytest.approx(epsilon)
        for d in outcome.host.contributors:
            assert restarted.record.last_head(d).sequence >= 2
            stale = restarted.record.last_head(d).to_bytes()
            assert "rolled back" in restarted.ledger_check(d, stale)  # the same head again is refused
