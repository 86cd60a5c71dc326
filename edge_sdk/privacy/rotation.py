"""The public random rotations that spread an update evenly over its coordinates.

Why: after rotation every coordinate of a clipped vector is a sub-Gaussian of proxy about
||x||^2/d, so per-coordinate rounding and modular wrap-around behave like their averages instead
of being dominated by a few large coordinates (Kairouz-Liu-Steinke ICML'21).

Two rotations, chosen by name (``ROTATIONS``, ``make_rotation``); both are orthogonal, so the L2
norm (hence the DP sensitivity) is unchanged:

- ``"hadamard-pow2"`` (the original, still decodable): zero-pad to ``D = 2^k >= d`` and apply
  ``H D_s x / sqrt(D)``. The encoded vector has length D, up to 2x the update (d = 10^5 -> 131,072).
- ``"hadamard-overlap"`` (the default): with ``n = 2^m`` the largest power of two <= d, apply a
  randomized Hadamard ``H D_a / sqrt(n)`` to the window [0, n), then another with fresh signs
  ``H D_b / sqrt(n)`` to the window [d - n, d). Since n > d/2 the windows overlap and cover every
  coordinate; the encoded vector has length exactly d, and each output coordinate is sub-Gaussian
  with proxy ||x||^2/n < 2 ||x||^2/d (docs/privacy.md, section 1, proves it). For d = 2^m it is
  the pow2 rotation itself (one window, the same signs).

``spread_dim`` is that n (D for pow2): the calibration's wrap bound divides the signal by it.
``encoded_dim`` is the length SecAgg+ masks and the wire carries.

The signs come from a *public* per-round seed, so every device and the aggregator derive the same.
``H`` is the Sylvester-ordered Hadamard matrix; its inverse is ``H / n`` since it is symmetric.
The transform groups ``log2(n)`` butterfly levels into small dense Hadamard blocks (32x32) and
applies each group as one batched matrix product: this is the Kronecker factorisation
``H_n = H_32 (x) ... (x) H_32`` and runs ~3x faster in numpy than level-by-level butterflies.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from edge_sdk.errors import ConfigError

_BLOCK_LEVELS = 5  # 2^5 = 32: a dense 32x32 block per group of butterfly levels


POW2 = "hadamard-pow2"
OVERLAP = "hadamard-overlap"
DEFAULT_ROTATION = OVERLAP


def padded_dimension(dim: int) -> int:
    """The smallest power of two >= ``dim``: the length the pow2 rotation works on."""
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def window_dimension(dim: int) -> int:
    """The largest power of two <= ``dim``: the window the overlap rotation transforms."""
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    return 1 << (dim.bit_length() - 1)


@lru_cache(maxsize=8)
def _hadamard_block(levels: int) -> np.ndarray:
    block = np.ones((1, 1), dtype=np.float32)
    for _ in range(levels):
        block = np.block([[block, block], [block, -block]])
    block.setflags(write=False)
    return block


def fwht(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform of a 1-D power-of-two-length array, ``H x``.

    The result is written back into ``x`` (which is returned); ``scratch`` is an optional buffer
    of the same shape and dtype, so repeated calls allocate nothing.
    """
    n = x.shape[0]
    if x.ndim != 1 or n & (n - 1):
        raise ConfigError(f"fwht needs a 1-D array whose length is a power of two, got shape {x.shape}")
    levels = n.bit_length() - 1
    src = x
    dst = np.empty_like(x) if scratch is None else scratch
    inner = 1
    done = 0
    while done < levels:
        group = min(_BLOCK_LEVELS, levels - done)
        width = 1 << group
        block = _hadamard_block(group).astype(x.dtype, copy=False)
        outer = n // (width * inner)
        np.matmul(block, src.reshape(outer, width, inner), out=dst.reshape(outer, width, inner))
        src, dst = dst, src
        inner *= width
        done += group
    if src is not x:
        x[...] = src
    return x


def rotation_signs(seed: bytes, n: int) -> np.ndarray:
    """The public random signs (+1/-1 as float32) of length ``n`` for a round's rotation seed.

    Derived with SHAKE-256 (one bit per sign), so every platform gets identical signs; the seed is
    public, so a fast non-secret derivation is what is needed here, not a CSPRNG.
    """
    if len(seed) < 16:
        raise ConfigError(f"rotation seed must be at least 16 bytes, got {len(seed)}")
    raw = hashlib.shake_256(b"fleetlearn/rotation-signs/v1" + seed).digest((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:n]
    return (1.0 - 2.0 * bits).astype(np.float32)


class Rotation(Protocol):
    """What the encoder, decoder and calibration need of a rotation."""

    seed: bytes
    dim: int

    @property
    def encoded_dim(self) -> int:
        """The length of a rotated vector: what SecAgg+ masks and the wire carries."""
        ...

    @property
    def spread_dim(self) -> int:
        """n such that each rotated coordinate is sub-Gaussian with proxy ||x||^2 / n."""
        ...

    def rotate(self, x: np.ndarray) -> np.ndarray: ...

    def unrotate(self, y: np.ndarray) -> np.ndarray: ...


def _check_input(x: np.ndarray, dim: int, verb: str) -> None:
    if x.shape != (dim,):
        raise ConfigError(f"{verb} expects a vector of shape ({dim},), got {x.shape}")


def _inverse_dtype(y: np.ndarray) -> type:
    """float64 when ``y`` is float64 (wide sums at b > 24), else float32."""
    return np.float64 if y.dtype == np.float64 else np.float32


@dataclass(frozen=True)
class RandomizedHadamard:
    """``"hadamard-pow2"``: zero-pad to a power of two D >= dim, then ``H D_s x / sqrt(D)``."""

    seed: bytes
    dim: int

    @property
    def padded_dim(self) -> int:
        return padded_dimension(self.dim)

    @property
    def encoded_dim(self) -> int:
        return self.padded_dim

    @property
    def spread_dim(self) -> int:
        return self.padded_dim

    def signs(self) -> np.ndarray:
        return _cached_signs(self.seed, self.padded_dim)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """``H D pad(x) / sqrt(n)`` as a new float32 array of length ``padded_dim``."""
        _check_input(x, self.dim, "rotation")
        n = self.padded_dim
        out = np.zeros(n, dtype=np.float32)
        np.multiply(x, self.signs()[: self.dim] * np.float32(1.0 / np.sqrt(n)), out=out[: self.dim])
        return fwht(out)

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """The inverse: ``(D H y / sqrt(n))[:dim]`` (``y`` is not modified)."""
        n = self.padded_dim
        _check_input(y, n, "unrotate")
        out = y.astype(_inverse_dtype(y), copy=True)
        fwht(out)
        out *= self.signs() * (1.0 / np.sqrt(n))
        return out[: self.dim]


@dataclass(frozen=True)
class OverlappingHadamard:
    """``"hadamard-overlap"``: randomized Hadamards on the windows [0, n) then [dim - n, dim).

    ``n = 2^m <= dim < 2n``; the window signs are the first and second n bits of one
    ``rotation_signs(seed, 2n)`` stream. At dim = n there is one window with the first n signs,
    which is exactly ``RandomizedHadamard``. No padding: the output has length ``dim``.
    """

    seed: bytes
    dim: int

    @property
    def window(self) -> int:
        return window_dimension(self.dim)

    @property
    def encoded_dim(self) -> int:
        return self.dim

    @property
    def spread_dim(self) -> int:
        return self.window

    @property
    def two_windows(self) -> bool:
        return self.window != self.dim

    def scaled_signs(self, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """The two windows' signs already multiplied by 1/sqrt(n), in ``dtype`` (cached per seed)."""
        return _cached_window_signs(self.seed, self.window, np.dtype(dtype))

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """``R_b R_a x`` as a new float32 array of length ``dim``."""
        _check_input(x, self.dim, "rotation")
        n, d = self.window, self.dim
        first, second = self.scaled_signs()
        out = np.empty(d, dtype=np.float32)
        scratch = np.empty(n, dtype=np.float32)
        np.multiply(x[:n], first, out=out[:n])
        fwht(out[:n], scratch)
        if self.two_windows:
            out[n:] = x[n:]
            tail = out[d - n:]
            tail *= second
            fwht(tail, scratch)
        return out

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """The inverse ``R_a^T R_b^T y``: each window's ``D H / sqrt(n)``, in reverse order."""
        _check_input(y, self.dim, "unrotate")
        n, d = self.window, self.dim
        out = y.astype(_inverse_dtype(y), copy=True)
        first, second = self.scaled_signs(out.dtype)
        scratch = np.empty(n, dtype=out.dtype)
        if self.two_windows:
            tail = out[d - n:]
            fwht(tail, scratch)
            tail *= second
        head = out[:n]
        fwht(head, scratch)
        head *= first
        return out


ROTATIONS: dict[str, type[RandomizedHadamard] | type[OverlappingHadamard]] = {
    POW2: RandomizedHadamard,
    OVERLAP: OverlappingHadamard,
}


def check_rotation_name(name: str) -> str:
    """``name`` if it is a known rotation, else a ConfigError listing the choices."""
    if name not in ROTATIONS:
        raise ConfigError(f"rotation {name!r} is unknown; choose one of {sorted(ROTATIONS)}")
    return name


def make_rotation(name: str, seed: bytes, dim: int) -> Rotation:
    """The rotation called ``name`` for one round's public ``seed`` and update dimension ``dim``."""
    if dim < 1:
        raise ConfigError(f"dim must be >= 1, got {dim}")
    return ROTATIONS[check_rotation_name(name)](seed, dim)


@lru_cache(maxsize=4)
def _cached_signs(seed: bytes, n: int) -> np.ndarray:
    signs = rotation_signs(seed, n)
    signs.setflags(write=False)
    return signs


@lru_cache(maxsize=8)
def _cached_window_signs(seed: bytes, n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    both = rotation_signs(seed, 2 * n).astype(dtype) * dtype.type(1.0 / math.sqrt(n))
    both.setflags(write=False)
    return both[:n], both[n:]
