"""The SecAgg+ client state machine: one pure handler per stage, no I/O.

``handle_client(state, message, now)`` returns the next state and the messages to send to the
server; ``tick_client(state, now)`` applies the deadline. Randomness (keys, seeds, Shamir
coefficients, nonces) comes from the OS CSPRNG through ``cryptography`` and ``secrets``.

Two kinds of bad input are told apart:

* a message that is unsigned, mis-signed, replayed (other session/round) or out of order is
  *ignored* and recorded in ``state.rejections``: a broker or a stray retransmission could send
  it, and dropping the round for it would hand anyone on the path a denial of service;
* a correctly signed server message that asks for something the protocol forbids (both shares
  of one device, the mask-key share of a device that submitted input, inconsistent survivor sets,
  a roster with a substituted key) proves the server misbehaves: the client aborts and reveals
  nothing more (``state.stage is Stage.ABORTED``, ``state.error`` says why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from edge_sdk.secagg import codec
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
from edge_sdk.secagg.graph import neighbours_of
from edge_sdk.secagg.keys import AgreementKey, IdentityKey
from edge_sdk.secagg.masking import MaskPeer, mask_vector
from edge_sdk.secagg.membership import Directory, from_bitmap
from edge_sdk.secagg.messages import (
    Abort,
    AdvertiseKeys,
    ConsistencyCheck,
    EncryptedShare,
    MaskedInput,
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
from edge_sdk.secagg.prg import SEED_BYTES, check_bits
from edge_sdk.secagg.shamir import decode_share, encode_share, split_secret
from edge_sdk.secagg.share_cipher import associated_data, decrypt_share, encrypt_share, share_encryption_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """What a device knows before a round: itself, the aggregator, and the enrolled fleet."""

    device_id: str
    identity: IdentityKey
    server_public: bytes
    enrolled: Mapping[str, bytes]  # device id -> Ed25519 identity public key (from enrolment): a Directory
    stage_timeout: float = 60.0
    min_threshold: int = 2  # refuse a roster whose Shamir threshold is lower
    # Against an active server that shows different survivor sets to two disjoint groups of a
    # device's share holders (one group reveals b_u, the other s_u), t must be a strict majority
    # of the k + 1 holders: then two such groups cannot both reach t. Off by default: the
    # reference (k, t) points assume an honest-but-curious server (t = k/2 at n = 100).
    require_majority_threshold: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "enrolled", Directory.of(self.enrolled))


@dataclass(frozen=True, eq=False)
class ClientState:
    """Everything the client machine carries between messages (secrets included: keep it on the device)."""

    config: ClientConfig
    input_vector: np.ndarray
    stage: Stage = Stage.ADVERTISE_KEYS
    deadline: float | None = None
    round_index: int | None = None
    round_nonce: bytes | None = None
    bits: int = 0
    c_key: AgreementKey | None = None
    s_key: AgreementKey | None = None
    self_seed: bytes | None = None
    roster: Roster | None = None
    session_id: bytes = b""
    members: tuple[str, ...] = ()  # the roster's members, sorted: survivor bitmaps number these
    index: Mapping[str, int] = field(default_factory=dict)  # 1-based roster positions = Shamir x
    neighbours: tuple[str, ...] = ()
    share_senders: tuple[str, ...] = ()  # neighbours in U2 (their shares were relayed to us)
    held_shares: Mapping[str, SharePlaintext] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()  # U3 as the server showed it; this device signed its digest
    survivors_digest: bytes = b""
    error: SecAggError | None = None
    rejections: tuple[SecAggError, ...] = ()

    @property
    def abort_reason(self) -> str | None:
        return str(self.error) if self.stage is Stage.ABORTED and self.error is not None else None


Outgoing = list[object]  # messages for the server


def start_client(
    config: ClientConfig, input_vector: np.ndarray, now: float, round_index: int | None = None
) -> ClientState:
    """A client waiting for the server's RoundStart; ``input_vector`` is already mod 2^b (uint32).

    Passing the ``round_index`` the device expects (the orchestrator knows it) makes a RoundStart
    replayed from an older round an ignored replay instead of a round the device would join.
    """
    if config.device_id not in config.enrolled:
        raise SecAggConfigError(f"device {config.device_id!r} is not in its own enrolment directory")
    vector = np.ascontiguousarray(input_vector, dtype=np.uint32)
    return ClientState(config=config, input_vector=vector, round_index=round_index,
                       deadline=now + config.stage_timeout)


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
        log.warning("device %s ignored %s: %s", state.config.device_id, type(message).__name__, exc)
        return replace(state, rejections=state.rejections + (exc,)), []
    except (ProtocolViolationError, SecAggConfigError) as exc:
        log.error("device %s aborts: %s", state.config.device_id, exc)
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


# --- stage handlers -----------------------------------------------------------------------------

def _on_abort(state: ClientState, message: Abort) -> tuple[ClientState, Outgoing]:
    codec.verify(message, state.config.server_public, "the aggregator")
    # Before a roster is accepted the device has no session id yet: the signed round index decides.
    same_session = not state.session_id or message.session_id == state.session_id
    if message.round_index != state.round_index or not same_session:
        raise ReplayError(f"Abort is for round {message.round_index} or another session, not this round")
    return _abort(state, SecAggError(f"the aggregator aborted the round: {message.reason}")), []


def _advertise_keys(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if isinstance(message, RoundStart) and state.round_nonce is None:
        codec.verify(message, state.config.server_public, "the aggregator")
        if state.round_index is not None and message.round_index != state.round_index:
            raise ReplayError(f"RoundStart is for round {message.round_index}, this device expects {state.round_index}")
        check_bits(message.bits)
        if message.vector_length != state.input_vector.size:
            raise SecAggConfigError(
                f"round expects vectors of length {message.vector_length}, device has {state.input_vector.size}"
            )
        c_key, s_key = AgreementKey.generate(), AgreementKey.generate()
        advert = _sign(state, AdvertiseKeys(state.config.device_id, message.round_index, message.round_nonce,
                                            c_key.public, s_key.public))
        new = replace(state, round_index=message.round_index, round_nonce=message.round_nonce,
                      bits=message.bits, c_key=c_key, s_key=s_key, self_seed=os.urandom(SEED_BYTES),
                      deadline=now + state.config.stage_timeout)
        return new, [advert]
    if isinstance(message, Roster) and state.round_nonce is not None:
        return _on_roster(state, message, now)
    raise _unexpected(state, message)


def _on_roster(state: ClientState, roster: Roster, now: float) -> tuple[ClientState, Outgoing]:
    me = state.config.device_id
    codec.verify(roster, state.config.server_public, "the aggregator")
    if roster.round_index != state.round_index or roster.round_nonce != state.round_nonce:
        raise ReplayError(f"roster is for round {roster.round_index}, not {state.round_index}")
    if roster.receiver != me:
        raise ReplayError(f"roster is addressed to {roster.receiver!r}")
    directory = state.config.enrolled
    if roster.directory_digest != directory.digest:
        raise SecAggConfigError(
            "the aggregator numbers the roster over a different enrolment directory than this device's "
            f"({len(state.config.enrolled)} devices here); update the device's directory to take part"
        )
    members = from_bitmap(directory.order, roster.members, "roster members")
    n = len(members)
    if me not in members or n < 2:
        raise ProtocolViolationError(f"roster of {n} devices does not include this device with another")
    if roster.bits != state.bits or roster.vector_length != state.input_vector.size:
        raise ProtocolViolationError("roster changes the bits or vector length announced at round start")
    complete = roster.degree == n - 1
    if not (complete or (2 <= roster.degree < n - 1 and roster.degree % 2 == 0)):
        raise ProtocolViolationError(f"roster degree k={roster.degree} is invalid for n={n}")
    if not state.config.min_threshold <= roster.threshold <= roster.degree + 1:
        raise ProtocolViolationError(
            f"roster threshold t={roster.threshold} is outside [{state.config.min_threshold}, k+1={roster.degree + 1}]"
        )
    if state.config.require_majority_threshold and 2 * roster.threshold <= roster.degree + 1:
        raise ProtocolViolationError(
            f"roster threshold t={roster.threshold} is not a strict majority of the k+1={roster.degree + 1} "
            "share holders, which this device requires against an active server"
        )
    session_id = codec.session_id_of(roster)
    index = {member: i + 1 for i, member in enumerate(members)}
    neighbours = neighbours_of(members, roster.degree, session_id, me)
    keys = {key.device_id: key for key in roster.neighbours}
    if tuple(key.device_id for key in roster.neighbours) != neighbours:
        raise ProtocolViolationError("roster does not carry exactly one advert per neighbour, in id order")
    for v, key in keys.items():
        codec.verify(key.advert(roster.round_index, roster.round_nonce), state.config.enrolled[v],
                     f"device {v!r} (advert in roster)")
    # Shares go to every neighbour and to the device itself (as in Bonawitz et al.): a survivor
    # can then vouch for its own self-mask, so t survivors of a complete graph are enough.
    xs = [index[v] for v in neighbours] + [index[me]]
    b_shares = split_secret(state.self_seed, roster.threshold, xs)
    s_shares = split_secret(state.s_key.private, roster.threshold, xs)
    own_share = SharePlaintext(encode_share(b_shares[index[me]]), encode_share(s_shares[index[me]]))
    shares = []
    for v in neighbours:
        plaintext = codec.body_bytes(SharePlaintext(encode_share(b_shares[index[v]]), encode_share(s_shares[index[v]])))
        key = share_encryption_key(state.c_key.exchange(keys[v].c_public), session_id)
        aad = associated_data(session_id, roster.round_index, me, v, Stage.SHARE_KEYS)
        nonce, ciphertext = encrypt_share(key, plaintext, aad)
        shares.append(EncryptedShare(me, v, nonce, ciphertext))
    out = _sign(state, ShareKeys(me, session_id, roster.round_index, tuple(shares)))
    new = replace(state, stage=Stage.SHARE_KEYS, roster=roster, session_id=session_id, members=members, index=index,
                  neighbours=neighbours, held_shares={me: own_share},
                  deadline=now + state.config.stage_timeout)
    return new, [out]


def _share_keys(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, ShareRelay):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    me = state.config.device_id
    adverts = {key.device_id: key for key in state.roster.neighbours}
    senders: list[str] = []
    held: dict[str, SharePlaintext] = {me: state.held_shares[me]}
    rejected: list[str] = []
    for share in message.shares:
        v = share.sender
        if v not in state.neighbours or share.receiver != me or v in senders:
            raise ProtocolViolationError(f"relay carries a share from {v!r} to {share.receiver!r} that is not ours")
        senders.append(v)
        key = share_encryption_key(state.c_key.exchange(adverts[v].c_public), state.session_id)
        aad = associated_data(state.session_id, state.round_index, v, me, Stage.SHARE_KEYS)
        try:
            plain = codec.decode(decrypt_share(key, share.nonce, share.ciphertext, aad, f"share from {v!r}"))
            if not isinstance(plain, SharePlaintext):
                raise DecryptionError(f"share from {v!r} decrypts to a {type(plain).__name__}, not shares")
            decode_share(plain.self_mask_share)
            decode_share(plain.mask_key_share)
        except SecAggError as exc:
            log.warning("device %s rejects the share of %s: %s", me, v, exc)
            rejected.append(v)
            continue
        held[v] = plain
    own = MaskPeer(me, state.index[me], state.s_key.public)
    peers = [MaskPeer(v, state.index[v], adverts[v].s_public) for v in senders]
    masked = mask_vector(state.input_vector, state.bits, state.self_seed, state.s_key, own, peers,
                         state.session_id, state.round_index)
    out = _sign(state, MaskedInput(me, state.session_id, state.round_index, tuple(sorted(rejected)), masked))
    new = replace(state, stage=Stage.MASKED_INPUT, share_senders=tuple(sorted(senders)), held_shares=held,
                  rejected=tuple(sorted(rejected)), deadline=now + state.config.stage_timeout)
    return new, [out]


def _masked_input(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, SurvivorSet):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    survivors = _survivors(state, message.survivors)
    digest = survivors_digest(state.session_id, state.round_index, survivors)
    out = _sign(state, ConsistencyCheck(state.config.device_id, state.session_id, state.round_index, digest))
    new = replace(state, stage=Stage.CONSISTENCY_CHECK, survivors=survivors, survivors_digest=digest,
                  deadline=now + state.config.stage_timeout)
    return new, [out]


def _survivors(state: ClientState, bitmap: bytes) -> tuple[str, ...]:
    survivors = from_bitmap(state.members, bitmap, "survivor set")
    if len(survivors) < state.roster.threshold:
        raise ProtocolViolationError(
            f"survivor set has {len(survivors)} devices, below the threshold t={state.roster.threshold}"
        )
    return survivors


def _consistency_check(state: ClientState, message: object, now: float) -> tuple[ClientState, Outgoing]:
    if not isinstance(message, UnmaskRequest):
        raise _unexpected(state, message)
    _check_server_message(state, message)
    me = state.config.device_id
    # The request does not repeat U3: the signatures below must cover the set this device signed.
    survivors, digest = set(state.survivors), state.survivors_digest
    signers = [signer for signer, _ in message.consistency]
    if len(set(signers)) != len(signers) or not set(signers) <= survivors:
        raise ConsistencyError("consistency signatures repeat signers or come from outside the survivor set")
    for signer, signature in message.consistency:
        check = ConsistencyCheck(signer, state.session_id, state.round_index, digest, signature)
        try:
            codec.verify(check, state.config.enrolled[signer], f"device {signer!r} (consistency check)")
        except SignatureError as exc:
            raise ConsistencyError(f"survivor sets differ between devices: {exc}") from None
    if len(signers) < state.roster.threshold:
        raise ConsistencyError(
            f"only {len(signers)} devices confirmed the survivor set, threshold is {state.roster.threshold}"
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
    if b_owners - survivors:
        raise ProtocolViolationError(
            f"server asked for self-mask shares of non-survivors {sorted(b_owners - survivors)}"
        )
    strangers = (b_owners | s_owners) - set(state.share_senders) - {me}
    if strangers:
        raise ProtocolViolationError(f"server asked for shares of {sorted(strangers)}, which never shared with us")
    held = state.held_shares
    b_out = tuple((v, held[v].self_mask_share) for v in sorted(b_owners) if v in held)
    s_out = tuple((v, held[v].mask_key_share) for v in sorted(s_owners) if v in held)
    out = _sign(state, UnmaskShares(me, state.session_id, state.round_index, b_out, s_out))
    return replace(state, stage=Stage.DONE, deadline=None), [out]


_HANDLERS: dict[Stage, Callable[[ClientState, object, float], tuple[ClientState, Outgoing]]] = {
    Stage.ADVERTISE_KEYS: _advertise_keys,
    Stage.SHARE_KEYS: _share_keys,
    Stage.MASKED_INPUT: _masked_input,
    Stage.CONSISTENCY_CHECK: _consistency_check,
}
