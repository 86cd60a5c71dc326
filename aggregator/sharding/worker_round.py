"""WorkerRound: an aggregator worker as a pure machine, one SecAgg+ server per task it holds.

A worker holds the aggregator's identity key (same trust domain), so the devices of a sub-cohort
see the one aggregator they know: a RoundStart whose cohort is their sub-cohort, with its own
nonce and so its own session. Per task:

* the signed ``Task`` is checked (the aggregator's signature, this fleet, this worker or any, a
  task key not seen before, the signed plan inside, the enrolment directory the coordinator
  numbered the cohort over); ``ACCEPTED`` is sent *before* any RoundStart, so a coordinator that
  never saw it knows no device of the task can have started, and may hand the task to another worker;
* the embedded SecAgg+ server runs exactly as in ``HostRound`` (the plan's t_honest as noise floor,
  bits, padded length, (k, t) policy, ledger check); ``SESSION`` reports the session id once the
  roster is out, so the coordinator can abort that session's devices if this worker dies;
* ``DONE`` carries the unmasked sub-cohort sum mod 2^b with its contributors and their ledger heads;
  ``FAILED`` the server's abort reason (the server has already told the devices).

The worker never decodes, applies a strategy or accounts: the coordinator does, over the sum of sums.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aggregator.secagg.server import LedgerCheck, ServerConfig, ServerState, handle_server, start_server, tick_server
from aggregator.sharding.work_messages import ANY_WORKER, ResultStatus, Task, TaskResult
from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.pump import Step
from edge_sdk.protocol.routing import Send
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.secagg.messages import Stage
from edge_sdk.secagg.parameters import ThreatModel

log = logging.getLogger(__name__)

COORDINATOR = "@coordinator"  # Send.to of a worker's results


@dataclass(frozen=True)
class WorkerConfig:
    fleet: str
    worker_id: str
    identity: IdentityKey  # the aggregator's
    enrolled: Mapping[str, bytes]
    ledger_check: LedgerCheck | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))


@dataclass(frozen=True, eq=False)
class Session:
    task: Task
    server: ServerState
    reported_session: bool = False


@dataclass(frozen=True)
class WorkerRefusal:
    sender: str
    message_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class WorkerState:
    config: WorkerConfig
    sessions: Mapping[tuple[int, int, int], Session] = field(default_factory=dict)
    finished: frozenset[tuple[int, int, int]] = frozenset()
    refusals: tuple[WorkerRefusal, ...] = ()
    outcomes: tuple[tuple[tuple[int, int, int], ResultStatus, str], ...] = ()  # for the shell's log


class _Refuse(FleetlearnError):
    """Ignore the message and record why."""


def start_worker(config: WorkerConfig) -> WorkerState:
    return WorkerState(config)


def handle_worker(state: WorkerState, message: Any, now: float) -> Step:
    try:
        if isinstance(message, Task):
            return _on_task(state, message, now)
        return _on_device(state, message, now)
    except FleetlearnError as exc:
        sender = _device_of(message)
        log.debug("worker %s refused %s from %s: %s", state.config.worker_id, type(message).__name__, sender, exc)
        return Step(replace(state, refusals=state.refusals + (WorkerRefusal(sender, type(message).__name__,
                                                                            str(exc)),)))


def tick_worker(state: WorkerState, now: float) -> Step:
    sends: list[Send] = []
    for key in list(state.sessions):
        session = state.sessions[key]
        server, out = tick_server(session.server, now)
        state, more = _after_server(state, replace(session, server=server), out)
        sends += more
    return Step(state, tuple(sends))


def worker_deadline(state: WorkerState) -> float | None:
    deadlines = [s.server.deadline for s in state.sessions.values()]
    return min(deadlines) if deadlines else None


class WorkerRound:
    """The pump's view of the worker machine; it never finishes (the shell runs it until stopped)."""

    handle = staticmethod(handle_worker)
    tick = staticmethod(tick_worker)
    deadline = staticmethod(worker_deadline)

    @staticmethod
    def resolve(state: WorkerState, effect: Any, result: Any, now: float) -> Step:
        return Step(state)

    @staticmethod
    def finished(state: WorkerState) -> bool:
        return False


def _result(state: WorkerState, task: Task, status: ResultStatus, **fields: Any) -> Send:
    cfg = state.config
    result = TaskResult(task.fleet, task.round_index, task.task_id, task.attempt, cfg.worker_id, status, **fields)
    return Send(COORDINATOR, result.sign(cfg.identity))


def _on_task(state: WorkerState, task: Task, now: float) -> Step:
    cfg = state.config
    task.verify(cfg.identity.public)
    if task.fleet != cfg.fleet:
        raise _Refuse(f"task for fleet {task.fleet!r}, this worker serves {cfg.fleet!r}")
    if task.worker not in (ANY_WORKER, cfg.worker_id):
        raise _Refuse(f"task {task.key} is for worker {task.worker!r}")
    if task.key in state.sessions or task.key in state.finished:
        raise _Refuse(f"task {task.key} was already taken (a redelivery)")
    plan = task.round_plan()
    plan.verify(cfg.identity.public)
    if (plan.fleet, plan.round_index) != (task.fleet, task.round_index):
        raise _Refuse(f"task {task.key} carries the plan of round {plan.round_index} of {plan.fleet!r}")
    finished = state.finished | {task.key}
    if task.directory_digest != cfg.enrolled.digest:
        why = "the worker's enrolment directory differs from the coordinator's: it reloads it; retry the task"
        return Step(replace(state, finished=finished), (_result(state, task, ResultStatus.FAILED, reason=why),))
    policy = plan.secagg
    server_config = ServerConfig(
        cfg.identity, cfg.enrolled, bits=plan.encoding.bits, vector_length=plan.vector_length,
        dropout_fraction=policy.dropout_fraction, colluding_fraction=policy.colluding_fraction,
        degree=policy.degree, threshold=policy.threshold, stage_timeout=policy.stage_timeout,
        threat_model=ThreatModel(policy.threat_model), noise_floor=plan.t_honest, ledger_check=cfg.ledger_check)
    try:
        server, out = start_server(server_config, task.cohort, plan.round_index, now)
    except FleetlearnError as exc:
        return Step(replace(state, finished=finished),
                    (_result(state, task, ResultStatus.FAILED, reason=f"SecAgg+ cannot start: {exc}"[:1000]),))
    server = replace(server, deadline=now + plan.deadlines.train + policy.stage_timeout)
    accepted = _result(state, task, ResultStatus.ACCEPTED)  # before any RoundStart: see the module docstring
    state = replace(state, sessions={**state.sessions, task.key: Session(task, server)})
    return Step(state, (accepted,) + tuple(Send(d, m) for d, m in out))


def _device_of(message: Any) -> str:
    """SecAgg+ messages name their device ``sender``, except AdvertiseKeys (``device_id``)."""
    return str(getattr(message, "sender", None) or getattr(message, "device_id", None) or "?")


def _on_device(state: WorkerState, message: Any, now: float) -> Step:
    sender = _device_of(message)
    round_index = getattr(message, "round_index", None)
    for session in state.sessions.values():
        if sender in session.server.cohort and session.server.round_index == round_index:
            server, out = handle_server(session.server, message, now)
            new, sends = _after_server(state, replace(session, server=server), out)
            return Step(new, tuple(sends))
    raise _Refuse(f"{type(message).__name__} from {sender!r} belongs to no session this worker runs")


def _after_server(state: WorkerState, session: Session, out: list) -> tuple[WorkerState, list[Send]]:
    sends = [Send(d, m) for d, m in out]
    server, task, key = session.server, session.task, session.task.key
    if server.stage is Stage.DONE:
        done = TaskResult.done(task, state.config.worker_id, server.session_id, server.config.bits, server.result,
                               tuple(server.contributors), dict(server.ledger_heads))
        sends.append(Send(COORDINATOR, done.sign(state.config.identity)))
        return _close(state, key, ResultStatus.DONE, f"{len(server.contributors)} contributors"), sends
    if server.stage is Stage.ABORTED:
        reason = (server.abort_reason or "SecAgg+ aborted")[:1000]
        sends.append(_result(state, task, ResultStatus.FAILED, session_id=server.session_id, reason=reason))
        return _close(state, key, ResultStatus.FAILED, reason), sends
    if not session.reported_session and server.stage is not Stage.ADVERTISE_KEYS:
        sends.append(_result(state, task, ResultStatus.SESSION, session_id=server.session_id))
        session = replace(session, reported_session=True)
    return replace(state, sessions={**state.sessions, key: session}), sends


def _close(state: WorkerState, key: tuple[int, int, int], status: ResultStatus, detail: str) -> WorkerState:
    sessions = {k: v for k, v in state.sessions.items() if k != key}
    return replace(state, sessions=sessions, finished=state.finished | {key},
                   outcomes=state.outcomes + ((key, status, detail),))
