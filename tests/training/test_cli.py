"""`fleetlearn train` and `fleetlearn evaluate`, end to end through the CLI dispatcher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_sdk.cli import main
from edge_sdk.training.bundle import load_params_npz
from edge_sdk.training.data import prepare_dataset
from edge_sdk.training.loop import TrainConfig, train_local
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import TrainingState


@pytest.fixture(scope="module")
def data_files(digits, tmp_path_factory):
    x_train, y_train, x_test, y_test = digits
    root = tmp_path_factory.mktemp("data")
    np.savez(root / "train.npz", x=x_train, y=y_train)
    np.savez(root / "test.npz", x=x_test, y=y_test)
    return root / "train.npz", root / "test.npz"


def test_train_then_evaluate_reaches_ninety_percent(mlp_bundle, data_files, tmp_path, capsys):
    train, test = data_files
    out = tmp_path / "trained.npz"
    argv = ["train", str(mlp_bundle), "--data", str(train), "--epochs", "20", "--batch-size", "16",
            "--lr", "0.05", "--seed", "4", "--out", str(out), "--validation", str(test)]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == [f"{e}/20" for e in range(1, 21)]
    assert "val accuracy" in lines[-1]
    trained = load_params_npz(out)
    initial = ModelSession.open(mlp_bundle).bundle.initial_params
    assert trained.keys() == initial.keys()

    assert main(["evaluate", str(mlp_bundle), "--data", str(test), "--params", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] >= 0.90 and result["examples"] == 450
    assert main(["evaluate", str(mlp_bundle), "--data", str(test), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] < 0.3


def test_cli_training_equals_library_training(mlp_bundle, data_files, tmp_path, digits):
    train, _ = data_files
    out = tmp_path / "p.npz"
    argv = ["train", str(mlp_bundle), "--data", str(train), "--epochs", "2", "--batch-size", "50",
            "--lr", "0.05", "--seed", "11", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    session = ModelSession.open(mlp_bundle)
    state = TrainingState(session)
    train_local(state, prepare_dataset(session.manifest, digits[0], digits[1]),
                TrainConfig(epochs=2, batch_size=50, lr=0.05, seed=11))
    saved = load_params_npz(out)
    for name, value in state.get_params().items():
        np.testing.assert_array_equal(saved[name], value)


def test_full_batch_cli_epoch_is_one_step(mlp_bundle, data_files, tmp_path, digits, capsys):
    train, _ = data_files
    n = len(digits[0])
    out = tmp_path / "p.npz"
    argv = ["train", str(mlp_bundle), "--data", str(train), "--epochs", "1", "--batch-size", str(n),
            "--lr", "0.3", "--seed", "0", "--out", str(out)]
    assert main(argv) == 0
    assert "steps 1 " in capsys.readouterr().out
    session = ModelSession.open(mlp_bundle)
    data = prepare_dataset(session.manifest, digits[0], digits[1])
    state = TrainingState(session)
    state.train_step(data.x, data.y, lr=0.3)
    saved = load_params_npz(out)
    for name, value in state.get_params().items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-6, atol=1e-7)


def test_train_continues_from_given_params(mlp_bundle, data_files, tmp_path, capsys):
    train, test = data_files
    first, second = tmp_path / "1.npz", tmp_path / "2.npz"
    common = ["--data", str(train), "--batch-size", "32", "--lr", "0.1", "--seed", "1"]
    assert main(["train", str(mlp_bundle), *common, "--epochs", "1", "--out", str(first)]) == 0
    assert main(["train", str(mlp_bundle), *common, "--epochs", "1", "--params", str(first), "--out", str(second)]) == 0
    capsys.readouterr()
    losses = []
    for params in (first, second):
        assert main(["evaluate", str(mlp_bundle), "--data", str(test), "--params", str(params), "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[1] < losses[0]


def test_float_labels_exit_with_a_one_line_error(mlp_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 64)), y=np.zeros(4))
    assert main(["evaluate", str(mlp_bundle), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "fleetlearn evaluate: error: y has dtype float64" in err and "Traceback" not in err


def test_diverging_training_exits_with_the_epoch_and_step(mlp_bundle, tmp_path, capsys):
    data = tmp_path / "nan.npz"
    x = np.random.default_rng(0).random((10, 64))
    x[7, 3] = np.nan
    np.savez(data, x=x, y=np.arange(10))
    out = tmp_path / "p.npz"
    argv = ["train", str(mlp_bundle), "--data", str(data), "--epochs", "1", "--batch-size", "4",
            "--lr", "0.1", "--no-shuffle", "--out", str(out)]
    assert main(argv) == 2
    assert "training diverged at epoch 1, step 2 of 3" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_prints_text_without_json(mlp_bundle, data_files, capsys):
    _, test = data_files
    assert main(["evaluate", str(mlp_bundle), "--data", str(test)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss ") and " accuracy " in out and "examples 450" in out
