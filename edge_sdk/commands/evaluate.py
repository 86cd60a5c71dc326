"""``fleetlearn evaluate``: loss (and accuracy, for classifiers) of a bundle on an .npz dataset."""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = "report loss (and accuracy for classification) of a bundle on FILE.npz (arrays x, y)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="training bundle directory (from `fleetlearn compile`)")
    parser.add_argument("--data", required=True, metavar="FILE.npz", help="evaluation data: arrays x and y")
    parser.add_argument(
        "--params", metavar="PARAMS.npz", help="parameters to evaluate (default: the bundle's initial ones)"
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=1024, help="examples per evaluation batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from edge_sdk.training.bundle import load_params_npz
    from edge_sdk.training.data import load_dataset_npz, prepare_dataset
    from edge_sdk.training.loop import evaluate
    from edge_sdk.training.session import ModelSession
    from edge_sdk.training.state import TrainingState

    session = ModelSession.open(args.bundle, threads=args.threads)
    data = prepare_dataset(session.manifest, *load_dataset_npz(args.data))
    state = TrainingState(session, load_params_npz(Path(args.params)) if args.params else None)
    result = evaluate(state, data, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples}))
    else:
        line = f"loss {result.loss:.6f}"
        if result.accuracy is not None:
            line += f"  accuracy {result.accuracy:.4f}"
        print(f"{line}  examples {result.examples}")
    return 0
