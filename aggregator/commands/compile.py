"""``fleetlearn compile``: turn an ONNX inference model into a training bundle for devices."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "compile"
HELP = "compile an ONNX inference model into a training bundle (train_step.onnx, eval.onnx, manifest)"

LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
HYPERPARAMETERS = ("momentum", "beta1", "beta2", "eps", "weight_decay")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="inference model (opset 13-21, e.g. torch.onnx.export)")
    parser.add_argument("--out", required=True, metavar="BUNDLE", help="output bundle directory")
    parser.add_argument("--loss", required=True, choices=LOSSES, help="cross_entropy on logits, or mse")
    parser.add_argument("--optimizer", required=True, choices=OPTIMIZERS,
                        help="fused update, following torch.optim's conventions")
    parser.add_argument(
        "--trainable", nargs="+", metavar="PREFIX",
        help="train only parameters whose name equals or starts with a PREFIX; the rest are frozen constants "
             "(default: train all)",
    )
    parser.add_argument("--momentum", type=float, help="momentum factor (momentum; default 0.9)")
    parser.add_argument("--beta1", type=float, help="Adam beta1 (default 0.9)")
    parser.add_argument("--beta2", type=float, help="Adam beta2 (default 0.999)")
    parser.add_argument("--eps", type=float, help="Adam epsilon (default 1e-8)")
    parser.add_argument(
        "--weight-decay", type=float,
        help="L2 penalty added to the gradient (sgd, momentum, adam; default 0) or decoupled decay (adamw; "
             "default 0.01)",
    )
    parser.add_argument("--output", metavar="NAME",
                        help="the model output to train when it has several (default: its only float output)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the compiled graphs (default float32)")


def run(args: argparse.Namespace) -> int:
    from aggregator.compiler import compile_model
    from aggregator.compiler.errors import CompileError

    params = {name: getattr(args, name) for name in HYPERPARAMETERS if getattr(args, name) is not None}
    if "momentum" in params and args.optimizer != "momentum":
        raise CompileError(f"--momentum applies to --optimizer momentum, not {args.optimizer}")
    manifest = compile_model(
        args.model, args.out, loss=args.loss, optimizer=args.optimizer, optimizer_params=params,
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
