"""The aggregator's durable state: enrolled devices, plans, models, rounds and privacy accounting.

``Store`` (``base``) is the one interface the service, the CLI and the tests use; ``SqliteStore``
(``sqlite``) is its SQLite backend. ``open_store(path)`` opens (and migrates) the SQLite file.
"""

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
from aggregator.store.sqlite import SCHEMA_VERSION, SqliteStore, open_store

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
