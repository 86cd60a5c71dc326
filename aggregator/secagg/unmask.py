"""Rebuilding the sum from masked inputs and Shamir shares: the server's hot path.

Why it is fast: Shamir reconstruction uses ``LagrangeCache`` (one coefficient set per subset of
share holders, one modular inversion per set, always the t lowest x's so neighbouring devices
reuse subsets), and mask regeneration writes every keystream into one reused buffer and adds it
in place on uint32.

Why every secret is checked: a rebuilt mask key must match the public key the device advertised,
and a rebuilt self-mask seed must match the commitment in its advert. A corrupted share is then
caught instead of silently skewing the sum, and when more than t shares arrived the other subsets
are tried, so one bad share neither aborts the round nor goes unattributed (``Unmasked.bad_shares``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.secagg.errors import ReconstructionError
from edge_sdk.secagg.keys import AgreementKey
from edge_sdk.secagg.masking import pairwise_mask_key, self_mask_commitment, self_mask_key
from edge_sdk.secagg.prg import MaskExpander, modulus_mask, pairwise_sign
from edge_sdk.secagg.shamir import LagrangeCache


@dataclass(frozen=True)
class UnmaskInputs:
    """Everything the server holds when the Unmask stage closes."""

    session_id: bytes
    round_index: int
    bits: int
    threshold: int
    index: Mapping[str, int]  # device id -> 1-based roster position (Shamir x)
    s_public: Mapping[str, bytes]  # device id -> advertised s public key
    self_mask_commitments: Mapping[str, bytes]  # device id -> advertised SHA-256 of its self-mask seed
    partners: Mapping[str, tuple[str, ...]]  # device id -> the devices it masks with
    masked: Mapping[str, np.ndarray]  # U3: survivors' masked inputs
    dropped: Iterable[str]  # U2 \ U3: shared keys, but their input is not in the sum
    self_mask_shares: Mapping[str, Mapping[int, int]]  # survivor -> {x: share}
    mask_key_shares: Mapping[str, Mapping[int, int]]  # dropped device -> {x: share}


@dataclass(frozen=True)
class Unmasked:
    """The sum of the survivors' inputs, and the shares found bad on the way: owner -> x's."""

    total: np.ndarray
    bad_shares: Mapping[str, tuple[int, ...]]


def _mask_key_matches(public: bytes) -> Callable[[bytes], bool]:
    return lambda secret: AgreementKey(secret).public == public


def reconstruct_sum(inputs: UnmaskInputs) -> Unmasked:
    """Sum of the survivors' inputs mod 2^bits; raises ReconstructionError if a secret cannot be rebuilt."""
    survivors = sorted(inputs.masked)
    if not survivors:
        raise ReconstructionError("no masked inputs to unmask")
    length = inputs.masked[survivors[0]].size
    cache = LagrangeCache(inputs.threshold)
    survivor_set = set(survivors)
    needed = [v for v in sorted(set(inputs.dropped)) if any(u in survivor_set for u in inputs.partners[v])]
    b_shares = {u: inputs.self_mask_shares.get(u, {}) for u in survivors}
    s_shares = {v: inputs.mask_key_shares.get(v, {}) for v in needed}
    cache.warm(cache.subset(s) for s in [*b_shares.values(), *s_shares.values()] if len(s) >= inputs.threshold)
    # Reconstruct every secret first: fail before spending time on masks.
    bad: dict[str, tuple[int, ...]] = {}
    seeds = {}
    for u in survivors:
        commitment = inputs.self_mask_commitments[u]
        found = cache.reconstruct_checked(b_shares[u], lambda seed, c=commitment: self_mask_commitment(seed) == c,
                                          f"self-mask seed of {u!r}")
        seeds[u] = found.secret
        if found.bad_xs:
            bad[u] = found.bad_xs
    dropped_keys = {}
    for v in needed:
        partners = [u for u in inputs.partners[v] if u in survivor_set]
        found = cache.reconstruct_checked(s_shares[v], _mask_key_matches(inputs.s_public[v]),
                                          f"mask key of dropped {v!r}")
        if found.bad_xs:
            bad[v] = found.bad_xs
        dropped_keys[v] = (AgreementKey(found.secret), partners)

    total = np.zeros(length, dtype=np.uint32)
    for u in survivors:
        np.add(total, inputs.masked[u], out=total)
    expander = MaskExpander(length)
    for u in survivors:
        expander.add_into(total, self_mask_key(seeds[u], inputs.session_id, inputs.round_index), -1)
    for v, (key, partners) in dropped_keys.items():
        xv = inputs.index[v]
        for u in partners:
            xu = inputs.index[u]
            shared = key.exchange(inputs.s_public[u])
            mask_key = pairwise_mask_key(shared, inputs.session_id, inputs.round_index, (xu, u), (xv, v))
            # u added sign(u, v) * PRG(s_uv); take it back out.
            expander.add_into(total, mask_key, -pairwise_sign(xu, xv))
    total &= modulus_mask(inputs.bits)
    return Unmasked(total, bad)
