"""CoordinatorRound: a sharded round as a pure machine, PLAN → SHARDS → AGGREGATE → PUBLISH | ABORTED.

* **PLAN** is ``HostRound``'s: the plan and the model are signed and broadcast (``start_host_round``),
  Ready and Decline are verified against each device's enrolled key and the plan's digest.
* **SHARDS.** The cohort is split into balanced sub-cohorts (``split_cohort``: each can reach the
  plan's t_honest, which is the sub-cohort's); each becomes a signed ``Task``, on the shared work
  topic or addressed to a live worker. A worker answers ACCEPTED before it sends any RoundStart,
  then SESSION (the session id), then DONE (the sum) or FAILED.
* **Hand-out decisions** (why retry is limited): a device takes exactly one RoundStart per round,
  so a sub-cohort can be handed to another worker only while no device of it can have started,
  i.e. while the task is unclaimed: a claim that does not arrive by ``claim_timeout`` (or an
  addressed worker whose last will says ``offline`` before it claimed) re-issues the task as the
  next attempt on another worker, up to ``max_attempts`` and while the devices still wait in their
  PLAN stage. A claimed task whose worker goes offline, misses its result deadline or reports
  FAILED is **dropped**: its devices get a signed Abort (round-level, and for its session) so they
  are free for the next plan at once.
* **AGGREGATE.** Once every task is DONE or dropped, the sub-sums are added mod 2^b. Each was checked
  (``check_result``: signed, the task's own, bits and length, contributors inside the sub-cohort,
  at least t_honest); the total needs at least t_honest too, or nothing is decoded and the round
  aborts. Then decode, the strategy, and ``AccountRound`` with every contributor's ledger head.
* **PUBLISH** the model, version + 1, as ``HostRound`` does.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregator.rounds.cohort import admit
from aggregator.rounds.host_round import (
    HostConfig,
    HostRefusal,
    HostStage,
    model_release,
    start_host_round,
    take_answer,
)
from aggregator.sharding.sub_cohorts import split_cohort
from aggregator.sharding.work_messages import ANY_WORKER, CheckedSum, ResultStatus, Task, TaskResult, check_result
from edge_sdk.errors import FleetlearnError
from edge_sdk.privacy.encoding import decode_sum
from edge_sdk.protocol.effects import AccountRound, EffectFailed, Metric, PersistModel, PersistRound
from edge_sdk.protocol.messages import Decline, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan, Sampling
from edge_sdk.protocol.pump import Step
from edge_sdk.protocol.routing import BROADCAST, Send
from edge_sdk.secagg import codec
from edge_sdk.secagg.messages import Abort

log = logging.getLogger(__name__)

WORK = "@work"  # Send.to of a Task (the router picks the topic from Task.worker)


class Stage(enum.Enum):
    PLAN = "plan"
    SHARDS = "shards"
    AGGREGATE = "aggregate"
    PUBLISH = "publish"
    ABORTED = "aborted"


class SlotStatus(enum.Enum):
    ISSUED = "issued"  # sent, not claimed: may still go to another worker
    RUNNING = "running"  # claimed: its devices may have started, so it can only finish or be dropped
    DONE = "done"
    DROPPED = "dropped"


@dataclass(frozen=True)
class ShardingPolicy:
    """``shared``: tasks on the shared subscription; otherwise addressed to live workers, least loaded first."""

    shared: bool
    sub_cohort_min: int
    claim_timeout: float
    max_attempts: int = 2
    parts: int = 1  # sub-cohorts the plan's t_honest was calibrated for (``plan_shards``)


@dataclass(frozen=True)
class WorkerOnline:
    """The shell saw a worker's status topic change (``online``, or ``offline`` from its last will)."""

    worker: str
    online: bool


@dataclass(frozen=True, eq=False)
class Slot:
    task_id: int
    cohort: tuple[str, ...]
    task: Task
    status: SlotStatus = SlotStatus.ISSUED
    worker: str = ""  # the addressee, then the claimant
    tried: tuple[str, ...] = ()
    deadline: float = 0.0  # claim deadline while ISSUED, result deadline while RUNNING
    session: bytes = b""
    result: CheckedSum | None = None
    why: str = ""


@dataclass(frozen=True, eq=False)
class CoordinatorState:
    config: HostConfig
    policy: ShardingPolicy
    plan: RoundPlan
    model: ModelRelease
    params: np.ndarray
    strategy_state: Any
    started: float
    workers: tuple[str, ...] = ()  # live, as the shell last saw them
    stage: Stage = Stage.PLAN
    deadline: float | None = None
    ready: tuple[str, ...] = ()
    declines: Mapping[str, Decline] = field(default_factory=dict)
    cohort: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()
    new_params: np.ndarray | None = None
    new_model: ModelRelease | None = None
    contributors: tuple[str, ...] = ()
    report: Any = None
    abort_reason: str | None = None
    refusals: tuple[HostRefusal, ...] = ()
    server: None = None  # no SecAgg+ server here: the workers hold them

    @property
    def invited(self) -> tuple[str, ...]:
        s = self.plan.sampling
        return s.cohort if s.kind == Sampling.SERVER else tuple(self.config.enrolled.order)

    @property
    def retry_until(self) -> float:
        """After this, devices that said Ready have left their PLAN stage: a re-issued task would find none."""
        return self.started + self.plan.deadlines.ready + self.plan.secagg.stage_timeout


class _Refuse(FleetlearnError):
    """Ignore the message and record why."""


def start_coordinator_round(config: HostConfig, policy: ShardingPolicy, plan: RoundPlan, params: Mapping[str, Any],
                            now: float, workers: tuple[str, ...], strategy_state: Any = None) -> Step:
    """Sign and broadcast the plan and model, exactly as ``start_host_round`` does."""
    step = start_host_round(config, plan, params, now, strategy_state)
    host = step.state
    state = CoordinatorState(config=config, policy=policy, plan=host.plan, model=host.model, params=host.params,
                             strategy_state=host.strategy_state, started=now, workers=tuple(workers),
                             deadline=host.deadline)
    return Step(state, step.sends, step.effects)


def handle_coordinator(state: CoordinatorState, message: Any, now: float) -> Step:
    try:
        if isinstance(message, (Ready, Decline)):
            return _on_answer(state, message, now)
        if isinstance(message, WorkerOnline):
            return _on_worker(state, message, now)
        if isinstance(message, TaskResult):
            return _on_result(state, message, now)
        raise _Refuse(f"{type(message).__name__} is not expected by the coordinator")
    except FleetlearnError as exc:
        sender = str(getattr(message, "device_id", None) or getattr(message, "worker", None) or "?")
        log.debug("round %d: refused %s from %s: %s", state.plan.round_index, type(message).__name__, sender, exc)
        refusal = HostRefusal(HostStage.SECAGG if state.stage is Stage.SHARDS else HostStage.PLAN, sender,
                              type(message).__name__, str(exc))
        return Step(replace(state, refusals=state.refusals + (refusal,)))


def tick_coordinator(state: CoordinatorState, now: float) -> Step:
    if state.stage is Stage.PLAN and state.deadline is not None and now >= state.deadline:
        return _close_plan(state, now)
    if state.stage is not Stage.SHARDS:
        return Step(state)
    sends: list[Send] = []
    for slot in state.slots:
        if slot.status is SlotStatus.ISSUED and now >= slot.deadline:
            state, more = _reissue_or_drop(state, slot, now, f"no worker claimed it within "
                                                             f"{state.policy.claim_timeout:g} s")
            sends += more
        elif slot.status is SlotStatus.RUNNING and now >= slot.deadline:
            state, more = _drop(state, slot, f"worker {slot.worker!r} sent no result by its deadline")
            sends += more
    return _maybe_aggregate(state, sends, now)


def resolve_coordinator(state: CoordinatorState, effect: Any, result: Any, now: float) -> Step:
    if isinstance(effect, AccountRound) and state.stage is Stage.AGGREGATE:
        if isinstance(result, EffectFailed):
            return _abort(state, f"the round could not be accounted, so it is not published: {result.error}")
        return _publish(replace(state, report=result))
    return Step(state)


def coordinator_deadline(state: CoordinatorState) -> float | None:
    if state.stage is Stage.PLAN:
        return state.deadline
    if state.stage is Stage.SHARDS:
        open_slots = [s.deadline for s in state.slots if s.status in (SlotStatus.ISSUED, SlotStatus.RUNNING)]
        return min(open_slots) if open_slots else None
    return None


class CoordinatorRound:
    """The pump's view of the coordinator machine."""

    handle = staticmethod(handle_coordinator)
    resolve = staticmethod(resolve_coordinator)
    tick = staticmethod(tick_coordinator)
    deadline = staticmethod(coordinator_deadline)

    @staticmethod
    def finished(state: CoordinatorState) -> bool:
        return state.stage in (Stage.PUBLISH, Stage.ABORTED)


# --- PLAN ---------------------------------------------------------------------------------------

def _on_answer(state: CoordinatorState, answer: Ready | Decline, now: float) -> Step:
    state, all_answered = take_answer(state, answer, state.stage is Stage.PLAN)
    return _close_plan(state, now) if all_answered else Step(state)


def _close_plan(state: CoordinatorState, now: float) -> Step:
    plan, config = state.plan, state.config
    cohort = admit(state.ready, config.cohort)
    if not cohort:
        return _abort(state, f"only {len(state.ready)} devices said Ready, below the minimum cohort of "
                             f"{config.cohort.min_size}", notify=state.ready)
    parts = split_cohort(cohort, max(state.policy.parts, 1), plan.t_honest, plan.secagg.colluding_fraction,
                         state.policy.sub_cohort_min)
    if not parts:
        return _abort(state, f"{len(cohort)} Ready devices cannot form one sub-cohort that reaches t_honest="
                             f"{plan.t_honest} (sharding.sub_cohort_min={state.policy.sub_cohort_min})",
                      notify=state.ready)
    if not state.policy.shared and not state.workers:
        return _abort(state, "no aggregator worker is online", notify=state.ready)
    state = replace(state, stage=Stage.SHARDS, cohort=cohort, deadline=None)
    sends: list[Send] = []
    for task_id, members in enumerate(parts):
        slot = Slot(task_id, members, task=None)  # type: ignore[arg-type]
        state, more = _issue(state, slot, 0, now)
        sends += more
    effects = (PersistRound("host", plan.round_id, Stage.SHARDS.value,
                            {"cohort": list(cohort), "sub_cohorts": [len(p) for p in parts]}),
               Metric("round_cohort", float(len(cohort)), (("round", str(plan.round_index)),)))
    return Step(state, tuple(sends), effects)


# --- SHARDS -------------------------------------------------------------------------------------

def _choose_worker(state: CoordinatorState, slot: Slot) -> str | None:
    if state.policy.shared:
        return ANY_WORKER
    load = {w: 0 for w in state.workers}
    for other in state.slots:
        if other.status in (SlotStatus.ISSUED, SlotStatus.RUNNING) and other.worker in load:
            load[other.worker] += 1
    fresh = [w for w in state.workers if w not in slot.tried] or list(state.workers)
    return min(fresh, key=lambda w: (load[w], w)) if fresh else None


def _issue(state: CoordinatorState, slot: Slot, attempt: int, now: float) -> tuple[CoordinatorState, list[Send]]:
    worker = _choose_worker(state, slot)
    if worker is None:
        return _drop(state, slot, "no aggregator worker is online to take it")
    cfg = state.config
    task = Task(cfg.fleet, state.plan.round_index, slot.task_id, attempt, worker, state.plan.to_bytes(), slot.cohort,
                cfg.enrolled.digest).sign(cfg.identity)
    new = replace(slot, task=task, status=SlotStatus.ISSUED, worker=worker,
                  tried=slot.tried + ((worker,) if worker else ()), deadline=now + state.policy.claim_timeout)
    return _put(state, new), [Send(WORK, task)]


def _put(state: CoordinatorState, slot: Slot) -> CoordinatorState:
    slots = list(state.slots)
    for i, s in enumerate(slots):
        if s.task_id == slot.task_id:
            slots[i] = slot
            break
    else:
        slots.append(slot)
    return replace(state, slots=tuple(slots))


def _reissue_or_drop(state: CoordinatorState, slot: Slot, now: float, why: str) -> tuple[CoordinatorState, list]:
    attempt = slot.task.attempt + 1
    if attempt < state.policy.max_attempts and now < state.retry_until:
        log.info("round %d: task %d (%s) re-issued as attempt %d", state.plan.round_index, slot.task_id, why, attempt)
        return _issue(state, slot, attempt, now)
    return _drop(state, slot, f"{why}; no attempt left in time")


def _drop(state: CoordinatorState, slot: Slot, why: str) -> tuple[CoordinatorState, list[Send]]:
    """Give up a sub-cohort: its devices get a signed Abort (round-level, and for its session when known)."""
    log.info("round %d: sub-cohort %d (%d devices) dropped: %s", state.plan.round_index, slot.task_id,
             len(slot.cohort), why)
    state = _put(state, replace(slot, status=SlotStatus.DROPPED, why=why, deadline=0.0))
    return state, _abort_notices(state, slot.cohort, (slot.session,), why)


def _abort_notices(state: CoordinatorState, devices: tuple[str, ...], sessions: tuple[bytes, ...],
                   why: str) -> list[Send]:
    index, identity = state.plan.round_index, state.config.identity
    notices = [codec.sign(Abort(bytes(32), index, why[:1000]), identity)]
    notices += [codec.sign(Abort(s, index, why[:1000]), identity) for s in sessions if s]
    return [Send(d, n) for d in devices for n in notices]


def _on_worker(state: CoordinatorState, event: WorkerOnline, now: float) -> Step:
    workers = tuple(w for w in state.workers if w != event.worker) + ((event.worker,) if event.online else ())
    state = replace(state, workers=workers)
    if event.online or state.stage is not Stage.SHARDS:
        return Step(state)
    sends: list[Send] = []
    for slot in state.slots:
        if slot.worker != event.worker:
            continue
        if slot.status is SlotStatus.ISSUED:
            state, more = _reissue_or_drop(state, slot, now, f"worker {event.worker!r} went offline before claiming it")
            sends += more
        elif slot.status is SlotStatus.RUNNING:
            state, more = _drop(state, slot, f"worker {event.worker!r} went offline while running it")
            sends += more
    return _maybe_aggregate(state, sends, now)


def _on_result(state: CoordinatorState, result: TaskResult, now: float) -> Step:
    if state.stage is not Stage.SHARDS or result.round_index != state.plan.round_index:
        raise _Refuse(f"result of task {result.key} from {result.worker!r} arrived outside this round's SHARDS stage")
    slot = next((s for s in state.slots if s.task_id == result.task_id), None)
    if slot is None or slot.task is None or slot.task.attempt != result.attempt:
        raise _Refuse(f"result for task {result.key}, which is not an open attempt of this round")
    if slot.status not in (SlotStatus.ISSUED, SlotStatus.RUNNING):
        raise _Refuse(f"result for task {result.key}, which is already {slot.status.value}")
    claimant = slot.worker if slot.status is SlotStatus.RUNNING else None
    checked = check_result(result, slot.task, state.plan, state.config.identity.public, claimant)
    policy, plan = state.policy, state.plan
    if result.status is ResultStatus.ACCEPTED:
        if slot.status is SlotStatus.RUNNING:
            raise _Refuse(f"task {result.key} claimed a second time")
        result_deadline = now + plan.deadlines.train + 6 * plan.secagg.stage_timeout + policy.claim_timeout
        return Step(_put(state, replace(slot, status=SlotStatus.RUNNING, worker=result.worker,
                                        deadline=result_deadline)))
    if slot.status is SlotStatus.ISSUED:
        raise _Refuse(f"{result.status.name} for task {result.key} before the worker claimed it")
    if result.status is ResultStatus.SESSION:
        return Step(_put(state, replace(slot, session=result.session_id)))
    if result.status is ResultStatus.FAILED:
        state, sends = _drop(state, replace(slot, session=result.session_id or slot.session),
                             f"worker {result.worker!r}: {result.reason}")
        return _maybe_aggregate(state, sends, now)
    state = _put(state, replace(slot, status=SlotStatus.DONE, result=checked, deadline=0.0))
    return _maybe_aggregate(state, [], now)


# --- AGGREGATE and PUBLISH ----------------------------------------------------------------------

def _maybe_aggregate(state: CoordinatorState, sends: list[Send], now: float) -> Step:
    if state.stage is not Stage.SHARDS or any(s.status in (SlotStatus.ISSUED, SlotStatus.RUNNING)
                                              for s in state.slots):
        return Step(state, tuple(sends))
    done = [s for s in state.slots if s.status is SlotStatus.DONE]
    plan = state.plan
    contributors = tuple(d for s in done for d in s.result.contributors)
    if len(contributors) < plan.t_honest or not done:
        step = _abort(state, f"{len(done)} of {len(state.slots)} sub-cohorts were summed ({len(contributors)} "
                             f"contributors), below the plan's t_honest={plan.t_honest}: nothing is decoded")
        return Step(step.state, tuple(sends) + step.sends, step.effects)
    modulus = np.uint64(1 << plan.encoding.bits)
    total = np.zeros(plan.vector_length, dtype=np.uint64)
    for slot in done:
        total = (total + slot.result.total.astype(np.uint64)) % modulus
    mean = decode_sum(total.astype(np.uint32), plan.encoding, len(contributors))[: plan.encoding.dim]
    new_params, strategy_state = state.config.strategy.apply(state.params, mean, state.strategy_state)
    heads = {d: h for s in done for d, h in s.result.ledger_heads.items()}
    new = replace(state, stage=Stage.AGGREGATE, contributors=contributors, new_params=new_params,
                  strategy_state=strategy_state)
    return Step(new, tuple(sends), (AccountRound(plan.round_id, plan.participation_event(), contributors, heads),))


def _publish(state: CoordinatorState) -> Step:
    plan = state.plan
    release = model_release(state.config, plan.model_version + 1, state.new_params)
    labels = (("round", str(plan.round_index)),)
    effects = [PersistModel(release.version, release.digest, release.parameters),
               PersistRound("host", plan.round_id, Stage.PUBLISH.value,
                            {"contributors": list(state.contributors), "model_version": release.version,
                             "sub_cohorts": {str(s.task_id): s.status.value for s in state.slots}}),
               Metric("round_contributors", float(len(state.contributors)), labels)]
    epsilon = getattr(state.report, "epsilon", None)
    if epsilon is not None:
        effects.append(Metric("fleet_epsilon", float(epsilon), labels))
    return Step(replace(state, stage=Stage.PUBLISH, new_model=release), (Send(BROADCAST, release),), tuple(effects))


def _abort(state: CoordinatorState, reason: str, notify: tuple[str, ...] = ()) -> Step:
    plan = state.plan
    log.info("round %d aborted: %s", plan.round_index, reason)
    sends: list[Send] = []
    if notify:
        sends = _abort_notices(state, tuple(notify), (), reason)
    elif state.stage is Stage.SHARDS:  # free every device still held by an open sub-cohort
        for slot in state.slots:
            if slot.status in (SlotStatus.ISSUED, SlotStatus.RUNNING):
                sends += _abort_notices(state, slot.cohort, (slot.session,), reason)
    new = replace(state, stage=Stage.ABORTED, abort_reason=reason, deadline=None)
    effects = (PersistRound("host", plan.round_id, Stage.ABORTED.value, {"reason": reason[:500]}),
               Metric("round_aborted", 1.0, (("round", str(plan.round_index)),)))
    return Step(new, tuple(sends), effects)


def abort_coordinator(state: CoordinatorState, reason: str) -> Step:
    """Abort from outside (SIGTERM): persisted, and every device of an open sub-cohort is told."""
    return _abort(state, reason)
