"""The one transport interface: publish, poll, subscribe, close.

Why a Protocol and so small: the pump, the aggregator service, the simulator and the tests all
move (topic, payload) pairs and nothing else, so an in-memory transport with fault hooks and a
real MQTT connection are interchangeable underneath them. Reliability (receipts, retransmission,
chunking, dedup) is layered on top by ``edge_sdk.transport.reliable``, not required here:
a transport may drop, duplicate or reorder messages, as a broker under load does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from edge_sdk.errors import FleetlearnError


class TransportError(FleetlearnError, ConnectionError):
    """The transport cannot carry a message (closed, misconfigured, or the broker refused it)."""


@runtime_checkable
class Transport(Protocol):
    """Moves opaque payloads on topics; delivery is at least once at best, never guaranteed."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> object:
        """Queue ``payload`` for ``topic``; returns without waiting for the broker.

        May return a handle for ``left(handle)`` (has the broker taken it yet?); None otherwise.
        """
        ...

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        """Messages received since the last poll as (topic, payload); never blocks longer than ``timeout`` s."""
        ...

    def subscribe(self, pattern: str) -> None:
        """Receive messages on topics matching ``pattern`` (MQTT wildcards ``+`` and ``#``)."""
        ...

    def close(self) -> None:
        """Release the connection; later calls to publish raise ``TransportError``."""
        ...
