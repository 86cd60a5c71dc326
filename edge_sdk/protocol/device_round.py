"""DeviceRound: one device's round as a pure machine, PLAN → TRAIN → SECAGG → DONE | ABORTED.

``handle(state, message, now)``, ``resolve(state, effect, result, now)`` and ``tick(state, now)``
each return a ``Step`` (state, sends, effects); the pump runs it. The machine embeds the SecAgg+
client (``edge_sdk.secagg.client``) and adds what SecAgg+ alone does not know:

* **PLAN.** The signed plan is verified against the aggregator's key and checked against this
  device (fleet, a round newer than the last it took part in, its parameter layout, the threat
  model it accepts). With self sampling the device flips its own CSPRNG coin. Eligibility (budget
  for the plan's privacy event, local policies) is a ``CheckEligibility`` effect; the device then
  answers ``Decline`` (with a reason code) or, once it holds a verified model whose digest is the
  plan's, ``Ready``. Models are verified on arrival: unsigned, signed by another key, older than the
  last accepted version (rollback), or re-using a version with other bytes are refused.
* **TRAIN.** A RoundStart for this plan (signed; its t_honest, bits and vector length must be the
  plan's, or the aggregator contradicts its own signed terms and the device aborts) starts a
  ``Train`` effect; the result is encoded with the plan's DP parameters and handed to a fresh
  SecAgg+ client, which answers the RoundStart with its advert.
* **SECAGG.** Messages go to the client, except the ShareRelay: it is what makes the client send its
  MaskedInput, so the device first checks it is the aggregator's relay for this session, holds it
  and emits ``RecordParticipation``. Only the ``LedgerHead`` that effect returns (after the fsync)
  goes into the client, which then masks and signs. A failed record (budget, corrupt ledger) aborts
  silently: nothing about the update leaves.

Bad input never costs the round: an unsigned, mis-signed, replayed or out-of-stage message is
refused, recorded in ``state.refusals`` and nothing is sent. A correctly signed message that breaks
the plan's own terms aborts. A device declined, not selected or timed out records ``check_back_at``
(pace steering: the plan says how long to wait).
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_sdk.errors import FleetlearnError
from edge_sdk.privacy.encoding import encode_update
from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.privacy.noise import fresh_noise_generator, noise_mechanism
from edge_sdk.privacy.sampling import self_select
from edge_sdk.protocol.effects import (
    CheckEligibility,
    EffectFailed,
    Eligibility,
    Metric,
    PersistModel,
    PersistRound,
    RecordParticipation,
    Train,
)
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.messages import Decline, DeclineReason, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan, Sampling
from edge_sdk.protocol.pump import Step
from edge_sdk.protocol.routing import AGGREGATOR_ID, Send
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import ClientConfig, ClientState, handle_client, start_client, tick_client
from edge_sdk.secagg.errors import SecAggError, SignatureError
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.secagg.messages import Abort, RoundStart, ShareRelay, Stage
from edge_sdk.secagg.parameters import ThreatModel

log = logging.getLogger(__name__)

CLIENT_PATIENCE = 2.0  # a device's SecAgg+ stage timeout, in units of the aggregator's


class DeviceStage(enum.Enum):
    PLAN = "plan"
    TRAIN = "train"
    SECAGG = "secagg"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class DeviceConfig:
    """What a device knows before any round: itself, the aggregator's key, the fleet and its own assumptions."""

    fleet: str
    device_id: str
    identity: IdentityKey
    aggregator_public: bytes
    enrolled: Mapping[str, bytes]  # the enrolment directory, as SecAgg+ needs it
    layout: ParameterLayout
    colluding_fraction: float = 0.05  # this device's own assumption, whatever the plan says
    threat_model: ThreatModel = ThreatModel.ACTIVE  # the weakest aggregator model this device accepts
    # SIMULATION ONLY, NEVER IN PRODUCTION: derive each round's DP noise generator from sha256(noise_seed ||
    # round index), and the SecAgg+ agreement keys and self-mask seed from it too (ClientConfig.key_seed),
    # instead of the OS, so a simulated fleet with a seed reproduces its report byte for byte (in any fleet,
    # under any run id). A deployed device leaves this None: anyone who knows the seed could subtract the
    # noise, compute the device's masks and decrypt its shares.
    noise_seed: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))
        object.__setattr__(self, "threat_model", ThreatModel(self.threat_model))


@dataclass(frozen=True)
class DeviceMemory:
    """What a device keeps between rounds (persisted): the last round it answered, the last model it accepted."""

    last_round: int = -1
    model_version: int = -1
    model_digest: bytes = b""


@dataclass(frozen=True)
class Refusal:
    """One refused message: the stage, the message type and why. Nothing was sent in reply."""

    stage: DeviceStage
    message_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class DeviceState:
    config: DeviceConfig
    memory: DeviceMemory = DeviceMemory()
    stage: DeviceStage = DeviceStage.PLAN
    plan: RoundPlan | None = None
    model: ModelRelease | None = None  # the newest verified model
    eligible: bool | None = None  # None until CheckEligibility answered
    ready_sent: bool = False
    round_start: RoundStart | None = None
    base: np.ndarray | None = None  # the model's flat parameters this round trains from
    client: ClientState | None = None
    held_relay: ShareRelay | None = None
    ledger_head: LedgerHead | None = None
    deadline: float | None = None
    error: str | None = None
    declined: DeclineReason | None = None
    check_back_at: float | None = None
    refusals: tuple[Refusal, ...] = ()


def start_device(config: DeviceConfig, memory: DeviceMemory = DeviceMemory(),
                 model: ModelRelease | None = None) -> DeviceState:
    """A device waiting for a plan; ``model`` is the last model it verified and kept, if any."""
    return DeviceState(config=config, memory=memory, model=model)


class DeviceRoundError(FleetlearnError):
    """A device-side refusal, carried in ``Refusal.reason`` or ``state.error``."""


class _Refuse(DeviceRoundError):
    """Ignore the message and record why."""


class _Abort(DeviceRoundError):
    """The aggregator signed something that breaks its own plan: give up on the round."""


# --- the machine --------------------------------------------------------------------------------

def handle_device(state: DeviceState, message: Any, now: float) -> Step:
    """Feed one received message (already past the router's envelope and sender checks)."""
    try:
        if isinstance(message, ModelRelease):
            return _on_model(state, message, now)
        if state.stage in (DeviceStage.DONE, DeviceStage.ABORTED):
            raise _Refuse(f"the round is over ({state.stage.value})")
        if isinstance(message, RoundPlan):
            return _on_plan(state, message, now)
        if isinstance(message, Abort) and state.stage in (DeviceStage.PLAN, DeviceStage.TRAIN):
            return _on_early_abort(state, message, now)
        if isinstance(message, RoundStart):
            return _on_round_start(state, message, now)
        if state.stage is DeviceStage.SECAGG:
            return _on_secagg(state, message, now)
        raise _Refuse(f"{type(message).__name__} is not expected in stage {state.stage.value}")
    except _Abort as exc:
        return _aborted(state, str(exc), now)
    except (_Refuse, SecAggError, FleetlearnError) as exc:
        return Step(_refused(state, message, exc))


def resolve_device(state: DeviceState, effect: Any, result: Any, now: float) -> Step:
    """Take an effect's result (or ``EffectFailed``) back into the machine."""
    if isinstance(effect, CheckEligibility):
        return _on_eligibility(state, result, now)
    if isinstance(effect, Train):
        return _on_trained(state, result, now)
    if isinstance(effect, RecordParticipation):
        return _on_recorded(state, result, now)
    return Step(state)  # PersistRound, PersistModel, Metric: nothing comes back


def tick_device(state: DeviceState, now: float) -> Step:
    """Give up when a deadline passes: no RoundStart after Ready, no training result, a silent aggregator."""
    if state.stage in (DeviceStage.DONE, DeviceStage.ABORTED):
        return Step(state)
    if state.stage is DeviceStage.SECAGG and state.client is not None:
        client, _ = tick_client(state.client, now)
        return _after_client(replace(state, client=client), [], now)
    if state.deadline is not None and now >= state.deadline:
        what = "selected" if state.ready_sent else "answered"
        return _aborted(state, f"timed out in stage {state.stage.value}: not {what} in time", now)
    return Step(state)


def device_deadline(state: DeviceState) -> float | None:
    if state.stage is DeviceStage.SECAGG and state.client is not None:
        return state.client.deadline
    return state.deadline


class DeviceRound:
    """The pump's view of the device machine (``edge_sdk.protocol.pump.RoundMachine``)."""

    handle = staticmethod(handle_device)
    resolve = staticmethod(resolve_device)
    tick = staticmethod(tick_device)
    deadline = staticmethod(device_deadline)

    @staticmethod
    def finished(state: DeviceState) -> bool:
        return state.stage in (DeviceStage.DONE, DeviceStage.ABORTED)


# --- PLAN ---------------------------------------------------------------------------------------

def _on_model(state: DeviceState, model: ModelRelease, now: float) -> Step:
    cfg = state.config
    try:
        model.verify(cfg.aggregator_public)
    except (SignatureError, FleetlearnError) as exc:
        raise _Refuse(f"model refused: {exc}") from None
    if model.fleet != cfg.fleet:
        raise _Refuse(f"model is for fleet {model.fleet!r}")
    memory = state.memory
    if model.version < memory.model_version:
        raise _Refuse(f"model version {model.version} is older than version {memory.model_version} already "
                      "accepted: a rollback")
    if model.version == memory.model_version:
        if model.digest != memory.model_digest:
            raise _Refuse(f"model version {model.version} arrived with other bytes than the copy already accepted")
        if state.model is not None:
            return _maybe_ready(state, now)  # a retained copy of what we hold
    cfg.layout.from_bytes(model.parameters)  # the payload must fit this device's layout and be finite
    memory = replace(memory, model_version=model.version, model_digest=model.digest)
    new = replace(state, model=model, memory=memory)
    step = _maybe_ready(new, now)
    return Step(step.state, step.sends, (PersistModel(model.version, model.digest, model.parameters),) + step.effects)


def _on_plan(state: DeviceState, plan: RoundPlan, now: float) -> Step:
    cfg = state.config
    if state.plan is not None:
        if plan.digest == state.plan.digest:
            raise _Refuse("duplicate plan")
        raise _Refuse(f"a second plan while round {state.plan.round_index} is open")
    plan.verify(cfg.aggregator_public)
    if plan.fleet != cfg.fleet:
        raise _Refuse(f"plan is for fleet {plan.fleet!r}, this device is in {cfg.fleet!r}")
    if plan.round_index <= state.memory.last_round:
        raise _Refuse(f"plan for round {plan.round_index}, but this device already answered round "
                      f"{state.memory.last_round}: a replay")
    if not plan.sampling.invites(cfg.device_id):
        return _finish_uninvited(state, plan, now, "the plan's cohort does not invite this device")
    memory = replace(state.memory, last_round=plan.round_index)
    planned = replace(state, plan=plan, memory=memory, deadline=now + plan.deadlines.ready + plan.secagg.stage_timeout)
    refusal = _plan_refusal(cfg, plan)
    if refusal:
        return _decline(planned, DeclineReason.PLAN_REFUSED, refusal, now)
    if plan.sampling.kind == Sampling.SELF and not self_select(plan.sampling.probability):
        return _finish_uninvited(planned, plan, now, "this device's coin did not select it")
    persist = PersistRound("device", plan.round_id, DeviceStage.PLAN.value, {"plan_digest": plan.digest.hex()})
    return Step(planned, (), (persist, CheckEligibility(plan, plan.participation_event())))


def _plan_refusal(cfg: DeviceConfig, plan: RoundPlan) -> str | None:
    if plan.encoding.dim != cfg.layout.dim:
        return f"plan encodes {plan.encoding.dim} parameters, this device's model has {cfg.layout.dim}"
    if ThreatModel(plan.secagg.threat_model) is not cfg.threat_model and cfg.threat_model is ThreatModel.ACTIVE:
        return f"plan assumes a {plan.secagg.threat_model} aggregator; this device requires {cfg.threat_model.value}"
    return None


def _on_eligibility(state: DeviceState, result: Any, now: float) -> Step:
    if state.stage is not DeviceStage.PLAN or state.plan is None:
        return Step(state)
    if isinstance(result, EffectFailed):
        return _decline(state, DeclineReason.INELIGIBLE, f"eligibility check failed: {result.error}", now)
    if not isinstance(result, Eligibility):
        return _decline(state, DeclineReason.INELIGIBLE, f"eligibility check returned {type(result).__name__}", now)
    if not result.eligible:
        return _decline(state, DeclineReason(result.reason or DeclineReason.INELIGIBLE), result.detail, now)
    return _maybe_ready(replace(state, eligible=True), now)


def _maybe_ready(state: DeviceState, now: float) -> Step:
    """Send Ready once the plan is eligible and a verified model with the plan's digest is held."""
    plan = state.plan
    if state.stage is not DeviceStage.PLAN or plan is None or not state.eligible or state.ready_sent:
        return Step(state)
    if state.model is None or state.model.digest != plan.model_digest:
        return Step(state)  # wait for the model release (retained: it is on its way)
    cfg = state.config
    ready = Ready(cfg.fleet, cfg.device_id, plan.round_index, plan.digest).sign(cfg.identity)
    return Step(replace(state, ready_sent=True), (Send(AGGREGATOR_ID, ready),),
                (Metric("device_ready", 1.0, (("round", str(plan.round_index)),)),))


def _decline(state: DeviceState, reason: DeclineReason, detail: str, now: float) -> Step:
    cfg, plan = state.config, state.plan
    decline = Decline(cfg.fleet, cfg.device_id, plan.round_index, plan.digest, reason, detail[:512]).sign(cfg.identity)
    log.info("device %s declines round %d: %s (%s)", cfg.device_id, plan.round_index, reason.name, detail)
    new = replace(state, stage=DeviceStage.ABORTED, declined=reason, error=f"declined: {reason.name}: {detail}",
                  check_back_at=now + plan.check_back_after, deadline=None)
    return Step(new, (Send(AGGREGATOR_ID, decline),),
                (PersistRound("device", plan.round_id, "declined", {"reason": reason.name}),))


def _finish_uninvited(state: DeviceState, plan: RoundPlan, now: float, why: str) -> Step:
    new = replace(state, stage=DeviceStage.ABORTED, plan=plan, error=why, check_back_at=now + plan.check_back_after,
                  deadline=None)
    return Step(new)


def _on_early_abort(state: DeviceState, message: Abort, now: float) -> Step:
    codec.verify(message, state.config.aggregator_public, "the aggregator")
    if state.plan is None or message.round_index != state.plan.round_index:
        raise _Refuse(f"Abort for round {message.round_index} is not this device's round")
    return _aborted(state, f"the aggregator aborted the round: {message.reason}", now)


# --- TRAIN --------------------------------------------------------------------------------------

def _on_round_start(state: DeviceState, start: RoundStart, now: float) -> Step:
    plan = state.plan
    if state.stage is not DeviceStage.PLAN or not state.ready_sent or plan is None:
        raise _Refuse(f"RoundStart in stage {state.stage.value} before this device said Ready")
    codec.verify(start, state.config.aggregator_public, "the aggregator")
    if start.round_index != plan.round_index:
        raise _Refuse(f"RoundStart for round {start.round_index}, the plan is for {plan.round_index}")
    for name, announced, planned in (("t_honest", start.noise_floor, plan.t_honest),
                                     ("bits", start.bits, plan.encoding.bits),
                                     ("vector length", start.vector_length, plan.vector_length)):
        if announced != planned:
            raise _Abort(f"the aggregator's RoundStart announces {name}={announced}, its signed plan says {planned}")
    params = state.config.layout.from_bytes(state.model.parameters)  # fresh copies: Train may change them
    base = state.config.layout.flatten(params)
    new = replace(state, stage=DeviceStage.TRAIN, round_start=start, base=base, deadline=now + plan.deadlines.train)
    return Step(new, (), (PersistRound("device", plan.round_id, DeviceStage.TRAIN.value), Train(plan, params)))


def _noise_generator(cfg: DeviceConfig, plan: RoundPlan) -> np.random.Generator:
    """The OS-seeded generator, or (simulation only, ``noise_seed`` set) one derived from the seed and round."""
    if cfg.noise_seed is None:
        return fresh_noise_generator()
    digest = hashlib.sha256(cfg.noise_seed + plan.round_index.to_bytes(8, "big")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "big")))


def _secagg_key_seed(cfg: DeviceConfig) -> bytes | None:
    """None (fresh OS keys), or (simulation only, ``noise_seed`` set) a key seed apart from the noise's."""
    if cfg.noise_seed is None:
        return None
    return hashlib.sha256(b"fleetlearn-simulation-secagg-key-seed/" + cfg.noise_seed).digest()


def _on_trained(state: DeviceState, result: Any, now: float) -> Step:
    if state.stage is not DeviceStage.TRAIN:
        return Step(state)
    if isinstance(result, EffectFailed):
        return _aborted(state, f"local training failed: {result.error}", now)
    plan, cfg = state.plan, state.config
    try:
        update = cfg.layout.flatten(result) - state.base
        vector = encode_update(update, plan.encoding, noise_mechanism(plan.mechanism),
                               plan.participation_event().local_variance, _noise_generator(cfg, plan))
    except FleetlearnError as exc:
        return _aborted(state, f"the update could not be encoded: {exc}", now)
    # The device's own assumptions decide what it accepts; a device that allows the weaker model follows the plan.
    threat_model = cfg.threat_model if cfg.threat_model is ThreatModel.ACTIVE else ThreatModel(plan.secagg.threat_model)
    # The aggregator may wait a whole stage for slower devices before it answers: wait twice as long as it does.
    client_config = ClientConfig(cfg.device_id, cfg.identity, cfg.aggregator_public, cfg.enrolled,
                                 stage_timeout=CLIENT_PATIENCE * plan.secagg.stage_timeout,
                                 colluding_fraction=cfg.colluding_fraction,
                                 threat_model=threat_model, key_seed=_secagg_key_seed(cfg))
    client = start_client(client_config, vector, now, plan.round_index, t_honest=plan.t_honest)
    client, out = handle_client(client, state.round_start, now)
    new = replace(state, stage=DeviceStage.SECAGG, client=client, deadline=None)
    step = _after_client(new, out, now)
    return Step(step.state, step.sends, (PersistRound("device", plan.round_id, DeviceStage.SECAGG.value),)
                + step.effects)


# --- SECAGG -------------------------------------------------------------------------------------

def _on_secagg(state: DeviceState, message: Any, now: float) -> Step:
    client = state.client
    if isinstance(message, ShareRelay) and client.stage is Stage.SHARE_KEYS and state.ledger_head is None:
        if state.held_relay is not None:
            raise _Refuse("a second ShareRelay while the participation is being recorded")
        codec.verify(message, state.config.aggregator_public, "the aggregator")
        if (message.round_index, message.session_id, message.receiver) != (
                client.round_index, client.session_id, state.config.device_id):
            raise _Refuse("ShareRelay is for another round, session or device")
        # The relay makes the client mask and send: write the ledger entry first.
        return Step(replace(state, held_relay=message), (),
                    (RecordParticipation(state.plan.round_id, state.plan.participation_event()),))
    rejected_before = len(client.rejections)
    client, out = handle_client(client, message, now)
    new = replace(state, client=client)
    if len(client.rejections) > rejected_before:
        new = replace(new, refusals=new.refusals + (
            Refusal(state.stage, type(message).__name__, str(client.rejections[-1])),))
    return _after_client(new, out, now)


def _on_recorded(state: DeviceState, result: Any, now: float) -> Step:
    if state.stage is not DeviceStage.SECAGG or state.held_relay is None:
        return Step(state)
    if isinstance(result, EffectFailed):
        return _aborted(replace(state, held_relay=None), f"the participation could not be recorded: {result.error}",
                        now)
    if not isinstance(result, LedgerHead):
        return _aborted(state, f"RecordParticipation returned {type(result).__name__}, not a LedgerHead", now)
    client = replace(state.client, ledger_head=result.to_bytes())
    client, out = handle_client(client, state.held_relay, now)
    new = replace(state, client=client, held_relay=None, ledger_head=result)
    return _after_client(new, out, now)


def _after_client(state: DeviceState, out: list, now: float) -> Step:
    sends = tuple(Send(AGGREGATOR_ID, m) for m in out)
    client = state.client
    if client.stage is Stage.ABORTED:
        return _aborted(state, client.abort_reason or "SecAgg+ aborted", now, sends)
    if client.stage is Stage.DONE:
        plan = state.plan
        done = replace(state, stage=DeviceStage.DONE, deadline=None)
        return Step(done, sends, (PersistRound("device", plan.round_id, DeviceStage.DONE.value),
                                  Metric("device_round_done", 1.0, (("round", str(plan.round_index)),))))
    return Step(state, sends)


# --- endings ------------------------------------------------------------------------------------

def _aborted(state: DeviceState, why: str, now: float, sends: tuple = ()) -> Step:
    plan = state.plan
    log.info("device %s: round %s aborted: %s", state.config.device_id, plan.round_index if plan else "?", why)
    new = replace(state, stage=DeviceStage.ABORTED, error=why, deadline=None,
                  check_back_at=now + (plan.check_back_after if plan else 0.0))
    effects = (PersistRound("device", plan.round_id, DeviceStage.ABORTED.value, {"why": why[:200]}),) if plan else ()
    return Step(new, sends, effects)


def _refused(state: DeviceState, message: Any, exc: Exception) -> DeviceState:
    log.debug("device %s refused %s: %s", state.config.device_id, type(message).__name__, exc)
    return replace(state, refusals=state.refusals + (Refusal(state.stage, type(message).__name__, str(exc)),))

