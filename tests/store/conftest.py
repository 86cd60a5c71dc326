"""Backends the store contract runs against: every ``Store`` must pass the same tests.

A later backend (PostgreSQL) adds itself to ``BACKENDS`` and to the fixture below.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store import SqliteStore, Store

BACKENDS = ["sqlite"]


def open_backend(backend: str, directory: Path) -> Store:
    if backend == "sqlite":
        return SqliteStore(directory / "aggregator.sqlite")
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[Store]:
    opened = open_backend(backend, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def reopen(backend: str, tmp_path: Path):
    """Open the same store again (as a restarted service would)."""
    return lambda: open_backend(backend, tmp_path)
