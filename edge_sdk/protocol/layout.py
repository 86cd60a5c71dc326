"""ParameterLayout: named float parameters ⇄ one flat float32 vector, and ⇄ model bytes.

Why one object: the device flattens its trained parameters to compute the update it encodes, the
aggregator unflattens the decoded mean to apply it, and the model release carries the parameters
as bytes; all three must agree on names, order, shapes and dtype. The layout is built from the
parameters themselves (names sorted), which both sides hold: the device from its bundle, the
aggregator from the model it publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import ConfigError


class LayoutError(ConfigError):
    """Parameters or a vector do not match the layout (names, shapes, length, dtype)."""


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and dtypes of the parameters, in flattening order (names sorted)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, params: Mapping[str, np.ndarray]) -> ParameterLayout:
        names = tuple(sorted(params))
        for name in names:
            if not np.issubdtype(np.asarray(params[name]).dtype, np.floating):
                raise LayoutError(f"parameter {name!r} is {np.asarray(params[name]).dtype}, not a float array")
        return cls(names, tuple(tuple(int(s) for s in np.shape(params[n])) for n in names),
                   tuple(np.asarray(params[n]).dtype.str for n in names))

    @property
    def dim(self) -> int:
        """The flat vector's length: the plan's ``encoding.dim``."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float32 vector, parameters in layout order."""
        if set(params) != set(self.names):
            missing, extra = sorted(set(self.names) - set(params)), sorted(set(params) - set(self.names))
            raise LayoutError(f"parameters do not match the layout: missing {missing[:5]}, unexpected {extra[:5]}")
        out = np.empty(self.dim, dtype=np.float32)
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            array = np.asarray(params[name])
            if array.shape != shape:
                raise LayoutError(f"parameter {name!r} has shape {array.shape}, the layout says {shape}")
            out[offset : offset + array.size] = array.reshape(-1)
            offset += array.size
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Named arrays (copies, each in its layout dtype) from a vector of length ``dim``."""
        vector = np.asarray(vector)
        if vector.shape != (self.dim,):
            raise LayoutError(f"vector has shape {vector.shape}, the layout needs ({self.dim},)")
        out, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = vector[offset : offset + size].reshape(shape).astype(np.dtype(dtype))
            offset += size
        return out

    def to_bytes(self, params: Mapping[str, np.ndarray]) -> bytes:
        """The model release payload: the flat vector as little-endian float32."""
        return self.flatten(params).astype("<f4", copy=False).tobytes()

    def from_bytes(self, data: bytes) -> dict[str, np.ndarray]:
        """Parameters from a model release payload; refuses a wrong length or non-finite values."""
        if len(data) != 4 * self.dim:
            raise LayoutError(f"model payload is {len(data)} bytes, the layout needs {4 * self.dim} "
                              f"(float32 x {self.dim})")
        vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vector)):
            raise LayoutError("model payload holds NaN or infinite parameters")
        return self.unflatten(vector)
