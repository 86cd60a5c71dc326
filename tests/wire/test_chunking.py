"""Chunking: any order with duplicates gives the message back; every bad chunk is refused with a typed error."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.wire import ReassemblyError, WireFormatError, WireLimits
from edge_sdk.wire.chunking import CHUNK_HEADER_BYTES, Reassembler, parse_chunk, split

LIMITS = WireLimits(max_payload_bytes=CHUNK_HEADER_BYTES + 100, max_chunks=64, max_message_bytes=4000,
                    max_vector_length=10, bits=16, partial_timeout=10.0)


def _header(digest=b"\x00" * 32, index=0, count=1, total=0, chunk_size=100, magic=b"FC", version=1):
    return struct.pack(">2sB32sIIII", magic, version, digest, index, count, total, chunk_size)


@given(st.binary(max_size=3000), st.randoms(use_true_random=False), st.integers(0, 10))
@settings(max_examples=200, deadline=None)
def test_any_order_with_duplicates_gives_the_message_back_once_per_completion(message, rnd, dups):
    chunks = split(message, LIMITS.max_payload_bytes)
    assert all(len(c) <= LIMITS.max_payload_bytes for c in chunks)
    stream = chunks + [rnd.choice(chunks) for _ in range(dups)] if len(chunks) > 1 else chunks
    rnd.shuffle(stream)
    r = Reassembler(LIMITS)
    out = [m for m in (r.add("dev-1", c, now=0.0) for c in stream) if m is not None]
    assert out[0] == message
    # a duplicate after completion starts a new partial (a retransmission), never a wrong message
    assert all(m == message for m in out)
    r.expire(now=100.0)
    assert r.held_bytes() == 0 and r.in_flight("dev-1") == 0


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_random_frames_raise_only_wire_format_error(data):
    r = Reassembler(LIMITS)
    with contextlib.suppress(WireFormatError):
        r.add("dev-1", data, now=0.0)


def test_interleaved_messages_from_two_senders_reassemble_separately():
    a, b = bytes(range(256)) * 3, b"\xaa" * 500
    ca, cb = split(a, LIMITS.max_payload_bytes), split(b, LIMITS.max_payload_bytes)
    r = Reassembler(LIMITS)
    got = {}
    for x, y in zip(ca, cb, strict=False):
        for sender, c in (("a", x), ("b", y)):
            m = r.add(sender, c, now=0.0)
            if m is not None:
                got[sender] = m
    for c in ca[len(cb):]:
        got["a"] = r.add("a", c, now=0.0) or got.get("a")
    assert got == {"a": a, "b": b}


def test_a_declared_count_of_2_to_the_31_is_refused():
    frame = _header(count=2**31, total=2**31, chunk_size=1) + b"x"
    with pytest.raises(WireFormatError, match="count 2147483648 is outside 1..64 \\(max_chunks\\)"):
        Reassembler(LIMITS).add("dev-1", frame, now=0.0)


def test_an_oversized_total_is_refused_before_anything_is_held():
    frame = _header(count=50, total=4001, chunk_size=100, index=0) + b"x" * 100
    r = Reassembler(LIMITS)
    with pytest.raises(WireFormatError, match="declares 4001 bytes, limit is 4000 \\(max_message_bytes\\)"):
        r.add("dev-1", frame, now=0.0)
    assert r.held_bytes() == 0


def test_a_wrong_digest_is_refused_and_the_partial_dropped():
    chunks = split(b"m" * 250, LIMITS.max_payload_bytes)
    tampered = chunks[1][:-1] + b"X"
    r = Reassembler(LIMITS)
    r.add("dev-1", chunks[0], now=0.0)
    r.add("dev-1", tampered, now=0.0)
    with pytest.raises(ReassemblyError, match="does not match its digest"):
        r.add("dev-1", chunks[2], now=0.0)
    assert r.held_bytes() == 0 and r.in_flight("dev-1") == 0
    with pytest.raises(ReassemblyError, match="does not match its digest"):
        Reassembler(LIMITS).add("dev-1", split(b"short", LIMITS.max_payload_bytes)[0][:-1] + b"X", now=0.0)


def test_a_conflicting_duplicate_is_refused_and_the_first_copy_kept():
    chunks = split(b"m" * 250, LIMITS.max_payload_bytes)
    r = Reassembler(LIMITS)
    r.add("dev-1", chunks[0], now=0.0)
    with pytest.raises(ReassemblyError, match="differs from the copy already held"):
        r.add("dev-1", chunks[0][:-1] + b"X", now=0.0)
    assert r.add("dev-1", chunks[1], now=0.0) is None
    assert r.add("dev-1", chunks[2], now=0.0) == b"m" * 250


def test_siblings_that_disagree_about_the_shape_are_refused():
    digest = hashlib.sha256(b"z").digest()
    r = Reassembler(LIMITS)
    r.add("dev-1", _header(digest, 0, 3, 250, 100) + b"a" * 100, now=0.0)
    with pytest.raises(ReassemblyError, match="declares count/total/chunk_size 2/200/100"):
        r.add("dev-1", _header(digest, 1, 2, 200, 100) + b"a" * 100, now=0.0)


@pytest.mark.parametrize("frame,match", [
    (_header(index=3, count=3, total=250), "index 3 is not below its count 3"),
    (_header(count=2, total=250), "count 2 does not match total 250"),
    (_header(count=1, total=10) + b"x" * 9, "carries 9 data bytes, expected 10"),
    (_header(count=3, total=250) + b"x" * 99, "carries 99 data bytes, expected 100"),
    (_header(count=1, total=0, chunk_size=0), "chunk_size 0 is outside"),
    (_header(count=1, total=0, chunk_size=101), "chunk_size 101 is outside 1..100"),
    (_header(magic=b"FE"), "an envelope starts with b'FE'"),
    (_header(version=9), "chunk version 9 is not supported"),
    (_header()[:-1], "truncated in chunk_size"),
    (b"x" * (CHUNK_HEADER_BYTES + 101), "limit is 151 \\(max_payload_bytes\\)"),
])
def test_malformed_chunk_frames_name_the_field(frame, match):
    with pytest.raises(WireFormatError, match=match):
        parse_chunk(frame, LIMITS)


def test_too_many_messages_in_flight_per_sender_are_refused_and_others_unaffected():
    r = Reassembler(LIMITS)
    firsts = [split(bytes([i]) * 250, LIMITS.max_payload_bytes)[0] for i in range(5)]
    for c in firsts[:4]:
        assert r.add("dev-1", c, now=0.0) is None
    with pytest.raises(ReassemblyError, match="4 partial messages in flight, limit is 4"):
        r.add("dev-1", firsts[4], now=0.0)
    assert r.in_flight("dev-1") == 4
    assert r.add("dev-2", firsts[4], now=0.0) is None  # another sender has its own budget


def test_per_sender_and_total_memory_are_bounded():
    lim = WireLimits(max_payload_bytes=CHUNK_HEADER_BYTES + 100, max_chunks=64, max_message_bytes=1000,
                     max_vector_length=10, bits=16, max_sender_bytes=1000, max_reassembly_bytes=1500,
                     max_in_flight_per_sender=8)
    r = Reassembler(lim)
    message = b"q" * 1000
    for c in split(message, lim.max_payload_bytes)[:9]:
        r.add("dev-1", c, now=0.0)
    other = split(b"r" * 1000, lim.max_payload_bytes)
    assert r.add("dev-1", other[0], now=0.0) is None
    with pytest.raises(ReassemblyError, match="holds 1000 bytes of partial messages; 100 more would pass 1000"):
        r.add("dev-1", other[1], now=0.0)
    for c in other[:5]:
        r.add("dev-2", c, now=0.0)
    with pytest.raises(ReassemblyError, match="max_reassembly_bytes"):
        r.add("dev-2", other[5], now=0.0)
    assert r.held_bytes() == 1500 and r.held_bytes("dev-1") == 1000 and r.held_bytes("dev-2") == 500


def test_stale_partials_expire_only_by_the_now_passed_in():
    chunks = split(b"s" * 250, LIMITS.max_payload_bytes)
    r = Reassembler(LIMITS)
    r.add("dev-1", chunks[0], now=100.0)
    assert r.expire(now=110.0) == []  # exactly the timeout: kept
    r.add("dev-1", chunks[1], now=115.0)  # activity refreshes it
    assert r.expire(now=125.0) == []
    expired = r.expire(now=125.5)
    assert [(e.sender, e.received_chunks, e.count) for e in expired] == [("dev-1", 2, 3)]
    assert r.held_bytes() == 0 and r.add("dev-1", chunks[2], now=126.0) is None  # the tail alone waits again


def test_a_new_message_sweeps_the_same_senders_stale_partials_first():
    r = Reassembler(LIMITS)
    for i in range(4):
        r.add("dev-1", split(bytes([i]) * 250, LIMITS.max_payload_bytes)[0], now=0.0)
    assert r.add("dev-1", split(b"\x09" * 250, LIMITS.max_payload_bytes)[0], now=50.0) is None
    assert r.in_flight("dev-1") == 1


def test_split_refuses_a_payload_smaller_than_the_header_and_a_short_message_is_one_chunk():
    with pytest.raises(WireFormatError, match="exceed the 51-byte chunk header"):
        split(b"x", CHUNK_HEADER_BYTES)
    [only] = split(b"", 1000)
    assert parse_chunk(only, LIMITS).count == 1 and Reassembler(LIMITS).add("d", only, now=0.0) == b""
