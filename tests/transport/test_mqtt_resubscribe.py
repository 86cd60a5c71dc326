"""A subscription the broker refuses in its SUBACK is made again with backoff until the broker grants it.

Why: NATS answers a SUBACK with 0x80 when creating the subscription's JetStream consumer times out on
a loaded cluster (seen in the sharding acceptance test: "Unable to add JetStream consumer for
subscription ... timeout"); a device that silently lacked its ``plan`` or ``down`` subscription
would never take part again until it reconnected. Mosquitto never refuses (an ACL-denied pattern is
granted and delivers nothing), so a real nats-server refuses here by its documented session limit:
the subscriptions' ``max_ack_pending`` may total at most 65535, so with 40000 the second one is
refused. Lowering it to 20000 and reloading (SIGHUP; a new subscription takes the new value) lets
the same connection's next try through.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import pytest

from edge_sdk.transport.mqtt import MqttSettings, MqttTransport, ReconnectBackoff
from transport.mosquitto_process import free_port

NATS_SERVER = shutil.which("nats-server")
FAST = ReconnectBackoff(initial_s=0.2, maximum_s=1.0, jitter=0.0)
pytestmark = pytest.mark.slow


def _config(tmp_path, port: int, max_ack_pending: int) -> str:
    return "\n".join(["server_name: resubscribe", "listen: 127.0.0.1:-1", f"log_file: \"{tmp_path}/nats.log\"",
                      f"jetstream {{ store_dir: \"{tmp_path}/js\" }}",
                      f"mqtt {{ listen: 127.0.0.1:{port}, max_ack_pending: {max_ack_pending} }}", ""])


@pytest.fixture
def nats(tmp_path):
    if not NATS_SERVER:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    port, conf = free_port(), tmp_path / "nats.conf"
    conf.write_text(_config(tmp_path, port, 40000))
    process = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield process, conf, port
    finally:
        process.terminate()
        process.wait(10)


def test_a_refused_subscription_is_retried_until_the_broker_grants_it(nats, tmp_path):
    process, conf, port = nats
    url = f"mqtt://127.0.0.1:{port}"
    subscriber = MqttTransport(MqttSettings(url, "subscriber", backoff=FAST))
    publisher = MqttTransport(MqttSettings(url, "publisher", backoff=FAST))
    try:
        subscriber.subscribe("first/x")
        subscriber.subscribe("second/x")
        deadline = time.monotonic() + 20
        while "refused" not in (subscriber.last_error or "") and time.monotonic() < deadline:
            subscriber.poll(0.1)
        assert "refused a subscription" in (subscriber.last_error or ""), subscriber.last_error
        assert not subscriber.ready  # a refused pattern delivers nothing: not ready
        subscriber.poll(1.5)  # retried at least once, refused again while the limit holds
        assert not subscriber.ready

        conf.write_text(_config(tmp_path, port, 20000))
        process.send_signal(signal.SIGHUP)
        assert subscriber.wait_ready(20), subscriber.last_error
        assert publisher.wait_ready(20), publisher.last_error
        publisher.publish("second/x", b"granted at last")
        publisher.publish("first/x", b"granted at once")
        assert publisher.flush(10)  # its own loop: run it until the broker has both
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 20
        while len(received) < 2 and time.monotonic() < deadline:
            received += subscriber.poll(0.2)
        assert sorted(received) == [("first/x", b"granted at once"), ("second/x", b"granted at last")]
        assert subscriber.connects == 1  # the same connection: made again without reconnecting
    finally:
        subscriber.close()
        publisher.close()
