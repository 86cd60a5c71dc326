"""The local loop: batching, shuffling, determinism, divergence, and learning digits."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.training.data import prepare_dataset
from edge_sdk.training.loop import TrainConfig, evaluate, train_local
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import NonFiniteLossError, TrainingState


@pytest.fixture(scope="module")
def session(mlp_bundle):
    return ModelSession.open(mlp_bundle)


@pytest.fixture(scope="module")
def train_data(session, digits):
    x, y, _, _ = digits
    return prepare_dataset(session.manifest, x, y)


def assert_params_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_training_is_bitwise_deterministic_for_a_seed(session, train_data):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.1, seed=5)
    first, second = TrainingState(session), TrainingState(session)
    train_local(first, train_data, config)
    train_local(second, train_data, config)
    assert_params_equal(first.get_params(), second.get_params())
    other = TrainingState(session)
    train_local(other, train_data, TrainConfig(epochs=2, batch_size=32, lr=0.1, seed=6))
    assert not np.array_equal(other.get_params()["layers.0.weight"], first.get_params()["layers.0.weight"])


def test_two_threads_train_deterministically_too(mlp_bundle, train_data):
    session = ModelSession.open(mlp_bundle, threads=2)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, seed=3)
    first, second = TrainingState(session), TrainingState(session)
    train_local(first, train_data, config)
    train_local(second, train_data, config)
    assert_params_equal(first.get_params(), second.get_params())


def test_full_batch_epoch_is_exactly_one_step(session, train_data):
    n = len(train_data)
    looped = TrainingState(session)
    reports = train_local(looped, train_data, TrainConfig(epochs=1, batch_size=n, lr=0.2, seed=9))
    assert reports[0].steps == 1 and looped.steps == 1
    direct = TrainingState(session)
    loss = direct.train_step(train_data.x, train_data.y, lr=0.2)
    assert reports[0].train_loss == pytest.approx(loss, rel=1e-6)
    for name, value in direct.get_params().items():
        np.testing.assert_allclose(looped.get_params()[name], value, rtol=1e-6, atol=1e-7)


def test_batch_size_above_the_dataset_is_one_full_batch(session, train_data):
    state = TrainingState(session)
    reports = train_local(state, train_data, TrainConfig(epochs=2, batch_size=10 * len(train_data), lr=0.1))
    assert [r.steps for r in reports] == [1, 1] and state.steps == 2


def test_partial_last_batch_is_trained_on(session, train_data):
    """37 examples in batches of 16: steps of 16, 16 and 5; without shuffling, the same as three manual steps."""
    small = prepare_dataset(session.manifest, train_data.x[:37], train_data.y[:37])
    looped = TrainingState(session)
    reports = train_local(looped, small, TrainConfig(epochs=2, batch_size=16, lr=0.1, shuffle=False))
    assert [r.steps for r in reports] == [3, 3] and looped.steps == 6
    manual = TrainingState(session)
    for _ in range(2):
        for start in (0, 16, 32):
            manual.train_step(small.x[start : start + 16], small.y[start : start + 16], lr=0.1)
    assert_params_equal(looped.get_params(), manual.get_params())


def test_nan_in_features_stops_training_naming_epoch_and_step(session, train_data):
    x = train_data.x[:40].copy()
    x[21, 0] = np.nan  # lands in the second batch of 20 (no shuffling)
    data = prepare_dataset(session.manifest, x, train_data.y[:40])
    state = TrainingState(session)
    seen = []
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 of 2") as info:
        train_local(state, data, TrainConfig(epochs=3, batch_size=20, lr=0.1, shuffle=False), on_epoch=seen.append)
    assert (info.value.epoch, info.value.batch, info.value.step) == (1, 2, 2)
    assert seen == [] and state.steps == 1
    expected = TrainingState(session)
    expected.train_step(data.x[:20], data.y[:20], lr=0.1)
    assert_params_equal(state.get_params(), expected.get_params())


def test_huge_learning_rate_stops_training_with_finite_params_left(session, train_data):
    state = TrainingState(session)
    with pytest.raises(NonFiniteLossError, match=r"training diverged at epoch \d+, step \d+") as info:
        train_local(state, train_data, TrainConfig(epochs=5, batch_size=32, lr=1e30, seed=0))
    assert info.value.step >= 2
    assert all(np.isfinite(v).all() for v in state.get_params().values())
    assert state.steps in (info.value.step - 1, info.value.step - 2)


def test_evaluate_reports_loss_and_accuracy(session, train_data):
    state = TrainingState(session)
    whole = evaluate(state, train_data)
    batched = evaluate(state, train_data, batch_size=100)
    assert whole.examples == len(train_data)
    assert batched.loss == pytest.approx(whole.loss, rel=1e-5)
    assert batched.accuracy == whole.accuracy and 0.0 <= whole.accuracy <= 1.0
    loss, logits = state.evaluate_batch(train_data.x, train_data.y)
    assert whole.accuracy == pytest.approx(np.mean(logits.argmax(1) == train_data.y))
    assert whole.loss == pytest.approx(loss, rel=1e-6)


def test_mse_evaluation_has_no_accuracy(regression_bundle):
    session = ModelSession.open(regression_bundle)
    rng = np.random.default_rng(0)
    data = prepare_dataset(session.manifest, rng.random((20, 6)), rng.random((20, 3)))
    state = TrainingState(session)
    before = evaluate(state, data)
    train_local(state, data, TrainConfig(epochs=20, batch_size=5, lr=0.5))
    after = evaluate(state, data)
    assert before.accuracy is None and after.accuracy is None
    assert after.loss < before.loss


def test_mlp_learns_digits_to_ninety_percent(session, digits):
    x_train, y_train, x_test, y_test = digits
    train = prepare_dataset(session.manifest, x_train, y_train)
    test = prepare_dataset(session.manifest, x_test, y_test)
    state = TrainingState(session)
    assert evaluate(state, test).accuracy < 0.3
    reports = train_local(state, train, TrainConfig(epochs=20, batch_size=16, lr=0.05, seed=0))
    assert reports[-1].train_loss < reports[0].train_loss
    assert evaluate(state, test).accuracy >= 0.90


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": -1, "batch_size": 1, "lr": 0.1}, "epochs must be >= 0"),
        ({"epochs": 1, "batch_size": 0, "lr": 0.1}, "batch_size must be >= 1"),
        ({"epochs": 1, "batch_size": 1, "lr": float("nan")}, "lr must be a finite number"),
    ],
)
def test_invalid_training_config_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.01), ("momentum", 0.05)])
def test_mlp_reaches_ninety_percent_on_digits_in_three_epochs(tmp_path, digits, optimizer, lr):
    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    compile_model(model_zoo.mlp((64, 64, 10), seed=0), tmp_path, loss="cross_entropy", optimizer=optimizer)
    session = ModelSession.open(tmp_path)
    x_train, y_train, x_test, y_test = digits
    state = TrainingState(session)
    train_local(state, prepare_dataset(session.manifest, x_train, y_train),
                TrainConfig(epochs=3, batch_size=32, lr=lr, seed=0))
    assert evaluate(state, prepare_dataset(session.manifest, x_test, y_test)).accuracy >= 0.90
