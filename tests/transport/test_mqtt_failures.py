"""What the broker and the aggregator see when things die: a device SIGKILLed, a broker SIGKILLed and restarted."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport, ReconnectBackoff

STATUS = "fleetlearn/v1/f/status/dev-7"

DEVICE = textwrap.dedent("""
    import sys
    from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
    t = MqttTransport(MqttSettings(sys.argv[1], "dev-7", status_topic=sys.argv[2]))
    assert t.wait_ready(10) and t.flush(10), t.last_error
    print("ready", flush=True)
    while True:
        t.poll(1.0)
""")


def test_last_will_says_offline_when_the_device_process_is_killed(broker):
    observer = MqttTransport(MqttSettings(broker.url, "aggregator"))
    observer.subscribe("fleetlearn/v1/f/status/+")
    assert observer.wait_ready(10)
    device = subprocess.Popen([sys.executable, "-c", DEVICE, broker.url, STATUS], stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout.readline().strip() == "ready"
        assert observer.poll(10) == [(STATUS, b"online")]
        device.send_signal(signal.SIGKILL)
        device.wait(10)
        assert observer.poll(10) == [(STATUS, b"offline")]
    finally:
        device.kill()
        device.wait(10)
        device.stdout.close()
    # the status is retained: an aggregator that starts later still learns the device is offline
    late = MqttTransport(MqttSettings(broker.url, "late-aggregator"))
    late.subscribe(STATUS)
    assert late.poll(10) == [(STATUS, b"offline")]
    observer.close()
    late.close()


def test_a_clean_close_also_says_offline(broker):
    loop = MqttLoop()
    observer = MqttTransport(MqttSettings(broker.url, "aggregator"), loop)
    observer.subscribe(STATUS)
    assert observer.wait_ready(10)
    device = MqttTransport(MqttSettings(broker.url, "dev-7", status_topic=STATUS), loop)
    assert observer.poll(10) == [(STATUS, b"online")]
    device.close()
    assert observer.poll(10) == [(STATUS, b"offline")]
    observer.close()


def test_reconnect_after_sigkill_and_restart_delivers_what_the_persistent_session_queued(start_broker):
    broker = start_broker(persistence=True)
    loop = MqttLoop()
    fast = ReconnectBackoff(initial_s=0.1, maximum_s=0.5)
    away = MqttTransport(MqttSettings(broker.url, "away-device"), loop)
    away.subscribe("queue/#")
    assert away.wait_ready(10)
    away.close()  # a clean disconnect of a persistent session: the broker keeps queueing for it
    live = MqttTransport(MqttSettings(broker.url, "live-device", backoff=fast), loop)
    live.subscribe("live/#")
    publisher = MqttTransport(MqttSettings(broker.url, "aggregator", backoff=fast), loop)
    assert live.wait_ready(10) and publisher.wait_ready(10)
    for i in range(20):
        publisher.publish(f"queue/{i}", f"queued {i}".encode())
    assert publisher.flush(10)  # PUBACKed: the broker holds them for "away-device"
    loop.run(1.5)  # past autosave_interval 1, so the queue is on disk

    broker.kill()
    assert loop.run(10, until=lambda: not live.connected and not publisher.connected)
    publisher.publish("live/while-down", b"kept by paho until the broker is back")
    start_broker(persistence=True, port=broker.port)

    assert loop.run(15, until=lambda: live.ready and publisher.connected), (live.last_error, publisher.last_error)
    assert live.connects == 2 and publisher.connects == 2
    publisher.publish("live/after", b"after the restart")
    received = []
    loop.run(10, until=lambda: (received.extend(live.poll(0)), len(received) >= 2)[1])
    assert received == [("live/while-down", b"kept by paho until the broker is back"),
                        ("live/after", b"after the restart")]

    back = MqttTransport(MqttSettings(broker.url, "away-device"), loop)
    back.subscribe("queue/#")
    queued = []
    loop.run(10, until=lambda: (queued.extend(back.poll(0)), len(queued) >= 20)[1])
    assert queued == [(f"queue/{i}", f"queued {i}".encode()) for i in range(20)]
    for transport in (back, live, publisher):
        transport.close()
