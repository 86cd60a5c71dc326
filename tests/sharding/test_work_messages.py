"""Task and TaskResult: exact round trips, and every refusal of ``check_result`` with real signatures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aggregator.sharding.work_messages import ResultStatus, Task, TaskResult, WorkMessageError, check_result
from edge_sdk.errors import FleetlearnError
from edge_sdk.secagg.keys import IdentityKey
from sharding.shard_parts import build, inputs_for, run_task, task_for, worker


@pytest.fixture(scope="module")
def done():
    parts = build()
    cohort = parts.devices[:6]
    task = task_for(parts, cohort)
    _, results = run_task(parts, worker(parts), task, inputs_for(parts, cohort))
    assert [r.status for r in results] == [ResultStatus.ACCEPTED, ResultStatus.SESSION, ResultStatus.DONE]
    return parts, task, results[-1]


def _resign(result: TaskResult, parts, **changes) -> TaskResult:
    """What a malicious worker (it holds the aggregator key) can send: any fields, validly signed."""
    return replace(result, **changes).sign(parts.aggregator)


def test_task_and_result_round_trip_exactly(done):
    parts, task, result = done
    again = Task.from_bytes(task.to_bytes())
    assert again == task
    again.verify(parts.aggregator.public)
    assert TaskResult.from_bytes(result.to_bytes()) == result
    checked = check_result(result, task, parts.plan, parts.aggregator.public, "w0")
    assert checked.contributors == tuple(parts.devices[:6])
    expected = sum(v.astype(np.uint64) for v in inputs_for(parts, parts.devices[:6]).values()) % (1 << 24)
    assert np.array_equal(checked.total, expected.astype(np.uint32))


def test_unsigned_or_foreign_signed_records_are_refused(done):
    parts, task, result = done
    with pytest.raises(FleetlearnError, match="signature"):
        replace(task, signature=b"").verify(parts.aggregator.public)
    with pytest.raises(FleetlearnError):
        replace(task, cohort=task.cohort[:-1]).verify(parts.aggregator.public)  # the signature no longer covers it
    with pytest.raises(FleetlearnError):
        check_result(replace(result, signature=b""), task, parts.plan, parts.aggregator.public, "w0")
    outsider = IdentityKey.generate()
    with pytest.raises(FleetlearnError):
        check_result(replace(result).sign(outsider), task, parts.plan, parts.aggregator.public, "w0")


@pytest.mark.parametrize("changes, match", [
    ({"bits": 20}, "at 20 bits"),
    ({"count": 3}, "has 3 values"),
    ({"packed_sum": b"\0" * 5}, "packs 5 bytes"),
    ({"contributors": ("dev-00", "dev-01", "dev-02", "dev-03", "dev-04", "dev-11")}, "outside its sub-cohort"),
    ({"contributors": ("dev-00", "dev-01", "dev-02", "dev-03", "dev-04", "dev-04")}, "twice"),
    ({"contributors": ("dev-00", "dev-01", "dev-02"), "ledger_heads": bytes(120)}, "below the plan's t_honest=5"),
    ({"ledger_heads": bytes(10)}, "bytes of ledger heads"),
    ({"attempt": 1}, "not \\(1, 0, 0\\)"),
    ({"worker": "w9"}, "went to worker 'w0'"),
])
def test_a_malicious_workers_result_is_refused(done, changes, match):
    parts, task, result = done
    with pytest.raises(WorkMessageError, match=match):
        check_result(_resign(result, parts, **changes), task, parts.plan, parts.aggregator.public, "w0")


def test_malformed_bytes_are_one_line_errors(done):
    parts, task, result = done
    for data in (b"", task.to_bytes()[:30], task.to_bytes() + b"x"):
        with pytest.raises(WorkMessageError):
            Task.from_bytes(data)
    for data in (b"", result.to_bytes()[:30], result.to_bytes() + b"x"):
        with pytest.raises(WorkMessageError):
            TaskResult.from_bytes(data)
    stripped = Task.from_bytes(task.to_bytes()[:-70])  # the signature field cut off: decodes, never verifies
    with pytest.raises(FleetlearnError, match="signature"):
        stripped.verify(parts.aggregator.public)


def test_a_shared_task_accepts_only_its_claimant(done):
    parts, _, result = done
    shared = task_for(parts, parts.devices[:6], worker="")
    check_result(result, shared, parts.plan, parts.aggregator.public, None)  # before the claim: any worker
    with pytest.raises(WorkMessageError, match="claimed by worker 'w1'"):
        check_result(result, shared, parts.plan, parts.aggregator.public, "w1")
