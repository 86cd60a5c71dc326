"""What to simulate: the fleet, its data, its faults, its privacy settings and the seed.

Why one frozen dataclass: the CLI, the Python API, the tests and the benchmark all describe a run
the same way, the report embeds it (``to_json``), and the same scenario with the same seed must
give the same report (timings aside). Every field is checked here, with its name in the message,
before any process or socket exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggregator.strategy.registry import STRATEGIES
from edge_sdk.errors import ConfigError
from edge_sdk.modulus import MAX_BITS, MIN_BITS
from edge_sdk.privacy.modes import PrivacyMode
from edge_sdk.privacy.noise import NOISE_MECHANISMS
from edge_sdk.secagg.parameters import ThreatModel

# The stages at which a device can drop out or crash, in protocol order. TRAIN: after the plan was
# answered, before the advert (local training); then the SecAgg+ stages a device sends in.
FAULT_STAGES = ("TRAIN", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY_CHECK", "UNMASK")
PARTITIONS = ("iid", "dirichlet", "shards")


class ScenarioError(ConfigError):
    """A scenario value is out of range or inconsistent; the message names the field."""


@dataclass(frozen=True)
class Scenario:
    """One simulation run. The defaults are ``make demo``'s configuration (README, "The demo"), chosen by experiment."""

    devices: int = 100
    rounds: int = 20
    bundle: Path | None = None  # a compiled training bundle; None compiles ``model`` into the run dir
    model: str = "softmax"  # a name from ``aggregator.simulator.models`` (used when bundle is None)
    dataset: str = "digits"  # "digits" (scikit-learn's), or a path to an .npz with x and y
    partition: str = "dirichlet"  # "iid", "dirichlet" (alpha) or "shards" (shards_per_device label-sorted shards)
    alpha: float = 0.5
    shards_per_device: int = 2
    test_fraction: float = 0.2  # held out (before partitioning) for the aggregator's evaluation
    dropout: Mapping[str, float] = field(default_factory=dict)  # stage -> probability a device goes silent there
    crash: Mapping[str, float] = field(default_factory=dict)  # stage -> probability its process is killed there
    stragglers: float = 0.0  # fraction of devices that are slow each round
    straggler_delay: float = 0.0  # seconds a straggler adds before it answers each stage
    latency: float = 0.0  # seconds every device adds before it answers each stage
    # privacy and secure aggregation
    epsilon: float = 3.0  # the whole run's target, at delta
    delta: float = 1e-5
    clip: float = 1.0
    bits: int = 20
    mechanism: str = "skellam"
    privacy_mode: str = "distributed"
    threat_model: str = "active"
    colluding: float = 0.05
    expected_dropout: float = 0.1  # what the plan calibrates t_honest for
    # training and the server's strategy
    local_epochs: int = 10
    batch_size: int = 4
    lr: float = 0.5
    strategy: str = "fedavg"
    server_lr: float = 1.0
    cohort: int | None = None  # devices per round; None: all of them
    # running it
    seed: int = 0
    broker: str | None = None  # None: the embedded broker; or mqtt://host:port, mqtts://...
    workers: int = 2  # device worker processes
    shard: tuple[int, int] = (0, 1)  # (i, N): this process runs the i-th of N slices of the fleet

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ScenarioError(f"{name}={getattr(self, name)!r}: {what}")

        need(self.devices >= 2, "devices", "need at least 2 devices")
        need(self.rounds >= 1, "rounds", "need at least 1 round")
        need(self.partition in PARTITIONS, "partition", f"choose one of {', '.join(PARTITIONS)}")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", "need a finite alpha > 0")
        need(self.shards_per_device >= 1, "shards_per_device", "need at least 1")
        need(0 < self.test_fraction < 1, "test_fraction", "need 0 < test_fraction < 1")
        for name in ("dropout", "crash"):
            for stage, p in dict(getattr(self, name)).items():
                if stage not in FAULT_STAGES:
                    raise ScenarioError(f"{name}: unknown stage {stage!r}; choose from {', '.join(FAULT_STAGES)}")
                if not 0 <= p <= 1:
                    raise ScenarioError(f"{name}[{stage}]={p!r}: need a probability in [0, 1]")
        need(0 <= self.stragglers <= 1, "stragglers", "need a fraction in [0, 1]")
        for name in ("straggler_delay", "latency"):
            need(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), name, "need seconds >= 0")
        need(self.epsilon > 0 and math.isfinite(self.epsilon), "epsilon", "need a finite epsilon > 0")
        need(0 < self.delta < 1, "delta", "need 0 < delta < 1")
        need(self.clip > 0 and math.isfinite(self.clip), "clip", "need a finite clip > 0")
        need(MIN_BITS <= self.bits <= MAX_BITS, "bits", f"need {MIN_BITS} <= bits <= {MAX_BITS}")
        need(self.mechanism in NOISE_MECHANISMS, "mechanism", f"choose one of {', '.join(sorted(NOISE_MECHANISMS))}")
        modes = [m.value for m in PrivacyMode]
        need(self.privacy_mode in modes, "privacy_mode", f"choose one of {', '.join(modes)}")
        threats = [t.value for t in ThreatModel]
        need(self.threat_model in threats, "threat_model", f"choose one of {', '.join(threats)}")
        need(0 <= self.colluding < 1, "colluding", "need a fraction in [0, 1)")
        need(0 <= self.expected_dropout < 1, "expected_dropout", "need a fraction in [0, 1)")
        need(self.strategy in STRATEGIES, "strategy", f"choose one of {', '.join(sorted(STRATEGIES))}")
        need(self.local_epochs >= 1, "local_epochs", "need at least 1")
        need(self.batch_size >= 1, "batch_size", "need at least 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "need a finite learning rate > 0")
        need(self.server_lr > 0 and math.isfinite(self.server_lr), "server_lr", "need a finite rate > 0")
        need(self.cohort is None or 2 <= self.cohort <= self.devices, "cohort", "need 2 <= cohort <= devices")
        need(self.seed >= 0, "seed", "need a seed >= 0")
        need(self.workers >= 1, "workers", "need at least 1 worker process")
        if self.broker is not None:
            from edge_sdk.transport.mqtt import BrokerAddress

            try:
                BrokerAddress.parse(self.broker)
            except ConfigError as exc:
                raise ScenarioError(f"broker: {exc}") from None
        if self.dataset != "digits" and not Path(self.dataset).is_file():
            raise ScenarioError(f"dataset={self.dataset!r}: not 'digits' and not an existing .npz file with x and y")
        if self.bundle is not None and not (Path(self.bundle) / "manifest.json").is_file():
            raise ScenarioError(f"bundle={str(self.bundle)!r}: not a training bundle (no manifest.json in it)")
        i, n = self.shard
        need(n >= 1 and 0 <= i < n, "shard", "need i/N with 0 <= i < N")
        need(n == 1 or self.broker is not None, "shard",
             "a fleet spread over machines needs one shared broker: give broker (--broker mqtt://HOST:PORT)")
        object.__setattr__(self, "dropout", dict(self.dropout))
        object.__setattr__(self, "crash", dict(self.crash))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["bundle"] = str(self.bundle) if self.bundle is not None else None
        out["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return out
