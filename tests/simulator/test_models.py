"""The simulator's named models compile into bundles that onnxruntime trains, deterministically per seed."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.simulator.models import MODELS, build_bundle
from aggregator.simulator.scenario import ScenarioError
from edge_sdk.training import ModelSession, TrainConfig, TrainingState, evaluate, prepare_dataset, train_local


@pytest.mark.parametrize(("name", "parameters"), [("softmax", 64 * 10 + 10), ("mlp", 64 * 32 + 32 + 32 * 10 + 10)])
def test_each_model_compiles_and_learns_digits(tmp_path, name, parameters):
    from sklearn.datasets import load_digits

    bundle = build_bundle(name, tmp_path / name, seed=0)
    assert bundle == tmp_path / name
    session = ModelSession.open(bundle, threads=1)
    assert session.manifest.loss == "cross_entropy"
    state = TrainingState(session)
    assert sum(v.size for v in state.get_params().values()) == parameters
    digits = load_digits()
    data = prepare_dataset(session.manifest, (digits.data[:600] / 16).astype(np.float32), digits.target[:600])
    before = evaluate(state, data).accuracy
    train_local(state, data, TrainConfig(epochs=3, batch_size=16, lr=0.3, seed=0))
    assert evaluate(state, data).accuracy > max(0.8, before + 0.3)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    def weights(seed: int, where: str) -> dict[str, np.ndarray]:
        return dict(np.load(build_bundle("softmax", tmp_path / where, seed=seed) / "initial_params.npz"))

    a, b, c = weights(1, "a"), weights(1, "b"), weights(2, "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_other_shapes_for_other_datasets(tmp_path):
    session = ModelSession.open(build_bundle("mlp", tmp_path / "b", seed=0, features=5, classes=3), threads=1)
    assert {tuple(v.shape) for v in TrainingState(session).get_params().values()} == {(32, 5), (32,), (3, 32), (3,)}


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(ScenarioError, match=r"model='resnet': unknown model; choose one of mlp, softmax"):
        build_bundle("resnet", tmp_path / "b", seed=0)
    assert not (tmp_path / "b").exists()
    assert set(MODELS) == {"softmax", "mlp"}
