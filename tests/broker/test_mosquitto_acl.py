"""The generated Mosquitto configuration, run by a real Mosquitto: each device speaks and hears only for itself.

Proof of a refused publish is by order: the forbidden message is published before an allowed
marker on the same connection (QoS 1 keeps a client's order), so once the marker has arrived the
forbidden one would have too.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey

MOSQUITTO = Path("/usr/sbin/mosquitto")
FLEET = "digits"
BASE = f"fleetlearn/v1/{FLEET}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(process: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.02)


class Client:
    """One real paho connection as ``user``, collecting what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None,
                 tls: tuple[str, str, str] | None = None) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue[object] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=user or f"tls-{id(self)}")
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls is not None:
            self.client.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2])
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, m.payload))
        self.client.on_connect = lambda c, u, f, reason, p: self.connected.put(reason)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.reason = self.connected.get(timeout=10)

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            _, mid = self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def until(self, marker: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``marker``."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            topic, payload = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            got.append((topic, payload))
            if payload == marker:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    if not MOSQUITTO.exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    store_path = tmp_path / "aggregator.sqlite"
    with open_store(store_path) as store:
        for i, device in enumerate(("pi-a", "pi-b", "pi-c")):
            store.enrol(device, IdentityKey.generate().public, now=float(i))
        store.revoke("pi-c", now=5.0, reason="lost")
    out, port = tmp_path / "broker", free_port()
    code = main(["broker", "mosquitto-config", "--out", str(out), "--fleet", FLEET, "--store", str(store_path),
                 "--port", str(port), "--bind", "127.0.0.1", "--run-as", "root"])
    assert code == 0
    process = subprocess.Popen([str(MOSQUITTO), "-c", str(out / "mosquitto.conf")], stderr=subprocess.PIPE)
    wait_listening(process, port)
    clients: list[Client] = []

    def connect(user: str, password: str | None = None) -> Client:
        secret = password if password is not None else (out / "secrets" / user).read_text().strip()
        client = Client(port, user, secret)
        clients.append(client)
        return client

    yield connect, out
    for client in clients:
        client.close()
    process.terminate()
    process.wait(10)
    process.stderr.close()


def test_a_device_publishes_only_on_its_own_uplink(broker):
    connect, _ = broker
    aggregator = connect("fleetlearn-aggregator")
    aggregator.subscribe(f"{BASE}/up/#", f"{BASE}/status/#")
    pi_a = connect("pi-a")
    pi_a.publish(f"{BASE}/up/pi-a/advertise", b"own uplink")
    pi_a.publish(f"{BASE}/up/pi-b/advertise", b"forged as pi-b")
    pi_a.publish(f"{BASE}/plan", b"forged plan")
    pi_a.publish(f"{BASE}/status/pi-b", b"offline")
    pi_a.publish(f"{BASE}/up/pi-a/masked", b"marker")
    got = aggregator.until(b"marker")
    assert got == [(f"{BASE}/up/pi-a/advertise", b"own uplink"), (f"{BASE}/up/pi-a/masked", b"marker")]


def test_a_device_reads_only_its_own_downlink_and_the_broadcasts(broker):
    connect, _ = broker
    aggregator = connect("fleetlearn-aggregator")
    pi_b = connect("pi-b")
    pi_b.subscribe(f"{BASE}/down/pi-a", f"{BASE}/down/pi-b", f"{BASE}/down/#", f"{BASE}/up/#", f"{BASE}/plan",
                   f"{BASE}/model/+")
    pi_a = connect("pi-a")
    pi_a.publish(f"{BASE}/up/pi-a/advertise", b"pi-a's uplink")
    aggregator.publish(f"{BASE}/down/pi-a", b"for pi-a only")
    aggregator.publish(f"{BASE}/plan", b"signed plan")
    aggregator.publish(f"{BASE}/model/0", b"model chunk 0")
    aggregator.publish(f"{BASE}/down/pi-b", b"marker")
    got = pi_b.until(b"marker")
    assert got == [(f"{BASE}/plan", b"signed plan"), (f"{BASE}/model/0", b"model chunk 0"),
                   (f"{BASE}/down/pi-b", b"marker")]


def test_revoked_unknown_and_wrong_password_users_cannot_connect(broker):
    connect, out = broker
    assert connect("pi-a").reason == 0
    assert not (out / "secrets" / "pi-c").exists()  # revoked before the config was written
    assert connect("pi-c", "anything").reason != 0
    assert connect("pi-z", "anything").reason != 0
    assert connect("pi-b", "wrong password").reason != 0
    assert "pi-c" not in (out / "acl").read_text()


def test_rerunning_keeps_passwords_and_refuses_a_foreign_directory(tmp_path, capsys):
    store_path = tmp_path / "s.sqlite"
    with open_store(store_path) as store:
        store.enrol("pi-a", IdentityKey.generate().public, now=1.0)
    args = ["broker", "mosquitto-config", "--fleet", FLEET, "--store", str(store_path), "--port", "18830"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    password = (tmp_path / "b" / "secrets" / "pi-a").read_text()
    assert (tmp_path / "b" / "secrets" / "pi-a").stat().st_mode & 0o777 == 0o600
    with open_store(store_path) as store:
        store.enrol("pi-b", IdentityKey.generate().public, now=2.0)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "secrets" / "pi-a").read_text() == password
    assert "user pi-b" in (tmp_path / "b" / "acl").read_text()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other files" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main([*args, "--out", str(tmp_path / "c"), "--tls-ca", "missing.pem"]) == 2
    assert "missing --tls-cert, --tls-key" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
