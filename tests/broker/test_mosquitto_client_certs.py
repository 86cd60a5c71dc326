"""--client-certs: TLS with a client certificate whose CN is the device id, run by a real Mosquitto.

The certificate, not a password, names the broker user, so the per-device ACL applies to whoever
holds the device's key: pi-a's certificate cannot publish as pi-b.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from aggregator.broker.certificates import issue_client, issue_server, load_or_create_ca
from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey

from .test_mosquitto_acl import BASE, FLEET, MOSQUITTO, Client, free_port, wait_listening


class Pki:
    """A private CA, the broker's certificate for 127.0.0.1, and client certificates by common name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = load_or_create_ca(directory, FLEET)[0]
        self.ca_path = directory / "ca.pem"
        server = issue_server(directory, self.ca, ["localhost", "127.0.0.1"])
        self.server = (str(server.cert_path), str(server.key_path))

    def issue(self, common_name: str) -> tuple[str, str]:
        issued = issue_client(self.directory, self.ca, common_name, common_name)
        return str(issued.cert_path), str(issued.key_path)


@pytest.mark.skipif(not MOSQUITTO.exists(), reason="mosquitto is not installed (apt-get install mosquitto)")
def test_a_device_certificate_speaks_only_for_its_own_id(tmp_path):
    pki = Pki(tmp_path)
    store_path = tmp_path / "s.sqlite"
    with open_store(store_path) as store:
        store.enrol("pi-a", IdentityKey.generate().public, now=1.0)
        store.enrol("pi-b", IdentityKey.generate().public, now=1.0)
    out, port = tmp_path / "broker", free_port()
    assert main(["broker", "mosquitto-config", "--out", str(out), "--fleet", FLEET, "--store", str(store_path),
                 "--port", str(port), "--bind", "127.0.0.1", "--run-as", "root", "--client-certs",
                 "--tls-ca", str(pki.ca_path), "--tls-cert", pki.server[0], "--tls-key", pki.server[1]]) == 0
    assert not (out / "passwords").exists()
    process = subprocess.Popen([str(MOSQUITTO), "-c", str(out / "mosquitto.conf")], stderr=subprocess.PIPE)
    clients = []
    try:
        wait_listening(process, port)
        ca = str(pki.ca_path)
        aggregator = Client(port, None, None, tls=(ca, *pki.issue("fleetlearn-aggregator")))
        pi_a = Client(port, None, None, tls=(ca, *pki.issue("pi-a")))
        clients += [aggregator, pi_a]
        assert aggregator.reason == 0 and pi_a.reason == 0
        aggregator.subscribe(f"{BASE}/up/#")
        pi_a.publish(f"{BASE}/up/pi-a/advertise", b"own")
        pi_a.publish(f"{BASE}/up/pi-b/advertise", b"forged")
        pi_a.publish(f"{BASE}/up/pi-a/masked", b"marker")
        assert [p for _, p in aggregator.until(b"marker")] == [b"own", b"marker"]
        anonymous = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="no-cert")
        anonymous.tls_set(ca_certs=ca)
        try:  # without a client certificate the handshake fails, at connect or in the first loops
            anonymous.connect("127.0.0.1", port)
            for _ in range(20):
                anonymous.loop(0.1)
        except (ssl.SSLError, OSError):
            pass
        assert not anonymous.is_connected()
    finally:
        for client in clients:
            client.close()
        process.terminate()
        process.wait(10)
        process.stderr.close()
