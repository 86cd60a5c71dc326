"""BatchNormalization in training mode: batch statistics in the train step, gradients through them, running
statistics carried as bundle buffers (torch's momentum and unbiased running variance), eval on the
running statistics, and the federated update including them only when asked."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from compiler_harness import GraphRunner, assert_standard_graph, train_step
from torch_training import assert_matches_torch, torch_optimizer

from aggregator.compiler import compile_graphs, compile_model
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import ParameterError, TrainingState

torch = pytest.importorskip("torch")


def make_bn_cnn() -> torch.nn.Module:
    """Layers before a BatchNorm have no bias, as in real BN CNNs, and the Linear's bias reaches BatchNorm1d
    through a Tanh rather than a ReLU: a bias that BN subtracts out (directly or through a ReLU active on
    the whole batch) has an exactly-zero gradient, so its float rounding noise, which Adam normalises to
    lr-sized steps, is all that would train it, differently in torch and onnxruntime."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6, momentum=0.3), torch.nn.ReLU(),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 8), torch.nn.Tanh(),
        torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3),
    )


def export_training(net: torch.nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.train(), (torch.randn(4, 1, 8, 8),), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}}, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING)
    return onnx.load_from_string(buffer.getvalue())


def load_into_torch(net: torch.nn.Module, compiled) -> None:
    """Start torch from the exported values (the export's tracing pass ran the model in train mode)."""
    values = {**compiled.initial_params, **compiled.initial_buffers}
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name in values:
                tensor.copy_(torch.from_numpy(np.array(values[name])))


def batch(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)) * 2 + 0.5, rng.integers(0, 3, n).astype(np.int64)


def test_bundle_carries_running_statistics_as_buffers_not_parameters():
    compiled = compile_graphs(export_training(make_bn_cnn()), loss="cross_entropy", optimizer="sgd")
    m = compiled.manifest
    assert [b.name for b in m.buffers] == [f"{i}.running_{k}" for i in (1, 4, 10) for k in ("mean", "var")]
    assert not any(b.federated for b in m.buffers)
    assert not {b.name for b in m.buffers} & {p.name for p in m.parameters}
    assert {p.name for p in m.trainable} == {n for n, _ in make_bn_cnn().named_parameters()}
    for model in (compiled.train_step, compiled.eval):
        assert_standard_graph(model)
        assert not [n for n in model.graph.node for a in n.attribute if a.name == "training_mode" and a.i]
    assert {b.input for b in m.buffers} <= {i.name for i in compiled.eval.graph.input}


@pytest.mark.slow  # about 2.2 s
def test_gradients_through_batch_statistics_match_autograd_and_finite_differences():
    net = make_bn_cnn().double()
    compiled = compile_graphs(export_training(make_bn_cnn()), loss="cross_entropy", optimizer="sgd", dtype="float64")
    load_into_torch(net, compiled)
    x, y = batch()
    grads = sgd_gradients_with_buffers(compiled, x, y)
    loss = torch.nn.functional.cross_entropy(net.train()(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    for name, p in net.named_parameters():  # atol: BN's dx cancels terms, ~1e-9 of the gradient's scale
        expected = p.grad.numpy()
        np.testing.assert_allclose(grads[name], expected, rtol=1e-8, atol=1e-9 * np.abs(expected).max(), err_msg=name)
    # central differences of the train-mode loss (lr = 0 leaves the parameters as they are)
    runner, rng, h = GraphRunner(compiled.train_step), np.random.default_rng(1), 1e-6
    params = {k: v.copy() for k, v in compiled.initial_params.items()}
    for name in ("1.weight", "4.bias", "0.weight", "8.bias", "10.weight"):
        flat = params[name].reshape(-1)
        for j in rng.choice(flat.size, size=3, replace=False):
            saved, losses = flat[j], []
            for delta in (h, -h):
                flat[j] = saved + delta
                losses.append(float(run_step(compiled, runner, params, x, y, lr=0.0)["loss"]))
            flat[j] = saved
            numeric = (losses[0] - losses[1]) / (2 * h)
            assert abs(numeric - grads[name].reshape(-1)[j]) <= 1e-8 + 1e-5 * abs(numeric), (name, j)


def run_step(compiled, runner, params, x, y, lr, step=1, state=None, buffers=None):
    feeds = dict(state if state is not None else {s.input: np.zeros(s.shape, s.dtype) for s in compiled.manifest.state})
    values = buffers if buffers is not None else compiled.initial_buffers
    feeds.update({b.input: values[b.name] for b in compiled.manifest.buffers})
    return train_step(compiled, runner, params, x, y, lr=lr, step=step, state=feeds)


def sgd_gradients_with_buffers(compiled, x, y):
    out = run_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x, y, lr=1.0)
    return {p.name: compiled.initial_params[p.name] - out[p.output] for p in compiled.manifest.trainable}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_five_steps_on_device_runtime_match_torch_parameters_and_running_statistics(tmp_path, optimizer):
    net = make_bn_cnn()
    model = export_training(make_bn_cnn())
    compile_model(model, tmp_path, loss="cross_entropy", optimizer=optimizer)
    state = TrainingState(ModelSession.open(tmp_path))
    compiled = compile_graphs(model, loss="cross_entropy", optimizer=optimizer)
    load_into_torch(net, compiled)
    x, y = batch(8)
    x = x.astype(np.float32)
    lr = 0.1 if optimizer == "sgd" else 0.01
    opt = torch_optimizer(torch, net, optimizer, lr)
    net.train()
    for _ in range(5):
        loss = state.train_step(x, y, lr)
        opt.zero_grad()
        expected = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        expected.backward()
        opt.step()
        assert abs(loss - expected.item()) <= 1e-5 + 1e-4 * abs(expected.item())
    assert_matches_torch(state.get_params(), {n: p.detach().numpy() for n, p in net.named_parameters()})
    buffers = {n: b.numpy() for n, b in net.named_buffers() if "running" in n}
    assert_matches_torch(state.get_running_stats(), buffers)
    # eval uses the running statistics, as model.eval() does
    _, logits = state.evaluate_batch(x, y)
    with torch.no_grad():
        expected_logits = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_federated_update_excludes_running_statistics_unless_asked(tmp_path):
    model = export_training(make_bn_cnn())
    compile_model(model, tmp_path / "local", loss="cross_entropy", optimizer="sgd")
    compile_model(model, tmp_path / "fed", loss="cross_entropy", optimizer="sgd", federate_running_stats=True)
    local = TrainingState(ModelSession.open(tmp_path / "local"))
    fed = TrainingState(ModelSession.open(tmp_path / "fed"))
    stats = set(local.get_running_stats())
    assert len(stats) == 6
    assert not stats & set(local.get_params())
    assert stats <= set(local.get_params(include_running_stats=True))
    assert stats <= set(fed.get_params())
    assert not stats & set(fed.get_params(include_running_stats=False))
    x, y = batch(8)
    local.train_step(x.astype(np.float32), y, 0.1)
    trained = local.get_params(include_running_stats=True)
    assert not np.allclose(trained["1.running_var"], 1.0)
    fed.set_params(trained)  # a global model that federates running statistics
    np.testing.assert_array_equal(fed.get_running_stats()["1.running_var"], trained["1.running_var"])
    with pytest.raises(ParameterError, match="running_var"):
        fed.set_params({**trained, "1.running_var": np.zeros(3, np.float32)})
