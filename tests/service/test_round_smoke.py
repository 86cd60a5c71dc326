"""Three device agents and the aggregator service in one process, over a real Mosquitto: two whole rounds.

The quick check of the shells (the 10-process acceptance test is test_round_over_mqtt.py): the
service in a thread, the agents stepped in turn, each with its own MQTT connection.
"""

from __future__ import annotations

import json
import threading

import pytest

from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService
from aggregator.store import RoundStatus, open_store
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy

from .round_fleet import make_fleet

pytestmark = pytest.mark.slow


def test_three_agents_and_the_service_complete_two_rounds(tmp_path, broker, tmp_path_factory):
    fleet = make_fleet(tmp_path, 3, broker.url, tmp_path_factory.getbasetemp(),
                       rounds={"count": 2, "cohort_min": 3, "cohort_max": 3},
                       privacy={"dropout": 0.0})
    stop = threading.Event()
    errors = []

    def serve():  # the store's SQLite connection belongs to the thread that opens it
        try:
            AggregatorService(load_config(fleet.config)).run(stop.is_set)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)
    agents = [DeviceAgent(AgentSettings(state_dir=d, broker_url=broker.url, bundle=fleet.bundle,
                                        data=d / "data.npz", policy=policy)) for d in fleet.devices.values()]
    try:
        while thread.is_alive():
            for agent in agents:
                agent.step(0.01)
        thread.join(5)
    finally:
        stop.set()
        thread.join(10)
        for agent in agents:
            agent.close()
    assert not errors, errors
    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        completed = store.rounds(RoundStatus.COMPLETED)
        assert [r.round_index for r in completed] == [1, 2]
        assert store.latest_model().version == 2
        assert len(store.accounting_events()) == 2
    for directory in fleet.devices.values():
        memory = json.loads((directory / "agent.json").read_text())
        assert memory["last_round"] == 2 and memory["model_version"] >= 1
