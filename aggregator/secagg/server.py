"""The SecAgg+ server state machine: one pure handler per stage, deadlines as explicit ticks.

``start_server`` opens a round, ``handle_server(state, message, now)`` consumes one device
message, ``tick_server(state, now)`` closes a stage whose deadline has passed. Each returns the
next state and a list of ``(device_id, message)`` to deliver. A stage also closes early once
every device still expected has answered.

Bad input is rejected with a typed error recorded in ``state.rejections``. Only a message that
verifies under the claimed sender's own enrolled key and then breaks the protocol counts against
that sender (it is dropped from the round): an unsigned or mis-signed message, a replay from
another round or session, a malformed one, and late or duplicate messages (MQTT QoS 1
redelivers) are recorded and ignored, so an outsider cannot get an honest device excluded. A
device's complaint about a partner's share (``MaskedInput.rejected``) only means it holds no share
of that partner; nobody is dropped on another device's word.

Whenever fewer than t devices remain, or the survivors minus the assumed colluders fall below the
t_honest the DP noise was calibrated for (the noise floor), the round aborts with a reason and no
result: the server reconstructs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from aggregator.secagg.unmask import UnmaskInputs, reconstruct_sum
from edge_sdk.privacy.noise_floor import honest_contributors
from edge_sdk.secagg import codec
from edge_sdk.secagg.codec import LEDGER_HEAD_BYTES
from edge_sdk.secagg.errors import (
    ProtocolViolationError,
    ReconstructionError,
    ReplayError,
    SecAggConfigError,
    SecAggError,
    SignatureError,
)
from edge_sdk.secagg.graph import holder_seed, mask_partners, share_holders
from edge_sdk.secagg.keys import AgreementKey, IdentityKey
from edge_sdk.secagg.membership import Directory, to_bitmap
from edge_sdk.secagg.messages import (
    Abort,
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    NeighbourKey,
    Roster,
    RoundStart,
    ShareKeys,
    ShareRelay,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    survivors_digest,
)
from edge_sdk.secagg.parameters import (
    SecAggParameters,
    ThreatModel,
    check_parameters,
    choose_parameters,
    consistency_quorum,
    expected_count,
    noise_floor_shortfall,
)
from edge_sdk.secagg.prg import check_bits, modulus_mask
from edge_sdk.secagg.shamir import decode_share

log = logging.getLogger(__name__)

Outgoing = list[tuple[str, object]]  # (device id, message) pairs to deliver


_KEY_PROBE = AgreementKey.generate()  # only used to test advertised public keys for low order

# device id, its 40-byte ledger head -> why the device is refused (its ledger was rolled back), or None
LedgerCheck = Callable[[str, bytes], "str | None"]


class StaleMessageError(SecAggError):
    """A late or duplicate message: recorded, but its sender is not penalised."""


class LedgerRefusedError(ProtocolViolationError):
    """The device's ledger head shows a rollback: it is refused and told what it has spent."""


@dataclass(frozen=True)
class ServerConfig:
    """Round-independent settings of the aggregator's SecAgg+ role.

    ``noise_floor`` is t_honest, the honest contributors each device's DP noise was calibrated for;
    by default the count the fractions leave of the cohort (``honest_contributors``).
    ``ledger_check`` is the aggregator's own per-device participation record, asked about every
    ledger head that arrives with a masked input.
    """

    identity: IdentityKey
    enrolled: Mapping[str, bytes]  # device id -> Ed25519 identity public key: a Directory
    bits: int
    vector_length: int
    dropout_fraction: float = 0.05
    colluding_fraction: float = 0.05
    degree: int | None = None  # explicit (k, t) for small or test cohorts; else the finder chooses
    threshold: int | None = None
    stage_timeout: float = 60.0
    threat_model: ThreatModel = ThreatModel.ACTIVE
    noise_floor: int | None = None
    ledger_check: LedgerCheck | None = None
    # SIMULATION ONLY, NEVER IN PRODUCTION: derive each round's nonce from sha256(nonce_seed || round index)
    # instead of os.urandom, so a seeded simulation reproduces its rosters byte for byte. A deployed
    # aggregator leaves this None: a predictable nonce lets devices' holder draws be known in advance.
    nonce_seed: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))
        object.__setattr__(self, "threat_model", ThreatModel(self.threat_model))
        if self.noise_floor is not None and self.noise_floor < 1:
            raise SecAggConfigError(f"noise_floor (t_honest) must be at least 1, got {self.noise_floor}")

    def parameters(self, n: int) -> SecAggParameters:
        if self.degree is None and self.threshold is None:
            return choose_parameters(n, self.dropout_fraction, self.colluding_fraction, self.threat_model)
        if self.degree is None or self.threshold is None:
            raise SecAggConfigError("give both degree and threshold, or neither (then the finder picks them)")
        degree = min(self.degree, n - 1)
        check_parameters(n, degree, self.threshold, self.colluding_fraction, self.threat_model)
        return SecAggParameters(n=n, degree=degree, threshold=self.threshold)

    def floor_for(self, cohort: int) -> int:
        if self.noise_floor is not None:
            return self.noise_floor
        return honest_contributors(cohort, self.dropout_fraction, self.colluding_fraction)


@dataclass(frozen=True)
class Rejection:
    """One rejected device message, for logs, metrics and tests."""

    sender: str
    message_type: str
    error: SecAggError


@dataclass(frozen=True, eq=False)
class ServerState:
    config: ServerConfig
    round_index: int
    round_nonce: bytes
    cohort: tuple[str, ...]
    noise_floor: int
    stage: Stage = Stage.ADVERTISE_KEYS
    deadline: float = 0.0
    adverts: Mapping[str, AdvertiseKeys] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # U1, sorted: the roster
    session_id: bytes = bytes(32)
    params: SecAggParameters | None = None
    index: Mapping[str, int] = field(default_factory=dict)
    holders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # drawn by each member, in U1
    partners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    share_keys: Mapping[str, ShareKeys] = field(default_factory=dict)
    u2: tuple[str, ...] = ()
    masked: Mapping[str, np.ndarray] = field(default_factory=dict)
    ledger_heads: Mapping[str, bytes] = field(default_factory=dict)  # every accepted masked input's head
    accusations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device -> shares it rejected
    u3: tuple[str, ...] = ()
    digest: bytes = b""
    consistency: Mapping[str, bytes] = field(default_factory=dict)
    u4: tuple[str, ...] = ()
    requests: Mapping[str, UnmaskRequest] = field(default_factory=dict)
    unmask: Mapping[str, UnmaskShares] = field(default_factory=dict)
    offenders: frozenset[str] = frozenset()
    rejections: tuple[Rejection, ...] = ()
    bad_shares: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # owner -> holders whose share was off
    result: np.ndarray | None = None
    abort_reason: str | None = None

    @property
    def threshold(self) -> int:
        return self.params.threshold if self.params else 2

    @property
    def colluding(self) -> int:
        return expected_count(self.config.colluding_fraction, len(self.cohort))

    @property
    def contributors(self) -> tuple[str, ...]:
        """Devices whose inputs are in ``result`` (empty unless the round is DONE)."""
        return self.u3 if self.stage is Stage.DONE else ()


def start_server(
    config: ServerConfig, cohort: tuple[str, ...], round_index: int, now: float
) -> tuple[ServerState, Outgoing]:
    """Open a round for ``cohort`` (enrolled device ids); sends one signed RoundStart to each."""
    check_bits(config.bits)
    unknown = [d for d in cohort if d not in config.enrolled]
    if unknown:
        raise SecAggConfigError(f"cohort contains devices that are not enrolled: {unknown[:5]}")
    if len(set(cohort)) != len(cohort):
        raise SecAggConfigError("cohort lists a device twice")
    ordered = tuple(sorted(cohort))
    floor = config.floor_for(len(ordered))
    if floor < 1:
        raise SecAggConfigError(f"a cohort of {len(ordered)} leaves t_honest={floor} honest devices; enlarge it")
    state = ServerState(config=config, round_index=round_index, round_nonce=_round_nonce(config, round_index),
                        cohort=ordered, noise_floor=floor, deadline=now + config.stage_timeout)
    directory = config.enrolled
    start = codec.sign(RoundStart(round_index, state.round_nonce, config.bits, config.vector_length,
                                  directory.digest, to_bitmap(directory.order, ordered), floor), config.identity)
    return state, [(d, start) for d in state.cohort]


def _round_nonce(config: ServerConfig, round_index: int) -> bytes:
    """Fresh from the OS, or (simulation only, ``nonce_seed`` set) derived from the seed and the round."""
    if config.nonce_seed is None:
        return os.urandom(32)
    return hashlib.sha256(b"fleetlearn-simulation-round-nonce/" + config.nonce_seed
                          + round_index.to_bytes(8, "big")).digest()


def tick_server(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    """Close the current stage if its deadline has passed."""
    if state.stage in (Stage.DONE, Stage.ABORTED) or now < state.deadline:
        return state, []
    return _CLOSERS[state.stage](state, now)


def handle_server(state: ServerState, message: object, now: float) -> tuple[ServerState, Outgoing]:
    """Consume one device message; the stage closes at once if nobody else is awaited."""
    if state.stage in (Stage.DONE, Stage.ABORTED):
        return state, []
    sender = _sender_of(message)
    notices: Outgoing = []
    try:
        state = _HANDLERS[state.stage](state, message)
    except SecAggError as exc:
        log.debug("round %d: rejected %s from %r: %s", state.round_index, type(message).__name__, sender, exc)
        rejection = Rejection(sender, type(message).__name__, exc)
        offenders = state.offenders
        # Only a verified message that breaks the protocol costs its sender anything.
        if isinstance(exc, ProtocolViolationError) and sender in state.config.enrolled:
            offenders = offenders | {sender}
        if isinstance(exc, LedgerRefusedError):
            notices.append((sender, codec.sign(Abort(state.session_id, state.round_index, str(exc)),
                                               state.config.identity)))
        state = replace(state, rejections=state.rejections + (rejection,), offenders=offenders)
    if _awaited(state) <= _received(state):
        state, out = _CLOSERS[state.stage](state, now)
        return state, notices + out
    return state, notices


# --- bookkeeping --------------------------------------------------------------------------------

def _sender_of(message: object) -> str:
    return str(getattr(message, "sender", getattr(message, "device_id", "?")))


def _awaited(state: ServerState) -> set[str]:
    expected = {
        Stage.ADVERTISE_KEYS: state.cohort,
        Stage.SHARE_KEYS: state.members,
        Stage.MASKED_INPUT: state.u2,
        Stage.CONSISTENCY_CHECK: state.u3,
        Stage.UNMASK: state.u4,
    }[state.stage]
    return set(expected) - state.offenders


def _received(state: ServerState) -> set[str]:
    return set({
        Stage.ADVERTISE_KEYS: state.adverts,
        Stage.SHARE_KEYS: state.share_keys,
        Stage.MASKED_INPUT: state.masked,
        Stage.CONSISTENCY_CHECK: state.consistency,
        Stage.UNMASK: state.unmask,
    }[state.stage])


def _check_device_message(state: ServerState, message: object, sender: str, allowed: set[str] | tuple) -> None:
    """Signature against enrolment, then session and round; raises the matching typed error."""
    if sender not in state.config.enrolled:
        raise SignatureError(f"{type(message).__name__} claims sender {sender!r}, which is not enrolled")
    codec.verify(message, state.config.enrolled[sender], f"device {sender!r}")
    if message.round_index != state.round_index or message.session_id != state.session_id:
        raise ReplayError(
            f"{type(message).__name__} from {sender!r} is for round {message.round_index} session "
            f"{message.session_id.hex()[:12]}, not round {state.round_index} session {state.session_id.hex()[:12]}"
        )
    if sender not in allowed or sender in state.offenders:
        raise StaleMessageError(f"{sender!r} is not expected in stage {state.stage.name} (dropped earlier)")


def _type_check(state: ServerState, message: object, expected: type) -> None:
    if not isinstance(message, expected):
        raise StaleMessageError(f"{type(message).__name__} arrived in stage {state.stage.name}")


def _abort(state: ServerState, reason: str) -> tuple[ServerState, Outgoing]:
    log.info("round %d aborted: %s", state.round_index, reason)
    notice = codec.sign(Abort(state.session_id, state.round_index, reason), state.config.identity)
    recipients = state.members or state.cohort
    new = replace(state, stage=Stage.ABORTED, abort_reason=reason, result=None)
    return new, [(d, notice) for d in recipients]


def _below_threshold(state: ServerState, survivors: set[str] | tuple, what: str) -> str | None:
    if len(survivors) < state.threshold:
        return f"only {len(survivors)} devices {what}, below the threshold t={state.threshold}"
    return None


def _keep_recoverable(state: ServerState, candidates: set[str]) -> set[str]:
    """Drop, until none is left, devices with fewer than t of their drawn holders among the candidates.

    Such a device's secrets cannot be rebuilt (or would rest on colluders), and its honest copy would
    refuse the set anyway; dropping one can leave another short, hence the fixed point.
    """
    kept = set(candidates)
    while True:
        short = {u for u in kept if len(set(state.holders[u]) & kept) < state.threshold}
        if not short:
            return kept
        kept -= short


def _drew(state: ServerState, holder: str) -> set[str]:
    """The members that drew ``holder`` to hold their shares: all among its mask partners, so O(k^2)."""
    return {v for v in state.partners[holder] if holder in state.holders[v]}


def _floor_or_threshold(state: ServerState, devices: set[str] | tuple, what: str) -> str | None:
    reason = _below_threshold(state, devices, what)
    if reason:
        return reason
    shortfall = noise_floor_shortfall(len(devices), state.colluding, state.noise_floor)
    return f"{what}: {shortfall}" if shortfall else None


# --- stage handlers: validate and record one message --------------------------------------------

def _on_advertise(state: ServerState, message: object) -> ServerState:
    _type_check(state, message, AdvertiseKeys)
    sender = message.device_id
    if sender not in state.cohort or sender not in state.config.enrolled:
        raise SignatureError(f"advert from {sender!r}, which is not in this round's cohort")
    codec.verify(message, state.config.enrolled[sender], f"device {sender!r}")
    if message.round_index != state.round_index or message.round_nonce != state.round_nonce:
        raise ReplayError(f"advert from {sender!r} is for round {message.round_index} with another nonce (replay)")
    if sender in state.offenders:
        raise StaleMessageError(f"{sender!r} was dropped earlier in this round")
    previous = state.adverts.get(sender)
    if previous is not None:
        if previous == message:
            raise StaleMessageError(f"duplicate advert from {sender!r}")
        raise ProtocolViolationError(f"{sender!r} advertised two different key pairs in one round")
    for name in ("c_public", "s_public"):
        try:  # a low-order X25519 key would make every partner's agreement fail later
            _KEY_PROBE.exchange(getattr(message, name))
        except SignatureError:
            raise ProtocolViolationError(f"{sender!r} advertised an unusable (low-order) {name}") from None
    return replace(state, adverts={**state.adverts, sender: message})


def _on_share_keys(state: ServerState, message: object) -> ServerState:
    _type_check(state, message, ShareKeys)
    sender = message.sender
    _check_device_message(state, message, sender, state.members)
    if sender in state.share_keys:
        raise StaleMessageError(f"duplicate ShareKeys from {sender!r}")
    receivers = [s.receiver for s in message.shares]
    if any(s.sender != sender for s in message.shares) or sorted(receivers) != sorted(set(receivers)):
        raise ProtocolViolationError(f"ShareKeys from {sender!r} has foreign or repeated shares")
    if set(receivers) != set(state.holders[sender]):
        raise ProtocolViolationError(f"ShareKeys from {sender!r} does not address exactly the holders it drew")
    return replace(state, share_keys={**state.share_keys, sender: message})


def _on_masked_input(state: ServerState, message: object) -> ServerState:
    _type_check(state, message, MaskedInput)
    sender = message.sender
    _check_device_message(state, message, sender, state.u2)
    if sender in state.masked:
        raise StaleMessageError(f"duplicate MaskedInput from {sender!r}")
    if message.masked.shape != (state.config.vector_length,):
        raise ProtocolViolationError(
            f"masked input from {sender!r} has shape {message.masked.shape}, expected ({state.config.vector_length},)"
        )
    if np.any(message.masked > modulus_mask(state.config.bits)):
        raise ProtocolViolationError(f"masked input from {sender!r} has entries >= 2^{state.config.bits}")
    shared_with = _drew(state, sender) & set(state.u2)
    if not set(message.rejected) <= shared_with:
        raise ProtocolViolationError(f"{sender!r} rejects shares from devices that never sent it one")
    if len(message.ledger_head) != LEDGER_HEAD_BYTES:
        raise ProtocolViolationError(f"{sender!r} sent a ledger head of {len(message.ledger_head)} bytes")
    if state.config.ledger_check is not None:
        refusal = state.config.ledger_check(sender, message.ledger_head)
        if refusal:
            raise LedgerRefusedError(f"{sender!r} refused: {refusal}")
    if message.rejected:
        log.info("round %d: %r holds no valid share of %s", state.round_index, sender, list(message.rejected))
    return replace(state, masked={**state.masked, sender: message.masked},
                   ledger_heads={**state.ledger_heads, sender: message.ledger_head},
                   accusations={**state.accusations, sender: tuple(message.rejected)})


def _on_consistency(state: ServerState, message: object) -> ServerState:
    _type_check(state, message, ConsistencyCheck)
    sender = message.sender
    _check_device_message(state, message, sender, state.u3)
    if sender in state.consistency:
        raise StaleMessageError(f"duplicate ConsistencyCheck from {sender!r}")
    if message.survivors_digest != state.digest:
        raise ProtocolViolationError(f"{sender!r} signed a different survivor view")
    return replace(state, consistency={**state.consistency, sender: message.signature})


def _on_unmask(state: ServerState, message: object) -> ServerState:
    _type_check(state, message, UnmaskShares)
    sender = message.sender
    _check_device_message(state, message, sender, state.u4)
    if sender in state.unmask:
        raise StaleMessageError(f"duplicate UnmaskShares from {sender!r}")
    request = state.requests[sender]
    b_owners = [o for o, _ in message.self_mask_shares]
    s_owners = [o for o, _ in message.mask_key_shares]
    if not set(b_owners) <= set(request.self_mask_owners) or not set(s_owners) <= set(request.mask_key_owners):
        raise ProtocolViolationError(f"{sender!r} sent shares that were not requested")
    if len(set(b_owners)) != len(b_owners) or len(set(s_owners)) != len(s_owners):
        raise ProtocolViolationError(f"{sender!r} sent two shares for one device")
    for _, raw in message.self_mask_shares + message.mask_key_shares:
        try:
            decode_share(raw)
        except ReconstructionError as exc:
            raise ProtocolViolationError(f"share from {sender!r} is malformed: {exc}") from None
    return replace(state, unmask={**state.unmask, sender: message})


# --- stage closers: decide who is in, and talk to the devices ----------------------------------

def _draw_holders(state: ServerState, members: tuple[str, ...], degree: int) -> dict[str, tuple[str, ...]]:
    member_set = set(members)
    holders = {}
    for u in members:
        a = state.adverts[u]
        seed = holder_seed(state.round_nonce, u, a.c_public, a.s_public, a.self_mask_commitment)
        drawn = share_holders(state.cohort, state.cohort.index(u), degree, seed)
        holders[u] = tuple(sorted(set(drawn) & member_set))
    return holders


def _close_advertise(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    advertised = tuple(sorted(d for d in state.adverts if d not in state.offenders))
    try:
        params = state.config.parameters(len(state.cohort))
    except SecAggConfigError as exc:
        return _abort(state, f"no safe parameters for a cohort of {len(state.cohort)}: {exc}")
    state = replace(state, params=params)
    if len(advertised) < 2:
        return _abort(state, f"only {len(advertised)} devices advertised keys; secure aggregation needs at least 2")
    # Devices that lost too many drawn holders before the roster cannot be unmasked: leave them out.
    drawn = _draw_holders(state, advertised, params.degree)
    state = replace(state, holders=drawn)
    members = tuple(sorted(_keep_recoverable(state, set(advertised))))
    reason = _floor_or_threshold(state, members, "devices advertised keys with enough holders")
    if reason:
        return _abort(state, reason)
    member_set = set(members)  # a subset of the advertised: narrow the draws, do not redraw them
    holders = {u: tuple(h for h in drawn[u] if h in member_set) for u in members}
    partners = mask_partners(holders, members)
    directory = state.config.enrolled
    shared = Roster("", state.round_index, state.round_nonce, state.config.bits, state.config.vector_length,
                    params.degree, params.threshold, directory.digest, to_bitmap(directory.order, state.cohort),
                    to_bitmap(directory.order, members), state.noise_floor, ())
    session_id = codec.session_id_of(shared)
    out = []
    for d in members:
        keys = tuple(NeighbourKey(v, state.adverts[v].c_public, state.adverts[v].s_public,
                                  state.adverts[v].self_mask_commitment, state.adverts[v].signature)
                     for v in partners[d])
        out.append((d, codec.sign(replace(shared, receiver=d, neighbours=keys), state.config.identity)))
    new = replace(state, stage=Stage.SHARE_KEYS, members=members, session_id=session_id,
                  index={d: i + 1 for i, d in enumerate(members)}, holders=holders, partners=partners,
                  deadline=now + state.config.stage_timeout)
    return new, out


def _close_share_keys(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    u2 = tuple(sorted(_keep_recoverable(state, {d for d in state.share_keys if d not in state.offenders})))
    reason = _floor_or_threshold(state, u2, "shared their keys")
    if reason:
        return _abort(replace(state, u2=u2), reason)
    inbox: dict[str, list] = {u: [] for u in u2}
    for sender in u2:
        for share in state.share_keys[sender].shares:
            if share.receiver in inbox:
                inbox[share.receiver].append(share)
    bitmap = to_bitmap(state.members, u2)
    out = [(u, codec.sign(ShareRelay(u, state.session_id, state.round_index, bitmap, tuple(inbox[u])),
                          state.config.identity)) for u in u2]
    return replace(state, stage=Stage.MASKED_INPUT, u2=u2, deadline=now + state.config.stage_timeout), out


def _close_masked_input(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    submitted = {d for d in state.masked if d not in state.offenders}
    u3 = tuple(sorted(_keep_recoverable(state, submitted)))
    if len(u3) < len(submitted):
        log.info("round %d: leaving out %s: fewer than t of their holders submitted input",
                 state.round_index, sorted(submitted - set(u3)))
    reason = _floor_or_threshold(state, u3, "submitted a masked input")
    if reason:
        return _abort(replace(state, u3=u3), reason)
    shared_bitmap, bitmap = to_bitmap(state.members, state.u2), to_bitmap(state.members, u3)
    digest = survivors_digest(state.session_id, state.round_index, shared_bitmap, bitmap)
    out = [(u, codec.sign(SurvivorSet(u, state.session_id, state.round_index, bitmap), state.config.identity))
           for u in u3]
    new = replace(state, stage=Stage.CONSISTENCY_CHECK, u3=u3, digest=digest,
                  deadline=now + state.config.stage_timeout)
    return new, out


def _close_consistency(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    u4 = tuple(sorted(d for d in state.consistency if d not in state.offenders))
    quorum = consistency_quorum(len(state.members), state.colluding, state.threshold, state.config.threat_model)
    if len(u4) < quorum:
        return _abort(replace(state, u4=u4), f"only {len(u4)} of {len(state.members)} members confirmed the "
                                             f"survivor view, below the consistency quorum {quorum}")
    # Exactly a quorum of signatures: more would only make every device's downlink grow.
    signers = u4[:quorum]
    bitmap = to_bitmap(state.members, signers)
    signatures = tuple(state.consistency[d] for d in signers)
    u2, u3 = set(state.u2), set(state.u3)
    dropped = u2 - u3
    requests = {}
    for u in u4:
        held = (_drew(state, u) & u2) - set(state.accusations.get(u, ()))
        requests[u] = codec.sign(
            UnmaskRequest(u, state.session_id, state.round_index, bitmap, signatures,
                          tuple(sorted((held & u3) | {u})), tuple(sorted(held & dropped))),
            state.config.identity)
    new = replace(state, stage=Stage.UNMASK, u4=u4, requests=requests, deadline=now + state.config.stage_timeout)
    return new, list(requests.items())


def _close_unmask(state: ServerState, now: float) -> tuple[ServerState, Outgoing]:
    responders = sorted(d for d in state.unmask if d not in state.offenders)
    reason = _below_threshold(state, responders, "sent their unmasking shares")
    if reason:
        return _abort(state, reason)
    b_shares: dict[str, dict[int, int]] = {}
    s_shares: dict[str, dict[int, int]] = {}
    for sender in responders:
        x = state.index[sender]
        reply = state.unmask[sender]
        for owner, raw in reply.self_mask_shares:
            b_shares.setdefault(owner, {})[x] = decode_share(raw)
        for owner, raw in reply.mask_key_shares:
            s_shares.setdefault(owner, {})[x] = decode_share(raw)
    inputs = UnmaskInputs(
        session_id=state.session_id, round_index=state.round_index, bits=state.config.bits,
        threshold=state.threshold, index=state.index,
        s_public={d: state.adverts[d].s_public for d in state.members},
        self_mask_commitments={d: state.adverts[d].self_mask_commitment for d in state.members},
        partners=state.partners, masked={u: state.masked[u] for u in state.u3},
        dropped=set(state.u2) - set(state.u3), self_mask_shares=b_shares, mask_key_shares=s_shares)
    try:
        unmasked = reconstruct_sum(inputs)
    except ReconstructionError as exc:
        return _abort(state, str(exc))
    by_x = {x: d for d, x in state.index.items()}
    bad = {owner: tuple(by_x[x] for x in xs) for owner, xs in unmasked.bad_shares.items()}
    if bad:
        # Named, not penalised: without verifiable secret sharing a share off the polynomial may have
        # been altered by its holder or dealt wrong by its owner, and the server cannot tell which.
        log.warning("round %d: shares off the polynomial (owner: holders) %s; rebuilt from the others",
                    state.round_index, bad)
    log.info("round %d: unmasked the sum of %d inputs", state.round_index, len(state.u3))
    return replace(state, stage=Stage.DONE, result=unmasked.total, bad_shares=bad, deadline=now), []


_HANDLERS: dict[Stage, Callable[[ServerState, object], ServerState]] = {
    Stage.ADVERTISE_KEYS: _on_advertise,
    Stage.SHARE_KEYS: _on_share_keys,
    Stage.MASKED_INPUT: _on_masked_input,
    Stage.CONSISTENCY_CHECK: _on_consistency,
    Stage.UNMASK: _on_unmask,
}
_CLOSERS: dict[Stage, Callable[[ServerState, float], tuple[ServerState, Outgoing]]] = {
    Stage.ADVERTISE_KEYS: _close_advertise,
    Stage.SHARE_KEYS: _close_share_keys,
    Stage.MASKED_INPUT: _close_masked_input,
    Stage.CONSISTENCY_CHECK: _close_consistency,
    Stage.UNMASK: _close_unmask,
}
