"""Between machines and transports: sends become (topic, envelope bytes), received bytes become messages.

Why one module for both directions: the pump, the service and the simulator must put each message
on the same topic, in the same envelope, and refuse the same things on the way in. Topics follow
the fleet layout: device → aggregator on ``fleetlearn/v1/<fleet>/up/<device>/<kind>``, aggregator →
one device on ``.../down/<device>``, the plan and the model retained on ``.../plan`` and ``.../model``.

On the way in, before any handler runs: the envelope is decoded strictly under the round's
``WireLimits``, its fleet must be ours, its kind must match the topic, and on an uplink the topic's
device id, the envelope sender and the body's sender must be one id (the machine then checks the
body's signature against that id's enrolled key). Downlinks must come from the aggregator's id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.messages import Decline, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan, check_identifier
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, decode_envelope, encode_envelope
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES, WireLimits
from edge_sdk.wire.secagg_payload import SECAGG_KINDS, body_sender_of, decode_secagg, encode_secagg
from edge_sdk.wire.sender_check import check_sender
from edge_sdk.wire.topics import (
    Channel,
    aggregator_subscriptions,
    device_subscriptions,
    down_topic,
    model_topic,
    parse_topic,
    plan_topic,
    up_topic,
)

AGGREGATOR_ID = "aggregator"  # the envelope sender of everything the aggregator publishes
BROADCAST = "*"  # Send.to for the retained plan and model topics


class RoutingError(FleetlearnError, ValueError):
    """A message is refused before any handler: wrong topic, fleet, kind or direction."""


@dataclass(frozen=True)
class Send:
    """One outgoing message: ``to`` a device id, ``AGGREGATOR_ID``, or ``BROADCAST`` (plan, model)."""

    to: str
    message: Any


@dataclass(frozen=True)
class Received:
    """A message that passed the envelope and sender checks, with its envelope header."""

    sender: str
    message: Any
    envelope: Envelope


_ROUND_KINDS: dict[type, MessageKind] = {RoundPlan: MessageKind.PLAN, Ready: MessageKind.READY,
                                         Decline: MessageKind.DECLINE, ModelRelease: MessageKind.MODEL}
_ROUND_DECODERS: dict[MessageKind, Callable[[bytes], Any]] = {
    MessageKind.PLAN: RoundPlan.from_bytes, MessageKind.READY: Ready.from_bytes,
    MessageKind.DECLINE: Decline.from_bytes, MessageKind.MODEL: ModelRelease.from_bytes,
}
_UPLINK = {MessageKind.ADVERTISE_KEYS, MessageKind.SHARE_KEYS, MessageKind.MASKED_INPUT,
           MessageKind.CONSISTENCY_CHECK, MessageKind.UNMASK_SHARES, MessageKind.READY, MessageKind.DECLINE}
_STAGE_OF = {MessageKind.ROUND_START: 1, MessageKind.ADVERTISE_KEYS: 1, MessageKind.ROSTER: 1,
             MessageKind.SHARE_KEYS: 2, MessageKind.SHARE_RELAY: 2, MessageKind.MASKED_INPUT: 3,
             MessageKind.SURVIVOR_SET: 3, MessageKind.CONSISTENCY_CHECK: 4, MessageKind.UNMASK_REQUEST: 4,
             MessageKind.UNMASK_SHARES: 5}


def kind_of(message: Any) -> MessageKind:
    kind = _ROUND_KINDS.get(type(message)) or SECAGG_KINDS.get(type(message))
    if kind is None:
        raise RoutingError(f"{type(message).__name__} is not a message that travels")
    return kind


def body_sender(message: Any) -> str:
    """The id whose key signs the body: a device's for uplinks, the aggregator's for everything else."""
    if isinstance(message, (Ready, Decline)):
        return message.device_id
    return body_sender_of(message) or AGGREGATOR_ID


def _session_of(message: Any) -> bytes:
    session = getattr(message, "session_id", None)
    return session if isinstance(session, bytes) and len(session) == 32 else NO_SESSION


def _round_of(message: Any) -> int:
    if isinstance(message, ModelRelease):
        return message.version
    return int(getattr(message, "round_index", 0))


class Router:
    """One endpoint's side of the routing: ``outgoing`` for its sends, ``incoming`` for what it polls.

    ``limits`` are the current round's (``limits_for_plan``): they bound decoding and give the bits at
    which masked vectors are packed; a shell sets them anew when a plan with other terms arrives.
    """

    def __init__(self, fleet: str, me: str, limits: WireLimits) -> None:
        self.fleet = check_identifier(fleet, "fleet")
        self.me = check_identifier(me, "endpoint id")
        self.limits = limits
        self._sequence = 0

    @property
    def is_aggregator(self) -> bool:
        return self.me == AGGREGATOR_ID

    def subscriptions(self) -> tuple[str, ...]:
        if self.is_aggregator:
            return aggregator_subscriptions(self.fleet)
        return device_subscriptions(self.fleet, self.me)

    def outgoing(self, send: Send) -> tuple[str, bytes, bool]:
        """(topic, envelope bytes, retain) for one send."""
        kind = kind_of(send.message)
        if send.to == BROADCAST:
            if kind not in (MessageKind.PLAN, MessageKind.MODEL):
                raise RoutingError(f"only the plan and the model are broadcast, not {kind.name}")
            topic = plan_topic(self.fleet) if kind is MessageKind.PLAN else model_topic(self.fleet)
            retain = True
        elif self.is_aggregator:
            if kind in _UPLINK:
                raise RoutingError(f"the aggregator does not send {kind.name}")
            topic, retain = down_topic(self.fleet, send.to), False
        else:
            if send.to != AGGREGATOR_ID or kind not in _UPLINK:
                raise RoutingError(f"a device sends only uplink kinds to the aggregator, not {kind.name} "
                                   f"to {send.to!r}")
            topic, retain = up_topic(self.fleet, self.me, kind), False
        if kind in _ROUND_DECODERS:
            payload = send.message.to_bytes()
        else:
            payload = encode_secagg(send.message, self.limits.bits)[1]
        self._sequence += 1
        envelope = Envelope(WIRE_VERSION, kind, self.fleet, _session_of(send.message), _round_of(send.message),
                            _STAGE_OF.get(kind, 0), self.me, self._sequence, payload)
        return topic, encode_envelope(envelope), retain

    def incoming(self, topic: str, data: bytes) -> Received:
        """Decode and check one received message; raises a ``FleetlearnError`` subclass naming what is wrong."""
        parsed = parse_topic(topic)
        envelope = decode_envelope(data, self.limits)
        if parsed.fleet != self.fleet:
            raise RoutingError(f"message for fleet {parsed.fleet!r} arrived in fleet {self.fleet!r}")
        expected_channel = {MessageKind.PLAN: Channel.PLAN, MessageKind.MODEL: Channel.MODEL}.get(
            envelope.kind, Channel.UP if envelope.kind in _UPLINK else Channel.DOWN)
        if parsed.channel is not expected_channel:
            raise RoutingError(f"{envelope.kind.name} arrived on a {parsed.channel.value} topic ({topic!r})")
        if parsed.channel is Channel.DOWN and parsed.device_id != self.me:
            raise RoutingError(f"downlink for {parsed.device_id!r} arrived at {self.me!r}")
        if envelope.kind in _ROUND_DECODERS:
            message = _ROUND_DECODERS[envelope.kind](envelope.payload)
        else:
            message = decode_secagg(envelope.kind, envelope.payload, self.limits)
        sender = body_sender(message)
        check_sender(parsed, envelope, sender)
        return Received(sender, message, envelope)


def limits_for_plan(plan: RoundPlan, cohort_size: int) -> WireLimits:
    """The wire limits of ``plan``'s round: vectors of its padded length at its bits, its model's size."""
    return limits_for(plan.vector_length, plan.encoding.bits, cohort_size, 4 * plan.encoding.dim)


def limits_for(vector_length: int, bits: int, cohort_size: int, model_bytes: int,
               max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> WireLimits:
    """Wire limits from plain numbers; the model payload gets room for its signed header.

    ``max_payload_bytes`` is the broker's per-message cap; smaller chunks mean more of them per message.
    """
    return WireLimits.for_plan(vector_length=vector_length, bits=bits, cohort_size=cohort_size,
                               model_bytes=model_bytes + 1024, max_payload_bytes=max_payload_bytes)
