"""Backends the store contract runs against: every ``Store`` must pass the same tests.

``sqlite`` gets a file in the test's own directory; ``postgres`` gets a fresh schema of its own
(a random name, dropped afterwards) in the database at ``FLEETLEARN_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``). An unreachable server skips the PostgreSQL tests
with a reason saying so, which ``tests/conftest.py`` turns into a failure under ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import SqliteStore, Store

BACKENDS = ["sqlite", "postgres"]
POSTGRES_DSN = os.environ.get("FLEETLEARN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def open_backend(backend: str, location: Path | str) -> Store:
    """Open the store at ``location``: a directory for sqlite, a schema name for postgres."""
    if backend == "sqlite":
        return SqliteStore(Path(location) / "aggregator.sqlite")
    if backend == "postgres":
        from aggregator.store.postgres import PostgresStore

        return PostgresStore(POSTGRES_DSN, schema=str(location))
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[object]:
    """A connection to the test database for creating and dropping schemas; skips if there is none."""
    psycopg = pytest.importorskip("psycopg")
    from aggregator.store.postgres import describe_dsn

    try:
        conn = psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"PostgreSQL is not installed or not running at {describe_dsn(POSTGRES_DSN)} "
                    f"(set FLEETLEARN_TEST_POSTGRES): {first}")
    conn.execute("SET lock_timeout = '30s'")
    yield conn
    conn.close()


@pytest.fixture
def postgres_schema(postgres_admin) -> Iterator[str]:
    """A fresh, empty schema for one test, dropped with everything in it afterwards."""
    from psycopg import sql

    name = f"fleetlearn_test_{secrets.token_hex(6)}"
    postgres_admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    postgres_admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def postgres_dsn_for(schema: str) -> str:
    """The test DSN with ``schema`` as its search_path: what a separate process passes to ``open_store``."""
    separator = "&" if "?" in POSTGRES_DSN else "?"
    return f"{POSTGRES_DSN}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def location(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    if backend == "postgres":
        return request.getfixturevalue("postgres_schema")
    return tmp_path


@pytest.fixture
def store(backend: str, location: Path | str) -> Iterator[Store]:
    opened = open_backend(backend, location)
    yield opened
    opened.close()


@pytest.fixture
def reopen(backend: str, location: Path | str):
    """Open the same store again (as a restarted service would)."""
    return lambda: open_backend(backend, location)
