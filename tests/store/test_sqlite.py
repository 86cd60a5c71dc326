"""What only the SQLite backend has: its pragmas, its schema version, and the files it refuses."""

from __future__ import annotations

import sqlite3

import pytest

from aggregator.store import SCHEMA_VERSION, SqliteStore, StoreError, StoreVersionError


def test_wal_mode_full_sync_and_the_schema_version(tmp_path):
    with SqliteStore(tmp_path / "a.sqlite") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.schema_version == SCHEMA_VERSION


def test_a_store_from_a_newer_fleetlearn_is_refused_untouched(tmp_path):
    path = tmp_path / "a.sqlite"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreVersionError, match="newer than this fleetlearn"):
        SqliteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_a_file_that_is_not_a_store_or_a_directory_is_named(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a fleetlearn SQLite store"):
        SqliteStore(junk)
    with pytest.raises(StoreError, match="is a directory"):
        SqliteStore(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(tmp_path / "missing" / "a.sqlite")


def test_a_reader_sees_commits_while_a_writer_holds_a_transaction(tmp_path):
    from edge_sdk.secagg.keys import IdentityKey

    path = tmp_path / "a.sqlite"
    writer, reader = SqliteStore(path), SqliteStore(path)
    writer.enrol("pi-a", IdentityKey.generate().public, now=1.0)
    with writer.transaction():
        writer.enrol("pi-b", IdentityKey.generate().public, now=2.0)
        assert [d.device_id for d in reader.devices()] == ["pi-a"]  # WAL: readers are not blocked
    assert [d.device_id for d in reader.devices()] == ["pi-a", "pi-b"]
    writer.close()
    reader.close()
