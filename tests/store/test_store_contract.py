"""The ``Store`` contract: what every backend must do, written against the interface only."""

from __future__ import annotations

import pytest

from aggregator.accounting.participation_record import ParticipationRecord
from aggregator.store import (
    RoundRecord,
    RoundStatus,
    StageRecord,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
)
from edge_sdk.privacy.ledger import LedgerRollbackError
from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.privacy.participation import ParticipationEvent
from edge_sdk.secagg.keys import IdentityKey


def key() -> bytes:
    return IdentityKey.generate().public


def event(n: int = 10) -> ParticipationEvent:
    return ParticipationEvent("skellam", "distributed", 5.0, 25.0, 400.0, 40.0, n, 128)


def test_enrol_list_and_revoke_keep_history(store):
    a, b = key(), key()
    store.enrol("pi-b", b, now=20.0)
    store.enrol("pi-a", a, now=10.0)
    assert [d.device_id for d in store.devices()] == ["pi-a", "pi-b"]
    assert store.device("pi-a").public_key == a and store.device("pi-a").active
    revoked = store.revoke("pi-a", now=30.0, reason="stolen")
    assert (revoked.revoked_at, revoked.revoke_reason, revoked.active) == (30.0, "stolen", False)
    assert [d.device_id for d in store.devices(include_revoked=False)] == ["pi-b"]
    assert [d.device_id for d in store.devices()] == ["pi-a", "pi-b"]
    assert list(store.directory()) == ["pi-b"] and store.directory()["pi-b"] == b
    assert store.device("nobody") is None


def test_an_id_or_a_key_is_never_reused(store):
    a = key()
    store.enrol("pi-a", a, now=1.0)
    with pytest.raises(StoreConflictError, match="already enrolled"):
        store.enrol("pi-a", key(), now=2.0)
    with pytest.raises(StoreConflictError, match="already enrolled as device pi-a"):
        store.enrol("pi-b", a, now=2.0)
    store.revoke("pi-a", now=3.0)
    with pytest.raises(StoreConflictError, match="already revoked"):
        store.enrol("pi-a", key(), now=4.0)
    with pytest.raises(StoreConflictError, match="already revoked"):
        store.revoke("pi-a", now=5.0)
    with pytest.raises(StoreNotFoundError, match="not enrolled"):
        store.revoke("pi-z", now=5.0)
    assert store.device("pi-a").public_key == a


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "a\0b", " pad", "x" * 129, "tab\tin"])
def test_device_ids_that_cannot_be_a_topic_level_are_refused(store, bad):
    with pytest.raises(StoreError, match="device id"):
        store.enrol(bad, key(), now=1.0)
    assert store.devices() == []


def test_a_key_of_the_wrong_size_is_refused(store):
    with pytest.raises(StoreError, match="32 bytes"):
        store.enrol("pi-a", b"\1" * 31, now=1.0)


def test_plans_are_kept_and_never_replaced(store):
    record = store.put_plan(0, b"signed plan 0", now=5.0)
    assert store.plan(0) == record and record.payload == b"signed plan 0"
    assert store.put_plan(0, b"signed plan 0", now=6.0) == record  # the same plan again: idempotent
    with pytest.raises(StoreConflictError, match="different plan"):
        store.put_plan(0, b"another plan", now=7.0)
    assert store.plan(1) is None


def test_models_keep_every_version_and_never_change_one(store):
    store.put_model(0, b"initial", now=1.0)
    store.put_model(1, b"after round 0", now=2.0, round_index=0)
    assert store.latest_model().version == 1 and store.latest_model().round_index == 0
    assert store.model(0).payload == b"initial"
    assert len(store.model(0).digest) == 64
    with pytest.raises(StoreConflictError, match="never changes"):
        store.put_model(1, b"tampered", now=3.0)
    store.put_model(3, b"v3", now=4.0)
    with pytest.raises(StoreConflictError, match="below the latest"):
        store.put_model(2, b"late", now=5.0)
    assert store.model(2) is None


def test_round_state_resumes_and_a_finished_round_is_final(store, reopen):
    running = RoundRecord(3, b"\7" * 32, "SECAGG", RoundStatus.RUNNING, 10.0, 11.0, b'{"stage": "SECAGG"}')
    store.save_round(running)
    store.record_stage(StageRecord(3, "TRAIN", 10.5, 12, 0))
    store.record_stage(StageRecord(3, "SECAGG", 11.0, 11, 1))
    with reopen() as again:  # a restarted service finds the round where it was
        assert again.rounds(RoundStatus.RUNNING) == [running]
        assert [s.stage for s in again.stages(3)] == ["TRAIN", "SECAGG"]
    aborted = RoundRecord(3, b"\7" * 32, "SECAGG", RoundStatus.ABORTED, 10.0, 12.0, b"", "crashed; restarted")
    store.save_round(aborted)
    assert store.round(3) == aborted and store.rounds(RoundStatus.RUNNING) == []
    with pytest.raises(StoreConflictError, match="finished round never changes"):
        store.save_round(running)
    with pytest.raises(StoreNotFoundError):
        store.record_stage(StageRecord(9, "TRAIN", 1.0, 1, 0))


def test_accounting_events_are_appended_once_per_round(store):
    store.add_accounting_event(0, event().to_dict(), now=1.0)
    store.add_accounting_event(1, event(9).to_dict(), now=2.0)
    with pytest.raises(StoreConflictError, match="accounted once"):
        store.add_accounting_event(1, event().to_dict(), now=3.0)
    events = store.accounting_events()
    assert [e.round_index for e in events] == [0, 1]
    assert ParticipationEvent.from_dict(events[1].event) == event(9)
    assert events[0].sequence < events[1].sequence


def test_participation_record_round_trips_per_device(store, reopen):
    assert store.participation(1e-5).devices() == []
    record = ParticipationRecord(1e-5)
    record.record("pi-a", "0", LedgerHead(2, b"\1" * 32), event())
    record.record("pi-b", "0", LedgerHead(2, b"\2" * 32), event())
    record.record("pi-a", "1", LedgerHead(3, b"\3" * 32), event())
    store.save_participation(record)
    with pytest.raises(LedgerRollbackError, match="rolled back"):
        record.check("pi-b", LedgerHead(2, b"\4" * 32))  # pi-b refused and remembered
    store.save_participation(record)
    with reopen() as again:
        loaded = again.participation(1e-5)
        assert loaded.to_dict() == record.to_dict()
        assert loaded.refusal("pi-b") is not None and loaded.last_head("pi-a").sequence == 3
        with pytest.raises(StoreConflictError, match="delta"):
            again.participation(1e-6)


def test_a_transaction_commits_all_or_nothing(store, reopen):
    with pytest.raises(RuntimeError), store.transaction():
        store.put_model(1, b"model", now=1.0, round_index=0)
        store.save_round(RoundRecord(0, b"\0" * 32, "PUBLISH", RoundStatus.COMPLETED, 0.0, 1.0))
        raise RuntimeError("crash before commit")
    assert store.model(1) is None and store.round(0) is None
    with store.transaction():
        store.put_model(1, b"model", now=1.0, round_index=0)
        store.save_round(RoundRecord(0, b"\0" * 32, "PUBLISH", RoundStatus.COMPLETED, 0.0, 1.0))
        store.add_accounting_event(0, event().to_dict(), now=1.0)
    with reopen() as again:
        assert again.model(1).payload == b"model" and again.round(0).status is RoundStatus.COMPLETED
        assert len(again.accounting_events()) == 1


def test_a_failed_change_inside_a_transaction_rolls_back_the_rest(store):
    store.enrol("pi-a", key(), now=1.0)
    with pytest.raises(StoreConflictError), store.transaction():
        store.enrol("pi-b", key(), now=2.0)
        store.enrol("pi-a", key(), now=2.0)
    assert [d.device_id for d in store.devices()] == ["pi-a"]


def test_the_schema_version_is_recorded(store):
    from aggregator.store import SCHEMA_VERSION

    assert store.schema_version == SCHEMA_VERSION >= 1
