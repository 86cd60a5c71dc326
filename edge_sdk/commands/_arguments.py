"""Argument types shared by the subcommands: a meaningless value is refused by name at parse time.

Each type returns the parsed value or raises ``argparse.ArgumentTypeError``, which argparse reports
as ``argument --NAME: ...`` in one line with exit code 2, before any file is read.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

THREADS_PER_CPU = 4  # more onnxruntime threads than this per CPU only adds contention


def integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def finite_float(minimum: float | None = None, *, exclusive: bool = False) -> Callable[[str], float]:
    """A finite float, optionally >= ``minimum`` (> with ``exclusive``)."""
    bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
        if not math.isfinite(value) or (
            minimum is not None and (value <= minimum if exclusive else value < minimum)
        ):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    parse.__name__ = "finite number"
    return parse


def max_threads() -> int:
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """onnxruntime intra-op threads: 1 to 4 per CPU of this machine."""
    value = integer_at_least(1)(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(
            f"must be at most {max_threads()} ({THREADS_PER_CPU} per CPU; this machine has {os.cpu_count()}), "
            f"got {value}"
        )
    return value


def add_bundle_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """BUNDLE, --data, --threads and --profile: what train and evaluate share."""
    parser.add_argument("bundle", metavar="BUNDLE", help="training bundle directory (from `fleetlearn compile`)")
    parser.add_argument("--data", required=True, metavar="FILE.npz", help=data_help)
    parser.add_argument(
        "--profile", metavar="NAME|FILE.toml",
        help="device profile (bundled: pi-zero-2w, pi-3b-plus, pi-4, pi-5, jetson-orin-nano, generic-x86) "
             "supplying --threads and --batch-size defaults (explicit options win) and the batch-size and "
             "memory limits",
    )
    parser.add_argument(
        "--threads", type=thread_count,
        help=f"onnxruntime intra-op threads, 1 to {THREADS_PER_CPU} per CPU (default: the profile's, else 1)",
    )
