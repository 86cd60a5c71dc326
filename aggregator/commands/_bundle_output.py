"""Where ``fleetlearn compile`` may put a bundle, and how it gets there without clobbering anything.

Rules, checked before compiling: ``--out`` is a directory that does not exist yet, an empty
directory, or (only with ``--force``) an existing bundle; never a file, a non-bundle directory
with contents, or the directory holding the input model. The bundle is written into a temporary
directory beside ``--out``, both graphs are loaded by onnxruntime (what a device will do), and only
then is it renamed into place; on any failure the temporary directory is removed and ``--out`` is
as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aggregator.compiler.errors import CompileError
from edge_sdk.training.bundle import EVAL_FILE, MANIFEST_FILE, TRAIN_STEP_FILE


class BundleOutput:
    """A validated ``--out`` for a bundle; ``staging()`` yields the directory to compile into."""

    def __init__(self, out: str | os.PathLike[str], *, model: str | os.PathLike[str], force: bool) -> None:
        self.path = Path(out)
        model_path = Path(model).resolve()
        if self.path.is_file() or (self.path.exists() and not self.path.is_dir()):
            raise CompileError(f"--out {out} is an existing file; a bundle is a directory (refusing to overwrite it)")
        if not self.path.parent.is_dir():
            raise CompileError(f"--out {out}: directory {self.path.parent} does not exist; create it first")
        if model_path == self.path.resolve() or model_path.is_relative_to(self.path.resolve()):
            raise CompileError(f"--out {out} holds the input model {model}; choose another directory")
        self.replaces = self.path.is_dir() and any(self.path.iterdir())
        if self.replaces:
            if not (self.path / MANIFEST_FILE).is_file():
                raise CompileError(
                    f"--out {out} is a directory with other contents, not a bundle; refusing to write into it"
                )
            if not force:
                raise CompileError(f"--out {out} already holds a bundle; pass --force to replace it")

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield a fresh directory beside ``--out``; on a clean exit, verify it and move it into place."""
        staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        try:
            yield staging
            _check_runs_in_onnxruntime(staging)
            self._install(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _install(self, staging: Path) -> None:
        if not self.path.exists():
            os.replace(staging, self.path)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
        os.rmdir(old)
        os.replace(self.path, old)  # an empty directory or the bundle being replaced
        try:
            os.replace(staging, self.path)
        except BaseException:
            os.replace(old, self.path)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _check_runs_in_onnxruntime(bundle: Path) -> None:
    import onnxruntime as ort

    for name in (TRAIN_STEP_FILE, EVAL_FILE):
        try:
            ort.InferenceSession(os.fspath(bundle / name), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare pybind exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ""
            if "NOT_IMPLEMENTED" in first_line:
                hint = "; onnxruntime has no kernel for this op and dtype (it has no float64 Conv or pooling): " \
                       "compile with --dtype float32"
            raise CompileError(
                f"the compiled {name} does not run in onnxruntime {ort.__version__}: {first_line}{hint}"
            ) from exc
