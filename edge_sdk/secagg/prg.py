"""The mask PRG: HKDF-SHA256 keys with domain separation, expanded by AES-128-CTR.

Why this shape: masks must be cryptographically pseudo-random (Flower folds seeds to 32 bits and
expands with the Mersenne Twister; that is what we avoid). AES-CTR over zeros with
``update_into`` into a preallocated buffer runs at memory speed; plain ``update`` allocates and is
several times slower. Each key is used for exactly one stream, so the initial counter block is
all zeros. Vectors live mod 2^b on uint32: adds wrap mod 2^32 and the top bits are masked off.
"""

from __future__ import annotations

import enum
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_sdk import modulus
from edge_sdk.secagg.errors import SecAggConfigError

SEED_BYTES = 32
MASK_KEY_BYTES = 16
_ZERO_COUNTER = bytes(16)
_BLOCK = 16


class MaskPurpose(enum.Enum):
    """What a derived key is for; its value is part of the HKDF info string (domain separation)."""

    SELF_MASK = b"self-mask"
    PAIRWISE = b"pairwise-mask"


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported modulus exponent (``edge_sdk.modulus``), else raise naming the range."""
    return modulus.check_bits(bits, SecAggConfigError)


def modulus_mask(bits: int) -> np.uint32:
    """The AND-mask that reduces a uint32 mod 2^bits."""
    return np.uint32((1 << check_bits(bits)) - 1)


def derive_mask_key(
    seed: bytes, purpose: MaskPurpose, session_id: bytes, round_index: int, context: bytes = b""
) -> bytes:
    """Derive a 128-bit AES key from a 256-bit seed for one purpose, session and round.

    ``context`` binds extra public data (for pairwise masks: the ordered pair of device ids).
    """
    if len(seed) != SEED_BYTES:
        raise SecAggConfigError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    info = b"fleetlearn/secagg/v1/" + purpose.value + b"|" + session_id + struct.pack(">Q", round_index)
    info += struct.pack(">H", len(context)) + context
    return HKDF(algorithm=hashes.SHA256(), length=MASK_KEY_BYTES, salt=None, info=info).derive(seed)


class MaskExpander:
    """Expands mask keys into uint32 vectors of one fixed length, reusing its buffers.

    Holding a zero buffer and an output buffer avoids an 8-byte-per-entry allocation per mask;
    the returned view is overwritten by the next call, so add it into an accumulator at once.
    """

    def __init__(self, length: int) -> None:
        if length <= 0:
            raise SecAggConfigError(f"mask length must be positive, got {length}")
        self.length = length
        self._zeros = np.zeros(4 * length, dtype=np.uint8)
        # update_into needs room for one block beyond the data (cryptography's contract).
        self._out = np.empty(4 * length + _BLOCK - 1, dtype=np.uint8)
        self._view = self._out[: 4 * length].view("<u4")

    def expand(self, key: bytes) -> np.ndarray:
        """The keystream of ``key`` as ``length`` little-endian uint32 words (a reused view)."""
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        encryptor.update_into(self._zeros, self._out)
        return self._view

    def add_into(self, accumulator: np.ndarray, key: bytes, sign: int) -> None:
        """accumulator += sign * PRG(key) mod 2^32, in place (sign is +1 or -1)."""
        stream = self.expand(key)
        if sign > 0:
            np.add(accumulator, stream, out=accumulator)
        else:
            np.subtract(accumulator, stream, out=accumulator)


def expand_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """A fresh copy of the mask of ``key`` reduced mod 2^bits (convenience for tests and one-offs)."""
    out = MaskExpander(length).expand(key).copy()
    out &= modulus_mask(bits)
    return out


def pairwise_sign(own_index: int, peer_index: int) -> int:
    """+1 for the lower roster index, -1 for the higher, so a pair's masks cancel in the sum."""
    if own_index == peer_index:
        raise SecAggConfigError(f"a device cannot share a pairwise mask with itself (index {own_index})")
    return 1 if own_index < peer_index else -1
