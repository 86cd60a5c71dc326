"""What only the PostgreSQL backend has to show: several real OS processes on one real database.

Migrations run once when a coordinator and workers open a fresh schema at the same moment; a
schema from a newer fleetlearn is refused untouched; a process SIGKILLed inside ``transaction()``
leaves nothing of it; two writer processes never reuse a model version; JSON reads back exactly;
a lost connection is one error and the next call reconnects. Each test has its own schema
(``postgres_schema`` in ``conftest.py``).
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aggregator.store import RoundStatus, SqliteStore, StoreConflictError, StoreError, StoreVersionError, open_store

from .conftest import POSTGRES_DSN, postgres_dsn_for
from .crash_writer import model_bytes, write_round
from .test_crash import kill, start_writer

psycopg = pytest.importorskip("psycopg")

from aggregator.store import postgres  # noqa: E402  (needs psycopg)
from aggregator.store.postgres import SCHEMA_VERSION, Migration, PostgresStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Opens the store once a line arrives on stdin, so both processes start migrating at the same moment.
OPENER = """
import logging, sys
from aggregator.store.postgres import PostgresStore
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
print("ready", flush=True)
sys.stdin.readline()
with PostgresStore(sys.argv[1], schema=sys.argv[2]) as store:
    print("opened at version", store.schema_version, flush=True)
"""

# Publishes `count` model versions, each latest + 1 with its accounting event in one transaction.
VERSION_WRITER = """
import sys
from aggregator.store import StoreConflictError
from aggregator.store.postgres import PostgresStore
dsn, schema, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = PostgresStore(dsn, schema=schema)
print("ready", flush=True)
sys.stdin.readline()
done = conflicts = 0
while done < count:
    try:
        with store.transaction():
            latest = store.latest_model()
            version = 0 if latest is None else latest.version + 1
            store.put_model(version, f"{name} {version}".encode(), now=float(version), round_index=version)
            store.add_accounting_event(version, {"writer": name}, now=float(version))
    except StoreConflictError:
        conflicts += 1
        continue
    done += 1
    print("committed", version, flush=True)
print("conflicts", conflicts, flush=True)
"""


def start_together(scripts: list[list[str]]) -> list[list[str]]:
    """Run each ``[code, *args]`` in its own interpreter, release them at once, return their stdout lines."""
    processes = [
        subprocess.Popen([sys.executable, "-c", *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
        for args in scripts
    ]
    for process in processes:  # every one has imported and is waiting
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out
        outputs.append(out.splitlines())
    return outputs


def migrations_applied(admin, schema: str) -> list[int]:
    return [r[0] for r in admin.execute(f'SELECT version FROM "{schema}".fleetlearn_schema ORDER BY version')]


@pytest.mark.slow
def test_two_processes_opening_a_fresh_schema_at_once_migrate_it_once(postgres_admin, postgres_schema, caplog):
    outputs = start_together([[OPENER, POSTGRES_DSN, postgres_schema] for _ in range(2)])
    for lines in outputs:
        assert lines[-1] == f"opened at version {SCHEMA_VERSION}"
    migrated = [[line for line in lines if "migrated to schema version" in line] for lines in outputs]
    assert sorted(len(m) for m in migrated) == [0, SCHEMA_VERSION]  # one process migrated, the other waited
    assert migrations_applied(postgres_admin, postgres_schema) == list(range(1, SCHEMA_VERSION + 1))
    with caplog.at_level(logging.INFO, logger="aggregator.store.postgres"):
        PostgresStore(POSTGRES_DSN, schema=postgres_schema).close()
    assert "migrated" not in caplog.text  # a migrated schema is left as it is


def test_a_new_migration_is_applied_in_order_and_a_failing_one_leaves_nothing(postgres_admin, postgres_schema,
                                                                             monkeypatch):
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        store.put_model(0, b"initial", now=1.0)
    broken = Migration("half a step", ("CREATE TABLE half (x integer)", "SELECT no_such_function()"))
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS + (broken,))
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="no_such_function"):
        PostgresStore(POSTGRES_DSN, schema=postgres_schema)
    assert migrations_applied(postgres_admin, postgres_schema) == list(range(1, SCHEMA_VERSION + 1))
    assert postgres_admin.execute("SELECT to_regclass(%s)", (f"{postgres_schema}.half",)).fetchone()[0] is None

    step = Migration("a column", ("ALTER TABLE models ADD COLUMN note text NOT NULL DEFAULT ''",))
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:SCHEMA_VERSION] + (step,))
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
        assert store.model(0).payload == b"initial"  # the data came through the upgrade
    rows = postgres_admin.execute(
        f'SELECT version, description FROM "{postgres_schema}".fleetlearn_schema ORDER BY version'
    ).fetchall()
    assert rows[-1] == (SCHEMA_VERSION + 1, "a column") and len(rows) == SCHEMA_VERSION + 1


def test_a_schema_from_a_newer_fleetlearn_is_refused_untouched(postgres_admin, postgres_schema):
    PostgresStore(POSTGRES_DSN, schema=postgres_schema).close()
    postgres_admin.execute(
        f'INSERT INTO "{postgres_schema}".fleetlearn_schema (version, description) VALUES (%s, %s)',
        (SCHEMA_VERSION + 1, "from the future"),
    )
    with pytest.raises(StoreVersionError, match="newer than this fleetlearn"):
        PostgresStore(POSTGRES_DSN, schema=postgres_schema)
    assert migrations_applied(postgres_admin, postgres_schema) == list(range(1, SCHEMA_VERSION + 2))


def test_a_schema_holding_someone_elses_tables_is_refused(postgres_admin, postgres_schema):
    postgres_admin.execute(f'CREATE TABLE "{postgres_schema}".models (id integer)')
    with pytest.raises(StoreError, match="not made by fleetlearn's migrations; give the store a schema of its own"):
        PostgresStore(POSTGRES_DSN, schema=postgres_schema)
    assert postgres_admin.execute("SELECT to_regclass(%s)", (f"{postgres_schema}.devices",)).fetchone()[0] is None


def check_consistent(schema: str) -> list[int]:
    """Every stored round has its model (right bytes) and its event, and nothing else exists: returns them."""
    with PostgresStore(POSTGRES_DSN, schema=schema) as store:
        rounds = [r.round_index for r in store.rounds()]
        assert all(r.status is RoundStatus.COMPLETED for r in store.rounds())
        models = [m for m in range(len(rounds) + 2) if store.model(m) is not None]
        events = [e.round_index for e in store.accounting_events()]
        assert rounds == models == events == list(range(len(rounds))), (rounds, models, events)
        for i in rounds:
            assert store.model(i).payload == model_bytes(i)
        return rounds


def test_sigkill_inside_a_transaction_keeps_every_commit_and_none_of_the_open_one(postgres_schema):
    writer = start_writer(postgres_dsn_for(postgres_schema), 0, "hold")
    lines = []
    assert writer.stdout is not None
    for line in writer.stdout:
        lines.append(line.strip())
        if line.startswith("inside"):
            break
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as reader:  # a reader does not wait for the writer
        assert reader.model(3) is None and reader.latest_model().version == 2
    kill(writer)
    assert lines == ["committed 0", "committed 1", "committed 2", "inside 3"]
    assert check_consistent(postgres_schema) == [0, 1, 2]  # round 3 was written but never committed: absent
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:  # and its locks died with it
        write_round(store, 3)
    assert check_consistent(postgres_schema) == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_reported_commit(postgres_schema):
    rng = random.Random(20240611)
    committed: list[int] = []
    for _ in range(3):
        writer = start_writer(postgres_dsn_for(postgres_schema), len(committed))
        assert writer.stdout is not None
        first = writer.stdout.readline()  # started and writing, however slow the start-up was
        time.sleep(rng.uniform(0.0, 0.3))
        reported = [int(line.split()[1]) for line in [first, *kill(writer)] if line.startswith("committed")]
        stored = check_consistent(postgres_schema)
        assert set(committed + reported) <= set(stored)  # reported commits survive; at most one more
        assert len(stored) - len(committed + reported) in (0, 1)
        committed = stored
    assert len(committed) >= 3


@pytest.mark.slow
def test_two_writer_processes_never_reuse_a_model_version(postgres_schema):
    count = 15
    outputs = start_together(
        [[VERSION_WRITER, POSTGRES_DSN, postgres_schema, name, str(count)] for name in ("alpha", "beta")]
    )
    reported = {
        name: [int(line.split()[1]) for line in lines if line.startswith("committed")]
        for name, lines in zip(("alpha", "beta"), outputs, strict=True)
    }
    assert len(reported["alpha"]) == len(reported["beta"]) == count
    assert sorted(reported["alpha"] + reported["beta"]) == list(range(2 * count))  # each version once, no gap
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        assert store.latest_model().version == 2 * count - 1
        events = {e.round_index: e.event["writer"] for e in store.accounting_events()}
        for name, versions in reported.items():
            for version in versions:  # the model and the event of a version come from the same transaction
                assert store.model(version).payload == f"{name} {version}".encode()
                assert events[version] == name
    conflicts = [int(lines[-1].split()[1]) for lines in outputs]
    logging.getLogger(__name__).info("version conflicts retried: %s", conflicts)


def test_a_lower_model_version_waits_for_a_concurrent_higher_one_and_is_refused(postgres_schema):
    first, second = (PostgresStore(POSTGRES_DSN, schema=postgres_schema) for _ in range(2))
    first.put_model(0, b"initial", now=0.0)
    outcome: list[BaseException | None] = []

    def put_lower() -> None:
        try:
            second.put_model(3, b"three", now=2.0)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    with first.transaction():
        first.put_model(5, b"five", now=1.0)
        other = threading.Thread(target=put_lower)
        other.start()
        other.join(0.5)
        assert other.is_alive()  # it queues behind the open transaction's lock on models
    other.join(30)
    assert isinstance(outcome[0], StoreConflictError), outcome
    assert "below the latest stored version 5" in str(outcome[0])
    assert second.model(3) is None and second.latest_model().version == 5
    first.close()
    second.close()


def test_json_reads_back_exactly_as_written(postgres_schema):
    awkward = {"big": 1e16, "negative_zero": -0.0, "tiny": 5e-324, "int": 2**70, "text": "ε ≤ 10 \u2028", "list": [1.5]}
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        store.add_accounting_event(0, awkward, now=1.0)
    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        [stored] = store.accounting_events()
    assert repr(stored.event) == repr(dict(sorted(awkward.items())))  # types too: 1e16 stays a float


def test_open_store_opens_a_dsn_or_a_path(postgres_schema, tmp_path):
    with open_store(postgres_dsn_for(postgres_schema)) as store:
        assert isinstance(store, PostgresStore) and store.schema == postgres_schema
    with open_store(tmp_path / "a.sqlite") as store:
        assert isinstance(store, SqliteStore)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_sqlite_path_never_imports_psycopg_and_a_missing_psycopg_is_one_line(tmp_path):
    done = run_python(
        "import sys\nfrom aggregator.store import open_store\n"
        f"open_store({str(tmp_path / 'a.sqlite')!r}).close()\nprint(sorted(m for m in sys.modules if 'psycopg' in m))"
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    done = run_python(
        "import sys\nsys.modules['psycopg'] = None  # as if it were not installed\n"
        "from aggregator.store import StoreError, open_store\n"
        "try:\n    open_store('postgresql://127.0.0.1/test')\nexcept StoreError as exc:\n    print(exc)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "a postgresql:// store needs psycopg 3, which is not installed: pip install 'fleetlearn[postgres]'"
    )


def test_an_unreachable_server_is_one_line_without_the_password():
    with pytest.raises(StoreError, match="cannot connect") as caught:
        PostgresStore("postgresql://fleet:s3cret-pw@127.0.0.1:1/test")
    message = str(caught.value)
    assert "s3cret-pw" not in message and "\n" not in message
    assert message.startswith("store postgresql://fleet@127.0.0.1:1/test: cannot connect")


def test_a_lost_connection_is_a_store_error_and_the_next_call_reconnects(postgres_admin, postgres_schema):
    from edge_sdk.secagg.keys import IdentityKey

    with PostgresStore(POSTGRES_DSN, schema=postgres_schema) as store:
        store.enrol("pi-a", IdentityKey.generate().public, now=1.0)
        with pytest.raises(StoreError, match="connection"), store.transaction():
            store.enrol("pi-b", IdentityKey.generate().public, now=2.0)
            postgres_admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
            store.enrol("pi-c", IdentityKey.generate().public, now=3.0)
        assert [d.device_id for d in store.devices()] == ["pi-a"]  # reconnected; nothing of the lost one
        postgres_admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with pytest.raises(StoreError, match="connection"):
            store.devices()
        store.enrol("pi-d", IdentityKey.generate().public, now=4.0)
        assert [d.device_id for d in store.devices()] == ["pi-a", "pi-d"]
    with pytest.raises(StoreError, match="was closed"):  # a closed store does not quietly reconnect
        store.devices()


def test_column_types_hold_what_the_records_hold(postgres_admin, postgres_schema):
    PostgresStore(POSTGRES_DSN, schema=postgres_schema).close()
    types = dict(postgres_admin.execute(
        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns WHERE table_schema = %s",
        (postgres_schema,),
    ).fetchall())
    assert types["devices.public_key"] == types["models.payload"] == types["rounds.state"] == "bytea"
    assert types["models.version"] == types["rounds.round_index"] == types["accounting_events.sequence"] == "bigint"
    assert types["rounds.started_at"] == types["participation_delta.delta"] == "double precision"
    assert types["accounting_events.event"] == types["participation.entry"] == "json"
