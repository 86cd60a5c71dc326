"""Convolutions with tiny output maps are lowered to im2col + one Gemm before differentiation
(aggregator.compiler.conv_lowering); training through the lowered form must match torch.optim, and only
the convolutions that qualify are lowered."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from torch_parity import assert_trains_like_torch

from aggregator.compiler import compile_graphs
from aggregator.export import torch_to_onnx

torch = pytest.importorskip("torch")
nn = torch.nn


class TinyMapNet(nn.Module):
    """6x6 -> 2x2 (strided 3x3, kept as Conv) -> 2x2 3x3 pad 1 (lowered, all taps live) -> 1x1 via a
    strided 1x1 downsample (lowered) and via a strided 3x3 with padding (lowered, 4 of 9 taps live)
    -> 1x1 3x3 pad 1 (lowered, only the centre tap live) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.down = nn.Conv2d(8, 6, 1, stride=2)
        self.strided = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.centre = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.mid(x)) + x
        x = torch.relu(self.down(x[:, :, :2, :2]) + self.strided(x))
        return self.fc(torch.flatten(self.centre(x), 1))


def _export(net):
    torch.manual_seed(0)
    return torch_to_onnx(net, torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
def test_lowered_convolutions_train_like_torch(optimizer, lr):
    torch.manual_seed(1)
    net = TinyMapNet()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int64)
    assert_trains_like_torch(torch, net, _export(net), x, y, optimizer=optimizer, lr=lr)


def test_small_convolutions_strided_ones_too_are_lowered_with_no_per_tap_slices():
    """im2col is one Gemm with a constant 0/1 matrix, so a strided 3x3 with a 2x2 output is lowered too, and
    neither graph slices per kernel tap (a per-tap Slice differentiates into a Pad each)."""
    torch.manual_seed(1)
    compiled = compile_graphs(_export(TinyMapNet()), loss="cross_entropy", optimizer="sgd")
    for graph in (compiled.eval.graph, compiled.train_step.graph):
        ops = [n.op_type for n in graph.node]
        assert "Conv" not in ops and "ConvTranspose" not in ops
        assert ops.count("Slice") == 2 and "Pad" not in ops, "only the model's own x[:, :, :2, :2], one per axis"
    ops = [n.op_type for n in compiled.eval.graph.node]
    assert ops.count("Gemm") >= 5 + 1  # five lowered convolutions and the linear layer
    constants = [numpy_helper.to_array(n.attribute[0].t) for n in compiled.eval.graph.node
                 if n.op_type == "Constant" and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT]
    assert all(set(np.unique(c)) <= {0.0, 1.0} for c in constants)
    # stem: 16 input positions x (4 output positions x 9 taps); the centre conv's 1x1 input needs none
    assert (16, 4 * 9) in [c.shape for c in constants]


def test_a_convolution_with_a_larger_output_map_stays_a_conv():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.flatten(self.conv(x), 1)

    torch.manual_seed(0)
    model = torch_to_onnx(Wide(), torch.randn(2, 3, 3, 3))  # 3x3 output: 9 positions
    compiled = compile_graphs(model, loss="mse", optimizer="sgd")
    assert [n.op_type for n in compiled.eval.graph.node].count("Conv") == 1


def test_a_frozen_lowered_convolution_trains_its_head_like_torch():
    torch.manual_seed(1)
    net = TinyMapNet()
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int64)
    assert_trains_like_torch(torch, net, _export(net), x, y, optimizer="sgd", lr=0.1, trainable=["fc."])
