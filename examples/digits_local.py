"""Train scikit-learn's digits on one simulated device, end to end (``make demo``).

1. Build the inference model an exporter would give us: an MLP 64-64-10 from ``aggregator.model_zoo``.
2. Compile it on the host into a training bundle (train_step.onnx + eval.onnx in plain ai.onnx ops).
3. On the "device": load the bundle with plain onnxruntime and train locally, printing test
   accuracy after every epoch.

    python examples/digits_local.py [--epochs 20] [--batch-size 16] [--lr 0.05] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator import model_zoo  # noqa: E402
from aggregator.compiler import compile_model  # noqa: E402
from edge_sdk.training import (  # noqa: E402
    EpochReport,
    ModelSession,
    TrainConfig,
    TrainingState,
    evaluate,
    prepare_dataset,
    train_local,
)


def split_digits(seed: int, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data / 16.0  # pixel intensities 0..16 -> [0, 1]
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    return x[order[:cut]], digits.target[order[:cut]], x[order[cut:]], digits.target[order[cut:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="data split, initial weights and shuffling")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="keep the bundle here (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = args.out or Path(tmp) / "digits_bundle"
        started = time.perf_counter()
        model = model_zoo.mlp((64, 64, 10), seed=args.seed)
        compile_model(model, bundle_dir, loss="cross_entropy", optimizer="sgd")
        print(f"compiled MLP 64-64-10 into {bundle_dir} in {time.perf_counter() - started:.2f}s")

        session = ModelSession.open(bundle_dir, threads=args.threads)
        x_train, y_train, x_test, y_test = split_digits(args.seed)
        train = prepare_dataset(session.manifest, x_train, y_train)
        test = prepare_dataset(session.manifest, x_test, y_test)
        state = TrainingState(session)
        print(f"device: {len(train)} training and {len(test)} test images; "
              f"untrained test accuracy {evaluate(state, test).accuracy:.3f}")

        def report(epoch: EpochReport) -> None:
            result = evaluate(state, test)
            print(f"epoch {epoch.epoch:2d}/{args.epochs}  train loss {epoch.train_loss:.4f}  "
                  f"test loss {result.loss:.4f}  test accuracy {result.accuracy:.3f}  "
                  f"({epoch.steps} steps, {epoch.seconds * 1000:.0f} ms)")

        started = time.perf_counter()
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        train_local(state, train, config, on_epoch=report)
        final = evaluate(state, test)
        print(f"trained in {time.perf_counter() - started:.2f}s: test accuracy {final.accuracy:.3f}")
    return 0 if final.accuracy >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
