"""The aggregator's participation record refuses a device whose ledger went backwards, naming its spend."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.accounting.participation_record import ParticipationRecord, ParticipationRecordError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import DeviceLedger, LedgerRollbackError, head_path
from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.privacy.participation import participation_event
from edge_sdk.privacy.rdp import DEFAULT_ORDERS, composed_rdp, epsilon_from_rdp

PARAMS = EncodingParams(dim=10000, clip=1.0, gamma=1e-4, bits=20, rotation_seed=bytes(16))
EVENT = participation_event(PARAMS, "distributed", "skellam", 1.5, 40)
DELTA = 1e-6


def head(sequence: int, tag: int = 1) -> LedgerHead:
    return LedgerHead(sequence, bytes([tag]) * 32)


def test_heads_that_grow_are_accepted_even_across_rounds_the_aggregator_never_saw():
    record = ParticipationRecord(DELTA)
    assert record.record("dev", "r1", head(2), EVENT)
    record.check("dev", head(5))  # two aborted rounds in between: the ledger is ahead, which is fine
    assert record.record("dev", "r4", head(5), EVENT)
    assert record.last_head("dev") == head(5)
    assert record.spent("dev").participations == 2


@pytest.mark.parametrize("sequence", [2, 3])
def test_a_head_not_beyond_the_last_accepted_one_is_refused_naming_the_spend(sequence):
    record = ParticipationRecord(DELTA)
    record.record("dev-7", "r1", head(2), EVENT)
    record.record("dev-7", "r2", head(3), EVENT)
    expected = epsilon_from_rdp(DEFAULT_ORDERS, composed_rdp([(EVENT, 2)]), DELTA)
    with pytest.raises(LedgerRollbackError) as info:
        record.check("dev-7", head(sequence, tag=9))
    message = str(info.value)
    assert "dev-7" in message and f"sequence {sequence}" in message and "accepted sequence 3" in message
    assert f"epsilon={expected:.4g}" in message and "over 2 participation(s)" in message
    assert info.value.spent_participations == 2 and info.value.spent_epsilon == pytest.approx(expected)
    assert info.value.reported.sequence == sequence and info.value.last_seen == head(3)


def test_a_genesis_or_opening_only_head_is_refused_for_known_and_unknown_devices():
    record = ParticipationRecord(DELTA)
    record.record("known", "r1", head(2), EVENT)
    with pytest.raises(LedgerRollbackError, match="refusing device known: its ledger head #0 .*missing or empty"):
        record.check("known", LedgerHead.genesis())
    with pytest.raises(LedgerRollbackError, match="refusing device new: its ledger head #1"):
        record.check("new", head(1))
    with pytest.raises(LedgerRollbackError, match="no participation of it on record"):
        record.check("new2", LedgerHead.genesis())


def test_a_refusal_sticks_so_retries_cannot_climb_past_the_lost_records_until_reinstated():
    record = ParticipationRecord(DELTA)
    record.record("dev", "r1", head(2), EVENT)
    record.record("dev", "r2", head(6), EVENT)
    with pytest.raises(LedgerRollbackError):
        record.check("dev", head(4))
    for retry in (5, 6, 7, 8):  # every retry records locally, so the rolled-back ledger's sequence grows
        with pytest.raises(LedgerRollbackError, match="refused before"):
            record.check("dev", head(retry))
    assert "rolled back" in record.refusal("dev")
    restored = ParticipationRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    with pytest.raises(LedgerRollbackError, match="refused before"):
        restored.check("dev", head(9))  # the refusal survives persistence
    record.reinstate("dev")
    record.check("dev", head(9))


def test_recording_the_same_round_twice_never_double_counts():
    record = ParticipationRecord(DELTA)
    assert record.record("dev", "r1", head(2), EVENT)
    assert not record.record("dev", "r1", head(2), EVENT)
    assert record.spent("dev").participations == 1
    with pytest.raises(ParticipationRecordError, match="already recorded in round r1"):
        record.record("dev", "r1", head(3), EVENT)
    with pytest.raises(LedgerRollbackError):
        record.record("dev", "r2", head(2, tag=2), EVENT)  # a new round must come with a newer head


def test_spend_matches_the_device_ledgers_own_figure(tmp_path):
    record = ParticipationRecord(DELTA)
    with DeviceLedger.create(tmp_path / "l.jsonl", 100.0, DELTA) as ledger:
        for r in range(4):
            ledger.record(f"r{r}", EVENT)
            record.record("dev", f"r{r}", ledger.head(), EVENT)
        assert record.spent("dev").epsilon == pytest.approx(ledger.spent().epsilon, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=12))
def test_persistence_round_trips_through_json(steps):
    record = ParticipationRecord(DELTA)
    sequence = 1
    for number, (jump, second_device) in enumerate(steps):
        sequence += jump
        record.record("b" if second_device else "a", f"r{number}", head(sequence, tag=number % 256), EVENT)
    again = ParticipationRecord.from_dict(json.loads(json.dumps(record.to_dict(), allow_nan=False)))
    assert again.to_dict() == record.to_dict()
    for device in record.devices():
        assert again.spent(device) == record.spent(device)


def test_a_malformed_persisted_record_is_a_typed_error():
    with pytest.raises(ParticipationRecordError, match="format"):
        ParticipationRecord.from_dict({"format": 99, "delta": DELTA, "devices": {}})
    with pytest.raises(ParticipationRecordError, match="malformed"):
        ParticipationRecord.from_dict({"format": 1, "delta": DELTA, "devices": {"a": {"participations": [{}]}}})


def test_end_to_end_a_device_ledger_restored_from_an_older_copy_is_refused(tmp_path):
    """A real ledger on disk takes part twice; both files are restored from a copy taken after the
    first participation (consistent with each other, so no local check can object); the aggregator
    refuses the next head and says what the device has spent."""
    path = tmp_path / "device.jsonl"
    backup = tmp_path / "backup"
    backup.mkdir()
    record = ParticipationRecord(DELTA)
    with DeviceLedger.create(path, 100.0, DELTA) as ledger:
        ledger.record("round-1", EVENT)
        record.check("dev-3", ledger.head())
        record.record("dev-3", "round-1", ledger.head(), EVENT)
        shutil.copy(path, backup / path.name)
        shutil.copy(head_path(path), backup / head_path(path).name)
        ledger.record("round-2", EVENT)
        record.check("dev-3", ledger.head())
        record.record("dev-3", "round-2", ledger.head(), EVENT)
    shutil.copy(backup / path.name, path)
    shutil.copy(backup / head_path(path).name, head_path(path))
    with DeviceLedger.open(path, create=False) as restored:  # locally consistent: opens without complaint
        assert restored.spent().participations == 1
        restored.record("round-3", EVENT)
        sent = restored.head()
        local_spend = restored.spent()
    expected = epsilon_from_rdp(DEFAULT_ORDERS, composed_rdp([(EVENT, 2)]), DELTA)
    with pytest.raises(LedgerRollbackError) as info:
        record.check("dev-3", sent)
    message = str(info.value)
    assert "refusing device dev-3" in message and "sequence 3" in message and "accepted sequence 3" in message
    assert f"epsilon={expected:.4g}" in message and "over 2 participation(s)" in message
    assert local_spend.participations == 2  # the restored ledger under-counts by one (round-2 is gone)
