"""The real aggregator service and device agents over a 3-node NATS cluster's MQTT listeners; one node SIGKILLed.

Everything is real: three ``nats-server`` processes routed into one cluster, each with its own
JetStream store (NATS keeps MQTT sessions, QoS 1 messages awaiting acknowledgement and retained
messages in replicated streams), the service on node 3, six device agents on nodes 1 and 2
(each with every node in its URL list, its own node first), onnxruntime training, SecAgg+
(active-secure) and distributed DP, the SQLite store.

* Two rounds complete: the retained plan, model and directory the service publishes on node 3
  reach devices on nodes 1 and 2, and their uploads come back across the routes.
* Node 1 is SIGKILLed while a round is in SecAgg+: its devices fail over to node 2. Whatever the
  cluster kept of their sessions, the round either completes or aborts cleanly (receipts and
  retransmission cover lost QoS 1 messages, the round's deadlines the rest), the next round
  completes with every device, and nothing committed is lost: model versions are contiguous,
  each completed round is accounted exactly once, an aborted one not at all.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from service.round_fleet import make_fleet

from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService
from aggregator.store import RoundStatus, open_store
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.protocol.device_round import DeviceStage
from edge_sdk.protocol.plan import RoundPlan

pytestmark = pytest.mark.slow

DEVICES = 6
ROUNDS = 3  # completed rounds the service runs; the kill lands in the third
TEST_DEADLINE_S = 80.0


def rotated(urls: list[str], first: int) -> str:
    return ",".join(urls[first:] + urls[:first])


def test_rounds_over_a_nats_cluster_survive_a_node_killed_mid_round(tmp_path, tmp_path_factory, nats_cluster):
    n1, n2, n3 = nats_cluster.urls
    fleet = make_fleet(tmp_path, DEVICES, n3, tmp_path_factory.getbasetemp(),
                       broker={"urls": [n3, n1, n2]},
                       rounds={"count": ROUNDS, "cohort_min": DEVICES, "cohort_max": DEVICES, "retry_after": 1.0},
                       deadlines={"ready": 15.0, "train": 15.0, "secagg_stage": 6.0},
                       privacy={"dropout": 0.1})
    stop = threading.Event()
    errors: list[BaseException] = []
    services: list[AggregatorService] = []

    def serve():  # the store's SQLite connection belongs to the thread that opens it
        try:
            service = AggregatorService(load_config(fleet.config))
            services.append(service)
            service.run(stop.is_set)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)
    urls = nats_cluster.urls
    agents = {}
    for i, (device, directory) in enumerate(fleet.devices.items()):
        home = 0 if i < DEVICES // 2 else 1  # half on node 1, half on node 2
        agents[device] = DeviceAgent(AgentSettings(state_dir=directory, broker_url=rotated(urls, home),
                                                   bundle=fleet.bundle, data=directory / "data.npz", policy=policy))
    on_node_1 = [a for i, a in enumerate(agents.values()) if i < DEVICES // 2]
    killed_in_round = None
    deadline = time.monotonic() + TEST_DEADLINE_S
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            for agent in agents.values():
                agent.step(0.01)
            if killed_in_round is None:
                states = [a.endpoint.state for a in on_node_1]
                in_secagg = [s for s in states if s is not None and s.stage is DeviceStage.SECAGG and s.plan
                             and s.plan.round_index == 3]
                if in_secagg:
                    nats_cluster.kill(0)
                    killed_in_round = 3
        thread.join(5)
    finally:
        stop.set()
        thread.join(15)
        for agent in agents.values():
            agent.close()
    assert not errors, errors
    assert killed_in_round == 3, "the run never reached round 3's SecAgg+ stage"
    assert not thread.is_alive(), f"the service did not finish {ROUNDS} rounds within {TEST_DEADLINE_S} s"

    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        rounds = store.rounds()
        completed = [r.round_index for r in rounds if r.status is RoundStatus.COMPLETED]
        aborted = [r.round_index for r in rounds if r.status is RoundStatus.ABORTED]
        assert [r.round_index for r in rounds if r.status is RoundStatus.RUNNING] == []
        assert completed[:2] == [1, 2] and len(completed) == ROUNDS
        assert set(aborted) <= {3}, f"only the round the kill hit may abort: {aborted}"
        # the round hit either completed or aborted cleanly, and the next one completed
        assert 3 in completed or (3 in aborted and completed[-1] == 4)
        versions = [store.model(v) for v in range(ROUNDS + 1)]
        assert all(m is not None for m in versions) and store.latest_model().version == ROUNDS
        assert store.model(ROUNDS + 1) is None
        # contiguous: each completed round trained from the model the one before it published
        bases = [RoundPlan.from_bytes(store.plan(i).payload).model_version for i in completed]
        assert bases == list(range(ROUNDS))
        events = [e.round_index for e in store.accounting_events()]
        assert events == completed  # each completed round accounted once, an aborted one never

    # the devices on the dead node moved to another one and took part in the last round
    for agent in on_node_1:
        mqtt = agent.transport.inner
        assert mqtt.failovers >= 1 and mqtt.node_url != n1, (agent.device_id, mqtt.node_url)
    for device, directory in fleet.devices.items():
        memory = json.loads((directory / "agent.json").read_text())
        assert memory["last_round"] == completed[-1], (device, memory)
        assert memory["model_version"] == ROUNDS - 1 or memory["model_version"] == ROUNDS, (device, memory)
    # what the cluster lost with the node (in-flight QoS 1 messages), receipts and retransmission resent
    retransmissions = sum(a.transport.channel.counters["retransmissions"] for a in agents.values())
    print(f"round 3 {'completed' if 3 in completed else 'aborted'}; device retransmissions {retransmissions}")
