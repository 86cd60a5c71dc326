"""When to send a message again: a pure schedule driven by an explicit ``now``.

Why pure: the same schedule runs under the MQTT shell (wall clock) and under the in-memory
transport (virtual clock), and tests can walk it through hours of backoff in microseconds.
Each outgoing message waits ``initial_s`` for its receipt, then ``multiplier`` times longer after
every retransmission up to ``maximum_s``, until its deadline; the jitter that keeps 200 senders
from retransmitting in the same millisecond is derived from the message's sequence number and
attempt (sequences start at random per channel), so the schedule needs no random source.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class RetransmitPolicy:
    """Timing of retransmissions; ``deadline_s`` is how long a message is worth sending at all."""

    initial_s: float = 2.0
    multiplier: float = 2.0
    maximum_s: float = 16.0
    jitter: float = 0.25
    deadline_s: float = 300.0

    def __post_init__(self) -> None:
        values = (self.initial_s, self.multiplier, self.maximum_s, self.jitter, self.deadline_s)
        if not all(math.isfinite(v) for v in values) or not (
            0 < self.initial_s <= self.maximum_s and self.multiplier >= 1 and 0 <= self.jitter < 1
            and self.deadline_s > 0
        ):
            raise ConfigError(
                "retransmission needs 0 < initial_s <= maximum_s, multiplier >= 1, 0 <= jitter < 1 and "
                f"deadline_s > 0, all finite; got {self}"
            )

    def wait(self, sequence: int, attempt: int) -> float:
        """Seconds to wait for a receipt after transmission ``attempt`` (0 = the first send)."""
        ceiling = min(self.maximum_s, self.initial_s * self.multiplier ** min(attempt, 64))
        draw = hashlib.sha256(f"{sequence}:{attempt}".encode()).digest()
        uniform = int.from_bytes(draw[:8], "big") / 2**64
        return ceiling * (1.0 - self.jitter * uniform)


@dataclass(frozen=True)
class Outgoing:
    """One message awaiting its receipt: its chunks and who must acknowledge it."""

    sequence: int
    to: str
    topic: str
    digest: bytes  # SHA-256 of the envelope bytes, which the receipt names
    chunks: tuple[bytes, ...]
    deadline: float
    next_due: float
    attempts: int = 1


@dataclass(frozen=True)
class RetransmitState:
    outgoing: Mapping[int, Outgoing] = field(default_factory=lambda: MappingProxyType({}))

    def next_due(self) -> float | None:
        return min((o.next_due for o in self.outgoing.values()), default=None)


def track(state: RetransmitState, policy: RetransmitPolicy, *, sequence: int, to: str, topic: str,
          digest: bytes, chunks: tuple[bytes, ...], now: float, deadline: float | None = None) -> RetransmitState:
    """Start waiting for the receipt of a message just sent at ``now``."""
    if sequence in state.outgoing:
        raise ConfigError(f"sequence {sequence} is already awaiting a receipt; sequences must not repeat")
    until = now + policy.deadline_s if deadline is None else deadline
    entry = Outgoing(sequence, to, topic, digest, chunks, until, now + policy.wait(sequence, 0))
    return RetransmitState(MappingProxyType({**state.outgoing, sequence: entry}))


def acknowledge(state: RetransmitState, *, sequence: int, digest: bytes, receiver: str
                ) -> tuple[RetransmitState, Outgoing | None]:
    """Stop retransmitting ``sequence`` if this (already verified) receipt matches it exactly."""
    entry = state.outgoing.get(sequence)
    if entry is None or entry.digest != digest or entry.to != receiver:
        return state, None
    remaining = {k: v for k, v in state.outgoing.items() if k != sequence}
    return RetransmitState(MappingProxyType(remaining)), entry


def postpone(state: RetransmitState, sequence: int, until: float) -> RetransmitState:
    """Wait for ``sequence``'s receipt until ``until``: it has not even reached the broker yet."""
    entry = state.outgoing.get(sequence)
    if entry is None:
        return state
    return RetransmitState(MappingProxyType({**state.outgoing, sequence: replace(entry, next_due=until)}))


def due(state: RetransmitState, policy: RetransmitPolicy, now: float
        ) -> tuple[RetransmitState, list[Outgoing], list[Outgoing]]:
    """(state, messages to send again now, messages given up: past their deadline without a receipt)."""
    resend: list[Outgoing] = []
    expired: list[Outgoing] = []
    kept: dict[int, Outgoing] = {}
    for sequence, entry in state.outgoing.items():
        if now >= entry.deadline:
            expired.append(entry)
        elif now >= entry.next_due:
            again = replace(entry, attempts=entry.attempts + 1,
                            next_due=now + policy.wait(sequence, entry.attempts))
            resend.append(again)
            kept[sequence] = again
        else:
            kept[sequence] = entry
    if not resend and not expired:
        return state, [], []
    return RetransmitState(MappingProxyType(kept)), resend, expired
