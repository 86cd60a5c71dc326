"""Canonical encoding: every message round-trips, and malformed bytes raise MessageFormatError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as m
from edge_sdk.secagg.errors import MessageFormatError, SignatureError
from edge_sdk.secagg.keys import IdentityKey

SID = bytes(range(32))
SHARE = b"\x01" * 33
ADVERT = m.AdvertiseKeys("dev-1", 4, b"n" * 32, b"c" * 32, b"s" * 32, b"h" * 32, b"\x07" * 64)
HEAD = bytes(range(40))

SAMPLES = [
    m.RoundStart(4, b"n" * 32, 16, 1000, b"D" * 32, b"\x0f", 90, b"\x05" * 64),
    ADVERT,
    m.Roster("dev-1", 4, b"n" * 32, 16, 1000, 2, 2, b"D" * 32, b"\x0f", b"\x0b", 90,
             (m.NeighbourKey("dev-2", b"c" * 32, b"s" * 32, b"h" * 32, b"\x07" * 64),
              m.NeighbourKey("dev-4", b"C" * 32, b"S" * 32, b"H" * 32, b"\x08" * 64))),
    m.ShareKeys("dev-1", SID, 4, (m.EncryptedShare("dev-1", "dev-2", b"\x00" * 12, b"ct" * 80),)),
    m.ShareRelay("dev-2", SID, 4, b"\x07", (m.EncryptedShare("dev-1", "dev-2", b"\x00" * 12, b"ct" * 80),)),
    m.MaskedInput("dev-1", SID, 4, ("dev-3",), HEAD, np.array([0, 1, 2**32 - 1], dtype=np.uint32), b"\x09" * 64),
    m.SurvivorSet("dev-1", SID, 4, b"\x03"),
    m.ConsistencyCheck("dev-1", SID, 4, b"d" * 32),
    m.UnmaskRequest("dev-1", SID, 4, b"\x05", (b"\x03" * 64, b"\x04" * 64), ("dev-2",), ("dev-3",)),
    m.UnmaskShares("dev-1", SID, 4, (("dev-2", SHARE),), (("dev-3", SHARE),)),
    m.Abort(SID, 4, "only 2 devices shared their keys, below the threshold t=3"),
    m.SharePlaintext(SHARE, SHARE),
]


def _same(a, b) -> bool:
    if isinstance(a, m.MaskedInput):
        return codec.encode(a) == codec.encode(b) and np.array_equal(a.masked, b.masked)
    return a == b


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_message_round_trips_through_its_canonical_bytes(message):
    wire = codec.encode(message)
    back = codec.decode(wire)
    assert type(back) is type(message) and _same(back, message)
    assert codec.encode(back) == wire


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_truncation_and_any_trailing_byte_is_rejected(message):
    wire = codec.encode(message)
    for cut in range(len(wire)):
        with pytest.raises(MessageFormatError):
            codec.decode(wire[:cut])
    with pytest.raises(MessageFormatError, match="trailing"):
        codec.decode(wire + b"\x00")


def test_unknown_type_tag_and_bad_signature_length_are_rejected():
    with pytest.raises(MessageFormatError, match="unknown message type tag 200"):
        codec.decode(b"\xc8" + b"\x00" * 10)
    wire = codec.encode(m.ConsistencyCheck("dev-1", SID, 4, b"d" * 32))
    with pytest.raises(MessageFormatError, match="signature length"):
        codec.decode(wire[:-1] + b"\x05" + b"\x00" * 5)


def test_oversized_declared_counts_are_rejected_before_allocation():
    body = codec.body_bytes(m.ShareRelay("dev-1", SID, 4, b"", ()))
    huge = body[:-4] + struct.pack(">I", 2**31) + b"\x00"
    with pytest.raises(MessageFormatError, match="declares"):
        codec.decode(huge)
    vector = codec.body_bytes(m.MaskedInput("d", SID, 4, (), HEAD, np.zeros(0, dtype=np.uint32)))
    with pytest.raises(MessageFormatError, match="limit"):
        codec.decode(vector[:-4] + struct.pack(">I", 2**30))


def test_encoder_refuses_fields_of_the_wrong_size():
    with pytest.raises(MessageFormatError, match="round_nonce must be 32 bytes"):
        codec.encode(m.RoundStart(1, b"short", 16, 10, b"D" * 32, b"\x01", 1))
    with pytest.raises(MessageFormatError, match="device_id"):
        codec.encode(m.AdvertiseKeys("", 1, b"n" * 32, b"c" * 32, b"s" * 32, b"h" * 32))
    with pytest.raises(MessageFormatError, match="uint32"):
        codec.encode(m.MaskedInput("d", SID, 4, (), HEAD, np.zeros(3, dtype=np.int64)))
    with pytest.raises(MessageFormatError, match="ledger_head must be 40 bytes"):
        codec.encode(m.MaskedInput("d", SID, 4, (), HEAD[:8], np.zeros(3, dtype=np.uint32)))
    with pytest.raises(MessageFormatError, match="signatures must be 64 bytes"):
        codec.encode(m.UnmaskRequest("d", SID, 4, b"\x01", (b"\x00" * 63,), (), ()))


def test_invalid_utf8_ids_are_rejected():
    wire = bytearray(codec.encode(m.ConsistencyCheck("dev-1", SID, 4, b"d" * 32)))
    wire[3] = 0xFF  # inside the sender id
    with pytest.raises(MessageFormatError, match="UTF-8"):
        codec.decode(bytes(wire))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_either_fail_with_message_format_error_or_are_canonical(data):
    try:
        message = codec.decode(data)
    except MessageFormatError:
        return
    assert codec.encode(message) == data


def test_signatures_cover_every_field_and_the_message_type():
    key = IdentityKey.generate()
    signed = codec.sign(m.ConsistencyCheck("dev-1", SID, 4, b"d" * 32), key)
    codec.verify(signed, key.public, "dev-1")
    forged = m.ConsistencyCheck("dev-1", SID, 5, b"d" * 32, signed.signature)
    with pytest.raises(SignatureError, match="ConsistencyCheck from dev-1"):
        codec.verify(forged, key.public, "dev-1")
    unsigned = m.ConsistencyCheck("dev-1", SID, 4, b"d" * 32)
    with pytest.raises(SignatureError, match="missing"):
        codec.verify(unsigned, key.public, "dev-1")


def test_session_id_covers_what_every_member_shares_and_not_what_differs_between_them():
    import dataclasses

    roster = SAMPLES[2]
    sid = codec.session_id_of(roster)
    assert sid == codec.session_id_of(codec.decode(codec.encode(roster)))
    # each member receives its own copy: another receiver and other neighbours, one session
    other_member = dataclasses.replace(roster, receiver="dev-2", neighbours=roster.neighbours[:1])
    assert codec.session_id_of(other_member) == sid
    for field, value in [("round_index", 5), ("round_nonce", b"N" * 32), ("bits", 17), ("vector_length", 999),
                         ("degree", 4), ("threshold", 3), ("directory_digest", b"E" * 32), ("cohort", b"\x1f"),
                         ("members", b"\x0f"), ("noise_floor", 89)]:
        assert codec.session_id_of(dataclasses.replace(roster, **{field: value})) != sid, field


def test_a_neighbour_key_rebuilds_the_advert_its_device_signed():
    key = IdentityKey.generate()
    advert = codec.sign(m.AdvertiseKeys("dev-2", 4, b"n" * 32, b"c" * 32, b"s" * 32, b"h" * 32), key)
    carried = m.NeighbourKey(advert.device_id, advert.c_public, advert.s_public, advert.self_mask_commitment,
                             advert.signature)
    codec.verify(carried.advert(4, b"n" * 32), key.public, "dev-2")
    with pytest.raises(SignatureError):
        codec.verify(carried.advert(5, b"n" * 32), key.public, "dev-2")  # replayed into another round
