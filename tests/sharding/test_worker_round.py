"""WorkerRound with real SecAgg+ clients: the claim comes first, the sum is exact, bad tasks cost nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from aggregator.sharding.work_messages import ResultStatus
from aggregator.sharding.worker_round import COORDINATOR, handle_worker
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.messages import AdvertiseKeys, RoundStart
from sharding.shard_parts import FLEET, build, inputs_for, run_task, task_for, worker


def test_the_claim_precedes_every_round_start_and_the_sum_is_exact():
    parts = build()
    cohort = parts.devices[:7]
    task = task_for(parts, cohort)
    step = handle_worker(worker(parts), task, 0.0)
    assert step.sends[0].to == COORDINATOR and step.sends[0].message.status is ResultStatus.ACCEPTED
    assert {s.to for s in step.sends[1:]} == set(cohort)
    assert all(isinstance(s.message, RoundStart) and s.message.cohort for s in step.sends[1:])
    inputs = inputs_for(parts, cohort, seed=3)
    state, results = run_task(parts, worker(parts), task, inputs)
    done = results[-1]
    assert done.status is ResultStatus.DONE and done.contributors == tuple(cohort)
    assert results[1].status is ResultStatus.SESSION and results[1].session_id == done.session_id
    expected = sum(v.astype(np.uint64) for v in inputs.values()) % (1 << 24)
    from edge_sdk.wire.bitpack import unpack_bits
    assert np.array_equal(unpack_bits(done.packed_sum, 24, done.count), expected)
    assert not state.sessions and task.key in state.finished


def test_bad_tasks_are_refused_without_a_word():
    parts = build()
    cohort = parts.devices[:6]
    good = task_for(parts, cohort)
    state = worker(parts)
    bad = [
        replace(good, signature=b""),  # unsigned
        replace(good).sign(IdentityKey.generate()),  # not the aggregator's key
        task_for(parts, cohort, worker="w1"),  # for another worker
        replace(good, fleet="other").sign(parts.aggregator),
    ]
    for task in bad:
        step = handle_worker(state, task, 0.0)
        assert step.sends == () and len(step.state.refusals) == len(state.refusals) + 1
        state = step.state
    state = handle_worker(state, good, 0.0).state
    again = handle_worker(state, good, 1.0)  # a redelivery of the same attempt starts nothing
    assert again.sends == () and "already taken" in again.state.refusals[-1].reason


def test_a_task_over_another_directory_fails_cleanly_and_strangers_are_ignored():
    parts = build()
    stale = replace(task_for(parts, parts.devices[:6]), directory_digest=bytes(32)).sign(parts.aggregator)
    step = handle_worker(worker(parts), stale, 0.0)
    assert [s.message.status for s in step.sends] == [ResultStatus.FAILED]
    assert "directory" in step.sends[0].message.reason
    advert = AdvertiseKeys("dev-11", 1, bytes(32), bytes(32), bytes(32), bytes(32))
    step = handle_worker(step.state, advert, 0.0)
    assert step.sends == () and "belongs to no session" in step.state.refusals[-1].reason
    assert stale.fleet == FLEET
