"""Shamir secret sharing of 32-byte secrets over GF(2^256 + 297).

Why this field: 2^256 + 297 is the smallest prime above 2^256, so any 32-byte secret is one field
element and a share is 33 bytes. Each device sends and receives 2k shares a round, so every byte
of a share is paid 4k times per device on a constrained uplink (2^521 - 1 would double it).
Python ints make the arithmetic exact. Shares are evaluated at small positive x (1-based roster
positions). Reconstruction is Lagrange interpolation at 0; the coefficients depend only on the
set of x-coordinates, so ``LagrangeCache`` computes them once per subset and with a single modular
inversion (batch inversion), which is what makes the server's unmask fast.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from edge_sdk.secagg.errors import ReconstructionError, SecAggConfigError

PRIME = (1 << 256) + 297
SHARE_BYTES = 33  # ceil(257 / 8)
SECRET_BYTES = 32


def encode_share(value: int) -> bytes:
    """A field element as 33 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Parse a 33-byte share, refusing values outside the field."""
    if len(data) != SHARE_BYTES:
        raise ReconstructionError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ReconstructionError("share value is not a field element (>= 2^256 + 297)")
    return value


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Share a 32-byte secret so that any ``threshold`` of the points at ``xs`` rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggConfigError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if threshold < 1 or threshold > len(xs):
        raise SecAggConfigError(f"threshold must be in [1, {len(xs)}] for {len(xs)} holders, got {threshold}")
    if len(set(xs)) != len(xs) or any(x <= 0 or x >= PRIME for x in xs):
        raise SecAggConfigError("share x-coordinates must be distinct, positive field elements")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coefficients):
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def _batch_inverse(values: list[int]) -> list[int]:
    """Modular inverses of many non-zero field elements with a single ``pow`` (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return out


def lagrange_at_zero_many(subsets: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Lagrange basis coefficients at 0 for many point sets, with one modular inversion in all.

    x's are small integers, so numerators and denominators are first computed exactly with
    C-level ``math.prod`` and reduced once; the field only sees the final divisions.
    """
    numerators: list[int] = []
    denominators: list[int] = []
    for xs in subsets:
        if len(set(xs)) != len(xs):
            raise ReconstructionError(f"duplicate x-coordinates in {sorted(xs)}")
        whole = math.prod(xs)
        for xi in xs:
            numerators.append(whole // xi)
            denominators.append(math.prod(xj - xi for xj in xs if xj != xi) % PRIME)
    inverses = _batch_inverse(denominators)
    flat = [n * inv % PRIME for n, inv in zip(numerators, inverses, strict=True)]
    out, offset = [], 0
    for xs in subsets:
        out.append(tuple(flat[offset : offset + len(xs)]))
        offset += len(xs)
    return out


def lagrange_at_zero(xs: Sequence[int]) -> tuple[int, ...]:
    """Lagrange basis coefficients at 0 for the points ``xs``."""
    return lagrange_at_zero_many([xs])[0]


def _secret_from_int(value: int) -> bytes:
    if value >= 1 << (8 * SECRET_BYTES):
        raise ReconstructionError("reconstructed value exceeds 32 bytes: the shares are inconsistent")
    return value.to_bytes(SECRET_BYTES, "big")


@dataclass
class LagrangeCache:
    """Reconstructs many secrets, computing each subset's coefficients once."""

    threshold: int
    _cache: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)
    _inverse_products: dict[tuple[int, ...], int] = field(default_factory=dict)

    def subset(self, shares: Mapping[int, int]) -> tuple[int, ...]:
        """The x's a reconstruction from ``shares`` will use: the ``threshold`` lowest."""
        return tuple(sorted(shares)[: self.threshold])

    def warm(self, subsets: Iterable[tuple[int, ...]]) -> None:
        """Compute the coefficients of every new subset at once (one inversion for the batch)."""
        missing = list(dict.fromkeys(xs for xs in subsets if xs not in self._cache))
        self._cache.update(zip(missing, lagrange_at_zero_many(missing), strict=True))

    def coefficients(self, xs: tuple[int, ...]) -> tuple[int, ...]:
        found = self._cache.get(xs)
        if found is None:
            found = self._cache[xs] = lagrange_at_zero(xs)
        return found

    def reconstruct(self, shares: Mapping[int, int], what: str = "secret") -> bytes:
        """Rebuild a secret from at least ``threshold`` shares {x: y}; uses the lowest x's."""
        if len(shares) < self.threshold:
            raise ReconstructionError(
                f"cannot reconstruct {what}: {len(shares)} shares received, threshold is {self.threshold}"
            )
        xs = self.subset(shares)
        total = sum(c * shares[x] for c, x in zip(self.coefficients(xs), xs, strict=True)) % PRIME
        return _secret_from_int(total)


    def reconstruct_checked(
        self, shares: Mapping[int, int], check: Callable[[bytes], bool], what: str = "secret",
        max_subsets: int = 4096,
    ) -> CheckedSecret:
        """Rebuild a secret that ``check`` accepts, leaving out bad shares when more than t arrived.

        Why: one corrupted share must not abort a round that holds more than t shares. The t lowest
        x's are tried first (the fast path, shared with the cache); on failure, subsets that leave
        out 1, 2, ... shares are tried in turn.

        Blame needs more than a passing secret: colluding holders can corrupt their shares so that
        the errors cancel at 0, and the polynomial through their subset then disagrees with the
        honest shares. A share is named bad only off a polynomial that agrees with at least
        (N + t) / 2 of the N points (the shares and the checked secret at 0): any other polynomial
        with that much agreement shares t points with it, so it is the honest one whenever at most
        (N - t) / 2 shares are bad. Otherwise nobody is named (``CheckedSecret.ambiguous``).
        """
        if len(shares) < self.threshold:
            raise ReconstructionError(
                f"cannot reconstruct {what}: {len(shares)} shares received, threshold is {self.threshold}"
            )
        xs = sorted(shares)
        points = len(xs) + 1
        found: bytes | None = None
        for tries, subset in enumerate(self._subsets(xs), start=1):
            secret = self._attempt(shares, subset, check)
            if secret is not None:
                found = secret
                off = tuple(x for x in xs if x not in subset and self.evaluate(shares, subset, x) != shares[x])
                if 2 * (points - len(off)) >= points + self.threshold:
                    return CheckedSecret(secret, off)
            if tries >= max_subsets:
                break
        if found is not None:
            return CheckedSecret(found, (), ambiguous=True)
        raise ReconstructionError(f"cannot reconstruct {what}: no {self.threshold} of its {len(xs)} shares "
                                  "rebuild the committed secret (too many bad shares)")

    def _subsets(self, xs: list[int]) -> Iterator[tuple[int, ...]]:
        """The t lowest x's, then the t lowest after leaving out 1, 2, ... of the shares."""
        seen = set()
        for left_out in range(len(xs) - self.threshold + 1):
            for excluded in itertools.combinations(xs, left_out):
                subset = tuple(x for x in xs if x not in excluded)[: self.threshold]
                if subset not in seen:
                    seen.add(subset)
                    yield subset

    def evaluate(self, shares: Mapping[int, int], xs: tuple[int, ...], x: int) -> int:
        """The polynomial through the points ``xs`` of ``shares`` at ``x`` (not one of ``xs``).

        Why no inversion per call: L_i(x) = L_i(0) * x_i * W^-1 * P(x) / (x_i - x) with W = prod x_j and
        P(x) = prod (x_j - x). The division is exact over the integers and W^-1 is cached per subset,
        so checking every extra share of every secret costs a few multiplications each.
        """
        inverse = self._inverse_products.get(xs)
        if inverse is None:
            inverse = self._inverse_products[xs] = pow(math.prod(xs), -1, PRIME)
        product = math.prod(xj - x for xj in xs)
        total = 0
        for c, xi in zip(self.coefficients(xs), xs, strict=True):
            total += shares[xi] * c * xi * (product // (xi - x))
        return total * inverse % PRIME

    def _attempt(self, shares: Mapping[int, int], xs: tuple[int, ...], check: Callable[[bytes], bool]) -> bytes | None:
        total = sum(c * shares[x] for c, x in zip(self.coefficients(xs), xs, strict=True)) % PRIME
        if total >= 1 << (8 * SECRET_BYTES):
            return None
        secret = _secret_from_int(total)
        return secret if check(secret) else None


@dataclass(frozen=True)
class CheckedSecret:
    """A secret rebuilt and accepted by its check, and the x's of shares found off its polynomial.

    ``ambiguous``: the secret is right, but too many shares disagree to tell which ones are bad.
    """

    secret: bytes
    bad_xs: tuple[int, ...]
    ambiguous: bool = False


def reconstruct_secret(shares: Mapping[int, int], threshold: int) -> bytes:
    """Rebuild one secret from ``threshold`` or more shares {x: y}."""
    return LagrangeCache(threshold).reconstruct(shares)

