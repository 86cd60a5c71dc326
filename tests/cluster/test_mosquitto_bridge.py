"""A site Mosquitto bridged to a central one: the aggregator on central, the devices on the site broker.

The topology of a site gateway in front of a central broker: the site's Mosquitto bridges
``fleetlearn/v1/#`` both ways at QoS 1 with a persistent bridge session (``cleansession false``),
so the retained plan, model and directory the service publishes on central reach the devices
through the bridge, and their uploads and receipts come back through it. Everything is real: two
Mosquitto processes, the service in a thread, four device agents, SecAgg+ and distributed DP.

Then central is SIGKILLed mid-round and restarted without persistence: the bridge link is cut, the
aggregator's session and every QoS 1 message central held are gone. The service reconnects and
re-publishes its retained messages, the bridge reconnects, and the round either completes (the
receipts' retransmission resends what was lost) or aborts cleanly; the next round completes and
nothing committed is lost.
"""

from __future__ import annotations

import threading
import time

import pytest
from service.round_fleet import make_fleet
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker

from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService
from aggregator.store import RoundStatus, open_store
from edge_sdk.device.agent import AgentSettings, DeviceAgent
from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.protocol.device_round import DeviceStage
from edge_sdk.protocol.plan import RoundPlan

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MOSQUITTO, reason="mosquitto is not installed")]

DEVICES = 4
ROUNDS = 3
TEST_DEADLINE_S = 80.0


def bridge_config(central: MosquittoBroker) -> str:
    """The site broker's bridge section, as docs/scaling.md shows it."""
    return "\n".join([
        "set_tcp_nodelay true",
        "connection central",
        f"address 127.0.0.1:{central.port}",
        "topic fleetlearn/v1/# both 1",
        "cleansession false",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "restart_timeout 1",
        "notifications false",
    ])


@pytest.fixture
def brokers(tmp_path):
    central = MosquittoBroker(tmp_path, "set_tcp_nodelay true").start()
    site = MosquittoBroker(tmp_path, bridge_config(central)).start()
    yield central, site
    site.stop()
    central.stop()


def test_a_round_through_a_bridged_site_broker_and_a_retry_after_central_restarts(tmp_path, tmp_path_factory,
                                                                                 brokers):
    central, site = brokers
    fleet = make_fleet(tmp_path, DEVICES, central.url, tmp_path_factory.getbasetemp(),
                       rounds={"count": ROUNDS, "cohort_min": DEVICES, "cohort_max": DEVICES, "retry_after": 1.0},
                       deadlines={"ready": 15.0, "train": 15.0, "secagg_stage": 6.0},
                       privacy={"dropout": 0.0})
    stop = threading.Event()
    errors: list[BaseException] = []
    services: list[AggregatorService] = []

    def serve():
        try:
            service = AggregatorService(load_config(fleet.config))
            services.append(service)
            service.run(stop.is_set)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = DevicePolicy(min_battery_percent=None, max_cpu_celsius=None, max_load_per_cpu=None)
    agents = [DeviceAgent(AgentSettings(state_dir=d, broker_url=site.url, bundle=fleet.bundle, data=d / "data.npz",
                                        policy=policy)) for d in fleet.devices.values()]
    cut_in_round = None
    deadline = time.monotonic() + TEST_DEADLINE_S
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            for agent in agents:
                agent.step(0.01)
            if cut_in_round is None and any(
                    a.endpoint.state is not None and a.endpoint.state.stage is DeviceStage.SECAGG
                    and a.endpoint.state.plan is not None and a.endpoint.state.plan.round_index == 2 for a in agents):
                central.kill()  # the bridge link and the aggregator's connection die; central forgets everything
                central.start()
                cut_in_round = 2
        thread.join(5)
    finally:
        stop.set()
        thread.join(15)
        for agent in agents:
            agent.close()
    assert not errors, errors
    assert cut_in_round == 2, "the run never reached round 2's SecAgg+ stage"
    assert not thread.is_alive(), f"the service did not finish {ROUNDS} rounds within {TEST_DEADLINE_S} s"
    assert services[0].transport.inner.connects >= 2  # the service reconnected to the restarted central

    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        rounds = store.rounds()
        completed = [r.round_index for r in rounds if r.status is RoundStatus.COMPLETED]
        aborted = [r.round_index for r in rounds if r.status is RoundStatus.ABORTED]
        assert completed[0] == 1 and len(completed) == ROUNDS
        assert set(aborted) <= {2}, f"only the round the cut hit may abort: {aborted}"
        assert 2 in completed or (2 in aborted and completed[1:] == [3, 4])
        assert store.latest_model().version == ROUNDS and store.model(ROUNDS + 1) is None
        bases = [RoundPlan.from_bytes(store.plan(i).payload).model_version for i in completed]
        assert bases == list(range(ROUNDS))  # contiguous model versions
        assert [e.round_index for e in store.accounting_events()] == completed  # once each, aborted never
    retransmissions = services[0].transport.channel.counters["retransmissions"] + sum(
        a.transport.channel.counters["retransmissions"] for a in agents)
    print(f"round 2 {'completed' if 2 in completed else 'aborted'}; retransmissions {retransmissions}")
