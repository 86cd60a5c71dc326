"""One onnxruntime session pair per compiled model, shared by every device that trains it.

The train step is a pure function of its inputs (x, y, lr, step, parameters, optimiser state), so
a ``ModelSession`` holds no device state: a fleet simulator can open one session and hand it to
thousands of ``TrainingState`` objects, each owning only its own parameter buffers. Loading the
graphs into onnxruntime is the expensive part (parsing, graph optimisation, kernel selection);
doing it once per model keeps both start-up time and memory down.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edge_sdk.training.bundle import Bundle, BundleError, Manifest, load_bundle

log = logging.getLogger(__name__)


class SessionError(BundleError):
    """onnxruntime cannot load a bundle graph, or the graph disagrees with the manifest."""


@dataclass(frozen=True)
class SessionOptions:
    """How onnxruntime runs the graphs; a device profile chooses ``threads``.

    ``inter_op`` parallelism is always 1 and execution sequential: a train step is a chain of
    dependent ops, so a second pool only costs memory and wake-ups on a small device.
    ``memory_arena`` trades a few MB of RSS for fewer allocations per step.
    ``spin_wait`` lets idle pool threads busy-wait between ops. It is off by default: measured here
    with a second process on a 2-core machine, spinning made a 2-thread CNN step 2.5x slower (6.3
    vs 2.5 ms) while gaining only 13% on the MLP, and on a battery device it burns power.
    """

    threads: int = 1
    memory_arena: bool = True
    spin_wait: bool = False
    profile_prefix: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise SessionError(f"threads must be a positive integer, got {self.threads!r}")

    def to_ort(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.use_deterministic_compute = True
        options.enable_cpu_mem_arena = self.memory_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin_wait else "0")
        options.log_severity_level = 3  # warnings from the optimiser are not the device owner's business
        if self.profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile_prefix
        return options


def _open_graph(path: Path, options: SessionOptions) -> ort.InferenceSession:
    """Create an InferenceSession, turning onnxruntime's untyped failures into a ``SessionError``."""
    try:
        return ort.InferenceSession(
            os.fspath(path), sess_options=options.to_ort(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises bare pybind exception types (Fail, InvalidProtobuf, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SessionError(
            f"onnxruntime cannot load {path.name} from bundle {path.parent}: {first_line}. "
            "The file is truncated, corrupt or not an ONNX model: recompile the bundle"
        ) from exc


def _check_names(graph: str, kind: str, expected: list[str], actual: list[str]) -> None:
    missing = [name for name in expected if name not in actual]
    if missing:
        raise SessionError(
            f"{graph} lacks the {kind} {missing} that the manifest lists (it has {actual}); "
            "the bundle's manifest and graphs come from different compilations"
        )


class ModelSession:
    """The two graphs of one bundle, loaded once and safe to share across devices and threads."""

    def __init__(self, bundle: Bundle, options: SessionOptions | None = None) -> None:
        self.bundle = bundle
        self.options = options or SessionOptions()
        self.train_step = _open_graph(bundle.train_step_path, self.options)
        self.evaluator = _open_graph(bundle.eval_path, self.options)
        manifest = self.manifest
        _check_names(
            "train_step.onnx",
            "inputs",
            [*manifest.train_step_inputs]
            + [p.input for p in manifest.trainable]
            + [s.input for s in manifest.state]
            + [b.input for b in manifest.buffers],
            [i.name for i in self.train_step.get_inputs()],
        )
        _check_names(
            "train_step.onnx",
            "outputs",
            [manifest.loss_output] + [p.output for p in manifest.trainable] + [s.output for s in manifest.state]
            + [b.output for b in manifest.buffers],
            [o.name for o in self.train_step.get_outputs()],
        )
        _check_names(
            "eval.onnx",
            "inputs",
            [manifest.x.name, manifest.y.name] + [p.input for p in manifest.trainable]
            + [b.input for b in manifest.buffers],
            [i.name for i in self.evaluator.get_inputs()],
        )
        _check_names(
            "eval.onnx",
            "outputs",
            [manifest.loss_output, manifest.eval_output],
            [o.name for o in self.evaluator.get_outputs()],
        )
        log.info(
            "opened bundle %s: %d trainable tensors, %d optimiser-state tensors, %d thread(s)",
            bundle.path,
            len(manifest.trainable),
            len(manifest.state),
            self.options.threads,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, threads: int = 1) -> ModelSession:
        """Load and verify a bundle directory, then open its graphs with ``threads`` intra-op threads."""
        return cls(load_bundle(path), SessionOptions(threads=threads))

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest
