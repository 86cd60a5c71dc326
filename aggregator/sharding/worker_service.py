"""``fleetlearn aggregator worker``: the I/O shell around ``WorkerRound``, one process, one MQTT connection, one pump.

The worker reads the aggregator's key (it never makes one: devices trust only the existing key),
the enrolment directory and the participation record from the store the coordinator writes (the
ledger check needs the record of every earlier round, hence shared state), announces itself with a
retained ``online`` on ``worker/<id>`` and the last will ``offline``, and takes tasks from the
shared subscription (MQTT 5) or from ``work/<id>``. It reads every device uplink (``up/+/+``, one
subscription made at start, so nothing waits for a SUBACK mid-round); the machine keeps the
messages of its own sessions' devices and refuses the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aggregator.service.config import ServiceConfig
from aggregator.service.service import ServiceError, initial_parameters
from aggregator.sharding.work_link import ShardRouter, ShardTransport, WorkLink
from aggregator.sharding.work_messages import Task
from aggregator.sharding.worker_round import WorkerConfig, WorkerRound, start_worker
from aggregator.store import open_store
from edge_sdk.errors import FleetlearnError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.pump import Endpoint, Pump
from edge_sdk.protocol.routing import AGGREGATOR_ID, limits_for
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.transport.round_transport import RoundTransport
from edge_sdk.wire.topics import PREFIX, shared_work_subscription, work_topic, worker_status_topic

log = logging.getLogger("fleetlearn.worker")
POLL_S = 0.05


def uses_shared_subscription(config: ServiceConfig) -> bool:
    handout = config.sharding.handout
    return handout == "shared" or (handout == "auto" and config.broker.protocol == "5")


class _Clock:
    def __init__(self, clock: Callable[[], float], service: WorkerService) -> None:
        self._clock, self.service = clock, service

    def now(self) -> float:
        return self._clock()

    def wait(self, seconds: float) -> None:
        self.service.step(seconds)


class WorkerService:
    def __init__(self, config: ServiceConfig, worker_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        from edge_sdk.transport.mqtt import MqttSettings, MqttTransport

        self.config, self.worker_id, self.clock = config, worker_id, clock
        self.fleet = config.fleet.id
        path = config.identity_path
        if not path.exists():
            raise ServiceError(f"{path} does not exist: a worker uses the aggregator's existing key (copy it, 0600, "
                               "from the coordinator's state directory); it never makes one")
        from aggregator.service.service import load_or_create_identity

        self.identity: IdentityKey = load_or_create_identity(path)
        self.store = open_store(config.store_path)
        self.directory = Directory.of(self.store.directory())
        self.record = self.store.participation(config.privacy.delta)
        layout = ParameterLayout.of(initial_parameters(config))
        bits = config.privacy.bits
        padded = EncodingParams(layout.dim, 1.0, 1.0, bits, bytes(16)).padded_dim
        population = max(len(self.directory), config.rounds.cohort_max, 1)
        self.limits = limits_for(padded, bits, population, 4 * layout.dim)
        b = config.broker
        password = b.password_file.read_text().strip() if b.password_file is not None else None
        tls = b.tls
        mqtt = MqttTransport(MqttSettings(
            ",".join(b.urls), f"{b.client_id}-worker-{worker_id}", username=b.username, password=password,
            ca_file=str(tls.ca) if tls else None, cert_file=str(tls.cert) if tls and tls.cert else None,
            key_file=str(tls.key) if tls and tls.key else None, protocol=b.protocol,
            status_topic=worker_status_topic(self.fleet, worker_id)))
        self.mqtt = mqtt
        self.link = WorkLink(mqtt, self.limits)
        self.rounds = RoundTransport(self.link.round_view, me=AGGREGATOR_ID, fleet=self.fleet, identity=self.identity,
                                     peer_key=lambda device: self.directory.get(device), limits=self.limits,
                                     clock=clock)
        task_topic = shared_work_subscription(self.fleet) if uses_shared_subscription(config) \
            else work_topic(self.fleet, worker_id)
        self.router = ShardRouter(self.fleet, AGGREGATOR_ID, self.limits, worker_id=worker_id,
                                  subscriptions=(task_topic,))
        machine_config = WorkerConfig(self.fleet, worker_id, self.identity, self.directory, self._ledger_check)
        self.endpoint = Endpoint(worker_id, WorkerRound(), start_worker(machine_config),
                                 ShardTransport(self.rounds, self.link), self.router, {})
        self.pump = Pump(_Clock(clock, self))
        self.pump.add(self.endpoint)
        # Every uplink, subscribed once: per-task subscriptions (one per device) were not in place on a NATS
        # cluster before the RoundStart went out, and held up the claim; the machine keeps only its sessions' devices.
        self.rounds.subscribe(f"{PREFIX}/{self.fleet}/up/+/+")
        self.outcomes_seen = 0
        log.info("worker %s up (fleet %s, tasks on %s, %d enrolled devices)", worker_id, self.fleet, task_topic,
                 len(self.directory))

    def _ledger_check(self, device: str, head: bytes) -> str | None:
        return self.record.ledger_check(device, head)

    def _prepare(self, task: Task) -> None:
        """Fresh directory and participation record before the machine takes ``task``."""
        if task.directory_digest != self.directory.digest:
            self.directory = Directory.of(self.store.directory())
            state = self.endpoint.state
            from dataclasses import replace

            self.endpoint.state = replace(state, config=replace(state.config, enrolled=self.directory))
        self.record = self.store.participation(self.config.privacy.delta)
        log.info("task %s: taking a sub-cohort of %d devices", task.key, len(task.cohort))

    def step(self, timeout: float) -> None:
        for topic, data in self.endpoint.transport.poll(timeout):
            try:
                received = self.router.incoming(topic, data)
            except FleetlearnError as exc:
                log.info("refused %s: %s", topic, exc)
                continue
            if isinstance(received.message, Task):
                self._prepare(received.message)
            self.pump.settle(self.endpoint, WorkerRound.handle(self.endpoint.state, received.message, self.clock()))
        self.pump.settle(self.endpoint, WorkerRound.tick(self.endpoint.state, self.clock()))
        outcomes = self.endpoint.state.outcomes
        for key, status, detail in outcomes[self.outcomes_seen:]:
            log.info("task %s: %s (%s)", key, status.name, detail)
        self.outcomes_seen = len(outcomes)

    def run(self, stop: Callable[[], bool]) -> int:
        try:
            while not stop():
                self.step(POLL_S)
        finally:
            self.rounds.close()
            self.store.close()
        return 0


def serve_worker(config: ServiceConfig, worker_id: str) -> int:
    import signal

    from aggregator.service.logs import configure_json_logging

    configure_json_logging(min(logging.getLogger().level or logging.INFO, logging.INFO))  # -v/-vv win
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stopping.append(signum)) for s in (signal.SIGTERM,
                                                                                             signal.SIGINT)}
    try:
        return WorkerService(config, worker_id).run(lambda: bool(stopping))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["WorkerService", "serve_worker", "uses_shared_subscription"]


