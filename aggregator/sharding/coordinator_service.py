"""``fleetlearn aggregator coordinator``: the aggregator service with the SecAgg+ sessions handed to workers.

It is ``AggregatorService`` (store, identity, directory, calibration, plan, accounting and the
model in one transaction, restart, metrics) with three differences:

* the machine is ``CoordinatorRound``, whose router also carries tasks and results;
* its connection subscribes only to what the coordinator takes: Ready, Decline and receipts from
  devices, device and worker statuses, and results. SecAgg+ uplinks go to the workers, which
  subscribe to their own sub-cohorts' devices, so the coordinator never reassembles a masked input;
* calibration: t_honest is the sub-cohort's (``plan_shards``), so each sub-sum alone, which its
  worker sees unmasked, carries σ²; γ is chosen for the whole cohort, because the coordinator
  decodes the sum of all sub-sums and it must not wrap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aggregator.rounds.cohort import invite
from aggregator.rounds.host_round import HostConfig
from aggregator.service.config import ServiceConfig
from aggregator.service.service import WAIT_LOG_S, AggregatorService, RoundSummary
from aggregator.sharding.coordinator_round import (
    CoordinatorRound,
    CoordinatorState,
    ShardingPolicy,
    WorkerOnline,
    abort_coordinator,
    start_coordinator_round,
)
from aggregator.sharding.sub_cohorts import ShardPlan, plan_shards
from aggregator.sharding.work_link import ShardRouter, ShardTransport, WorkLink
from aggregator.sharding.worker_service import uses_shared_subscription
from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.plan import RoundPlan, Sampling
from edge_sdk.protocol.routing import AGGREGATOR_ID, BROADCAST, Send, limits_for_plan
from edge_sdk.transport.mqtt import STATUS_ONLINE
from edge_sdk.wire.envelope import MessageKind
from edge_sdk.wire.topics import PREFIX

log = logging.getLogger("fleetlearn.coordinator")
POLL_S = 0.05


def coordinator_patterns(fleet: str) -> Callable[[str], tuple[str, ...]]:
    """The aggregator's ``up/+/+`` becomes only the uplinks the coordinator takes."""
    base = f"{PREFIX}/{fleet}"

    def mapped(pattern: str) -> tuple[str, ...]:
        if pattern == f"{base}/up/+/+":
            return tuple(f"{base}/up/+/{k.topic_name}" for k in (MessageKind.READY, MessageKind.DECLINE,
                                                                  MessageKind.RECEIPT))
        return (pattern,)
    return mapped


class CoordinatorService(AggregatorService):
    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, randomness: Any = None) -> None:
        from aggregator.broker.mosquitto_config import AGGREGATOR_USER
        from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
        from edge_sdk.wire.topics import status_topic

        b, fleet = config.broker, config.fleet.id
        password = b.password_file.read_text().strip() if b.password_file is not None else None
        tls = b.tls
        self.mqtt = MqttTransport(MqttSettings(
            ",".join(b.urls), b.client_id, username=b.username, password=password, ca_file=str(tls.ca) if tls else None,
            cert_file=str(tls.cert) if tls and tls.cert else None, key_file=str(tls.key) if tls and tls.key else None,
            protocol=b.protocol, status_topic=status_topic(fleet, b.username or AGGREGATOR_USER)))
        self.link = WorkLink(self.mqtt, subscribe_filter=coordinator_patterns(fleet))
        super().__init__(config, transport=self.link.round_view, clock=clock, wall=wall, randomness=randomness)
        self.mqtt.on_reconnect = self._republish
        self.link.limits = self.limits
        self.router = ShardRouter(self.fleet, AGGREGATOR_ID, self.limits)
        self.endpoint.router = self.router
        self.endpoint.machine = CoordinatorRound()
        self.endpoint.transport = ShardTransport(self.transport, self.link)
        for pattern in (f"{PREFIX}/{self.fleet}/result/+", f"{PREFIX}/{self.fleet}/worker/+"):
            self.link.subscribe_direct(pattern)
        s = config.sharding
        self.shared = uses_shared_subscription(config)
        self.sharding = s
        self.shard_plan: ShardPlan | None = None
        self.planned_once = False
        self.mqtt.wait_ready(10.0)

    def _wait_for_devices(self, stop: Callable[[], bool]) -> bool:
        """Devices as the service waits for them, then workers: all ``sharding.workers`` before the first round.

        Why: the plan fixes the number of sub-cohorts (and t_honest) before anyone answers, so a plan
        drafted while workers are still starting would be cut for fewer of them. After the first round
        (or ``3 × task_deadline`` of waiting) one live worker is enough: a dead worker must not stall
        the fleet, and its sub-cohorts go to the others.
        """
        if not super()._wait_for_devices(stop):
            return False
        wanted = self.sharding.workers if not self.planned_once else 1
        give_up = self.clock() + 3 * self.sharding.task_deadline
        last_log = -WAIT_LOG_S
        while not stop():
            live = self.live_workers
            if len(live) >= wanted or (live and self.clock() >= give_up):
                self.planned_once = True
                return True
            if self.clock() - last_log >= WAIT_LOG_S:
                last_log = self.clock()
                self.logger.info("waiting for aggregator workers: %d of %d online", len(live), wanted)
            self._deliver(POLL_S)
        return False

    @property
    def live_workers(self) -> tuple[str, ...]:
        return tuple(sorted(w for w, status in self.link.statuses.items() if status == STATUS_ONLINE))

    def _calibration(self, cohort: int) -> tuple[float, float, int]:
        from aggregator.accounting.calibration import MAX_WRAP_PROBABILITY, calibrate, smallest_gamma
        from edge_sdk.privacy.rotation import DEFAULT_ROTATION, make_rotation

        p, r, shard = self.config.privacy, self.config.rounds, self.shard_plan
        key = (cohort, shard.size, shard.t_honest)
        if key in self._calibrations:
            return self._calibrations[key]
        t_honest = min(p.t_honest or shard.t_honest, shard.t_honest)
        z = p.noise_multiplier
        if z is None:
            z = calibrate(p.target_epsilon, p.delta, cohort_size=shard.size, rounds=r.count or p.budget_rounds,
                          dim=self.layout.dim, bits=p.bits, population=max(len(self.directory), cohort),
                          dropout_fraction=p.dropout, colluding_fraction=p.colluding, clip=p.clip,
                          mechanism=p.mechanism, self_selection=r.sampling == "self").noise_multiplier
        spread = make_rotation(DEFAULT_ROTATION, bytes(16), self.layout.dim).spread_dim
        gamma = smallest_gamma(p.clip, z, cohort, t_honest, spread, p.bits, MAX_WRAP_PROBABILITY, p.mechanism)
        self._calibrations[key] = (z, gamma, t_honest)
        return z, gamma, t_honest

    def _republish(self) -> None:
        if getattr(self, "endpoint", None) is None:
            return
        self.published_directory = -1
        self._refresh_directory()
        state = self.endpoint.state
        if state is None:
            return
        messages = [state.new_model or state.model] if CoordinatorRound.finished(state) else [state.plan, state.model]
        for message in messages:
            topic, payload, retain = self.router.outgoing(Send(BROADCAST, message))
            self.transport.publish(topic, payload, retain=retain)

    def _deliver(self, timeout: float) -> None:
        messages = self.endpoint.transport.poll(timeout)
        self._count_flood_refusals()
        for topic, data in messages:
            try:
                received = self.router.incoming(topic, data)
            except FleetlearnError as exc:
                self.metrics.rejected(type(exc).__name__)
                self.rejections.reject(type(exc).__name__, f"{topic}: {exc}")
                continue
            self._feed(received.message)
        while self.link.status_changes:
            worker, status = self.link.status_changes.popleft()
            self.logger.info("aggregator worker %s is %s", worker, status.decode(errors="replace"))
            self._feed(WorkerOnline(worker, status == STATUS_ONLINE))
        while self.transport.status_changes:
            self.transport.status_changes.popleft()

    def _feed(self, message: Any) -> None:
        state = getattr(self.endpoint, "state", None)
        if isinstance(state, CoordinatorState) and not CoordinatorRound.finished(state):
            self.pump.settle(self.endpoint, CoordinatorRound.handle(state, message, self._now()))

    def run_round(self, stop: Callable[[], bool] = lambda: False) -> RoundSummary:
        self._refresh_directory()
        p = self.config.privacy
        round_index = self.next_round
        self.next_round += 1
        host = HostConfig(self.fleet, self.identity, self.directory, self.layout, self.strategy, self.cohort_policy,
                          ledger_check=self.handlers.ledger_check)
        available = self._online() or list(self.directory)
        invited = invite(available, self.cohort_policy, rng=self.randomness)
        sampling = Sampling.server(invited)
        expected = min(len(invited), self.cohort_policy.max_size)
        workers = self.sharding.workers if self.shared else max(1, min(self.sharding.workers,
                                                                       len(self.live_workers) or 1))
        self.shard_plan = plan_shards(expected, workers, self.sharding.sub_cohort_min, p.dropout, p.colluding,
                                      p.threat_model)
        plan: RoundPlan = self._draft(host, round_index, sampling, expected)
        self.router.limits = limits_for_plan(plan, max(len(self.directory), 1))
        policy = ShardingPolicy(self.shared, self.sharding.sub_cohort_min, self.sharding.task_deadline,
                                self.sharding.max_attempts, self.shard_plan.parts)
        started = self.clock()
        step = start_coordinator_round(host, policy, plan, self.params, self._now(), self.live_workers,
                                       self.strategy_state)
        self.store.put_plan(round_index, step.state.plan.to_bytes(), now=self.wall())
        rlog = self.logger.bind(round=round_index)
        rlog.info("round %d: plan published (%d invited, %d sub-cohorts of about %d, t_honest %d per sub-cohort)",
                  round_index, len(invited), self.shard_plan.parts, self.shard_plan.size, plan.t_honest,
                  extra={"stage": "PLAN"})
        self.pump.settle(self.endpoint, step)
        while not CoordinatorRound.finished(self.endpoint.state):
            if stop():
                self.pump.settle(self.endpoint, abort_coordinator(self.endpoint.state, "the coordinator was stopped "
                                                                  "(SIGTERM) mid-round"))
                break
            self._deliver(POLL_S)
            self.pump.settle(self.endpoint, CoordinatorRound.tick(self.endpoint.state, self._now()))
        state: CoordinatorState = self.endpoint.state
        seconds = self.clock() - started
        slots = {s.task_id: (s.status.value, s.worker, s.why) for s in state.slots}
        if state.new_model is not None and state.stage.value == "publish":
            self.params = self.layout.unflatten(state.new_params)
            self.strategy_state = state.strategy_state
            self.model_version = state.new_model.version
            accuracy = self._evaluate(rlog)
            rlog.info("round %d: published model version %d from %d contributors in %.2f s", round_index,
                      self.model_version, len(state.contributors), seconds,
                      extra={"stage": "PUBLISH", "model_version": self.model_version, "seconds": round(seconds, 4),
                             "contributors": list(state.contributors), "sub_cohorts": slots})
            return RoundSummary(round_index, True, self.model_version, tuple(state.contributors), None, seconds,
                                accuracy)
        rlog.info("round %d: aborted after %.2f s: %s", round_index, seconds, state.abort_reason,
                  extra={"stage": "ABORTED", "reason": state.abort_reason, "sub_cohorts": slots})
        return RoundSummary(round_index, False, self.model_version, (), state.abort_reason, seconds)


def serve_coordinator(config: ServiceConfig) -> int:
    import signal

    from aggregator.service.logs import configure_json_logging

    configure_json_logging(min(logging.getLogger().level or logging.INFO, logging.INFO))  # -v/-vv win
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stopping.append(signum)) for s in (signal.SIGTERM,
                                                                                             signal.SIGINT)}
    try:
        return CoordinatorService(config).run(lambda: bool(stopping))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["CoordinatorService", "serve_coordinator"]
