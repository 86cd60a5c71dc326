"""A lower bound on the memory one training step takes, from the bundle's manifest alone.

Why a lower bound from the manifest: a device must refuse a model that cannot fit its memory
budget before it opens onnxruntime sessions (which would allocate it, then be killed by the OOM
killer mid-round). The manifest lists every parameter, optimiser-state and buffer shape and the
input and output shapes, so the memory that is certainly needed costs nothing to add up:

- parameters, optimiser state and running statistics twice (``TrainingState`` keeps a current and
  a spare buffer set, so a step's outputs never overwrite its inputs), plus one gradient per
  trainable parameter inside the train step;
- frozen parameters twice (both graphs hold them as constants);
- one batch of inputs and labels, and the output with its gradient;
- the runtime itself (Python, numpy, onnxruntime, paho-mqtt, cryptography), measured on x86-64.

Intermediate activations are not in the manifest and are left out, so a model this refuses
cannot fit, and one it accepts may still need more: ``memory_budget_mb`` should leave headroom.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.training.bundle import MANIFEST_FILE, Manifest, TensorSpec

MB = 1 << 20
RUNTIME_MB = 64  # RSS of python + numpy + onnxruntime imported: 45 MB here; paho, cryptography, session arenas


@dataclass(frozen=True)
class WorkingSet:
    """Bytes a step certainly needs, by part."""

    parameters: int
    optimizer: int
    batch: int
    runtime: int = RUNTIME_MB * MB

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.batch + self.runtime

    def describe(self) -> str:
        return (f"{_mb(self.total)} MB (parameters {_mb(self.parameters)}, optimiser state {_mb(self.optimizer)}, "
                f"one batch {_mb(self.batch)}, runtime {_mb(self.runtime)})")


def _mb(size: int) -> str:
    return f"{size / MB:.1f}" if size < 10 * MB else f"{size / MB:.0f}"


def _nbytes(shape: tuple[int | None, ...], dtype: str) -> int:
    return math.prod(1 if d is None else d for d in shape) * np.dtype(dtype).itemsize


def _per_example(spec: TensorSpec) -> int:
    return _nbytes(spec.shape[1:], spec.dtype) if spec.shape else np.dtype(spec.dtype).itemsize


def estimate(manifest: Manifest, batch_size: int) -> WorkingSet:
    trainable = sum(_nbytes(p.shape, p.dtype) for p in manifest.trainable)
    frozen = sum(_nbytes(p.shape, p.dtype) for p in manifest.frozen)
    buffers = sum(_nbytes(b.shape, b.dtype) for b in manifest.buffers)
    state = sum(_nbytes(s.shape, s.dtype) for s in manifest.state)
    per_example = _per_example(manifest.x) + _per_example(manifest.y) + 2 * _per_example(manifest.output)
    return WorkingSet(parameters=3 * trainable + 2 * frozen + 2 * buffers, optimizer=2 * state,
                      batch=batch_size * per_example)


def read_manifest(bundle: str | Path) -> Manifest | None:
    """The bundle's manifest, or None when it cannot be read (opening the bundle then names the problem)."""
    try:
        return Manifest.from_dict(json.loads((Path(bundle) / MANIFEST_FILE).read_text()))
    except Exception:  # noqa: BLE001 - load_bundle reports every way a manifest can be wrong, with its path
        return None


def largest_batch_within(manifest: Manifest, budget_mb: int, cap: int) -> int:
    """The largest batch size up to ``cap`` whose estimate fits ``budget_mb``; 0 if not even batch 1 does."""
    fixed = estimate(manifest, 0).total
    per_example = estimate(manifest, 1).total - fixed
    room = budget_mb * MB - fixed
    if room < per_example:
        return 0
    return cap if per_example == 0 else min(cap, room // per_example)
