"""Publish/subscribe round trips through a real Mosquitto, on MQTT 3.1.1 and 5."""

from __future__ import annotations

import pytest

from edge_sdk.transport.base import Transport, TransportError
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport


def collect(transport: MqttTransport, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    received: list[tuple[str, bytes]] = []
    transport.loop.run(timeout, until=lambda: (received.extend(transport.poll(0)), len(received) >= count)[1])
    return received


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_round_trip_on_both_protocol_versions(broker, protocol):
    loop = MqttLoop()
    sub = MqttTransport(MqttSettings(broker.url, f"sub-{protocol}", protocol=protocol, message_expiry_s=60,
                                     user_properties=(("fleetlearn-wire", "1"),)), loop)
    pub = MqttTransport(MqttSettings(broker.url, f"pub-{protocol}", protocol=protocol, message_expiry_s=60), loop)
    assert isinstance(sub, Transport)
    sub.subscribe("fleetlearn/v1/f/up/+/#")
    assert sub.wait_ready(10) and pub.wait_ready(10)
    payloads = [bytes([i]) * (1 + 5000 * i) for i in range(5)]
    for i, payload in enumerate(payloads):
        pub.publish(f"fleetlearn/v1/f/up/dev{i}/masked", payload)
    pub.publish("fleetlearn/v1/f/down/dev0", b"not subscribed")
    received = collect(sub, 5)
    assert received == [(f"fleetlearn/v1/f/up/dev{i}/masked", p) for i, p in enumerate(payloads)]
    assert pub.flush(5) and pub.unacknowledged == 0
    assert sub.poll(0.2) == []  # the unsubscribed topic never arrives
    pub.close()
    sub.close()
    with pytest.raises(TransportError, match="closed"):
        pub.publish("x", b"y")


def test_poll_never_blocks_longer_than_its_timeout(broker):
    import time

    sub = MqttTransport(MqttSettings(broker.url, "lonely"))
    sub.subscribe("nothing/#")
    assert sub.wait_ready(10)
    started = time.monotonic()
    assert sub.poll(0.3) == []
    assert 0.25 <= time.monotonic() - started < 0.6
    sub.close()


def test_retained_message_reaches_a_late_subscriber(broker):
    loop = MqttLoop()
    pub = MqttTransport(MqttSettings(broker.url, "aggregator"), loop)
    pub.publish("fleetlearn/v1/f/plan", b"signed plan", retain=True)
    assert pub.flush(10)
    late = MqttTransport(MqttSettings(broker.url, "late"), loop)
    late.subscribe("fleetlearn/v1/f/plan")
    assert collect(late, 1) == [("fleetlearn/v1/f/plan", b"signed plan")]
    pub.close()
    late.close()
