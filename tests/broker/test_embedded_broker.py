"""The transport against the embedded amqtt broker, and `fleetlearn broker run` as a real process.

Each test starts a real amqtt broker (a child process, as `simulate` does) and talks to it with
real paho connections; the behaviours are those the round protocol relies on, including the ones
amqtt gets wrong out of the box (persistent sessions of clients without a user name, retained
messages sent to clients that never subscribed to them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transport.reliable_parties import AGGREGATOR, Fleet, aggregator_channel, device_channel, limits, up

from aggregator.broker.embedded import EmbeddedBroker, EmbeddedBrokerError
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
from edge_sdk.wire.chunking import split
from edge_sdk.wire.envelope import MessageKind

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 128 * 1024  # the wire's chunk size: the largest payload the protocol sends
STATUS = "fleetlearn/v1/f/status/dev-7"


@pytest.fixture
def embedded():
    with EmbeddedBroker() as broker:
        yield broker


def collect(transport: MqttTransport, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(transport.poll(0.2))
    return got


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_round_trip_with_wildcards_and_a_full_chunk(embedded):
    loop = MqttLoop()
    aggregator = MqttTransport(MqttSettings(embedded.url, "aggregator"), loop)
    aggregator.subscribe("fleetlearn/v1/f/up/+/+")
    assert aggregator.wait_ready(10), aggregator.last_error
    device = MqttTransport(MqttSettings(embedded.url, "dev-1"), loop)
    chunk = os.urandom(CHUNK)
    device.publish("fleetlearn/v1/f/up/dev-1/masked_input", chunk)
    device.publish("fleetlearn/v1/f/up/dev-1/too/deep", b"not matched by +/+")
    device.publish("fleetlearn/v1/f/up/dev-1/receipt", b"small")
    assert collect(aggregator, 2) == [("fleetlearn/v1/f/up/dev-1/masked_input", chunk),
                                      ("fleetlearn/v1/f/up/dev-1/receipt", b"small")]
    assert aggregator.poll(0.3) == []
    device.close()
    aggregator.close()


def test_retained_reaches_a_late_subscriber_and_only_it(embedded):
    loop = MqttLoop()
    aggregator = MqttTransport(MqttSettings(embedded.url, "aggregator"), loop)
    aggregator.subscribe("fleetlearn/v1/f/status/+")
    assert aggregator.wait_ready(10)
    aggregator.publish("fleetlearn/v1/f/plan", b"signed plan", retain=True)
    aggregator.publish("fleetlearn/v1/f/status/dev-9", b"offline", retain=True)
    assert aggregator.flush(10)
    assert collect(aggregator, 1) == [("fleetlearn/v1/f/status/dev-9", b"offline")]
    late = MqttTransport(MqttSettings(embedded.url, "late"), loop)
    late.subscribe("fleetlearn/v1/f/plan")
    # amqtt alone would also send it the retained status/dev-9, because the aggregator holds status/+
    assert collect(late, 1) == [("fleetlearn/v1/f/plan", b"signed plan")]
    assert late.poll(0.5) == []
    late.close()
    aggregator.close()


def test_a_persistent_session_keeps_its_subscription_and_queue_while_away(embedded):
    loop = MqttLoop()
    away = MqttTransport(MqttSettings(embedded.url, "dev-away"), loop)  # no user name, as our devices connect
    away.subscribe("fleetlearn/v1/f/down/dev-away")
    assert away.wait_ready(10)
    away.close()
    aggregator = MqttTransport(MqttSettings(embedded.url, "aggregator"), loop)
    assert aggregator.wait_ready(10)
    loop.run(1.5)  # amqtt drops an anonymous session about a second after it left
    for i in range(20):
        aggregator.publish("fleetlearn/v1/f/down/dev-away", f"queued {i}".encode())
    assert aggregator.flush(10)
    back = MqttTransport(MqttSettings(embedded.url, "dev-away"), loop)  # does not subscribe again
    assert collect(back, 20) == [("fleetlearn/v1/f/down/dev-away", f"queued {i}".encode()) for i in range(20)]
    back.close()
    aggregator.close()


DEVICE = textwrap.dedent("""
    import sys
    from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
    t = MqttTransport(MqttSettings(sys.argv[1], "dev-7", status_topic=sys.argv[2]))
    assert t.wait_ready(10) and t.flush(10), t.last_error
    print("ready", flush=True)
    while True:
        t.poll(1.0)
""")


def test_last_will_says_offline_when_the_device_process_is_killed(embedded):
    observer = MqttTransport(MqttSettings(embedded.url, "aggregator"))
    observer.subscribe("fleetlearn/v1/f/status/+")
    assert observer.wait_ready(10)
    device = subprocess.Popen([sys.executable, "-c", DEVICE, embedded.url, STATUS], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert device.stdout.readline().strip() == "ready"
        assert collect(observer, 1) == [(STATUS, b"online")]
        device.send_signal(signal.SIGKILL)
        device.wait(10)
        assert collect(observer, 1) == [(STATUS, b"offline")]
    finally:
        device.kill()
        device.wait(10)
        device.stdout.close()
    late = MqttTransport(MqttSettings(embedded.url, "late-aggregator"))
    late.subscribe(STATUS)
    assert collect(late, 1) == [(STATUS, b"offline")]  # the will was retained
    observer.close()
    late.close()


def test_reliable_channel_delivers_a_chunked_message_once(embedded):
    fleet = Fleet({name: IdentityKey.generate() for name in (AGGREGATOR, "dev-1")})
    loop = MqttLoop()
    lim = limits(1, 400_000, CHUNK)
    agg = aggregator_channel(embedded.url, loop, fleet, lim, CHUNK)
    dev = device_channel(embedded.url, loop, fleet, "dev-1", lim, CHUNK)
    assert agg.transport.wait_ready(10) and dev.transport.wait_ready(10)
    message = os.urandom(327_680)
    dev.send(up("dev-1", "masked_input"), to=AGGREGATOR, kind=MessageKind.MASKED_INPUT, payload=message,
             session=b"s" * 32, round_index=1, stage=6)
    assert dev.counters["chunks_sent"] == len(split(message + b"x" * 100, CHUNK)) == 3
    delivered = []
    deadline = time.monotonic() + 15
    while not (delivered and dev.pending == 0):
        assert time.monotonic() < deadline, (dict(agg.counters), dict(dev.counters))
        delivered.extend(agg.poll(0))
        dev.poll(0)
        loop.run_once(0.02)
    assert [d.envelope.payload for d in delivered] == [message]
    assert dev.counters["receipts_accepted"] == 1 and agg.counters["duplicates"] == 0
    agg.transport.close()
    dev.transport.close()


def test_thread_mode_serves_too():
    with EmbeddedBroker(in_thread=True) as broker:
        assert "own thread" in broker.description
        client = MqttTransport(MqttSettings(broker.url, "c"))
        client.subscribe("t")
        assert client.wait_ready(10)
        client.publish("t", b"x")
        assert collect(client, 1) == [("t", b"x")]
        client.close()
    assert not broker.running


def test_a_second_broker_on_a_port_in_use_is_one_clear_error(embedded):
    expected = rf"cannot listen on 127\.0\.0\.1:{embedded.port}: address already in use"
    with pytest.raises(EmbeddedBrokerError, match=expected):
        EmbeddedBroker(port=embedded.port).start()


PARENT = textwrap.dedent("""
    import time
    from aggregator.broker.embedded import EmbeddedBroker
    broker = EmbeddedBroker().start()
    print(broker._process.pid, flush=True)
    time.sleep(600)
""")


def test_stop_ends_the_child_and_a_killed_parent_leaves_no_orphan():
    broker = EmbeddedBroker().start()
    pid = broker._process.pid
    broker.stop()
    assert not pid_alive(pid) and not broker.running
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.send_signal(signal.SIGKILL)  # no stop(), no atexit: only the child's own watch can end it
        parent.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child)
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()


def broker_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "broker", "run", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_broker_run_serves_a_client_and_sigterm_exits_0():
    process = broker_run("--port", "0")
    try:
        line = process.stdout.readline()
        assert line.startswith("fleetlearn broker: serving mqtt://127.0.0.1:"), (line, process.stderr.read())
        url = line.split()[3]
        client = MqttTransport(MqttSettings(url, "paho"))
        client.subscribe("fleetlearn/v1/f/plan")
        assert client.wait_ready(10), client.last_error
        client.publish("fleetlearn/v1/f/plan", b"plan", retain=True)
        assert collect(client, 1) == [("fleetlearn/v1/f/plan", b"plan")]
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert process.stdout.read() == "fleetlearn broker: stopped\n"
        assert process.stderr.read() == ""
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_broker_run_on_a_port_in_use_is_one_line_and_exit_2(embedded):
    process = broker_run("--port", str(embedded.port))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2 and out == ""
    assert err == f"fleetlearn broker: error: cannot listen on 127.0.0.1:{embedded.port}: address already in use\n"
