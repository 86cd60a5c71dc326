"""`fleetlearn broker certs`: the files it writes, checked with cryptography, and what it refuses.

Chains are verified by cryptography's RFC 5280 verifier (``x509.verification``) for the broker's
certificate and by signature for client certificates; a rerun must leave every byte of every key
and certificate as it was, and a revocation must stay on the CRL across reruns.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey

FLEET = "digits"


def certs(out: Path, *args: str) -> int:
    return main(["broker", "certs", "--out", str(out), "--fleet", FLEET, *args])


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def public(key_or_cert) -> bytes:
    key = key_or_cert.public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def store_path(tmp_path) -> Path:
    path = tmp_path / "aggregator.sqlite"
    with open_store(path) as store:
        for i, device in enumerate(("pi-a", "pi-b", "pi-c")):
            store.enrol(device, IdentityKey.generate().public, now=float(i))
        store.revoke("pi-c", now=5.0, reason="lost")
    return path


def test_every_certificate_chains_to_the_ca_with_its_names_and_usages(tmp_path, store_path, capsys):
    out = tmp_path / "pki"
    assert certs(out, "--store", str(store_path), "--broker-host", "broker.example", "--broker-host", "10.0.0.5",
                 "--days", "30") == 0
    assert "2 device certificate(s) (2 new)" in capsys.readouterr().out
    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature

    server = load(out / "server.pem")
    now = datetime.datetime.now(datetime.UTC)
    store = verification.Store([ca])
    verifier = verification.PolicyBuilder().store(store).time(now).build_server_verifier(
        x509.DNSName("broker.example"))
    assert verifier.verify(server, []) == [server, ca]
    ip_verifier = verification.PolicyBuilder().store(store).time(now).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")))
    assert ip_verifier.verify(server, [])[-1] == ca
    with pytest.raises(verification.VerificationError):
        verification.PolicyBuilder().store(store).time(now).build_server_verifier(
            x509.DNSName("localhost")).verify(server, [])  # only the hosts given
    assert cn(server) == "broker.example"
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert server.not_valid_after_utc - server.not_valid_before_utc < datetime.timedelta(days=31)

    clients = {"fleetlearn-aggregator": out / "aggregator.pem", "pi-a": out / "devices" / "pi-a.pem",
               "pi-b": out / "devices" / "pi-b.pem"}
    for name, path in clients.items():
        cert = load(path)
        cert.verify_directly_issued_by(ca)
        assert cn(cert) == name
        assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH])
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_cert_sign
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        key_path = path.with_suffix(".key")
        assert key_path.stat().st_mode & 0o777 == 0o600
        assert public(serialization.load_pem_private_key(key_path.read_bytes(), None)) == public(cert)
    for key in ("ca.key", "server.key"):
        assert (out / key).stat().st_mode & 0o777 == 0o600
    assert not (out / "devices" / "pi-c.pem").exists()  # revoked before it was ever certified
    serials = {cert.serial_number for cert in map(load, clients.values())}
    assert len(serials) == 3

    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0


def test_a_rerun_keeps_every_file_and_a_revocation_stays_on_the_crl(tmp_path, store_path, capsys):
    out = tmp_path / "pki"
    assert certs(out, "--store", str(store_path)) == 0
    before = snapshot(out)
    assert certs(out, "--store", str(store_path)) == 0
    after = snapshot(out)
    del before["crl.pem"], after["crl.pem"]  # the CRL alone is re-signed each run
    assert after == before

    with open_store(store_path) as store:
        store.revoke("pi-b", now=9.0, reason="stolen")
        store.enrol("pi-d", IdentityKey.generate().public, now=10.0)
    capsys.readouterr()
    assert certs(out, "--store", str(store_path)) == 0
    assert "2 device certificate(s) (1 new), 1 revoked" in capsys.readouterr().out
    ca = load(out / "ca.pem")
    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    pi_b = load(out / "devices" / "pi-b.pem")
    assert crl.is_signature_valid(ca.public_key())
    assert [entry.serial_number for entry in crl] == [pi_b.serial_number]
    assert crl.get_revoked_certificate_by_serial_number(load(out / "devices" / "pi-a.pem").serial_number) is None
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    for name, data in before.items():  # pi-b's files too: revoked, not deleted
        assert (out / name).read_bytes() == data

    # A rerun from a list that no longer names pi-b never drops it from the CRL.
    assert certs(out, "--device", "pi-a", "--device", "pi-d") == 0
    crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
    assert [entry.serial_number for entry in crl] == [pi_b.serial_number]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1


def refused(capsys, code: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    # the command's own checks say "fleetlearn broker: error:", argparse's "fleetlearn broker certs: error:"
    assert err.startswith(("fleetlearn broker: error: ", "fleetlearn broker certs: error: ")), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_refusals_are_one_line_and_change_nothing(tmp_path, store_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(capsys, certs(foreign, "--device", "pi-a"), "holds other files")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    refused(capsys, certs(tmp_path / "new", "--store", str(tmp_path / "none.sqlite")), "no store there")
    refused(capsys, certs(tmp_path / "new", "--device", "pi/a"), "pi/a")
    refused(capsys, certs(tmp_path / "new", "--device", "fleetlearn-aggregator"), "aggregator's broker user")
    refused(capsys, certs(tmp_path / "new", "--device", "pi-a", "--revoke", "pi-a"), "both")
    refused(capsys, certs(tmp_path / "new", "--device", "pi-a", "--broker-host", "not a host"), "--broker-host")
    refused(capsys, certs(tmp_path / "new", "--device", "pi-a", "--days", "0"), "--days")
    refused(capsys, certs(tmp_path / "new", "--device", "pi-a", "--store", str(store_path)), "not allowed with")
    refused(capsys, certs(tmp_path / "new", "--store", str(store_path), "--revoke", "pi-a"),
            "active in --store", "fleetlearn aggregator revoke")
    assert not (tmp_path / "new").exists()

    out = tmp_path / "pki"
    assert certs(out, "--device", "pi-a", "--device", "pi-b") == 0
    capsys.readouterr()
    devices = out / "devices"
    a_key, b_key = (devices / "pi-a.key").read_bytes(), (devices / "pi-b.key").read_bytes()
    (devices / "pi-a.key").write_bytes(b_key)  # a key that does not belong to its certificate
    before = snapshot(out)
    refused(capsys, certs(out, "--device", "pi-a"), f"{devices / 'pi-a.pem'} does not match its key")
    assert snapshot(out) == before
    (devices / "pi-a.key").write_bytes(a_key)

    (devices / "pi-b.key").unlink()  # a certificate whose key is gone is not silently rekeyed
    refused(capsys, certs(out, "--device", "pi-b"), f"{devices / 'pi-b.pem'} exists but its key")
    assert not (devices / "pi-b.key").exists()

    other = tmp_path / "other"
    assert certs(other, "--device", "pi-b") == 0
    capsys.readouterr()
    for suffix in (".pem", ".key"):  # pi-b's certificate from another fleet's CA
        (devices / f"pi-b{suffix}").write_bytes((other / "devices" / f"pi-b{suffix}").read_bytes())
    (devices / "pi-b.key").chmod(0o600)
    refused(capsys, certs(out, "--device", "pi-b"), f"{devices / 'pi-b.pem'} was not issued by this CA")

    refused(capsys, certs(out, "--device", "pi-a", "--broker-host", "mqtt.example"),
            f"{out / 'server.pem'} does not name mqtt.example")
    (devices / "pi-a.key").chmod(0o644)
    refused(capsys, certs(out, "--device", "pi-a"), "readable by others")
