"""Signed receipts: round trip, and every tampering refused."""

from __future__ import annotations

import pytest

from edge_sdk.secagg.errors import SignatureError
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.receipt import Receipt, decode_receipt, sign_receipt, verify_receipt
from edge_sdk.wire.envelope import MessageKind
from edge_sdk.wire.errors import WireFormatError

AGGREGATOR = IdentityKey(bytes(range(32)))
RECEIPT = Receipt("aggregator", "dev-1", b"s" * 32, MessageKind.MASKED_INPUT, 2**40 + 5, b"h" * 32)


def test_round_trip_and_verification():
    data = sign_receipt(AGGREGATOR, RECEIPT)
    decoded = decode_receipt(data)
    assert decoded.acknowledged == ("dev-1", b"s" * 32, MessageKind.MASKED_INPUT, 2**40 + 5)
    assert decoded.digest == b"h" * 32 and len(data) == 2 + 1 + 11 + 6 + 32 + 1 + 8 + 32 + 64
    verify_receipt(decoded, AGGREGATOR.public)


def test_a_receipt_signed_by_anyone_else_or_altered_is_refused():
    data = sign_receipt(AGGREGATOR, RECEIPT)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_receipt(decode_receipt(sign_receipt(IdentityKey.generate(), RECEIPT)), AGGREGATOR.public)
    for offset in (5, 30, len(data) - 70):
        tampered = bytearray(data)
        tampered[offset] ^= 1
        with pytest.raises((SignatureError, WireFormatError)):
            verify_receipt(decode_receipt(bytes(tampered)), AGGREGATOR.public)
    with pytest.raises(WireFormatError, match="trailing"):
        decode_receipt(data + b"\0")
    with pytest.raises(WireFormatError, match="truncated"):
        decode_receipt(data[:-1])


# Ed25519 signatures are deterministic, so with a fixed key every byte of a receipt is fixed: a refactor
# that changes the layout, the signing domain or the field order fails here
GOLDEN = (
    "4652010a61676772656761746f72056465762d31" + "73" * 32 + "06" + "0000010000000005" + "68" * 32
    + "ac47ea51456613052d261d9dcc1d536c14aa7931336ba7e6f36209adf265a7dd"
    + "275d4b253448cf7c18453e278eb29f590fa51394852580d75ffabda220986f03"
)


def test_golden_bytes():
    assert sign_receipt(AGGREGATOR, RECEIPT).hex() == GOLDEN
