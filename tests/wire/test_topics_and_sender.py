"""Topics: build and parse round trips, strict refusals; the sender check ties topic, envelope and body."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.wire import Envelope, MessageKind, SenderMismatchError, WireFormatError
from edge_sdk.wire.sender_check import check_sender
from edge_sdk.wire.topics import (
    Channel,
    Topic,
    aggregator_subscriptions,
    device_publications,
    device_subscriptions,
    down_topic,
    model_topic,
    parse_topic,
    plan_topic,
    status_topic,
    up_topic,
)


def test_every_topic_builder_parses_back_to_its_parts():
    cases = [
        (up_topic("f1", "dev-1", MessageKind.MASKED_INPUT), Topic("f1", Channel.UP, "dev-1", MessageKind.MASKED_INPUT)),
        (down_topic("f1", "dev-1"), Topic("f1", Channel.DOWN, "dev-1")),
        (plan_topic("f1"), Topic("f1", Channel.PLAN)),
        (plan_topic("f1", 3), Topic("f1", Channel.PLAN, chunk_index=3)),
        (model_topic("f1", 0), Topic("f1", Channel.MODEL, chunk_index=0)),
        (model_topic("f1"), Topic("f1", Channel.MODEL)),
        (status_topic("f1", "dev-1"), Topic("f1", Channel.STATUS, "dev-1")),
    ]
    for text, topic in cases:
        assert parse_topic(text) == topic and str(topic) == text
    assert up_topic("f1", "dev-1", MessageKind.READY) == "fleetlearn/v1/f1/up/dev-1/ready"


def test_acl_intent_confines_a_device_to_its_own_uplinks():
    assert device_publications("f1", "dev-1") == ("fleetlearn/v1/f1/up/dev-1/#", "fleetlearn/v1/f1/status/dev-1")
    assert device_subscriptions("f1", "dev-1")[0] == "fleetlearn/v1/f1/down/dev-1"
    assert set(device_subscriptions("f1", "dev-1")[1:]) == {
        "fleetlearn/v1/f1/plan", "fleetlearn/v1/f1/plan/+", "fleetlearn/v1/f1/model", "fleetlearn/v1/f1/model/+",
        "fleetlearn/v1/f1/directory", "fleetlearn/v1/f1/directory/+"}
    assert aggregator_subscriptions("f1") == ("fleetlearn/v1/f1/up/+/+", "fleetlearn/v1/f1/status/+")


@pytest.mark.parametrize("topic,match", [
    ("other/v1/f1/plan", "not under 'fleetlearn/v1/'"),
    ("fleetlearn/v2/f1/plan", "not under"),
    ("fleetlearn/v1/f1", "no channel level"),
    ("fleetlearn/v1/f1/sideways/dev-1", "unknown channel 'sideways'"),
    ("fleetlearn/v1/f1/up/dev-1", "up topic has 2 levels after the channel, got 1"),
    ("fleetlearn/v1/f1/up/dev/1/masked_input", "got 3"),
    ("fleetlearn/v1/f1/up/dev-1/nonsense", "unknown message kind 'nonsense'"),
    ("fleetlearn/v1/f1/up/dev+1/ready", "'\\+'"),
    ("fleetlearn/v1/f1/up/dev#/ready", "'#'"),
    ("fleetlearn/v1/f1/down/d\x00", "NUL"),
    ("fleetlearn/v1/f1/down/", "device id must be 1..128"),
    ("fleetlearn/v1/f1/down/" + "x" * 129, "device id must be 1..128 UTF-8 bytes, got 129"),
    ("fleetlearn/v1/" + "é" * 65 + "/plan", "fleet must be 1..128 UTF-8 bytes, got 130"),
    ("fleetlearn/v1/f1/model/01", "chunk level '01' is not a canonical index"),
    ("fleetlearn/v1/f1/model/-1", "not a canonical index"),
    ("fleetlearn/v1/f1/model/2147483648", "not a canonical index"),
    ("fleetlearn/v1/f1/model/٣", "not a canonical index"),
    ("fleetlearn/v1/f1/plan/1/2", "plan topic has 0 or 1 levels"),
    ("fleetlearn/v1/f1/status", "status topic has 1 levels after the channel, got 0"),
])
def test_malformed_topics_are_refused_naming_the_level(topic, match):
    with pytest.raises(WireFormatError, match=match):
        parse_topic(topic)


def test_builders_refuse_ids_that_would_break_a_topic():
    with pytest.raises(WireFormatError, match="'/'"):
        up_topic("f1", "dev/1", MessageKind.READY)
    with pytest.raises(WireFormatError, match="chunk_index"):
        model_topic("f1", -1)
    with pytest.raises(WireFormatError, match="must be a str"):
        parse_topic(b"fleetlearn/v1/f1/plan")


ENV = Envelope(1, MessageKind.MASKED_INPUT, "f1", bytes(32), 3, 3, "dev-1", 5, b"...")


def test_matching_topic_header_and_body_pass():
    check_sender(parse_topic(up_topic("f1", "dev-1", MessageKind.MASKED_INPUT)), ENV, "dev-1")
    down = Envelope(1, MessageKind.SURVIVOR_SET, "f1", bytes(32), 3, 3, "aggregator", 5, b"...")
    check_sender(parse_topic(down_topic("f1", "dev-1")), down, "aggregator")


@pytest.mark.parametrize("topic,body,match", [
    (up_topic("f1", "dev-2", MessageKind.MASKED_INPUT), "dev-1", "topic device 'dev-2' differs from envelope sender"),
    (up_topic("f1", "dev-1", MessageKind.MASKED_INPUT), "dev-2", "differs from the signed body's sender 'dev-2'"),
    (up_topic("f2", "dev-1", MessageKind.MASKED_INPUT), "dev-1", "topic fleet 'f2' differs"),
    (up_topic("f1", "dev-1", MessageKind.READY), "dev-1", "topic kind READY differs from envelope kind MASKED_INPUT"),
    (status_topic("f1", "dev-9"), "dev-1", "topic device 'dev-9'"),
    (down_topic("f1", "dev-1"), "aggregator", "envelope sender 'dev-1' differs"),
])
def test_any_mismatch_is_refused_before_a_handler_runs(topic, body, match):
    with pytest.raises(SenderMismatchError, match=match):
        check_sender(parse_topic(topic), ENV, body)


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=None)
def test_random_topics_raise_only_wire_format_error_and_accepted_ones_are_canonical(tail):
    for topic in (tail, "fleetlearn/v1/" + tail, "fleetlearn/v1/f1/up/" + tail):
        try:
            parsed = parse_topic(topic)
        except WireFormatError:
            continue
        assert str(parsed) == topic
