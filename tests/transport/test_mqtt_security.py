"""TLS, mutual TLS and username/password against a real Mosquitto configured for each."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport

from .certificates import make_pki


def tls_url(broker) -> str:
    return f"mqtts://127.0.0.1:{broker.port}"


def round_trip(settings_a: MqttSettings, settings_b: MqttSettings) -> list[tuple[str, bytes]]:
    loop = MqttLoop()
    sub, pub = MqttTransport(settings_a, loop), MqttTransport(settings_b, loop)
    sub.subscribe("secure/#")
    assert sub.wait_ready(10), sub.last_error
    assert pub.wait_ready(10), pub.last_error
    pub.publish("secure/x", b"over tls" * 1000)
    received = sub.poll(10)
    sub.close()
    pub.close()
    return received


def test_tls_with_a_private_ca(start_broker, tmp_path):
    pki = make_pki(tmp_path)
    broker = start_broker(f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}")
    settings = [MqttSettings(tls_url(broker), name, ca_file=str(pki["ca.pem"])) for name in ("a", "b")]
    assert round_trip(*settings) == [("secure/x", b"over tls" * 1000)]
    # without the CA the server certificate does not verify: no connection, and the error says why
    untrusting = MqttTransport(MqttSettings(tls_url(broker), "c"))
    assert untrusting.loop.run(5, until=lambda: untrusting.last_error is not None) and not untrusting.connected
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusting.last_error or "")
    untrusting.close()


def test_mutual_tls_needs_a_client_certificate(start_broker, tmp_path):
    pki = make_pki(tmp_path)
    broker = start_broker(f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
                          "require_certificate true\nuse_identity_as_username true")
    with_cert = [MqttSettings(tls_url(broker), name, ca_file=str(pki["ca.pem"]), cert_file=str(pki["client.pem"]),
                              key_file=str(pki["client.key"])) for name in ("a", "b")]
    assert round_trip(*with_cert) == [("secure/x", b"over tls" * 1000)]
    without = MqttTransport(MqttSettings(tls_url(broker), "c", ca_file=str(pki["ca.pem"])))
    assert without.loop.run(5, until=lambda: without.last_error is not None) and not without.connected
    without.close()
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        MqttSettings(tls_url(broker), "d", cert_file=str(pki["client.pem"]))


def test_username_and_password(start_broker, tmp_path):
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):  # as tests/conftest.py
            pytest.fail("CI=true: mosquitto_passwd is missing (it ships with the mosquitto package)")
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    password_file = tmp_path / "passwords"
    subprocess.run([tool, "-b", "-c", str(password_file), "device-1", "s3cret pass"], check=True)
    broker = start_broker(f"allow_anonymous false\npassword_file {password_file}")
    good = [MqttSettings(broker.url, n, username="device-1", password="s3cret pass") for n in ("a", "b")]
    assert round_trip(*good) == [("secure/x", b"over tls" * 1000)]
    in_url = MqttSettings(f"mqtt://device-1:s3cret%20pass@127.0.0.1:{broker.port}", "url-credentials")
    assert round_trip(in_url, good[1]) == [("secure/x", b"over tls" * 1000)]
    assert "s3cret" not in repr(good[0])
    for wrong in (MqttSettings(broker.url, "w", username="device-1", password="guess"),
                  MqttSettings(broker.url, "anonymous")):
        refused = MqttTransport(wrong)
        assert refused.loop.run(5, until=lambda t=refused: t.last_error is not None) and not refused.connected
        assert "refused" in refused.last_error and "authori" in refused.last_error.lower()
        refused.close()
