"""The wire format: envelope, topics, chunking, arrays and bit-packing. Pure: no I/O, no clock.

Bytes come in from a broker that anyone on the path may have touched, so every decoder here is
strict and bounded by the round's ``WireLimits`` (derived from the plan), never by a global size.
Layouts and the signature rule are in docs/protocol.md, "Wire format and topics"; golden bytes
in tests/vectors/wire_golden.json pin them.
"""

from edge_sdk.wire.arrays import decode_array, decode_named_arrays, encode_array, encode_named_arrays
from edge_sdk.wire.bitpack import pack_bits, packed_size, unpack_bits
from edge_sdk.wire.chunking import Reassembler, split
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
from edge_sdk.wire.secagg_payload import body_sender_of, decode_secagg, encode_secagg
from edge_sdk.wire.sender_check import check_sender
from edge_sdk.wire.topics import Channel, Topic, parse_topic

__all__ = [
    "NO_SESSION", "WIRE_VERSION", "Channel", "Envelope", "MessageKind", "Reassembler", "ReassemblyError",
    "SenderMismatchError", "Topic", "WireError", "WireFormatError", "WireLimits", "body_sender_of", "check_sender",
    "decode_array", "decode_envelope", "decode_named_arrays", "decode_secagg", "encode_array", "encode_envelope",
    "encode_named_arrays", "encode_secagg", "pack_bits", "packed_size", "parse_topic", "split", "unpack_bits",
]
