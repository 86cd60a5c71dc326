"""The device agent: ``fleetlearn device run``, the I/O shell around the pure ``DeviceRound`` machine.

Each round it waits for a signed plan, checks its eligibility (privacy budget in the ledger, plus
the /sys policies), fetches and verifies the model, trains it with onnxruntime (one
``ModelSession`` for the model, reused every round), encodes the update with DP, runs SecAgg+ and
uploads; the machine decides, this shell does the I/O in the pump's order (so the ledger entry
is fsynced before the masked update leaves).

What survives a reboot lives in the state directory (``edge_sdk.device.state_dir``): the identity,
the provisioned fleet and aggregator key, the ledger, and ``agent.json`` with the last round this
device answered and the last model and directory versions it accepted (with the signed model and
directory themselves). So a rebooted device refuses a replayed plan, a rolled-back model or an
older directory, and it never answers a round twice: a round it was in when it died is over for it.

A newer signed plan ends whatever round is still open here (the aggregator has moved on, e.g.
after its own restart). A device declined, unselected or aborted waits the plan's
``check_back_after`` before it answers another (pace steering): the newest plan that arrived
meanwhile is answered then.

Nothing here imports ``aggregator`` or a host-only package.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_sdk.device.eligibility import DevicePolicy, evaluate, read_conditions
from edge_sdk.device.state_dir import StateDirError, load_provisioning, load_state, replace_file
from edge_sdk.errors import FleetlearnError
from edge_sdk.modulus import MAX_BITS
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.protocol.device_effects import DeviceEffectHandlers
from edge_sdk.protocol.device_round import (
    DeviceConfig,
    DeviceMemory,
    DeviceRound,
    DeviceStage,
    DeviceState,
    start_device,
)
from edge_sdk.protocol.directory import DirectoryRelease, accept_directory
from edge_sdk.protocol.effects import CheckEligibility, Eligibility, Metric, PersistModel, PersistRound
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.messages import DeclineReason, ModelRelease
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.protocol.pump import Endpoint, Pump
from edge_sdk.protocol.routing import AGGREGATOR_ID, Router, limits_for, limits_for_plan
from edge_sdk.transport.base import Transport
from edge_sdk.transport.round_transport import RoundTransport
from edge_sdk.wire.envelope import MessageKind, decode_envelope
from edge_sdk.wire.topics import Channel, parse_topic, status_topic

log = logging.getLogger(__name__)

MEMORY_FILE = "agent.json"
MODEL_FILE = "model.release"
DIRECTORY_FILE = "directory.release"
MAX_DIRECTORY = 10_000  # devices a directory (and so a roster) may list: bounds what the agent decodes
POLL_S = 0.05


@dataclass(frozen=True)
class AgentMemory:
    """``agent.json``: what the agent keeps between runs besides the ledger."""

    last_round: int = -1
    model_version: int = -1
    model_digest: bytes = b""
    directory_version: int = -1

    def to_bytes(self) -> bytes:
        return json.dumps({"format": 1, "last_round": self.last_round, "model_version": self.model_version,
                           "model_digest": self.model_digest.hex(), "directory_version": self.directory_version},
                          sort_keys=True).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> AgentMemory:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(int(data["last_round"]), int(data["model_version"]), bytes.fromhex(data["model_digest"]),
                       int(data["directory_version"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateDirError(f"{path} is damaged ({exc}); it holds the last round, model and directory the "
                                "device accepted. Restore it from a backup; deleting it would let a replayed "
                                "plan or an older model through") from None


@dataclass(frozen=True)
class AgentSettings:
    """Everything ``device run`` is told; the rest comes from the state directory."""

    state_dir: Path
    broker_url: str
    bundle: Path
    data: Path
    threads: int = 1
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 60
    max_batch_size: int | None = None  # the profile's limit, lowered to what fits its memory budget
    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")


class DeviceAgent:
    """One device's agent over one broker connection (``transport`` is made from the settings if not given).

    A simulator runs many agents in one process: it passes one shared ``session`` (the model's
    graphs hold no device state) and one shared ``training`` state (the train handler sets the
    round's parameters before every training, and training runs to completion inside one call),
    each agent's own in-memory ``dataset``, and transports on one ``MqttLoop``. ``noise_seed`` is
    for simulation only (``DeviceConfig.noise_seed``). ``fleetlearn device run`` passes none of them.
    """

    def __init__(self, settings: AgentSettings, transport: Transport | None = None,
                 clock: Callable[[], float] = time.monotonic, *, session: Any = None, training: Any = None,
                 dataset: Any = None, noise_seed: bytes | None = None) -> None:
        from edge_sdk.training import ModelSession, TrainingState, load_dataset_npz, prepare_dataset

        self.settings = settings
        self.noise_seed = noise_seed
        self.clock = clock
        directory = settings.state_dir
        state = load_state(directory)
        provisioning = load_provisioning(directory)
        self.device_id = state.device_id
        self.identity = state.identity
        self.fleet = provisioning.fleet
        self.aggregator_public = provisioning.aggregator_public
        self.ledger = DeviceLedger.open(state.ledger_path, create=False)
        if session is None:
            session = ModelSession.open(settings.bundle, threads=settings.threads)  # one session for the model
        self.session = session
        self.training = training if training is not None else TrainingState(self.session)
        if dataset is None:
            dataset = prepare_dataset(self.session.manifest, *load_dataset_npz(settings.data))
        self.data = dataset
        self.layout = ParameterLayout.of(self.training.get_params())
        self.memory_path = directory / MEMORY_FILE
        self.memory = AgentMemory.load(self.memory_path)
        self.model = self._load_release(directory / MODEL_FILE, ModelRelease, self.memory.model_version)
        self.directory = self._load_release(directory / DIRECTORY_FILE, DirectoryRelease,
                                            self.memory.directory_version)
        padded = EncodingParams(self.layout.dim, 1.0, 1.0, MAX_BITS, bytes(16)).padded_dim
        self.limits = limits_for(padded, MAX_BITS, MAX_DIRECTORY, 4 * self.layout.dim)
        if transport is None:
            transport = self._connect()
        self.transport = self._round_transport(transport)
        self.router = Router(self.fleet, self.device_id, self.limits)
        base = DeviceEffectHandlers(self.training, self.data, self.ledger)
        self.handlers = {**base.as_mapping(), CheckEligibility: self._check, PersistRound: self._persist_round,
                         PersistModel: self._persist_model, Metric: self._metric}
        self.endpoint = Endpoint(self.device_id, DeviceRound(), None, self.transport, self.router, self.handlers)
        self.pump = Pump(_WallClock(clock))
        self.pump.add(self.endpoint)
        self._refusals_logged = 0  # of the current round's refusals, how many are logged
        self.held: list[Any] = []  # messages waiting for the first directory
        self.waiting_plan: RoundPlan | None = None  # a plan that arrived during a check-back wait
        self.rounds_done = 0
        self.check_back_at: float | None = None  # pace steering: no new plan is answered before this
        if self.directory is not None:
            self._fresh_state()
        log.info("device %s of fleet %s: agent up (model version %d, directory version %d, last round %d)",
                 self.device_id, self.fleet, self.memory.model_version, self.memory.directory_version,
                 self.memory.last_round)

    # -- set-up ----------------------------------------------------------------------------------

    def _connect(self) -> Transport:
        from edge_sdk.transport.mqtt import MqttSettings, MqttTransport

        s = self.settings
        return MqttTransport(MqttSettings(s.broker_url, self.device_id, username=s.username, password=s.password,
                                          ca_file=s.ca_file, cert_file=s.cert_file, key_file=s.key_file,
                                          keepalive_s=s.keepalive_s,
                                          status_topic=status_topic(self.fleet, self.device_id)))

    def _round_transport(self, inner: Transport) -> RoundTransport:
        return RoundTransport(inner, me=self.device_id, fleet=self.fleet, identity=self.identity,
                              peer_key=self._peer_key, limits=self.limits, clock=self.clock)

    def reconnect(self, inner: Transport) -> None:
        """Carry on over a new connection (the old one was lost): subscribe again, forget the old channel.

        Unicasts still unacknowledged on the old connection are dropped with it; the round they
        belonged to is over for this device (a newer plan supersedes it).
        """
        self.transport = self._round_transport(inner)
        self.endpoint.transport = self.transport
        self.endpoint.subscribed = False
        self.endpoint.subscribe()

    def _peer_key(self, party: str) -> bytes | None:
        return self.aggregator_public if party == AGGREGATOR_ID else None

    def _load_release(self, path: Path, kind: Any, version: int) -> Any:
        if version < 0 or not path.exists():
            return None
        release = kind.from_bytes(path.read_bytes())
        release.verify(self.aggregator_public)  # a tampered state directory is not trusted either
        if release.version != version:
            raise StateDirError(f"{path} holds version {release.version}, {self.memory_path} says {version}")
        return release

    def _config(self) -> DeviceConfig:
        return DeviceConfig(self.fleet, self.device_id, self.identity, self.aggregator_public,
                            self.directory.directory, self.layout, noise_seed=self.noise_seed)

    def _fresh_state(self) -> None:
        memory = DeviceMemory(self.memory.last_round, self.memory.model_version, self.memory.model_digest)
        self.endpoint.state = start_device(self._config(), memory, self.model)
        self._refusals_logged = 0

    def _handle(self, message: Any) -> None:
        """Give ``message`` to the machine, then log what it refused (the machine records, the shell logs)."""
        self.pump.settle(self.endpoint, DeviceRound.handle(self.endpoint.state, message, self.clock()))
        state: DeviceState = self.endpoint.state
        for refusal in state.refusals[self._refusals_logged:]:
            log.warning("device %s refused a %s in stage %s: %s", self.device_id, refusal.message_type,
                        refusal.stage.value, refusal.reason)
        self._refusals_logged = len(state.refusals)

    # -- effect handlers -------------------------------------------------------------------------

    def _check(self, effect: CheckEligibility) -> Eligibility:
        decision = self.ledger.check(effect.event)
        if not decision.accepted:
            return Eligibility(False, DeclineReason.BUDGET, decision.reason)
        batch, limit = effect.plan.training.batch_size, self.settings.max_batch_size
        if limit is not None and batch > limit:
            return Eligibility(False, DeclineReason.PLAN_REFUSED, f"batch size {batch} is above this device's "
                               f"limit {limit} (its profile's max_batch_size and memory budget)")
        verdict = evaluate(self.settings.policy, read_conditions(self.settings.sys_root, self.settings.proc_root))
        if not verdict.eligible:
            return Eligibility(False, DeclineReason.INELIGIBLE, verdict.detail)
        return Eligibility(True)

    def _save_memory(self) -> None:
        state: DeviceState = self.endpoint.state
        if state is not None:
            m = state.memory
            self.memory = replace(self.memory, last_round=max(self.memory.last_round, m.last_round),
                                  model_version=m.model_version, model_digest=m.model_digest)
        replace_file(self.memory_path, self.memory.to_bytes())

    def _persist_round(self, effect: PersistRound) -> None:
        log.info("device %s: %s is at %s %s", self.device_id, effect.round_id, effect.stage,
                 json.dumps(dict(effect.facts), sort_keys=True, default=str))
        self._save_memory()

    def _persist_model(self, effect: PersistModel) -> None:
        release: ModelRelease = self.endpoint.state.model
        replace_file(self.settings.state_dir / MODEL_FILE, release.to_bytes())  # the model, then who points at it
        self.model = release
        self._save_memory()
        log.info("device %s: accepted model version %d", self.device_id, effect.version)

    def _metric(self, effect: Metric) -> None:
        log.debug("device %s: metric %s=%g %s", self.device_id, effect.name, effect.value, dict(effect.labels))

    # -- the loop --------------------------------------------------------------------------------

    def step(self, timeout: float = POLL_S) -> None:
        """Take what arrived within ``timeout`` s, then tick the machine and start the next round when due."""
        for topic, data in self.transport.poll(timeout):
            self._take(topic, data)
        self.tick_waiting()
        state: DeviceState | None = self.endpoint.state
        if state is None:
            return
        self.pump.settle(self.endpoint, DeviceRound.tick(state, self.clock()))
        state = self.endpoint.state
        if DeviceRound.finished(state):
            self._round_over(state)

    def idle(self, now: float) -> bool:
        """True when ``step(0)`` would do nothing now: no input, no retransmission, deadline or check-back due.

        Why: one process driving hundreds of agents on one ``MqttLoop`` steps only those with work.
        """
        if not self.transport.quiet(now):
            return False
        if self.waiting_plan is not None and self.check_back_at is not None and now >= self.check_back_at:
            return False
        state: DeviceState | None = self.endpoint.state
        if state is None:
            return True
        deadline = DeviceRound.deadline(state)
        return (deadline is None or now < deadline) and not DeviceRound.finished(state)

    def run(self, stop: Callable[[], bool], max_rounds: int | None = None) -> int:
        """Run until ``stop()`` (SIGTERM) or ``max_rounds`` rounds ended here; closes the connection."""
        try:
            while not stop() and (max_rounds is None or self.rounds_done < max_rounds):
                self.step()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self.transport.close()
        self.ledger.close()

    def _round_over(self, state: DeviceState) -> None:
        plan = state.plan
        if plan is None:  # never had a plan (uninvited plans end with one): nothing to close
            return
        self.rounds_done += 1
        log.info("device %s: round %d ended %s%s", self.device_id, plan.round_index, state.stage.value,
                 f" ({state.error})" if state.error else "")
        self._save_memory()
        check_back_at = state.check_back_at if state.stage is DeviceStage.ABORTED else None
        self._fresh_state()
        self.check_back_at = check_back_at
        if self.waiting_plan is not None and check_back_at is None:
            plan, self.waiting_plan = self.waiting_plan, None
            self._offer_plan(plan)

    def _take(self, topic: str, data: bytes) -> None:
        try:
            channel = parse_topic(topic).channel
            if channel is Channel.DIRECTORY:
                self._take_directory(data)
                return
            received = self.router.incoming(topic, data)
        except FleetlearnError as exc:
            log.warning("device %s refused a message on %s: %s", self.device_id, topic, exc)
            return
        message = received.message
        if self.endpoint.state is None:
            self.held = [m for m in self.held if type(m) is not type(message)] + [message]  # the newest of each
            return
        if isinstance(message, RoundPlan):
            self._offer_plan(message)
            return
        self._handle(message)

    def _take_directory(self, data: bytes) -> None:
        envelope = decode_envelope(data, self.limits)
        if envelope.kind is not MessageKind.DIRECTORY:
            log.warning("device %s: a %s on the directory topic", self.device_id, envelope.kind.name)
            return
        current = self.directory.version if self.directory is not None else -1
        release = accept_directory(DirectoryRelease.from_bytes(envelope.payload), self.aggregator_public,
                                   self.fleet, current)
        if self.directory is not None and release.version == current:
            return
        replace_file(self.settings.state_dir / DIRECTORY_FILE, release.to_bytes())
        self.directory = release
        self.memory = replace(self.memory, directory_version=release.version)
        self._save_memory()
        log.info("device %s: enrolment directory version %d (%d devices)", self.device_id, release.version,
                 len(release.keys))
        state: DeviceState | None = self.endpoint.state
        if state is None or (state.plan is None and state.stage is DeviceStage.PLAN):
            model = state.model if state is not None else self.model
            self.model = model
            self._fresh_state()
            held, self.held = self.held, []
            for message in sorted(held, key=lambda m: not isinstance(m, ModelRelease)):  # the model first
                if isinstance(message, RoundPlan):
                    self._offer_plan(message)
                else:
                    self._handle(message)

    def _offer_plan(self, plan: RoundPlan) -> None:
        """Answer ``plan`` now, after the check-back wait, or not at all (an older or forged one)."""
        try:
            plan.verify(self.aggregator_public)  # before it may end the round that is open here
        except FleetlearnError as exc:
            log.warning("device %s refused a plan: %s", self.device_id, exc)
            return
        state: DeviceState = self.endpoint.state
        if self.check_back_at is not None and self.clock() < self.check_back_at:
            self.waiting_plan = plan
            return
        self.check_back_at = None
        if state.plan is not None and plan.round_index > state.plan.round_index and not DeviceRound.finished(state):
            log.info("device %s: plan for round %d supersedes round %d, still open here", self.device_id,
                     plan.round_index, state.plan.round_index)
            self._fresh_state()
        self.router.limits = limits_for_plan(plan, min(len(self.directory.keys), MAX_DIRECTORY) or 1)
        self._handle(plan)

    def tick_waiting(self) -> None:
        """Answer a plan held for the check-back time once it has passed."""
        if self.waiting_plan is not None and self.check_back_at is not None and self.clock() >= self.check_back_at:
            plan, self.waiting_plan, self.check_back_at = self.waiting_plan, None, None
            self._offer_plan(plan)


class _WallClock:
    """The pump's clock in a shell that polls: ``wait`` is never called by ``settle``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


def policy_from_options(options: Mapping[str, Any]) -> DevicePolicy:
    """A ``DevicePolicy`` from ``device run``'s options (None leaves the default, ``off`` disables a rule)."""
    values = {k: v for k, v in options.items() if v is not None}
    return replace(DevicePolicy(), **{k: (None if v == "off" else v) for k, v in values.items()})
