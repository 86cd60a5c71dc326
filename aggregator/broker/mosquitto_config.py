"""A Mosquitto configuration for one fleet: listener (TLS), password file and a per-device ACL.

Why per-device ACL lines from the store: the broker is the first check that a device speaks only
for itself. A device may publish only on ``up/<its id>/#`` and ``status/<its id>`` and read only
its ``down/<id>`` and the retained ``plan`` and ``model`` (whole or chunked); the aggregator reads
every uplink and status and writes every downlink, plan and model. Only enrolled, unrevoked
devices get lines, so a revoked device loses the broker at the next regeneration (and SIGHUP).

Two ways to authenticate a device: a password (written here, hashed in Mosquitto's PBKDF2-SHA512
``$7$`` format with the stdlib's ``hashlib.pbkdf2_hmac``), or with ``client_certs`` a TLS client
certificate whose CN is the device id (``use_identity_as_username``).

``render`` is pure (the files' text from the inputs); ``write`` puts them in a directory,
atomically, keeping every secret it wrote before: a device's password is never changed by a rerun.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.device.state_dir import write_new_file
from edge_sdk.errors import ConfigError
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES
from edge_sdk.wire.topics import PREFIX, device_publications, device_subscriptions

log = logging.getLogger(__name__)

HEADER = "# written by `fleetlearn broker mosquitto-config`; rerun it after enrolling or revoking a device"
AGGREGATOR_USER = "fleetlearn-aggregator"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12
CONF_FILE, ACL_FILE, PASSWORD_FILE, SECRETS_DIR = "mosquitto.conf", "acl", "passwords", "secrets"
CRL_FILE = "crl.pem"  # the name `fleetlearn broker certs` writes its CRL under, beside ca.pem


class BrokerConfigError(ConfigError):
    """The broker configuration cannot be written as asked (a bad id, an occupied output directory)."""


@dataclass(frozen=True)
class TlsFiles:
    """The broker's TLS: the CA that signed client certificates, and the broker's own certificate and key.

    ``crl``: the CA's revocation list (``fleetlearn broker certs`` writes ``crl.pem`` beside ``ca.pem``);
    Mosquitto then refuses a revoked device's certificate at the TLS handshake.
    """

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    @classmethod
    def with_crl_beside_ca(cls, ca: Path, cert: Path, key: Path) -> TlsFiles:
        """These files, with the ``crl.pem`` next to the CA certificate when there is one."""
        crl = ca.with_name(CRL_FILE)
        return cls(ca, cert, key, crl if crl.is_file() else None)


@dataclass(frozen=True)
class BrokerFiles:
    """The text of every file: ``passwords`` maps a user to its password-file line (None with client certs)."""

    conf: str
    acl: str
    password_lines: Mapping[str, str] | None


def _check_acl_id(value: str, what: str) -> None:
    # An ACL line is "user <name>" / "topic <access> <topic>": the wire's one id rule already forbids
    # whitespace and topic wildcards and separators, so an id the store accepts is one the ACL can hold.
    try:
        check_id(value, what, MAX_ID_BYTES)
    except WireFormatError as exc:
        raise BrokerConfigError(f"{exc}; it cannot appear in a Mosquitto ACL") from None


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` password-file hash: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(fleet: str, devices: Sequence[str], aggregator_user: str = AGGREGATOR_USER) -> str:
    """The ACL file: the aggregator's topics, then each device's own."""
    _check_acl_id(fleet, "fleet id")
    _check_acl_id(aggregator_user, "aggregator user")
    base = f"{PREFIX}/{fleet}"
    lines = [HEADER, "", f"user {aggregator_user}"]
    lines += [f"topic read {base}/up/#", f"topic read {base}/status/#", f"topic write {base}/down/#"]
    for broadcast in ("plan", "model", "directory"):
        lines += [f"topic readwrite {base}/{broadcast}", f"topic readwrite {base}/{broadcast}/#"]
    lines.append(f"topic write {base}/status/{aggregator_user}")
    for device in devices:
        _check_acl_id(device, "device id")
        if device == aggregator_user:
            raise BrokerConfigError(f"device id {device!r} is the aggregator's broker user; enrol it under another id")
        lines += ["", f"user {device}"]
        lines += [f"topic write {topic}" for topic in device_publications(fleet, device)]
        lines += [f"topic read {topic}" for topic in device_subscriptions(fleet, device)]
    return "\n".join(lines) + "\n"


def conf_text(directory: Path, port: int, bind: str, tls: TlsFiles | None, client_certs: bool,
              max_queued_messages: int, run_as: str | None = None) -> str:
    """mosquitto.conf, with absolute paths to the ACL and password files in ``directory``."""
    if client_certs and tls is None:
        raise BrokerConfigError(
            "client certificates (--client-certs) need TLS: give --tls-ca, --tls-cert and --tls-key"
        )
    if not 0 < port < 65536:
        raise BrokerConfigError(f"--port must be from 1 to 65535, got {port}")
    directory = directory.resolve()
    lines = [HEADER, "per_listener_settings false", "allow_anonymous false", f"acl_file {directory / ACL_FILE}"]
    if run_as is not None:
        # Mosquitto started as root drops to this user before it reads the (0600) password file.
        lines.append(f"user {run_as}")
    if not client_certs:
        lines.append(f"password_file {directory / PASSWORD_FILE}")
    lines += [
        f"max_queued_messages {max_queued_messages}",  # the reliable channel retransmits what a full queue drops
        "set_tcp_nodelay true",  # without it Nagle + delayed ACKs cost ~40 ms per hop: 88 ms per round trip here
        "persistence true", f"persistence_location {directory}/",
        "", f"listener {port} {bind}",
    ]
    if tls is None:
        lines.insert(1, "# no TLS: passwords cross the network in clear; use only on a loopback or test network")
    else:
        lines += [f"cafile {tls.ca.resolve()}", f"certfile {tls.cert.resolve()}", f"keyfile {tls.key.resolve()}",
                  "tls_version tlsv1.2"]
        if tls.crl is not None:
            lines.append(f"crlfile {tls.crl.resolve()}")
        if client_certs:
            lines += ["require_certificate true", "use_identity_as_username true"]
    return "\n".join(lines) + "\n"


def render(directory: Path, fleet: str, devices: Sequence[str], passwords: Mapping[str, str], *, port: int,
           bind: str = "0.0.0.0", tls: TlsFiles | None = None, client_certs: bool = False,
           aggregator_user: str = AGGREGATOR_USER, max_queued_messages: int = 1000,
           run_as: str | None = None) -> BrokerFiles:
    """Every file's text; ``passwords`` (user -> password) must cover the aggregator and each device."""
    conf = conf_text(directory, port, bind, tls, client_certs, max_queued_messages, run_as)
    acl = acl_text(fleet, devices, aggregator_user)
    if client_certs:
        return BrokerFiles(conf, acl, None)
    users = [aggregator_user, *devices]
    missing = [u for u in users if u not in passwords]
    if missing:
        raise BrokerConfigError(f"no password for {missing[:3]}")
    return BrokerFiles(conf, acl, {u: f"{u}:{hash_password(passwords[u])}" for u in users})


def _write_atomic(path: Path, text: str, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _secret(directory: Path, user: str) -> str:
    """The user's password, made once and kept in ``secrets/<user>`` (0600) for provisioning."""
    path = directory / SECRETS_DIR / user
    if not path.exists():
        # atomic: a crash mid-write must not leave an empty file that reads back as the password ""
        write_new_file(path, secrets.token_urlsafe(24).encode() + b"\n")
    return path.read_text().strip()


def check_output_directory(directory: Path) -> None:
    """``--out`` must be new, empty, or written by this command before (then it is brought up to date)."""
    if directory.exists() and not directory.is_dir():
        raise BrokerConfigError(f"--out {directory} is a file; give a directory")
    if not directory.exists():
        if not directory.parent.is_dir():
            raise BrokerConfigError(f"--out {directory}: directory {directory.parent} does not exist; create it first")
        return
    contents = {p.name for p in directory.iterdir()}
    conf = directory / CONF_FILE
    ours = conf.exists() and conf.read_text().startswith(HEADER)
    if contents and not ours:
        raise BrokerConfigError(
            f"--out {directory} holds other files ({sorted(contents)[:3]}) and no configuration written by this "
            "command; give a new or empty directory"
        )


def write(directory: Path, fleet: str, devices: Sequence[str], *, port: int, bind: str = "0.0.0.0",
          tls: TlsFiles | None = None, client_certs: bool = False, aggregator_user: str = AGGREGATOR_USER,
          max_queued_messages: int = 1000, run_as: str | None = None) -> BrokerFiles:
    """Write (or bring up to date) the configuration in ``directory``; passwords already there are kept."""
    check_output_directory(directory)
    acl_text(fleet, devices, aggregator_user)  # refuse bad ids before anything is created
    conf_text(directory.absolute(), port, bind, tls, client_certs, max_queued_messages, run_as)
    directory.mkdir(exist_ok=True)
    passwords: dict[str, str] = {}
    if not client_certs:
        (directory / SECRETS_DIR).mkdir(mode=0o700, exist_ok=True)
        passwords = {user: _secret(directory, user) for user in (aggregator_user, *devices)}
    files = render(directory, fleet, devices, passwords, port=port, bind=bind, tls=tls, client_certs=client_certs,
                   aggregator_user=aggregator_user, max_queued_messages=max_queued_messages, run_as=run_as)
    if files.password_lines is not None:
        _write_atomic(directory / PASSWORD_FILE, "\n".join(files.password_lines.values()) + "\n", 0o600)
    _write_atomic(directory / ACL_FILE, files.acl, 0o644)
    _write_atomic(directory / CONF_FILE, files.conf, 0o644)
    log.info("wrote the Mosquitto configuration of fleet %s for %d devices into %s", fleet, len(devices), directory)
    return files
