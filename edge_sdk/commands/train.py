"""``fleetlearn train``: train a bundle locally on an .npz dataset, to check it before deploying it."""

from __future__ import annotations

import argparse
import sys

NAME = "train"
HELP = "train a compiled bundle locally on FILE.npz (arrays x, y) and save the trained parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="training bundle directory (from `fleetlearn compile`)")
    parser.add_argument("--data", required=True, metavar="FILE.npz", help="training data: arrays x and y")
    parser.add_argument("--epochs", type=int, required=True, help="passes over the data")
    parser.add_argument(
        "--batch-size", type=int, required=True, help="examples per step (the last partial batch is used)"
    )
    parser.add_argument("--lr", type=float, required=True, help="learning rate")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed; same seed, same parameters")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--no-shuffle", action="store_true", help="visit examples in file order")
    parser.add_argument(
        "--params", metavar="INIT.npz", help="start from these parameters instead of the bundle's initial ones"
    )
    parser.add_argument(
        "--validation", metavar="FILE.npz", help="also report loss/accuracy on this dataset after each epoch"
    )
    parser.add_argument(
        "--out", required=True, metavar="PARAMS.npz", help="where to write the trained parameters"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_sdk.training.bundle import load_params_npz, save_params_npz
    from edge_sdk.training.data import load_dataset_npz, prepare_dataset
    from edge_sdk.training.loop import EpochReport, TrainConfig, evaluate, train_local
    from edge_sdk.training.session import ModelSession
    from edge_sdk.training.state import TrainingState

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, shuffle=not args.no_shuffle
    )
    session = ModelSession.open(args.bundle, threads=args.threads)
    data = prepare_dataset(session.manifest, *load_dataset_npz(args.data))
    validation = (
        prepare_dataset(session.manifest, *load_dataset_npz(args.validation)) if args.validation else None
    )
    state = TrainingState(session, load_params_npz(Path(args.params)) if args.params else None)

    def progress(report: EpochReport) -> None:
        line = (
            f"epoch {report.epoch}/{config.epochs}  steps {report.steps}  "
            f"train loss {report.train_loss:.6f}  {report.seconds * 1000:.1f} ms"
        )
        if validation is not None:
            result = evaluate(state, validation)
            line += f"  val loss {result.loss:.6f}"
            if result.accuracy is not None:
                line += f"  val accuracy {result.accuracy:.4f}"
        print(line, flush=True)

    train_local(state, data, config, on_epoch=progress)
    save_params_npz(Path(args.out), state.get_params())
    print(f"wrote {len(state.parameter_names)} trained parameters to {args.out}", file=sys.stderr)
    return 0
