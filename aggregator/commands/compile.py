"""``fleetlearn compile``: turn an ONNX inference model into a training bundle for devices.

The bundle is built in a temporary directory beside ``--out`` and checked by loading both graphs
in onnxruntime (so a graph onnxruntime cannot run, such as a float64 Conv, fails here rather than
on the device), then renamed into place. ``--out`` must not exist, or be an empty directory; an
existing bundle is replaced only with ``--force``, and nothing else is ever overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_sdk.commands._arguments import finite_float

NAME = "compile"
HELP = "compile an ONNX inference model into a training bundle (train_step.onnx, eval.onnx, manifest)"
EXTRA = "host"

LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
HYPERPARAMETERS = ("momentum", "beta1", "beta2", "eps", "weight_decay")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="inference model (opset 13-21, e.g. torch.onnx.export)")
    parser.add_argument("--out", required=True, metavar="BUNDLE",
                        help="output bundle directory: new, empty, or (with --force) an existing bundle")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--loss", required=True, choices=LOSSES, help="cross_entropy on logits, or mse")
    parser.add_argument("--optimizer", required=True, choices=OPTIMIZERS,
                        help="fused update, following torch.optim's conventions")
    parser.add_argument(
        "--trainable", nargs="+", metavar="PREFIX",
        help="train only parameters whose name equals or starts with a PREFIX; the rest are frozen constants "
             "(default: train all)",
    )
    parser.add_argument("--momentum", type=finite_float(0.0), help="momentum factor (momentum; default 0.9)")
    parser.add_argument("--beta1", type=finite_float(0.0), help="Adam beta1 (default 0.9)")
    parser.add_argument("--beta2", type=finite_float(0.0), help="Adam beta2 (default 0.999)")
    parser.add_argument("--eps", type=finite_float(0.0), help="Adam epsilon (default 1e-8)")
    parser.add_argument(
        "--weight-decay", type=finite_float(0.0),
        help="L2 penalty added to the gradient (sgd, momentum, adam; default 0) or decoupled decay (adamw; "
             "default 0.01)",
    )
    parser.add_argument("--output", metavar="NAME",
                        help="the model output to train when it has several (default: its only float output)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the compiled graphs (default float32)")


def run(args: argparse.Namespace) -> int:
    from aggregator.commands._bundle_output import BundleOutput
    from aggregator.compiler import compile_model
    from aggregator.compiler.errors import CompileError

    params = {name: getattr(args, name) for name in HYPERPARAMETERS if getattr(args, name) is not None}
    if "momentum" in params and args.optimizer != "momentum":
        raise CompileError(f"--momentum applies to --optimizer momentum, not {args.optimizer}")
    output = BundleOutput(args.out, model=args.model, force=args.force)
    with output.staging() as staging:
        manifest = compile_model(
            args.model, staging, loss=args.loss, optimizer=args.optimizer, optimizer_params=params,
            trainable=args.trainable, dtype=args.dtype, output=args.output,
        )
    summary = {
        "bundle": str(args.out),
        "opset": manifest.opset,
        "trainable": [p.name for p in manifest.trainable],
        "frozen": [p.name for p in manifest.frozen],
        "optimizer": manifest.optimizer,
        "optimizer_params": manifest.optimizer_params,
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
