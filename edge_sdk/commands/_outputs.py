"""Where a subcommand may write: never onto one of its inputs, never into a missing directory.

Checked before any work starts, so a bad ``--out`` costs nothing and leaves every file as it was.
The writes themselves are atomic (a temporary file or directory beside the target, then a rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from edge_sdk.errors import FleetlearnError


class OutputPathError(FleetlearnError, ValueError):
    """An output path is unusable: an input, a directory where a file goes, or in a missing directory."""


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(path: Path, directory: Path) -> bool:
    return directory.is_dir() and path.resolve().is_relative_to(directory.resolve())


def check_output_file(option: str, out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]]) -> Path:
    """Validate a file output. ``inputs`` are (option, path) pairs; a directory input protects its contents."""
    path = Path(out)
    for input_option, input_path in inputs:
        if input_path is None:
            continue
        source = Path(input_path)
        if _same(path, source) or _inside(path, source):
            raise OutputPathError(
                f"{option} {out} would overwrite the input {input_option} {input_path}; choose another file"
            )
    if path.is_dir():
        raise OutputPathError(f"{option} {out} is a directory; give a file name such as {path / 'params.npz'}")
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{option} {out}: directory {parent} is not writable")
    return path
