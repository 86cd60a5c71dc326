"""``fleetlearn train``: train a bundle locally on an .npz dataset, to check it before deploying it."""

from __future__ import annotations

import argparse
import sys

from edge_sdk.commands._arguments import add_bundle_arguments, finite_float, integer_at_least

NAME = "train"
HELP = "train a compiled bundle locally on FILE.npz (arrays x, y) and save the trained parameters"
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_arguments(parser, "training data: arrays x and y")
    parser.add_argument("--epochs", type=integer_at_least(1), required=True, help="passes over the data (>= 1)")
    parser.add_argument(
        "--batch-size", type=integer_at_least(1),
        help="examples per step; the last partial batch is used (default: the profile's; required without one)",
    )
    parser.add_argument("--lr", type=finite_float(0.0), required=True, help="learning rate (finite, >= 0)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0,
                        help="shuffling seed (>= 0); same seed, same parameters")
    parser.add_argument("--no-shuffle", action="store_true", help="visit examples in file order")
    parser.add_argument(
        "--params", metavar="INIT.npz", help="start from these parameters instead of the bundle's initial ones"
    )
    parser.add_argument(
        "--validation", metavar="FILE.npz", help="also report loss/accuracy on this dataset after each epoch"
    )
    parser.add_argument(
        "--out", required=True, metavar="PARAMS.npz",
        help="where to write the trained parameters (atomically; never one of the inputs)",
    )


def run(args: argparse.Namespace) -> int:
    from edge_sdk.commands._outputs import check_output_file
    from edge_sdk.config import load_profile
    from edge_sdk.errors import ConfigError
    from edge_sdk.training import (
        EpochReport,
        ModelSession,
        TrainConfig,
        TrainingState,
        evaluate,
        load_dataset_npz,
        load_params_npz,
        prepare_dataset,
        save_params_npz,
        train_local,
    )

    out = check_output_file(
        "--out", args.out,
        [("BUNDLE", args.bundle), ("--data", args.data), ("--validation", args.validation), ("--params", args.params)],
    )
    profile = load_profile(args.profile) if args.profile else None
    batch_size = args.batch_size or (profile.batch_size if profile else None)
    if batch_size is None:
        raise ConfigError("--batch-size is required without --profile")
    threads = args.threads or (profile.threads if profile else 1)
    if profile is not None:
        profile.check_batch_size(batch_size)
        profile.check_memory(args.bundle, batch_size)
    config = TrainConfig(epochs=args.epochs, batch_size=batch_size, lr=args.lr, seed=args.seed,
                         shuffle=not args.no_shuffle)
    session = ModelSession.open(args.bundle, threads=threads)
    data = prepare_dataset(session.manifest, *load_dataset_npz(args.data))
    validation = (
        prepare_dataset(session.manifest, *load_dataset_npz(args.validation)) if args.validation else None
    )
    state = TrainingState(session, load_params_npz(args.params) if args.params else None)
    completed = 0

    def progress(report: EpochReport) -> None:
        nonlocal completed
        completed = report.epoch
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

    try:
        train_local(state, data, config, on_epoch=progress)
    except KeyboardInterrupt:
        print(
            f"fleetlearn train: interrupted after {completed} of {config.epochs} epochs; nothing was saved "
            f"({out} is untouched)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    save_params_npz(out, state.get_params())
    print(f"wrote {len(state.parameter_names)} trained parameters to {out}", file=sys.stderr)
    return 0
