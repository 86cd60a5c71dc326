"""``aggregator.toml``: the aggregator service's configuration, one frozen dataclass per section.

Why strict: a typo in a deployed service's config (``cohort_mn``, a negative deadline, an
``epsilon`` of ``"10"``) must stop it at start-up with the key named, not surface rounds later as
a wrong privacy guarantee. Unknown keys are refused for the same reason. Relative paths are
relative to the config file, so a config and its bundle can move together.

An example with every key: ``firmware_configs/aggregator.toml``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_sdk.errors import ConfigError
from edge_sdk.modulus import MAX_BITS, MIN_BITS
from edge_sdk.privacy.modes import PrivacyMode
from edge_sdk.privacy.noise import NOISE_MECHANISMS
from edge_sdk.secagg.parameters import ThreatModel

T = TypeVar("T")
_REQUIRED = object()


class ServiceConfigError(ConfigError):
    """A value in aggregator.toml is missing, of the wrong type or out of range; the message names its key."""


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path | None = None  # the aggregator's client certificate (mTLS) and key
    key: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    urls: tuple[str, ...]  # the nodes of one broker (cluster): one connection fails over between them
    client_id: str = "fleetlearn-aggregator"
    username: str | None = None
    password_file: Path | None = None  # never the password itself in the config file
    protocol: str = "3.1.1"
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class FleetConfig:
    id: str
    state_dir: Path  # the store, the aggregator's identity key


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path
    initial_params: Path | None = None  # .npz; the bundle's initial parameters otherwise


@dataclass(frozen=True)
class RoundsConfig:
    count: int = 0  # rounds to run; 0 runs until stopped
    cohort_min: int = 2
    cohort_max: int = 100
    over_selection: float = 0.3  # invite this fraction more than cohort_max to absorb dropouts
    interval: float = 0.0  # seconds between the end of one round and the next plan
    retry_after: float = 30.0  # seconds after an aborted round before the next plan (so aborts do not spin)
    check_back_after: float = 600.0  # pace steering for declined, unselected and late devices
    sampling: str = "server"  # or "self": devices join with probability self_probability
    self_probability: float | None = None


@dataclass(frozen=True)
class DeadlinesConfig:
    ready: float = 60.0  # plan -> cohort chosen
    train: float = 600.0  # round start -> adverts (local training happens here)
    secagg_stage: float = 60.0  # each SecAgg+ stage after that


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = PrivacyMode.DISTRIBUTED.value
    mechanism: str = "skellam"
    target_epsilon: float = 10.0  # over all rounds (rounds.count, or budget_rounds when count is 0)
    delta: float = 1e-5
    budget_rounds: int = 100
    clip: float = 1.0
    bits: int = 20
    noise_multiplier: float | None = None  # None: calibrated for target_epsilon
    threat_model: str = ThreatModel.ACTIVE.value
    dropout: float = 0.05
    colluding: float = 0.05
    t_honest: int | None = None  # None: the cohort less its expected dropouts and colluders


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    settings: Mapping[str, Any] = field(default_factory=dict)  # passed to the strategy by name


@dataclass(frozen=True)
class EvaluationConfig:
    data: Path | None = None  # held-out .npz with x and y; evaluated after every round


@dataclass(frozen=True)
class MetricsConfig:
    port: int | None = 9464  # Prometheus endpoint; None (omit the key, or set enabled = false) for none
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ShardingConfig:
    """``[sharding]``: a coordinator and aggregator workers (``fleetlearn aggregator coordinator`` / ``worker``).

    ``store`` is the state the coordinator and its workers share (a ``postgresql://`` DSN across
    hosts; empty: the SQLite file in ``fleet.state_dir``, which processes on one host can share).
    ``handout`` "auto" uses the MQTT 5 shared subscription when ``broker.protocol = "5"``.
    """

    workers: int = 1  # sub-cohorts the noise is calibrated for (at most this many per round)
    sub_cohort_min: int = 2
    task_deadline: float = 10.0  # seconds for a worker to claim a task before it goes to another
    max_attempts: int = 2
    handout: str = "auto"  # "auto", "shared" or "per-worker"
    store: str | None = None


@dataclass(frozen=True)
class ServiceConfig:
    fleet: FleetConfig
    broker: BrokerConfig
    model: ModelConfig
    rounds: RoundsConfig = RoundsConfig()
    deadlines: DeadlinesConfig = DeadlinesConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    strategy: StrategyConfig = StrategyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    metrics: MetricsConfig = MetricsConfig()
    sharding: ShardingConfig = ShardingConfig()

    @property
    def store_path(self) -> Path | str:
        """The SQLite file in the state directory, or ``sharding.store`` (a PostgreSQL DSN) when set."""
        return self.sharding.store or self.fleet.state_dir / "aggregator.sqlite"

    @property
    def identity_path(self) -> Path:
        return self.fleet.state_dir / "aggregator.key"


class _Table:
    """Reads one TOML table, naming ``section.key`` in every error, and refuses keys nobody read."""

    def __init__(self, data: Any, name: str, source: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ServiceConfigError(f"{source}: [{name}] must be a table, got {type(data).__name__}")
        self.data, self.name, self.source, self.base = data, name, source, base
        self.read: set[str] = set()

    def _error(self, key: str, what: str, value: Any) -> ServiceConfigError:
        return ServiceConfigError(f"{self.source}: {self.name}.{key} must be {what}, got {value!r}")

    def _get(self, key: str, default: Any, check: Callable[[Any], bool], what: str) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ServiceConfigError(f"{self.source}: {self.name}.{key} is required ({what})")
            return default
        value = self.data[key]
        if not check(value):
            raise self._error(key, what, value)
        return value

    def text(self, key: str, default: Any = _REQUIRED, choices: tuple[str, ...] | None = None) -> Any:
        what = f"one of {list(choices)}" if choices else "a non-empty string"
        return self._get(key, default, lambda v: isinstance(v, str) and bool(v) and (not choices or v in choices),
                         what)

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0, maximum: int = 2**63 - 1) -> Any:
        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum
        return self._get(key, default, ok, f"an integer from {minimum} to {maximum}")

    def number(self, key: str, default: Any = _REQUIRED, minimum: float = 0.0, maximum: float = math.inf,
               exclusive: bool = False) -> Any:
        def ok(v: Any) -> bool:
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                return False
            return (v > minimum if exclusive else v >= minimum) and v <= maximum
        low = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        high = "" if math.isinf(maximum) else f" and <= {maximum:g}"
        value = self._get(key, default, ok, f"a finite number {low}{high}")
        return float(value) if isinstance(value, int | float) else value

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, lambda v: isinstance(v, bool), "true or false")

    def path(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.text(key, default)
        return Path(self.base, os.path.expanduser(value)) if isinstance(value, str) else value

    def texts(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, lambda v: isinstance(v, list) and bool(v) and
                          all(isinstance(x, str) and x for x in v), "a non-empty list of strings")
        return tuple(value) if isinstance(value, list) else value

    def table(self, key: str, required: bool = False) -> _Table | None:
        self.read.add(key)
        if key not in self.data:
            if required:
                raise ServiceConfigError(f"{self.source}: [{self.name}.{key}] is required")
            return None
        return _Table(self.data[key], f"{self.name}.{key}", self.source, self.base)

    def raw(self, key: str, default: Any) -> Any:
        self.read.add(key)
        return self.data.get(key, default)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise ServiceConfigError(
                f"{self.source}: unknown key {self.name}.{unknown[0]}"
                + (f" (and {unknown[1:]})" if unknown[1:] else "")
                + "; see firmware_configs/aggregator.toml for every key"
            )


def _section(root: dict[str, Any], name: str, source: str, base: Path, required: bool = False) -> _Table:
    if name not in root:
        if required:
            raise ServiceConfigError(f"{source}: the [{name}] section is required")
        return _Table({}, name, source, base)
    return _Table(root[name], name, source, base)


def _fleet(t: _Table) -> FleetConfig:
    from aggregator.store.base import StoreError, check_topic_level

    fleet_id = t.text("id")
    try:
        check_topic_level(fleet_id, f"{t.name}.id")
    except StoreError as exc:
        raise ServiceConfigError(f"{t.source}: {exc}") from None
    return FleetConfig(fleet_id, t.path("state_dir"))


def _broker(t: _Table) -> BrokerConfig:
    from edge_sdk.transport.mqtt import BrokerAddress, parse_broker_urls

    urls = t.texts("urls")
    for url in urls:
        try:
            BrokerAddress.parse(url)
        except ConfigError as exc:
            raise ServiceConfigError(f"{t.source}: {t.name}.urls: {exc}") from None
    try:
        parse_broker_urls(",".join(urls))  # one connection fails over between them: one scheme for all
    except ConfigError as exc:
        raise ServiceConfigError(f"{t.source}: {t.name}.urls: {exc}") from None
    tls_table = t.table("tls")
    tls = None
    if tls_table is not None:
        cert, key = tls_table.path("cert", None), tls_table.path("key", None)
        if (cert is None) != (key is None):
            raise ServiceConfigError(f"{t.source}: broker.tls needs both cert and key for mTLS, or neither")
        tls = TlsConfig(tls_table.path("ca"), cert, key)
        tls_table.done()
        if not all(u.startswith("mqtts://") for u in urls):
            raise ServiceConfigError(f"{t.source}: [broker.tls] is set, so every broker.urls entry must be mqtts://")
    return BrokerConfig(
        urls, t.text("client_id", BrokerConfig.client_id), t.text("username", None), t.path("password_file", None),
        t.text("protocol", "3.1.1", choices=("3.1.1", "5")), tls,
    )


def _rounds(t: _Table) -> RoundsConfig:
    d = RoundsConfig()
    cohort_min = t.integer("cohort_min", d.cohort_min, minimum=2)
    cohort_max = t.integer("cohort_max", d.cohort_max, minimum=2)
    if cohort_max < cohort_min:
        raise ServiceConfigError(f"{t.source}: rounds.cohort_max ({cohort_max}) is below rounds.cohort_min "
                                 f"({cohort_min})")
    sampling = t.text("sampling", d.sampling, choices=("server", "self"))
    probability = t.number("self_probability", None, minimum=0.0, maximum=1.0, exclusive=True)
    if (sampling == "self") != (probability is not None):
        raise ServiceConfigError(f"{t.source}: rounds.self_probability is set exactly when rounds.sampling = \"self\"")
    return RoundsConfig(
        t.integer("count", d.count), cohort_min, cohort_max, t.number("over_selection", d.over_selection, maximum=10.0),
        t.number("interval", d.interval), t.number("retry_after", d.retry_after),
        t.number("check_back_after", d.check_back_after), sampling, probability,
    )


def _privacy(t: _Table) -> PrivacyConfig:
    d = PrivacyConfig()
    return PrivacyConfig(
        t.text("mode", d.mode, choices=tuple(m.value for m in PrivacyMode)),
        t.text("mechanism", d.mechanism, choices=tuple(sorted(NOISE_MECHANISMS))),
        t.number("target_epsilon", d.target_epsilon, exclusive=True),
        t.number("delta", d.delta, maximum=0.5, exclusive=True),
        t.integer("budget_rounds", d.budget_rounds, minimum=1),
        t.number("clip", d.clip, exclusive=True),
        t.integer("bits", d.bits, minimum=MIN_BITS, maximum=MAX_BITS),
        t.number("noise_multiplier", None),
        t.text("threat_model", d.threat_model, choices=tuple(m.value for m in ThreatModel)),
        t.number("dropout", d.dropout, maximum=0.99),
        t.number("colluding", d.colluding, maximum=0.99),
        t.integer("t_honest", None, minimum=1),
    )


def _strategy(t: _Table) -> StrategyConfig:
    name = t.text("name", "fedavg")
    settings = t.raw("settings", {})
    if not isinstance(settings, dict):
        raise ServiceConfigError(f"{t.source}: strategy.settings must be a table, got {settings!r}")
    return StrategyConfig(name, dict(settings))


def _metrics(t: _Table) -> MetricsConfig:
    enabled = t.boolean("enabled", True)
    port = t.integer("port", MetricsConfig.port, minimum=0, maximum=65535)
    return MetricsConfig(port if enabled else None, t.text("host", MetricsConfig.host))


def parse_config(data: dict[str, Any], source: str = "aggregator.toml", base: Path = Path()) -> ServiceConfig:
    """Build the config from parsed TOML; ``base`` is the directory relative paths are taken from."""
    known = ("fleet", "broker", "model", "rounds", "deadlines", "training", "privacy", "strategy", "evaluation",
             "metrics", "sharding")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ServiceConfigError(f"{source}: unknown section [{unknown[0]}]; the sections are {list(known)}")

    def read(name: str, build: Callable[[_Table], T], required: bool = False) -> T:
        table = _section(data, name, source, base, required)
        value = build(table)
        table.done()
        return value

    deadline = {"minimum": 0.0, "exclusive": True}
    dd, td = DeadlinesConfig(), TrainingConfig()
    config = ServiceConfig(
        fleet=read("fleet", _fleet, required=True),
        broker=read("broker", _broker, required=True),
        model=read("model", lambda t: ModelConfig(t.path("bundle"), t.path("initial_params", None)), required=True),
        rounds=read("rounds", _rounds),
        deadlines=read("deadlines", lambda t: DeadlinesConfig(
            t.number("ready", dd.ready, **deadline), t.number("train", dd.train, **deadline),
            t.number("secagg_stage", dd.secagg_stage, **deadline))),
        training=read("training", lambda t: TrainingConfig(
            t.integer("epochs", td.epochs, minimum=1), t.integer("batch_size", td.batch_size, minimum=1),
            t.number("lr", td.lr, exclusive=True), t.integer("seed", td.seed))),
        privacy=read("privacy", _privacy),
        strategy=read("strategy", _strategy),
        evaluation=read("evaluation", lambda t: EvaluationConfig(t.path("data", None))),
        metrics=read("metrics", _metrics),
        sharding=read("sharding", _sharding),
    )
    return config


def _sharding(t: _Table) -> ShardingConfig:
    d = ShardingConfig()
    store = t.text("store", None)
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise ServiceConfigError(f"{t.source}: sharding.store must be a postgresql:// DSN (or omitted: the SQLite "
                                 f"file in fleet.state_dir), got {store[:40]!r}")
    return ShardingConfig(t.integer("workers", d.workers, minimum=1), t.integer("sub_cohort_min", d.sub_cohort_min,
                                                                                minimum=2),
                          t.number("task_deadline", d.task_deadline, minimum=0.0, exclusive=True),
                          t.integer("max_attempts", d.max_attempts, minimum=1),
                          t.text("handout", d.handout, choices=("auto", "shared", "per-worker")), store)


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and check ``aggregator.toml``; every problem is a ``ServiceConfigError`` naming the key."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ServiceConfigError(f"config {path} does not exist; start from firmware_configs/aggregator.toml") from None
    except IsADirectoryError:
        raise ServiceConfigError(f"config {path} is a directory; give the aggregator.toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ServiceConfigError(f"config {path} is not valid TOML: {exc}") from None
    return parse_config(data, str(path), path.parent)
