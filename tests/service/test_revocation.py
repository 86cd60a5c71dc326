"""A device revoked between rounds (`fleetlearn aggregator revoke`) is out from the next round on.

The real service runs over a real Mosquitto with four enrolled devices' agents (in this process,
each with its own MQTT connection, as in test_round_smoke.py). After round 1 completes, dev-03 is
revoked with the CLI in the service's SQLite store. Round 2 must not invite it; a Ready for round 2
that dev-03 signs with its own (still valid) identity key and publishes on its own uplink over its own
connection is refused and logged; and round 2 completes with the other three. The broker here allows
anyone (no ACL), as a broker not yet reloaded after the revocation would: the aggregator's own check
is what is tested (the broker's is tests/broker/test_tls_acl_confinement.py).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService
from aggregator.store import RoundStatus, open_store
from edge_sdk.cli import main
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.protocol.messages import Ready
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.protocol.routing import AGGREGATOR_ID, Router, Send, limits_for_plan
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
from edge_sdk.transport.round_transport import RoundTransport

from .round_fleet import FLEET, make_fleet

pytestmark = pytest.mark.slow

REVOKED = "dev-03"


def wait_for(condition, what: str, step, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step()


def test_a_device_revoked_between_rounds_is_not_invited_and_its_signed_messages_are_refused(
        tmp_path, broker, tmp_path_factory, caplog):
    fleet = make_fleet(tmp_path, 4, broker.url, tmp_path_factory.getbasetemp(),
                       rounds={"count": 2, "cohort_min": 3, "cohort_max": 4, "interval": 2.0},
                       privacy={"dropout": 0.0})
    store_path = fleet.state_dir / "aggregator.sqlite"
    stop = threading.Event()
    errors = []

    def serve():  # the store's SQLite connection belongs to the thread that opens it
        try:
            AggregatorService(load_config(fleet.config)).run(stop.is_set)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    caplog.set_level(logging.INFO)
    policy = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)
    agents = {device: DeviceAgent(AgentSettings(state_dir=d, broker_url=broker.url, bundle=fleet.bundle,
                                                data=d / "data.npz", policy=policy))
              for device, d in fleet.devices.items()}
    # every device online (its retained status) before the service starts: otherwise round 1 may be
    # planned once cohort_min = 3 are up and leave out the device this test revokes
    connect_until = time.monotonic() + 3.0
    while time.monotonic() < connect_until:
        for agent in agents.values():
            agent.step(0.01)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    forger = None

    def step_all():
        for agent in agents.values():
            agent.step(0.01)
        assert thread.is_alive() or not errors, errors

    def round_status(index: int):
        with open_store(store_path) as store:
            return [r.status for r in store.rounds() if r.round_index == index]

    try:
        wait_for(lambda: round_status(1) == [RoundStatus.COMPLETED], "round 1", step_all)
        with open_store(store_path) as store:
            assert sorted(store.accounting_events()[0].event["contributors"]) == sorted(fleet.devices)
        assert main(["aggregator", "revoke", "--store", str(store_path), "--device", REVOKED,
                     "--reason", "stolen"]) == 0

        def plan_2():
            with open_store(store_path) as store:
                record = store.plan(2)
            return RoundPlan.from_bytes(record.payload) if record is not None else None

        # Round 2's plan: the honest agents are held back so that the forged Ready arrives while the
        # aggregator still waits for answers (PLAN stage), where only the enrolment decides.
        plan = wait_for(plan_2, "round 2's plan", lambda: (agents[REVOKED].step(0.01), time.sleep(0.05)))
        assert REVOKED not in plan.sampling.cohort
        assert sorted(plan.sampling.cohort) == ["dev-00", "dev-01", "dev-02"]

        identity = IdentityKey(bytes.fromhex((fleet.devices[REVOKED] / "identity.key").read_text().strip()))
        limits = limits_for_plan(plan, 4)
        forger = RoundTransport(MqttTransport(MqttSettings(broker.url, f"{REVOKED}-raw")), me=REVOKED, fleet=FLEET,
                                identity=identity, limits=limits,
                                peer_key=lambda party: fleet.aggregator_public if party == AGGREGATOR_ID else None)
        ready = Ready(FLEET, REVOKED, plan.round_index, plan.digest).sign(identity)
        topic, data, retain = Router(FLEET, REVOKED, limits).outgoing(Send(AGGREGATOR_ID, ready))
        assert topic.startswith(f"fleetlearn/v1/{FLEET}/up/{REVOKED}/")  # its own uplink
        forger.publish(topic, data, retain=retain)

        def refused():
            return [r for r in caplog.records if "rejected" in r.getMessage() and REVOKED in r.getMessage()]

        refusals = wait_for(refused, "the aggregator to refuse dev-03's Ready", lambda: forger.poll(0.05))
        assert "not enrolled" in refusals[0].getMessage(), refusals[0].getMessage()
        while thread.is_alive():
            step_all()
            forger.poll(0)
        thread.join(5)
    finally:
        stop.set()
        thread.join(10)
        for agent in agents.values():
            agent.close()
        if forger is not None:
            forger.close()
    assert not errors, errors
    with open_store(store_path) as store:
        assert [r.round_index for r in store.rounds(RoundStatus.COMPLETED)] == [1, 2]
        events = store.accounting_events()
        assert [e.round_index for e in events] == [1, 2]
        assert sorted(events[0].event["contributors"]) == ["dev-00", "dev-01", "dev-02", REVOKED]
        assert sorted(events[1].event["contributors"]) == ["dev-00", "dev-01", "dev-02"]
        assert store.latest_model().version == 2
    published = [r.getMessage() for r in caplog.records if "enrolment directory" in r.getMessage()]
    assert any("(3 devices)" in m for m in published), published  # the revocation went out in a new directory
