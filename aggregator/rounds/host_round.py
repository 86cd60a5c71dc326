"""HostRound: the aggregator's round as a pure machine, PLAN → TRAIN → SECAGG → AGGREGATE → PUBLISH | ABORTED.

``start_host_round`` signs the plan and the current model and broadcasts both (retained).

* **PLAN.** Ready and Decline answers are verified against each device's enrolled key and the
  plan's digest. The stage closes when every invited device answered or the ready deadline passes;
  the first ``max_size`` Ready devices become the SecAgg+ cohort (``cohort.admit``). Below
  ``min_size``, or below the plan's t_honest, the round aborts before anyone trains, and the Ready
  devices are told (a signed Abort; the plan's ``check_back_after`` says when to return).
* **TRAIN.** The embedded SecAgg+ server (``aggregator.secagg.server``) sends its RoundStart, with the
  plan's t_honest as its noise floor, bits and padded length; its first deadline covers training.
* **SECAGG.** Device messages go to the server; its sends go out as they are.
* **AGGREGATE.** When the server has the sum, HostRound checks the contributors against the plan's
  t_honest itself *before decoding* (the server already aborts below its floor; this check does not
  rely on the server having been configured right), decodes the mean, applies the strategy and asks
  for the round to be accounted (``AccountRound``).
* **PUBLISH.** The new model, version + 1, signed with its digest, is broadcast (retained) and persisted.

Refused messages (unsigned, for another plan, late, out of stage) are recorded in ``state.refusals``
and answered with nothing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from aggregator.rounds.cohort import CohortPolicy, admit
from aggregator.secagg.server import LedgerCheck, ServerConfig, ServerState, handle_server, start_server, tick_server
from aggregator.strategy.registry import Strategy
from edge_sdk.errors import ConfigError, FleetlearnError
from edge_sdk.privacy.encoding import decode_sum
from edge_sdk.protocol.effects import AccountRound, EffectFailed, Metric, PersistModel, PersistRound
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.messages import Decline, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan, Sampling
from edge_sdk.protocol.pump import Step
from edge_sdk.protocol.routing import BROADCAST, Send
from edge_sdk.secagg import codec
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.secagg.messages import Abort, Stage
from edge_sdk.secagg.parameters import ThreatModel

log = logging.getLogger(__name__)


class HostStage(enum.Enum):
    PLAN = "plan"
    TRAIN = "train"
    SECAGG = "secagg"
    AGGREGATE = "aggregate"
    PUBLISH = "publish"
    ABORTED = "aborted"


class HostRoundError(ConfigError):
    """A round cannot be opened as asked (plan and model disagree, layout mismatch)."""


@dataclass(frozen=True)
class HostConfig:
    """The aggregator's round-independent settings."""

    fleet: str
    identity: IdentityKey
    enrolled: Mapping[str, bytes]
    layout: ParameterLayout
    strategy: Strategy
    cohort: CohortPolicy
    ledger_check: LedgerCheck | None = None
    nonce_seed: bytes | None = None  # SIMULATION ONLY: ServerConfig.nonce_seed (a seeded round nonce); never deployed

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))


@dataclass(frozen=True)
class HostRefusal:
    stage: HostStage
    sender: str
    message_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class HostState:
    config: HostConfig
    plan: RoundPlan
    model: ModelRelease
    params: np.ndarray  # the flat global parameters the round starts from
    strategy_state: Any
    stage: HostStage = HostStage.PLAN
    deadline: float | None = None
    ready: tuple[str, ...] = ()  # in arrival order
    declines: Mapping[str, Decline] = None  # type: ignore[assignment]
    cohort: tuple[str, ...] = ()
    server: ServerState | None = None
    new_params: np.ndarray | None = None
    new_model: ModelRelease | None = None
    contributors: tuple[str, ...] = ()
    report: Any = None
    abort_reason: str | None = None
    refusals: tuple[HostRefusal, ...] = ()

    @property
    def invited(self) -> tuple[str, ...]:
        sampling = self.plan.sampling
        return sampling.cohort if sampling.kind == Sampling.SERVER else tuple(self.config.enrolled.order)


def model_release(config: HostConfig, version: int, params: Mapping[str, np.ndarray] | np.ndarray) -> ModelRelease:
    """The signed release of ``params`` as model ``version``."""
    flat = params if isinstance(params, np.ndarray) else config.layout.flatten(params)
    payload = np.asarray(flat, dtype="<f4").tobytes()
    if len(payload) != 4 * config.layout.dim:
        raise HostRoundError(f"parameters have {len(payload) // 4} entries, the layout {config.layout.dim}")
    return ModelRelease.of(config.fleet, version, payload).sign(config.identity)


def start_host_round(config: HostConfig, plan: RoundPlan, params: Mapping[str, np.ndarray], now: float,
                     strategy_state: Any = None) -> Step:
    """Sign ``plan`` and broadcast it with the model it names (``plan.model_digest`` must be that model's)."""
    if plan.fleet != config.fleet:
        raise HostRoundError(f"plan is for fleet {plan.fleet!r}, this aggregator serves {config.fleet!r}")
    if plan.encoding.dim != config.layout.dim:
        raise HostRoundError(f"plan encodes {plan.encoding.dim} parameters, the model has {config.layout.dim}")
    unknown = [d for d in plan.sampling.cohort if d not in config.enrolled]
    if unknown:
        raise HostRoundError(f"plan invites devices that are not enrolled: {unknown[:5]}")
    model = model_release(config, plan.model_version, params)
    if model.digest != plan.model_digest:
        raise HostRoundError("plan.model_digest is not the SHA-256 of the model it is published with; build the plan "
                             "with draft_plan")
    signed = plan.sign(config.identity)
    if strategy_state is None:
        strategy_state = config.strategy.initial_state(config.layout.dim)
    state = HostState(config=config, plan=signed, model=model, params=config.layout.flatten(params),
                      strategy_state=strategy_state, declines={}, deadline=now + plan.deadlines.ready)
    effects = (PersistRound("host", signed.round_id, HostStage.PLAN.value, {"plan_digest": signed.digest.hex()}),
               Metric("round_started", 1.0, (("round", str(signed.round_index)),)))
    return Step(state, (Send(BROADCAST, signed), Send(BROADCAST, model)), effects)


def draft_plan(config: HostConfig, params: Mapping[str, np.ndarray], **terms: Any) -> RoundPlan:
    """An unsigned plan for ``params`` (its model digest filled in); ``terms`` are RoundPlan's other fields."""
    model = model_release(config, terms["model_version"], params)
    return RoundPlan(fleet=config.fleet, model_digest=model.digest, **terms)


# --- the machine --------------------------------------------------------------------------------

def handle_host(state: HostState, message: Any, now: float) -> Step:
    """Feed one device message (already past the router's envelope and sender checks)."""
    try:
        if isinstance(message, (Ready, Decline)):
            return _on_answer(state, message, now)
        if state.stage in (HostStage.TRAIN, HostStage.SECAGG) and state.server is not None:
            return _on_secagg(state, message, now)
        raise _Refuse(f"{type(message).__name__} is not expected in stage {state.stage.value}")
    except FleetlearnError as exc:
        return Step(_refused(state, message, exc))


def resolve_host(state: HostState, effect: Any, result: Any, now: float) -> Step:
    if isinstance(effect, AccountRound) and state.stage is HostStage.AGGREGATE:
        if isinstance(result, EffectFailed):
            return _abort(state, f"the round could not be accounted, so it is not published: {result.error}", now)
        return _publish(replace(state, report=result), now)
    return Step(state)


def tick_host(state: HostState, now: float) -> Step:
    if state.stage is HostStage.PLAN and state.deadline is not None and now >= state.deadline:
        return _close_plan(state, now)
    if state.stage in (HostStage.TRAIN, HostStage.SECAGG) and state.server is not None:
        server, out = tick_server(state.server, now)
        return _after_server(replace(state, server=server), out, now)
    return Step(state)


def host_deadline(state: HostState) -> float | None:
    if state.stage in (HostStage.TRAIN, HostStage.SECAGG) and state.server is not None:
        return state.server.deadline
    return state.deadline if state.stage is HostStage.PLAN else None


class HostRound:
    """The pump's view of the host machine (``edge_sdk.protocol.pump.RoundMachine``)."""

    handle = staticmethod(handle_host)
    resolve = staticmethod(resolve_host)
    tick = staticmethod(tick_host)
    deadline = staticmethod(host_deadline)

    @staticmethod
    def finished(state: HostState) -> bool:
        return state.stage in (HostStage.PUBLISH, HostStage.ABORTED)


class _Refuse(FleetlearnError):
    """Ignore the message and record why."""


class AnswerRefused(_Refuse):
    """A Ready or Decline that is not a valid, timely, first answer to this plan from an invited device."""


# --- PLAN ---------------------------------------------------------------------------------------

def take_answer(state: Any, answer: Ready | Decline, in_plan: bool) -> tuple[Any, bool]:
    """Check a Ready or Decline against ``state`` (a host or coordinator round) and record it.

    One rule for both machines: signed by the device's enrolled key, for this plan, in the PLAN stage,
    from an invited device, once. Returns the new state and whether every invited device has answered
    (server sampling), so the caller closes its PLAN stage; raises ``AnswerRefused`` otherwise.
    """
    device, plan = answer.device_id, state.plan
    if device not in state.config.enrolled:
        raise AnswerRefused(f"{type(answer).__name__} from {device!r}, which is not enrolled")
    answer.verify(state.config.enrolled[device])
    if (answer.fleet, answer.round_index, answer.plan_digest) != (plan.fleet, plan.round_index, plan.digest):
        raise AnswerRefused(f"{type(answer).__name__} from {device!r} answers another plan or round")
    if not in_plan:
        raise AnswerRefused(f"late {type(answer).__name__} from {device!r}: the cohort is already chosen")
    if device not in state.invited:
        raise AnswerRefused(f"{device!r} was not invited to round {plan.round_index}")
    if device in state.ready or device in state.declines:
        raise AnswerRefused(f"{device!r} already answered round {plan.round_index}")
    if isinstance(answer, Ready):
        state = replace(state, ready=state.ready + (device,))
    else:
        log.info("round %d: %s declines: %s %s", plan.round_index, device, answer.reason.name, answer.detail)
        state = replace(state, declines={**state.declines, device: answer})
    answered = len(state.ready) + len(state.declines) == len(state.invited)
    return state, plan.sampling.kind == Sampling.SERVER and answered


def _on_answer(state: HostState, answer: Ready | Decline, now: float) -> Step:
    state, all_answered = take_answer(state, answer, state.stage is HostStage.PLAN)
    return _close_plan(state, now) if all_answered else Step(state)


def _close_plan(state: HostState, now: float) -> Step:
    plan, config = state.plan, state.config
    cohort = admit(state.ready, config.cohort)
    if not cohort:
        return _abort(state, f"only {len(state.ready)} devices said Ready, below the minimum cohort of "
                             f"{config.cohort.min_size}", now, notify=state.ready)
    if len(cohort) < plan.t_honest:
        return _abort(state, f"only {len(cohort)} devices said Ready, below t_honest={plan.t_honest}, the count the "
                             "DP noise was calibrated for", now, notify=state.ready)
    policy = plan.secagg
    server_config = ServerConfig(
        config.identity, config.enrolled, bits=plan.encoding.bits, vector_length=plan.vector_length,
        dropout_fraction=policy.dropout_fraction, colluding_fraction=policy.colluding_fraction,
        degree=policy.degree, threshold=policy.threshold, stage_timeout=policy.stage_timeout,
        threat_model=ThreatModel(policy.threat_model), noise_floor=plan.t_honest, ledger_check=config.ledger_check,
        nonce_seed=config.nonce_seed)
    try:
        server, out = start_server(server_config, cohort, plan.round_index, now)
    except FleetlearnError as exc:
        return _abort(state, f"SecAgg+ cannot start: {exc}", now, notify=state.ready)
    server = replace(server, deadline=now + plan.deadlines.train + policy.stage_timeout)
    new = replace(state, stage=HostStage.TRAIN, cohort=cohort, server=server, deadline=None)
    sends = tuple(Send(d, m) for d, m in out)
    effects = (PersistRound("host", plan.round_id, HostStage.TRAIN.value, {"cohort": list(cohort)}),
               Metric("round_cohort", float(len(cohort)), (("round", str(plan.round_index)),)))
    return Step(new, sends, effects)


# --- TRAIN and SECAGG ---------------------------------------------------------------------------

def _on_secagg(state: HostState, message: Any, now: float) -> Step:
    before = len(state.server.rejections)
    server, out = handle_server(state.server, message, now)
    new = replace(state, server=server)
    if len(server.rejections) > before:
        r = server.rejections[-1]
        new = replace(new, refusals=new.refusals + (HostRefusal(state.stage, r.sender, r.message_type, str(r.error)),))
    return _after_server(new, out, now)


def _after_server(state: HostState, out: list, now: float) -> Step:
    sends = tuple(Send(d, m) for d, m in out)
    server = state.server
    if server.stage is Stage.ABORTED:
        step = _abort(state, server.abort_reason or "SecAgg+ aborted", now)
        return Step(step.state, sends + step.sends, step.effects)
    if server.stage is Stage.DONE:
        step = _aggregate(state, now)
        return Step(step.state, sends + step.sends, step.effects)
    if state.stage is HostStage.TRAIN and server.stage is not Stage.ADVERTISE_KEYS:
        state = replace(state, stage=HostStage.SECAGG)
        return Step(state, sends, (PersistRound("host", state.plan.round_id, HostStage.SECAGG.value),))
    return Step(state, sends)


# --- AGGREGATE and PUBLISH ----------------------------------------------------------------------

def _aggregate(state: HostState, now: float) -> Step:
    plan, server = state.plan, state.server
    contributors = tuple(server.contributors)
    # Never decode a sum that carries less noise than the plan promised, whatever the server allowed.
    if len(contributors) < plan.t_honest:
        return _abort(state, f"only {len(contributors)} contributors were summed, below the plan's t_honest="
                             f"{plan.t_honest}: the sum is not decoded", now)
    mean = decode_sum(server.result, plan.encoding, len(contributors))[: plan.encoding.dim]
    new_params, strategy_state = state.config.strategy.apply(state.params, mean, state.strategy_state)
    heads = {d: server.ledger_heads[d] for d in contributors}
    new = replace(state, stage=HostStage.AGGREGATE, contributors=contributors, new_params=new_params,
                  strategy_state=strategy_state)
    return Step(new, (), (AccountRound(plan.round_id, plan.participation_event(), contributors, heads),))


def _publish(state: HostState, now: float) -> Step:
    plan = state.plan
    release = model_release(state.config, plan.model_version + 1, state.new_params)
    new = replace(state, stage=HostStage.PUBLISH, new_model=release)
    labels = (("round", str(plan.round_index)),)
    effects = [PersistModel(release.version, release.digest, release.parameters),
               PersistRound("host", plan.round_id, HostStage.PUBLISH.value,
                            {"contributors": list(state.contributors), "model_version": release.version}),
               Metric("round_contributors", float(len(state.contributors)), labels)]
    epsilon = getattr(state.report, "epsilon", None)
    if epsilon is not None:
        effects.append(Metric("fleet_epsilon", float(epsilon), labels))
    return Step(new, (Send(BROADCAST, release),), tuple(effects))


def _abort(state: HostState, reason: str, now: float, notify: tuple[str, ...] = ()) -> Step:
    plan = state.plan
    log.info("round %d aborted: %s", plan.round_index, reason)
    new = replace(state, stage=HostStage.ABORTED, abort_reason=reason, deadline=None)
    sends: tuple[Send, ...] = ()
    if notify:
        notice = codec.sign(Abort(bytes(32), plan.round_index, reason[:1000]), state.config.identity)
        sends = tuple(Send(d, notice) for d in notify)
    effects = (PersistRound("host", plan.round_id, HostStage.ABORTED.value, {"reason": reason[:500]}),
               Metric("round_aborted", 1.0, (("round", str(plan.round_index)),)))
    return Step(new, sends, effects)


def _refused(state: HostState, message: Any, exc: Exception) -> HostState:
    sender = str(getattr(message, "device_id", None) or getattr(message, "sender", "?"))
    log.debug("round %d: refused %s from %s: %s", state.plan.round_index, type(message).__name__, sender, exc)
    return replace(state, refusals=state.refusals + (HostRefusal(state.stage, sender, type(message).__name__,
                                                                 str(exc)),))
