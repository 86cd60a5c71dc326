"""Who holds whose shares, and who masks with whom: share holders drawn by each device itself.

Why each device draws its own holders: a neighbour graph fixed by a seed the aggregator influences
can be steered (a server grinding its nonce placed 5 chosen devices among a target's 12 neighbours
in 144k tries). Here device u's k share holders are the first k entries of a permutation of the
*cohort* (fixed and signed in RoundStart before u generated anything) drawn from u's own fresh
advert: its two X25519 public keys and its self-mask commitment. The server cannot change that
draw, and a colluding device cannot influence an honest device's draw at all; a prefix of one
permutation is used, so no choice of k re-rolls it. Cohort members that never joined the roster
simply count as dropped holders.

Masks are pairwise over the undirected union of these choices: u masks with v when u chose v or v
chose u (``mask_partners``). Every device can check a claimed partnership from the partner's signed
advert, so the server cannot invent one. The stream is SHA-256 in counter mode with rejection
sampling (a CSPRNG from hashlib, never numpy or random).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence

from edge_sdk.secagg.errors import SecAggConfigError

_DOMAIN = b"fleetlearn/secagg/v2/share-holders|"


class _HashStream:
    """Deterministic random integers from SHA-256(seed || counter) with rejection sampling.

    Each 32-byte block yields four 64-bit words: every device checks about k partners' draws of k
    holders each, so one hash per word was most of a roster check.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
            self._words = [int.from_bytes(block[i : i + 8], "big") for i in (24, 16, 8, 0)]
        return self._words.pop()

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) without modulo bias."""
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            word = self._word()
            if word < limit:
                return word % bound


def holder_seed(round_nonce: bytes, device_id: str, c_public: bytes, s_public: bytes, commitment: bytes) -> bytes:
    """The seed of a device's holder draw: its own fresh advert, bound to the round and its id."""
    raw = device_id.encode()
    return hashlib.sha256(_DOMAIN + round_nonce + len(raw).to_bytes(2, "big") + raw
                          + c_public + s_public + commitment).digest()


def share_holders(cohort: Sequence[str], position: int, degree: int, seed: bytes) -> tuple[str, ...]:
    """The first ``degree`` of a seeded permutation of the cohort without ``cohort[position]``.

    Partial Fisher-Yates over the indices, with the swaps kept in a dict: O(k) work and memory, so a
    device can check a partner's draw without materialising the cohort.
    """
    others = len(cohort) - 1
    if not 0 <= position <= others:
        raise SecAggConfigError(f"cohort position {position} is outside a cohort of {len(cohort)}")
    if degree < 1:
        raise SecAggConfigError(f"share-holder count must be at least 1, got k={degree}")
    stream = _HashStream(seed)
    swapped: dict[int, int] = {}
    chosen = []
    for i in range(min(degree, others)):
        j = i + stream.below(others - i)
        pick = swapped.get(j, j)
        swapped[j] = swapped.get(i, i)
        chosen.append(cohort[pick + (pick >= position)])  # skip the device itself
    return tuple(chosen)


def mask_partners(
    holders: Mapping[str, Collection[str]], members: Collection[str]
) -> dict[str, tuple[str, ...]]:
    """Each member's partners (sorted): the members it chose as holders plus those that chose it."""
    partners: dict[str, set[str]] = {m: set() for m in members}
    for u in members:
        for v in holders[u]:
            if v in partners:
                partners[u].add(v)
                partners[v].add(u)
    return {m: tuple(sorted(p)) for m, p in partners.items()}
