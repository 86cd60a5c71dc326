"""Local datasets: loading, validation against a bundle, and seeded batch order.

Labels are checked once, up front, against what the compiled loss expects: a float label vector
fed to a cross-entropy graph would otherwise surface as an opaque onnxruntime type error on the
first step, or worse, train on garbage after a silent cast.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import FleetlearnError
from edge_sdk.training.bundle import Manifest


class DataError(FleetlearnError, ValueError):
    """A dataset does not fit the bundle: wrong dtype, shape, or label range."""


@dataclass(frozen=True)
class Dataset:
    """Features and labels with the bundle's dtypes, contiguous, ready to be batched."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def load_dataset_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` and ``y`` from an .npz file (never unpickling objects)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read a dataset from {path}: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array (.npy); a dataset is an .npz with arrays x and y "
                        "(np.savez(path, x=x, y=y))")
    try:
        with data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {missing}; it holds {sorted(data.files)}")
            return np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read a dataset from {path} (truncated or corrupt?): {exc}") from exc


def prepare_dataset(manifest: Manifest, x: np.ndarray, y: np.ndarray) -> Dataset:
    """Validate ``x``/``y`` against the manifest and return them in the bundle's dtypes.

    Features may be any real numeric dtype and are cast to the model's (digits arrive as float64
    or uint8). Labels are stricter: integer class indices of shape [N] for cross-entropy, floats
    of the output's shape for MSE. Anything else is a ``DataError`` naming the expected form.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    x_spec, y_spec = manifest.x, manifest.y
    if x.dtype.kind not in "biuf":
        raise DataError(f"x has dtype {x.dtype}; expected real numbers (cast to {x_spec.dtype})")
    if x.ndim != len(x_spec.shape) or any(
        d is not None and d != actual for d, actual in zip(x_spec.shape, x.shape, strict=False)
    ):
        raise DataError(f"x has shape {list(x.shape)}; the bundle expects {_shape_text(x_spec.shape)}")
    n = x.shape[0]
    if n == 0:
        raise DataError("the dataset is empty")

    expected_y = _shape_text(y_spec.shape)
    if y.ndim != len(y_spec.shape) or y.shape[0] != n or any(
        d is not None and d != actual for d, actual in zip(y_spec.shape[1:], y.shape[1:], strict=False)
    ):
        raise DataError(
            f"y has shape {list(y.shape)}; the bundle expects {expected_y} with N = {n} (the rows of x)"
        )
    if manifest.loss == "cross_entropy":
        if y.dtype.kind not in "iu":
            raise DataError(
                f"y has dtype {y.dtype}; cross-entropy labels must be integer class indices "
                f"({y_spec.dtype}, shape {expected_y}), not one-hot or float"
            )
        classes = manifest.output.shape[-1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or (classes is not None and high >= classes):
            raise DataError(f"y holds class indices {low}..{high}; the model has classes 0..{classes - 1}")
    elif y.dtype.kind != "f":
        raise DataError(f"y has dtype {y.dtype}; MSE targets must be floating point ({y_spec.dtype})")
    return Dataset(
        x=np.ascontiguousarray(x, dtype=x_spec.dtype),
        y=np.ascontiguousarray(y, dtype=y_spec.dtype),
    )


def epoch_order(n: int, rng: np.random.Generator | None) -> np.ndarray:
    """Example indices for one epoch: a fresh permutation from ``rng``, or 0..n-1 without one."""
    return rng.permutation(n) if rng is not None else np.arange(n)
