"""The aggregator service: ``fleetlearn aggregator serve``, the I/O shell around the pure ``HostRound`` machine.

One process, one broker connection (``MqttTransport`` on one ``MqttLoop``), one pump. Per round:
choose whom to invite (online enrolled devices, over-selected), calibrate the noise for that
cohort, sign and publish the plan and the current model (retained, one topic per chunk), run the
round through the pump (effects into the store in the pump's order, so accounting commits before
the model is published), evaluate the new model on the held-out set when one is configured, and
start the next round after ``rounds.interval``.

Why the shell decides some things the machine does not:

* **Dropouts at once.** A device's retained ``offline`` last will arrives the moment the broker
  notices its socket died. When every device a stage still waits for is offline, the shell moves
  the machine's clock to that stage's deadline instead of waiting it out: the machine sees exactly
  what a deadline would have shown it, only sooner.
* **Restart.** The store holds every committed model, plan, round and accounting event. At start
  the service closes any round a crash left running: completed if its accounting (and, in the same
  transaction, its new model) committed, otherwise aborted with the stage it was in; it never
  resumes one (``_close_interrupted_rounds`` says why). It resumes from the newest committed model
  and numbers the next round after the highest index ever used, so a round index, and with the
  fresh nonce a session, is never reused (devices refuse a replayed one anyway).
* **Reconnect.** After the broker comes back (restarted without persistence it has lost every
  retained message), the service re-publishes the directory and the open round's plan and model.
* **SIGTERM.** The open round is aborted and persisted as such, the connection is closed
  (``offline``), and the process exits 0; devices in it time out or take the next plan.

Logs are JSON lines with round, session, stage and device fields; rejected messages are
rate-limited (``RejectionLog``) and counted in the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.rounds.cohort import CohortPolicy, invite
from aggregator.rounds.host_round import HostConfig, HostRound, HostStage, HostState, draft_plan, start_host_round
from aggregator.service.config import ServiceConfig, ServiceConfigError
from aggregator.service.flood_guard import FloodGuard, FloodGuardedTransport, FloodLimits
from aggregator.service.host_effects import HostEffectHandlers
from aggregator.service.logs import ContextLogger, RejectionLog
from aggregator.service.metrics import ServiceMetrics
from aggregator.store import RoundRecord, RoundStatus, Store, open_store
from aggregator.strategy import make_strategy
from edge_sdk.device.state_dir import StateDirError, write_new_file
from edge_sdk.errors import FleetlearnError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.noise_floor import honest_contributors
from edge_sdk.protocol.directory import DirectoryRelease
from edge_sdk.protocol.effects import AccountRound, PersistRound
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.plan import RoundPlan, Sampling, SecAggPolicy, StageDeadlines, TrainingPlan
from edge_sdk.protocol.pump import Endpoint, Pump
from edge_sdk.protocol.routing import AGGREGATOR_ID, BROADCAST, Router, Send, limits_for, limits_for_plan
from edge_sdk.secagg.keys import KEY_BYTES, IdentityKey
from edge_sdk.secagg.messages import Stage
from edge_sdk.transport.base import Transport
from edge_sdk.transport.mqtt import STATUS_OFFLINE, STATUS_ONLINE
from edge_sdk.transport.round_transport import RoundTransport
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, encode_envelope
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES
from edge_sdk.wire.topics import directory_topic, status_topic

log = logging.getLogger("fleetlearn.aggregator")

POLL_S = 0.05
WAIT_LOG_S = 30.0  # how often "waiting for devices" is repeated


class ServiceError(FleetlearnError):
    """The service cannot start or go on (unreadable key, a model that does not fit the bundle)."""


# --- the aggregator's identity ------------------------------------------------------------------

def load_or_create_identity(path: Path) -> IdentityKey:
    """The aggregator's Ed25519 key (hex, 0600), made on first start and never replaced."""
    if not path.exists():
        with contextlib.suppress(StateDirError):  # another process just made the key: it is never replaced
            write_new_file(path, IdentityKey.generate().private.hex().encode() + b"\n")
    if path.stat().st_mode & 0o077:
        raise ServiceError(f"{path} is readable by other users; chmod 600 it")
    text = path.read_text().strip()
    try:
        if len(text) != 2 * KEY_BYTES:
            raise ValueError(f"{len(text)} hex digits")
        return IdentityKey(bytes.fromhex(text))
    except (ValueError, FleetlearnError) as exc:
        raise ServiceError(f"{path} is not an aggregator identity key ({exc}); restore it from a backup: devices "
                           "were provisioned with its public key") from None


def directory_version(store: Store) -> int:
    """Grows with every enrolment and every revocation (devices are never deleted): the directory's version."""
    devices = store.devices(include_revoked=True)
    return len(devices) + sum(1 for d in devices if not d.active)


def initial_parameters(config: ServiceConfig) -> dict[str, np.ndarray]:
    from edge_sdk.training import load_bundle, load_params_npz

    if config.model.initial_params is not None:
        return load_params_npz(config.model.initial_params)
    return dict(load_bundle(config.model.bundle).initial_params)


@dataclass(frozen=True)
class RoundSummary:
    """How one round ended, as ``run_round`` returns it."""

    round_index: int
    published: bool
    model_version: int
    contributors: tuple[str, ...]
    abort_reason: str | None
    seconds: float
    accuracy: float | None = None


class AggregatorService:
    """The service over one connection; ``transport`` (an MQTT connection) is made from the config if not given.

    ``max_payload`` is the largest MQTT payload it sends and expects (AWS IoT Core's 128 KiB by
    default); its devices must chunk to the same size.
    """

    def __init__(self, config: ServiceConfig, *, transport: Transport | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, randomness: random.Random | None = None) -> None:
        self.config = config
        self.randomness = randomness  # SIMULATION ONLY (a seeded cohort and rotation seed); None: the OS CSPRNG
        # SIMULATION ONLY: with randomness given, the SecAgg+ round nonce derives from it (ServerConfig.nonce_seed)
        self._nonce_seed = None if randomness is None else randomness.getrandbits(256).to_bytes(32, "big")
        self.clock = clock
        self.wall = wall
        self.skew = 0.0  # added to the machine's clock when the shell closes a stage of vanished devices early
        self.fleet = config.fleet.id
        config.fleet.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = load_or_create_identity(config.identity_path)
        self.store = open_store(config.store_path)
        self.logger = ContextLogger(log, {"fleet": self.fleet})
        self.rejections = RejectionLog(self.logger, clock=clock)
        self.metrics = ServiceMetrics(self.fleet)
        self.handlers = HostEffectHandlers(self.store, self.metrics, config.privacy.delta, wall)
        self._close_interrupted_rounds()
        params = initial_parameters(config)
        self.layout = ParameterLayout.of(params)
        latest = self.store.latest_model()
        if latest is None:
            self.store.put_model(0, self.layout.to_bytes(params), now=wall())
            latest = self.store.latest_model()
        try:
            self.params = self.layout.from_bytes(latest.payload)
        except FleetlearnError as exc:
            raise ServiceError(f"the store's model version {latest.version} does not fit the bundle "
                               f"{config.model.bundle}: {exc}") from None
        self.model_version = latest.version
        self.metrics.set_model(self.model_version)
        used = [r.round_index for r in self.store.rounds()]
        self.next_round = max(used, default=0) + 1
        self.strategy = make_strategy(config.strategy.name, **dict(config.strategy.settings))
        self.strategy_state: Any = None
        if config.strategy.name != "fedavg" and latest.version > 0:
            self.logger.warning("the %s server state (its moments) is not persisted: it restarts from zero at model "
                                "version %d", config.strategy.name, latest.version)
        self.directory = self.store.directory()
        self.metrics.set_enrolled(len(self.directory))
        self.published_directory = -1
        r = config.rounds
        self.cohort_policy = CohortPolicy(r.cohort_min, r.cohort_max, r.over_selection)
        self._calibrations: dict[int, tuple[float, float, int]] = {}
        self.evaluation = self._open_evaluation()
        bits = config.privacy.bits
        padded = EncodingParams(self.layout.dim, 1.0, 1.0, bits, bytes(16)).padded_dim
        population = max(len(self.store.devices(include_revoked=True)), self.cohort_policy.invitations, 1)
        self.limits = limits_for(padded, bits, population, 4 * self.layout.dim, max_payload)
        if transport is None:
            transport = self._connect()
        # every raw message passes the per-sender flood limit before the channel reassembles or decodes it
        transport = self.flood = FloodGuardedTransport(transport, FloodGuard(FloodLimits.for_wire(self.limits), clock),
                                                       self.fleet)
        self.transport = RoundTransport(transport, me=AGGREGATOR_ID, fleet=self.fleet, identity=self.identity,
                                        peer_key=lambda device: self.directory.get(device), limits=self.limits,
                                        max_payload=max_payload, clock=clock)
        self.router = Router(self.fleet, AGGREGATOR_ID, self.limits)
        handlers = {**self.handlers.as_mapping(), AccountRound: self._account_with_model}
        self.endpoint = Endpoint(AGGREGATOR_ID, HostRound(), None, self.transport, self.router, handlers)
        self.pump = Pump(_MachineClock(self))
        self.pump.add(self.endpoint)
        self.logger.info("aggregator up: public key %s, model version %d, next round %d, %d enrolled devices",
                         self.identity.public.hex(), self.model_version, self.next_round, len(self.directory))

    # -- start-up --------------------------------------------------------------------------------

    def _close_interrupted_rounds(self) -> None:
        """Close every round a crash left RUNNING: completed if its sum was committed, otherwise aborted.

        Why not resume: the SecAgg+ server's round secrets (its nonce, the devices' adverts, the
        shares it relays) live only in memory, and the devices' keys are fresh per round, so no
        restarted server can carry a round past ADVERTISE_KEYS; re-running it under the same index
        would re-use a nonce the devices have already signed for. A new round with a new index and
        a fresh nonce is the clean restart, and devices take it (a newer plan supersedes theirs).

        A round whose accounting committed is not lost: its new model is written in the same
        transaction (``_account_with_model``), so it is closed as completed and its model is
        published with the next plan; its privacy spend is already in the accountant.
        """
        accounted = {e.round_index: e.event for e in self.store.accounting_events()}
        for record in self.store.rounds(RoundStatus.RUNNING):
            index, now = record.round_index, self.wall()
            event = accounted.get(index)
            plan = self.store.plan(index)
            version = RoundPlan.from_bytes(plan.payload).model_version + 1 if plan is not None else None
            if event is not None and version is not None and self.store.model(version) is not None:
                facts = json.dumps({"contributors": event["contributors"], "model_version": version},
                                   sort_keys=True).encode()
                self.store.save_round(replace(record, stage="publish", status=RoundStatus.COMPLETED, updated_at=now,
                                              state=facts, detail="completed at restart: the service stopped after "
                                              f"accounting and storing model version {version}"))
                self.logger.warning("round %d was accounted and its model version %d stored when the service stopped:"
                                    " closed as completed", index, version, extra={"round": index})
                continue
            self.store.save_round(replace(record, stage="aborted", status=RoundStatus.ABORTED, updated_at=now,
                                          detail=f"the service restarted mid-round (in stage {record.stage}); the "
                                          "round is not resumed: a SecAgg+ server's round secrets are not persisted"))
            self.logger.warning("round %d was still running (stage %s) when the service stopped: closed as aborted",
                                index, record.stage, extra={"round": index})

    def _account_with_model(self, effect: AccountRound) -> Any:
        """Account the round and store its new model in one transaction.

        Why: the pump runs ``AccountRound`` and then ``PersistModel``; a crash between the two would
        leave a sum accounted whose model is lost, so the restart could neither publish it nor
        call the round aborted without the fleet's epsilon counting an unpublished round.
        ``PersistModel`` then finds the same bytes stored and does nothing.
        """
        state: HostState = self.endpoint.state
        with self.store.transaction():
            report = self.handlers.account(effect)
            if state is not None and state.new_params is not None and state.plan.round_id == effect.round_id:
                payload = np.asarray(state.new_params, dtype="<f4").tobytes()
                self.store.put_model(state.plan.model_version + 1, payload, now=self.wall())
        return report

    def _open_evaluation(self) -> Any:
        data_path = self.config.evaluation.data
        if data_path is None:
            return None
        from edge_sdk.training import ModelSession, TrainingState, load_dataset_npz, prepare_dataset

        session = ModelSession.open(self.config.model.bundle, threads=1)
        return TrainingState(session), prepare_dataset(session.manifest, *load_dataset_npz(data_path))

    def _connect(self) -> Transport:
        from aggregator.broker.mosquitto_config import AGGREGATOR_USER
        from edge_sdk.transport.mqtt import MqttSettings, MqttTransport

        b = self.config.broker
        password = b.password_file.read_text().strip() if b.password_file is not None else None
        tls = b.tls
        status = status_topic(self.fleet, b.username or AGGREGATOR_USER)
        # one connection over every node: it fails over between them at run time, not only at start
        settings = MqttSettings(",".join(b.urls), b.client_id, username=b.username, password=password,
                                ca_file=str(tls.ca) if tls else None,
                                cert_file=str(tls.cert) if tls and tls.cert else None,
                                key_file=str(tls.key) if tls and tls.key else None,
                                protocol=b.protocol, status_topic=status)
        transport = MqttTransport(settings)
        transport.on_reconnect = self._republish
        if transport.wait_ready(settings.connect_timeout_s * len(b.urls)):
            self.logger.info("connected to the broker at %s", transport.node_url)
        else:
            self.logger.warning("no broker answered (%s); retrying %s with backoff", transport.last_error,
                                ", ".join(b.urls))
        return transport

    def _republish(self) -> None:
        """After a reconnect, put the retained broadcasts back: the directory, and the open round's plan and model.

        Why: a broker restarted without persistence (or before its autosave) has lost them, and a device
        that starts or reconnects later needs them; devices ignore a copy of what they hold. Runs in
        the transport's connect callback, so it only queues publishes.
        """
        if getattr(self, "endpoint", None) is None:
            return  # still starting: the first round publishes everything
        self.published_directory = -1
        self._refresh_directory()
        state: HostState | None = self.endpoint.state
        if state is None:
            messages = []
        elif HostRound.finished(state):
            messages = [state.new_model] if state.new_model is not None else [state.model]
        else:
            messages = [state.plan, state.model]
        for message in messages:
            topic, payload, retain = self.router.outgoing(Send(BROADCAST, message))
            self.transport.publish(topic, payload, retain=retain)
        self.logger.info("reconnected to the broker: re-published the retained directory%s",
                         " and the round's plan and model" if len(messages) == 2 else " and the model")

    # -- the loop --------------------------------------------------------------------------------

    def run(self, stop: Callable[[], bool]) -> int:
        """Run rounds until ``stop()`` or ``rounds.count`` completed rounds (counting those before a restart)."""
        count = self.config.rounds.count
        try:
            while not stop():
                if count and len(self.store.rounds(RoundStatus.COMPLETED)) >= count:
                    self.logger.info("%d rounds completed; stopping", count)
                    break
                if not self._wait_for_devices(stop):
                    break
                summary = self.run_round(stop)
                r = self.config.rounds
                self._idle(r.interval if summary.published else max(r.interval, r.retry_after), stop)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self.transport.close()
        self.store.close()

    def _idle(self, seconds: float, stop: Callable[[], bool]) -> None:
        end = self.clock() + seconds
        while not stop() and self.clock() < end:
            self._deliver(min(POLL_S, max(0.0, end - self.clock())))

    def _online(self) -> list[str]:
        statuses = self.transport.statuses
        return [d for d in self.directory if statuses.get(d) == STATUS_ONLINE]

    def _wait_for_devices(self, stop: Callable[[], bool]) -> bool:
        """Publish the directory, then wait until ``cohort_min`` enrolled devices are online; False if stopped."""
        last_log = -WAIT_LOG_S
        while not stop():
            self._refresh_directory()
            online = self._online()
            if len(online) >= self.cohort_policy.min_size:
                return True
            if self.clock() - last_log >= WAIT_LOG_S:
                last_log = self.clock()
                self.logger.info("waiting for devices: %d of %d enrolled are online, the cohort minimum is %d",
                                 len(online), len(self.directory), self.cohort_policy.min_size)
            self._deliver(POLL_S)
        return False

    def wait_online(self, devices: Collection[str], timeout: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Publish the directory and serve the connection until every one of ``devices`` is online.

        For a driver that runs rounds itself (the simulator): ``run`` waits only for ``cohort_min``.
        """
        end = self.clock() + timeout
        while not stop() and self.clock() < end:
            self._refresh_directory()
            statuses = self.transport.statuses
            if all(statuses.get(d) == STATUS_ONLINE for d in devices):
                return True
            self._deliver(POLL_S)
        return False

    def _refresh_directory(self) -> None:
        version = directory_version(self.store)
        if version == self.published_directory:
            return
        self.directory = self.store.directory()
        self.metrics.set_enrolled(len(self.directory))
        release = DirectoryRelease(self.fleet, version, dict(self.directory)).sign(self.identity)
        envelope = Envelope(WIRE_VERSION, MessageKind.DIRECTORY, self.fleet, NO_SESSION, version, 0, AGGREGATOR_ID,
                            version, release.to_bytes())
        self.transport.publish(directory_topic(self.fleet), encode_envelope(envelope), retain=True)
        self.published_directory = version
        self.logger.info("published enrolment directory version %d (%d devices)", version, len(self.directory))

    # -- one round -------------------------------------------------------------------------------

    def run_round(self, stop: Callable[[], bool] = lambda: False) -> RoundSummary:
        """Plan, run and finish one round; returns how it ended."""
        self._refresh_directory()
        cfg = self.config
        round_index = self.next_round
        self.next_round += 1
        host = HostConfig(self.fleet, self.identity, self.directory, self.layout, self.strategy, self.cohort_policy,
                          ledger_check=self.handlers.ledger_check, nonce_seed=self._nonce_seed)
        available = self._online() or list(self.directory)
        if cfg.rounds.sampling == "self":
            sampling = Sampling.self_selected(cfg.rounds.self_probability)
            expected = min(len(available), self.cohort_policy.max_size)
        else:
            invited = invite(available, self.cohort_policy, rng=self.randomness)
            sampling = Sampling.server(invited)
            expected = min(len(invited), self.cohort_policy.max_size)
        plan = self._draft(host, round_index, sampling, expected)
        self.router.limits = limits_for_plan(plan, max(len(self.directory), 1))
        started, cpu_started = self.clock(), time.process_time()
        step = start_host_round(host, plan, self.params, self._now(), self.strategy_state)
        signed: RoundPlan = step.state.plan
        self.store.put_plan(round_index, signed.to_bytes(), now=self.wall())
        rlog = self.logger.bind(round=round_index)
        rlog.info("round %d: plan published (model version %d, %d invited, t_honest %d, noise multiplier %.4g, "
                  "gamma %.3g)", round_index, plan.model_version, len(sampling.cohort), plan.t_honest,
                  plan.noise_multiplier, plan.encoding.gamma, extra={"stage": "PLAN"})
        self.pump.settle(self.endpoint, step)
        watcher = _StageWatcher(rlog)
        refusals_seen = 0
        while not HostRound.finished(self.endpoint.state):
            if stop():
                self._abort_on_stop(rlog)
                break
            self._deliver(POLL_S)
            self.pump.settle(self.endpoint, HostRound.tick(self.endpoint.state, self._now()))
            state: HostState = self.endpoint.state
            refusals_seen = self._log_refusals(state, refusals_seen, rlog)
            watcher.observe(state)
            self._close_vanished_stage(state, rlog)
        state = self.endpoint.state
        watcher.observe(state)
        self._account_dropouts(state, rlog)
        seconds, cpu = self.clock() - started, time.process_time() - cpu_started
        if state.stage is HostStage.PUBLISH:
            self.params = self.layout.unflatten(state.new_params)
            self.strategy_state = state.strategy_state
            self.model_version = state.new_model.version
            accuracy = self._evaluate(rlog)
            rlog.info("round %d: published model version %d from %d contributors in %.2f s", round_index,
                      self.model_version, len(state.contributors), seconds,
                      extra={"stage": "PUBLISH", "model_version": self.model_version,
                             "contributors": list(state.contributors), "seconds": round(seconds, 4),
                             "cpu_seconds": round(cpu, 4)})
            return RoundSummary(round_index, True, self.model_version, tuple(state.contributors), None, seconds,
                                accuracy)
        rlog.info("round %d: aborted after %.2f s: %s", round_index, seconds, state.abort_reason,
                  extra={"stage": "ABORTED", "reason": state.abort_reason})
        return RoundSummary(round_index, False, self.model_version, (), state.abort_reason, seconds)

    def _now(self) -> float:
        return self.clock() + self.skew

    def _draft(self, host: HostConfig, round_index: int, sampling: Sampling, cohort: int) -> RoundPlan:
        cfg, p = self.config, self.config.privacy
        z, gamma, t_honest = self._calibration(cohort)
        encoding = EncodingParams(dim=self.layout.dim, clip=p.clip, gamma=gamma, bits=p.bits,
                                  rotation_seed=self._rotation_seed())
        t = cfg.training
        d = cfg.deadlines
        return draft_plan(
            host, self.params, round_index=round_index, model_version=self.model_version,
            training=TrainingPlan(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed + round_index),
            encoding=encoding, mechanism=p.mechanism, noise_multiplier=z, t_honest=t_honest, privacy_mode=p.mode,
            sampling=sampling,
            secagg=SecAggPolicy(threat_model=p.threat_model, dropout_fraction=p.dropout, colluding_fraction=p.colluding,
                                stage_timeout=d.secagg_stage),
            deadlines=StageDeadlines(ready=d.ready, train=d.train), check_back_after=cfg.rounds.check_back_after)

    def _rotation_seed(self) -> bytes:
        if self.randomness is None:
            return secrets.token_bytes(16)
        return self.randomness.getrandbits(128).to_bytes(16, "big")

    def _calibration(self, cohort: int) -> tuple[float, float, int]:
        """(noise multiplier, gamma, t_honest) for a cohort of ``cohort``, calibrated once per size."""
        if cohort in self._calibrations:
            return self._calibrations[cohort]
        from aggregator.accounting.calibration import MAX_WRAP_PROBABILITY, calibrate, smallest_gamma
        from edge_sdk.privacy.rotation import DEFAULT_ROTATION, make_rotation

        p, r = self.config.privacy, self.config.rounds
        t_honest = p.t_honest or honest_contributors(cohort, p.dropout, p.colluding)
        if t_honest < 1:
            raise ServiceConfigError(f"privacy.dropout={p.dropout} and privacy.colluding={p.colluding} leave no honest "
                                     f"contributor in a cohort of {cohort}")
        if p.noise_multiplier is None:
            cal = calibrate(p.target_epsilon, p.delta, cohort_size=cohort, rounds=r.count or p.budget_rounds,
                            dim=self.layout.dim, bits=p.bits, population=max(len(self.directory), cohort),
                            dropout_fraction=p.dropout, colluding_fraction=p.colluding, clip=p.clip,
                            mechanism=p.mechanism, self_selection=r.sampling == "self")
            z, gamma = cal.noise_multiplier, cal.gamma
            if p.t_honest is not None and p.t_honest != cal.honest_contributors:
                self.logger.warning("privacy.t_honest = %d overrides the calibrated %d: the noise is calibrated for "
                                    "%d honest contributors", p.t_honest, cal.honest_contributors,
                                    cal.honest_contributors)
                t_honest = min(t_honest, cal.honest_contributors)
        else:
            z = p.noise_multiplier
            spread = make_rotation(DEFAULT_ROTATION, bytes(16), self.layout.dim).spread_dim
            gamma = smallest_gamma(p.clip, z, cohort, t_honest, spread, p.bits, MAX_WRAP_PROBABILITY, p.mechanism)
        self._calibrations[cohort] = (z, gamma, t_honest)
        return z, gamma, t_honest

    # -- receiving -------------------------------------------------------------------------------

    def _deliver(self, timeout: float) -> None:
        messages = self.transport.poll(timeout)
        self._count_flood_refusals()
        for topic, data in messages:
            try:
                received = self.router.incoming(topic, data)
            except FleetlearnError as exc:
                self.metrics.rejected(type(exc).__name__)
                self.rejections.reject(type(exc).__name__, f"{topic}: {exc}")
                continue
            state = self.endpoint.state
            envelope = received.envelope
            self.logger.debug("received %s from %s", envelope.kind.name, received.sender,
                              extra={"round": envelope.round_index, "device": received.sender,
                                     "kind": envelope.kind.name, "session": envelope.session})
            if state is None:
                continue
            self.pump.settle(self.endpoint, HostRound.handle(state, received.message, self._now()))
        self.metrics.moved("in", self.transport.bytes_in - getattr(self, "_bytes_in_seen", 0))
        self.metrics.moved("out", self.transport.bytes_out - getattr(self, "_bytes_out_seen", 0))
        self._bytes_in_seen, self._bytes_out_seen = self.transport.bytes_in, self.transport.bytes_out
        while self.transport.status_changes:
            device, status = self.transport.status_changes.popleft()
            if device in self.directory:
                self.logger.info("device %s is %s", device, status.decode(errors="replace"),
                                 extra={"device": device})

    def _count_flood_refusals(self) -> None:
        """Raw messages the flood guard dropped unread (over a sender's rate, or on a topic we do not use)."""
        refusals = self.flood.refusals
        while refusals:
            refusal = refusals.popleft()
            self.metrics.rejected(refusal.reason)
            self.rejections.reject(refusal.reason, f"{refusal.topic}: {refusal.detail}", device=refusal.sender)

    def _log_refusals(self, state: HostState, seen: int, rlog: ContextLogger) -> int:
        for refusal in state.refusals[seen:]:
            reason = f"{refusal.stage.value}:{refusal.message_type}"
            self.metrics.rejected(refusal.message_type)
            self.rejections.reject(reason, refusal.reason, round=state.plan.round_index, device=refusal.sender,
                                   stage=refusal.stage.value,
                                   session=state.server.session_id if state.server is not None else None)
        return len(state.refusals)

    # -- dropouts --------------------------------------------------------------------------------

    def _close_vanished_stage(self, state: HostState, rlog: ContextLogger) -> None:
        """Every device the stage waits for is offline: let the machine see its deadline now."""
        awaited = awaited_devices(state)
        if not awaited:
            return
        statuses = self.transport.statuses
        if all(statuses.get(d) == STATUS_OFFLINE for d in awaited):
            deadline = HostRound.deadline(state)
            if deadline is None or deadline <= self._now():
                return
            rlog.info("stage %s waits only for devices that went offline (%s): closing it now", stage_name(state),
                      ", ".join(sorted(awaited)), extra={"stage": stage_name(state)})
            self.skew += deadline - self._now()
            self.pump.settle(self.endpoint, HostRound.tick(state, self._now()))

    def _account_dropouts(self, state: HostState, rlog: ContextLogger) -> None:
        for stage, lost in dropouts_by_stage(state).items():
            self.metrics.dropped(stage, len(lost))
            for device in lost:
                rlog.info("device %s dropped out in stage %s", device, stage, extra={"device": device, "stage": stage})

    def _abort_on_stop(self, rlog: ContextLogger) -> None:
        state: HostState = self.endpoint.state
        reason = "the aggregator service was stopped (SIGTERM) mid-round"
        self.endpoint.state = replace(state, stage=HostStage.ABORTED, abort_reason=reason, deadline=None)
        self.handlers.persist_round(PersistRound("host", state.plan.round_id, HostStage.ABORTED.value,
                                                 {"reason": reason}))
        rlog.warning("round %d: %s; aborted", state.plan.round_index, reason, extra={"stage": "ABORTED"})

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(self, rlog: ContextLogger) -> float | None:
        if self.evaluation is None:
            return None
        from edge_sdk.training import evaluate

        training, data = self.evaluation
        training.set_params(self.params)
        result = evaluate(training, data)
        self.metrics.set_model(self.model_version, result.accuracy)
        rlog.info("model version %d: held-out accuracy %.4f, loss %.4f", self.model_version,
                  result.accuracy if result.accuracy is not None else float("nan"), result.loss,
                  extra={"model_version": self.model_version, "accuracy": result.accuracy, "loss": result.loss})
        return result.accuracy


def stage_name(state: HostState) -> str:
    """The stage an operator sees: the host stage, or the SecAgg+ server's stage inside it."""
    if state.stage in (HostStage.TRAIN, HostStage.SECAGG) and state.server is not None:
        if state.server.stage is Stage.ADVERTISE_KEYS:
            return "TRAIN"
        return state.server.stage.name
    return state.stage.name


def awaited_devices(state: HostState) -> set[str]:
    """Devices the current stage still waits for (empty when it waits for nobody in particular)."""
    if state.stage is HostStage.PLAN:
        return set(state.invited) - set(state.ready) - set(state.declines or {})
    server = state.server
    if server is None or state.stage not in (HostStage.TRAIN, HostStage.SECAGG):
        return set()
    expected, got = {
        Stage.ADVERTISE_KEYS: (server.cohort, server.adverts),
        Stage.SHARE_KEYS: (server.members, server.share_keys),
        Stage.MASKED_INPUT: (server.u2, server.masked),
        Stage.CONSISTENCY_CHECK: (server.u3, server.consistency),
        Stage.UNMASK: (server.u4, server.unmask),
    }.get(server.stage, ((), {}))
    return set(expected) - set(got)


def dropouts_by_stage(state: HostState) -> dict[str, tuple[str, ...]]:
    """Who was lost in which SecAgg+ stage of a finished round (TRAIN: no advert after the RoundStart)."""
    server = state.server
    if server is None:
        return {}
    steps = (("TRAIN", server.cohort, server.adverts),  # a stage entered has a non-empty "before"
             ("SHARE_KEYS", server.members, server.share_keys),
             ("MASKED_INPUT", server.u2, server.masked),
             ("CONSISTENCY_CHECK", server.u3, server.consistency),
             ("UNMASK", server.u4, server.unmask))
    out = {}
    for name, before, after in steps:
        lost = tuple(sorted(set(before) - set(after)))
        if before and lost:
            out[name] = lost
    return out


class _StageWatcher:
    """Logs each stage a round enters, once, with the round, session and stage fields."""

    def __init__(self, rlog: ContextLogger) -> None:
        self.rlog = rlog
        self.last: str | None = None

    def observe(self, state: HostState) -> None:
        name = stage_name(state)
        if name != self.last:
            self.last = name
            session = state.server.session_id if state.server is not None and state.server.session_id != bytes(32) \
                else None
            self.rlog.info("round %d entered stage %s", state.plan.round_index, name,
                           extra={"stage": name, "session": session})


class _MachineClock:
    """The pump's clock: the service's monotonic clock plus the skew of stages closed early."""

    def __init__(self, service: AggregatorService) -> None:
        self.service = service

    def now(self) -> float:
        return self.service._now()  # noqa: SLF001 - the service owns the skew

    def wait(self, seconds: float) -> None:
        self.service._deliver(seconds)  # noqa: SLF001


def serve(config: ServiceConfig) -> int:
    """Run the service until SIGTERM/SIGINT or ``rounds.count`` rounds; 0 on a clean stop."""
    import signal

    from aggregator.service.logs import configure_json_logging

    level = min(logging.getLogger().level or logging.INFO, logging.INFO)
    configure_json_logging(level)
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service = AggregatorService(config)
        if config.metrics.port is not None:
            port = service.metrics.serve(config.metrics.host, config.metrics.port)
            service.logger.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
        code = service.run(lambda: bool(stopping))
        if stopping:
            service.logger.info("stopped by signal %d", stopping[0])
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["AggregatorService", "RoundRecord", "RoundSummary", "ServiceError", "load_or_create_identity", "serve"]
