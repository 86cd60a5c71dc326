"""Flattening a dict of integer tensors into the one uint32 vector that SecAgg+ masks.

Why a layout object: masking and summing work on one contiguous vector, but the aggregator must
hand the sum back as named tensors; the layout (names, shapes, in order) travels out of band and
both sides must agree on it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.secagg.errors import SecAggConfigError


@dataclass(frozen=True)
class VectorLayout:
    """Names and shapes of the tensors, in flattening order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> VectorLayout:
        names = tuple(sorted(tensors))
        return cls(names=names, shapes=tuple(tuple(int(s) for s in tensors[n].shape) for n in names))

    @property
    def length(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the tensors (already reduced mod 2^b) into one uint32 vector."""
        if set(tensors) != set(self.names):
            raise SecAggConfigError(f"tensors {sorted(tensors)} do not match layout {list(self.names)}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            array = np.asarray(tensors[name])
            if array.shape != shape:
                raise SecAggConfigError(f"tensor {name!r} has shape {array.shape}, layout says {shape}")
            if array.dtype != np.uint32:
                raise SecAggConfigError(f"tensor {name!r} must be uint32 (encoded mod 2^b), got {array.dtype}")
            parts.append(array.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a vector of this layout's length back into named tensors (copies)."""
        if vector.shape != (self.length,):
            raise SecAggConfigError(f"vector has shape {vector.shape}, layout needs ({self.length},)")
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = vector[offset : offset + size].reshape(shape).copy()
            offset += size
        return out
