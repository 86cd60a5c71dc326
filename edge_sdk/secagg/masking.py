"""Masking one device's vector: y = x + PRG(b) + sum over neighbours of +-PRG(s_uv), mod 2^b.

Why shared by both roles: the server removes exactly the masks a device added, so the key
derivations live in one place. Pairwise keys come from the X25519 agreement of the two devices'
s-keys, bound to the session, round and the ordered pair of ids; the lower roster index adds
the mask and the higher subtracts it, so the pair cancels in the sum.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.keys import AgreementKey
from edge_sdk.secagg.prg import MaskExpander, MaskPurpose, derive_mask_key, modulus_mask, pairwise_sign


@dataclass(frozen=True)
class MaskPeer:
    """A neighbour as the masking code needs it: id, 1-based roster index, s public key."""

    device_id: str
    index: int
    s_public: bytes


def self_mask_commitment(seed: bytes) -> bytes:
    """SHA-256 of the self-mask seed, advertised so a rebuilt seed (and a bad share) can be checked.

    The seed is 32 uniformly random bytes, so the hash reveals nothing usable about it.
    """
    return hashlib.sha256(b"fleetlearn/secagg/v2/self-mask-commitment|" + seed).digest()


def self_mask_key(seed: bytes, session_id: bytes, round_index: int) -> bytes:
    return derive_mask_key(seed, MaskPurpose.SELF_MASK, session_id, round_index)


def pairwise_mask_key(
    shared_secret: bytes, session_id: bytes, round_index: int, a: tuple[int, str], b: tuple[int, str]
) -> bytes:
    """Key for the pair {a, b} given as (index, id); symmetric in a and b."""
    (_, low), (_, high) = sorted((a, b))
    context = b"".join(struct.pack(">H", len(x.encode())) + x.encode() for x in (low, high))
    return derive_mask_key(shared_secret, MaskPurpose.PAIRWISE, session_id, round_index, context)


def mask_vector(
    x: np.ndarray,
    bits: int,
    self_seed: bytes,
    s_key: AgreementKey,
    own: MaskPeer,
    peers: Sequence[MaskPeer],
    session_id: bytes,
    round_index: int,
    expander: MaskExpander | None = None,
) -> np.ndarray:
    """The masked copy of ``x`` (uint32, entries < 2^bits) that the device uploads."""
    mod = modulus_mask(bits)
    if x.dtype != np.uint32 or x.ndim != 1:
        raise SecAggConfigError(f"input must be a 1-D uint32 vector, got {x.dtype} {x.shape}")
    if np.any(x > mod):
        raise SecAggConfigError(f"input has entries >= 2^{bits}: encode and reduce it mod 2^{bits} first")
    expander = expander or MaskExpander(x.size)
    if expander.length != x.size:
        raise SecAggConfigError(f"expander length {expander.length} differs from input length {x.size}")
    out = x.copy()
    expander.add_into(out, self_mask_key(self_seed, session_id, round_index), +1)
    for peer in peers:
        shared = s_key.exchange(peer.s_public)
        key = pairwise_mask_key(shared, session_id, round_index, (own.index, own.device_id),
                                (peer.index, peer.device_id))
        expander.add_into(out, key, pairwise_sign(own.index, peer.index))
    out &= mod
    return out
