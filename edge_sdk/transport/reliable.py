"""Exactly-once delivery of whole messages over any ``Transport``: receipts, retransmission, chunks, dedup.

Why above MQTT's QoS 1: a broker drops QoS 1 messages when a client's queue is full (Mosquitto's
default ``max_queued_messages 1000`` dropped 44% of a 5,000-message burst here), and QoS 1 may
deliver twice. So every message gets a sequence number, travels as ``edge_sdk.wire.chunking``
chunks of at most ``max_payload`` bytes (128 KiB by default, AWS IoT Core's cap), and is sent again
until the receiver's signed receipt arrives or its deadline passes. The receiver reassembles and
digest-checks chunks, deduplicates whole messages by (sender, session, kind, sequence), and
acknowledges every copy it gets, so a lost receipt only costs one more retransmission.

Trust: the reassembly and the dedup are keyed by the party the topic belongs to (``origin_of``,
which the broker ACL vouches for), and an envelope whose header names anyone else is refused
before it can occupy a dedup slot. Receipts are verified against the addressed party's key, so a
forged receipt does not stop a retransmission. This is the I/O shell; the schedule itself is the
pure ``edge_sdk.transport.retransmission``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edge_sdk.secagg.errors import SignatureError
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.base import Transport
from edge_sdk.transport.receipt import Receipt, decode_receipt, sign_receipt, verify_receipt
from edge_sdk.transport.retransmission import (
    RetransmitPolicy,
    RetransmitState,
    acknowledge,
    due,
    postpone,
    track,
)
from edge_sdk.wire.chunking import Reassembler, parse_chunk, split
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, decode_envelope, encode_envelope
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES, WireLimits

log = logging.getLogger(__name__)

# Whole messages remembered per sender: a device sends at most 16 a round, so this covers the
# retransmissions of the last 16 rounds; older replays carry a stale session and round, which the
# round machines refuse. Bounded small on purpose: the aggregator keeps one window per device, and at
# 4096 entries (about 250 B each) a 1000-device fleet's windows would grow towards 1 GB.
DEDUP_WINDOW_PER_SENDER = 256
_SEQUENCE_BITS = 62  # random start per channel: a rebooted sender never reuses a live sequence


@dataclass(frozen=True)
class Delivery:
    """A new, whole, digest-checked message: the topic it came on and its envelope."""

    topic: str
    envelope: Envelope


@dataclass(frozen=True)
class GaveUp:
    """A message that saw no valid receipt before its deadline."""

    sequence: int
    to: str
    topic: str
    attempts: int


class ReliableChannel:
    """One party's reliable endpoint over ``transport``.

    - ``me``: this party's id (the envelope sender of what it sends, the receiver in its receipts);
    - ``peer_key(id)``: the enrolled Ed25519 public key of a party, or None if unknown;
    - ``receipt_topic(id)``: where receipts to party ``id`` go (device: its own uplink; aggregator:
      the device's downlink);
    - ``origin_of(topic)``: the only party that may publish on ``topic`` (None: not ours).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        me: str,
        fleet: str,
        identity: IdentityKey,
        peer_key: Callable[[str], bytes | None],
        receipt_topic: Callable[[str], str],
        origin_of: Callable[[str], str | None],
        limits: WireLimits,
        max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
        policy: RetransmitPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_sequence: int | None = None,
    ) -> None:
        self.transport = transport
        self.me = me
        self.fleet = fleet
        self._identity = identity
        self._peer_key = peer_key
        self._receipt_topic = receipt_topic
        self._origin_of = origin_of
        self.limits = limits
        self.max_payload = min(max_payload, limits.max_payload_bytes)
        self.policy = policy or RetransmitPolicy()
        self._clock = clock
        self._next_sequence = secrets.randbits(_SEQUENCE_BITS) if first_sequence is None else first_sequence
        self._schedule = RetransmitState()
        self._queued: dict[int, list[object]] = {}  # sequence -> publish handles the broker has not taken yet
        self._reassembler = Reassembler(limits)
        self._seen: dict[str, OrderedDict[tuple[bytes, MessageKind, int], bytes]] = {}
        self.gave_up: list[GaveUp] = []
        self.counters: Counter[str] = Counter()

    # -- sending ---------------------------------------------------------------------------------

    def send(self, topic: str, *, to: str, kind: MessageKind, payload: bytes, session: bytes = NO_SESSION,
             round_index: int = 0, stage: int = 0, deadline: float | None = None) -> int:
        """Send ``payload`` to party ``to`` on ``topic`` until ``to`` acknowledges it; returns its sequence.

        ``deadline`` is on this channel's clock; by default ``policy.deadline_s`` from now.
        """
        sequence = self._next_sequence
        self._next_sequence += 1
        envelope = Envelope(WIRE_VERSION, kind, self.fleet, session, round_index, stage, self.me, sequence, payload)
        data = encode_envelope(envelope)
        chunks = tuple(split(data, self.max_payload))
        self._queued[sequence] = [self.transport.publish(topic, chunk) for chunk in chunks]
        self.counters["sent"] += 1
        self.counters["chunks_sent"] += len(chunks)
        digest = parse_chunk(chunks[0], self.limits).digest  # split already hashed the envelope: not twice
        self._schedule = track(self._schedule, self.policy, sequence=sequence, to=to, topic=topic,
                               digest=digest, chunks=chunks, now=self._clock(),
                               deadline=deadline)
        return sequence

    @property
    def pending(self) -> int:
        """Messages still awaiting a receipt."""
        return len(self._schedule.outgoing)

    def next_wakeup(self) -> float | None:
        """When the schedule next has work (a retransmission or a give-up), on this channel's clock."""
        return min((min(o.next_due, o.deadline) for o in self._schedule.outgoing.values()), default=None)

    def retransmit_due(self) -> None:
        """Send again whatever waited too long for its receipt; give up on what passed its deadline.

        The receipt timer of a message counts from when the broker took it: one still in this
        client's own queue (a burst of thousands of chunks behind an in-flight window of 20) is
        not lost, and sending it again would only lengthen the queue it waits in.
        """
        now = self._clock()
        self._hold_queued(now)
        self._schedule, resend, expired = due(self._schedule, self.policy, now)
        for entry in resend:
            self._queued[entry.sequence] = [self.transport.publish(entry.topic, chunk) for chunk in entry.chunks]
            self.counters["retransmissions"] += 1
            log.debug("retransmitting sequence %d to %s (attempt %d)", entry.sequence, entry.to, entry.attempts)
        for entry in expired:
            self._queued.pop(entry.sequence, None)
            self.gave_up.append(GaveUp(entry.sequence, entry.to, entry.topic, entry.attempts))
            self.counters["gave_up"] += 1
            log.warning("no receipt from %s for sequence %d on %s after %d attempts; gave up at its deadline",
                        entry.to, entry.sequence, entry.topic, entry.attempts)

    def _hold_queued(self, now: float) -> None:
        left = getattr(self.transport, "left", None)
        if left is None:
            self._queued.clear()
            return
        for sequence, handles in list(self._queued.items()):
            entry = self._schedule.outgoing.get(sequence)
            if entry is not None and (entry.next_due > now or now >= entry.deadline):
                continue  # not due yet (checked when it is), or expiring anyway
            if entry is None or all(h is None or left(h) for h in handles):
                del self._queued[sequence]  # acknowledged, or the broker has it: its timer runs
            else:
                self._schedule = postpone(self._schedule, sequence, now + self.policy.wait(sequence, 0))
                self.counters["retransmissions_held"] += 1

    # -- receiving -------------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Delivery]:
        """New messages received within ``timeout`` s (returns as soon as there are some).

        Also retransmits what is due and acknowledges everything whole that arrived, duplicates too.
        """
        deadline = self._clock() + max(0.0, timeout)
        while True:
            self.retransmit_due()
            now = self._clock()
            wait = deadline - now
            next_due = self._schedule.next_due()
            if next_due is not None:
                wait = min(wait, next_due - now)
            deliveries = [d for topic, payload in self.transport.poll(max(0.0, wait))
                          if (d := self._take(topic, payload)) is not None]
            self._reassembler.expire(self._clock())
            if deliveries or self._clock() >= deadline:
                return deliveries

    def _take(self, topic: str, payload: bytes) -> Delivery | None:
        origin = self._origin_of(topic)
        if origin is None:
            self.counters["unroutable"] += 1
            return None
        try:
            data = self._reassembler.add(origin, payload, now=self._clock())
            if data is None:
                return None
            # the chunk that completed the message names its digest, which the reassembler just checked
            digest = parse_chunk(payload, self.limits).digest
            envelope = decode_envelope(data, self.limits)
        except WireFormatError as exc:
            self.counters["rejected"] += 1
            log.warning("refused a message on %s: %s", topic, exc)
            return None
        if envelope.sender != origin or envelope.fleet != self.fleet:
            self.counters["rejected"] += 1
            log.warning("refused a message on %s: its envelope names sender %r of fleet %r, the topic belongs "
                        "to %r of fleet %r", topic, envelope.sender, envelope.fleet, origin, self.fleet)
            return None
        if envelope.kind == MessageKind.RECEIPT:
            self._take_receipt(envelope)
            return None
        seen = self._seen.setdefault(origin, OrderedDict())
        key = (envelope.session, envelope.kind, envelope.sequence)
        previous = seen.get(key)
        if previous is not None and previous != digest:
            self.counters["conflicts"] += 1
            log.warning("%s reused sequence %d for a different %s message; the second one is dropped",
                        origin, envelope.sequence, envelope.kind.name)
            return None
        self._send_receipt(envelope, digest)
        if previous is not None:
            self.counters["duplicates"] += 1
            log.debug("duplicate %s from %s (sequence %d), acknowledged again", envelope.kind.name, origin,
                      envelope.sequence)
            return None
        seen[key] = digest
        if len(seen) > DEDUP_WINDOW_PER_SENDER:
            seen.popitem(last=False)
        self.counters["delivered"] += 1
        return Delivery(topic, envelope)

    def _send_receipt(self, envelope: Envelope, digest: bytes) -> None:
        receipt = Receipt(self.me, envelope.sender, envelope.session, envelope.kind, envelope.sequence, digest)
        body = sign_receipt(self._identity, receipt)
        ack = Envelope(WIRE_VERSION, MessageKind.RECEIPT, self.fleet, envelope.session, envelope.round_index,
                       envelope.stage, self.me, envelope.sequence, body)
        for chunk in split(encode_envelope(ack), self.max_payload):
            self.transport.publish(self._receipt_topic(envelope.sender), chunk)
        self.counters["receipts_sent"] += 1

    def _take_receipt(self, envelope: Envelope) -> None:
        try:
            receipt = decode_receipt(envelope.payload)
            if receipt.receiver != envelope.sender or receipt.sender != self.me:
                raise SignatureError(f"receipt names {receipt.receiver!r} acknowledging {receipt.sender!r}, "
                                     f"but came from {envelope.sender!r} to {self.me!r}")
            key = self._peer_key(receipt.receiver)
            if key is None:
                raise SignatureError(f"receipt from {receipt.receiver!r}, which has no enrolled key")
            verify_receipt(receipt, key)
        except (WireFormatError, SignatureError) as exc:
            self.counters["receipts_refused"] += 1
            log.warning("refused a receipt: %s; the message stays scheduled for retransmission", exc)
            return
        self._schedule, entry = acknowledge(self._schedule, sequence=receipt.sequence, digest=receipt.digest,
                                            receiver=receipt.receiver)
        if entry is not None:
            self._queued.pop(receipt.sequence, None)
        self.counters["receipts_accepted" if entry is not None else "receipts_stale"] += 1
