"""Bit-packing against a big-integer reference for every b; arrays and named sets round trip and refuse junk."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError
from edge_sdk.modulus import MAX_BITS, MIN_BITS
from edge_sdk.wire import WireFormatError, WireLimits
from edge_sdk.wire.arrays import (
    DTYPE_CODES,
    decode_array,
    decode_named_arrays,
    encode_array,
    encode_named_arrays,
)
from edge_sdk.wire.bitpack import pack_bits, packed_size, unpack_bits

BITS = range(MIN_BITS, MAX_BITS + 1)  # the one range of edge_sdk.modulus


def _reference_pack(values: np.ndarray, bits: int) -> bytes:
    stream = sum(int(v) << (i * bits) for i, v in enumerate(values))
    return stream.to_bytes(packed_size(len(values), bits), "little")


@st.composite
def vectors(draw):
    bits = draw(st.sampled_from(BITS))
    n = draw(st.integers(0, 70))
    values = draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    return bits, np.array(values, dtype=np.uint32)


@given(vectors())
@settings(max_examples=400, deadline=None)
def test_pack_matches_the_big_integer_reference_and_unpack_inverts_it(case):
    bits, values = case
    packed = pack_bits(values, bits)
    assert packed == _reference_pack(values, bits)
    back = unpack_bits(packed, bits, values.size)
    assert back.dtype == np.uint32 and np.array_equal(back, values)


@pytest.mark.parametrize("bits", BITS)
def test_every_b_round_trips_extremes_at_a_length_not_a_multiple_of_eight(bits):
    values = np.array([0, 2**bits - 1, 1, 2**(bits - 1)] * 5 + [2**bits - 1] * 3, dtype=np.uint32)
    packed = pack_bits(values, bits)
    assert len(packed) == packed_size(values.size, bits) == -(-values.size * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, values.size), values)


def test_values_of_b_bits_or_more_and_wrong_dtypes_are_refused():
    with pytest.raises(WireFormatError, match="value 1048576 at index 2 does not fit in 20 bits"):
        pack_bits(np.array([0, 5, 2**20], dtype=np.uint32), 20)
    with pytest.raises(WireFormatError, match="1-D uint32"):
        pack_bits(np.array([1, 2], dtype=np.int64), 20)
    with pytest.raises(ConfigError, match="bits must be an integer in \\[8, 32\\]"):
        pack_bits(np.zeros(3, dtype=np.uint32), 7)
    with pytest.raises(ConfigError, match="bits"):
        unpack_bits(b"", 33, 0)


def test_unpack_refuses_a_wrong_length_and_nonzero_padding():
    packed = pack_bits(np.array([1, 2, 3], dtype=np.uint32), 20)  # 60 bits: 4 padding bits
    with pytest.raises(WireFormatError, match="has 7 bytes, 3 values of 20 bits need 8"):
        unpack_bits(packed[:-1], 20, 3)
    with pytest.raises(WireFormatError, match="nonzero padding bits"):
        unpack_bits(packed[:-1] + bytes([packed[-1] | 0x10]), 20, 3)
    with pytest.raises(WireFormatError, match="count"):
        unpack_bits(packed, 20, -1)


LIMITS = WireLimits(max_payload_bytes=1024, max_chunks=8, max_message_bytes=8192, max_vector_length=64, bits=16,
                    max_ndim=4, max_arrays=3)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES.values()), ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 2, 2, 2)])
def test_arrays_of_every_dtype_and_shape_round_trip(dtype, shape):
    arr = (np.arange(int(np.prod(shape)), dtype=np.int64) % 7).astype(dtype).reshape(shape)
    back = decode_array(encode_array(arr), LIMITS)
    assert back.dtype == arr.dtype and back.shape == shape and np.array_equal(back, arr) and back.flags.writeable


def test_big_endian_and_non_contiguous_arrays_travel_as_little_endian():
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    assert encode_array(arr) == encode_array(arr.astype("<f4"))
    assert np.array_equal(decode_array(encode_array(arr.T), LIMITS), arr.T)


@pytest.mark.parametrize("arr,match", [
    (np.array(["a"]), "dtype <U1 cannot travel"), (np.array([object()]), "cannot travel"),
    (np.array([True]), "dtype bool cannot travel"), (np.zeros(2, dtype=np.complex64), "cannot travel"),
])
def test_unsupported_dtypes_are_refused(arr, match):
    with pytest.raises(WireFormatError, match=match):
        encode_array(arr)


def test_array_bounds_come_from_the_limits():
    with pytest.raises(WireFormatError, match="65 elements, limit is 64 \\(max_vector_length\\)"):
        decode_array(encode_array(np.zeros(65, dtype=np.float32)), LIMITS)
    with pytest.raises(WireFormatError, match="5 dimensions, limit is 4 \\(max_ndim\\)"):
        decode_array(encode_array(np.zeros((1,) * 5, dtype=np.float32)), LIMITS)
    huge = bytes([1, 2]) + (2**32 - 1).to_bytes(4, "big") * 2  # 2^64 elements declared
    with pytest.raises(WireFormatError, match="max_vector_length"):
        decode_array(huge, LIMITS)
    with pytest.raises(WireFormatError, match="unknown dtype code 99"):
        decode_array(bytes([99, 0]), LIMITS)
    with pytest.raises(WireFormatError, match="truncated in array data"):
        decode_array(encode_array(np.zeros(3, dtype=np.float32))[:-1], LIMITS)
    with pytest.raises(WireFormatError, match="trailing"):
        decode_array(encode_array(np.zeros(3, dtype=np.float32)) + b"\x00", LIMITS)


def test_named_sets_keep_their_order_and_refuse_duplicates_and_excess():
    params = {"layer1/weight": np.ones((2, 2), np.float32), "layer1.bias": np.zeros(2, np.float32)}
    back = decode_named_arrays(encode_named_arrays(params), LIMITS)
    assert list(back) == list(params) and all(np.array_equal(back[k], params[k]) for k in params)
    one = encode_named_arrays({"a": np.zeros(1, np.float32)})
    twice = (2).to_bytes(4, "big") + one[4:] + one[4:]
    with pytest.raises(WireFormatError, match="'a' appears twice"):
        decode_named_arrays(twice, LIMITS)
    with pytest.raises(WireFormatError, match="declare 4 arrays, limit is 3 \\(max_arrays\\)"):
        decode_named_arrays((4).to_bytes(4, "big"), LIMITS)
    with pytest.raises(WireFormatError, match="name"):
        encode_named_arrays({"": np.zeros(1, np.float32)})


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_random_bytes_raise_only_wire_format_error_from_the_array_decoders(data):
    for decode in (decode_array, decode_named_arrays):
        with contextlib.suppress(WireFormatError):
            decode(data, LIMITS)
    for bits in (8, 13, 20, 32):
        with contextlib.suppress(WireFormatError):
            unpack_bits(data, bits, len(data) * 8 // bits)
