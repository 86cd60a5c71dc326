"""An in-process broker and transport with a virtual clock and fault hooks: drop, duplicate, reorder, tamper.

Why: tests, the example and the in-memory session driver run whole rounds without a broker, and
must be able to break delivery the way a real network does. ``MemoryBroker`` routes publishes to
every matching subscription (MQTT wildcards ``+`` and ``#``) and keeps retained messages, which a
new subscriber receives at once, as MQTT does. ``Fault`` hooks see each delivery ``(topic, payload)``
and return the payloads to deliver: none (drop), two (duplicate) or altered bytes (tamper);
``reorder`` shuffles each inbox at poll time with a seeded generator. Nothing here reads a clock:
``VirtualClock`` is advanced explicitly by the pump.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_sdk.transport.base import TransportError

Fault = Callable[[str, bytes], list[bytes]]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching: ``+`` one level, ``#`` the rest (last level only)."""
    p_levels, t_levels = pattern.split("/"), topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels) or (p != "+" and p != t_levels[i]):
            return False
    return len(p_levels) == len(t_levels)


@dataclass
class VirtualClock:
    """Seconds since the start of a simulation; only ``advance_to`` moves it."""

    now_s: float = 0.0

    def now(self) -> float:
        return self.now_s

    def advance_to(self, t: float) -> None:
        self.now_s = max(self.now_s, t)

    def wait(self, seconds: float) -> None:
        """The pump's idle wait: virtual time simply jumps."""
        self.now_s += max(0.0, seconds)


@dataclass
class BrokerStats:
    """What went through the broker: for tests and byte counts."""

    published: int = 0
    delivered: int = 0
    dropped: int = 0
    bytes_by_sender: dict[str, int] = field(default_factory=dict)


class MemoryBroker:
    """Routes publishes to subscribed ``MemoryTransport``s; ``faults`` and ``reorder`` break delivery on purpose."""

    def __init__(self, faults: list[Fault] | None = None, reorder_seed: int | None = None) -> None:
        self.faults: list[Fault] = list(faults or [])
        self.reorder = random.Random(reorder_seed) if reorder_seed is not None else None
        self.retained: dict[str, bytes] = {}
        self.stats = BrokerStats()
        self._clients: dict[str, MemoryTransport] = {}
        self.published_log: list[tuple[str, str, bytes]] = []  # (client id, topic, payload) in publish order
        self.publish_hooks: list[Callable[[str, str, bytes], None]] = []  # observe every publish as it happens

    def connect(self, client_id: str) -> MemoryTransport:
        if client_id in self._clients and not self._clients[client_id].closed:
            raise TransportError(f"client id {client_id!r} is already connected to this broker")
        transport = MemoryTransport(self, client_id)
        self._clients[client_id] = transport
        return transport

    def _publish(self, sender: str, topic: str, payload: bytes, retain: bool) -> None:
        if "+" in topic or "#" in topic:
            raise TransportError(f"cannot publish to a wildcard topic {topic!r}")
        self.stats.published += 1
        self.stats.bytes_by_sender[sender] = self.stats.bytes_by_sender.get(sender, 0) + len(payload)
        self.published_log.append((sender, topic, payload))
        for hook in self.publish_hooks:
            hook(sender, topic, payload)
        if retain:
            self.retained[topic] = payload
        for client in self._clients.values():
            if not client.closed and any(topic_matches(p, topic) for p in client.patterns):
                self._deliver(client, topic, payload)

    def _deliver(self, client: MemoryTransport, topic: str, payload: bytes) -> None:
        payloads = [payload]
        for fault in self.faults:
            payloads = [out for p in payloads for out in fault(topic, p)]
        if not payloads:
            self.stats.dropped += 1
        for p in payloads:
            client.inbox.append((topic, p))
            self.stats.delivered += 1

    def _subscribe(self, client: MemoryTransport, pattern: str) -> None:
        for topic, payload in self.retained.items():
            if topic_matches(pattern, topic):
                self._deliver(client, topic, payload)


class MemoryTransport:
    """One client of a ``MemoryBroker``; implements ``edge_sdk.transport.base.Transport``."""

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.patterns: list[str] = []
        self.inbox: list[tuple[str, bytes]] = []
        self.closed = False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.closed:
            raise TransportError(f"transport {self.client_id!r} is closed")
        self.broker._publish(self.client_id, topic, bytes(payload), retain)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        """Everything delivered since the last poll; never waits (the clock is virtual)."""
        if self.closed:
            raise TransportError(f"transport {self.client_id!r} is closed")
        out, self.inbox = self.inbox, []
        if self.broker.reorder is not None:
            self.broker.reorder.shuffle(out)
        return out

    def subscribe(self, pattern: str) -> None:
        if self.closed:
            raise TransportError(f"transport {self.client_id!r} is closed")
        self.patterns.append(pattern)
        self.broker._subscribe(self, pattern)

    def close(self) -> None:
        self.closed = True
        self.inbox = []


def drop_where(predicate: Callable[[str, bytes], bool]) -> Fault:
    """A fault that drops every delivery the predicate selects."""
    return lambda topic, payload: [] if predicate(topic, payload) else [payload]


def duplicate_where(predicate: Callable[[str, bytes], bool]) -> Fault:
    """A fault that delivers the selected messages twice (MQTT QoS 1 redelivery)."""
    return lambda topic, payload: [payload, payload] if predicate(topic, payload) else [payload]


def tamper_where(predicate: Callable[[str, bytes], bool], change: Callable[[bytes], bytes]) -> Fault:
    """A fault that rewrites the selected payloads in flight."""
    return lambda topic, payload: [change(payload)] if predicate(topic, payload) else [payload]
