"""PyTorch -> ONNX -> training bundle -> on-device training, and a check that it trains as PyTorch does.

1. A small PyTorch CNN for scikit-learn's digits (conv, BatchNorm, ReLU, pool, linear).
2. ``aggregator.export.torch_to_onnx``: the export settings that keep every trained parameter
   under its PyTorch name (no constant folding of BatchNorm, no merging of equal initializers).
3. ``aggregator.compiler.compile_model``: the bundle a device runs with plain onnxruntime.
4. ``edge_sdk.training``: train a few epochs on the "device", print accuracy, and compare the
   first SGD step's loss with PyTorch's own on the same batch.

torch is only a host-side dependency (``pip install 'fleetlearn[torch]'``); without it the
example says so and exits with status 3.

    python examples/torch_to_bundle.py [--epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.compiler import compile_model  # noqa: E402
from aggregator.export import torch_to_onnx  # noqa: E402
from edge_sdk.training import ModelSession, TrainConfig, TrainingState, evaluate, prepare_dataset, train_local  # noqa: E402

NO_TORCH = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_to_bundle: PyTorch is not installed; install it with: pip install 'fleetlearn[torch]'",
              file=sys.stderr)
        return NO_TORCH
    from sklearn.datasets import load_digits

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10),
    )
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.data))
    x = (digits.data[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target[order].astype(np.int64)
    cut = int(0.8 * len(x))

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, bundle = Path(tmp) / "cnn.onnx", Path(tmp) / "bundle"
        model.train()  # BatchNorm in training mode: batch statistics, running statistics updated
        torch_to_onnx(model, torch.zeros(4, 1, 8, 8), onnx_path)
        manifest = compile_model(onnx_path, bundle, loss="cross_entropy", optimizer="sgd")
        session = ModelSession.open(bundle, threads=1)
        state = TrainingState(session)
        print(f"exported {onnx_path.name}, compiled {len(manifest.trainable)} trainable tensors: "
              f"{', '.join(p.name for p in manifest.trainable)}")

        batch_x, batch_y = x[:32], y[:32]
        torch_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(batch_x)), torch.from_numpy(batch_y))
        first = train_local(state, prepare_dataset(session.manifest, batch_x, batch_y),
                            TrainConfig(epochs=1, batch_size=32, lr=args.lr, shuffle=False))
        onnx_loss = first[0].train_loss
        print(f"first step on the same batch: torch loss {torch_loss.item():.6f}, bundle loss {onnx_loss:.6f}")

        train, test = (prepare_dataset(session.manifest, x[:cut], y[:cut]),
                       prepare_dataset(session.manifest, x[cut:], y[cut:]))
        for epoch in range(1, args.epochs + 1):
            done = train_local(state, train, TrainConfig(epochs=1, batch_size=32, lr=args.lr, seed=epoch))
            print(f"epoch {epoch}: train loss {done[0].train_loss:.4f}, test accuracy "
                  f"{evaluate(state, test).accuracy:.3f}", flush=True)
        accuracy = evaluate(state, test).accuracy
        same = abs(torch_loss.item() - onnx_loss) <= 1e-4 * max(1.0, abs(onnx_loss))
        print(f"RESULT accuracy={accuracy:.3f} first_loss_matches_torch={same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
