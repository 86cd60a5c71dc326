"""A device's parameter buffers: get/set, swapped steps, determinism, NaN handling, numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import NonFiniteLossError, ParameterError, TrainingState


def batch(n: int, d: int = 64, classes: int = 10, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(dtype), rng.integers(0, classes, n).astype(np.int64)


def mlp_reference_sgd(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float):
    """One SGD step of Linear-ReLU-Linear + mean softmax cross-entropy, by hand (torch weight layout)."""
    w1, b1 = params["layers.0.weight"], params["layers.0.bias"]
    w2, b2 = params["layers.2.weight"], params["layers.2.bias"]
    pre = x @ w1.T + b1
    h = np.maximum(pre, 0)
    logits = h @ w2.T + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -log_p[np.arange(n), y].mean()
    d_logits = np.exp(log_p)
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    d_h = (d_logits @ w2) * (pre > 0)
    grads = {
        "layers.0.weight": d_h.T @ x,
        "layers.0.bias": d_h.sum(0),
        "layers.2.weight": d_logits.T @ h,
        "layers.2.bias": d_logits.sum(0),
    }
    return loss, {k: params[k] - lr * g for k, g in grads.items()}


@pytest.fixture(scope="module")
def session(mlp_bundle):
    return ModelSession.open(mlp_bundle)


def test_new_state_starts_from_the_bundles_initial_params(session):
    params = TrainingState(session).get_params()
    assert params.keys() == session.bundle.initial_params.keys()
    for name, value in params.items():
        np.testing.assert_array_equal(value, session.bundle.initial_params[name])


def test_get_params_returns_copies_that_training_does_not_touch(session):
    state = TrainingState(session)
    before = state.get_params()
    before["layers.0.bias"][:] = 123.0
    assert not np.any(state.get_params()["layers.0.bias"] == 123.0)
    snapshot = state.get_params()
    state.train_step(*batch(8), lr=0.1)
    after = state.get_params()
    assert not np.array_equal(after["layers.0.weight"], snapshot["layers.0.weight"])
    np.testing.assert_array_equal(snapshot["layers.0.weight"], session.bundle.initial_params["layers.0.weight"])


def test_set_then_get_params_round_trips_exactly(session):
    state = TrainingState(session)
    rng = np.random.default_rng(7)
    new = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in state.get_params().items()}
    state.set_params(new)
    got = state.get_params()
    for name in new:
        np.testing.assert_array_equal(got[name], new[name])
    # ... and the next step starts from them.
    loss, _ = state.evaluate_batch(*batch(4))
    state.set_params(session.bundle.initial_params)
    assert state.evaluate_batch(*batch(4))[0] != loss


def test_set_params_rejects_unknown_and_missing_names(session):
    state = TrainingState(session)
    params = state.get_params()
    params["layers.9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ParameterError, match=r"unknown \['layers.9.weight'\]"):
        state.set_params(params)
    params = state.get_params()
    del params["layers.2.bias"]
    with pytest.raises(ParameterError, match=r"missing \['layers.2.bias'\]"):
        state.set_params(params)


def test_set_params_rejects_wrong_shape_or_dtype_naming_the_expected_one(session):
    state = TrainingState(session)
    params = state.get_params()
    params["layers.0.weight"] = params["layers.0.weight"][:-1]
    with pytest.raises(ParameterError, match=r"'layers.0.weight' is float32\[63, 64\].*expects float32\[64, 64\]"):
        state.set_params(params)
    params = state.get_params()
    params["layers.0.bias"] = params["layers.0.bias"].astype(np.float64)
    with pytest.raises(ParameterError, match=r"'layers.0.bias' is float64\[64\].*expects float32\[64\]"):
        state.set_params(params)


def test_train_step_matches_a_numpy_reference_for_mlp_sgd(mlp64_bundle):
    state = TrainingState(ModelSession.open(mlp64_bundle))
    params = state.get_params()
    x, y = batch(16, dtype=np.float64)
    expected_loss, expected = mlp_reference_sgd(params, x, y, lr=0.5)
    loss = state.train_step(x, y, lr=0.5)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    got = state.get_params()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12)


def test_consecutive_steps_chain_through_the_swapped_buffers(mlp64_bundle):
    """Five steps alternate over the buffer ring; each must start from the previous step's output."""
    state = TrainingState(ModelSession.open(mlp64_bundle))
    params = state.get_params()
    for seed in range(5):
        x, y = batch(8, seed=seed, dtype=np.float64)
        _, params = mlp_reference_sgd(params, x, y, lr=0.3)
        state.train_step(x, y, lr=0.3)
    assert state.steps == 5
    got = state.get_params()
    for name in params:
        np.testing.assert_allclose(got[name], params[name], rtol=1e-9, atol=1e-12)


def test_adam_steps_receive_an_increasing_step_count(adam64_bundle):
    """Adam's bias correction depends on ``step``: three steps match a reference only if it is fed 1, 2, 3."""
    session = ModelSession.open(adam64_bundle)
    hp = session.manifest.optimizer_params
    beta1, beta2, eps = hp["beta1"], hp["beta2"], hp["eps"]
    state = TrainingState(session)
    params = state.get_params()
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    lr = 0.01
    for t in range(1, 4):
        x, y = batch(8, seed=t, dtype=np.float64)
        _, stepped = mlp_reference_sgd(params, x, y, lr=1.0)
        for k in params:
            g = params[k] - stepped[k]
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g * g
            params[k] = params[k] - lr * (m[k] / (1 - beta1**t)) / (np.sqrt(v[k] / (1 - beta2**t)) + eps)
        state.train_step(x, y, lr=lr)
    got = state.get_params()
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=1e-7, atol=1e-9)
    # the graph stores v rescaled; the state is reported as torch holds it (exp_avg, exp_avg_sq)
    moments = state.get_optimizer_state()
    for spec in session.manifest.state:
        expected = (m if spec.kind == "m" else v)[spec.param]
        np.testing.assert_allclose(moments[spec.name], expected, rtol=1e-7, atol=1e-12, err_msg=spec.name)
    assert all(np.any(s != 0) for s in state.get_optimizer_state().values())
    state.reset_optimizer_state()
    assert state.steps == 0
    assert all(not np.any(s) for s in state.get_optimizer_state().values())


def test_states_sharing_one_session_do_not_interfere(session):
    x1, y1 = batch(8, seed=1)
    x2, y2 = batch(8, seed=2)
    alone = TrainingState(session)
    for _ in range(3):
        alone.train_step(x1, y1, lr=0.1)
    a, b = TrainingState(session), TrainingState(session)
    for _ in range(3):
        a.train_step(x1, y1, lr=0.1)
        b.train_step(x2, y2, lr=0.1)
    for name, value in alone.get_params().items():
        np.testing.assert_array_equal(a.get_params()[name], value)
    assert not np.array_equal(a.get_params()["layers.0.weight"], b.get_params()["layers.0.weight"])


def test_rebinding_a_refilled_batch_buffer_uses_its_new_contents(session):
    """The step binds x/y by pointer and skips rebinding an unchanged buffer: refilled data must still count."""
    x, y = batch(8, seed=3)
    reused = TrainingState(session)
    fresh = TrainingState(session)
    buf_x, buf_y = np.empty_like(x), np.empty_like(y)
    for seed in range(4):
        xs, ys = batch(8, seed=seed)
        buf_x[:], buf_y[:] = xs, ys
        reused.train_step(buf_x, buf_y, lr=0.1)
        fresh.train_step(xs.copy(), ys.copy(), lr=0.1)
    for name, value in fresh.get_params().items():
        np.testing.assert_array_equal(reused.get_params()[name], value)


def test_nan_in_x_raises_and_keeps_the_last_good_params(session):
    state = TrainingState(session)
    x, y = batch(8)
    state.train_step(x, y, lr=0.1)
    good = state.get_params()
    x_bad = x.copy()
    x_bad[3, 5] = np.nan
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2") as info:
        state.train_step(x_bad, y, lr=0.1)
    assert info.value.step == 2 and not info.value.rolled_back
    assert state.steps == 1
    for name, value in state.get_params().items():
        np.testing.assert_array_equal(value, good[name])
    # The device carries on from the good parameters.
    state.train_step(x, y, lr=0.1)
    assert state.steps == 2


def test_batch_of_the_wrong_dtype_is_a_typed_error(session):
    state = TrainingState(session)
    x, y = batch(4)
    with pytest.raises(ParameterError, match="expects x float32, y int64"):
        state.train_step(x.astype(np.float64), y, lr=0.1)


def test_step_whose_update_overflowed_is_rolled_back_when_the_next_loss_is_nan(session):
    """Step 1 has a finite loss but writes inf parameters; step 2's loss is NaN. The device must end up
    with the parameters from before step 1, the newest finite ones, which the third buffer still holds."""
    state = TrainingState(session)
    x, y = batch(8)
    x *= 1000.0
    loss = state.train_step(x, y, lr=1e37)
    assert np.isfinite(loss)
    assert not all(np.isfinite(v).all() for v in state.get_params().values())
    with pytest.raises(NonFiniteLossError, match="rolled back to before step 1") as info:
        state.train_step(x, y, lr=1e37)
    assert info.value.rolled_back and info.value.step == 2
    assert state.steps == 0
    for name, value in state.get_params().items():
        np.testing.assert_array_equal(value, session.bundle.initial_params[name])


def test_states_sharing_one_session_train_concurrently_from_threads(session):
    """The fleet simulator drives many devices on one session from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [batch(16, seed=seed) for seed in range(4)]

    def train(seed: int) -> dict[str, np.ndarray]:
        state = TrainingState(session)
        x, y = batches[seed]
        for _ in range(30):
            state.train_step(x, y, lr=0.05)
        return state.get_params()

    sequential = [train(seed) for seed in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(train, range(4)))
    for alone, together in zip(sequential, concurrent, strict=True):
        for name, value in alone.items():
            np.testing.assert_array_equal(together[name], value)


def test_adam_state_in_two_sets_survives_a_nan_batch_exactly(adam64_bundle):
    """Parameters cycle through three sets and Adam's moments through two, so the (parameter, state) pairs
    run through all six bindings; a NaN batch in between must change nothing, moments included."""
    session = ModelSession.open(adam64_bundle)
    clean, interrupted = TrainingState(session), TrainingState(session)
    for t in range(8):
        x, y = batch(8, seed=t, dtype=np.float64)
        clean.train_step(x, y, lr=0.01)
        if t in (2, 5):
            x_bad = x.copy()
            x_bad[0, 0] = np.nan
            with pytest.raises(NonFiniteLossError):
                interrupted.train_step(x_bad, y, lr=0.01)
        interrupted.train_step(x, y, lr=0.01)
    assert clean.steps == interrupted.steps == 8
    for name, value in clean.get_params().items():
        np.testing.assert_array_equal(interrupted.get_params()[name], value)
    for name, value in clean.get_optimizer_state().items():
        np.testing.assert_array_equal(interrupted.get_optimizer_state()[name], value)


def test_adam_overflow_rollback_restores_params_and_resets_the_moments(adam64_bundle):
    """Two state sets cannot hold the moments from before the overflowed step: the rollback zeroes them and
    restarts the step count, so Adam's bias correction restarts too."""
    session = ModelSession.open(adam64_bundle)
    state = TrainingState(session)
    x, y = batch(8, dtype=np.float64)
    state.train_step(x, y, lr=0.01)
    good = state.get_params()
    state.train_step(x, y, lr=float("inf"))  # a finite loss at good params, non-finite parameters out
    assert not all(np.isfinite(v).all() for v in state.get_params().values())
    with pytest.raises(NonFiniteLossError, match="optimiser state reset") as info:
        state.train_step(x, y, lr=0.01)
    assert info.value.rolled_back and state.steps == 0
    for name, value in state.get_params().items():
        np.testing.assert_array_equal(value, good[name])
    assert all(not np.any(s) for s in state.get_optimizer_state().values())
    state.train_step(x, y, lr=0.01)
    assert state.steps == 1 and all(np.isfinite(v).all() for v in state.get_params().values())



def test_a_bundle_carrying_conv_weights_flattened_trains_and_evaluates_in_their_own_shape(tmp_path):
    """SGD conv weights live in the graphs as 2-D (manifest ``graph_shape``); the state binds views of
    its 4-D buffers, so get_params, evaluate_batch and chained steps agree with the graphs run directly."""
    import onnxruntime as ort

    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    compile_model(model_zoo.cnn(seed=0), tmp_path / "cnn", loss="cross_entropy", optimizer="sgd")
    session = ModelSession.open(tmp_path / "cnn")
    m = session.manifest
    flat = [p for p in m.trainable if p.graph_shape is not None]
    assert flat and all(len(p.graph_shape) == 2 and len(p.shape) == 4 for p in flat)
    state = TrainingState(session)
    graph = ort.InferenceSession(str(session.bundle.train_step_path), providers=["CPUExecutionProvider"])
    evaluator = ort.InferenceSession(str(session.bundle.eval_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    params = {p.name: session.bundle.initial_params[p.name].reshape(p.bound_shape) for p in m.trainable}
    for step in (1, 2):
        state.train_step(x, y, 0.1)
        feeds = {"x": x, "y": y, "lr": np.asarray(0.1, np.float32), "step": np.asarray(step, np.int64),
                 **{p.input: params[p.name] for p in m.trainable}}
        out = dict(zip([o.name for o in graph.get_outputs()], graph.run(None, feeds), strict=True))
        params = {p.name: out[p.output] for p in m.trainable}
    got = state.get_params()
    for p in m.trainable:
        assert got[p.name].shape == p.shape
        np.testing.assert_allclose(got[p.name], params[p.name].reshape(p.shape), rtol=1e-6, atol=1e-7)
    loss, _ = state.evaluate_batch(x, y)
    expected, _ = evaluator.run(None, {"x": x, "y": y, **{p.input: params[p.name] for p in m.trainable}})
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_a_graph_shape_that_cannot_hold_the_parameter_is_a_malformed_manifest(mlp_bundle):
    import dataclasses
    import json

    from edge_sdk.training.bundle import BundleError, Manifest

    d = json.loads(ModelSession.open(mlp_bundle).manifest.to_json())
    p = next(p for p in d["parameters"] if p["trainable"])
    p["graph_shape"] = [p["shape"][0] + 1, -1]
    with pytest.raises(BundleError, match="graph_shape"):
        Manifest.from_dict(d)
    p["graph_shape"] = [1, int(np.prod(p["shape"]))]
    spec = next(s for s in Manifest.from_dict(d).parameters if s.name == p["name"])
    assert spec.bound_shape == tuple(p["graph_shape"]) and dataclasses.asdict(spec)["graph_shape"] is not None
