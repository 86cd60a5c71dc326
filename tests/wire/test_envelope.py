"""Envelope: round trips, strict refusal of every malformed frame, and limits taken from the plan."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, FleetlearnError
from edge_sdk.secagg import codec
from edge_sdk.wire import (
    NO_SESSION,
    Envelope,
    MessageKind,
    WireFormatError,
    WireLimits,
    decode_envelope,
    encode_envelope,
)
from edge_sdk.wire.envelope import kind_from_topic_name

LIMITS = WireLimits.for_plan(vector_length=1000, bits=16, cohort_size=10, model_bytes=4000)
ENV = Envelope(1, MessageKind.SHARE_KEYS, "fleet-a", bytes(range(32)), 4, 2, "dev-1", 9, b"payload bytes")

ids = st.text(st.characters(blacklist_characters="+#/\x00", blacklist_categories=("Cs",)), min_size=1,
              max_size=32).filter(lambda s: all(c.isprintable() and not c.isspace() for c in s))
envelopes = st.builds(Envelope, st.just(1), st.sampled_from(MessageKind), ids, st.binary(min_size=32, max_size=32),
                      st.integers(0, 2**64 - 1), st.integers(0, 255), ids, st.integers(0, 2**64 - 1),
                      st.binary(max_size=500))


def test_wire_format_error_is_a_fleetlearn_value_error():
    assert issubclass(WireFormatError, FleetlearnError) and issubclass(WireFormatError, ValueError)


@given(envelopes)
@settings(max_examples=200, deadline=None)
def test_encode_then_decode_is_the_identity(env):
    wire = encode_envelope(env)
    assert decode_envelope(wire, LIMITS) == env
    assert encode_envelope(decode_envelope(wire, LIMITS)) == wire


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_random_bytes_raise_only_wire_format_error(data):
    try:
        env = decode_envelope(data, LIMITS)
    except WireFormatError:
        return
    assert encode_envelope(env) == data


@given(st.binary(min_size=1, max_size=120), st.integers(0, 200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_after_a_valid_header_raise_only_wire_format_error(tail, cut):
    wire = encode_envelope(ENV)
    data = wire[: min(cut, len(wire))] + tail
    with contextlib.suppress(WireFormatError):
        decode_envelope(data, LIMITS)


def test_every_truncation_and_a_trailing_byte_are_refused_naming_the_field():
    wire = encode_envelope(ENV)
    for cut in range(len(wire)):
        with pytest.raises(WireFormatError, match="truncated|magic"):
            decode_envelope(wire[:cut], LIMITS)
    with pytest.raises(WireFormatError, match="1 trailing bytes"):
        decode_envelope(wire + b"\x00", LIMITS)


def test_unknown_version_and_kind_are_refused_with_what_to_do():
    wire = bytearray(encode_envelope(ENV))
    wire[2] = 2
    with pytest.raises(WireFormatError, match="version 2 is not supported.*upgrade"):
        decode_envelope(bytes(wire), LIMITS)
    wire[2], wire[3] = 1, 200
    with pytest.raises(WireFormatError, match="kind 200 is unknown"):
        decode_envelope(bytes(wire), LIMITS)
    with pytest.raises(WireFormatError, match="chunk frame starts with b'FC'"):
        decode_envelope(b"FC" + bytes(wire[2:]), LIMITS)


def test_payload_is_bounded_by_the_plan_not_by_a_global_limit():
    small = WireLimits(max_payload_bytes=1024, max_chunks=4, max_message_bytes=200, max_vector_length=10, bits=16)
    big = dataclasses.replace(ENV, payload=b"x" * 150)
    with pytest.raises(WireFormatError, match="limit is 200 \\(max_message_bytes\\)"):
        decode_envelope(encode_envelope(big), small)
    # a declared length above the limit is refused before the bytes are read
    wire = encode_envelope(dataclasses.replace(ENV, payload=b""))
    forged = wire[:-4] + (10**6).to_bytes(4, "big")
    with pytest.raises(WireFormatError, match="payload declares 1000000 bytes, limit is 200"):
        decode_envelope(forged, small)


@pytest.mark.parametrize("field,value,match", [
    ("fleet", "", "fleet must be 1..128"), ("fleet", "a/b", "'/'"), ("sender", "x" * 129, "sender must be 1..128"),
    ("sender", "dev+1", "'\\+'"), ("sender", "dev#", "'#'"), ("sender", "d\x00", "NUL"),
    ("session", b"short", "session must be 32 bytes"), ("round_index", -1, "round_index must be an integer"),
    ("stage", 256, "stage must be an integer"), ("sequence", 2**64, "sequence must be an integer"),
    ("version", 2, "version must be 1"), ("kind", 99, "not a MessageKind"),
])
def test_encoder_refuses_what_the_decoder_would_refuse(field, value, match):
    with pytest.raises(WireFormatError, match=match):
        encode_envelope(dataclasses.replace(ENV, **{field: value}))


def test_an_id_with_a_forbidden_character_on_the_wire_is_refused():
    wire = bytearray(encode_envelope(ENV))
    wire[5] = ord("/")  # first byte of the fleet name
    with pytest.raises(WireFormatError, match="fleet.*'/'"):
        decode_envelope(bytes(wire), LIMITS)
    wire[5] = 0xFF
    with pytest.raises(WireFormatError, match="fleet is not valid UTF-8"):
        decode_envelope(bytes(wire), LIMITS)


def test_secagg_kinds_reuse_the_codec_type_tags():
    tags = {cls.__name__: tag for cls, (tag, _schema) in codec._SCHEMAS.items()}
    for kind in list(MessageKind)[:11]:
        name = "".join(part.capitalize() for part in kind.name.split("_"))
        assert tags[name] == kind.value, kind
    assert "SharePlaintext" in tags and len(tags) == 12  # the one codec type that never travels alone


def test_kinds_have_topic_names_and_unknown_names_are_refused():
    assert kind_from_topic_name("masked_input") is MessageKind.MASKED_INPUT
    with pytest.raises(WireFormatError, match="unknown message kind 'masked'"):
        kind_from_topic_name("masked")


def test_dedup_key_and_the_no_session_marker():
    assert ENV.dedup_key == ("dev-1", bytes(range(32)), MessageKind.SHARE_KEYS, 9)
    assert bytes(32) == NO_SESSION


def test_limits_follow_the_plan_and_refuse_nonsense():
    lim = WireLimits.for_plan(vector_length=10**5, bits=20, cohort_size=100, model_bytes=400_000)
    assert lim.max_vector_length == 10**5 and lim.bits == 20
    assert lim.max_message_bytes == 400_000 + 64 * 1024
    assert lim.max_chunks * lim.chunk_data_bytes >= lim.max_message_bytes
    assert lim.max_sender_bytes == 2 * lim.max_message_bytes
    with pytest.raises(ConfigError, match="bits"):
        WireLimits.for_plan(vector_length=10, bits=33, cohort_size=1, model_bytes=0)
    with pytest.raises(ConfigError, match="cohort_size"):
        WireLimits.for_plan(vector_length=10, bits=16, cohort_size=0, model_bytes=0)
    with pytest.raises(ConfigError, match="chunk header"):
        WireLimits(max_payload_bytes=51, max_chunks=1, max_message_bytes=1, max_vector_length=1, bits=8)
    with pytest.raises(ConfigError, match="max_chunks must be <= 2\\^31"):
        WireLimits(max_payload_bytes=100, max_chunks=2**32, max_message_bytes=1, max_vector_length=1, bits=8)
