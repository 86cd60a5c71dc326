"""firmware_configs/mosquitto/*.conf.template: what `fleetlearn broker mosquitto-config` writes, and Mosquitto runs it.

Each template is filled with the paths of a real PKI (`fleetlearn broker certs`) and of a real
`mosquitto-config` output; its settings must equal the generated file's line for line, and a real
Mosquitto started on a free port with the filled template must let an enrolled device in over TLS
(with its password, or with its certificate) and keep out a wrong password, or a device without
a certificate.
"""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey

from .test_mosquitto_acl import FLEET, MOSQUITTO, Client, free_port, wait_listening

TEMPLATES = Path(__file__).resolve().parents[2] / "firmware_configs" / "mosquitto"
pytestmark = pytest.mark.skipif(not MOSQUITTO.exists(), reason="mosquitto is not installed (apt-get install "
                                "mosquitto)")


def settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def fill(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    assert "@" not in "\n".join(settings(template)), "a placeholder was left unfilled"
    return template


@pytest.fixture
def fleet(tmp_path) -> Path:
    store = tmp_path / "aggregator.sqlite"
    with open_store(store) as s:
        s.enrol("pi-a", IdentityKey.generate().public, now=1.0)
    assert main(["broker", "certs", "--out", str(tmp_path / "pki"), "--fleet", FLEET, "--store", str(store)]) == 0
    return tmp_path


def generate(root: Path, port: int, user: str, *extra: str) -> tuple[Path, dict[str, str]]:
    pki, out = root / "pki", root / "broker"
    assert main(["broker", "mosquitto-config", "--out", str(out), "--fleet", FLEET, "--store",
                 str(root / "aggregator.sqlite"), "--port", str(port), "--bind", "127.0.0.1", "--run-as", user,
                 "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "server.pem"), "--tls-key",
                 str(pki / "server.key"), *extra]) == 0
    values = {"CONFIG_DIR": str(out.resolve()), "CA": str((pki / "ca.pem").resolve()),
              "CERT": str((pki / "server.pem").resolve()), "KEY": str((pki / "server.key").resolve()),
              "CRL": str((pki / "crl.pem").resolve()), "USER": user, "PORT": str(port), "BIND": "127.0.0.1"}
    return out, values


def start(path: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([str(MOSQUITTO), "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(process, port)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process


def refused(port: int, **kwargs) -> bool:
    """A connection with these credentials gets a refusing CONNACK."""
    client = Client(port, **kwargs)
    client.client.disconnect()
    client.client.loop_stop()
    return client.reason != 0


def handshake_refused(port: int, ca: str) -> bool:
    """A TLS client without a certificate: the broker ends the handshake (or the connection) at once."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04nope")  # CONNECT, 3.1.1
                return tls.recv(4) == b""  # no CONNACK
        except (ssl.SSLError, ConnectionError):
            return True


@pytest.mark.slow
def test_the_passwords_template_is_what_the_command_writes_and_mosquitto_runs_it(fleet):
    port, user = free_port(), pwd.getpwuid(os.geteuid()).pw_name
    out, values = generate(fleet, port, user)
    filled = fill((TEMPLATES / "mosquitto-tls-passwords.conf.template").read_text(), values)
    assert settings(filled) == settings((out / "mosquitto.conf").read_text())
    path = fleet / "from-template.conf"
    path.write_text(filled)
    process = start(path, port)
    try:
        ca = str(fleet / "pki" / "ca.pem")
        password = (out / "secrets" / "pi-a").read_text().strip()
        device = Client(port, "pi-a", password, tls=(ca, None, None))
        assert device.reason == 0
        device.client.disconnect()
        device.client.loop_stop()
        assert refused(port, user="pi-a", password="wrong", tls=(ca, None, None))
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.slow
def test_the_client_certs_template_is_what_the_command_writes_and_mosquitto_runs_it(fleet):
    port, user = free_port(), pwd.getpwuid(os.geteuid()).pw_name
    out, values = generate(fleet, port, user, "--client-certs")
    filled = fill((TEMPLATES / "mosquitto-client-certs.conf.template").read_text(), values)
    assert settings(filled) == settings((out / "mosquitto.conf").read_text())
    path = fleet / "from-template.conf"
    path.write_text(filled)
    process = start(path, port)
    try:
        pki = fleet / "pki"
        device = Client(port, None, None, tls=(str(pki / "ca.pem"), str(pki / "devices" / "pi-a.pem"),
                                               str(pki / "devices" / "pi-a.key")))
        assert device.reason == 0
        device.client.disconnect()
        device.client.loop_stop()
        assert handshake_refused(port, str(pki / "ca.pem"))
    finally:
        process.terminate()
        process.wait(10)
