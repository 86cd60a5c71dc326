"""Across the aggregator: a device whose privacy ledger was rolled back is refused in the next round.

Real ledger files on disk record each participation before the masked input leaves; the masked
input carries the ledger head; the SecAgg+ server asks the aggregator's own participation record
about every head. Restoring one device's ledger from an older copy makes its next head go
backwards: that device is refused and told what it has spent, and the round completes without it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aggregator.accounting.participation_record import ParticipationRecord
from aggregator.secagg import Fleet, ServerConfig, run_session
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.ledger import DeviceLedger, head_path
from edge_sdk.privacy.participation import participation_event
from edge_sdk.secagg.messages import Abort, Stage

BITS, LENGTH, DEVICES = 16, 64, [f"dev-{i:02d}" for i in range(12)]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet.enrol(DEVICES)


def _event():
    params = EncodingParams(dim=LENGTH, clip=1.0, gamma=1e-3, bits=BITS, rotation_seed=b"r" * 16)
    return participation_event(params, "distributed", "skellam", 1.0, 10)


def _round(fleet, record, ledgers, round_index, inputs, downlink_hook=None):
    event = _event()
    heads = {}
    for device in inputs:
        ledgers[device].record(f"round-{round_index}", event)  # write-ahead, before the input leaves
        heads[device] = ledgers[device].head().to_bytes()
    config = ServerConfig(fleet.server_identity, fleet.enrolled, BITS, LENGTH, dropout_fraction=0.1,
                          colluding_fraction=0.0, ledger_check=record.ledger_check)
    outcome = run_session(fleet, config, inputs, round_index=round_index, ledger_heads=heads,
                          downlink_hook=downlink_hook)
    for device in outcome.server.contributors:
        record.record(device, f"round-{round_index}", ledgers[device].head(), event)
    return outcome


def test_a_rolled_back_ledger_is_refused_by_the_aggregator_and_told_its_spend(fleet, tmp_path):
    ledgers = {d: DeviceLedger.create(tmp_path / f"{d}.jsonl", 50.0, 1e-5) for d in DEVICES}
    record = ParticipationRecord(1e-5)
    rng = np.random.default_rng(3)
    inputs = {d: rng.integers(0, 1 << BITS, LENGTH, dtype=np.uint32) for d in DEVICES}
    victim = DEVICES[4]
    ledger_file = tmp_path / f"{victim}.jsonl"
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    first = _round(fleet, record, ledgers, 1, inputs)
    assert not first.aborted and victim in first.server.contributors
    shutil.copy(ledger_file, copy_dir / ledger_file.name)
    shutil.copy(head_path(ledger_file), copy_dir / head_path(ledger_file).name)
    second = _round(fleet, record, ledgers, 2, inputs)
    assert not second.aborted and victim in second.server.contributors
    # The device's storage is restored from the copy taken after round 1: locally it is consistent.
    ledgers[victim].close()
    shutil.copy(copy_dir / ledger_file.name, ledger_file)
    shutil.copy(copy_dir / head_path(ledger_file).name, head_path(ledger_file))
    ledgers[victim] = DeviceLedger.open(ledger_file, create=False)
    notices = []

    def watch(device, message):
        if device == victim and isinstance(message, Abort):
            notices.append(message.reason)
        return message

    third = _round(fleet, record, ledgers, 3, inputs, downlink_hook=watch)
    assert not third.aborted, third.abort_reason
    assert victim not in third.server.contributors and victim in third.server.offenders
    expected = sum(inputs[d].astype(np.uint64) for d in third.server.contributors) % (1 << BITS)
    np.testing.assert_array_equal(third.result, expected.astype(np.uint32))
    assert len(notices) == 1 and "rolled back" in notices[0] and "2 participation" in notices[0]
    assert third.clients[victim].stage is Stage.ABORTED
    assert record.spent(victim).participations == 2  # nothing of round 3 was counted for it


def test_a_deleted_ledger_cannot_rejoin_as_a_fresh_device(fleet, tmp_path):
    ledgers = {d: DeviceLedger.create(tmp_path / f"{d}.jsonl", 50.0, 1e-5) for d in DEVICES}
    record = ParticipationRecord(1e-5)
    inputs = {d: np.zeros(LENGTH, dtype=np.uint32) for d in DEVICES}
    assert not _round(fleet, record, ledgers, 1, inputs).aborted
    victim = DEVICES[0]
    ledgers[victim].close()
    (tmp_path / f"{victim}.jsonl").unlink()
    head_path(tmp_path / f"{victim}.jsonl").unlink()
    ledgers[victim] = DeviceLedger.create(tmp_path / f"{victim}.jsonl", 50.0, 1e-5)  # an operator "starts fresh"
    again = _round(fleet, record, ledgers, 2, inputs)
    assert not again.aborted
    assert victim not in again.server.contributors
    assert any("cannot hold" in str(r.error) or "rolled back" in str(r.error)
               for r in again.server.rejections if r.sender == victim)
