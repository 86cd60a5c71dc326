"""The training bundle: the contract between the host compiler and the device runtime.

A bundle is a directory::

    manifest.json        this module's ``Manifest``, with a sha256 of every other file
    train_step.onnx      x, y, lr, step, trainable params, optimiser state -> loss, new params, new state
    eval.onnx            x, y, trainable params -> loss, output
    initial_params.npz   the trainable parameters, keyed by ONNX initializer name
    frozen_params.bin    (optional) the graphs' large constants as ONNX external data, shared by both

The compiler (``aggregator.compiler``) writes it with ``write_bundle``; the device loads it with
``load_bundle``, which refuses a bundle whose files do not match their hashes. Frozen parameters
are constants of both graphs, stored once (external data in a file both reference, hashed like the
others); only trainable parameters travel as inputs.

Naming inside the graphs is not a convention the runtime guesses at: every input and output name
is listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import FleetlearnError

# 2 added optional fields an older reader would silently misread (graph_shape, running-statistics
# buffers, shared external weights): it must refuse such a bundle, not bind wrong shapes. Version 1
# bundles hold none of them and still load.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
TRAIN_STEP_FILE = "train_step.onnx"
EVAL_FILE = "eval.onnx"
PARAMS_FILE = "initial_params.npz"

LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


class BundleError(FleetlearnError):
    """A bundle is missing, malformed, or does not match its manifest."""


class BundleIntegrityError(BundleError):
    """A bundle file's sha256 differs from the manifest: it was corrupted or tampered with."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input/output. ``None`` in a shape is a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str  # numpy dtype name: "float32", "float64", "int64"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))


@dataclass(frozen=True)
class ParameterSpec:
    """A model parameter (an ONNX initializer of the inference model).

    ``input``/``output`` are its names in train_step.onnx (the output is the updated value);
    in eval.onnx the parameter is fed under ``input`` too. Frozen parameters have neither:
    they are constants inside the graphs. ``graph_shape``, when set, is the shape both graphs carry
    the parameter in (the same elements, row-major): a conv weight as the 2-D [M, C*K] of its
    weight-gradient Gemm, so the fused SGD update writes the bound output without a Reshape copy.
    Bind a reshaped view of the ``shape`` buffer (``bound_shape``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    input: str | None = None
    output: str | None = None
    graph_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.graph_shape is not None and math.prod(self.graph_shape) != math.prod(self.shape):
            raise ValueError(f"parameter {self.name!r}: graph_shape {list(self.graph_shape)} does not hold "
                             f"the {math.prod(self.shape)} elements of shape {list(self.shape)}")

    @property
    def bound_shape(self) -> tuple[int, ...]:
        """The shape the graphs read and write the parameter in."""
        return self.shape if self.graph_shape is None else self.graph_shape

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParameterSpec:
        graph_shape = d.get("graph_shape")
        return cls(
            name=str(d["name"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            trainable=bool(d["trainable"]),
            input=d.get("input"),
            output=d.get("output"),
            graph_shape=None if graph_shape is None else tuple(int(s) for s in graph_shape),
        )


def _positive_finite(value: Any, what: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{what} is {value!r}; it must be a positive finite number")
    return number


@dataclass(frozen=True)
class StateSpec:
    """One optimiser-state tensor (momentum velocity, Adam m or v) of one trainable parameter.

    It starts at zero with the parameter's shape and dtype; ``input`` -> ``output`` in train_step.onnx.
    The graph holds ``scale`` times torch's value of it: the compiler may store a tensor rescaled
    when that saves an elementwise pass per step (Adam's v); ``TrainingState`` reports torch's value.
    """

    name: str
    param: str
    kind: str  # "velocity", "m" or "v"
    shape: tuple[int, ...]
    dtype: str
    input: str
    output: str
    scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateSpec:
        return cls(
            name=str(d["name"]),
            param=str(d["param"]),
            kind=str(d["kind"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            input=str(d["input"]),
            output=str(d["output"]),
            scale=_positive_finite(d.get("scale", 1.0), f"state {d['name']!r} scale"),
        )


@dataclass(frozen=True)
class BufferSpec:
    """A tensor the train step updates without a gradient: a training-mode BatchNormalization's
    running mean or variance (torch's module buffers).

    It starts from ``initial_params.npz`` (under ``name``); train_step.onnx reads ``input`` and writes
    ``output``, eval.onnx reads ``input``. ``federated`` is whether ``TrainingState.get_params``
    includes it in the device's update by default. It is off unless the compiler was asked for it:
    running statistics are raw statistics of the device's data that DP clipping and noise do not
    cover, and keeping them local is FedBN's remedy for feature-shifted (non-IID) devices.
    """

    name: str
    kind: str  # "running_mean" or "running_var"
    shape: tuple[int, ...]
    dtype: str
    input: str
    output: str
    federated: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BufferSpec:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            input=str(d["input"]),
            output=str(d["output"]),
            federated=bool(d.get("federated", False)),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to drive the two graphs, plus file hashes.

    train_step.onnx inputs: ``x``, ``y``, ``lr`` (scalar, the param dtype), ``step`` (int64 scalar,
    1 for the first step; Adam's bias correction uses it), each trainable ``ParameterSpec.input``,
    each ``StateSpec.input``. Outputs: ``loss`` (scalar mean over the batch), each trainable
    ``ParameterSpec.output``, each ``StateSpec.output``.

    eval.onnx inputs: ``x``, ``y`` and each trainable ``ParameterSpec.input``; outputs ``loss`` and
    ``output`` (the model's output: logits for cross-entropy).

    Labels: int64 class indices of shape [N] for cross_entropy; the output's shape and dtype for mse.
    """

    format_version: int
    opset: int
    loss: str
    optimizer: str
    optimizer_params: dict[str, float]
    x: TensorSpec
    y: TensorSpec
    output: TensorSpec
    parameters: tuple[ParameterSpec, ...]
    state: tuple[StateSpec, ...]
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    source_model: str = ""
    train_step_inputs: tuple[str, ...] = ("x", "y", "lr", "step")
    loss_output: str = "loss"
    eval_output: str = "output"
    buffers: tuple[BufferSpec, ...] = ()  # running statistics: train-step inputs and outputs, eval inputs

    @property
    def trainable(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.trainable)

    @property
    def frozen(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if not p.trainable)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            version = int(d["format_version"])
            if version not in READABLE_FORMAT_VERSIONS:
                raise BundleError(
                    f"manifest format_version {version} is not supported (this SDK reads "
                    f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}); update fleetlearn on this device"
                )
            manifest = cls(
                format_version=version,
                opset=int(d["opset"]),
                loss=str(d["loss"]),
                optimizer=str(d["optimizer"]),
                optimizer_params={str(k): float(v) for k, v in d["optimizer_params"].items()},
                x=TensorSpec.from_dict(d["x"]),
                y=TensorSpec.from_dict(d["y"]),
                output=TensorSpec.from_dict(d["output"]),
                parameters=tuple(ParameterSpec.from_dict(p) for p in d["parameters"]),
                state=tuple(StateSpec.from_dict(s) for s in d["state"]),
                files={str(k): str(v) for k, v in d["files"].items()},
                source_model=str(d.get("source_model", "")),
                train_step_inputs=tuple(d.get("train_step_inputs", ("x", "y", "lr", "step"))),
                loss_output=str(d.get("loss_output", "loss")),
                eval_output=str(d.get("eval_output", "output")),
                buffers=tuple(BufferSpec.from_dict(b) for b in d.get("buffers", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc
        if manifest.loss not in LOSSES:
            raise BundleError(f"manifest loss {manifest.loss!r} is not one of {LOSSES}")
        if manifest.optimizer not in OPTIMIZERS:
            raise BundleError(f"manifest optimizer {manifest.optimizer!r} is not one of {OPTIMIZERS}")
        return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its manifest, the two graphs' paths and the initial parameters."""

    path: Path
    manifest: Manifest
    initial_params: dict[str, np.ndarray]

    @property
    def train_step_path(self) -> Path:
        return self.path / TRAIN_STEP_FILE

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_params_npz(path: Path) -> dict[str, np.ndarray]:
    """Read a params file safely: numeric arrays only, never pickled objects."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BundleError(f"{path} holds a single array (.npy); parameters are an .npz keyed by name")
        with data:
            return {name: np.ascontiguousarray(data[name]) for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"cannot read parameters from {path} (truncated or corrupt?): {exc}") from exc


def save_params_npz(path: Path, params: dict[str, np.ndarray]) -> None:
    """Write parameters keyed by ONNX initializer name, atomically (write, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **params)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bundle(
    out_dir: Path,
    manifest: Manifest,
    train_step_bytes: bytes,
    eval_bytes: bytes,
    initial_params: dict[str, np.ndarray],
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Write the bundle files, fill in their hashes, and write the manifest last.

    ``extra_files`` (name -> content) are written beside the graphs and hashed with them, e.g. the
    external data both graphs reference. Returns the manifest with ``files`` filled in.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in (extra_files or {}).items():
        (out_dir / name).write_bytes(content)
    (out_dir / TRAIN_STEP_FILE).write_bytes(train_step_bytes)
    (out_dir / EVAL_FILE).write_bytes(eval_bytes)
    save_params_npz(out_dir / PARAMS_FILE, initial_params)
    names = (TRAIN_STEP_FILE, EVAL_FILE, PARAMS_FILE, *(extra_files or {}))
    files = {name: sha256_file(out_dir / name) for name in names}
    manifest = Manifest(**{**asdict_shallow(manifest), "files": files})
    (out_dir / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def asdict_shallow(manifest: Manifest) -> dict[str, Any]:
    """The manifest's fields without recursing into nested dataclasses (unlike ``asdict``)."""
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load a bundle and verify every file against the manifest's sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a training bundle: {MANIFEST_FILE} is missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    manifest = Manifest.from_dict(raw)
    for required in (TRAIN_STEP_FILE, EVAL_FILE, PARAMS_FILE):
        if required not in manifest.files:
            raise BundleError(f"manifest lists no sha256 for {required}")
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"bundle file {name} is missing from {path}")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleIntegrityError(
                f"bundle file {name} has sha256 {actual[:16]}…, but the manifest says {expected[:16]}…; "
                "the bundle is corrupt or was modified: recompile or re-download it"
            )
    params = load_params_npz(path / PARAMS_FILE)
    for spec in (*manifest.trainable, *manifest.buffers):
        if spec.name not in params:
            raise BundleError(f"{PARAMS_FILE} lacks {spec.name!r} (a trainable parameter or running statistic)")
        if tuple(params[spec.name].shape) != spec.shape or str(params[spec.name].dtype) != spec.dtype:
            raise BundleError(
                f"initial parameter {spec.name!r} is {params[spec.name].dtype}{list(params[spec.name].shape)}, "
                f"manifest says {spec.dtype}{list(spec.shape)}"
            )
    return Bundle(path=path, manifest=manifest, initial_params=params)
