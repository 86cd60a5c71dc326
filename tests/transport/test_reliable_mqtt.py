"""ReliableChannel through a real Mosquitto: chunked delivery, lost receipts, forged receipts, impostors."""

from __future__ import annotations

import hashlib
import os
import time

from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.receipt import Receipt, sign_receipt
from edge_sdk.transport.retransmission import RetransmitPolicy
from edge_sdk.wire.chunking import split
from edge_sdk.wire.envelope import WIRE_VERSION, Envelope, MessageKind, encode_envelope

from .reliable_parties import AGGREGATOR, FLEET, Fleet, aggregator_channel, device_channel, down, limits, up

FAST = RetransmitPolicy(initial_s=0.2, multiplier=1.5, maximum_s=0.4, jitter=0.2, deadline_s=1.6)
PAYLOAD = 16 * 1024


def parties(broker, devices=("dev-1",), policy=FAST, **kwargs):
    fleet = Fleet({name: IdentityKey.generate() for name in (AGGREGATOR, *devices)})
    loop = MqttLoop()
    lim = limits(len(devices), 300_000, PAYLOAD)
    agg = aggregator_channel(broker.url, loop, fleet, lim, PAYLOAD, policy, **kwargs)
    devs = [device_channel(broker.url, loop, fleet, d, lim, PAYLOAD, policy) for d in devices]
    for channel in (agg, *devs):
        assert channel.transport.wait_ready(10)
    return fleet, loop, agg, devs


def drive(loop, channels, until, timeout=15.0):
    got = {id(c): [] for c in channels}

    def step():
        for c in channels:
            got[id(c)].extend(c.poll(0))
        return until(got)

    deadline = time.monotonic() + timeout
    while not step():  # short slices: the loop does not know the channels' retransmission timers
        assert time.monotonic() < deadline, f"timed out; counters {[dict(c.counters) for c in channels]}"
        loop.run_once(0.02)
    return got


def test_a_chunked_message_arrives_once_and_its_receipt_stops_retransmission(broker):
    _, loop, agg, (dev,) = parties(broker)
    message = os.urandom(300_000)
    sequence = dev.send(up("dev-1", "masked_input"), to=AGGREGATOR, kind=MessageKind.MASKED_INPUT,
                        payload=message, session=b"s" * 32, round_index=3, stage=6)
    assert dev.counters["chunks_sent"] == len(split(b"x" * 300_100, PAYLOAD)) == 19
    got = drive(loop, [agg, dev], lambda g: g[id(agg)] and dev.pending == 0)
    (delivery,) = got[id(agg)]
    env = delivery.envelope
    assert (env.sender, env.sequence, env.round_index, env.stage, env.payload) == ("dev-1", sequence, 3, 6, message)
    assert delivery.topic == up("dev-1", "masked_input")
    assert dev.counters["receipts_accepted"] == 1 and agg.counters["delivered"] == 1
    loop.run(0.5)  # past the first retransmission time: nothing is sent again
    assert dev.counters["retransmissions"] == 0 and agg.counters["duplicates"] == 0


def test_lost_receipts_mean_retransmissions_that_are_delivered_once_then_the_sender_gives_up(broker):
    # the aggregator's receipts go to a topic nobody reads: every one of them is lost
    _, loop, agg, (dev,) = parties(broker, receipt_topic=lambda peer: "nowhere/receipts")
    dev.send(up("dev-1", "ready"), to=AGGREGATOR, kind=MessageKind.READY, payload=b"ready")
    got = drive(loop, [agg, dev], lambda g: dev.gave_up, timeout=10)
    assert [d.envelope.payload for d in got[id(agg)]] == [b"ready"]
    assert agg.counters["duplicates"] == dev.counters["retransmissions"] >= 3
    assert agg.counters["receipts_sent"] == 1 + agg.counters["duplicates"]  # every copy acknowledged again
    assert dev.gave_up[0].attempts == 1 + dev.counters["retransmissions"] and dev.pending == 0


def test_a_forged_receipt_does_not_stop_retransmission(broker):
    fleet, loop, agg, (dev,) = parties(broker, receipt_topic=lambda peer: "nowhere/receipts")
    sequence = dev.send(up("dev-1", "ready"), to=AGGREGATOR, kind=MessageKind.READY, payload=b"ready")
    drive(loop, [agg, dev], lambda g: g[id(agg)])
    # a forger who read the message knows its digest, but signs with a key that is not the aggregator's
    env = Envelope(WIRE_VERSION, MessageKind.READY, FLEET, bytes(32), 0, 0, "dev-1", sequence, b"ready")
    digest = hashlib.sha256(encode_envelope(env)).digest()
    forged = sign_receipt(IdentityKey.generate(), Receipt(AGGREGATOR, "dev-1", bytes(32), MessageKind.READY,
                                                          sequence, digest))
    ack = Envelope(WIRE_VERSION, MessageKind.RECEIPT, FLEET, bytes(32), 0, 0, AGGREGATOR, sequence, forged)
    agg.transport.publish(down("dev-1"), split(encode_envelope(ack), PAYLOAD)[0])
    drive(loop, [agg, dev], lambda g: dev.counters["receipts_refused"] >= 1)
    assert dev.pending == 1
    retransmissions = dev.counters["retransmissions"]
    drive(loop, [agg, dev], lambda g: dev.counters["retransmissions"] > retransmissions)
    # the genuine receipt, signed by the enrolled key, does stop it
    genuine = sign_receipt(fleet.keys[AGGREGATOR], Receipt(AGGREGATOR, "dev-1", bytes(32), MessageKind.READY,
                                                           sequence, digest))
    ack = Envelope(WIRE_VERSION, MessageKind.RECEIPT, FLEET, bytes(32), 0, 0, AGGREGATOR, sequence, genuine)
    agg.transport.publish(down("dev-1"), split(encode_envelope(ack), PAYLOAD)[0])
    drive(loop, [agg, dev], lambda g: dev.pending == 0)
    assert dev.counters["receipts_accepted"] == 1 and not dev.gave_up


def test_an_envelope_speaking_for_another_device_is_refused_before_dedup(broker):
    _, loop, agg, (mallory, victim) = parties(broker, devices=("mallory", "victim"))
    # mallory publishes on her own uplink (all the ACL allows) an envelope naming the victim as sender,
    # with the sequence the victim will use next: were it accepted, the victim's message would be a "duplicate"
    victim_sequence = victim._next_sequence
    env = Envelope(WIRE_VERSION, MessageKind.READY, FLEET, bytes(32), 0, 0, "victim", victim_sequence, b"fake")
    for chunk in split(encode_envelope(env), PAYLOAD):
        mallory.transport.publish(up("mallory", "ready"), chunk)
    drive(loop, [agg], lambda g: agg.counters["rejected"] == 1)
    victim.send(up("victim", "ready"), to=AGGREGATOR, kind=MessageKind.READY, payload=b"genuine")
    got = drive(loop, [agg, victim], lambda g: g[id(agg)] and victim.pending == 0)
    assert [(d.envelope.sender, d.envelope.payload) for d in got[id(agg)]] == [("victim", b"genuine")]
