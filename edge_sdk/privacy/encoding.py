"""The update encoder (device) and the matching sum decoder (aggregator), numpy only.

Device: float update -> L2 clip to C -> randomized Hadamard rotation -> scale 1/gamma ->
conditional stochastic rounding -> integer noise -> mod 2^b as np.uint32 (what SecAgg+ masks).

Aggregator: the mod-2^b sum -> re-centre into [-2^(b-1), 2^(b-1)) -> times gamma -> inverse
rotation -> divide by the number of contributors.

Each stage is a separate function so benchmarks/privacy.py can time it and tests can check it;
``encode_update`` and ``decode_sum`` chain them. Both sides live here so they share the maths.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.modulus import check_bits
from edge_sdk.privacy.noise import NoiseMechanism
from edge_sdk.privacy.rotation import DEFAULT_ROTATION, POW2, Rotation, check_rotation_name, make_rotation
from edge_sdk.privacy.rounding import DEFAULT_BETA, conditional_stochastic_round, rounded_l2_bound

log = logging.getLogger(__name__)

_FLOAT32_EXACT_INTS = 1 << 24


@dataclass(frozen=True)
class EncodingParams:
    """Everything both sides must agree on to encode and decode one round's updates.

    Stored in plans and sent to devices, so it follows dp-accounting's stability rule: fields are
    never removed and new ones are optional. ``rotation`` names the rotation (``ROTATIONS``); it
    defaults to the unpadded ``"hadamard-overlap"``, while ``from_dict`` reads a record without
    the field as ``"hadamard-pow2"``, the only rotation that existed when it was written.
    """

    dim: int
    clip: float
    gamma: float
    bits: int
    rotation_seed: bytes
    beta: float = DEFAULT_BETA
    rotation: str = DEFAULT_ROTATION

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"clip (the L2 bound C) must be a finite number > 0, got {self.clip}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"gamma (the quantisation step) must be a finite number > 0, got {self.gamma}")
        check_bits(self.bits)
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta must be in (0, 1), got {self.beta}")
        if len(self.rotation_seed) < 16:
            raise ConfigError(f"rotation_seed must be at least 16 bytes, got {len(self.rotation_seed)}")
        check_rotation_name(self.rotation)

    @property
    def rotator(self) -> Rotation:
        """The round's rotation object (``rotate``/``unrotate``)."""
        return make_rotation(self.rotation, self.rotation_seed, self.dim)

    @property
    def padded_dim(self) -> int:
        """The length of the encoded vector: what SecAgg+ masks and the wire carries.

        ``dim`` itself for ``"hadamard-overlap"``; the next power of two for ``"hadamard-pow2"``.
        The name is kept from when every encoding was padded.
        """
        return self.rotator.encoded_dim

    @property
    def spread_dim(self) -> int:
        """n such that each rotated coordinate is sub-Gaussian with proxy ||x||^2/n (the wrap bound's)."""
        return self.rotator.spread_dim

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def l2_sensitivity(self) -> float:
        """The L2 bound of one encoded (rounded, pre-noise) vector: the integer-domain sensitivity."""
        return rounded_l2_bound(self.clip / self.gamma, self.padded_dim, self.beta)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the seed as hex), every field named."""
        return {"dim": self.dim, "clip": self.clip, "gamma": self.gamma, "bits": self.bits,
                "rotation_seed": self.rotation_seed.hex(), "beta": self.beta, "rotation": self.rotation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncodingParams:
        """The inverse of ``to_dict``; a record from before ``rotation`` existed means ``"hadamard-pow2"``."""
        try:
            return cls(dim=int(data["dim"]), clip=float(data["clip"]), gamma=float(data["gamma"]),
                       bits=int(data["bits"]), rotation_seed=bytes.fromhex(data["rotation_seed"]),
                       beta=float(data.get("beta", DEFAULT_BETA)), rotation=str(data.get("rotation", POW2)))
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed encoding parameters {data!r}: {exc}") from exc


def clip_l2(update: np.ndarray, clip: float) -> np.ndarray:
    """``update`` as a flat float32 vector of L2 norm <= clip (the caller's array is never modified)."""
    x = np.asarray(update, dtype=np.float32).reshape(-1)
    norm = float(np.sqrt(np.dot(x, x)))
    if not math.isfinite(norm):
        raise ConfigError("the update contains NaN or infinity; refusing to encode it")
    if norm > clip:
        x = x * (np.float32(clip / norm) * np.float32(1.0 - 1e-6))  # strictly inside after float32 rounding
    return x


def scale(rotated: np.ndarray, gamma: float) -> np.ndarray:
    """Divide by gamma in place (float64 if float32 could not hold the integers exactly)."""
    peak = float(np.max(np.abs(rotated))) / gamma if rotated.size else 0.0
    if peak >= _FLOAT32_EXACT_INTS:
        rotated = rotated.astype(np.float64)
    rotated *= rotated.dtype.type(1.0 / gamma)
    return rotated


def add_noise(
    rounded: np.ndarray, mechanism: NoiseMechanism, variance: float, rng: np.random.Generator
) -> np.ndarray:
    """Add integer noise of per-coordinate ``variance`` in place (int64)."""
    if variance > 0:
        rounded += mechanism.sample(rounded.size, variance, rng)
    return rounded


def to_modular(values: np.ndarray, bits: int) -> np.ndarray:
    """Reduce int64 values mod 2^bits into np.uint32 (two's complement makes this one AND)."""
    np.bitwise_and(values, (1 << bits) - 1, out=values)
    return values.astype(np.uint32)


def encode_update(
    update: np.ndarray,
    params: EncodingParams,
    mechanism: NoiseMechanism,
    noise_variance: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The device pipeline: a float update of ``params.dim`` entries -> uint32 mod 2^bits.

    ``noise_variance`` is this device's per-coordinate variance in the integer (scaled) domain,
    i.e. ``(sigma / gamma)^2 / t_honest`` in distributed mode; ``rng`` must be a fresh per-round
    generator from ``fresh_noise_generator`` (it drives rounding and noise).
    """
    flat = np.asarray(update).reshape(-1)
    if flat.size != params.dim:
        raise ConfigError(f"update has {flat.size} entries but the round's dim is {params.dim}")
    clipped = clip_l2(flat, params.clip)
    rotated = params.rotator.rotate(clipped)
    scaled = scale(rotated, params.gamma)
    rounded = conditional_stochastic_round(scaled, params.l2_sensitivity, rng)
    noisy = add_noise(rounded, mechanism, noise_variance, rng)
    return to_modular(noisy, params.bits)


def centre(total: np.ndarray, bits: int) -> np.ndarray:
    """Map a mod-2^bits sum into [-2^(bits-1), 2^(bits-1)) as int64."""
    values = np.bitwise_and(total.astype(np.int64), (1 << bits) - 1)
    values[values >= (1 << (bits - 1))] -= 1 << bits
    return values


def decode_sum(total: np.ndarray, params: EncodingParams, contributors: int) -> np.ndarray:
    """The aggregator side: the mod-2^bits sum of ``contributors`` encodings -> their float32 mean."""
    if contributors < 1:
        raise ConfigError(f"contributors must be >= 1, got {contributors}")
    if total.shape != (params.padded_dim,):
        raise ConfigError(f"the sum must have shape ({params.padded_dim},), got {total.shape}")
    centred = centre(total, params.bits)
    dtype = np.float32 if params.bits <= 24 else np.float64
    unscaled = centred.astype(dtype) * dtype(params.gamma)
    return (params.rotator.unrotate(unscaled) / contributors).astype(np.float32, copy=False)
