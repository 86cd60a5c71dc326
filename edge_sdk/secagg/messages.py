"""SecAgg+ messages: frozen dataclasses, one per step of the five stages.

Why plain values: the state machines consume and emit these; ``codec`` turns them into canonical
bytes (for the wire, signatures and associated data) and back. Every message except the share
ciphertexts carries an Ed25519 ``signature`` over its canonical body; it is empty until signed.
Client-to-server messages are signed by the device's enrolled identity, server-to-client
messages by the aggregator's identity.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import numpy as np


class Stage(enum.IntEnum):
    """Protocol stages; the value goes into associated data and signatures."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY_CHECK = 4
    UNMASK = 5
    DONE = 6
    ABORTED = 7


@dataclass(frozen=True)
class RoundStart:
    """Server -> devices: a round begins; ``round_nonce`` makes every advert fresh.

    The cohort is fixed here, before any device draws its share holders from it (see ``graph``).
    """

    round_index: int
    round_nonce: bytes
    bits: int
    vector_length: int
    directory_digest: bytes
    cohort: bytes  # bitmap over the enrolment directory: who is invited, and whom holders are drawn from
    noise_floor: int  # t_honest: the honest contributors each device's DP noise was calibrated for
    signature: bytes = b""


@dataclass(frozen=True)
class AdvertiseKeys:
    """Device -> server: the device's two X25519 public keys for this round, signed."""

    device_id: str
    round_index: int
    round_nonce: bytes
    c_public: bytes  # share encryption
    s_public: bytes  # pairwise masks
    self_mask_commitment: bytes  # SHA-256 of the self-mask seed: lets the server check a rebuilt seed
    signature: bytes = b""


@dataclass(frozen=True)
class NeighbourKey:
    """A neighbour's signed advert inside a roster; its round and nonce are the roster's own."""

    device_id: str
    c_public: bytes
    s_public: bytes
    self_mask_commitment: bytes
    signature: bytes

    def advert(self, round_index: int, round_nonce: bytes) -> AdvertiseKeys:
        """The AdvertiseKeys message the signature was made over."""
        return AdvertiseKeys(self.device_id, round_index, round_nonce, self.c_public, self.s_public,
                             self.self_mask_commitment, self.signature)


@dataclass(frozen=True)
class Roster:
    """Server -> one member: who is in the round, its parameters, and the keys of that member's mask partners.

    ``cohort`` and ``members`` are bitmaps over the enrolment directory (see ``membership``), and
    only the partners' adverts travel (the holders it drew and the members that drew it), so the
    roster costs O(k + n/8) bytes, not O(n) adverts. Everything but ``receiver`` and ``neighbours``
    is the same for every member and hashes to the session id.
    """

    receiver: str
    round_index: int
    round_nonce: bytes
    bits: int
    vector_length: int
    degree: int
    threshold: int
    directory_digest: bytes
    cohort: bytes
    members: bytes
    noise_floor: int
    neighbours: tuple[NeighbourKey, ...]
    signature: bytes = b""


@dataclass(frozen=True)
class EncryptedShare:
    """One device's shares for one neighbour, AES-256-GCM encrypted end to end."""

    sender: str
    receiver: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class SharePlaintext:
    """What an EncryptedShare decrypts to: one Shamir share of each of the sender's two secrets.

    Sender and receiver are not repeated inside: the AES-GCM associated data already binds them.
    """

    self_mask_share: bytes
    mask_key_share: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Device -> server: encrypted shares for each neighbour."""

    sender: str
    session_id: bytes
    round_index: int
    shares: tuple[EncryptedShare, ...]
    signature: bytes = b""


@dataclass(frozen=True)
class ShareRelay:
    """Server -> device: U2 (who shared keys, a bitmap over the members) and the shares addressed to it.

    The device masks with every partner in U2, whether or not that partner's share reached it, so
    withholding shares from a relay cannot strip a device's masks; U2 is covered by the consistency
    signatures, so every device masks over the same U2.
    """

    receiver: str
    session_id: bytes
    round_index: int
    shared: bytes
    shares: tuple[EncryptedShare, ...]
    signature: bytes = b""


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Device -> server: y = x + PRG(b) + sum of signed pairwise masks, mod 2^bits.

    ``rejected`` names partners whose share failed to decrypt: the device holds no share of theirs,
    and the server neither asks it for one nor drops them on its word alone. ``ledger_head`` is the
    device's privacy-ledger head after recording this participation (sequence and hash, 40 bytes),
    so the aggregator can detect a ledger that was rolled back or deleted.
    """

    sender: str
    session_id: bytes
    round_index: int
    rejected: tuple[str, ...]
    ledger_head: bytes
    masked: np.ndarray
    signature: bytes = b""


@dataclass(frozen=True)
class SurvivorSet:
    """Server -> device: the devices whose masked input enters the sum (U3), a bitmap over the members."""

    receiver: str
    session_id: bytes
    round_index: int
    survivors: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class ConsistencyCheck:
    """Device -> server: the device's signature over the survivor set it was shown."""

    sender: str
    session_id: bytes
    round_index: int
    survivors_digest: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> device: a quorum of consistency signatures, and which shares to reveal.

    ``signers`` is a bitmap over the members and ``signatures`` their signatures in member order.
    The view is not repeated: the device checks the signatures against the view it signed itself.
    """

    receiver: str
    session_id: bytes
    round_index: int
    signers: bytes
    signatures: tuple[bytes, ...]
    self_mask_owners: tuple[str, ...]
    mask_key_owners: tuple[str, ...]
    signature: bytes = b""


@dataclass(frozen=True)
class UnmaskShares:
    """Device -> server: b-shares of surviving neighbours and s-shares of dropped ones."""

    sender: str
    session_id: bytes
    round_index: int
    self_mask_shares: tuple[tuple[str, bytes], ...]
    mask_key_shares: tuple[tuple[str, bytes], ...]
    signature: bytes = b""


@dataclass(frozen=True)
class Abort:
    """Server -> devices: the round is over without a result; ``reason`` says why."""

    session_id: bytes
    round_index: int
    reason: str
    signature: bytes = b""


Message = (
    RoundStart | AdvertiseKeys | Roster | ShareKeys | ShareRelay | MaskedInput | SurvivorSet
    | ConsistencyCheck | UnmaskRequest | UnmaskShares | Abort
)


def survivors_digest(session_id: bytes, round_index: int, shared: bytes, survivors: bytes) -> bytes:
    """SHA-256 binding one view (U2 and U3, bitmaps over the members) to its session and round.

    This is what consistency signatures cover: two devices that signed the same digest agree on
    who shared keys and whose input is in the sum.
    """
    h = hashlib.sha256(b"fleetlearn/secagg/v2/view|" + session_id + round_index.to_bytes(8, "big"))
    for bitmap in (shared, survivors):
        h.update(len(bitmap).to_bytes(4, "big") + bitmap)
    return h.digest()
