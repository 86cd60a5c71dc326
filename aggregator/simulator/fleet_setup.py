"""A simulated fleet on disk: seed-derived identities, device state directories, the store and the service config.

Why seed-derived keys (SIMULATION ONLY, never a production path): the machines of a ``--shard``
run must agree on every device's public key and on the aggregator's without exchanging files, and
the same seed must give the same fleet. Anyone who knows the seed knows every private key here.

Each device's state directory is what ``fleetlearn device init`` makes (identity key 0600, device
id, provisioned fleet and aggregator key, privacy ledger), so the agent that runs on it is the
production ``DeviceAgent``; a crashed device is re-created from exactly these files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.service.config import (
    BrokerConfig,
    DeadlinesConfig,
    EvaluationConfig,
    FleetConfig,
    MetricsConfig,
    ModelConfig,
    PrivacyConfig,
    RoundsConfig,
    ServiceConfig,
    StrategyConfig,
    TrainingConfig,
)
from aggregator.simulator.scenario import Scenario, ScenarioError
from edge_sdk.device.state_dir import (
    DEVICE_FILE,
    IDENTITY_FILE,
    LEDGER_FILE,
    STATE_FORMAT,
    Provisioning,
    write_new_file,
    write_provisioning,
)
from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.secagg.keys import IdentityKey

DEVICE_BUDGET = 1e300  # the devices' own budget: the fleet's target is the aggregator's plan, not a decline
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Deadlines a loaded 2-core machine never misses by accident; dropouts do not wait them out, since
# the service closes a stage as soon as every device it waits for is offline (its last will).
DEADLINES = DeadlinesConfig(ready=600.0, train=1200.0, secagg_stage=600.0)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ScenarioError(f"run id {run_id!r}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a "
                            "letter or digit (it names the run directory and the fleet's MQTT topics)")
    return run_id


def fleet_id(run_id: str) -> str:
    """The fleet id (a topic level): one per run, so retained messages of another run on the broker never mix in."""
    # A digest, not the id itself: ids differ in length, and the fleet id is inside every envelope, so the
    # report's byte counts would differ between two runs of the same seed.
    return "sim-" + hashlib.sha256(check_run_id(run_id).encode()).hexdigest()[:16]


def device_id(index: int) -> str:
    return f"dev-{index:05d}"


def _derive(seed: int, label: str) -> bytes:
    return hashlib.sha256(f"fleetlearn-simulator/{seed}/{label}".encode()).digest()


def device_identity(seed: int, index: int) -> IdentityKey:
    """SIMULATION ONLY: device ``index``'s Ed25519 key from the seed."""
    return IdentityKey(_derive(seed, f"device/{index}"))


def aggregator_identity(seed: int) -> IdentityKey:
    """SIMULATION ONLY: the aggregator's Ed25519 key from the seed."""
    return IdentityKey(_derive(seed, "aggregator"))


def noise_seed(seed: int, index: int) -> bytes:
    """SIMULATION ONLY: device ``index``'s DP noise seed (``DeviceConfig.noise_seed``)."""
    return _derive(seed, f"noise/{index}")


def shard_devices(scenario: Scenario) -> list[int]:
    """The device indices this shard (``scenario.shard``) runs: every N-th, starting at i."""
    i, n = scenario.shard
    return list(range(i, scenario.devices, n))


def create_device_state(directory: Path, device: str, identity: IdentityKey, fleet: str, aggregator_public: bytes,
                        delta: float) -> None:
    """What ``device init --state-dir --fleet --aggregator-key`` writes, with the given identity."""
    directory.mkdir(parents=True, mode=0o700)
    write_new_file(directory / IDENTITY_FILE, identity.private.hex().encode() + b"\n")
    write_new_file(directory / DEVICE_FILE,
                   json.dumps({"format": STATE_FORMAT, "device_id": device}, sort_keys=True).encode() + b"\n")
    write_provisioning(directory, Provisioning(fleet, aggregator_public))
    DeviceLedger.open(directory / LEDGER_FILE, DEVICE_BUDGET, delta).close()


def write_aggregator_state(state_dir: Path, scenario: Scenario) -> None:
    """The aggregator's key (from the seed) and a store with every device of the fleet enrolled."""
    from aggregator.store import open_store

    state_dir.mkdir(parents=True, mode=0o700)
    write_new_file(state_dir / "aggregator.key", aggregator_identity(scenario.seed).private.hex().encode() + b"\n")
    with open_store(state_dir / "aggregator.sqlite") as store, store.transaction():
        for index in range(scenario.devices):
            store.enrol(device_id(index), device_identity(scenario.seed, index).public, now=0.0)


@dataclass(frozen=True)
class FleetData:
    """The training data split among the devices and the held-out set, as arrays."""

    x: np.ndarray
    y: np.ndarray
    parts: list[np.ndarray]  # per device, indices into x and y
    test_x: np.ndarray
    test_y: np.ndarray

    def save(self, path: Path) -> None:
        """One .npz the workers read: the training arrays and each device's slice of ``order``."""
        offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        order = np.concatenate(self.parts).astype(np.int64)
        np.savez(path, x=self.x, y=self.y, order=order, offsets=offsets)


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``digits`` (scikit-learn's, scaled to [0, 1]) or an .npz with ``x`` and ``y``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    path = Path(name)
    if not path.is_file():
        raise ScenarioError(f"dataset={name!r}: not 'digits' and not an existing .npz file")
    from edge_sdk.training import load_dataset_npz

    return load_dataset_npz(path)


def split_data(scenario: Scenario) -> FleetData:
    """Hold out ``test_fraction`` (seeded shuffle), then partition the rest among all the fleet's devices."""
    from aggregator.simulator.partition import partition

    x, y = load_dataset(scenario.dataset)
    order = np.random.default_rng(scenario.seed).permutation(len(x))
    cut = len(x) - max(1, int(round(scenario.test_fraction * len(x))))
    train, test = order[:cut], order[cut:]
    parts = partition(y[train], scenario.devices, scenario.partition, alpha=scenario.alpha,
                      shards_per_device=scenario.shards_per_device, seed=scenario.seed)
    return FleetData(x[train], y[train], parts, x[test], y[test])


def service_config(scenario: Scenario, fleet: str, state_dir: Path, bundle: Path, broker_url: str) -> ServiceConfig:
    """The aggregator's configuration for this scenario (no metrics port; the engine evaluates itself)."""
    cohort = scenario.cohort or scenario.devices
    return ServiceConfig(
        fleet=FleetConfig(id=fleet, state_dir=state_dir),
        broker=BrokerConfig(urls=(broker_url,), client_id=f"{fleet}-aggregator"),
        model=ModelConfig(bundle=bundle),
        rounds=RoundsConfig(count=scenario.rounds, cohort_min=2, cohort_max=cohort, over_selection=0.0,
                            interval=0.0, retry_after=0.0, check_back_after=0.0),
        deadlines=DEADLINES,
        training=TrainingConfig(epochs=scenario.local_epochs, batch_size=scenario.batch_size, lr=scenario.lr,
                                seed=scenario.seed),
        privacy=PrivacyConfig(mode=scenario.privacy_mode, mechanism=scenario.mechanism,
                              target_epsilon=scenario.epsilon, delta=scenario.delta, budget_rounds=scenario.rounds,
                              clip=scenario.clip, bits=scenario.bits, threat_model=scenario.threat_model,
                              dropout=scenario.expected_dropout, colluding=scenario.colluding),
        strategy=StrategyConfig(name=scenario.strategy, settings={"server_lr": scenario.server_lr}),
        evaluation=EvaluationConfig(data=None),
        metrics=MetricsConfig(port=None),
    )
