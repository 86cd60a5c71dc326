"""The SQLite backend of ``Store``: one file, WAL mode, ``synchronous=FULL``, versioned migrations.

Why these settings: WAL lets the metrics endpoint and ``fleetlearn aggregator devices`` read
while the service writes; ``synchronous=FULL`` makes every commit durable across a power loss
(WAL's NORMAL may lose the last commits, and a lost model or accounting event is a lost privacy
record). Each change runs in ``BEGIN IMMEDIATE`` so a writer takes the lock up front and two
writers never deadlock half-way. Migrations are numbered; a file newer than this code is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aggregator.accounting.participation_record import RECORD_FORMAT, ParticipationRecord
from aggregator.store.base import (
    AccountingEventRecord,
    DeviceRecord,
    ModelRecord,
    PlanRecord,
    RoundRecord,
    RoundStatus,
    StageRecord,
    Store,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    check_device_id,
    check_index,
    check_public_key,
    payload_digest,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

# Migration n takes the schema from version n - 1 to n. Never edit a released one: append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            public_key BLOB NOT NULL CHECK (length(public_key) = 32),
            enrolled_at REAL NOT NULL,
            revoked_at REAL,
            revoke_reason TEXT
        )""",
        "CREATE UNIQUE INDEX devices_public_key ON devices (public_key)",
        """CREATE TABLE plans (
            round_index INTEGER PRIMARY KEY CHECK (round_index >= 0),
            payload BLOB NOT NULL,
            digest TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE models (
            version INTEGER PRIMARY KEY CHECK (version >= 0),
            payload BLOB NOT NULL,
            digest TEXT NOT NULL,
            created_at REAL NOT NULL,
            round_index INTEGER
        )""",
        """CREATE TABLE rounds (
            round_index INTEGER PRIMARY KEY CHECK (round_index >= 0),
            session BLOB NOT NULL,
            stage TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'aborted')),
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            state BLOB NOT NULL,
            detail TEXT NOT NULL
        )""",
        """CREATE TABLE stages (
            round_index INTEGER NOT NULL REFERENCES rounds (round_index),
            stage TEXT NOT NULL,
            entered_at REAL NOT NULL,
            participants INTEGER NOT NULL,
            dropouts INTEGER NOT NULL,
            PRIMARY KEY (round_index, stage)
        )""",
        """CREATE TABLE accounting_events (
            sequence INTEGER PRIMARY KEY AUTOINCREMENT,
            round_index INTEGER NOT NULL UNIQUE,
            event TEXT NOT NULL,
            recorded_at REAL NOT NULL
        )""",
        """CREATE TABLE participation (
            device_id TEXT PRIMARY KEY,
            entry TEXT NOT NULL
        )""",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def open_store(path: str | os.PathLike[str]) -> SqliteStore:
    """Open the SQLite store at ``path``, creating and migrating it as needed."""
    return SqliteStore(path)


class SqliteStore(Store):
    """``Store`` on one SQLite file. One instance per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"store {path} is a directory; give a file such as {self.path / 'aggregator.sqlite'}")
        if not self.path.parent.is_dir():
            raise StoreError(f"store {path}: directory {self.path.parent} does not exist; create it first")
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never implicit.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"store {path}: SQLite refused WAL mode (got {mode!r}); is it on a network file system?"
                )
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {path} is not a fleetlearn SQLite store: {exc}") from exc
        self._depth = 0
        self._migrate()

    # -- lifetime and transactions -------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: cannot start a transaction: {exc}") from exc
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.DatabaseError):
                self._db.execute("ROLLBACK")
            raise StoreError(f"store {self.path}: commit failed: {exc}") from exc

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.transaction():
            current = self.schema_version
            if current > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"store {self.path} has schema version {current}, newer than this fleetlearn's {SCHEMA_VERSION}; "
                    "upgrade fleetlearn (never open it with an older one)"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version}")
                log.info("store %s: migrated to schema version %d", self.path, version)

    def _one(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        return self._db.execute(sql, params).fetchone()

    # -- devices -------------------------------------------------------------------------------
    def enrol(self, device_id: str, public_key: bytes, now: float) -> DeviceRecord:
        check_device_id(device_id)
        check_public_key(public_key)
        with self.transaction():
            existing = self.device(device_id)
            if existing is not None:
                state = "enrolled" if existing.active else "revoked"
                raise StoreConflictError(
                    f"device {device_id} is already {state}; an id is never reused: enrol the device under a new id"
                )
            holder = self._one("SELECT device_id FROM devices WHERE public_key = ?", public_key)
            if holder is not None:
                raise StoreConflictError(
                    f"public key {public_key.hex()[:16]}... is already enrolled as device {holder[0]}; "
                    "every device needs its own identity key (`fleetlearn device init` makes one)"
                )
            self._db.execute(
                "INSERT INTO devices (device_id, public_key, enrolled_at) VALUES (?, ?, ?)",
                (device_id, public_key, now),
            )
        return DeviceRecord(device_id, public_key, now)

    def revoke(self, device_id: str, now: float, reason: str = "") -> DeviceRecord:
        with self.transaction():
            existing = self.device(device_id)
            if existing is None:
                raise StoreNotFoundError(
                    f"device {device_id} is not enrolled (`fleetlearn aggregator devices` lists them)"
                )
            if not existing.active:
                raise StoreConflictError(f"device {device_id} was already revoked")
            self._db.execute(
                "UPDATE devices SET revoked_at = ?, revoke_reason = ? WHERE device_id = ?", (now, reason, device_id)
            )
        return DeviceRecord(device_id, existing.public_key, existing.enrolled_at, now, reason)

    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._one(
            "SELECT device_id, public_key, enrolled_at, revoked_at, revoke_reason FROM devices WHERE device_id = ?",
            device_id,
        )
        return None if row is None else DeviceRecord(row[0], bytes(row[1]), row[2], row[3], row[4])

    def devices(self, *, include_revoked: bool = True) -> list[DeviceRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._db.execute(
            f"SELECT device_id, public_key, enrolled_at, revoked_at, revoke_reason FROM devices{where} "
            "ORDER BY device_id"
        ).fetchall()
        return [DeviceRecord(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    # -- plans and models ----------------------------------------------------------------------
    def put_plan(self, round_index: int, payload: bytes, now: float) -> PlanRecord:
        check_index("round_index", round_index)
        digest = payload_digest(payload)
        with self.transaction():
            existing = self.plan(round_index)
            if existing is not None:
                if existing.digest != digest:
                    raise StoreConflictError(
                        f"round {round_index} already has a different plan ({existing.digest[:12]})"
                    )
                return existing
            self._db.execute(
                "INSERT INTO plans (round_index, payload, digest, created_at) VALUES (?, ?, ?, ?)",
                (round_index, payload, digest, now),
            )
        return PlanRecord(round_index, payload, digest, now)

    def plan(self, round_index: int) -> PlanRecord | None:
        row = self._one("SELECT round_index, payload, digest, created_at FROM plans WHERE round_index = ?", round_index)
        return None if row is None else PlanRecord(row[0], bytes(row[1]), row[2], row[3])

    def put_model(self, version: int, payload: bytes, now: float, round_index: int | None = None) -> ModelRecord:
        check_index("version", version)
        digest = payload_digest(payload)
        with self.transaction():
            existing = self.model(version)
            if existing is not None:
                if existing.digest != digest:
                    raise StoreConflictError(
                        f"model version {version} already exists with other bytes ({existing.digest[:12]}); "
                        "a version never changes: publish the next version"
                    )
                return existing
            latest = self.latest_model()
            if latest is not None and version < latest.version:
                raise StoreConflictError(f"model version {version} is below the latest stored version {latest.version}")
            self._db.execute(
                "INSERT INTO models (version, payload, digest, created_at, round_index) VALUES (?, ?, ?, ?, ?)",
                (version, payload, digest, now, round_index),
            )
        return ModelRecord(version, payload, digest, now, round_index)

    _MODEL_COLUMNS = "version, payload, digest, created_at, round_index"

    def model(self, version: int) -> ModelRecord | None:
        row = self._one(f"SELECT {self._MODEL_COLUMNS} FROM models WHERE version = ?", version)
        return None if row is None else ModelRecord(row[0], bytes(row[1]), row[2], row[3], row[4])

    def latest_model(self) -> ModelRecord | None:
        row = self._one(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY version DESC LIMIT 1")
        return None if row is None else ModelRecord(row[0], bytes(row[1]), row[2], row[3], row[4])

    # -- rounds --------------------------------------------------------------------------------
    _ROUND_COLUMNS = "round_index, session, stage, status, started_at, updated_at, state, detail"

    def save_round(self, record: RoundRecord) -> None:
        check_index("round_index", record.round_index)
        status = RoundStatus(record.status)
        with self.transaction():
            existing = self.round(record.round_index)
            if existing is not None and existing.status is not RoundStatus.RUNNING:
                raise StoreConflictError(
                    f"round {record.round_index} already {existing.status.value} ({existing.detail or 'no detail'}); "
                    "a finished round never changes: start the next round"
                )
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds ({self._ROUND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.round_index, bytes(record.session), record.stage, status.value, record.started_at,
                 record.updated_at, bytes(record.state), record.detail),
            )

    def round(self, round_index: int) -> RoundRecord | None:
        row = self._one(f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round_index = ?", round_index)
        return None if row is None else _round(row)

    def rounds(self, status: RoundStatus | None = None) -> list[RoundRecord]:
        if status is None:
            rows = self._db.execute(f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY round_index").fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE status = ? ORDER BY round_index",
                (RoundStatus(status).value,),
            ).fetchall()
        return [_round(r) for r in rows]

    def record_stage(self, record: StageRecord) -> None:
        with self.transaction():
            if self.round(record.round_index) is None:
                raise StoreNotFoundError(f"round {record.round_index} is not stored; save_round it first")
            self._db.execute(
                "INSERT OR REPLACE INTO stages (round_index, stage, entered_at, participants, dropouts) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.round_index, record.stage, record.entered_at, record.participants, record.dropouts),
            )

    def stages(self, round_index: int) -> list[StageRecord]:
        rows = self._db.execute(
            "SELECT round_index, stage, entered_at, participants, dropouts FROM stages WHERE round_index = ? "
            "ORDER BY entered_at, rowid",
            (round_index,),
        ).fetchall()
        return [StageRecord(*r) for r in rows]

    # -- privacy accounting --------------------------------------------------------------------
    def add_accounting_event(self, round_index: int, event: dict[str, Any], now: float) -> AccountingEventRecord:
        text = json.dumps(event, sort_keys=True, allow_nan=False)
        with self.transaction():
            if self._one("SELECT 1 FROM accounting_events WHERE round_index = ?", round_index):
                raise StoreConflictError(
                    f"round {round_index} already has its accounting event; a round is accounted once"
                )
            cursor = self._db.execute(
                "INSERT INTO accounting_events (round_index, event, recorded_at) VALUES (?, ?, ?)",
                (round_index, text, now),
            )
        return AccountingEventRecord(int(cursor.lastrowid or 0), round_index, json.loads(text), now)

    def accounting_events(self) -> list[AccountingEventRecord]:
        rows = self._db.execute(
            "SELECT sequence, round_index, event, recorded_at FROM accounting_events ORDER BY sequence"
        ).fetchall()
        return [AccountingEventRecord(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def save_participation(self, record: ParticipationRecord) -> None:
        data = record.to_dict()
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('participation_delta', ?)", (repr(record.delta),)
            )
            stored = dict(self._db.execute("SELECT device_id, entry FROM participation").fetchall())
            for device_id, entry in data["devices"].items():
                text = json.dumps(entry, sort_keys=True, allow_nan=False)
                if stored.pop(device_id, None) != text:
                    self._db.execute(
                        "INSERT OR REPLACE INTO participation (device_id, entry) VALUES (?, ?)", (device_id, text)
                    )
            for device_id in stored:
                self._db.execute("DELETE FROM participation WHERE device_id = ?", (device_id,))

    def participation(self, delta: float) -> ParticipationRecord:
        row = self._one("SELECT value FROM settings WHERE key = 'participation_delta'")
        if row is None:
            return ParticipationRecord(delta)
        stored_delta = float(row[0])
        if stored_delta != delta:
            raise StoreConflictError(
                f"the stored participation record is kept at delta={stored_delta:g}, not {delta:g}; "
                "keep the fleet's delta, or start a new store"
            )
        entries = self._db.execute("SELECT device_id, entry FROM participation").fetchall()
        return ParticipationRecord.from_dict(
            {"format": RECORD_FORMAT, "delta": stored_delta, "devices": {d: json.loads(e) for d, e in entries}}
        )


def _round(row: tuple[Any, ...]) -> RoundRecord:
    return RoundRecord(row[0], bytes(row[1]), row[2], RoundStatus(row[3]), row[4], row[5], bytes(row[6]), row[7])

