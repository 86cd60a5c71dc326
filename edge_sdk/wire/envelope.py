"""The versioned envelope around every message that travels: who, which round, which stage, what.

Why no signature here: one signature per hop. The payload is already a signed message (SecAgg+
messages sign their canonical body, which binds session, round and sender; plans, models,
receipts and Ready/Decline are signed by their senders), so signing the envelope as well would
double the Ed25519 cost (9.2 of 37 s of an n = 1000 profile was verification). The header is
routing and deduplication data; ``sender_check.check_sender`` ties its sender to the topic and to
the signed body before any handler runs.

Layout (big-endian): "FE" magic, u8 version, u8 kind, u8-length fleet, 32-byte session, u64
round, u8 stage, u8-length sender, u64 sequence, u32-length payload. Nothing may follow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import FrameReader, FrameWriter
from edge_sdk.wire.limits import MAX_ID_BYTES, WireLimits

ENVELOPE_MAGIC = b"FE"
WIRE_VERSION = 1
SESSION_BYTES = 32
NO_SESSION = bytes(SESSION_BYTES)  # before a SecAgg+ session id exists (plans, Ready, Decline)


class MessageKind(enum.IntEnum):
    """One value per message type that travels. SecAgg+ kinds reuse the codec's type tags (1..11).

    ``SharePlaintext`` (codec tag 12) never travels alone: it is inside an AES-GCM ciphertext.
    Values are never reused; new kinds take new numbers (up to 255).
    """

    ROUND_START = 1
    ADVERTISE_KEYS = 2
    ROSTER = 3
    SHARE_KEYS = 4
    SHARE_RELAY = 5
    MASKED_INPUT = 6
    SURVIVOR_SET = 7
    CONSISTENCY_CHECK = 8
    UNMASK_REQUEST = 9
    UNMASK_SHARES = 10
    ABORT = 11
    PLAN = 32
    READY = 33
    DECLINE = 34
    MODEL = 35
    RECEIPT = 36
    STATUS = 37
    DIRECTORY = 38
    TASK = 39  # coordinator -> aggregator worker (sharded aggregation)
    TASK_RESULT = 40  # aggregator worker -> coordinator

    @property
    def topic_name(self) -> str:
        """The kind's last topic level on an uplink: ``masked_input``."""
        return self.name.lower()


_KINDS_BY_TOPIC_NAME = {kind.topic_name: kind for kind in MessageKind}


def kind_from_topic_name(name: str) -> MessageKind:
    """The kind a topic level names, or WireFormatError listing the known ones."""
    try:
        return _KINDS_BY_TOPIC_NAME[name]
    except KeyError:
        raise WireFormatError(f"unknown message kind {name!r} in topic; known: {', '.join(_KINDS_BY_TOPIC_NAME)}") \
            from None


@dataclass(frozen=True)
class Envelope:
    """One message on the wire: routing header and the (already signed) payload bytes."""

    version: int
    kind: MessageKind
    fleet: str
    session: bytes
    round_index: int
    stage: int
    sender: str
    sequence: int
    payload: bytes

    @property
    def dedup_key(self) -> tuple[str, bytes, MessageKind, int]:
        """(sender, session, kind, sequence): what a receiver deduplicates retransmissions by."""
        return (self.sender, self.session, self.kind, self.sequence)


def encode_envelope(env: Envelope) -> bytes:
    """The envelope's bytes; refuses what ``decode_envelope`` would refuse (except the payload bound)."""
    if env.version != WIRE_VERSION:
        raise WireFormatError(f"envelope version must be {WIRE_VERSION}, got {env.version!r}")
    try:
        kind = MessageKind(env.kind)
    except ValueError:
        raise WireFormatError(f"envelope kind {env.kind!r} is not a MessageKind") from None
    w = FrameWriter()
    w.raw(ENVELOPE_MAGIC)
    w.uint(env.version, 1, "version")
    w.uint(int(kind), 1, "kind")
    w.ident(env.fleet, "fleet", MAX_ID_BYTES)
    w.fixed(env.session, SESSION_BYTES, "session")
    w.uint(env.round_index, 8, "round_index")
    w.uint(env.stage, 1, "stage")
    w.ident(env.sender, "sender", MAX_ID_BYTES)
    w.uint(env.sequence, 8, "sequence")
    w.blob(env.payload, "payload", (1 << 32) - 1, "u32 length")
    return w.bytes()


def decode_envelope(data: bytes, limits: WireLimits) -> Envelope:
    """Parse ``data`` strictly: magic, version, known kind, valid ids, payload within ``limits.max_message_bytes``."""
    r = FrameReader(data, "envelope")
    if r.remaining > limits.max_message_bytes:
        raise WireFormatError(f"envelope has {r.remaining} bytes, limit is {limits.max_message_bytes} "
                              "(max_message_bytes)")
    r.magic(ENVELOPE_MAGIC, "magic", "not a fleetlearn envelope; a chunk frame starts with b'FC'")
    version = r.uint(1, "version")
    if version != WIRE_VERSION:
        raise WireFormatError(f"envelope version {version} is not supported (this build speaks {WIRE_VERSION}); "
                              "upgrade the older side")
    raw_kind = r.uint(1, "kind")
    try:
        kind = MessageKind(raw_kind)
    except ValueError:
        raise WireFormatError(f"envelope kind {raw_kind} is unknown") from None
    fleet = r.ident("fleet", MAX_ID_BYTES)
    session = r.fixed(SESSION_BYTES, "session")
    round_index = r.uint(8, "round_index")
    stage = r.uint(1, "stage")
    sender = r.ident("sender", MAX_ID_BYTES)
    sequence = r.uint(8, "sequence")
    payload = r.blob("payload", limits.max_message_bytes, "max_message_bytes")
    r.finish()
    return Envelope(version, kind, fleet, session, round_index, stage, sender, sequence, payload)
