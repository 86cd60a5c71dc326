"""A pilot PKI for one fleet's broker: a CA, the broker's server certificate, client certificates, a CRL.

Why here: with ``mosquitto-config --client-certs`` the certificate's CN is the broker user, so the
per-device ACL binds to whoever holds the device's key. This module makes those certificates for a
pilot (production users bring their own PKI): ECDSA P-256 keys (what every OpenSSL and Mosquitto
accept for TLS client authentication), SHA-256 signatures, built with ``cryptography``'s x509
builders only.

Files are never overwritten. Each key (0600) and certificate is written atomically once; a rerun
reuses them and only issues what is missing, so a device keeps its certificate across reruns. An
existing certificate is checked against its key, the CA and the asked names, and a mismatch is an
error naming the file. The CRL is the one file rewritten on every run (atomically): it lists the
certificates of revoked devices and keeps every entry an earlier CRL held, so a revocation is
never undone by a rerun. Mosquitto checks it (``crlfile``) on every TLS handshake.

Layout of the directory::

    ca.pem ca.key                    the fleet's CA
    server.pem server.key            the broker (SANs: the given host names and IP addresses)
    aggregator.pem aggregator.key    the aggregator's client certificate (CN = its broker user)
    devices/<id>.pem devices/<id>.key  one client certificate per device (CN = device id)
    crl.pem                          the revoked devices' certificates
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.broker.mosquitto_config import AGGREGATOR_USER, CRL_FILE, BrokerConfigError, _check_acl_id
from edge_sdk.device.state_dir import write_new_file

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
AGGREGATOR_CERT, AGGREGATOR_KEY, DEVICES_DIR = "aggregator.pem", "aggregator.key", "devices"
DEFAULT_DAYS = 365
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a device clock a little behind the host's


class CertificateError(BrokerConfigError):
    """A certificate cannot be issued as asked, or a file already there does not fit (named in the message)."""


@dataclass(frozen=True)
class Authority:
    """The fleet's CA: its certificate and the key that signs every other certificate and the CRL."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate and key on disk, and whether this run created the certificate."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    new: bool


@dataclass(frozen=True)
class PkiReport:
    """What a run produced: every certificate, and which devices' certificates the CRL lists."""

    ca: Issued
    server: Issued
    aggregator: Issued
    devices: dict[str, Issued]
    crl_path: Path
    revoked: tuple[str, ...]  # revoked ids whose certificate this run put (or kept) on the CRL
    revoked_without_certificate: tuple[str, ...]  # revoked ids that never had a certificate here


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _write_text_once(path: Path, data: bytes, mode: int) -> None:
    write_new_file(path, data)  # atomic, 0600, refuses to replace
    os.chmod(path, mode)


def _load_or_create_key(path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    if not path.exists() and cert_path.exists():
        raise CertificateError(f"{cert_path} exists but its key {path} does not; move the certificate away to "
                               "reissue it with a new key")
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"{path} is not an unencrypted PEM private key ({exc}); move it away") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{path} is not an EC private key; move it away to have a P-256 key made")
        if path.stat().st_mode & 0o077:
            raise CertificateError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_new_file(path, pem)
    return key, True


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM certificate ({exc}); move it away") from None


def _public_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_existing(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, common_name: str | None,
                    ca: Authority | None) -> None:
    """An existing certificate must belong to its key, name the subject, come from the CA and be valid now.

    ``common_name`` None: the broker's, which is checked by its SANs instead (clients match those, not the CN).
    """
    if _public_bytes(cert.public_key()) != _public_bytes(key.public_key()):
        raise CertificateError(f"{path} does not match its key {path.with_suffix('.key')}; move both away to reissue")
    if common_name is not None and _common_name(cert) != common_name:
        raise CertificateError(f"{path} is for CN {_common_name(cert)!r}, not {common_name!r}; move it away")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateError(f"{path} was not issued by this CA ({ca.cert.subject.rfc4514_string()}); "
                                   "move it and its key away to reissue") from None
    if cert.not_valid_after_utc <= _now():
        raise CertificateError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; move it and its key away "
                               "to reissue")


def _builder(subject: str, public_key, issuer: x509.Name, days: int) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_text_once(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_or_create_ca(directory: Path, fleet: str, days: int = DEFAULT_DAYS) -> tuple[Authority, Issued]:
    """The fleet's CA in ``directory``: made on first use (self-signed, CA:TRUE, pathlen 0), then reused."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    key, _ = _load_or_create_key(key_path, cert_path)
    common_name = f"fleetlearn {fleet} pilot CA"
    if cert_path.exists():
        cert = _load_cert(cert_path)
        _check_existing(cert_path, cert, key, common_name, None)
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not basic.ca:
            raise CertificateError(f"{cert_path} is not a CA certificate; move it away")
        return Authority(cert, key), Issued(cert_path, key_path, cert, False)
    cert = (_builder(common_name, key.public_key(), _name(common_name), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .sign(key, hashes.SHA256()))
    _write_cert(cert_path, cert)
    log.info("created the CA %s", cert_path)
    return Authority(cert, key), Issued(cert_path, key_path, cert, True)


def parse_host(text: str) -> x509.GeneralName:
    """A host name for the server certificate's SANs: an IP address, or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or any(not label or len(label) > 63 or not all(c.isalnum() or c in "-*" for c in label)
                       for label in labels):
        raise CertificateError(f"--broker-host {text!r} is neither an IP address nor a DNS name")
    return x509.DNSName(text)


def _issue(directory: Path, stem: str, common_name: str, ca: Authority, days: int, *, server_hosts=None) -> Issued:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key, _ = _load_or_create_key(key_path, cert_path)
    sans = [parse_host(h) for h in server_hosts] if server_hosts is not None else None
    if cert_path.exists():
        cert = _load_cert(cert_path)
        _check_existing(cert_path, cert, key, None if sans is not None else common_name, ca)
        if sans is not None:
            have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            missing = [h for h, name in zip(server_hosts, sans, strict=True) if name not in have]
            if missing:
                raise CertificateError(f"{cert_path} does not name {', '.join(missing)}; move it and its key away "
                                       "to reissue it for the hosts given")
        return Issued(cert_path, key_path, cert, False)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if sans is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, key.public_key(), ca.cert.subject, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_usage(digital_signature=True), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    _write_cert(cert_path, cert)
    log.info("issued %s (CN %s)", cert_path, common_name)
    return Issued(cert_path, key_path, cert, True)


def issue_server(directory: Path, ca: Authority, hosts: Sequence[str], days: int = DEFAULT_DAYS) -> Issued:
    """The broker's certificate: CN = the first host, every host in the SANs, serverAuth."""
    if not hosts:
        raise CertificateError("the broker certificate needs at least one --broker-host")
    return _issue(directory, "server", hosts[0], ca, days, server_hosts=list(hosts))


def issue_client(directory: Path, ca: Authority, common_name: str, stem: str, days: int = DEFAULT_DAYS) -> Issued:
    """A client certificate (clientAuth) whose CN is the broker user: a device id or the aggregator's user."""
    return _issue(directory, stem, common_name, ca, days)


def _previous_crl_entries(path: Path, ca: Authority) -> tuple[list[x509.RevokedCertificate], int]:
    if not path.exists():
        return [], 0
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{path} is not a PEM CRL ({exc}); move it away (its revocations will be lost)") \
            from None
    if not crl.is_signature_valid(ca.key.public_key()):
        raise CertificateError(f"{path} was not signed by this CA; move it away")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return list(crl), number


def write_crl(path: Path, ca: Authority, revoked: Sequence[x509.Certificate],
              days: int = DEFAULT_DAYS) -> x509.CertificateRevocationList:
    """The CRL: every entry of the CRL already at ``path`` plus ``revoked``; CRL number + 1; replaced atomically.

    Its nextUpdate is ``days`` away: OpenSSL, and so Mosquitto, refuses every client once it has passed,
    so rerun the command well before then.
    """
    entries, number = _previous_crl_entries(path, ca)
    known = {entry.serial_number for entry in entries}
    now = _now()
    for cert in revoked:
        if cert.serial_number not in known:
            entries.append(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                           .revocation_date(now).build())
            known.add(cert.serial_number)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - BACKDATE).next_update(now + datetime.timedelta(days=days))
               .add_extension(x509.CRLNumber(number + 1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(crl.public_bytes(serialization.Encoding.PEM))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return crl


def check_output_directory(directory: Path) -> None:
    """``--out`` must be new, empty, or a directory this module wrote before (it holds ca.key)."""
    if directory.exists() and not directory.is_dir():
        raise CertificateError(f"--out {directory} is a file; give a directory")
    if not directory.exists():
        if not directory.parent.is_dir():
            raise CertificateError(f"--out {directory}: directory {directory.parent} does not exist; create it first")
        return
    contents = sorted(p.name for p in directory.iterdir())
    if contents and CA_KEY not in contents:
        raise CertificateError(f"--out {directory} holds other files ({contents[:3]}) and no {CA_KEY}; give a new "
                               "or empty directory, or one this command wrote")


def write_pki(directory: Path, fleet: str, devices: Sequence[str], *, revoked: Sequence[str] = (),
              hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS,
              aggregator_user: str = AGGREGATOR_USER) -> PkiReport:
    """Issue what is missing for ``devices`` and put ``revoked`` devices' certificates on the CRL."""
    _check_acl_id(fleet, "fleet id")
    _check_acl_id(aggregator_user, "aggregator user")
    for device in (*devices, *revoked):
        _check_acl_id(device, "device id")
        if device == aggregator_user:
            raise CertificateError(f"device id {device!r} is the aggregator's broker user; enrol it under another id")
    both = sorted(set(devices) & set(revoked))
    if both:
        raise CertificateError(f"device {both[0]!r} is both to be issued a certificate and revoked")
    if days < 1:
        raise CertificateError(f"--days must be at least 1, got {days}")
    for host in hosts:
        parse_host(host)
    check_output_directory(directory)
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / DEVICES_DIR).mkdir(mode=0o700, exist_ok=True)
    ca, ca_files = load_or_create_ca(directory, fleet, days)
    server = issue_server(directory, ca, hosts, days)
    aggregator = issue_client(directory, ca, aggregator_user, "aggregator", days)
    issued = {device: issue_client(directory / DEVICES_DIR, ca, device, device, days) for device in devices}
    on_crl, without = [], []
    revoked_certs = []
    for device in revoked:
        path = directory / DEVICES_DIR / f"{device}.pem"
        if path.exists():
            revoked_certs.append(_load_cert(path))
            on_crl.append(device)
        else:
            without.append(device)
    crl_path = directory / CRL_FILE
    write_crl(crl_path, ca, revoked_certs, days)
    log.info("PKI of fleet %s in %s: %d device certificate(s), %d revoked", fleet, directory, len(issued),
             len(on_crl))
    return PkiReport(ca_files, server, aggregator, issued, crl_path, tuple(on_crl), tuple(without))
