"""Failover between broker nodes, with real Mosquitto processes killed with SIGKILL.

What must hold when the node a client is on dies: the client moves to the next node of its URL
list (round robin, wrapping around), subscribes again, says ``online`` there (retained) with its
last will registered there too, and whatever it published that the dead node never acknowledged
is sent again to the new node (paho keeps QoS 1 messages until PUBACK).
"""

from __future__ import annotations

import logging
import re
import time

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport, ReconnectBackoff, parse_broker_urls

from .mosquitto_process import free_port

STATUS = "fleetlearn/v1/f/status/dev-1"
FAST = ReconnectBackoff(initial_s=0.1, maximum_s=1.0)


def wait_for(loop: MqttLoop, condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        loop.run(0.05)
    return condition()


def received(transport: MqttTransport, wanted, timeout: float = 20.0) -> list[tuple[str, bytes]]:
    """Poll until ``wanted`` (a (topic, payload) pair) has arrived; returns everything seen."""
    seen: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        seen += transport.poll(0.2)
    return seen


@pytest.mark.slow
def test_the_client_moves_to_the_next_node_and_keeps_publishing_and_receiving(start_broker):
    a, b = start_broker(), start_broker()
    loop = MqttLoop()
    device = MqttTransport(MqttSettings(f"{a.url},{b.url}", "dev-1", status_topic=STATUS, backoff=FAST), loop)
    device.subscribe("fleetlearn/v1/f/down/dev-1/#")
    assert device.wait_ready(10) and device.node_url == a.url
    observer = MqttTransport(MqttSettings(b.url, "observer"), loop)  # lives on the second node only
    observer.subscribe("fleetlearn/v1/f/#")
    assert observer.wait_ready(10)
    assert observer.poll(0.5) == []  # nothing of the device on b yet

    a.kill()
    sent_in_the_gap = device.publish("fleetlearn/v1/f/up/dev-1/x", b"in the gap")  # a never acknowledges it
    assert wait_for(loop, lambda: device.ready and device.node_url == b.url), device.last_error
    assert device.failovers == 1 and device.connects == 2
    seen = received(observer, ("fleetlearn/v1/f/up/dev-1/x", b"in the gap"))
    assert (STATUS, b"online") in seen  # re-announced on the new node
    assert ("fleetlearn/v1/f/up/dev-1/x", b"in the gap") in seen
    # b's PUBACK reaches the device after b has delivered the message to the observer: wait for it
    assert wait_for(loop, lambda: device.left(sent_in_the_gap)), "the message resent to b was never acknowledged"
    device.publish("fleetlearn/v1/f/up/dev-1/x", b"after")
    assert ("fleetlearn/v1/f/up/dev-1/x", b"after") in received(observer, ("fleetlearn/v1/f/up/dev-1/x", b"after"))
    observer.publish("fleetlearn/v1/f/down/dev-1/y", b"to the device")  # resubscribed on b
    assert ("fleetlearn/v1/f/down/dev-1/y", b"to the device") in received(
        device, ("fleetlearn/v1/f/down/dev-1/y", b"to the device"))

    device.drop()  # the will is registered on b: b says offline for it
    assert (STATUS, b"offline") in received(observer, (STATUS, b"offline"))
    observer.close()


@pytest.mark.slow
def test_round_robin_skips_a_dead_first_node_and_wraps_around(start_broker):
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    b = start_broker()
    loop = MqttLoop()
    device = MqttTransport(MqttSettings(f"{dead},{b.url}", "dev-1", backoff=FAST), loop)
    device.subscribe("t/#")
    assert wait_for(loop, lambda: device.ready), device.last_error
    assert device.node_url == b.url and device.failovers == 1
    revived = start_broker(port=int(dead.rsplit(":", 1)[1]))  # the first node comes up; then b dies
    b.kill()
    assert wait_for(loop, lambda: device.ready and device.node_url == revived.url), device.last_error
    assert device.failovers == 2  # b -> the first node again: round robin wrapped around
    echo = MqttTransport(MqttSettings(revived.url, "echo"), loop)
    echo.publish("t/z", b"on the revived node")
    assert ("t/z", b"on the revived node") in received(device, ("t/z", b"on the revived node"))
    device.close()
    echo.close()


def test_the_backoff_grows_once_per_turn_over_the_nodes(caplog):
    """Three dead nodes, tried in order: each turn over them waits twice as long as the one before."""
    urls = [f"mqtt://127.0.0.1:{free_port()}" for _ in range(3)]
    loop = MqttLoop()
    backoff = ReconnectBackoff(initial_s=0.05, maximum_s=5.0, jitter=0.0)
    caplog.set_level(logging.INFO, logger="edge_sdk.transport.mqtt")
    device = MqttTransport(MqttSettings(",".join(urls), "dev-1", backoff=backoff), loop)
    assert wait_for(loop, lambda: device.failovers >= 7, 20)
    device.close()
    plans = [re.search(r"reconnecting to (\S+) in ([0-9.]+) s", r.getMessage()) for r in caplog.records]
    plans = [(m.group(1), float(m.group(2))) for m in plans if m][:7]
    assert [url for url, _ in plans] == [urls[1], urls[2], urls[0], urls[1], urls[2], urls[0], urls[1]]
    assert [delay for _, delay in plans] == [0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 0.2]


@pytest.mark.parametrize("text, problem", [
    ("mqtt://a:1883,", "empty entry"),
    ("mqtt://a:1883, ,mqtt://b:1883", "empty entry"),
    ("mqtt://a:1883,mqtts://b:8883", "mixes mqtt:// and mqtts://"),
    ("mqtt://a:1883,http://b", "scheme must be"),
])
def test_bad_url_lists_are_refused_with_the_reason(text, problem):
    with pytest.raises(ConfigError, match=problem):
        MqttSettings(text, "dev-1")


def test_a_list_keeps_its_order_and_one_url_is_a_list_of_one():
    assert parse_broker_urls("mqtt://a:1, mqtt://b:2") == ("mqtt://a:1", "mqtt://b:2")
    assert MqttSettings("mqtt://a:1", "dev-1").urls == ("mqtt://a:1",)
