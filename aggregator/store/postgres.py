"""The PostgreSQL backend of ``Store``: for a coordinator and workers that share one aggregator state.

Why these choices:

- **psycopg 3, one connection per store** (like ``SqliteStore``: one instance per thread). The
  connection is in autocommit mode, so a read outside ``transaction()`` is one statement, and
  every changing method opens a real transaction (``BEGIN`` ... ``COMMIT``); a nested one is a
  savepoint of the outer, so it commits with it, and a nested call that fails is undone alone.
  A dropped connection is reported as a ``StoreError`` and the next call reconnects.
- **READ COMMITTED plus table locks where a method reads and then writes.** ``enrol``,
  ``revoke``, ``put_plan``, ``put_model``, ``save_round``, ``add_accounting_event`` and
  ``save_participation`` first take ``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE`` on the table
  they check: writers of that table queue up (until the transaction ends), readers never wait, and
  the check sees every earlier commit. So "model versions only grow", "a finished round never
  changes" and "one accounting event per round" hold across processes, and accounting sequence
  numbers follow commit order. (SERIALIZABLE would need every caller to retry its transaction; a
  row lock, ``SELECT ... FOR UPDATE``, cannot lock a row that does not exist yet.) Waiting for a
  lock longer than ``LOCK_TIMEOUT_S`` is a ``StoreConflictError``, as is a deadlock between two
  transactions that lock tables in opposite orders.
- **Versioned migrations** recorded in ``fleetlearn_schema`` (one row per applied step), applied
  in one transaction under a transaction-scoped advisory lock keyed by the schema, so a
  coordinator and workers starting at once migrate exactly once; a schema newer than this code
  is refused untouched.
- **Types**: ``bytea`` for keys, payloads and snapshots, ``bigint`` for indices and counts,
  ``double precision`` for timestamps and delta (exact round-trips of Python floats), and ``json``
  (not ``jsonb``) for privacy events and participation entries: ``json`` keeps the text exactly as
  written, while ``jsonb`` rewrites numbers (``1e16`` comes back as the integer
  ``10000000000000000``, ``-0.0`` as ``0.0``), and a privacy record must read back as it was written.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

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

LOCK_TIMEOUT_S = 10  # as long as SqliteStore waits for a busy file
CONNECT_TIMEOUT_S = 10
MIGRATION_LOCK_CLASS = 0x666C6561  # "flea": the first key of the advisory lock; the second is the schema's hash
WRITE_LOCK = "SHARE ROW EXCLUSIVE"  # conflicts with itself and with every writer, never with readers


@dataclass(frozen=True)
class Migration:
    """One numbered step: migration n takes the schema from version n - 1 to n."""

    description: str
    statements: tuple[str, ...]


# Never edit a released migration: append one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "devices, plans, models, rounds, stages, accounting events, participation",
        (
            """CREATE TABLE devices (
                device_id text COLLATE "C" PRIMARY KEY,
                public_key bytea NOT NULL UNIQUE CHECK (octet_length(public_key) = 32),
                enrolled_at double precision NOT NULL,
                revoked_at double precision,
                revoke_reason text
            )""",
            """CREATE TABLE plans (
                round_index bigint PRIMARY KEY CHECK (round_index >= 0),
                payload bytea NOT NULL,
                digest text NOT NULL CHECK (length(digest) = 64),
                created_at double precision NOT NULL
            )""",
            """CREATE TABLE models (
                version bigint PRIMARY KEY CHECK (version >= 0),
                payload bytea NOT NULL,
                digest text NOT NULL CHECK (length(digest) = 64),
                created_at double precision NOT NULL,
                round_index bigint
            )""",
            """CREATE TABLE rounds (
                round_index bigint PRIMARY KEY CHECK (round_index >= 0),
                session bytea NOT NULL,
                stage text NOT NULL,
                status text NOT NULL CHECK (status IN ('running', 'completed', 'aborted')),
                started_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                state bytea NOT NULL,
                detail text NOT NULL
            )""",
            """CREATE TABLE stages (
                round_index bigint NOT NULL REFERENCES rounds (round_index),
                stage text NOT NULL,
                entered_at double precision NOT NULL,
                participants bigint NOT NULL,
                dropouts bigint NOT NULL,
                entry_order bigint GENERATED ALWAYS AS IDENTITY,
                PRIMARY KEY (round_index, stage)
            )""",
            """CREATE TABLE accounting_events (
                sequence bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                round_index bigint NOT NULL UNIQUE,
                event json NOT NULL,
                recorded_at double precision NOT NULL
            )""",
            """CREATE TABLE participation_delta (
                one_row boolean PRIMARY KEY DEFAULT true CHECK (one_row),
                delta double precision NOT NULL CHECK (delta > 0 AND delta < 1)
            )""",
            """CREATE TABLE participation (
                device_id text PRIMARY KEY,
                entry json NOT NULL
            )""",
        ),
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"store DSN is not a valid PostgreSQL connection string: {_first_line(exc)}") from None
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', '')}{port}/{params.get('dbname', '')}"


class PostgresStore(Store):
    """``Store`` on a PostgreSQL database: its tables live in ``schema`` (default: the connection's own)."""

    def __init__(self, dsn: str, *, schema: str | None = None) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        if schema is not None and (not schema or "\0" in schema or len(schema.encode()) > 63):
            raise StoreError(f"store {self.where}: schema name {schema!r} is not a PostgreSQL identifier")
        self._requested_schema = schema
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._depth = 0
        self._closed = False
        self._connect()
        try:
            self.schema: str = schema if schema is not None else self._current_schema()
            self.where = f"{self.where} schema {self.schema}"
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- lifetime and transactions -------------------------------------------------------------
    def _connect(self) -> None:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise StoreError(f"store {self.where}: cannot connect: {_first_line(exc)}") from None
        try:
            conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{LOCK_TIMEOUT_S}s")))
            if self._requested_schema is not None:
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._requested_schema)))
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"store {self.where}: cannot set up the session: {_first_line(exc)}") from None
        self._conn = conn

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The open connection; outside a transaction a lost one is replaced (nothing was pending on it)."""
        if self._closed:
            raise StoreError(f"store {self.where} was closed; open it again")
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._depth:
                raise StoreError(f"store {self.where}: the connection was lost inside a transaction; nothing of it "
                                 "was committed")
            if self._conn is not None:
                log.warning("store %s: connection lost; reconnecting", self.where)
            self._connect()
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._connection()
        self._depth += 1
        try:
            with _translated(self.where), conn.transaction():  # the outermost BEGIN ... COMMIT, else a savepoint
                yield
        finally:
            self._depth -= 1

    @property
    def schema_version(self) -> int:
        row = self._one("SELECT coalesce(max(version), 0) FROM fleetlearn_schema")
        assert row is not None
        return int(row[0])

    def _current_schema(self) -> str:
        row = self._one("SELECT current_schema()")
        if row is None or row[0] is None:
            raise StoreError(
                f"store {self.where}: no schema of the search_path exists; create one or pass schema=..."
            )
        return str(row[0])

    def _migrate(self) -> None:
        with self.transaction():
            # Every process opening this schema queues here until the first has migrated and committed.
            self._execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (MIGRATION_LOCK_CLASS, self.schema))
            if self._one("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)) is None:
                self._execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            self._execute(
                "CREATE TABLE IF NOT EXISTS fleetlearn_schema (version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = self.schema_version
            if current > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"store {self.where} has schema version {current}, newer than this fleetlearn's "
                    f"{SCHEMA_VERSION}; upgrade fleetlearn (never open it with an older one)"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                migration = MIGRATIONS[version - 1]
                for statement in migration.statements:
                    try:
                        self._connection().execute(statement)  # errors other than this are translated by transaction()
                    except errors.DuplicateTable as exc:
                        raise StoreError(
                            f"store {self.where}: {exc.diag.message_primary}, but not made by fleetlearn's "
                            "migrations; give the store a schema of its own"
                        ) from None
                self._execute(
                    "INSERT INTO fleetlearn_schema (version, description) VALUES (%s, %s)",
                    (version, migration.description),
                )
                log.info("store %s: migrated to schema version %d (%s)", self.where, version, migration.description)

    # -- statements ----------------------------------------------------------------------------
    def _execute(self, query: str | sql.Composed, params: Sequence[Any] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        with _translated(self.where):
            return self._connection().execute(query, params)

    def _one(self, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with _translated(self.where):
            return self._connection().execute(query, params).fetchone()

    def _all(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with _translated(self.where):
            return self._connection().execute(query, params).fetchall()

    def _lock(self, *tables: str) -> None:
        """Queue behind every other writer of ``tables`` until this transaction ends (see the module docstring)."""
        assert self._depth, "a table lock outside a transaction would be released at once"
        self._execute(f"LOCK TABLE {', '.join(tables)} IN {WRITE_LOCK} MODE")

    # -- devices -------------------------------------------------------------------------------
    _DEVICE_COLUMNS = "device_id, public_key, enrolled_at, revoked_at, revoke_reason"

    def enrol(self, device_id: str, public_key: bytes, now: float) -> DeviceRecord:
        check_device_id(device_id)
        check_public_key(public_key)
        with self.transaction():
            self._lock("devices")
            existing = self.device(device_id)
            if existing is not None:
                state = "enrolled" if existing.active else "revoked"
                raise StoreConflictError(
                    f"device {device_id} is already {state}; an id is never reused: enrol the device under a new id"
                )
            holder = self._one("SELECT device_id FROM devices WHERE public_key = %s", (public_key,))
            if holder is not None:
                raise StoreConflictError(
                    f"public key {public_key.hex()[:16]}... is already enrolled as device {holder[0]}; "
                    "every device needs its own identity key (`fleetlearn device init` makes one)"
                )
            self._execute(
                "INSERT INTO devices (device_id, public_key, enrolled_at) VALUES (%s, %s, %s)",
                (device_id, public_key, now),
            )
        return DeviceRecord(device_id, public_key, now)

    def revoke(self, device_id: str, now: float, reason: str = "") -> DeviceRecord:
        with self.transaction():
            self._lock("devices")
            existing = self.device(device_id)
            if existing is None:
                raise StoreNotFoundError(
                    f"device {device_id} is not enrolled (`fleetlearn aggregator devices` lists them)"
                )
            if not existing.active:
                raise StoreConflictError(f"device {device_id} was already revoked")
            self._execute(
                "UPDATE devices SET revoked_at = %s, revoke_reason = %s WHERE device_id = %s", (now, reason, device_id)
            )
        return DeviceRecord(device_id, existing.public_key, existing.enrolled_at, now, reason)

    def device(self, device_id: str) -> DeviceRecord | None:
        row = self._one(f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device_id,))
        return None if row is None else DeviceRecord(*row)

    def devices(self, *, include_revoked: bool = True) -> list[DeviceRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._all(f"SELECT {self._DEVICE_COLUMNS} FROM devices{where} ORDER BY device_id")
        return [DeviceRecord(*r) for r in rows]

    # -- plans and models ----------------------------------------------------------------------
    def put_plan(self, round_index: int, payload: bytes, now: float) -> PlanRecord:
        check_index("round_index", round_index)
        digest = payload_digest(payload)
        with self.transaction():
            self._lock("plans")
            existing = self.plan(round_index)
            if existing is not None:
                if existing.digest != digest:
                    raise StoreConflictError(
                        f"round {round_index} already has a different plan ({existing.digest[:12]})"
                    )
                return existing
            self._execute(
                "INSERT INTO plans (round_index, payload, digest, created_at) VALUES (%s, %s, %s, %s)",
                (round_index, payload, digest, now),
            )
        return PlanRecord(round_index, payload, digest, now)

    def plan(self, round_index: int) -> PlanRecord | None:
        row = self._one(
            "SELECT round_index, payload, digest, created_at FROM plans WHERE round_index = %s", (round_index,)
        )
        return None if row is None else PlanRecord(*row)

    _MODEL_COLUMNS = "version, payload, digest, created_at, round_index"

    def put_model(self, version: int, payload: bytes, now: float, round_index: int | None = None) -> ModelRecord:
        check_index("version", version)
        digest = payload_digest(payload)
        with self.transaction():
            self._lock("models")
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
            self._execute(
                "INSERT INTO models (version, payload, digest, created_at, round_index) VALUES (%s, %s, %s, %s, %s)",
                (version, payload, digest, now, round_index),
            )
        return ModelRecord(version, payload, digest, now, round_index)

    def model(self, version: int) -> ModelRecord | None:
        row = self._one(f"SELECT {self._MODEL_COLUMNS} FROM models WHERE version = %s", (version,))
        return None if row is None else ModelRecord(*row)

    def latest_model(self) -> ModelRecord | None:
        row = self._one(f"SELECT {self._MODEL_COLUMNS} FROM models ORDER BY version DESC LIMIT 1")
        return None if row is None else ModelRecord(*row)

    # -- rounds --------------------------------------------------------------------------------
    _ROUND_COLUMNS = "round_index, session, stage, status, started_at, updated_at, state, detail"

    def save_round(self, record: RoundRecord) -> None:
        check_index("round_index", record.round_index)
        status = RoundStatus(record.status)
        with self.transaction():
            self._lock("rounds")
            existing = self.round(record.round_index)
            if existing is not None and existing.status is not RoundStatus.RUNNING:
                raise StoreConflictError(
                    f"round {record.round_index} already {existing.status.value} ({existing.detail or 'no detail'}); "
                    "a finished round never changes: start the next round"
                )
            self._execute(
                f"INSERT INTO rounds ({self._ROUND_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (round_index) DO UPDATE SET session = EXCLUDED.session, stage = EXCLUDED.stage, "
                "status = EXCLUDED.status, started_at = EXCLUDED.started_at, updated_at = EXCLUDED.updated_at, "
                "state = EXCLUDED.state, detail = EXCLUDED.detail",
                (record.round_index, bytes(record.session), record.stage, status.value, record.started_at,
                 record.updated_at, bytes(record.state), record.detail),
            )

    def round(self, round_index: int) -> RoundRecord | None:
        row = self._one(f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round_index = %s", (round_index,))
        return None if row is None else _round(row)

    def rounds(self, status: RoundStatus | None = None) -> list[RoundRecord]:
        if status is None:
            rows = self._all(f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY round_index")
        else:
            rows = self._all(
                f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE status = %s ORDER BY round_index",
                (RoundStatus(status).value,),
            )
        return [_round(r) for r in rows]

    def record_stage(self, record: StageRecord) -> None:
        with self.transaction():
            if self.round(record.round_index) is None:
                raise StoreNotFoundError(f"round {record.round_index} is not stored; save_round it first")
            # A stage entered again moves to the end of the order, as SQLite's INSERT OR REPLACE does.
            self._execute(
                "INSERT INTO stages (round_index, stage, entered_at, participants, dropouts) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (round_index, stage) DO UPDATE SET "
                "entered_at = EXCLUDED.entered_at, participants = EXCLUDED.participants, "
                "dropouts = EXCLUDED.dropouts, entry_order = DEFAULT",
                (record.round_index, record.stage, record.entered_at, record.participants, record.dropouts),
            )

    def stages(self, round_index: int) -> list[StageRecord]:
        rows = self._all(
            "SELECT round_index, stage, entered_at, participants, dropouts FROM stages WHERE round_index = %s "
            "ORDER BY entered_at, entry_order",
            (round_index,),
        )
        return [StageRecord(*r) for r in rows]

    # -- privacy accounting --------------------------------------------------------------------
    def add_accounting_event(self, round_index: int, event: dict[str, Any], now: float) -> AccountingEventRecord:
        text = json.dumps(event, sort_keys=True, allow_nan=False)
        with self.transaction():
            self._lock("accounting_events")  # also makes sequence order the commit order
            if self._one("SELECT 1 FROM accounting_events WHERE round_index = %s", (round_index,)):
                raise StoreConflictError(
                    f"round {round_index} already has its accounting event; a round is accounted once"
                )
            row = self._one(
                "INSERT INTO accounting_events (round_index, event, recorded_at) VALUES (%s, %s::json, %s) "
                "RETURNING sequence",
                (round_index, text, now),
            )
        assert row is not None
        return AccountingEventRecord(int(row[0]), round_index, json.loads(text), now)

    def accounting_events(self) -> list[AccountingEventRecord]:
        rows = self._all(
            "SELECT sequence, round_index, event::text, recorded_at FROM accounting_events ORDER BY sequence"
        )
        return [AccountingEventRecord(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def save_participation(self, record: ParticipationRecord) -> None:
        data = record.to_dict()
        with self.transaction():
            self._lock("participation_delta", "participation")
            self._execute(
                "INSERT INTO participation_delta (delta) VALUES (%s) "
                "ON CONFLICT (one_row) DO UPDATE SET delta = EXCLUDED.delta",
                (float(record.delta),),
            )
            stored = dict(self._all("SELECT device_id, entry::text FROM participation"))
            for device_id, entry in data["devices"].items():
                text = json.dumps(entry, sort_keys=True, allow_nan=False)
                if stored.pop(device_id, None) != text:
                    self._execute(
                        "INSERT INTO participation (device_id, entry) VALUES (%s, %s::json) "
                        "ON CONFLICT (device_id) DO UPDATE SET entry = EXCLUDED.entry",
                        (device_id, text),
                    )
            if stored:
                self._execute("DELETE FROM participation WHERE device_id = ANY(%s)", (list(stored),))

    def participation(self, delta: float) -> ParticipationRecord:
        # One statement, so the delta and the entries come from one snapshot.
        rows = self._all(
            "SELECT d.delta, p.device_id, p.entry::text FROM participation_delta d LEFT JOIN participation p ON true"
        )
        if not rows:
            return ParticipationRecord(delta)
        stored_delta = float(rows[0][0])
        if stored_delta != delta:
            raise StoreConflictError(
                f"the stored participation record is kept at delta={stored_delta:g}, not {delta:g}; "
                "keep the fleet's delta, or start a new store"
            )
        devices = {device_id: json.loads(entry) for _, device_id, entry in rows if device_id is not None}
        return ParticipationRecord.from_dict({"format": RECORD_FORMAT, "delta": stored_delta, "devices": devices})


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    """Turn a psycopg error into the store's typed errors, one line naming the store."""
    try:
        yield
    except errors.UniqueViolation as exc:
        raise StoreConflictError(
            f"store {where}: {exc.diag.message_primary} (a concurrent change got there first)"
        ) from None
    except errors.ForeignKeyViolation as exc:
        raise StoreNotFoundError(f"store {where}: {exc.diag.message_primary}") from None
    except errors.LockNotAvailable:
        raise StoreConflictError(
            f"store {where}: another process held a lock this change needs for over {LOCK_TIMEOUT_S} s; retry"
        ) from None
    except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
        raise StoreConflictError(f"store {where}: {exc.diag.message_primary}; retry the change") from None
    except errors.NumericValueOutOfRange as exc:
        raise StoreError(f"store {where}: a value is out of range: {exc.diag.message_primary}") from None
    except psycopg.OperationalError as exc:
        raise StoreError(f"store {where}: the database connection failed: {_first_line(exc)}") from None
    except psycopg.Error as exc:
        raise StoreError(f"store {where}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _round(row: tuple[Any, ...]) -> RoundRecord:
    return RoundRecord(row[0], row[1], row[2], RoundStatus(row[3]), row[4], row[5], row[6], row[7])

