"""Sharded aggregation over one Mosquitto through the CLI: a coordinator, 2 worker processes, 10 device processes.

Two rounds must complete, each split into two sub-cohorts of 5 summed by different workers, and the
store must hold contiguous model versions and one accounting per round. ``SHARD_LOGS=1`` runs every
process with ``-vv`` and writes their stderr next to the test's files (the way to debug it).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from service.round_fleet import Process, device_command, make_fleet

from aggregator.store import RoundStatus, open_store

pytestmark = pytest.mark.slow


def _verbose(argv: list[str]) -> list[str]:
    return argv[:3] + ["-vv"] + argv[3:] if os.environ.get("SHARD_LOGS") else argv


def _messages(text: str) -> list[str]:
    return [json.loads(line)["message"] for line in text.splitlines() if line.startswith("{")]


def test_two_workers_complete_two_rounds(tmp_path, broker):
    fleet = make_fleet(tmp_path, 10, broker.url, tmp_path / "cache",
                       rounds={"count": 2, "cohort_min": 10, "retry_after": 1.0},
                       sharding={"workers": 2, "sub_cohort_min": 4, "task_deadline": 5.0})
    base = [sys.executable, "-m", "edge_sdk.cli", "aggregator"]
    procs = [Process.start(f"w{i}", _verbose(base + ["worker", "--config", str(fleet.config), "--worker-id",
                                                     f"w{i}"])) for i in range(2)]
    procs += [Process.start(d, _verbose(device_command(fleet, d, broker.url))) for d in fleet.devices]
    coordinator = Process.start("coordinator", _verbose(base + ["coordinator", "--config", str(fleet.config)]))
    try:
        coordinator.popen.wait(120)
    finally:
        for p in procs:
            p.stop()
        coordinator.stop()
        if os.environ.get("SHARD_LOGS"):
            for p in procs + [coordinator]:
                (tmp_path / f"{p.name}.log").write_text(p.text())
    text = coordinator.text()
    assert coordinator.popen.returncode == 0, text[-3000:]
    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        completed = store.rounds(RoundStatus.COMPLETED)
        assert len(completed) == 2, text[-4000:]
        assert store.latest_model().version == 2
        assert all(store.model(v) is not None for v in (0, 1, 2))
        assert sorted(e.round_index for e in store.accounting_events()) == sorted(r.round_index for r in completed)
    published = [m for m in _messages(text) if "published model version" in m]
    assert len(published) == 2 and all("from 10 contributors" in m for m in published), published
    for worker in procs[:2]:  # per-worker handout: each worker summed one sub-cohort of 5 in each round
        done = [m for m in _messages(worker.text()) if ": DONE (" in m]
        assert len(done) == 2 and all("(5 contributors)" in m for m in done), (worker.name, done)
