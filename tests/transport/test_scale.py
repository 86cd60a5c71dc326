"""Many connections from one MqttLoop, and the burst that overflows Mosquitto's default queue."""

from __future__ import annotations

import os
import time

import pytest

from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
from edge_sdk.wire.envelope import MessageKind

from .reliable_parties import AGGREGATOR, Fleet, aggregator_channel, device_channel, limits, up

# Mosquitto's defaults, written out so the test says what it relies on
DEFAULT_QUEUES = "max_queued_messages 1000\nmax_inflight_messages 20"
DEVICES = 200
MESSAGE_BYTES = 300_000
CHUNK_BYTES = 32 * 1024  # 10 chunks a message: 2,000 in the burst, twice what the broker queues for one client


def test_500_connections_from_one_loop_each_publish_once_and_all_arrive(broker):
    loop = MqttLoop()
    subscriber = MqttTransport(MqttSettings(broker.url, "aggregator"), loop)
    subscriber.subscribe("fleetlearn/v1/f/up/+/ready")
    assert subscriber.wait_ready(10)
    devices = [MqttTransport(MqttSettings(broker.url, f"dev-{i}"), loop) for i in range(500)]
    assert loop.run(60, until=lambda: all(d.connected for d in devices)), sum(d.connected for d in devices)
    for i, device in enumerate(devices):
        device.publish(f"fleetlearn/v1/f/up/dev-{i}/ready", f"ready {i}".encode())
    received: list[tuple[str, bytes]] = []
    loop.run(60, until=lambda: (received.extend(subscriber.poll(0)), len(received) >= 500)[1])
    assert sorted(received) == sorted((f"fleetlearn/v1/f/up/dev-{i}/ready", f"ready {i}".encode()) for i in range(500))
    assert loop.connection_count == 501
    for transport in (*devices, subscriber):
        transport.close(timeout=0.5)
    assert loop.connection_count == 0


def pause_then_burst(publish_all, publishers: list[MqttTransport], publisher_loop: MqttLoop) -> None:
    """Publish everything while the subscriber's loop is not driven, until the broker PUBACKed it all."""
    publish_all()
    assert publisher_loop.run(120, until=lambda: all(p.unacknowledged == 0 for p in publishers))


def test_a_raw_qos1_burst_through_default_queues_loses_messages(start_broker):
    broker = start_broker(DEFAULT_QUEUES)
    subscriber_loop, publisher_loop = MqttLoop(), MqttLoop()
    subscriber = MqttTransport(MqttSettings(broker.url, "aggregator"), subscriber_loop)
    subscriber.subscribe("burst/#")
    assert subscriber.wait_ready(10)
    publishers = [MqttTransport(MqttSettings(broker.url, f"dev-{i}"), publisher_loop) for i in range(DEVICES)]
    assert publisher_loop.run(30, until=lambda: all(p.connected for p in publishers))
    chunk = os.urandom(CHUNK_BYTES)
    chunks_each = 10

    def publish_all() -> None:
        for _ in range(chunks_each):
            for i, p in enumerate(publishers):
                p.publish(f"burst/dev-{i}", chunk)

    pause_then_burst(publish_all, publishers, publisher_loop)
    received = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:  # drain until a second passes with nothing new
        batch = subscriber.poll(0.2)
        received += batch
        if batch:
            quiet_since = time.monotonic()
    sent = DEVICES * chunks_each
    assert len(received) < sent, "the broker dropped nothing: this test would not show what the reliable layer adds"
    assert len(received) <= 1000 + 20 + 20  # the queue, the in-flight window, and what was in flight before it filled
    for transport in (*publishers, subscriber):
        transport.close(timeout=0.5)


@pytest.mark.slow
def test_the_same_burst_through_reliable_channels_arrives_exactly_once(start_broker):
    broker = start_broker(DEFAULT_QUEUES)
    names = [f"dev-{i}" for i in range(DEVICES)]
    fleet = Fleet({name: IdentityKey.generate() for name in (AGGREGATOR, *names)})
    lim = limits(DEVICES, MESSAGE_BYTES, CHUNK_BYTES)
    aggregator_loop, device_loop = MqttLoop(), MqttLoop()
    aggregator = aggregator_channel(broker.url, aggregator_loop, fleet, lim, CHUNK_BYTES)
    assert aggregator.transport.wait_ready(10)
    devices = [device_channel(broker.url, device_loop, fleet, name, lim, CHUNK_BYTES) for name in names]
    assert device_loop.run(30, until=lambda: all(d.transport.ready for d in devices))
    messages = {name: os.urandom(MESSAGE_BYTES) for name in names}

    def send_all() -> None:
        for device in devices:
            device.send(up(device.me, "masked_input"), to=AGGREGATOR, kind=MessageKind.MASKED_INPUT,
                        payload=messages[device.me], session=b"s" * 32, round_index=1, stage=6)

    pause_then_burst(send_all, [d.transport for d in devices], device_loop)
    delivered: list = []
    deadline = time.monotonic() + 240
    while any(d.pending for d in devices):
        assert time.monotonic() < deadline, (len(delivered), sum(d.pending for d in devices))
        delivered += aggregator.poll(0.01)
        for device in devices:
            if device.pending:
                device.poll(0)
        device_loop.run_once(0.005)
    delivered += aggregator.poll(0.2)
    assert sorted(d.envelope.sender for d in delivered) == sorted(names)  # every message, each exactly once
    assert all(d.envelope.payload == messages[d.envelope.sender] for d in delivered)  # byte-identical
    assert not any(d.gave_up for d in devices)
    retransmissions = sum(d.counters["retransmissions"] for d in devices)
    assert retransmissions > 0  # the broker did drop chunks (as above): the receipts made them good
    print(f"burst: {DEVICES} x {MESSAGE_BYTES} B, {retransmissions} retransmissions, "
          f"{aggregator.counters['duplicates']} duplicate whole messages acknowledged again")
    for transport in (*[d.transport for d in devices], aggregator.transport):
        transport.close(timeout=0.5)
