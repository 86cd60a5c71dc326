"""CoordinatorRound with real workers and real SecAgg+ clients: sum of sub-sums, retry, clean drop, refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from aggregator.sharding.coordinator_round import (
    WORK,
    SlotStatus,
    Stage,
    WorkerOnline,
    handle_coordinator,
    resolve_coordinator,
    tick_coordinator,
)
from edge_sdk.privacy.encoding import decode_sum
from edge_sdk.protocol.effects import AccountRound
from edge_sdk.secagg import codec
from edge_sdk.secagg.messages import Abort
from sharding.shard_parts import build, coordinator, inputs_for, ready, run_task, worker


def _planned(parts, **kw):
    state = coordinator(parts, **kw)
    tasks = []
    for d in parts.devices:
        step = handle_coordinator(state, ready(parts, d), 1.0)
        state = step.state
        tasks += [s.message for s in step.sends if s.to == WORK]
    return state, tasks


def _feed(state, results, now=2.0):
    step = None
    for r in results:
        step = handle_coordinator(state, r, now)
        state = step.state
    return state, step


def test_the_sum_of_sub_sums_is_decoded_accounted_and_published():
    parts = build()
    state, tasks = _planned(parts)
    assert state.stage is Stage.SHARDS and [t.worker for t in tasks] == ["w0", "w1"]
    assert sorted(sum((t.cohort for t in tasks), ())) == parts.devices
    inputs = inputs_for(parts, parts.devices, seed=7)
    for t in tasks:
        _, results = run_task(parts, worker(parts, t.worker), t, {d: inputs[d] for d in t.cohort})
        state, step = _feed(state, results)
    assert state.stage is Stage.AGGREGATE
    (account,) = step.effects
    assert isinstance(account, AccountRound) and sorted(account.contributors) == parts.devices
    total = sum(v.astype(np.uint64) for v in inputs.values()) % (1 << 24)
    mean = decode_sum(total.astype(np.uint32), parts.plan.encoding, 12)[: parts.plan.encoding.dim]
    expected, _ = parts.host.strategy.apply(state.params, mean, None)
    assert np.array_equal(state.new_params, expected)
    published = resolve_coordinator(state, account, "accounted", 3.0).state
    assert published.stage is Stage.PUBLISH and published.new_model.version == 1


def test_an_unclaimed_task_is_reissued_and_the_old_attempt_is_refused():
    parts = build()
    state, tasks = _planned(parts, claim_timeout=5.0)
    _, results = run_task(parts, worker(parts, "w0"), tasks[0], {})
    state, _ = _feed(state, results[:1])  # w0 claims task 0; w1 never claims task 1
    step = tick_coordinator(state, 6.5)
    (reissued,) = [s.message for s in step.sends if s.to == WORK]
    assert (reissued.task_id, reissued.attempt, reissued.worker) == (1, 1, "w0")
    assert reissued.cohort == tasks[1].cohort
    late = run_task(parts, worker(parts, "w1"), tasks[1], {})[1][0]  # w1's ACCEPTED for attempt 0, too late
    refused = handle_coordinator(step.state, late, 7.0).state
    assert "not an open attempt" in refused.refusals[-1].reason
    slot = refused.slots[1]
    assert slot.status is SlotStatus.ISSUED and slot.task.attempt == 1


def test_a_claimed_task_of_a_dead_worker_is_dropped_with_signed_aborts_and_the_rest_completes():
    parts = build(t_honest=5)
    state, tasks = _planned(parts)
    inputs = inputs_for(parts, parts.devices)
    _, dying = run_task(parts, worker(parts, "w1"), tasks[1], {})
    state, _ = _feed(state, dying[:1])  # w1 claimed task 1 (its devices may have started) ...
    step = handle_coordinator(state, WorkerOnline("w1", False), 3.0)  # ... and its last will says offline
    state = step.state
    assert state.slots[1].status is SlotStatus.DROPPED and not [s for s in step.sends if s.to == WORK]
    notified = {s.to for s in step.sends}
    assert notified == set(tasks[1].cohort)
    for s in step.sends:
        assert isinstance(s.message, Abort)
        codec.verify(s.message, parts.aggregator.public, "aggregator")
    _, results = run_task(parts, worker(parts, "w0"), tasks[0], {d: inputs[d] for d in tasks[0].cohort})
    state, step = _feed(state, results, 4.0)
    assert state.stage is Stage.AGGREGATE
    assert sorted(step.effects[0].contributors) == sorted(tasks[0].cohort)


def test_a_malicious_workers_result_is_refused_and_the_slot_stays_open():
    parts = build()
    state, tasks = _planned(parts)
    _, results = run_task(parts, worker(parts, "w0"), tasks[0], inputs_for(parts, tasks[0].cohort))
    state, _ = _feed(state, results[:2])
    done = results[2]
    forged = [replace(done, count=done.count - 1).sign(parts.aggregator),
              replace(done, contributors=done.contributors[:-1] + (tasks[1].cohort[0],)).sign(parts.aggregator),
              replace(done, worker="w1").sign(parts.aggregator)]
    for bad in forged:
        state = handle_coordinator(state, bad, 3.0).state
        assert state.slots[0].status is SlotStatus.RUNNING and state.stage is Stage.SHARDS
    reasons = [r.reason for r in state.refusals[-3:]]
    assert "values" in reasons[0] and "outside its sub-cohort" in reasons[1] and "w1" in reasons[2]
    state = handle_coordinator(state, done, 3.5).state  # the genuine result still counts
    assert state.slots[0].status is SlotStatus.DONE


def test_a_round_whose_sub_cohorts_all_fail_aborts_without_decoding():
    parts = build()
    state, tasks = _planned(parts)
    for t in tasks:
        _, results = run_task(parts, worker(parts, t.worker), t, {})
        state, _ = _feed(state, results[:1])
    step = tick_coordinator(state, 1e6)  # both result deadlines pass
    assert step.state.stage is Stage.ABORTED and step.state.new_params is None
    assert "0 of 2 sub-cohorts were summed" in step.state.abort_reason
