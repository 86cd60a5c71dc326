"""Splitting a message into MQTT-sized chunks and putting it back together, digest-checked.

Why chunks carry the whole message's SHA-256: a receiver can group chunks of one message without
trusting their order or their uniqueness (QoS 1 duplicates, broker reordering, retransmissions),
and a message is released only once its bytes hash to what every chunk announced.

Chunk frame (big-endian): "FC" magic, u8 version, 32-byte SHA-256 of the whole message, u32
index, u32 count, u32 total length, u32 chunk size (the data length of every chunk but the last),
then the data. The reassembler holds per-sender memory within ``WireLimits`` and forgets partial
messages that stay silent past ``partial_timeout``, judged by the ``now`` its caller passes in.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_sdk.wire.errors import ReassemblyError, WireFormatError
from edge_sdk.wire.frame_fields import FrameReader

if TYPE_CHECKING:
    from edge_sdk.wire.limits import WireLimits

CHUNK_MAGIC = b"FC"
CHUNK_VERSION = 1
DIGEST_BYTES = 32
_HEADER = struct.Struct(">2sB32sIIII")
CHUNK_HEADER_BYTES = _HEADER.size  # 51


@dataclass(frozen=True)
class Chunk:
    """One parsed chunk frame."""

    digest: bytes
    index: int
    count: int
    total: int
    chunk_size: int
    data: bytes


@dataclass(frozen=True)
class ExpiredMessage:
    """A partial message dropped for silence: what a shell logs and counts."""

    sender: str
    digest: bytes
    received_chunks: int
    count: int


def split(message_bytes: bytes, max_payload: int) -> list[bytes]:
    """Chunk frames of at most ``max_payload`` bytes each; a short message is one chunk of count 1."""
    data_size = max_payload - CHUNK_HEADER_BYTES
    if data_size < 1:
        raise WireFormatError(f"max_payload must exceed the {CHUNK_HEADER_BYTES}-byte chunk header, got {max_payload}")
    total = len(message_bytes)
    if total >= 1 << 32:
        raise WireFormatError(f"message has {total} bytes; a chunked message is at most 2^32 - 1 bytes")
    count = max(1, math.ceil(total / data_size))
    digest = hashlib.sha256(message_bytes).digest()
    view = memoryview(message_bytes)
    chunk_size = data_size if count > 1 else max(total, 1)  # one chunk is judged by its own size only
    return [_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, digest, i, count, total, chunk_size)
            + view[i * data_size : (i + 1) * data_size] for i in range(count)]


def parse_chunk(frame: bytes, limits: WireLimits) -> Chunk:
    """One chunk frame, checked against ``limits`` and for internal consistency (not yet the digest)."""
    if len(frame) > limits.max_payload_bytes:
        raise WireFormatError(f"chunk frame has {len(frame)} bytes, limit is {limits.max_payload_bytes} "
                              "(max_payload_bytes)")
    r = FrameReader(frame, "chunk")
    r.magic(CHUNK_MAGIC, "magic", "not a chunk frame; an envelope starts with b'FE'")
    version = r.uint(1, "version")
    if version != CHUNK_VERSION:
        raise WireFormatError(f"chunk version {version} is not supported (this build speaks {CHUNK_VERSION})")
    digest = r.fixed(DIGEST_BYTES, "digest")
    index, count, total, chunk_size = (r.uint(4, name) for name in ("index", "count", "total", "chunk_size"))
    if not 1 <= count <= limits.max_chunks:
        raise WireFormatError(f"chunk count {count} is outside 1..{limits.max_chunks} (max_chunks)")
    if total > limits.max_message_bytes:
        raise WireFormatError(f"chunked message declares {total} bytes, limit is {limits.max_message_bytes} "
                              "(max_message_bytes)")
    if not 1 <= chunk_size <= limits.chunk_data_bytes:
        raise WireFormatError(f"chunk_size {chunk_size} is outside 1..{limits.chunk_data_bytes} "
                              "(max_payload_bytes minus the chunk header)")
    if count != max(1, math.ceil(total / chunk_size)):
        raise WireFormatError(f"chunk count {count} does not match total {total} at chunk_size {chunk_size} "
                              f"(expected {max(1, math.ceil(total / chunk_size))})")
    if index >= count:
        raise WireFormatError(f"chunk index {index} is not below its count {count}")
    expected = chunk_size if index < count - 1 else total - (count - 1) * chunk_size
    if r.remaining != expected:
        raise WireFormatError(f"chunk {index} of {count} carries {r.remaining} data bytes, expected {expected}")
    return Chunk(digest, index, count, total, chunk_size, bytes(r.take(expected, "data")))


def _check_digest(sender: str, digest: bytes, message: bytes) -> bytes:
    if hashlib.sha256(message).digest() != digest:
        raise ReassemblyError(f"message from {sender!r} does not match its digest {digest.hex()[:16]}...: "
                              "a chunk was altered or belongs to another message; it was dropped")
    return message


@dataclass
class _Partial:
    count: int
    total: int
    chunk_size: int
    last_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class Reassembler:
    """Collects chunks per (sender, digest) and returns each whole message once its digest checks.

    Duplicates of a held chunk are ignored; a whole message that arrives again is returned again
    (the reliable layer deduplicates by sequence and re-acknowledges). Memory is bounded per sender
    (``max_in_flight_per_sender`` messages, ``max_sender_bytes``) and overall (``max_reassembly_bytes``).
    """

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._by_sender: dict[str, set[bytes]] = {}
        self._sender_bytes: dict[str, int] = {}
        self._total_bytes = 0

    def held_bytes(self, sender: str | None = None) -> int:
        """Data bytes held in partial messages, of ``sender`` or of everyone."""
        return self._total_bytes if sender is None else self._sender_bytes.get(sender, 0)

    def in_flight(self, sender: str) -> int:
        return len(self._by_sender.get(sender, ()))

    def add(self, sender: str, chunk: bytes, *, now: float) -> bytes | None:
        """Take one chunk frame from ``sender``; return the whole message when it completes, else None."""
        c = parse_chunk(chunk, self.limits)
        if c.count == 1:
            return _check_digest(sender, c.digest, c.data)
        key = (sender, c.digest)
        partial = self._partials.get(key)
        if partial is not None:
            if (partial.count, partial.total, partial.chunk_size) != (c.count, c.total, c.chunk_size):
                raise ReassemblyError(f"chunk {c.index} from {sender!r} declares count/total/chunk_size "
                                      f"{c.count}/{c.total}/{c.chunk_size}, its siblings declared "
                                      f"{partial.count}/{partial.total}/{partial.chunk_size}")
            held = partial.chunks.get(c.index)
            if held is not None:
                if held != c.data:
                    raise ReassemblyError(f"chunk {c.index} of {c.count} from {sender!r} differs from the copy "
                                          "already held; kept the first")
                partial.last_seen = now
                return None
            partial.last_seen = now  # before _check_room, whose sweep must not drop this message
        else:
            self._expire_sender(sender, now)
        self._check_room(sender, len(c.data), now, opening=partial is None)
        if partial is None:
            partial = self._partials[key] = _Partial(c.count, c.total, c.chunk_size, now)
            self._by_sender.setdefault(sender, set()).add(c.digest)
        partial.chunks[c.index] = c.data
        partial.held += len(c.data)
        partial.last_seen = now
        self._sender_bytes[sender] = self._sender_bytes.get(sender, 0) + len(c.data)
        self._total_bytes += len(c.data)
        if len(partial.chunks) < partial.count:
            return None
        self._drop(sender, c.digest)
        return _check_digest(sender, c.digest, b"".join(partial.chunks[i] for i in range(partial.count)))

    def expire(self, now: float) -> list[ExpiredMessage]:
        """Drop every partial message silent for more than ``partial_timeout`` seconds before ``now``."""
        expired = []
        for (sender, digest), partial in list(self._partials.items()):
            if now - partial.last_seen > self.limits.partial_timeout:
                expired.append(ExpiredMessage(sender, digest, len(partial.chunks), partial.count))
                self._drop(sender, digest)
        return expired

    def _expire_sender(self, sender: str, now: float) -> None:
        for digest in list(self._by_sender.get(sender, ())):
            if now - self._partials[(sender, digest)].last_seen > self.limits.partial_timeout:
                self._drop(sender, digest)

    def _check_room(self, sender: str, n: int, now: float, *, opening: bool) -> None:
        """Refuse, before changing anything, a chunk that would pass a bound of ``limits``."""
        in_flight = self.in_flight(sender)
        if opening and in_flight >= self.limits.max_in_flight_per_sender:
            raise ReassemblyError(f"{sender!r} already has {in_flight} partial messages in flight, limit is "
                                  f"{self.limits.max_in_flight_per_sender} (max_in_flight_per_sender); chunk refused")
        sender_bytes = self.held_bytes(sender)
        if sender_bytes + n > self.limits.max_sender_bytes:
            raise ReassemblyError(f"{sender!r} holds {sender_bytes} bytes of partial messages; {n} more would pass "
                                  f"{self.limits.max_sender_bytes} (max_sender_bytes); chunk refused")
        if self._total_bytes + n > self.limits.max_reassembly_bytes:
            self.expire(now)
            if self._total_bytes + n > self.limits.max_reassembly_bytes:
                raise ReassemblyError(f"partial messages hold {self._total_bytes} bytes; {n} more would pass "
                                      f"{self.limits.max_reassembly_bytes} (max_reassembly_bytes); chunk refused")

    def _drop(self, sender: str, digest: bytes) -> None:
        partial = self._partials.pop((sender, digest))
        self._total_bytes -= partial.held
        self._sender_bytes[sender] -= partial.held
        digests = self._by_sender[sender]
        digests.discard(digest)
        if not digests:
            del self._by_sender[sender], self._sender_bytes[sender]
