"""A device's state directory: its identity key, its privacy ledger and its id, made once by ``device init``.

Why a directory: the agent must find the same identity and ledger after every reboot, and an
operator provisions one path. The identity key is written 0600 and atomically (a temporary file
hard-linked into place, which fails if the key exists), so a crash never leaves half a key and a
rerun never replaces one: a replaced key would lock the device out of its enrolment.

Layout: ``identity.key`` (the Ed25519 private key, hex), ``privacy.ledger`` (+ ``.head``),
``device.json`` (the device id), and the agent's round state (``round/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import FleetlearnError
from edge_sdk.secagg.keys import KEY_BYTES, IdentityKey
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES

IDENTITY_FILE = "identity.key"
LEDGER_FILE = "privacy.ledger"
DEVICE_FILE = "device.json"
STATE_FORMAT = 1


class StateDirError(FleetlearnError, ValueError):
    """The state directory is missing, incomplete, or already initialised."""


def check_device_id(device_id: str) -> str:
    """A device id becomes an MQTT topic level and an ACL line: the wire's one id rule (``check_id``)."""
    try:
        check_id(device_id, "device id", MAX_ID_BYTES)
    except WireFormatError as exc:
        raise StateDirError(str(exc)) from None
    return device_id


def default_device_id() -> str:
    return socket.gethostname().split(".")[0] or "device"


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) atomically; an existing ``path`` is an error, never replaced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)  # atomic, and refuses to replace an existing file
    except FileExistsError:
        raise StateDirError(f"{path} already exists and is left as it is") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class DeviceState:
    """What ``device init`` made, as the agent loads it."""

    directory: Path
    device_id: str
    identity: IdentityKey

    @property
    def ledger_path(self) -> Path:
        return self.directory / LEDGER_FILE

    @property
    def round_dir(self) -> Path:
        return self.directory / "round"


def identity_path(directory: Path) -> Path:
    return directory / IDENTITY_FILE


def create_identity(directory: Path, device_id: str) -> IdentityKey:
    """Make the directory's identity key and id file; refuses a directory that has a key already."""
    check_device_id(device_id)
    if identity_path(directory).exists():
        existing = load_state(directory)
        raise StateDirError(
            f"{directory} is already initialised as device {existing.device_id} (public key "
            f"{existing.identity.public.hex()}); its identity is never replaced"
        )
    identity = IdentityKey.generate()
    write_new_file(identity_path(directory), identity.private.hex().encode() + b"\n")
    device = json.dumps({"format": STATE_FORMAT, "device_id": device_id}, sort_keys=True).encode() + b"\n"
    (directory / DEVICE_FILE).unlink(missing_ok=True)  # only a crash between the two writes leaves one behind
    write_new_file(directory / DEVICE_FILE, device)
    return identity


def load_state(directory: str | os.PathLike[str]) -> DeviceState:
    """Load the identity and id that ``device init`` wrote; a missing or damaged file is named."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StateDirError(f"--state-dir {directory}: no such directory; create it with `fleetlearn device init`")
    key_path = identity_path(directory)
    try:
        text = key_path.read_text().strip()
        identity = IdentityKey(bytes.fromhex(text))
        if len(text) != 2 * KEY_BYTES:
            raise ValueError("wrong length")
    except FileNotFoundError:
        raise StateDirError(f"{key_path} is missing; initialise the device with `fleetlearn device init`") from None
    except (ValueError, FleetlearnError) as exc:
        raise StateDirError(f"{key_path} is not a fleetlearn identity key ({exc}); restore it from a backup") from None
    if key_path.stat().st_mode & 0o077:
        raise StateDirError(f"{key_path} is readable by other users; chmod 600 it")
    try:
        data = json.loads((directory / DEVICE_FILE).read_text())
        device_id = check_device_id(str(data["device_id"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateDirError(
            f"{directory / DEVICE_FILE} is missing or damaged ({exc}); it holds the device id"
        ) from None
    return DeviceState(directory, device_id, identity)


# --- what the agent adds: the provisioned aggregator, and what it keeps between runs -------------

PROVISION_FILE = "aggregator.json"


@dataclass(frozen=True)
class Provisioning:
    """The fleet a device joins and the aggregator's public key it trusts, fixed at ``device init``."""

    fleet: str
    aggregator_public: bytes


def parse_aggregator_key(text: str) -> bytes:
    """``--aggregator-key``: 64 hex digits, or the path of a file holding them (``aggregator key`` prints them)."""
    candidate = text.strip()
    path = Path(candidate)
    if not _is_hex(candidate) and path.is_file():
        candidate = path.read_text().strip()
    if not _is_hex(candidate) or len(candidate) != 2 * KEY_BYTES:
        raise StateDirError(f"--aggregator-key must be the aggregator's public key as {2 * KEY_BYTES} hex digits, or "
                            f"a file holding them (`fleetlearn aggregator key --config aggregator.toml` prints it); "
                            f"got {text[:40]!r}")
    return bytes.fromhex(candidate)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


def write_provisioning(directory: Path, provisioning: Provisioning) -> None:
    """Record the fleet and the aggregator key, once: a device never silently trusts another aggregator."""
    check_device_id(provisioning.fleet)
    data = json.dumps({"format": STATE_FORMAT, "fleet": provisioning.fleet,
                       "aggregator_public": provisioning.aggregator_public.hex()}, sort_keys=True).encode() + b"\n"
    write_new_file(directory / PROVISION_FILE, data)


def load_provisioning(directory: str | os.PathLike[str]) -> Provisioning:
    path = Path(directory) / PROVISION_FILE
    try:
        data = json.loads(path.read_text())
        key = bytes.fromhex(str(data["aggregator_public"]))
        fleet = check_device_id(str(data["fleet"]))
        if len(key) != KEY_BYTES:
            raise ValueError(f"the key has {len(key)} bytes")
    except FileNotFoundError:
        raise StateDirError(f"{path} is missing: provision the device with `fleetlearn device init --state-dir "
                            f"{directory} --fleet ID --aggregator-key HEX`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateDirError(f"{path} is damaged ({exc}); it holds the fleet and the aggregator's key") from None
    return Provisioning(fleet, key)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` atomically and durably (temporary file, fsync, rename, fsync the directory)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
