"""The ledger head: (sequence, digest of the last record), the value that pins a ledger's length.

Why a value of its own: the device keeps it in a sidecar file so that a ledger cut short is noticed
locally, and signs it into every masked input so that the aggregator, which remembers the last head
each device reported, notices a ledger restored from an older copy (which no local check can: the
copy and its head are consistent with each other).

``sequence`` is the number of records in the ledger, so the last record has ``seq = sequence - 1``;
``digest`` is that record's SHA-256 checksum (the ``prev`` the next record will carry). The genesis
head, an empty ledger, is ``(0, 32 zero bytes)``, the same value the first record's ``prev`` holds.
Wire form: exactly 40 bytes, the sequence as u64 big-endian followed by the digest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from edge_sdk.errors import FleetlearnError

DIGEST_SIZE = 32
GENESIS_DIGEST = bytes(DIGEST_SIZE)


class LedgerHeadError(FleetlearnError, ValueError):
    """A ledger head is malformed (wrong length, out-of-range sequence, bad digest)."""


@dataclass(frozen=True)
class LedgerHead:
    """How many records a ledger holds and the SHA-256 of the last one."""

    sequence: int
    digest: bytes

    SIZE: ClassVar[int] = 8 + DIGEST_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.sequence, bool) or not isinstance(self.sequence, int):
            raise LedgerHeadError(f"ledger head sequence must be an int, got {type(self.sequence).__name__}")
        if not 0 <= self.sequence < 1 << 64:
            raise LedgerHeadError(f"ledger head sequence must fit in a u64, got {self.sequence}")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise LedgerHeadError(f"ledger head digest must be {DIGEST_SIZE} bytes, got {self.digest!r:.80}")
        if self.sequence == 0 and self.digest != GENESIS_DIGEST:
            raise LedgerHeadError("a ledger head with sequence 0 (an empty ledger) must carry the all-zero digest")

    @classmethod
    def genesis(cls) -> LedgerHead:
        """The head of an empty ledger."""
        return cls(0, GENESIS_DIGEST)

    @property
    def is_genesis(self) -> bool:
        return self.sequence == 0

    def to_bytes(self) -> bytes:
        """The 40-byte wire form: u64 big-endian sequence, then the 32-byte digest."""
        return struct.pack(">Q", self.sequence) + self.digest

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerHead:
        """Parse the 40-byte wire form; anything else raises ``LedgerHeadError``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LedgerHeadError(f"a ledger head is {cls.SIZE} bytes, got a {type(data).__name__}")
        data = bytes(data)
        if len(data) != cls.SIZE:
            raise LedgerHeadError(f"a ledger head is exactly {cls.SIZE} bytes, got {len(data)}")
        (sequence,) = struct.unpack(">Q", data[:8])
        return cls(sequence, data[8:])

    def to_dict(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "digest": self.digest.hex()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerHead:
        try:
            return cls(int(data["sequence"]), bytes.fromhex(str(data["digest"])))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LedgerHeadError):
                raise
            raise LedgerHeadError(f"malformed ledger head {data!r:.200}: {exc}") from None

    def __str__(self) -> str:
        return f"#{self.sequence}:{self.digest.hex()[:12]}"
