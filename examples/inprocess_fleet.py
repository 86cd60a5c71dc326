"""Federated training of any bundle over a few devices in one process, every privacy layer on.

Why a module the examples share: the anomaly-detection and head fine-tuning examples need the
same rounds the MQTT service runs (a signed ``RoundPlan``, ``HostRound`` and ``DeviceRound``
machines, one pump, every message enveloped and routed by topic, write-ahead privacy ledgers,
distributed Skellam noise, active-secure SecAgg+), but in a fraction of a second and without a
broker: the in-memory transport (``aggregator.rounds.memory_fleet``) on a virtual clock carries
the bytes. ``examples/federated_digits.py`` runs the full simulator over MQTT instead.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.accounting.accountant import FleetAccountant  # noqa: E402
from aggregator.accounting.calibration import calibrate  # noqa: E402
from aggregator.rounds.cohort import CohortPolicy  # noqa: E402
from aggregator.rounds.host_round import HostConfig, draft_plan  # noqa: E402
from aggregator.rounds.memory_fleet import MemoryFleet  # noqa: E402
from aggregator.strategy import make_strategy  # noqa: E402
from edge_sdk.privacy import DeviceLedger, EncodingParams  # noqa: E402
from edge_sdk.protocol.device_effects import DeviceEffectHandlers  # noqa: E402
from edge_sdk.protocol.device_round import DeviceConfig  # noqa: E402
from edge_sdk.protocol.effects import AccountRound, Metric, PersistModel, PersistRound  # noqa: E402
from edge_sdk.protocol.layout import ParameterLayout  # noqa: E402
from edge_sdk.protocol.plan import Sampling, SecAggPolicy, TrainingPlan  # noqa: E402
from edge_sdk.protocol.routing import limits_for  # noqa: E402
from edge_sdk.secagg import IdentityKey  # noqa: E402

COLLUDING = 0.05


@dataclass(frozen=True)
class FleetSettings:
    """The privacy target and the devices' local training, for every round."""

    rounds: int
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    bits: int = 20
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    server_lr: float = 1.0
    seed: int | None = 0  # SIMULATION ONLY: seeds the DP noise and rotations so a run reproduces; None: the OS

@dataclass(frozen=True)
class FleetResult:
    params: dict[str, np.ndarray]  # the final global (trainable) parameters
    epsilon: float  # the fleet's epsilon after the last round, at settings.delta
    contributors: list[int]  # devices summed, per round


def federated_train(state, device_data: Mapping[str, object], settings: FleetSettings,
                    on_round: Callable[[int, dict[str, np.ndarray], float], None] | None = None) -> FleetResult:
    """Run ``settings.rounds`` rounds over ``device_data`` (device id -> Dataset) from ``state``'s parameters.

    ``state`` is one ``TrainingState`` every device reuses in turn (the train step is stateless);
    ``on_round(round, params, epsilon)`` is called after each published round. With ``settings.seed``
    set, the devices derive their DP noise from it (``DeviceConfig.noise_seed``, simulation only: anyone
    knowing the seed could remove the noise), so the same seed gives the same model.
    """
    fleet_id = "example"
    params = state.get_params()
    layout = ParameterLayout.of(params)
    devices = sorted(device_data)
    n = len(devices)
    identities = {d: IdentityKey.generate() for d in devices}
    enrolled = {d: k.public for d, k in identities.items()}
    aggregator_key = IdentityKey.generate()
    accountant = FleetAccountant(settings.delta)

    def account(effect: AccountRound):
        return accountant.record_round(effect.round_id, effect.event, {d: effect.event for d in effect.contributors})

    ignore = lambda effect: None  # noqa: E731 - the example persists nothing
    host_handlers = {AccountRound: account, PersistRound: ignore, PersistModel: ignore, Metric: ignore}
    cal = calibrate(settings.epsilon, settings.delta, cohort_size=n, rounds=settings.rounds, dim=layout.dim,
                    bits=settings.bits, population=n, dropout_fraction=0.0, colluding_fraction=COLLUDING,
                    clip=settings.clip)
    contributors: list[int] = []
    epsilon = 0.0
    rounds_rng = None if settings.seed is None else np.random.default_rng(settings.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {d: DeviceLedger.open(Path(tmp) / f"{d}.ledger", 1e9, settings.delta) for d in devices}
        fleet_devices = {
            d: (DeviceConfig(fleet_id, d, identities[d], aggregator_key.public, enrolled, layout,
                             noise_seed=None if settings.seed is None else f"{settings.seed}/{d}".encode()),
                DeviceEffectHandlers(state, device_data[d], ledgers[d]).as_mapping())
            for d in devices
        }
        host = HostConfig(fleet_id, aggregator_key, enrolled, layout,
                          make_strategy("fedavg", server_lr=settings.server_lr),
                          CohortPolicy(min_size=2, max_size=n, over_selection=0.0))
        limits = limits_for(EncodingParams(layout.dim, 1.0, 1.0, settings.bits, bytes(16)).padded_dim, settings.bits,
                            n, 4 * layout.dim)
        fleet = MemoryFleet(host, host_handlers, fleet_devices, limits)
        for round_index in range(1, settings.rounds + 1):
            rotation_seed = secrets.token_bytes(16) if rounds_rng is None else rounds_rng.bytes(16)
            encoding = EncodingParams(dim=layout.dim, clip=cal.clip, gamma=cal.gamma, bits=cal.bits,
                                      rotation_seed=rotation_seed)
            plan = draft_plan(host, params, round_index=round_index, model_version=round_index - 1,
                              training=TrainingPlan(epochs=settings.epochs, batch_size=settings.batch_size,
                                                    lr=settings.lr, seed=round_index),
                              encoding=encoding, mechanism=cal.mechanism, noise_multiplier=cal.noise_multiplier,
                              t_honest=cal.honest_contributors, privacy_mode="distributed",
                              sampling=Sampling.server(devices),
                              secagg=SecAggPolicy(dropout_fraction=0.0, colluding_fraction=COLLUDING))
            outcome = fleet.run_round(plan, params)
            if not outcome.published:
                raise RuntimeError(f"round {round_index} aborted: {outcome.host.abort_reason}")
            params = layout.unflatten(outcome.host.new_params)
            epsilon = outcome.host.report.epsilon
            contributors.append(len(outcome.host.contributors))
            if on_round is not None:
                state.set_params(params)
                on_round(round_index, params, epsilon)
    state.set_params(params)
    return FleetResult(params, epsilon, contributors)
