"""The ``Transport`` the round pump runs on over MQTT: unicasts through a ``ReliableChannel``, broadcasts retained.

Why one adapter: the pump's router hands over (topic, envelope bytes, retain) and wants the same
back, while the reliable channel wants (topic, party, kind, payload) and delivers envelopes. Here:

* **unicasts** (uplinks, downlinks) go through the channel: chunked, acknowledged by signed
  receipts, retransmitted, deduplicated. The router's envelope is unpacked and its kind, session,
  round and stage are carried by the channel's own envelope (one envelope on the wire, not two);
* **broadcasts** (plan, model, enrolment directory) are retained, one MQTT topic per chunk
  (``model/0``, ``model/1``, ...) because a broker retains only a topic's last message; a chunk
  index left over from a longer earlier broadcast is cleared (an empty retained payload). A device
  reassembles them by digest, so a late joiner gets the whole current model from the broker;
* **status** topics (``online`` / the ``offline`` last will) are not messages: they are kept in
  ``statuses`` for the shell, so the aggregator learns of a dropout the moment the broker does.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.base import Transport
from edge_sdk.transport.reliable import ReliableChannel
from edge_sdk.transport.retransmission import RetransmitPolicy
from edge_sdk.wire.chunking import Reassembler, split
from edge_sdk.wire.envelope import MessageKind, decode_envelope, encode_envelope
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES, WireLimits
from edge_sdk.wire.topics import Channel, down_topic, parse_topic, up_topic

log = logging.getLogger(__name__)

AGGREGATOR_PARTY = "aggregator"  # edge_sdk.protocol.routing.AGGREGATOR_ID: the envelope sender of the aggregator
BROADCAST_CHANNELS = (Channel.PLAN, Channel.MODEL, Channel.DIRECTORY)
_WAKE_S = 0.02  # a broadcast that arrives while the channel waits for unicasts is handed over this late at most


class _Diverting:
    """The channel's view of the connection: broadcasts and statuses are taken out before it sees them."""

    def __init__(self, inner: Transport, owner: RoundTransport) -> None:
        self.inner = inner
        self.owner = owner

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> object:
        return self.inner.publish(topic, payload, retain=retain)

    def left(self, handle: object) -> bool:
        left = getattr(self.inner, "left", None)
        return True if left is None else left(handle)

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def close(self) -> None:
        self.inner.close()

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.inner.poll(timeout) if not self.owner.divert(t, p)]


class RoundTransport:
    """One party's round traffic over one connection (``inner``, usually an ``MqttTransport``).

    ``peer_key(id)`` is the enrolled key of a party (the aggregator's for a device), used to verify
    receipts. ``limits`` bound reassembly for the whole run, so they must cover the largest round.
    """

    def __init__(self, inner: Transport, *, me: str, fleet: str, identity: IdentityKey,
                 peer_key: Callable[[str], bytes | None], limits: WireLimits,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, policy: RetransmitPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.me = me
        self.fleet = fleet
        self.limits = limits
        self.max_payload = min(max_payload, limits.max_payload_bytes)
        self._clock = clock
        self._is_aggregator = me == AGGREGATOR_PARTY
        self._broadcast_chunks: dict[str, int] = {}  # base topic -> chunks last published there
        self._broadcast_in = Reassembler(limits)
        self._broadcasts: deque[tuple[str, bytes]] = deque()
        self.statuses: dict[str, bytes] = {}  # device id -> its last status payload (online / offline)
        self.status_changes: deque[tuple[str, bytes]] = deque()  # for the shell to drain
        self.bytes_in = 0
        self.bytes_out = 0
        self.channel = ReliableChannel(
            _Diverting(inner, self), me=me, fleet=fleet, identity=identity, peer_key=peer_key,
            receipt_topic=self._receipt_topic, origin_of=self._origin_of, limits=limits,
            max_payload=self.max_payload, policy=policy, clock=clock)

    # -- topics ----------------------------------------------------------------------------------

    def _receipt_topic(self, party: str) -> str:
        if self._is_aggregator:
            return down_topic(self.fleet, party)
        return up_topic(self.fleet, self.me, MessageKind.RECEIPT)

    def _origin_of(self, topic: str) -> str | None:
        try:
            parsed = parse_topic(topic)
        except WireFormatError:
            return None
        if parsed.fleet != self.fleet:
            return None
        if self._is_aggregator:
            return parsed.device_id if parsed.channel is Channel.UP else None
        if parsed.channel is Channel.DOWN and parsed.device_id == self.me:
            return AGGREGATOR_PARTY
        return None

    # -- Transport -------------------------------------------------------------------------------

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """``payload`` is an encoded envelope from the router; retained ones are broadcasts."""
        self.bytes_out += len(payload)
        if retain:
            self._publish_broadcast(topic, payload)
            return
        envelope = decode_envelope(payload, self.limits)
        to = AGGREGATOR_PARTY if not self._is_aggregator else parse_topic(topic).device_id
        self.channel.send(topic, to=to, kind=envelope.kind, payload=envelope.payload, session=envelope.session,
                          round_index=envelope.round_index, stage=envelope.stage)

    def _publish_broadcast(self, topic: str, payload: bytes) -> None:
        chunks = split(payload, self.max_payload)
        for index, chunk in enumerate(chunks):
            self.inner.publish(f"{topic}/{index}", chunk, retain=True)
        for stale in range(len(chunks), self._broadcast_chunks.get(topic, 0)):
            self.inner.publish(f"{topic}/{stale}", b"", retain=True)  # an empty retained message clears the topic
        self._broadcast_chunks[topic] = len(chunks)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        """Whole messages as (topic, envelope bytes): unicasts once each, broadcasts when complete."""
        deadline = self._clock() + max(0.0, timeout)
        while True:
            remaining = deadline - self._clock()
            deliveries = self.channel.poll(max(0.0, min(_WAKE_S, remaining)))
            out = [(d.topic, encode_envelope(d.envelope)) for d in deliveries]
            while self._broadcasts:
                out.append(self._broadcasts.popleft())
            if out or remaining <= 0:
                for _, data in out:
                    self.bytes_in += len(data)
                return out

    def quiet(self, now: float) -> bool:
        """True when ``poll(0)`` would do nothing: no input buffered, no retransmission or give-up due.

        Why: a simulator driving hundreds of connections from one loop polls only the ones with
        work after each pass, instead of walking every channel's schedule every few milliseconds.
        Transports that cannot tell (no ``has_input``) are never quiet.
        """
        if self._broadcasts or getattr(self.inner, "has_input", True):
            return False
        wakeup = self.channel.next_wakeup()
        return wakeup is None or wakeup > now

    def close(self) -> None:
        self.inner.close()

    # -- diverted traffic ------------------------------------------------------------------------

    def divert(self, topic: str, payload: bytes) -> bool:
        """Take broadcasts and statuses out of the channel's stream; True if ``topic`` was one."""
        try:
            parsed = parse_topic(topic)
        except WireFormatError:
            return False
        if parsed.fleet != self.fleet:
            return False
        if parsed.channel is Channel.STATUS:
            if parsed.device_id != self.me:
                self.statuses[parsed.device_id] = bytes(payload)
                self.status_changes.append((parsed.device_id, bytes(payload)))
            return True
        if parsed.channel not in BROADCAST_CHANNELS:
            return False
        if self._is_aggregator or not payload:
            return True  # the aggregator's own retained broadcasts, or a cleared chunk topic
        try:
            data = self._broadcast_in.add(AGGREGATOR_PARTY, payload, now=self._clock())
        except WireFormatError as exc:
            log.warning("refused a broadcast chunk on %s: %s", topic, exc)
            return True
        if data is not None:
            base = topic if parsed.chunk_index is None else topic.rpartition("/")[0]
            self._broadcasts.append((base, data))
        return True

    @property
    def pending(self) -> int:
        """Unicasts still awaiting a receipt."""
        return self.channel.pending
