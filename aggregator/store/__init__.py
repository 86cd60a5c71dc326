"""The aggregator's durable state: enrolled devices, plans, models, rounds and privacy accounting.

``Store`` (``base``) is the one interface the service, the CLI and the tests use; ``SqliteStore``
(``sqlite``) is its embedded SQLite backend, ``PostgresStore`` (``postgres``, the ``postgres``
extra) the one a coordinator and workers share. ``open_store(location)`` opens (and migrates)
either: a ``postgresql://`` DSN or a file path.
"""

from __future__ import annotations

import os

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
)
from aggregator.store.sqlite import SCHEMA_VERSION, SqliteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(location: str | os.PathLike[str]) -> Store:
    """Open the store at ``location``: a ``postgresql://`` DSN (``PostgresStore``) or a SQLite file path.

    psycopg is imported only for a DSN, so the SQLite path never loads it.
    """
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        try:
            from aggregator.store.postgres import PostgresStore
        except ImportError as exc:
            if not (exc.name or "").startswith("psycopg"):
                raise
            raise StoreError(
                "a postgresql:// store needs psycopg 3, which is not installed: pip install 'fleetlearn[postgres]'"
            ) from None
        return PostgresStore(location)
    return SqliteStore(location)

__all__ = [
    "SCHEMA_VERSION",
    "AccountingEventRecord",
    "DeviceRecord",
    "ModelRecord",
    "PlanRecord",
    "RoundRecord",
    "RoundStatus",
    "SqliteStore",
    "StageRecord",
    "Store",
    "StoreConflictError",
    "StoreError",
    "StoreNotFoundError",
    "StoreVersionError",
    "check_device_id",
    "open_store",
]
