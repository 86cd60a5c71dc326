"""The SecAgg+ neighbour graph: a random k-regular Harary graph fixed by the session id.

Why derived from the session id: the session id is a hash over the signed roster, so neither the
server nor any device can steer who neighbours whom once keys are advertised, and every device
recomputes the same graph on its own. Devices sit on a ring in an order drawn by Fisher-Yates
with a SHA-256 counter-mode stream (a CSPRNG from hashlib, not numpy/random) and each connects
to k/2 devices on either side. When k >= n - 1 every device neighbours every other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from edge_sdk.secagg.errors import SecAggConfigError

_DOMAIN = b"fleetlearn/secagg/v1/neighbour-graph"


class _HashStream:
    """Deterministic random integers from SHA-256(seed || counter) with rejection sampling."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def _word(self) -> int:
        block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        self._counter += 1
        return int.from_bytes(block[:8], "big")

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) without modulo bias."""
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            word = self._word()
            if word < limit:
                return word % bound


def ring_order(n: int, session_id: bytes) -> list[int]:
    """A permutation of range(n) drawn from the session id (Fisher-Yates)."""
    stream = _HashStream(hashlib.sha256(_DOMAIN + session_id).digest())
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = stream.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbour_graph(members: Sequence[str], degree: int, session_id: bytes) -> dict[str, tuple[str, ...]]:
    """Each member's neighbours (sorted), for a roster sorted by device id."""
    n = len(members)
    if len(set(members)) != n:
        raise SecAggConfigError("roster members must be distinct")
    if degree >= n - 1:
        return {m: tuple(sorted(x for x in members if x != m)) for m in members}
    if degree < 2 or degree % 2:
        raise SecAggConfigError(f"a Harary graph needs an even degree >= 2 below n - 1, got k={degree}, n={n}")
    order = ring_order(n, session_id)
    half = degree // 2
    graph = {}
    for position, member_index in enumerate(order):
        around = [order[(position + step) % n] for step in range(-half, half + 1) if step != 0]
        graph[members[member_index]] = tuple(sorted(members[i] for i in around))
    return graph
