"""The ``Store`` interface and the records it holds.

Why one interface: the service, the CLI and the tests talk to the aggregator's state through
these methods only, so a second backend (PostgreSQL, a later issue) slots in behind them and runs
the same contract tests (``tests/store/test_store_contract.py``).

Every method that changes state is one transaction. ``transaction()`` groups several into one
(a round's completion: its model, its status, its accounting event and the participation record
commit together or not at all); calls made inside it join it. Timestamps are passed in by the
caller (``now``): the store never reads a clock, so tests and replays are deterministic.
"""

from __future__ import annotations

import enum
import hashlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from aggregator.accounting.participation_record import ParticipationRecord
from edge_sdk.errors import FleetlearnError
from edge_sdk.secagg.keys import KEY_BYTES
from edge_sdk.secagg.membership import Directory
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES

MAX_DEVICE_ID_BYTES = MAX_ID_BYTES  # the ids SecAgg+ messages and topics carry


class StoreError(FleetlearnError):
    """The aggregator's store cannot do what was asked (unreadable file, bad value)."""


class StoreConflictError(StoreError, ValueError):
    """The change contradicts what the store holds (a device enrolled twice, a model version reused)."""


class StoreNotFoundError(StoreError, LookupError):
    """The record asked for does not exist (an unknown device, round or model version)."""


class StoreVersionError(StoreError):
    """The store file was written by a newer fleetlearn (its schema version is above this code's)."""


def check_topic_level(value: str, what: str) -> str:
    """Return ``value`` if it can be one MQTT topic level (a device or fleet id), else raise StoreError.

    The rule is the wire's (``edge_sdk.wire.frame_fields.check_id``), the one id rule everywhere.
    """
    try:
        check_id(value, what, MAX_DEVICE_ID_BYTES)
    except WireFormatError as exc:
        raise StoreError(str(exc)) from None
    return value


def check_index(name: str, value: int) -> int:
    """A round index or model version: an int in 0 .. 2^63 - 1 (both backends store a signed 64-bit integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{name} must be an integer >= 0, got {value!r}")
    if value >= 2**63:
        raise StoreError(f"{name} {value} does not fit a signed 64-bit integer")
    return value


def check_device_id(device_id: str) -> str:
    return check_topic_level(device_id, "device id")


class RoundStatus(str, enum.Enum):
    """Where a round ended, or that it has not: a running round is resumed or restarted after a crash."""

    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class DeviceRecord:
    """One enrolled device: its Ed25519 identity key and when it was enrolled (and revoked)."""

    device_id: str
    public_key: bytes
    enrolled_at: float
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class PlanRecord:
    """A round's signed plan, as the bytes that were published."""

    round_index: int
    payload: bytes
    digest: str  # sha256 hex of payload
    created_at: float


@dataclass(frozen=True)
class ModelRecord:
    """One version of the global model (version 0 is the initial model)."""

    version: int
    payload: bytes
    digest: str  # sha256 hex of payload
    created_at: float
    round_index: int | None = None  # the round that produced it; None for the initial model


@dataclass(frozen=True)
class RoundRecord:
    """A round's progress: enough to resume it or to close it cleanly after a crash.

    ``state`` is the round machine's own snapshot (opaque bytes, never a pickle); ``detail`` says
    why a round aborted.
    """

    round_index: int
    session: bytes
    stage: str
    status: RoundStatus
    started_at: float
    updated_at: float
    state: bytes = b""
    detail: str = ""


@dataclass(frozen=True)
class StageRecord:
    """One stage a round entered, with the devices still in it and those it lost on the way in."""

    round_index: int
    stage: str
    entered_at: float
    participants: int
    dropouts: int


@dataclass(frozen=True)
class AccountingEventRecord:
    """One privacy event of the fleet (a released sum), in the order they were recorded."""

    sequence: int
    round_index: int
    event: dict[str, Any]
    recorded_at: float


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def check_public_key(public_key: bytes) -> bytes:
    if not isinstance(public_key, bytes) or len(public_key) != KEY_BYTES:
        size = len(public_key) if isinstance(public_key, bytes | bytearray) else type(public_key).__name__
        raise StoreError(f"an Ed25519 public key is {KEY_BYTES} bytes, got {size}")
    return public_key


class Store(ABC):
    """The aggregator's durable state. Every mutating call is one transaction (see the module docstring)."""

    # -- transactions and lifetime -------------------------------------------------------------
    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Group the calls inside into one transaction; nested uses join the outer one."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    @abstractmethod
    def schema_version(self) -> int: ...

    # -- devices -------------------------------------------------------------------------------
    @abstractmethod
    def enrol(self, device_id: str, public_key: bytes, now: float) -> DeviceRecord:
        """Enrol a new device. An id ever used before (active or revoked) is a StoreConflictError."""

    @abstractmethod
    def revoke(self, device_id: str, now: float, reason: str = "") -> DeviceRecord:
        """Revoke an active device: it leaves the directory; its history stays."""

    @abstractmethod
    def device(self, device_id: str) -> DeviceRecord | None: ...

    @abstractmethod
    def devices(self, *, include_revoked: bool = True) -> list[DeviceRecord]:
        """Every device, sorted by id."""

    def directory(self) -> Directory:
        """The enrolment directory of the active devices (SecAgg+'s id -> identity key)."""
        return Directory({d.device_id: d.public_key for d in self.devices(include_revoked=False)})

    # -- plans and models ----------------------------------------------------------------------
    @abstractmethod
    def put_plan(self, round_index: int, payload: bytes, now: float) -> PlanRecord:
        """Keep a round's signed plan; a different plan for a round that has one is a conflict."""

    @abstractmethod
    def plan(self, round_index: int) -> PlanRecord | None: ...

    @abstractmethod
    def put_model(self, version: int, payload: bytes, now: float, round_index: int | None = None) -> ModelRecord:
        """Keep a model version; versions only grow, and one version never changes its bytes."""

    @abstractmethod
    def model(self, version: int) -> ModelRecord | None: ...

    @abstractmethod
    def latest_model(self) -> ModelRecord | None: ...

    # -- rounds --------------------------------------------------------------------------------
    @abstractmethod
    def save_round(self, record: RoundRecord) -> None:
        """Insert or update a round; a finished (completed or aborted) round never changes again."""

    @abstractmethod
    def round(self, round_index: int) -> RoundRecord | None: ...

    @abstractmethod
    def rounds(self, status: RoundStatus | None = None) -> list[RoundRecord]:
        """Rounds by index, optionally only those with ``status``."""

    @abstractmethod
    def record_stage(self, record: StageRecord) -> None: ...

    @abstractmethod
    def stages(self, round_index: int) -> list[StageRecord]: ...

    # -- privacy accounting --------------------------------------------------------------------
    @abstractmethod
    def add_accounting_event(self, round_index: int, event: dict[str, Any], now: float) -> AccountingEventRecord:
        """Append one privacy event (JSON-safe dict); one per round at most."""

    @abstractmethod
    def accounting_events(self) -> list[AccountingEventRecord]: ...

    @abstractmethod
    def save_participation(self, record: ParticipationRecord) -> None:
        """Replace the stored participation record with ``record`` (per device rows)."""

    @abstractmethod
    def participation(self, delta: float) -> ParticipationRecord:
        """The stored participation record (an empty one with ``delta`` if none is stored yet).

        A stored record kept at another delta is a StoreConflictError: its figures would not compare.
        """
