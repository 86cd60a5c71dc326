"""Confinement under TLS + client certificates + the generated ACL, all from the commands, in a real Mosquitto.

`fleetlearn broker certs --store` makes the PKI, `fleetlearn broker mosquitto-config --client-certs`
the configuration, and a real Mosquitto (MosquittoBroker) runs it; every client is a real paho
connection holding certificates the command wrote. Proof of a refused publish is by order: the
forbidden message is published (and acknowledged by the broker, which routes a message before it
acknowledges it) before an allowed marker, so once the marker has arrived the forbidden one would have.
"""

from __future__ import annotations

import os
import pwd
import signal
import ssl
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker, free_port

from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey

from .test_mosquitto_acl import BASE, FLEET, Client

AGGREGATOR = "fleetlearn-aggregator"


class Fleet:
    """The store, the PKI and the broker configuration on disk, and the Mosquitto running it."""

    def __init__(self, root: Path) -> None:
        self.root, self.store, self.pki, self.conf_dir = root, root / "aggregator.sqlite", root / "pki", root / "broker"
        with open_store(self.store) as store:
            for i, device in enumerate(("pi-a", "pi-b")):
                store.enrol(device, IdentityKey.generate().public, now=float(i))
        self.port = free_port()
        self.generate()
        self.broker = MosquittoBroker(root, port=self.port)
        self.clients: list[Client] = []

    def generate(self) -> None:
        """What an operator runs after enrolling or revoking: both commands, in this order."""
        assert main(["broker", "certs", "--out", str(self.pki), "--fleet", FLEET, "--store", str(self.store)]) == 0
        assert main(["broker", "mosquitto-config", "--out", str(self.conf_dir), "--fleet", FLEET, "--store",
                     str(self.store), "--port", str(self.port), "--bind", "127.0.0.1", "--client-certs",
                     "--run-as", pwd.getpwuid(os.geteuid()).pw_name, "--tls-ca", str(self.pki / "ca.pem"),
                     "--tls-cert", str(self.pki / "server.pem"), "--tls-key", str(self.pki / "server.key")]) == 0

    def start(self) -> None:
        # the generated configuration as it is, plus a log file for the test to read
        conf = (self.conf_dir / "mosquitto.conf").read_text()
        self.broker.config_path.write_text(
            conf + f"log_dest file {self.broker.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n")
        self.broker.start()

    def tls(self, name: str, pki: Path | None = None) -> tuple[str, str, str]:
        pki = pki or self.pki
        stem = pki / "aggregator" if name == AGGREGATOR else pki / "devices" / name
        return str(self.pki / "ca.pem"), f"{stem}.pem", f"{stem}.key"

    def connect(self, name: str) -> Client:
        client = Client(self.port, None, None, tls=self.tls(name))
        self.clients.append(client)
        assert client.reason == 0, client.reason
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.broker.stop()


def handshake(port: int, ca: str, cert: str | None = None, key: str | None = None) -> bool:
    """Whether a TLS client (with this certificate, or none) gets a successful CONNACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    reasons = []
    client.on_connect = lambda c, u, f, reason, p: reasons.append(reason)
    try:
        client.connect("127.0.0.1", port)
        deadline = time.monotonic() + 5
        while not reasons and time.monotonic() < deadline:
            if client.loop(0.05) != paho.MQTT_ERR_SUCCESS:
                break
    except (ssl.SSLError, OSError):
        return False
    finally:
        client.disconnect()
    return bool(reasons) and reasons[0] == 0


@pytest.fixture
def fleet(tmp_path):
    if not MOSQUITTO:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    fleet = Fleet(tmp_path)
    fleet.start()
    yield fleet
    fleet.close()


def test_a_device_cannot_publish_on_another_devices_uplink(fleet):
    aggregator = fleet.connect(AGGREGATOR)
    aggregator.subscribe(f"{BASE}/up/#", f"{BASE}/status/#")
    pi_a = fleet.connect("pi-a")
    pi_a.publish(f"{BASE}/up/pi-b/advertise", b"forged as pi-b")
    pi_a.publish(f"{BASE}/up/pi-b/ready", b"forged ready")
    pi_a.publish(f"{BASE}/status/pi-b", b"forged offline")
    pi_a.publish(f"{BASE}/up/pi-a/advertise", b"marker")
    assert aggregator.until(b"marker") == [(f"{BASE}/up/pi-a/advertise", b"marker")]


def test_a_device_cannot_read_another_devices_downlink(fleet):
    aggregator = fleet.connect(AGGREGATOR)
    pi_a = fleet.connect("pi-a")
    pi_a.subscribe(f"{BASE}/down/pi-b", f"{BASE}/down/#", f"{BASE}/#", "#")
    aggregator.publish(f"{BASE}/down/pi-b", b"for pi-b only")
    aggregator.publish(f"{BASE}/down/pi-a", b"marker")
    assert pi_a.until(b"marker") == [(f"{BASE}/down/pi-a", b"marker")]


def test_no_certificate_or_another_cas_certificate_cannot_connect(fleet, tmp_path):
    ca = fleet.tls("pi-a")[0]
    assert handshake(fleet.port, *fleet.tls("pi-a"))  # the control: pi-a's own certificate works
    assert not handshake(fleet.port, ca)  # TLS without a client certificate
    other = tmp_path / "other-pki"  # the same fleet and device id, another CA
    assert main(["broker", "certs", "--out", str(other), "--fleet", FLEET, "--device", "pi-a"]) == 0
    assert not handshake(fleet.port, ca, str(other / "devices" / "pi-a.pem"), str(other / "devices" / "pi-a.key"))
    plain = paho.Client(CallbackAPIVersion.VERSION2, client_id="plain")  # no TLS at all
    reasons = []
    plain.on_connect = lambda c, u, f, reason, p: reasons.append(reason)
    plain.connect("127.0.0.1", fleet.port)
    deadline = time.monotonic() + 3
    while not reasons and time.monotonic() < deadline and plain.loop(0.05) == paho.MQTT_ERR_SUCCESS:
        pass
    assert not reasons or reasons[0] != 0
    assert fleet.broker.log().count("certificate verify failed") >= 1


def test_a_revoked_devices_certificate_is_refused_after_sighup_and_after_a_sigkill_restart(fleet):
    conf = (fleet.conf_dir / "mosquitto.conf").read_text()
    assert f"crlfile {(fleet.pki / 'crl.pem').resolve()}\n" in conf  # found beside --tls-ca
    aggregator = fleet.connect(AGGREGATOR)
    aggregator.subscribe(f"{BASE}/up/#")
    pi_b = fleet.connect("pi-b")  # connected before the revocation
    pi_a = fleet.connect("pi-a")
    assert main(["aggregator", "revoke", "--store", str(fleet.store), "--device", "pi-b", "--reason", "stolen"]) == 0
    fleet.generate()
    assert "pi-b" not in (fleet.conf_dir / "acl").read_text()
    # Without a reload the broker still holds the old CRL (Mosquitto reads crlfile when it loads its config).
    assert handshake(fleet.port, *fleet.tls("pi-b"))
    fleet.broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while handshake(fleet.port, *fleet.tls("pi-b")):
        assert time.monotonic() < deadline, "the revoked certificate was still accepted 10 s after SIGHUP"
        time.sleep(0.2)
    assert handshake(fleet.port, *fleet.tls("pi-a"))
    # pi-b's connection from before the revocation: the reloaded ACL has no lines for it any more.
    pi_b.publish(f"{BASE}/up/pi-b/advertise", b"revoked but still connected")
    pi_a.publish(f"{BASE}/up/pi-a/advertise", b"marker")
    assert aggregator.until(b"marker") == [(f"{BASE}/up/pi-a/advertise", b"marker")]

    fleet.broker.kill()  # SIGKILL, then a cold start from the same configuration
    fleet.broker.start()
    assert not handshake(fleet.port, *fleet.tls("pi-b"))
    assert handshake(fleet.port, *fleet.tls("pi-a"))
    assert handshake(fleet.port, *fleet.tls(AGGREGATOR))
