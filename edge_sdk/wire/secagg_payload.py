"""SecAgg+ messages as envelope payloads: the codec's canonical bytes, with masked vectors bit-packed.

Why MaskedInput is re-laid out here and not in the codec: its signature covers the codec's
canonical body (uint32 words), which the machines verify; the wire only needs b bits per entry.
So the payload carries the packed vector next to the codec bytes of the same message with an empty
vector, and decoding rebuilds the exact message that was signed. Every other kind is the codec's
bytes unchanged; their first byte is the codec tag, which must match the envelope kind.

MASKED_INPUT payload: u8 bits, u32 count, ceil(count*bits/8) packed bytes, then
``codec.encode(message with masked = [])``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as m
from edge_sdk.secagg.errors import MessageFormatError
from edge_sdk.wire.bitpack import pack_bits, packed_size, unpack_bits
from edge_sdk.wire.envelope import MessageKind
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import FrameReader, FrameWriter
from edge_sdk.wire.limits import WireLimits

SECAGG_KINDS: dict[type, MessageKind] = {
    m.RoundStart: MessageKind.ROUND_START, m.AdvertiseKeys: MessageKind.ADVERTISE_KEYS, m.Roster: MessageKind.ROSTER,
    m.ShareKeys: MessageKind.SHARE_KEYS, m.ShareRelay: MessageKind.SHARE_RELAY,
    m.MaskedInput: MessageKind.MASKED_INPUT, m.SurvivorSet: MessageKind.SURVIVOR_SET,
    m.ConsistencyCheck: MessageKind.CONSISTENCY_CHECK, m.UnmaskRequest: MessageKind.UNMASK_REQUEST,
    m.UnmaskShares: MessageKind.UNMASK_SHARES, m.Abort: MessageKind.ABORT,
}
_EMPTY = np.zeros(0, dtype=np.uint32)


def secagg_kind(message: Any) -> MessageKind:
    """The envelope kind of a SecAgg+ message."""
    try:
        return SECAGG_KINDS[type(message)]
    except KeyError:
        raise WireFormatError(f"{type(message).__name__} is not a SecAgg+ message that travels") from None


def body_sender_of(message: Any) -> str | None:
    """The device id a device-to-server message's signature binds; None for server messages."""
    if isinstance(message, m.AdvertiseKeys):
        return message.device_id
    return getattr(message, "sender", None)


def encode_secagg(message: Any, bits: int) -> tuple[MessageKind, bytes]:
    """(kind, payload) of a SecAgg+ message; a MaskedInput's vector is packed to ``bits`` bits."""
    kind = secagg_kind(message)
    try:
        if kind is not MessageKind.MASKED_INPUT:
            return kind, codec.encode(message)
        vector = message.masked
        w = FrameWriter()
        w.uint(bits, 1, "bits")
        w.uint(int(getattr(vector, "size", 0)), 4, "masked count")
        w.raw(pack_bits(vector, bits))
        w.raw(codec.encode(replace(message, masked=_EMPTY)))
        return kind, w.bytes()
    except MessageFormatError as exc:
        raise WireFormatError(f"{kind.name} cannot be encoded: {exc}") from exc


def decode_secagg(kind: MessageKind, payload: bytes, limits: WireLimits) -> Any:
    """The SecAgg+ message in ``payload``; its type must be ``kind``; vectors bounded by ``limits``."""
    if kind not in SECAGG_KINDS.values():
        raise WireFormatError(f"envelope kind {MessageKind(kind).name} does not carry a SecAgg+ message")
    if len(payload) > limits.max_message_bytes:
        raise WireFormatError(f"{kind.name} payload has {len(payload)} bytes, limit is {limits.max_message_bytes} "
                              "(max_message_bytes)")
    vector = None
    body = payload
    if kind is MessageKind.MASKED_INPUT:
        r = FrameReader(payload, "MASKED_INPUT payload")
        bits = r.uint(1, "bits")
        if bits != limits.bits:
            raise WireFormatError(f"MASKED_INPUT payload is packed at {bits} bits, the round uses {limits.bits}")
        count = r.uint(4, "masked count")
        if count > limits.max_vector_length:
            raise WireFormatError(f"MASKED_INPUT declares {count} entries, limit is {limits.max_vector_length} "
                                  "(max_vector_length)")
        vector = unpack_bits(bytes(r.take(packed_size(count, bits), "masked vector")), bits, count)
        body = bytes(r.take(r.remaining, "message"))
    if not body or body[0] != kind.value:
        raise WireFormatError(f"{kind.name} payload starts with codec tag {body[0] if body else None}, "
                              f"expected {kind.value}")
    try:
        message = codec.decode(body)
    except MessageFormatError as exc:
        raise WireFormatError(f"{kind.name} payload: {exc}") from exc
    if vector is None:
        return message
    if message.masked.size:
        raise WireFormatError("MASKED_INPUT payload carries a second, unpacked vector in its codec bytes")
    return replace(message, masked=vector)
