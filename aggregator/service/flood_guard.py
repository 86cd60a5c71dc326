"""Admit raw MQTT messages per sender before any decoding: a topic the protocol uses, within the sender's rate.

Why here, under the reliable channel: everything above it costs per message (reassembly and
SHA-256, a signed receipt per whole message, decoding, the body's Ed25519 check), so one client
flooding a device's uplink topic could spend the aggregator's CPU and fill its log. The check
below is a topic split and a token bucket: cheap enough to run on every chunk.

Why the rate cannot limit an honest device: a device sends, per round, one message of each uplink
kind (Ready or Decline and the five SecAgg+ answers), one receipt per downlink (RoundStart,
Roster, ShareRelay, SurvivorSet, UnmaskRequest, Abort) and its status, each of at most
``max_chunks`` chunks. ``ROUND_MESSAGES`` bounds that count from above; the burst is four such
rounds at once (every message of a round sent and retransmitted three times in one instant) and
the rate one worst-case round every ``FASTEST_ROUND_S`` (the fastest rounds measured here take
0.22 s). A flooder gets that much through and no more; the rest is dropped before it costs anything.

Senders are the device id of the topic (``up/<id>/...``, ``status/<id>``), which the broker's ACL
vouches for. Buckets of senders that have refilled are forgotten, so memory is bounded by the
senders flooding right now.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.transport.base import Transport
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.limits import WireLimits
from edge_sdk.wire.topics import parse_topic

ROUND_MESSAGES = 16  # 6 uplinks + 6 receipts + 2 statuses, rounded up: whole messages a device sends per round
BURST_ROUNDS = 4
FASTEST_ROUND_S = 0.1
MAX_IDLE_BUCKETS = 4096  # buckets kept before full (idle) ones are forgotten

FLOOD = "flood"  # the rejection reasons this module reports
UNUSED_TOPIC = "unused_topic"


@dataclass(frozen=True)
class FloodLimits:
    """Chunks per second a sender may sustain (``rate``) and send at once (``burst``)."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and math.isfinite(self.burst) and self.rate > 0 and self.burst >= 1):
            raise ConfigError(f"a flood limit needs a finite rate > 0 and burst >= 1, got {self}")

    @classmethod
    def for_wire(cls, limits: WireLimits) -> FloodLimits:
        """What a round legitimately needs at these wire limits, with the margins the module docstring gives."""
        per_round = ROUND_MESSAGES * limits.max_chunks
        return cls(rate=per_round / FASTEST_ROUND_S, burst=float(BURST_ROUNDS * per_round))


class FloodGuard:
    """One token bucket per sender; ``admit`` takes a token or says no."""

    def __init__(self, limits: FloodLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when counted)

    def admit(self, sender: str) -> bool:
        now = self.clock()
        tokens, stamp = self._buckets.get(sender, (self.limits.burst, now))
        tokens = min(self.limits.burst, tokens + (now - stamp) * self.limits.rate)
        admitted = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if admitted else tokens, now)
        if len(self._buckets) > MAX_IDLE_BUCKETS:
            self._forget_full(now)
        return admitted

    def _forget_full(self, now: float) -> None:
        """A bucket that has refilled is the same as none: drop those."""
        rate, burst = self.limits.rate, self.limits.burst
        self._buckets = {s: (t, w) for s, (t, w) in self._buckets.items() if t + (now - w) * rate < burst}


@dataclass(frozen=True)
class Refusal:
    """One raw message dropped before decoding: the reason, the topic's sender (if any) and the topic."""

    reason: str
    sender: str | None
    topic: str
    detail: str


class FloodGuardedTransport:
    """A ``Transport`` whose ``poll`` passes only messages on this fleet's topics within their sender's rate.

    Everything dropped is appended to ``refusals`` for the shell to count and log (the service drains
    it on every poll); other attributes (``left``, ``has_input``, ``wait_ready``...) are the inner one's.
    """

    def __init__(self, inner: Transport, guard: FloodGuard, fleet: str) -> None:
        self.inner = inner
        self.guard = guard
        self.fleet = fleet
        self.refusals: deque[Refusal] = deque(maxlen=100_000)
        self.dropped = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> object:
        return self.inner.publish(topic, payload, retain=retain)

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.inner.close(*args, **kwargs)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        return [(topic, payload) for topic, payload in self.inner.poll(timeout) if self._admit(topic, len(payload))]

    def _admit(self, topic: str, size: int) -> bool:
        try:
            parsed = parse_topic(topic)
        except WireFormatError as exc:
            return self._refuse(UNUSED_TOPIC, None, topic, f"a topic the protocol does not use ({exc}); {size} B "
                                "dropped")
        if parsed.fleet != self.fleet:
            return self._refuse(UNUSED_TOPIC, None, topic, f"a topic of fleet {parsed.fleet!r}, not {self.fleet!r}")
        sender = parsed.device_id
        if sender is None:  # a broadcast (the aggregator's own retained plan, model, directory)
            return True
        if self.guard.admit(sender):
            return True
        return self._refuse(FLOOD, sender, topic, f"{sender} is over its rate of {self.guard.limits.rate:g} "
                            f"messages/s (burst {self.guard.limits.burst:g}); message dropped unread")

    def _refuse(self, reason: str, sender: str | None, topic: str, detail: str) -> bool:
        self.dropped += 1
        self.refusals.append(Refusal(reason, sender, topic, detail))
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
