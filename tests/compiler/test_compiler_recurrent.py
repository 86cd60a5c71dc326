"""GRU and LSTM gradients (backward through time): finite differences on hand-built ONNX graphs covering
every supported attribute, torch.autograd on real exports, and keyword spotters trained 5 full-batch
steps against torch.optim."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from compiler_harness import (
    GraphRunner,
    assert_loads_in_onnxruntime,
    compile_for_gradients,
    finite_difference_check,
    sgd_gradients,
    train_step,
)
from onnx import TensorProto, helper, numpy_helper
from torch_training import assert_matches_torch, compiled_steps, torch_steps

from aggregator.compiler import compile_graphs
from aggregator.compiler.errors import UnsupportedOpError

STEPS, FEATURES, PROJECTED, HIDDEN, CLASSES = 4, 3, 5, 4, 3


def recurrent_model(op: str, direction: str = "forward", linear_before_reset: int = 0, bias: bool = True,
                    initial_state: bool = True) -> onnx.ModelProto:
    """x [N, T, F] -> MatMul P (so dX is exercised) -> GRU/LSTM -> Y_h, mean over time of Y (and Y_c) -> Gemm."""
    rng = np.random.default_rng(1)
    d = 2 if direction == "bidirectional" else 1
    gh = (3 if op == "GRU" else 4) * HIDDEN
    inits = {
        "P": rng.standard_normal((FEATURES, PROJECTED)),
        "W": rng.standard_normal((d, gh, PROJECTED)) * 0.5,
        "R": rng.standard_normal((d, gh, HIDDEN)) * 0.5,
        "fc.weight": rng.standard_normal((CLASSES, d * HIDDEN)) * 0.5,
        "fc.bias": rng.standard_normal(CLASSES) * 0.1,
    }
    rnn_inputs = ["xt", "W", "R", "B" if bias else "", ""]
    if bias:
        inits["B"] = rng.standard_normal((d, 2 * gh)) * 0.3
    if initial_state:
        inits["h0"] = rng.standard_normal((d, 1, HIDDEN)) * 0.5
        rnn_inputs.append("h0_full")
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    attrs = {"hidden_size": HIDDEN, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    nodes = [
        helper.make_node("MatMul", ["x", "P"], ["xp"]),
        helper.make_node("Transpose", ["xp"], ["xt"], perm=[1, 0, 2]),
    ]
    if initial_state:  # a learnt initial state broadcast over the batch: h0 [D, 1, H] + 0 * xt[0] summed
        nodes += [
            helper.make_node("Slice", ["xt", "zero1", "one1", "zero1"], ["x0"]),  # [1, N, P]
            helper.make_node("ReduceMean", ["x0"], ["x0m"], axes=[2], keepdims=1),  # [1, N, 1]
            helper.make_node("Mul", ["x0m", "zero_f"], ["batch_zeros"]),
            helper.make_node("Add", ["h0", "batch_zeros"], ["h0_full"]),  # [D, N, H]
        ]
        if op == "LSTM":
            inits["c0"] = rng.standard_normal((d, 1, HIDDEN)) * 0.5
            nodes.append(helper.make_node("Add", ["c0", "batch_zeros"], ["c0_full"]))
            rnn_inputs.append("c0_full")
    nodes.append(helper.make_node(op, rnn_inputs, outputs, **attrs))
    summaries = ["Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes.append(helper.make_node("ReduceMean", ["Y"], ["Y_mean"], axes=[0], keepdims=0))  # [D, N, H]
    summaries.append("Y_mean")
    for i, s in enumerate(summaries):
        nodes += [
            helper.make_node("Transpose", [s], [f"s{i}"], perm=[1, 0, 2]),
            helper.make_node("Flatten", [f"s{i}"], [f"f{i}"], axis=1),
        ]
    total = "f0"
    for i in range(1, len(summaries)):
        nodes.append(helper.make_node("Add", [total, f"f{i}"], [f"sum{i}"]))
        total = f"sum{i}"
    nodes.append(helper.make_node("Gemm", [total, "fc.weight", "fc.bias"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()] + [
            numpy_helper.from_array(np.array([0], np.int64), "zero1"),
            numpy_helper.from_array(np.array([1], np.int64), "one1"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONFIGS = [
    ("GRU", "forward", 1, True, True),
    ("GRU", "forward", 0, True, True),
    ("GRU", "reverse", 1, False, False),
    ("GRU", "bidirectional", 0, True, True),
    ("LSTM", "forward", 0, True, True),
    ("LSTM", "reverse", 0, True, False),
    ("LSTM", "bidirectional", 0, False, True),
]


@pytest.mark.parametrize(("op", "direction", "lbr", "bias", "initial"), CONFIGS,
                         ids=[f"{c[0]}-{c[1]}-lbr{c[2]}-{'b' if c[3] else 'nob'}-{'h0' if c[4] else 'noh0'}"
                              for c in CONFIGS])
def test_recurrent_gradients_match_finite_differences(op, direction, lbr, bias, initial):
    model = recurrent_model(op, direction, lbr, bias, initial)
    compiled = compile_for_gradients(model, "cross_entropy")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, STEPS, FEATURES))
    y = rng.integers(0, CLASSES, 3).astype(np.int64)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    names = {"P", "W", "R", "fc.weight"} | ({"B"} if bias else set()) | ({"h0"} if initial else set())
    assert names <= set(grads)
    for name in names:
        assert np.abs(grads[name]).max() > 0, name
    finite_difference_check(compiled, x, y, grads, probes=6)


def test_float32_graph_runs_in_onnxruntime():
    compiled = compile_graphs(recurrent_model("LSTM", "bidirectional"), loss="cross_entropy", optimizer="adam")
    assert_loads_in_onnxruntime(compiled.train_step)
    x = np.random.default_rng(0).standard_normal((2, STEPS, FEATURES)).astype(np.float32)
    out = train_step(compiled, GraphRunner(compiled.train_step), compiled.initial_params, x,
                     np.array([0, 2]), lr=0.1)
    assert np.isfinite(out["loss"])


def test_unsupported_recurrent_attributes_are_named():
    model = recurrent_model("GRU")
    rnn = next(n for n in model.graph.node if n.op_type == "GRU")
    rnn.attribute.append(helper.make_attribute("clip", 3.0))
    with pytest.raises(UnsupportedOpError, match="clip"):
        compile_graphs(model, loss="cross_entropy", optimizer="sgd")


# ------------------------------------------------------------------------------------------- torch
torch = pytest.importorskip("torch")

# ONNX gate blocks in terms of torch's: GRU z, r, h = torch (r, z, n)[1, 0, 2];
# LSTM i, o, f, c = torch (i, f, g, o)[0, 3, 1, 2].
GATE_ORDER = {"GRU": (1, 0, 2), "LSTM": (0, 3, 1, 2)}


class KeywordSpotter(torch.nn.Module):
    """[N, T=16, F=10] -> GRU/LSTM(32) -> final hidden state -> Linear -> 10 classes."""

    def __init__(self, cell: str, hidden: int = 32, layers: int = 1, bidirectional: bool = False,
                 pool: str = "last"):
        super().__init__()
        rnn = torch.nn.GRU if cell == "GRU" else torch.nn.LSTM
        self.rnn = rnn(10, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = torch.nn.Linear(hidden * (2 if bidirectional else 1), 10)
        self.pool = pool

    def forward(self, x):
        out, h = self.rnn(x)
        if self.pool == "mean":
            return self.fc(out.mean(dim=1))
        h = h[0] if isinstance(h, tuple) else h
        return self.fc(h.squeeze(0))


def export(net: torch.nn.Module, steps: int = 16) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, steps, 10),), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def onnx_to_torch(net: torch.nn.Module, cell: str, params: dict[str, np.ndarray], model: onnx.ModelProto) -> dict:
    """The trained ONNX tensors as torch's parameters (gate blocks reordered, B split into b_ih and b_hh)."""
    out = {}
    rnn_nodes = [n for n in model.graph.node if n.op_type == cell]
    order = GATE_ORDER[cell]
    inverse = np.argsort(order)
    for layer, node in enumerate(rnn_nodes):
        w, r, b = (params[name] for name in node.input[1:4])
        directions = w.shape[0]
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")

            def unpermute(a):
                blocks = np.split(a, len(order), axis=0)
                return np.concatenate([blocks[i] for i in inverse], axis=0)

            b_ih, b_hh = np.split(b[d], 2)
            out[f"rnn.weight_ih{suffix}"] = unpermute(w[d])
            out[f"rnn.weight_hh{suffix}"] = unpermute(r[d])
            out[f"rnn.bias_ih{suffix}"] = unpermute(b_ih)
            out[f"rnn.bias_hh{suffix}"] = unpermute(b_hh)
    out["fc.weight"], out["fc.bias"] = params["fc.weight"], params["fc.bias"]
    return out


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_two_layer_bidirectional_export_gradients_match_autograd(cell):
    torch.manual_seed(0)
    net = KeywordSpotter(cell, hidden=6, layers=2, bidirectional=True, pool="mean").double()
    model = export(net.float(), steps=5)
    net.double()
    compiled = compile_for_gradients(model, "cross_entropy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 10))
    y = rng.integers(0, 10, 3).astype(np.int64)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    trained = set(compiled.initial_params)
    assert len(trained) == 2 + 3 * 2 * 1  # fc + (W, R, B) per layer
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    expected = {name: p.grad.numpy() for name, p in net.named_parameters()}
    actual = onnx_to_torch(net, cell, grads, model)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_keyword_spotter_trains_like_torch_for_five_steps(cell, optimizer):
    torch.manual_seed(0)
    net = KeywordSpotter(cell)
    model = export(net)
    compiled = compile_graphs(model, loss="cross_entropy", optimizer=optimizer)
    lr = 0.05 if optimizer == "sgd" else 0.01
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16, 10)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int64)
    params, losses = compiled_steps(compiled, x, y, lr, steps=5)
    expected_losses = torch_steps(torch, net.train(), optimizer, x, y, lr, steps=5)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_matches_torch(onnx_to_torch(net, cell, params, model),
                         {name: p.detach().numpy() for name, p in net.named_parameters()})
