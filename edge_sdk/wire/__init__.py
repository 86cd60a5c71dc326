"""The wire format: envelope, topics, chunking, arrays and bit-packing. Pure: no I/O, no clock.

Bytes come in from a broker that anyone on the path may have touched, so every decoder here is
strict and bounded by the round's ``WireLimits`` (derived from the plan), never by a global size.
Layouts and the signature rule are in docs/protocol.md, "Wire format and topics"; golden bytes
in tests/vectors/wire_golden.json pin them.
"""

from edge_sdk.wire.envelope import (
    NO_SESSION,
    WIRE_VERSION,
    Envelope,
    MessageKind,
    decode_envelope,
    encode_envelope,
)
from edge_sdk.wire.errors import ReassemblyError, SenderMismatchError, WireError, WireFormatError
from edge_sdk.wire.limits import WireLimits

__all__ = [
    "NO_SESSION", "WIRE_VERSION", "Envelope", "MessageKind", "ReassemblyError", "SenderMismatchError", "WireError",
    "WireFormatError", "WireLimits", "decode_envelope", "encode_envelope",
]
