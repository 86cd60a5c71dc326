"""Real ``torch.onnx.export`` output compiles, and its gradients equal PyTorch autograd's (when torch is
installed; it is a benchmark-only dependency)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from compiler_harness import GraphRunner, assert_loads_in_onnxruntime, assert_standard_graph, param_feeds, sgd_gradients

from aggregator.compiler import compile_graphs

torch = pytest.importorskip("torch")


def make_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 2, 3),
    )


def export(net, example, dynamo):
    if dynamo:  # the dynamo exporter needs onnxscript, which torch itself does not require
        pytest.importorskip("onnxscript")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch_size", min=1, max=1024)
            torch.onnx.export(net, (example,), buffer, input_names=["input"], output_names=["logits"], dynamo=True,
                              dynamic_shapes=({0: batch},), opset_version=18, verbose=False)
        else:
            torch.onnx.export(net, (example,), buffer, input_names=["input"], output_names=["logits"], dynamo=False,
                              dynamic_axes={"input": {0: "batch_size"}, "logits": {0: "batch_size"}}, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)],  # dynamo: 1-3 s each
                         ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize(("make", "x_shape"), [(make_mlp, (3, 4)), (make_cnn, (1, 12, 12))], ids=["mlp", "cnn"])
def test_torch_export_compiles_and_gradients_match_autograd(make, x_shape, dynamo):
    net = make()
    model = export(net, torch.randn(2, *x_shape), dynamo)
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd", dtype="float64")
    assert_standard_graph(compiled.train_step)
    assert_loads_in_onnxruntime(compile_graphs(model, loss="cross_entropy", optimizer="sgd").train_step)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, *x_shape))
    y = rng.integers(0, 3, 5).astype(np.int64)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)

    net = net.double()
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    expected = {name: p.grad.numpy() for name, p in net.named_parameters()}
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
    out = GraphRunner(compiled.eval)({"x": x, "y": y, **param_feeds(compiled, compiled.initial_params)})
    np.testing.assert_allclose(out["loss"], loss.item(), rtol=1e-6)


class MobileBlock(torch.nn.Module):
    """What real exports contain: BatchNorm (folded into Conv by the exporter), ReLU6 (Clip), an
    overlapping padded MaxPool, a depthwise conv, a residual Add, adaptive pooling, cat + slice, Dropout."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(3, 2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.drop = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.pool(torch.nn.functional.relu6(self.bn1(self.c1(x))))
        h = h + torch.nn.functional.leaky_relu(self.bn2(self.dw(h)))
        h = self.gap(h).flatten(1)
        h = torch.cat([h, torch.sigmoid(h)], dim=1)[:, 2:10]
        return self.fc(self.drop(h))


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)],  # dynamo: 1-3 s each
                         ids=["torchscript_exporter", "dynamo_exporter"])
def test_exported_mobile_block_compiles_and_matches_finite_differences_and_autograd(dynamo):
    from compiler_harness import finite_difference_check

    torch.manual_seed(0)
    net = MobileBlock()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    model = export(net, torch.randn(2, 3, 10, 10), dynamo)
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd", dtype="float64")
    assert_standard_graph(compiled.train_step)
    assert_loads_in_onnxruntime(compile_graphs(model, loss="cross_entropy", optimizer="adam").train_step)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 10, 10))
    y = rng.integers(0, 4, 4).astype(np.int64)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    finite_difference_check(compiled, x, y, grads, probes=3)
    # the exporter folds BatchNorm into the convs, so only the head's parameters keep torch's names
    net = net.double()
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    for name in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(grads[name], dict(net.named_parameters())[name].grad.numpy(), rtol=1e-6,
                                   atol=1e-10)
