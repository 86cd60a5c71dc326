"""The SecAgg+ client state machine: one pure handler per stage, no I/O.

``handle_client(state, message, now)`` returns the next state and the messages to send to the
server; ``tick_client(state, now)`` applies the deadline. Randomness (keys, seeds, Shamir
coefficients, nonces) comes from the OS CSPRNG through ``cryptography`` and ``secrets``; only a
simulation may derive the agreement keys and self-mask seed from a seed (``ClientConfig.key_seed``).

Two kinds of bad input are told apart:

* a message that is unsigned, mis-signed, replayed (other session/round) or out of order is
  *ignored* and recorded in ``state.rejections``: a broker or a stray retransmission could send
  it, and dropping the round for it would hand anyone on the path a denial of service;
* a correctly signed server message that asks for something the protocol forbids proves the
  server misbehaves: the client aborts and reveals nothing more (``state.stage is Stage.ABORTED``,
  ``state.error`` says why).

Against an active aggregator (the default threat model) the device refuses:

* a (k, t) weaker than its own parameter finder allows for this cohort and its own configured
  colluding fraction, or without a strict majority of the k + 1 holders (2t > k + 1);
* a roster that hides one of the holders it drew itself, or invents a partner that did not draw it;
* a relay or survivor set that leaves fewer than t of its holders in (its masks would then rest on
  colluders alone), or that leaves the device itself out;
* a survivor set whose sum would carry less noise than calibrated (fewer than t_honest devices after
  discounting the colluders it assumes);
* an unmask request not backed by a quorum of the roster's signatures over the very view it signed
  (any two quorums share an honest device, and an honest device signs one view), or asking for
  both shares of a device, or shares it does not hold.

Why masks do not depend on the relay: a device masks with every partner in U2, the set every
device signs in the consistency check, so a server that withholds shares cannot strip its masks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_sdk.secagg import codec
from edge_sdk.secagg.codec import LEDGER_HEAD_BYTES
from edge_sdk.secagg.errors import (
    ConsistencyError,
    DecryptionError,
    MessageFormatError,
    ProtocolViolationError,
    ReplayError,
    SecAggConfigError,
    SecAggError,
    SignatureError,
)
from edge_sdk.secagg.graph import holder_seed, share_holders
from edge_sdk.secagg.keys import KEY_BYTES, AgreementKey, IdentityKey
from edge_sdk.secagg.masking import MaskPeer, mask_vector, self_mask_commitment
from edge_sdk.secagg.membership import Directory, from_bitmap
from edge_sdk.secagg.messages import (
    Abort,
    AdvertiseKeys,
    ConsistencyCheck,
    EncryptedShare,
    MaskedInput,
    NeighbourKey,
    Roster,
    RoundStart,
    ShareKeys,
    SharePlaintext,
    ShareRelay,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    survivors_digest,
)
from edge_sdk.secagg.parameters import (
    ThreatModel,
    check_parameters,
    consistency_quorum,
    expected_count,
    noise_floor_shortfall,
)
from edge_sdk.secagg.prg import SEED_BYTES, check_bits
from edge_sdk.secagg.shamir import decode_share, encode_share, split_secret
from edge_sdk.secagg.share_cipher import associated_data, decrypt_share, encrypt_share, share_encryption_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """What a device knows before a round: itself, the aggregator, the enrolled fleet and its assumptions.

    ``colluding_fraction`` is the share of the cohort this device assumes may collude with the
    server; it decides which (k, t), consistency quorum and noise floor the device accepts, whatever
    the server announces. ``threat_model`` is ``active`` unless a deployment opts out by name.
    """

    device_id: str
    identity: IdentityKey
    server_public: bytes
    enrolled: Mapping[str, bytes]  # device id -> Ed25519 identity public key (from enrolment): a Directory
    stage_timeout: float = 60.0
    colluding_fraction: float = 0.05
    threat_model: ThreatModel = ThreatModel.ACTIVE
    # SIMULATION ONLY, NEVER IN PRODUCTION: derive each round's two X25519 agreement keys and the
    # self-mask seed with HKDF from key_seed, the device id and the round index instead of the OS
    # CSPRNG, so a seeded simulation reproduces its rosters byte for byte. Anyone who knows key_seed
    # can compute this device's masks and decrypt its shares: a deployed device leaves this None.
    key_seed: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))
        object.__setattr__(self, "threat_model", ThreatModel(self.threat_model))
        if not 0.0 <= self.colluding_fraction < 1.0:
            raise SecAggConfigError(f"colluding_fraction must be in [0, 1), got {self.colluding_fraction}")


@dataclass(frozen=True, eq=False)
class ClientState:
    """Everything the client machine carries between messages (secrets included: keep it on the device)."""

    config: ClientConfig
    input_vector: np.ndarray
    ledger_head: bytes = bytes(LEDGER_HEAD_BYTES)
    t_honest: int | None = None  # the t_honest this device's noise was calibrated for, if it knows
    stage: Stage = Stage.ADVERTISE_KEYS
    deadline: float | None = None
    round_index: int | None = None
    start: RoundStart | None = None
    bits: int = 0
    cohort: tuple[str, ...] = ()
    c_key: AgreementKey | None = None
    s_key: AgreementKey | None = None
    self_seed: bytes | None = None
    roster: Roster | None = None
    session_id: bytes = b""
    members: tuple[str, ...] = ()  # the roster's members, sorted: U2/U3 bitmaps number these
    index: Mapping[str, int] = field(default_factory=dict)  # 1-based roster positions = Shamir x
    holders: tuple[str, ...] = ()  # the members this device drew to hold its shares
    partners: Mapping[str, NeighbourKey] = field(default_factory=dict)  # mask partners' adverts
    shared: tuple[str, ...] = ()  # U2 as the relay named it
    shared_bitmap: bytes = b""
    held_shares: Mapping[str, SharePlaintext] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()  # U3 as the server showed it; this device signed the view's digest
    survivors_digest: bytes = b""
    error: SecAggError | None = None
    rejections: tuple[SecAggError, ...] = ()

    @property
    def abort_reason(self) -> str | None:
        return str(self.error) if self.stage is Stage.ABORTED and self.error is not None else None

    @property
    def colluding(self) -> int:
        """How many cohort members this device assumes may collude (rounded up, as the finder does)."""
        return expected_count(self.config.colluding_fraction, len(self.cohort))


Outgoing = list[object]  # messages for the server


def start_client(
    config: ClientConfig,
    input_vector: np.ndarray,
    now: float,
    round_index: int | None = None,
    *,
    ledger_head: bytes = bytes(LEDGER_HEAD_BYTES),
    t_honest: int | None = None,
) -> ClientState:
    """A client waiting for the server's RoundStart; ``input_vector`` is already mod 2^b (uint32).

    Passing the ``round_index`` the device expects (the orchestrator knows it) makes a RoundStart
    replayed from an older round an ignored replay instead of a round the device would join.
    ``ledger_head`` is the privacy-ledger head after this participation was recorded (it travels,
    signed, with the masked input); ``t_honest`` is what the input's noise was calibrated for, and a
    round announcing another value is refused.
    """
    if config.device_id not in config.enrolled:
        raise SecAggConfigError(f"device {config.device_id!r} is not in its own enrolment directory")
    if len(ledger_head) != LEDGER_HEAD_BYTES:
        raise SecAggConfigError(f"ledger head must be {LEDGER_HEAD_BYTES} bytes, got {len(ledger_head)}")
    if t_honest is not None and t_honest < 1:
        raise SecAggConfigError(f"t_honest must be at least 1, got {t_honest}")
    vector = np.ascontiguousarray(input_vector, dtype=np.uint32)
    return ClientState(config=config, input_vector=vector, ledger_head=bytes(ledger_head), t_honest=t_honest,
                       round_index=round_index, deadline=now + config.stage_timeout)


def tick_client(state: ClientState, now: float) -> tuple[ClientState, Outgoing]:
    """Give up when the server has been silent past the stage deadline."""
    if state.stage in (Stage.DONE, Stage.ABORTED) or state.deadline is None or now < state.deadline:
        return state, []
    return _abort(state, SecAggError(f"timed out in stage {state.stage.name} waiting for the server")), []


def handle_client(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    """Feed one server message to the machine; see the module doc for how bad input is treated."""
    if state.stage is Stage.ABORTED or (state.stage is Stage.DONE and not isinstance(message, Abort)):
        return state, []
    try:
        if isinstance(message, Abort):
            return _on_abort(state, message)
        return _HANDLERS[state.stage](state, message, now)
    except (SignatureError, ReplayError, MessageFormatError) as exc:
        if isinstance(exc, SignatureError) and isinstance(message, Roster) and _server_signed(state, message):
            return _abort(state, exc), []  # the server vouched for a forged advert: key substitution
        log.debug("device %s ignored %s: %s", state.config.device_id, type(message).__name__, exc)
        return replace(state, rejections=state.rejections + (exc,)), []
    except (ProtocolViolationError, SecAggConfigError) as exc:
        log.debug("device %s aborts: %s", state.config.device_id, exc)
        return _abort(state, exc), []


# --- helpers ------------------------------------------------------------------------------------

def _abort(state: ClientState, error: SecAggError) -> ClientState:
    return replace(state, stage=Stage.ABORTED, error=error, deadline=None)


def _server_signed(state: ClientState, message: object) -> bool:
    try:
        codec.verify(message, state.config.server_public, "the aggregator")
    except SignatureError:
        return False
    return True


def _check_server_message(state: ClientState, message: object) -> None:
    codec.verify(message, state.config.server_public, "the aggregator")
    if message.round_index != state.round_index or message.session_id != state.session_id:
        raise ReplayError(
            f"{type(message).__name__} is for round {message.round_index} session "
            f"{message.session_id.hex()[:12]}, not this round's session {state.session_id.hex()[:12]}"
        )
    if message.receiver != state.config.device_id:
        raise ReplayError(f"{type(message).__name__} is addressed to {message.receiver!r}")


def _sign(state: ClientState, message: object) -> object:
    return codec.sign(message, state.config.identity)


def _unexpected(state: ClientState, message: object) -> ReplayError:
    return ReplayError(f"unexpected {type(message).__name__} in stage {state.stage.name} (late or duplicate)")


def _drawn_holders(state: ClientState, key: NeighbourKey | AdvertiseKeys, degree: int) -> tuple[str, ...]:
    device = key.device_id
    seed = holder_seed(state.start.round_nonce, device, key.c_public, key.s_public, key.self_mask_commitment)
    return share_holders(state.cohort, state.cohort.index(device), degree, seed)


def _holders_left(state: ClientState, kept: tuple[str, ...], what: str) -> None:
    """Refuse a set that leaves fewer than t of this device's holders: its masks would rest on colluders."""
    left = len(set(state.holders) & set(kept))
    if left < state.roster.threshold:
        raise ProtocolViolationError(
            f"{what} keeps only {left} of this device's {len(state.holders)} share holders, below t="
            f"{state.roster.threshold}: its masks could rest on colluders alone"
        )


# --- stage handlers -----------------------------------------------------------------------------

def _on_abort(state: ClientState, message: Abort) -> tuple[ClientState, Outgoing]:
    codec.verify(message, state.config.server_public, "the aggregator")
    # Before a roster is accepted the device has no session id yet: the signed round index decides.
    same_session = not state.session_id or message.session_id == state.session_id
    if message.round_index != state.round_index or not same_session:
        raise ReplayError(f"Abort is for round {message.round_index} or another session, not this round")
    return _abort(state, SecAggError(f"the aggregator aborted the round: {message.reason}")), []


def _advertise_keys(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if isinstance(message, RoundStart) and state.start is None:
        return _on_round_start(state, message, now)
    if isinstance(message, Roster) and state.start is not None:
        return _on_roster(state, message, now)
    raise _unexpected(state, message)


def _on_round_start(state: ClientState, message: RoundStart, now: float) -> tuple[ClientState, Outgoing]:
    me = state.config.device_id
    codec.verify(message, state.config.server_public, "the aggregator")
    if state.round_index is not None and message.round_index != state.round_index:
        raise ReplayError(f"RoundStart is for round {message.round_index}, this device expects {state.round_index}")
    directory = state.config.enrolled
    if message.directory_digest != directory.digest:
        raise SecAggConfigError(
            "the aggregator numbers the cohort over a different enrolment directory than this device's "
            f"({len(directory)} devices here); update the device's directory to take part"
        )
    cohort = from_bitmap(directory.order, message.cohort, "cohort")
    if me not in cohort:
        raise ReplayError("RoundStart does not invite this device")
    check_bits(message.bits)
    if message.vector_length != state.input_vector.size:
        raise SecAggConfigError(
            f"round expects vectors of length {message.vector_length}, device has {state.input_vector.size}"
        )
    if state.t_honest is not None and message.noise_floor != state.t_honest:
        raise SecAggConfigError(
            f"round announces t_honest={message.noise_floor}, but this device's noise was calibrated for "
            f"t_honest={state.t_honest}"
        )
    if message.noise_floor < 1:
        raise ProtocolViolationError(f"round announces t_honest={message.noise_floor}; it must be at least 1")
    c_key, s_key, seed = _round_secrets(state.config, message.round_index)
    advert = _sign(state, AdvertiseKeys(me, message.round_index, message.round_nonce, c_key.public, s_key.public,
                                        self_mask_commitment(seed)))
    new = replace(state, round_index=message.round_index, start=message, bits=message.bits, cohort=cohort,
                  c_key=c_key, s_key=s_key, self_seed=seed, deadline=now + state.config.stage_timeout)
    return new, [advert]


def _round_secrets(config: ClientConfig, round_index: int) -> tuple[AgreementKey, AgreementKey, bytes]:
    """The round's agreement keys and self-mask seed: fresh from the OS, or (simulation only) from ``key_seed``."""
    if config.key_seed is None:
        return AgreementKey.generate(), AgreementKey.generate(), os.urandom(SEED_BYTES)
    info = b"fleetlearn-simulation-secagg-keys/" + config.device_id.encode() + b"/" + round_index.to_bytes(8, "big")
    material = HKDF(hashes.SHA256(), 2 * KEY_BYTES + SEED_BYTES, salt=None, info=info).derive(config.key_seed)
    return (AgreementKey(material[:KEY_BYTES]), AgreementKey(material[KEY_BYTES:2 * KEY_BYTES]),
            material[2 * KEY_BYTES:])


def _on_roster(state: ClientState, roster: Roster, now: float) -> tuple[ClientState, Outgoing]:
    me = state.config.device_id
    start = state.start
    codec.verify(roster, state.config.server_public, "the aggregator")
    if roster.round_index != state.round_index or roster.round_nonce != start.round_nonce:
        raise ReplayError(f"roster is for round {roster.round_index}, not {state.round_index}")
    if roster.receiver != me:
        raise ReplayError(f"roster is addressed to {roster.receiver!r}")
    if (roster.directory_digest, roster.cohort, roster.noise_floor, roster.bits, roster.vector_length) != (
            start.directory_digest, start.cohort, start.noise_floor, start.bits, start.vector_length):
        raise ProtocolViolationError("roster changes the cohort, t_honest, bits or vector length of the RoundStart")
    members = from_bitmap(state.config.enrolled.order, roster.members, "roster members")
    n = len(members)
    if me not in members or n < 2 or not set(members) <= set(state.cohort):
        raise ProtocolViolationError(f"roster of {n} devices lacks this device or another member, or leaves the cohort")
    try:
        check_parameters(len(state.cohort), roster.degree, roster.threshold, state.config.colluding_fraction,
                         state.config.threat_model)
    except SecAggConfigError as exc:
        raise ProtocolViolationError(f"roster parameters refused: {exc}") from None
    own_advert = AdvertiseKeys(me, roster.round_index, start.round_nonce, state.c_key.public, state.s_key.public,
                               self_mask_commitment(state.self_seed))
    member_set = set(members)
    holders = tuple(sorted(set(_drawn_holders(state, own_advert, roster.degree)) & member_set))
    keys = {key.device_id: key for key in roster.neighbours}
    ids = [key.device_id for key in roster.neighbours]
    if ids != sorted(keys) or not set(ids) <= member_set - {me}:
        raise ProtocolViolationError("roster adverts repeat a device, are out of id order, or name non-members")
    if set(holders) - set(keys):
        raise ProtocolViolationError(f"roster withholds the adverts of holders {sorted(set(holders) - set(keys))[:5]}")
    for v, key in keys.items():
        codec.verify(key.advert(roster.round_index, start.round_nonce), state.config.enrolled[v],
                     f"device {v!r} (advert in roster)")
        if v not in holders and me not in _drawn_holders(state, key, roster.degree):
            raise ProtocolViolationError(f"roster names {v!r} as a partner, but {v!r} did not draw this device")
    session_id = codec.session_id_of(roster)
    index = {member: i + 1 for i, member in enumerate(members)}
    roster_state = replace(state, roster=roster, holders=holders)
    _holders_left(roster_state, members, "roster")
    # Shares go to every holder and to the device itself (as in Bonawitz et al.): a survivor can then
    # vouch for its own self-mask.
    xs = [index[v] for v in holders] + [index[me]]
    b_shares = split_secret(state.self_seed, roster.threshold, xs)
    s_shares = split_secret(state.s_key.private, roster.threshold, xs)
    own_share = SharePlaintext(encode_share(b_shares[index[me]]), encode_share(s_shares[index[me]]))
    shares = []
    for v in holders:
        plaintext = codec.body_bytes(SharePlaintext(encode_share(b_shares[index[v]]), encode_share(s_shares[index[v]])))
        key = share_encryption_key(state.c_key.exchange(keys[v].c_public), session_id)
        aad = associated_data(session_id, roster.round_index, me, v, Stage.SHARE_KEYS)
        nonce, ciphertext = encrypt_share(key, plaintext, aad)
        shares.append(EncryptedShare(me, v, nonce, ciphertext))
    out = _sign(state, ShareKeys(me, session_id, roster.round_index, tuple(shares)))
    new = replace(roster_state, stage=Stage.SHARE_KEYS, session_id=session_id, members=members, index=index,
                  partners=keys, held_shares={me: own_share},
                  deadline=now + state.config.stage_timeout)
    return new, [out]


def _share_keys(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, ShareRelay):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    me = state.config.device_id
    shared = from_bitmap(state.members, message.shared, "U2")
    if me not in shared:
        raise ProtocolViolationError("relay's U2 leaves out this device, which shared its keys")
    _holders_left(state, shared, "relay's U2")
    shared_set = set(shared)
    senders: list[str] = []
    held: dict[str, SharePlaintext] = {me: state.held_shares[me]}
    rejected: list[str] = []
    for share in message.shares:
        v = share.sender
        # Any partner in U2 may have drawn this device; a share from one that did not is never asked for.
        if share.receiver != me or v in senders or v not in state.partners or v not in shared_set:
            raise ProtocolViolationError(f"relay carries a share from {v!r} to {share.receiver!r} that is not ours")
        senders.append(v)
        key = share_encryption_key(state.c_key.exchange(state.partners[v].c_public), state.session_id)
        aad = associated_data(state.session_id, state.round_index, v, me, Stage.SHARE_KEYS)
        try:
            plain = codec.decode(decrypt_share(key, share.nonce, share.ciphertext, aad, f"share from {v!r}"))
            if not isinstance(plain, SharePlaintext):
                raise DecryptionError(f"share from {v!r} decrypts to a {type(plain).__name__}, not shares")
            decode_share(plain.self_mask_share)
            decode_share(plain.mask_key_share)
        except SecAggError as exc:
            log.debug("device %s rejects the share of %s: %s", me, v, exc)
            rejected.append(v)
            continue
        held[v] = plain
    own = MaskPeer(me, state.index[me], state.s_key.public)
    peers = [MaskPeer(v, state.index[v], key.s_public) for v, key in state.partners.items() if v in shared_set]
    masked = mask_vector(state.input_vector, state.bits, state.self_seed, state.s_key, own, peers,
                         state.session_id, state.round_index)
    out = _sign(state, MaskedInput(me, state.session_id, state.round_index, tuple(sorted(rejected)),
                                   state.ledger_head, masked))
    new = replace(state, stage=Stage.MASKED_INPUT, shared=shared, shared_bitmap=message.shared, held_shares=held,
                  rejected=tuple(sorted(rejected)), deadline=now + state.config.stage_timeout)
    return new, [out]


def _masked_input(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, SurvivorSet):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    me = state.config.device_id
    survivors = from_bitmap(state.members, message.survivors, "survivor set")
    if not set(survivors) <= set(state.shared):
        raise ProtocolViolationError("survivor set names devices outside U2")
    if me not in survivors:
        raise ProtocolViolationError("survivor set leaves out this device, which submitted its input")
    if len(survivors) < state.roster.threshold:
        raise ProtocolViolationError(
            f"survivor set has {len(survivors)} devices, below the threshold t={state.roster.threshold}"
        )
    _holders_left(state, survivors, "survivor set")
    shortfall = noise_floor_shortfall(len(survivors), state.colluding, state.roster.noise_floor)
    if shortfall:
        raise ProtocolViolationError(f"survivor set refused: {shortfall}")
    digest = survivors_digest(state.session_id, state.round_index, state.shared_bitmap, message.survivors)
    out = _sign(state, ConsistencyCheck(me, state.session_id, state.round_index, digest))
    new = replace(state, stage=Stage.CONSISTENCY_CHECK, survivors=survivors, survivors_digest=digest,
                  deadline=now + state.config.stage_timeout)
    return new, [out]


def _consistency_check(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, UnmaskRequest):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    me = state.config.device_id
    signers = from_bitmap(state.members, message.signers, "consistency signers")
    if len(signers) != len(message.signatures):
        raise ProtocolViolationError(f"unmask request names {len(signers)} signers but carries "
                                     f"{len(message.signatures)} signatures")
    survivors = set(state.survivors)
    if not set(signers) <= survivors:
        raise ConsistencyError("consistency signatures come from outside the survivor set")
    # The request does not repeat the view: the signatures must cover the digest this device signed.
    for signer, signature in zip(signers, message.signatures, strict=True):
        check = ConsistencyCheck(signer, state.session_id, state.round_index, state.survivors_digest, signature)
        try:
            codec.verify(check, state.config.enrolled[signer], f"device {signer!r} (consistency check)")
        except SignatureError as exc:
            raise ConsistencyError(f"survivor views differ between devices: {exc}") from None
    quorum = consistency_quorum(len(state.members), state.colluding, state.roster.threshold,
                                state.config.threat_model)
    if len(signers) < quorum:
        raise ConsistencyError(
            f"only {len(signers)} of {len(state.members)} members confirmed this view; this device needs "
            f"{quorum} ({state.config.threat_model.value} aggregator)"
        )
    b_owners, s_owners = set(message.self_mask_owners), set(message.mask_key_owners)
    both = b_owners & s_owners
    if both:
        raise ProtocolViolationError(f"server asked for both the self-mask and mask-key shares of {sorted(both)}")
    submitted = s_owners & survivors
    if submitted:
        raise ProtocolViolationError(
            f"server asked for mask-key shares of {sorted(submitted)}, which submitted input"
        )
    if s_owners - set(state.shared):
        raise ProtocolViolationError(f"server asked for mask-key shares of {sorted(s_owners - set(state.shared))}, "
                                     "which never shared keys")
    if b_owners - survivors:
        raise ProtocolViolationError(
            f"server asked for self-mask shares of non-survivors {sorted(b_owners - survivors)}"
        )
    held = state.held_shares
    strangers = (b_owners | s_owners) - set(held)
    if strangers:
        raise ProtocolViolationError(f"server asked for shares of {sorted(strangers)}, which this device does not hold")
    b_out = tuple((v, held[v].self_mask_share) for v in sorted(b_owners))
    s_out = tuple((v, held[v].mask_key_share) for v in sorted(s_owners))
    out = _sign(state, UnmaskShares(me, state.session_id, state.round_index, b_out, s_out))
    return replace(state, stage=Stage.DONE, deadline=None), [out]


_HANDLERS: dict[Stage, Callable[[ClientState, object, float], tuple[ClientState, Outgoing]]] = {
    Stage.ADVERTISE_KEYS: _advertise_keys,
    Stage.SHARE_KEYS: _share_keys,
    Stage.MASKED_INPUT: _masked_input,
    Stage.CONSISTENCY_CHECK: _consistency_check,
}
