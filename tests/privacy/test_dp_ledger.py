"""The device ledger: write-ahead durability, crash safety, corruption detection, budget refusal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.accounting.accountant import epsilon_of
from aggregator.accounting.events import round_dp_event
from edge_sdk.cli import main as cli_main
from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import (
    BudgetExceededError,
    DeviceLedger,
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
)
from edge_sdk.privacy.participation import participation_event

ROOT = Path(__file__).resolve().parents[2]
VECTOR = ROOT / "tests" / "vectors" / "dp_ledger_v1.jsonl"
PARAMS = EncodingParams(dim=10000, clip=1.0, gamma=1e-4, bits=20, rotation_seed=bytes(16))
EVENT = participation_event(PARAMS, "distributed", "skellam", 1.5, 40)


def test_participations_persist_across_reopen(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6) as ledger:
        decision = ledger.record("r1", EVENT)
        assert decision.accepted and decision.epsilon_before == 0.0
        ledger.record("r2", EVENT)
        spent = ledger.spent()
    with DeviceLedger.open(path) as again:
        assert again.spent() == spent
        assert [r for r, _ in again.participations()] == ["r1", "r2"]
        assert again.budget_epsilon == 10.0 and again.delta == 1e-6


def test_spent_epsilon_matches_the_host_accountant(tmp_path):
    with DeviceLedger.open(tmp_path / "l.jsonl", 50.0, 1e-6) as ledger:
        for r in range(5):
            ledger.record(f"r{r}", EVENT)
        assert ledger.spent().epsilon == pytest.approx(epsilon_of({round_dp_event(EVENT): 5}, 1e-6), rel=1e-9)
        assert ledger.spent().local_epsilon == pytest.approx(
            epsilon_of({round_dp_event(EVENT, local_only=True): 5}, 1e-6), rel=1e-9
        )


def test_pinned_v1_ledger_loads_with_the_host_accountants_figure(tmp_path):
    copy = tmp_path / "v1.jsonl"
    shutil.copy(VECTOR, copy)
    ledger = DeviceLedger.snapshot(copy)
    events = [event for _, event in ledger.participations()]
    assert len(events) == 4
    counts: dict = {}
    for event in events:
        counts[round_dp_event(event)] = counts.get(round_dp_event(event), 0) + 1
    assert ledger.spent().epsilon == pytest.approx(epsilon_of(counts, ledger.delta), rel=1e-9)


def test_over_budget_round_is_declined_with_a_clear_log_line_and_not_recorded(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 4.0, 1e-6) as ledger:
        ledger.record("r0", EVENT)  # epsilon about 3.3; a second round would reach about 4.9
        decision = ledger.check(EVENT)
        assert not decision.accepted and decision.epsilon_after > 4.0 > decision.epsilon_before
        size = path.stat().st_size
        with caplog.at_level(logging.WARNING, logger="edge_sdk.privacy.ledger"), pytest.raises(
            BudgetExceededError
        ) as info:
            ledger.record("r-over", EVENT)
        assert path.stat().st_size == size
        assert ledger.spent().participations == 1
        assert info.value.decision == decision
    assert any(
        "declining round r-over" in r.message and "over the device budget" in r.message for r in caplog.records
    )


def test_ledger_killed_between_write_and_send_still_counts_the_participation(tmp_path):
    path = tmp_path / "ledger.jsonl"
    DeviceLedger.open(path, 100.0, 1e-6).close()
    child = textwrap.dedent(
        f"""
        import sys, time
        from edge_sdk.privacy.encoding import EncodingParams
        from edge_sdk.privacy.ledger import DeviceLedger
        from edge_sdk.privacy.participation import participation_event
        params = EncodingParams(dim=10000, clip=1.0, gamma=1e-4, bits=20, rotation_seed=bytes(16))
        ledger = DeviceLedger.open({str(path)!r})
        ledger.record("round-7", participation_event(params, "distributed", "skellam", 1.5, 40))
        print("recorded", flush=True)
        time.sleep(60)  # the masked update would be sent here
        print("sent", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recorded"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with DeviceLedger.open(path) as after:
        assert [r for r, _ in after.participations()] == ["round-7"]
        assert after.spent().participations == 1


def test_corrupt_record_raises_and_the_file_is_left_untouched(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6) as ledger:
        ledger.record("r1", EVENT)
        ledger.record("r2", EVENT)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"round":"r1"', b'"round":"rX"')
    tampered = b"\n".join(lines)
    path.write_bytes(tampered)
    with pytest.raises(LedgerCorruptError, match="line 2 fails its checksum"):
        DeviceLedger.open(path)
    with pytest.raises(LedgerCorruptError):
        DeviceLedger.snapshot(path)
    assert path.read_bytes() == tampered


def test_removed_record_breaks_the_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6) as ledger:
        for r in range(3):
            ledger.record(f"r{r}", EVENT)
    lines = path.read_bytes().split(b"\n")
    del lines[2]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerCorruptError, match="breaks the record chain"):
        DeviceLedger.open(path)


def test_torn_final_write_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6) as ledger:
        ledger.record("r1", EVENT)
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"checksum":"abc","data":{"round":"r2"')
    with caplog.at_level(logging.WARNING, logger="edge_sdk.privacy.ledger"), DeviceLedger.open(path) as ledger:
        assert ledger.spent().participations == 1
    assert any("torn final write" in r.message for r in caplog.records)
    assert path.read_bytes() == intact


def test_second_process_cannot_open_a_held_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6):
        script = f"from edge_sdk.privacy.ledger import DeviceLedger\nDeviceLedger.open({str(path)!r})\n"
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode != 0 and "LedgerBusyError" in out.stderr
    assert LedgerBusyError.__mro__[1] is LedgerError


def test_budget_change_is_itself_recorded(tmp_path):
    path = tmp_path / "ledger.jsonl"
    DeviceLedger.open(path, 5.0, 1e-6).close()
    DeviceLedger.open(path, 7.0, 1e-6).close()
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["open", "budget"]
    assert DeviceLedger.snapshot(path).budget_epsilon == 7.0


def test_missing_ledger_without_budget_and_bad_budgets_are_rejected(tmp_path):
    with pytest.raises(LedgerError, match="no privacy ledger"):
        DeviceLedger.open(tmp_path / "absent.jsonl")
    assert not (tmp_path / "absent.jsonl").exists()
    with pytest.raises(ConfigError, match="budget_epsilon"):
        DeviceLedger.open(tmp_path / "l.jsonl", 0.0, 1e-6)
    with pytest.raises(ConfigError, match="delta"):
        DeviceLedger.open(tmp_path / "l.jsonl", 1.0, 1.5)


def test_device_budget_command_prints_spent_and_left(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 10.0, 1e-6) as ledger:
        ledger.record("r1", EVENT)
        expected = ledger.spent()
        assert cli_main(["device", "budget", "--ledger", str(path), "--json"]) == 0  # works while held
    shown = json.loads(capsys.readouterr().out)
    assert shown["epsilon_spent"] == pytest.approx(expected.epsilon)
    assert shown["epsilon_remaining"] == pytest.approx(10.0 - expected.epsilon)
    assert shown["participations"] == 1
    assert cli_main(["device", "budget", "--ledger", str(path)]) == 0
    text = capsys.readouterr().out
    assert "epsilon left" in text and f"{10.0 - expected.epsilon:.4f}" in text


def test_device_budget_command_reports_a_corrupt_ledger_as_an_error(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    path.write_text("not json\n")
    assert cli_main(["device", "budget", "--ledger", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_participate_returns_a_declined_decision_instead_of_raising(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.open(path, 4.0, 1e-6) as ledger:
        assert ledger.participate("r0", EVENT).accepted
        with caplog.at_level(logging.WARNING, logger="edge_sdk.privacy.ledger"):
            declined = ledger.participate("r1", EVENT)
        assert not declined.accepted and "over the device budget" in declined.reason
        assert ledger.spent().participations == 1
    assert any("declining round r1" in r.message for r in caplog.records)


def test_empty_ledger_from_an_interrupted_creation_is_started_not_rejected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"")
    with pytest.raises(LedgerCorruptError, match="no opening record"):
        DeviceLedger.snapshot(path)
    with DeviceLedger.open(path, 5.0, 1e-6) as ledger:
        assert ledger.spent().participations == 0 and ledger.budget_epsilon == 5.0
    assert DeviceLedger.snapshot(path).budget_epsilon == 5.0
