"""Named models the simulator compiles when a scenario gives no bundle: ``build_bundle("softmax", dir, seed=0)``.

Why names: a scenario, the CLI and the demo say "softmax" instead of shipping an ONNX file, and the
same name and seed always give the same bundle. Each model is built with ``aggregator.model_zoo``
(the shapes torch exports) and compiled with ``aggregator.compiler.compile_model`` for cross-entropy
with plain SGD: the device optimiser restarts every round (its state is not federated), so momentum
or Adam moments would only reset, and SGD keeps the update, hence its clipped norm, proportional
to the local learning rate.

- ``softmax``: multinomial logistic regression, features -> classes (650 parameters on digits).
  The demo's choice: with distributed DP at epsilon 3 over 20 rounds, the noise on every
  parameter is fixed, so the fewest useful parameters win (see README, "The demo").
- ``mlp``: one hidden ReLU layer of 32, features -> 32 -> classes (2410 parameters on digits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx

from aggregator.simulator.scenario import ScenarioError

HIDDEN = 32


def _softmax(features: int, classes: int, seed: int) -> onnx.ModelProto:
    from aggregator import model_zoo

    return model_zoo.mlp((features, classes), seed=seed)


def _mlp(features: int, classes: int, seed: int) -> onnx.ModelProto:
    from aggregator import model_zoo

    return model_zoo.mlp((features, HIDDEN, classes), seed=seed)


MODELS: dict[str, Callable[[int, int, int], onnx.ModelProto]] = {"softmax": _softmax, "mlp": _mlp}


def build_bundle(name: str, directory: Path, *, seed: int, features: int = 64, classes: int = 10) -> Path:
    """Compile the model called ``name`` (initial weights drawn from ``seed``) into a new bundle at ``directory``.

    ``features`` and ``classes`` default to scikit-learn's digits (8x8 pixels, 10 digits).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ScenarioError(f"model={name!r}: unknown model; choose one of {', '.join(sorted(MODELS))}") from None
    if features < 1 or classes < 2:
        raise ScenarioError(f"model={name!r}: need features >= 1 and classes >= 2, got {features} and {classes}")
    from aggregator.compiler import compile_model

    directory = Path(directory)
    compile_model(factory(features, classes, seed), directory, loss="cross_entropy", optimizer="sgd")
    return directory
