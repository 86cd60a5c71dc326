"""SecAgg+ payloads: every message round trips, MaskedInput travels packed and still verifies, junk is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as m
from edge_sdk.wire import MessageKind, WireFormatError, WireLimits
from edge_sdk.wire.bitpack import packed_size
from edge_sdk.wire.secagg_payload import SECAGG_KINDS, body_sender_of, decode_secagg, encode_secagg, secagg_kind

_spec = importlib.util.spec_from_file_location(
    "wire_make_golden", Path(__file__).resolve().parents[1] / "vectors" / "wire_make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
SAMPLES = golden.secagg_samples()
LIMITS = WireLimits.for_plan(vector_length=1000, bits=golden.BITS, cohort_size=10, model_bytes=0)


def test_every_travelling_secagg_type_has_a_sample_and_a_kind():
    assert {type(s) for s in SAMPLES} == set(SECAGG_KINDS)
    with pytest.raises(WireFormatError, match="SharePlaintext is not a SecAgg\\+ message that travels"):
        secagg_kind(m.SharePlaintext(b"\x00" * 33, b"\x00" * 33))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_every_message_round_trips_and_keeps_its_signature(message):
    kind, payload = encode_secagg(message, golden.BITS)
    back = decode_secagg(kind, payload, LIMITS)
    assert codec.encode(back) == codec.encode(message)
    signer = body_sender_of(message) or golden.AGGREGATOR
    codec.verify(back, golden.identity(signer).public, signer)


def test_masked_input_travels_bit_packed():
    masked = next(s for s in SAMPLES if isinstance(s, m.MaskedInput))
    big = dataclasses.replace(masked, masked=np.arange(1000, dtype=np.uint32) * 997 % (2**20))
    _kind, payload = encode_secagg(big, 20)
    assert len(codec.encode(big)) - len(payload) == 4 * 1000 - packed_size(1000, 20) - 5
    assert np.array_equal(decode_secagg(MessageKind.MASKED_INPUT, payload, LIMITS).masked, big.masked)


def test_masked_input_bounds_come_from_the_plan():
    masked = next(s for s in SAMPLES if isinstance(s, m.MaskedInput))
    _kind, payload = encode_secagg(masked, 20)
    with pytest.raises(WireFormatError, match="packed at 20 bits, the round uses 16"):
        decode_secagg(MessageKind.MASKED_INPUT, payload, dataclasses.replace(LIMITS, bits=16))
    with pytest.raises(WireFormatError, match="declares 9 entries, limit is 5 \\(max_vector_length\\)"):
        decode_secagg(MessageKind.MASKED_INPUT, payload, dataclasses.replace(LIMITS, max_vector_length=5))
    forged = payload[:1] + (2**31).to_bytes(4, "big") + payload[5:]
    with pytest.raises(WireFormatError, match="max_vector_length"):
        decode_secagg(MessageKind.MASKED_INPUT, forged, LIMITS)
    with pytest.raises(WireFormatError, match="max_message_bytes"):
        decode_secagg(MessageKind.MASKED_INPUT, payload, dataclasses.replace(LIMITS, max_message_bytes=100))


def test_a_second_unpacked_vector_and_a_kind_mismatch_are_refused():
    masked = next(s for s in SAMPLES if isinstance(s, m.MaskedInput))
    _kind, payload = encode_secagg(masked, 20)
    prefix = payload[: 5 + packed_size(masked.masked.size, 20)]
    with pytest.raises(WireFormatError, match="second, unpacked vector"):
        decode_secagg(MessageKind.MASKED_INPUT, prefix + codec.encode(masked), LIMITS)
    kind, abort = encode_secagg(SAMPLES[-1], 20)
    with pytest.raises(WireFormatError, match="SURVIVOR_SET payload starts with codec tag 11, expected 7"):
        decode_secagg(MessageKind.SURVIVOR_SET, abort, LIMITS)
    with pytest.raises(WireFormatError, match="PLAN does not carry a SecAgg\\+ message"):
        decode_secagg(MessageKind.PLAN, abort, LIMITS)


def test_codec_errors_surface_as_wire_format_errors():
    _kind, abort = encode_secagg(SAMPLES[-1], 20)
    with pytest.raises(WireFormatError, match="ABORT payload: .*trailing"):
        decode_secagg(MessageKind.ABORT, abort + b"\x00", LIMITS)
    with pytest.raises(WireFormatError, match="cannot be encoded"):
        encode_secagg(dataclasses.replace(SAMPLES[-1], session_id=b"short"), 20)


def test_body_sender_names_the_device_whose_signature_binds_the_body():
    assert [body_sender_of(s) for s in SAMPLES[:2]] == [None, "dev-1"]
    assert body_sender_of(next(s for s in SAMPLES if isinstance(s, m.UnmaskShares))) == "dev-1"


@given(st.sampled_from(list(SECAGG_KINDS.values())), st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_random_payloads_raise_only_wire_format_error(kind, data):
    with contextlib.suppress(WireFormatError):
        decode_secagg(kind, bytes([kind.value]) + data, LIMITS)
    with contextlib.suppress(WireFormatError):
        decode_secagg(kind, data, LIMITS)
