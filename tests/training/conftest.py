"""Bundles compiled once per test session by the real compiler, and the digits data they train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DIGITS_SIZES = (64, 64, 10)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits scaled to [0, 1], split 75/25 with a fixed seed: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(x))
    cut = int(0.75 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def compile_bundle(out: Path, model, **kwargs) -> Path:
    from aggregator.compiler import compile_model

    kwargs.setdefault("loss", "cross_entropy")
    kwargs.setdefault("optimizer", "sgd")
    compile_model(model, out, **kwargs)
    return out


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory) -> Path:
    """Digits MLP 64-64-10, cross-entropy, SGD, float32."""
    from aggregator import model_zoo

    return compile_bundle(tmp_path_factory.mktemp("mlp_sgd"), model_zoo.mlp(DIGITS_SIZES, seed=0))


@pytest.fixture(scope="session")
def mlp64_bundle(tmp_path_factory) -> Path:
    """The same MLP compiled in float64, for comparisons against a numpy reference."""
    from aggregator import model_zoo

    return compile_bundle(
        tmp_path_factory.mktemp("mlp_sgd64"), model_zoo.mlp(DIGITS_SIZES, seed=0, dtype="float64"), dtype="float64"
    )


@pytest.fixture(scope="session")
def adam64_bundle(tmp_path_factory) -> Path:
    """The float64 MLP with Adam: its update depends on the ``step`` input the runtime feeds."""
    from aggregator import model_zoo

    return compile_bundle(
        tmp_path_factory.mktemp("mlp_adam64"),
        model_zoo.mlp(DIGITS_SIZES, seed=0, dtype="float64"),
        optimizer="adam",
        dtype="float64",
    )


@pytest.fixture(scope="session")
def regression_bundle(tmp_path_factory) -> Path:
    """model_zoo.regression (6 -> 8 -> 3, Sigmoid/Tanh) with MSE and SGD."""
    from aggregator import model_zoo

    return compile_bundle(tmp_path_factory.mktemp("regression"), model_zoo.regression(), loss="mse")
