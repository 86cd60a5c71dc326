"""``fleetlearn evaluate``: loss (and accuracy, for classifiers) of a bundle on an .npz dataset.

Non-finite features or parameters are refused rather than reported as ``loss nan``, so the
output, text or ``--json``, always holds real numbers.
"""

from __future__ import annotations

import argparse

from edge_sdk.commands._arguments import add_bundle_arguments, integer_at_least

NAME = "evaluate"
HELP = "report loss (and accuracy for classification) of a bundle on FILE.npz (arrays x, y)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_arguments(parser, "evaluation data: arrays x and y")
    parser.add_argument(
        "--params", metavar="PARAMS.npz", help="parameters to evaluate (default: the bundle's initial ones)"
    )
    parser.add_argument("--batch-size", type=integer_at_least(1), default=1024,
                        help="examples per evaluation batch (default 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _count_non_finite(array) -> int:
    import numpy as np

    return int(array.size - np.count_nonzero(np.isfinite(array)))


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from edge_sdk.config import load_profile
    from edge_sdk.training import (
        DataError,
        ModelSession,
        ParameterError,
        TrainingState,
        evaluate,
        load_dataset_npz,
        load_params_npz,
        prepare_dataset,
    )

    profile = load_profile(args.profile) if args.profile else None
    threads = args.threads or (profile.threads if profile else 1)
    session = ModelSession.open(args.bundle, threads=threads)
    data = prepare_dataset(session.manifest, *load_dataset_npz(args.data))
    bad = _count_non_finite(data.x)
    if bad:
        raise DataError(f"--data {args.data}: x holds {bad} NaN or infinite value(s); clean the data first")
    if data.y.dtype.kind == "f" and _count_non_finite(data.y):
        raise DataError(f"--data {args.data}: y holds NaN or infinite target(s); clean the data first")
    params = load_params_npz(args.params) if args.params else None
    for name, value in (params or {}).items():
        if value.dtype.kind == "f" and _count_non_finite(value):
            raise ParameterError(
                f"--params {args.params}: parameter {name!r} holds {_count_non_finite(value)} NaN or infinite "
                "value(s); these parameters come from a diverged run"
            )
    state = TrainingState(session, params)
    result = evaluate(state, data, batch_size=args.batch_size)
    if not math.isfinite(result.loss):
        raise ParameterError(
            f"the loss on {args.data} overflowed to {result.loss}: the parameters are too large for this data"
        )
    if args.json:
        record = {"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples}
        print(json.dumps(record, allow_nan=False))
    else:
        line = f"loss {result.loss:.6f}"
        if result.accuracy is not None:
            line += f"  accuracy {result.accuracy:.4f}"
        print(f"{line}  examples {result.examples}")
    return 0
