"""The ledger head: a ledger that is cut, torn, rolled back, emptied or deleted is detected, never shrunk.

Every case works on real files with real fsyncs; the crash cases kill real subprocesses with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import (
    DeviceLedger,
    LedgerCorruptError,
    LedgerError,
    LedgerRollbackError,
    head_path,
)
from edge_sdk.privacy.ledger_head import LedgerHead, LedgerHeadError
from edge_sdk.privacy.participation import participation_event

ROOT = Path(__file__).resolve().parents[2]
VECTOR = ROOT / "tests" / "vectors" / "dp_ledger_v1.jsonl"
PARAMS = EncodingParams(dim=10000, clip=1.0, gamma=1e-4, bits=20, rotation_seed=bytes(16))
EVENT = participation_event(PARAMS, "distributed", "skellam", 1.5, 40)


def ledger_with(path: Path, rounds: int) -> None:
    with DeviceLedger.create(path, 100.0, 1e-6) as ledger:
        for r in range(rounds):
            ledger.record(f"r{r}", EVENT)


# -- the head value --------------------------------------------------------------------------------
def test_head_wire_form_is_40_bytes_sequence_big_endian_then_digest():
    head = LedgerHead(0x0102030405060708, bytes(range(32)))
    wire = head.to_bytes()
    assert wire == bytes.fromhex("0102030405060708") + bytes(range(32))
    assert len(wire) == 40 and LedgerHead.from_bytes(wire) == head
    assert LedgerHead.genesis().to_bytes() == bytes(40)


@pytest.mark.parametrize("size", [0, 39, 41, 72])
def test_head_from_bytes_refuses_any_other_length(size):
    with pytest.raises(LedgerHeadError, match="exactly 40 bytes"):
        LedgerHead.from_bytes(bytes(size))


def test_head_refuses_a_short_digest_and_a_genesis_with_a_digest():
    with pytest.raises(LedgerHeadError, match="32 bytes"):
        LedgerHead(3, bytes(31))
    with pytest.raises(LedgerHeadError, match="sequence 0"):
        LedgerHead.from_bytes(bytes(8) + b"\x01" * 32)
    with pytest.raises(LedgerHeadError, match="u64"):
        LedgerHead(-1, bytes(32))


@settings(max_examples=100, deadline=None)
@given(sequence=st.integers(1, 2**64 - 1), digest=st.binary(min_size=32, max_size=32))
def test_head_round_trips_through_bytes_and_dict(sequence, digest):
    head = LedgerHead(sequence, digest)
    assert LedgerHead.from_bytes(head.to_bytes()) == head
    assert LedgerHead.from_dict(json.loads(json.dumps(head.to_dict()))) == head


def test_ledger_head_counts_records_and_names_the_last_ones_checksum(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.create(path, 10.0, 1e-6) as ledger:
        assert ledger.head().sequence == 1  # the opening record
        ledger.record("r1", EVENT)
        head = ledger.head()
    lines = path.read_bytes().splitlines()
    last = json.loads(lines[-1])
    assert head.sequence == len(lines) == 2
    assert head.digest == bytes.fromhex(last["checksum"])
    body = {k: v for k, v in last.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert head.digest == hashlib.sha256(canonical).digest()  # the record's SHA-256
    assert json.loads(head_path(path).read_text())["sequence"] == 2
    assert DeviceLedger.snapshot(path).head() == head


# -- local detection ---------------------------------------------------------------------------------
def test_records_cut_off_at_a_record_boundary_are_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))
    cut = path.read_bytes()
    for opener in (DeviceLedger.open, DeviceLedger.snapshot):
        with pytest.raises(LedgerRollbackError, match=rf"{path} holds 3 records but its head .* says 6.*cut off"):
            opener(path)
    assert path.read_bytes() == cut


def test_a_torn_last_record_the_head_covers_is_detected_not_dropped(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 2)
    torn = path.read_bytes()[:-40]
    path.write_bytes(torn)
    with pytest.raises(LedgerRollbackError, match="last record is torn although its write had completed"):
        DeviceLedger.open(path)
    assert path.read_bytes() == torn  # the evidence is not truncated away


def test_a_ledger_restored_from_an_older_copy_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.create(path, 100.0, 1e-6) as ledger:
        ledger.record("r1", EVENT)
        shutil.copy(path, tmp_path / "backup.jsonl")
        ledger.record("r2", EVENT)
        ledger.record("r3", EVENT)
    shutil.copy(tmp_path / "backup.jsonl", path)
    with pytest.raises(LedgerRollbackError, match="holds 2 records but its head .* says 4"):
        DeviceLedger.open(path, create=False)


def test_a_different_ledger_of_the_same_length_is_detected(tmp_path):
    path, other = tmp_path / "ledger.jsonl", tmp_path / "other.jsonl"
    ledger_with(path, 2)
    ledger_with(other, 2)
    shutil.copy(other, path)
    with pytest.raises(LedgerCorruptError, match="record 2 is not the one its head"):
        DeviceLedger.open(path)


def test_a_deleted_ledger_is_detected_and_not_recreated(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 3)
    path.unlink()
    for attempt in (
        lambda: DeviceLedger.open(path, 100.0, 1e-6),
        lambda: DeviceLedger.open(path, create=False),
        lambda: DeviceLedger.create(path, 100.0, 1e-6),
        lambda: DeviceLedger.snapshot(path),
    ):
        with pytest.raises(LedgerRollbackError, match=rf"{path} is missing but its head .* held 4 records.*deleted"):
            attempt()
    assert not path.exists()


def test_an_emptied_ledger_is_detected(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 3)
    path.write_bytes(b"")
    with pytest.raises(LedgerRollbackError, match=rf"{path} is empty but its head .* held 4 records.*emptied"):
        DeviceLedger.open(path, 100.0, 1e-6)
    assert path.read_bytes() == b""


def test_a_missing_ledger_on_an_enrolled_device_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with pytest.raises(LedgerError, match="this device is enrolled: a missing ledger is not a fresh start"):
        DeviceLedger.open(path, 100.0, 1e-6, create=False)
    assert not path.exists()
    path.write_bytes(b"")  # emptied, head deleted too
    with pytest.raises(LedgerCorruptError, match="this device is enrolled"):
        DeviceLedger.open(path, create=False)


def test_create_refuses_an_existing_ledger_and_needs_a_budget(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 1)
    with pytest.raises(LedgerError, match="already exists"):
        DeviceLedger.create(path, 100.0, 1e-6)
    assert DeviceLedger.snapshot(path).spent().participations == 1
    with pytest.raises(ConfigError, match="needs a budget"):
        DeviceLedger.open(tmp_path / "new.jsonl", create=True)


def test_a_deleted_head_on_a_ledger_that_keeps_one_is_an_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 2)
    head_path(path).unlink()
    with pytest.raises(LedgerCorruptError, match="is missing, but the ledger keeps one since record 0"):
        DeviceLedger.open(path)


def test_an_unreadable_head_names_the_head_file(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 1)
    head_path(path).write_text('{"format":1,"sequence":9,"digest":"00","checksum":"x"}\n')
    with pytest.raises(LedgerCorruptError, match=rf"the head {head_path(path)} .* unreadable"):
        DeviceLedger.open(path)


# -- crash windows -------------------------------------------------------------------------------------
def test_a_head_one_record_behind_is_the_crash_window_and_is_repaired(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.create(path, 100.0, 1e-6) as ledger:
        ledger.record("r1", EVENT)
        old_head = head_path(path).read_bytes()
        ledger.record("r2", EVENT)
        head = ledger.head()
    head_path(path).write_bytes(old_head)  # as if killed after the record's fsync, before the head's rename
    assert DeviceLedger.snapshot(path).spent().participations == 2
    with caplog.at_level(logging.INFO, logger="edge_sdk.privacy.ledger"), DeviceLedger.open(path) as again:
        assert again.spent().participations == 2 and again.head() == head
    assert any("1 record(s) behind" in r.message for r in caplog.records)
    assert json.loads(head_path(path).read_text())["sequence"] == head.sequence


def test_a_head_several_records_behind_keeps_every_record_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    with DeviceLedger.create(path, 100.0, 1e-6) as ledger:
        old_head = head_path(path).read_bytes()
        for r in range(3):
            ledger.record(f"r{r}", EVENT)
    head_path(path).write_bytes(old_head)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.privacy.ledger"), DeviceLedger.open(path) as again:
        assert again.spent().participations == 3
    assert any("3 record(s) behind" in r.message and "older copy" in r.message for r in caplog.records)


def _run_child(path: Path, body: str) -> subprocess.Popen:
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from edge_sdk.privacy.encoding import EncodingParams
        from edge_sdk.privacy.ledger import DeviceLedger
        from edge_sdk.privacy.participation import participation_event
        params = EncodingParams(dim=10000, clip=1.0, gamma=1e-4, bits=20, rotation_seed=bytes(16))
        event = participation_event(params, "distributed", "skellam", 1.5, 40)
        ledger = DeviceLedger.open({str(path)!r}, create=False)
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_killed_between_the_record_and_its_head_the_record_counts(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 1)
    proc = _run_child(path, """
        DeviceLedger._write_head = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        ledger.record("round-2", event)
        print("returned", flush=True)
        """)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "returned" not in out
    assert json.loads(head_path(path).read_text())["sequence"] == 2  # the head is one behind
    with DeviceLedger.open(path, create=False) as after:
        assert [r for r, _ in after.participations()] == ["r0", "round-2"]
        assert after.head().sequence == 3
    assert json.loads(head_path(path).read_text())["sequence"] == 3


@pytest.mark.slow
def test_random_sigkills_while_recording_never_undercount_and_never_false_alarm(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 0)
    rng = random.Random(20240607)
    returned_total = 0
    for _ in range(12):
        proc = _run_child(path, """
            for i in range(10**6):
                ledger.record(f"round-{i}", event)
                print(i, flush=True)
            """)
        time.sleep(0.25 + rng.random() * 0.3)  # start-up takes about 0.2 s; kill somewhere in the loop
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        returned_total += len(out.split())
        with DeviceLedger.open(path, create=False) as after:  # never an error after a crash
            assert after.spent().participations >= returned_total  # over-count at most, never under
            assert after.spent().participations <= returned_total + 12
            returned_total = after.spent().participations
    assert returned_total > 12  # the kills landed inside the recording loop, not before it


# -- the earlier format ---------------------------------------------------------------------------------
def test_a_ledger_from_before_heads_is_adopted_then_protected(tmp_path, caplog):
    path = tmp_path / "v1.jsonl"
    shutil.copy(VECTOR, path)
    before = DeviceLedger.snapshot(path).spent()  # read-only: loads with no head and writes nothing
    assert not head_path(path).exists()
    with caplog.at_level(logging.WARNING, logger="edge_sdk.privacy.ledger"), DeviceLedger.open(path) as ledger:
        assert ledger.spent() == before
        head = ledger.head()
    assert any("adopting its 5 records" in r.message for r in caplog.records)
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds[-1] == "budget" and head.sequence == len(kinds) == 6
    assert path.read_bytes().startswith(VECTOR.read_bytes())  # old records untouched, only appended to
    # From now on a cut, even with the head file deleted too, is an error.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))
    with pytest.raises(LedgerRollbackError):
        DeviceLedger.open(path)
    path.write_bytes(b"".join(lines))
    head_path(path).unlink()
    with DeviceLedger.open(path, create=False) as ledger:  # the flag record is last: head simply unwritten
        assert ledger.head() == head

