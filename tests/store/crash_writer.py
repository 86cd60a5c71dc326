"""A writer process for the crash tests: commits rounds until it is killed.

Run as ``python tests/store/crash_writer.py STORE START [hold]`` (STORE: a SQLite path or a
``postgresql://`` DSN). Each round i is one transaction holding its model (deterministic bytes),
its completed round record and its accounting event; after each commit it prints ``committed i``.
With ``hold`` it opens one more transaction, writes everything of round i, prints ``inside i`` and
waits to be killed before it commits.
"""

from __future__ import annotations

import hashlib
import sys
import time

from aggregator.store import RoundRecord, RoundStatus, Store, open_store

MODEL_BYTES = 256 * 1024  # big enough that a commit spans many pages


def model_bytes(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (MODEL_BYTES // len(seed) + 1))[:MODEL_BYTES]


def write_round(store: Store, i: int) -> None:
    store.put_model(i, model_bytes(i), now=float(i), round_index=i)
    store.save_round(RoundRecord(i, bytes(32), "PUBLISH", RoundStatus.COMPLETED, float(i), float(i)))
    store.add_accounting_event(i, {"round": i, "epsilon": 0.5}, now=float(i))


def main() -> None:
    path, start = sys.argv[1], int(sys.argv[2])
    hold = len(sys.argv) > 3 and sys.argv[3] == "hold"
    store = open_store(path)  # a SQLite path or a postgresql:// DSN
    i = start
    while True:
        if hold and i == start + 3:
            with store.transaction():
                write_round(store, i)
                print(f"inside {i}", flush=True)
                time.sleep(3600)
        with store.transaction():
            write_round(store, i)
        print(f"committed {i}", flush=True)
        i += 1


if __name__ == "__main__":
    main()
