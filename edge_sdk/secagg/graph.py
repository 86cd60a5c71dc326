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


def _check(members: Sequence[str], degree: int) -> bool:
    """Validate (members, degree); True when the graph is complete."""
    n = len(members)
    if len(set(members)) != n:
        raise SecAggConfigError("roster members must be distinct")
    if degree >= n - 1:
        return True
    if degree < 2 or degree % 2:
        raise SecAggConfigError(f"a Harary graph needs an even degree >= 2 below n - 1, got k={degree}, n={n}")
    return False


def _around(order: Sequence[int], position: int, degree: int) -> list[int]:
    n, half = len(order), degree // 2
    return [order[(position + step) % n] for step in range(-half, half + 1) if step != 0]


def neighbour_graph(members: Sequence[str], degree: int, session_id: bytes) -> dict[str, tuple[str, ...]]:
    """Each member's neighbours (sorted), for a roster sorted by device id: what the server needs."""
    if _check(members, degree):
        return {m: tuple(sorted(x for x in members if x != m)) for m in members}
    order = ring_order(len(members), session_id)
    return {members[member_index]: tuple(sorted(members[i] for i in _around(order, position, degree)))
            for position, member_index in enumerate(order)}


def neighbours_of(members: Sequence[str], degree: int, session_id: bytes, member: str) -> tuple[str, ...]:
    """One member's neighbours (sorted): what a device needs, without building all n neighbourhoods."""
    if _check(members, degree):
        return tuple(x for x in sorted(members) if x != member)
    order = ring_order(len(members), session_id)
    position = order.index(members.index(member))
    return tuple(sorted(members[i] for i in _around(order, position, degree)))
