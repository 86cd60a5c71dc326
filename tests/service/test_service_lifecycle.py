"""The service's life cycle as an operator sees it: a bad config, SIGTERM mid-round, a crash, restarts.

Real processes over a real Mosquitto; the store is read back afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from aggregator.store import RoundStatus, open_store

from .round_fleet import ROOT, make_fleet
from .test_round_over_mqtt import Fleet


@pytest.mark.slow  # two interpreter start-ups: ~3 s
def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path):
    config = tmp_path / "aggregator.toml"
    config.write_text('[fleet]\nid = "has space"\nstate_dir = "s"\n[broker]\nurls = ["mqtt://localhost:1"]\n'
                      '[model]\nbundle = "b"\n')
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "aggregator", "serve", "--config", str(config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "fleet.id" in out.stderr, out.stderr
    config.write_text(config.read_text().replace("has space", "ok") + "[rounds]\ncohort_mn = 3\n")
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "aggregator", "serve", "--config", str(config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "rounds.cohort_mn" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_and_a_crash_mid_round_then_restarts_finish_the_rounds(tmp_path, broker, tmp_path_factory):
    disk = make_fleet(tmp_path, 4, broker.url, tmp_path_factory.getbasetemp(),
                      rounds={"count": 3, "cohort_min": 4, "retry_after": 0.2}, privacy={"dropout": 0.0})
    fleet = Fleet(disk, broker.url)
    try:
        fleet.start_all()
        fleet.wait_for(lambda e: e.get("round") == 1 and e.get("stage") == "SHARE_KEYS", 60, "round 1 SHARE_KEYS")
        assert fleet.aggregator.stop() == 0  # SIGTERM: the open round is aborted and persisted, exit 0
        with open_store(disk.state_dir / "aggregator.sqlite") as store:
            record = store.round(1)
            assert record.status is RoundStatus.ABORTED and "SIGTERM" in record.detail
            assert store.latest_model().version == 0
        fleet.start_aggregator()  # restarts: round 2 is next, and the devices take it
        fleet.wait_for(lambda e: e.get("round") == 2 and e.get("stage") == "PUBLISH" and "contributors" in e, 60,
                       "round 2 published")
        fleet.wait_for(lambda e: e.get("round") == 3 and e.get("stage") == "MASKED_INPUT", 60, "round 3 MASKED_INPUT")
        fleet.aggregator.kill()  # a crash: round 3 stays "running" in the store
        with open_store(disk.state_dir / "aggregator.sqlite") as store:
            assert store.round(3).status is RoundStatus.RUNNING
        fleet.start_aggregator()
        assert fleet.wait_exit(90) == 0
    finally:
        fleet.stop()
    with open_store(disk.state_dir / "aggregator.sqlite") as store:
        statuses = {r.round_index: r.status for r in store.rounds()}
        assert statuses == {1: RoundStatus.ABORTED, 2: RoundStatus.COMPLETED, 3: RoundStatus.ABORTED,
                            4: RoundStatus.COMPLETED, 5: RoundStatus.COMPLETED}
        assert "restarted" in store.round(3).detail
        assert store.latest_model().version == 3  # one per completed round, none lost, none from an aborted one
        assert [e.round_index for e in store.accounting_events()] == [2, 4, 5]
