"""A throwaway PKI for the TLS tests: the pilot PKI of `fleetlearn broker certs` (aggregator/broker/certificates.py).

The tests use the same certificates a pilot deployment gets, so a change there that Mosquitto or
paho would refuse fails the transport tests too.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.broker.certificates import write_pki


def make_pki(directory: Path, client_name: str = "dev-1") -> dict[str, Path]:
    """ca.pem, server.pem/server.key (127.0.0.1, localhost), client.pem/client.key; returns their paths."""
    pki = directory / "pki"
    report = write_pki(pki, "test", [client_name], hosts=("localhost", "127.0.0.1"))
    client = report.devices[client_name]
    return {"ca.pem": report.ca.cert_path, "server.pem": report.server.cert_path,
            "server.key": report.server.key_path, "client.pem": client.cert_path, "client.key": client.key_path}
