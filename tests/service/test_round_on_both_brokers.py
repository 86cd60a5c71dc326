"""The same real round over Mosquitto and over the embedded amqtt broker: the same outcome on both.

The aggregator service in a thread and four device agents, each with its own MQTT connection, run
one whole round (signed plan and model, training, DP, active-secure SecAgg+, receipts) through
each broker; the assertions do not depend on which broker carried it.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker

from aggregator.broker.embedded import EmbeddedBroker
from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService
from aggregator.store import RoundStatus, open_store
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy

from .round_fleet import make_fleet

pytestmark = pytest.mark.slow
DEVICES = 4


@pytest.fixture(params=["mosquitto", "embedded-amqtt"])
def any_broker(request, tmp_path):
    if request.param == "mosquitto":
        if not MOSQUITTO:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        broker = MosquittoBroker(tmp_path, "set_tcp_nodelay true").start()
        yield broker.url
        broker.stop()
    else:
        with EmbeddedBroker() as broker:
            yield broker.url


def test_one_round_gives_the_same_outcome_on_both_brokers(tmp_path, any_broker, tmp_path_factory):
    fleet = make_fleet(tmp_path, DEVICES, any_broker, tmp_path_factory.getbasetemp(),
                       rounds={"count": 1, "cohort_min": DEVICES, "cohort_max": DEVICES},
                       privacy={"dropout": 0.0})
    stop = threading.Event()
    errors = []

    def serve():  # the store's SQLite connection belongs to the thread that opens it
        try:
            AggregatorService(load_config(fleet.config)).run(stop.is_set)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)
    agents = [DeviceAgent(AgentSettings(state_dir=d, broker_url=any_broker, bundle=fleet.bundle,
                                        data=d / "data.npz", policy=policy)) for d in fleet.devices.values()]
    try:
        while thread.is_alive():
            for agent in agents:
                agent.step(0.01)
        thread.join(5)
        deadline = time.monotonic() + 20  # the published model is retained: every device takes it, then stops
        while not all(model_version(d) == 1 for d in fleet.devices.values()) and time.monotonic() < deadline:
            for agent in agents:
                agent.step(0.01)
    finally:
        stop.set()
        thread.join(10)
        for agent in agents:
            agent.close()
    assert not errors, errors
    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        assert [r.round_index for r in store.rounds(RoundStatus.COMPLETED)] == [1]
        assert store.rounds(RoundStatus.ABORTED) == []
        model = store.latest_model()
        assert model.version == 1  # the model was published
        stages = store.stages(1)
        assert stages[-1].stage == "publish" and stages[-1].participants == DEVICES, stages  # all contributed
        assert sum(s.dropouts for s in stages) == 0, stages
        assert len(store.accounting_events()) == 1
    for directory in fleet.devices.values():  # every device contributed and took the new model
        memory = json.loads((directory / "agent.json").read_text())
        assert memory["last_round"] == 1 and memory["model_version"] == 1, memory


def model_version(directory) -> int:
    return json.loads((directory / "agent.json").read_text()).get("model_version", 0)
