"""Model integrity (issue 11, item 2): a device refuses forged, foreign-signed, rolled-back and tampered broadcasts.

A real ``DeviceAgent`` (in this process, so its state is readable) on a real Mosquitto, beside two
``fleetlearn device run`` processes and a real ``fleetlearn aggregator serve`` process. After a
genuine round 1, a raw paho client publishes on the retained ``plan/<i>`` and ``model/<i>`` topics,
chunked exactly as the aggregator chunks: an unsigned model, a model signed by another key, the
genuine version 0 again (a rollback, also to an agent restarted from its state directory), a
release whose bytes do not hash to the digest the plan names, the same version with other bytes,
an unsigned plan, a plan signed by another key, and the genuine plan of round 1 again (a replay).
The agent refuses each with its reason logged, its state directory stays byte for byte the same,
and it takes part in the genuine round 2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.service.service import load_or_create_identity
from aggregator.store import RoundStatus, open_store
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.protocol.messages import ModelRelease
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.protocol.routing import AGGREGATOR_ID, BROADCAST, Router, Send, limits_for_plan
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.wire.chunking import split
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES

from .round_fleet import FLEET, Process, aggregator_command, device_command, make_fleet

pytestmark = pytest.mark.slow

NO_POLICY = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)


def agent_for(disk, url: str) -> DeviceAgent:
    device = "dev-00"
    return DeviceAgent(AgentSettings(disk.devices[device], url, disk.bundle, disk.data_of(device), policy=NO_POLICY))


def step_until(agent: DeviceAgent, done, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent.step(0.05)
        if done():
            return
    raise AssertionError(f"timed out waiting for {what}")


def state_files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


class Forger:
    """A raw paho client that publishes retained broadcasts, chunked like ``RoundTransport`` does."""

    def __init__(self, url_port: int, plan: RoundPlan) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="forger")
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()
        self.router = Router(FLEET, AGGREGATOR_ID, limits_for_plan(plan, 3))

    def publish(self, message) -> None:
        topic, payload, _ = self.router.outgoing(Send(BROADCAST, message))
        for index, chunk in enumerate(split(payload, DEFAULT_MAX_PAYLOAD_BYTES)):
            self.client.publish(f"{topic}/{index}", chunk, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_device_refuses_forged_foreign_rolled_back_and_tampered_models_and_plans(tmp_path, broker,
                                                                                    tmp_path_factory, caplog):
    disk = make_fleet(tmp_path, 3, broker.url, tmp_path_factory.getbasetemp(),
                      rounds={"count": 1, "cohort_min": 3}, privacy={"dropout": 0.0})
    caplog.set_level(logging.DEBUG, logger="edge_sdk")
    others = [Process.start(d, device_command(disk, d, broker.url)) for d in ("dev-01", "dev-02")]
    agent = agent_for(disk, broker.url)
    aggregator = Process.start("aggregator", aggregator_command(disk))
    forger = None
    try:
        step_until(agent, lambda: aggregator.popen.poll() is not None and agent.memory.model_version == 1, 90,
                   "round 1 and model version 1 at dev-00")
        assert aggregator.popen.returncode == 0 and agent.memory.last_round == 1
        with open_store(disk.state_dir / "aggregator.sqlite") as store:
            plan1 = RoundPlan.from_bytes(store.plan(1).payload)
            model0, model1 = store.model(0).payload, store.model(1).payload
        genuine = load_or_create_identity(disk.state_dir / "aggregator.key")
        stranger = IdentityKey.generate()
        other_bytes = bytes(len(model1))  # a model of zeros: the right size, not what the aggregator released
        honest_v2 = ModelRelease.of(FLEET, 2, other_bytes).sign(genuine)
        plan2 = replace(plan1, round_index=2, signature=b"")  # unsigned
        forgeries = [
            ("unsigned model", ModelRelease.of(FLEET, 2, other_bytes), "signature"),
            ("model signed by another key", ModelRelease.of(FLEET, 2, other_bytes).sign(stranger), "signature"),
            ("rollback to model version 0", ModelRelease.of(FLEET, 0, model0).sign(genuine), "rollback"),
            ("model whose bytes do not match its digest",
             replace(honest_v2, parameters=model1), "do not match the signed digest"),
            ("model version 1 with other bytes", ModelRelease.of(FLEET, 1, other_bytes).sign(genuine),
             "other bytes"),
            ("unsigned plan", plan2, "signature"),
            ("plan signed by another key", plan2.sign(stranger), "signature"),
            ("replayed plan of round 1", plan1, "a replay"),
        ]
        before = state_files(disk.devices["dev-00"])
        memory = agent.memory
        forger = Forger(broker.port, plan1)
        for what, message, reason in forgeries:
            caplog.clear()
            forger.publish(message)
            step_until(agent, lambda r=reason: any(r in rec.getMessage() and rec.levelno >= logging.WARNING
                                                   for rec in caplog.records), 10,
                       f"dev-00 to refuse the {what}, logged at WARNING for the operator")
            refusal = next(rec.getMessage() for rec in caplog.records
                           if reason in rec.getMessage() and rec.levelno >= logging.WARNING)
            assert "refused" in refusal, (what, refusal)
            print(f"| {what} | {refusal} |")  # the row for docs/reliability.md
            assert agent.memory == memory and agent.model.version == 1, what
            assert state_files(disk.devices["dev-00"]) == before, what
        # Rebooted from its state directory: agent.json still says version 1, so version 0 is a rollback.
        agent.close()
        agent = agent_for(disk, broker.url)
        caplog.clear()
        forger.publish(ModelRelease.of(FLEET, 0, model0).sign(genuine))
        step_until(agent, lambda: any("rollback" in rec.getMessage() for rec in caplog.records), 10,
                   "the restarted dev-00 to refuse version 0")
        assert agent.memory == memory and state_files(disk.devices["dev-00"]) == before

        # The genuine round 2 still runs with dev-00 in it.
        disk.config.write_text(disk.config.read_text().replace("count = 1", "count = 2"))
        aggregator = Process.start("aggregator", aggregator_command(disk))
        step_until(agent, lambda: aggregator.popen.poll() is not None and agent.memory.model_version == 2, 90,
                   "round 2 and model version 2 at dev-00")
        assert aggregator.popen.returncode == 0
        with open_store(disk.state_dir / "aggregator.sqlite") as store:
            assert store.round(2).status is RoundStatus.COMPLETED
            assert "dev-00" in store.accounting_events()[-1].event["contributors"]
            assert agent.model.digest == ModelRelease.of(FLEET, 2, store.model(2).payload).digest
    finally:
        if forger is not None:
            forger.close()
        agent.close()
        aggregator.stop()
        for process in others:
            process.stop()
