"""Device sets as bitmaps over a sorted universe, and the enrolment directory's digest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg.errors import MessageFormatError
from edge_sdk.secagg.membership import Directory, from_bitmap, to_bitmap

UNIVERSE = tuple(f"dev-{i:03d}" for i in range(19))


@given(st.sets(st.sampled_from(UNIVERSE)))
@settings(max_examples=100, deadline=None)
def test_bitmaps_round_trip_in_universe_order(subset):
    bitmap = to_bitmap(UNIVERSE, subset)
    assert len(bitmap) == 3  # 19 devices: one bit each
    assert from_bitmap(UNIVERSE, bitmap, "set") == tuple(sorted(subset))


def test_bit_layout_is_little_endian_within_each_byte():
    assert to_bitmap(UNIVERSE, {"dev-000", "dev-009"}) == bytes([0b1, 0b10, 0])


def test_malformed_bitmaps_are_rejected_with_what_is_wrong():
    with pytest.raises(MessageFormatError, match="survivor set bitmap is 2 bytes, but numbers 19 devices"):
        from_bitmap(UNIVERSE, b"\x00\x00", "survivor set")
    with pytest.raises(MessageFormatError, match="sets bits past its 19 devices"):
        from_bitmap(UNIVERSE, bytes([0, 0, 0b1000]), "roster members")
    with pytest.raises(MessageFormatError, match="not in the set"):
        to_bitmap(UNIVERSE, {"dev-000", "stranger"})


def test_directory_digest_covers_every_id_and_key_and_ignores_insertion_order():
    keys = {f"dev-{i}": bytes([i]) * 32 for i in range(5)}
    directory = Directory(keys)
    assert directory.order == tuple(sorted(keys)) and list(directory) == sorted(keys)
    assert Directory(dict(reversed(list(keys.items())))).digest == directory.digest
    assert Directory({**keys, "dev-1": b"\xff" * 32}).digest != directory.digest
    assert Directory({**keys, "dev-9": b"\x09" * 32}).digest != directory.digest
    assert Directory.of(directory) is directory and dict(directory) == keys
