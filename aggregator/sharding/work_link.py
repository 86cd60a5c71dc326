"""One MQTT connection carrying a shard party's round traffic and its work traffic, and the router for both.

Why split here: round traffic (RoundStart, relays, device uplinks and receipts) must go through the
``RoundTransport``'s reliable channel exactly as the single aggregator's does, while tasks, results
and worker statuses are coordinator ↔ worker messages the channel does not know. ``WorkLink`` takes
the work topics out of the stream before the round transport (and the coordinator's flood guard)
sees them; ``ShardTransport`` is what the pump publishes to and polls: work topics go straight to
MQTT (results chunked like every payload, tasks in one frame, because on a shared subscription
each frame may go to another worker), the rest to the round transport.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from aggregator.sharding.coordinator_round import WORK
from aggregator.sharding.work_messages import Task, TaskResult, WorkMessageError
from aggregator.sharding.worker_round import COORDINATOR
from edge_sdk.protocol.routing import Received, Router, RoutingError, Send
from edge_sdk.transport.round_transport import RoundTransport
from edge_sdk.wire.chunking import Reassembler, split
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, decode_envelope, encode_envelope
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES, WireLimits
from edge_sdk.wire.topics import Channel, parse_topic, result_topic, work_topic

WORK_CHANNELS = (Channel.WORK, Channel.RESULT, Channel.WORKER)


def _work_channel(topic: str) -> Channel | None:
    try:
        channel = parse_topic(topic).channel
    except WireFormatError:
        return None
    return channel if channel in WORK_CHANNELS else None


class WorkLink:
    """The connection below the round transport; ``round_view`` is what the round transport is built on."""

    def __init__(self, mqtt: Any, limits: WireLimits | None = None,
                 subscribe_filter: Callable[[str], tuple[str, ...]] = lambda p: (p,),
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.mqtt = mqtt
        self.limits = limits
        self.max_payload = max_payload
        self.subscribe_filter = subscribe_filter
        self.inbox: deque[tuple[str, bytes]] = deque()
        self.statuses: dict[str, bytes] = {}
        self.status_changes: deque[tuple[str, bytes]] = deque()
        self._reassembler: Reassembler | None = None
        self.refused: list[str] = []
        self.round_view = _RoundView(self)

    def take(self, topic: str, payload: bytes) -> bool:
        """Keep work traffic for ``drain``; True if ``topic`` was work traffic."""
        channel = _work_channel(topic)
        if channel is None:
            return False
        if channel is Channel.WORKER:
            worker = parse_topic(topic).device_id
            if payload:
                self.statuses[worker] = bytes(payload)
                self.status_changes.append((worker, bytes(payload)))
            return True
        if self._reassembler is None:
            self._reassembler = Reassembler(self.limits)
        try:
            whole = self._reassembler.add(topic, payload, now=0.0)
        except WireFormatError as exc:
            self.refused.append(f"{topic}: {exc}")
            return True
        if whole is not None:
            self.inbox.append((topic, whole))
        return True

    def drain(self) -> list[tuple[str, bytes]]:
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def publish_work(self, topic: str, payload: bytes) -> None:
        frames = split(payload, self.max_payload)
        if parse_topic(topic).channel is Channel.WORK and len(frames) > 1:
            raise RoutingError(f"a task of {len(payload)} B does not fit one {self.max_payload} B frame: a shared "
                               "subscription could hand its frames to different workers; use fewer devices per task")
        for frame in frames:
            self.mqtt.publish(topic, frame)

    def subscribe_direct(self, pattern: str) -> None:
        self.mqtt.subscribe(pattern)


class _RoundView:
    """What the round transport sees: the connection without the work topics, subscriptions filtered."""

    def __init__(self, link: WorkLink) -> None:
        self.link = link

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> object:
        return self.link.mqtt.publish(topic, payload, retain=retain)

    def subscribe(self, pattern: str) -> None:
        for mapped in self.link.subscribe_filter(pattern):
            self.link.mqtt.subscribe(mapped)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.link.mqtt.poll(timeout) if not self.link.take(t, p)]

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.link.mqtt.close(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # left, has_input, ready, wait_ready, flush, statuses of paho
        return getattr(self.link.mqtt, name)


class ShardTransport:
    """The pump's transport: work topics straight to the link, the rest through the round transport."""

    def __init__(self, rounds: RoundTransport | Any, link: WorkLink) -> None:
        self.rounds = rounds
        self.link = link

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if _work_channel(topic) is not None:
            self.link.publish_work(topic, payload)
        else:
            self.rounds.publish(topic, payload, retain=retain)

    def subscribe(self, pattern: str) -> None:
        if _work_channel(pattern.split("/", 2)[-1] if pattern.startswith("$share/") else pattern) is not None:
            self.link.subscribe_direct(pattern)
        else:
            self.rounds.subscribe(pattern)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        return self.rounds.poll(timeout) + self.link.drain()

    def close(self) -> None:
        self.rounds.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rounds, name)


class ShardRouter(Router):
    """``Router`` plus tasks (to ``WORK``) and results (to ``COORDINATOR``); ``subscriptions`` given by the shell."""

    def __init__(self, fleet: str, me: str, limits: WireLimits, *, worker_id: str | None = None,
                 subscriptions: tuple[str, ...] | None = None) -> None:
        super().__init__(fleet, me, limits)
        self.worker_id = worker_id
        self._subscriptions = subscriptions

    def subscriptions(self) -> tuple[str, ...]:
        return self._subscriptions if self._subscriptions is not None else super().subscriptions()

    def outgoing(self, send: Send) -> tuple[str, bytes, bool]:
        if send.to == WORK and isinstance(send.message, Task):
            task = send.message
            return work_topic(self.fleet, task.worker or None), self._wrap(MessageKind.TASK, task.round_index,
                                                                           task.to_bytes()), False
        if send.to == COORDINATOR and isinstance(send.message, TaskResult):
            result = send.message
            return result_topic(self.fleet, self.worker_id), self._wrap(MessageKind.TASK_RESULT, result.round_index,
                                                                        result.to_bytes()), False
        return super().outgoing(send)

    def _wrap(self, kind: MessageKind, round_index: int, payload: bytes) -> bytes:
        self._sequence += 1
        sender = self.worker_id or self.me
        return encode_envelope(Envelope(WIRE_VERSION, kind, self.fleet, NO_SESSION, round_index, 0, sender,
                                        self._sequence, payload))

    def incoming(self, topic: str, data: bytes) -> Received:
        channel = _work_channel(topic)
        if channel is None:
            return super().incoming(topic, data)
        parsed = parse_topic(topic)
        envelope = decode_envelope(data, self.limits)
        if parsed.fleet != self.fleet or envelope.fleet != self.fleet:
            raise RoutingError(f"work message for fleet {parsed.fleet!r} arrived in fleet {self.fleet!r}")
        try:
            if channel is Channel.WORK and envelope.kind is MessageKind.TASK:
                return Received(envelope.sender, Task.from_bytes(envelope.payload), envelope)
            if channel is Channel.RESULT and envelope.kind is MessageKind.TASK_RESULT:
                result = TaskResult.from_bytes(envelope.payload)
                if result.worker != parsed.device_id or envelope.sender != parsed.device_id:
                    raise RoutingError(f"result on {topic!r} names worker {result.worker!r}")
                return Received(result.worker, result, envelope)
        except WorkMessageError as exc:
            raise RoutingError(f"{topic}: {exc}") from None
        raise RoutingError(f"{envelope.kind.name} arrived on a {channel.value} topic ({topic!r})")
