"""A conv weight's SGD update is fused into its weight-gradient Gemm (aggregator.compiler.optimizers):
the graphs carry the weight in the Gemm's 2-D shape (manifest ``graph_shape``) and the Gemm writes the
updated weight itself, C = the weight, the smaller operand scaled by -lr. Training must still match
torch.optim, and momentum (fused behind the Reshape, weight kept 4-D) its reference update."""

from __future__ import annotations

import numpy as np
import pytest
from compiler_harness import GraphRunner, make_batch, sgd_gradients, train_step
from torch_parity import assert_trains_like_torch

from aggregator.compiler import compile_graphs
from aggregator.export import torch_to_onnx

torch = pytest.importorskip("torch")
nn = torch.nn


class ConvNet(nn.Module):
    """8x8 stem (Conv, im2col weight gradient) -> 4x4 3x3 (Conv) -> 1x1 3x3 pad 1 (lowered to a Gemm,
    only the centre tap live: the weight gradient goes through the 0/1 selection Gemm) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.body = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.centre = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(self.centre(x), 1))


def _model(seed: int = 0):
    torch.manual_seed(seed)
    net = ConvNet()
    return net, torch_to_onnx(net, torch.randn(2, 3, 8, 8))


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((5, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 5).astype(np.int64)


def test_sgd_conv_weight_update_is_one_gemm_writing_the_flattened_weight():
    _, model = _model()
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd")
    specs = {p.name: p for p in compiled.manifest.trainable}
    graph = compiled.train_step.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    # [M, C*K] from the im2col Gemm; [M*C, K] from the lowered 1x1 conv's tap-selection Gemm
    expected = {"stem.weight": (4, 3 * 9), "body.weight": (6, 4 * 9), "centre.weight": (5 * 6, 9)}
    for name, shape in expected.items():
        spec = specs[name]
        assert spec.graph_shape == shape, name
        assert outputs[spec.output] == list(spec.graph_shape)
        gemm = producer[spec.output]
        assert gemm.op_type == "Gemm" and gemm.input[2] == spec.input, name
        readers = [n.op_type for n in graph.node if spec.input in n.input]
        assert sorted(readers) == ["Gemm", "Reshape"], f"{name}: no elementwise pass over the weight ({readers})"
    assert specs["fc.weight"].graph_shape is None  # a 2-D Gemm weight fuses in its own shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flattened_parameters_feed_the_eval_graph_in_their_graph_shape(dtype):
    _, model = _model()
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd", dtype=dtype)
    names = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in compiled.eval.graph.input}
    for p in compiled.manifest.trainable:
        assert names[p.input] == list(p.bound_shape)


def test_fused_conv_sgd_trains_like_torch():
    net, model = _model()
    x, y = _batch()
    assert_trains_like_torch(torch, net, model, x, y, optimizer="sgd", lr=0.1)


def test_momentum_fused_behind_the_reshape_matches_its_reference_update():
    """buf' = mu*buf + g (one Gemm with C = the reshaped buffer), p' = p - lr*buf'; g from the SGD graph."""
    _, model = _model()
    mu, lr = 0.8, 0.05
    sgd = compile_graphs(model, loss="cross_entropy", optimizer="sgd", dtype="float64")
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="momentum", dtype="float64",
                              optimizer_params={"momentum": mu})
    m = compiled.manifest
    assert all(p.graph_shape is None for p in m.trainable)  # only plain SGD flattens the graphs' weights
    x, y = make_batch(compiled, 5, seed=1)
    grads = sgd_gradients(sgd, sgd.initial_params, x, y)
    rng = np.random.default_rng(2)
    state = {s.input: rng.standard_normal(s.shape) for s in m.state}
    out = train_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x, y, lr=lr, state=state)
    for s in m.state:
        buf = mu * state[s.input] + grads[s.param]
        np.testing.assert_allclose(out[s.output], buf, rtol=1e-10, atol=1e-12, err_msg=s.param)
        p = next(p for p in m.trainable if p.name == s.param)
        np.testing.assert_allclose(out[p.output], compiled.initial_params[p.name] - lr * buf, rtol=1e-10,
                                   atol=1e-12, err_msg=p.name)
