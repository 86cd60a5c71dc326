"""Reference inference models, built with ``onnx.helper`` in the shapes real exporters produce.

They feed the compiler's tests, the benchmarks and the demo without needing PyTorch. Each mirrors
what ``torch.onnx.export`` emits for the equivalent ``nn.Module``: a dynamic batch dimension named
``batch_size``, ``Gemm`` with ``transB=1`` (``nn.Linear``), ``MatMul`` on a pre-transposed weight plus
``Add``, ``Flatten`` or a ``Shape``/``Gather``/``Concat``/``Reshape`` chain before the head, and
``Identity`` nodes. Initial weights follow PyTorch's default uniform(+-1/sqrt(fan_in)) so training
behaves like a freshly constructed torch model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BATCH = "batch_size"
_DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float64": (np.float64, TensorProto.DOUBLE)}


class _ModelBuilder:
    def __init__(self, seed: int, dtype: str) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.rng = np.random.default_rng(seed)
        self.np_dtype, self.onnx_dtype = _DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def param(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        bound = 1.0 / np.sqrt(fan_in)
        value = self.rng.uniform(-bound, bound, size=tuple(shape)).astype(self.np_dtype)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def fixed(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"/{op}_{len(self.nodes)}", **attrs))
        return output

    def linear(self, x: str, prefix: str, n_in: int, n_out: int, out: str) -> str:
        """``nn.Linear`` as torch exports it for 2-D input: Gemm with transB=1."""
        w = self.param(f"{prefix}.weight", (n_out, n_in), n_in)
        b = self.param(f"{prefix}.bias", (n_out,), n_in)
        return self.node("Gemm", [x, w, b], out, alpha=1.0, beta=1.0, transB=1)

    def conv(self, x: str, prefix: str, c_in: int, c_out: int, k: int, out: str, group: int = 1, **attrs) -> str:
        fan_in = (c_in // group) * k * k
        w = self.param(f"{prefix}.weight", (c_out, c_in // group, k, k), fan_in)
        b = self.param(f"{prefix}.bias", (c_out,), fan_in)
        return self.node("Conv", [x, w, b], out, kernel_shape=[k, k], group=group, **attrs)

    def model(self, inp: Sequence, out: Sequence, opset: int, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(inp[0], self.onnx_dtype, list(inp[1]))],
            [helper.make_tensor_value_info(out[0], self.onnx_dtype, list(out[1]))],
            initializer=self.initializers,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="fleetlearn.model_zoo")
        model.ir_version = helper.find_min_ir_version_for(opsets)
        onnx.checker.check_model(model, full_check=True)
        return model


def mlp(
    sizes: Sequence[int] = (784, 128, 10), seed: int = 0, opset: int = 17, dtype: str = "float32"
) -> onnx.ModelProto:
    """``nn.Sequential(Flatten, Linear, ReLU, ..., Linear)``: input [batch_size, sizes[0]] -> logits."""
    if len(sizes) < 2:
        raise ValueError("an MLP needs at least an input and an output size")
    b = _ModelBuilder(seed, dtype)
    h = b.node("Flatten", ["input"], "/flatten/Flatten_output_0", axis=1)
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        last = i == len(sizes) - 2
        h = b.linear(h, f"layers.{2 * i}", n_in, n_out, "logits" if last else f"/layers.{2 * i}/Gemm_output_0")
        if not last:
            h = b.node("Relu", [h], f"/layers.{2 * i + 1}/Relu_output_0")
    return b.model(("input", [BATCH, sizes[0]]), ("logits", [BATCH, sizes[-1]]), opset, "mlp")


def cnn(
    seed: int = 0, opset: int = 17, dtype: str = "float32", pools: Sequence[str] = ("max", "max")
) -> onnx.ModelProto:
    """1x28x28 -> conv 8 3x3 -> relu -> pool 2 -> conv 16 3x3 -> relu -> pool 2 -> flatten -> fc 10.

    ``pools`` picks MaxPool ("max") or AveragePool ("avg") for each of the two pooling layers.
    """
    b = _ModelBuilder(seed, dtype)
    h = "input"
    for i, (c_in, c_out) in enumerate(((1, 8), (8, 16))):
        h = b.conv(h, f"conv{i + 1}", c_in, c_out, 3, f"/conv{i + 1}/Conv_output_0", pads=[0, 0, 0, 0], strides=[1, 1])
        h = b.node("Relu", [h], f"/relu{i + 1}/Relu_output_0")
        op = {"max": "MaxPool", "avg": "AveragePool"}[pools[i]]
        h = b.node(op, [h], f"/pool{i + 1}/{op}_output_0", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    h = b.node("Flatten", [h], "/flatten/Flatten_output_0", axis=1)
    b.linear(h, "fc", 16 * 5 * 5, 10, "logits")
    return b.model(("input", [BATCH, 1, 28, 28]), ("logits", [BATCH, 10]), opset, "cnn")


def regression(
    sizes: Sequence[int] = (6, 8, 3), seed: int = 0, opset: int = 17, dtype: str = "float32"
) -> onnx.ModelProto:
    """Sigmoid then Tanh layers for MSE: Gemm -> Sigmoid -> MatMul(pre-transposed W) + Add -> Tanh -> Identity."""
    n_in, n_hidden, n_out = sizes
    b = _ModelBuilder(seed, dtype)
    h = b.linear("input", "hidden", n_in, n_hidden, "/hidden/Gemm_output_0")
    h = b.node("Sigmoid", [h], "/act1/Sigmoid_output_0")
    w = b.param("onnx::MatMul_17", (n_hidden, n_out), n_hidden)  # torch's name for a transposed weight
    bias = b.param("out.bias", (n_out,), n_hidden)
    h = b.node("MatMul", [h, w], "/out/MatMul_output_0")
    h = b.node("Add", [bias, h], "/out/Add_output_0")
    h = b.node("Tanh", [h], "/act2/Tanh_output_0")
    b.node("Identity", [h], "prediction")
    return b.model(("input", [BATCH, n_in]), ("prediction", [BATCH, n_out]), opset, "regression")


def depthwise_cnn(seed: int = 0, opset: int = 17, dtype: str = "float32") -> onnx.ModelProto:
    """A MobileNet-style block on 3x12x12: conv 3->6, depthwise 3x3 (groups=6, stride 2, pad 1), pointwise,
    GlobalAveragePool, then ``x.view(x.size(0), -1)`` exported as Shape/Gather/Unsqueeze/Concat/Reshape."""
    b = _ModelBuilder(seed, dtype)
    h = b.conv("input", "stem", 3, 6, 3, "/stem/Conv_output_0", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "/stem/Relu_output_0")
    h = b.conv(h, "dw", 6, 6, 3, "/dw/Conv_output_0", group=6, strides=[2, 2], pads=[1, 1, 1, 1])
    h = b.node("LeakyRelu", [h], "/dw/LeakyRelu_output_0", alpha=0.1)
    h = b.conv(h, "pw", 6, 8, 1, "/pw/Conv_output_0")
    h = b.node("Relu", [h], "/pw/Relu_output_0")
    h = b.node("GlobalAveragePool", [h], "/gap/GlobalAveragePool_output_0")
    shape = b.node("Shape", [h], "/Shape_output_0")
    zero = b.fixed("/Constant_output_0", np.asarray(0, dtype=np.int64))
    n = b.node("Gather", [shape, zero], "/Gather_output_0", axis=0)
    axes = b.fixed("/Constant_1_output_0", np.asarray([0], dtype=np.int64))
    n = b.node("Unsqueeze", [n, axes], "/Unsqueeze_output_0")
    rest = b.fixed("/Constant_2_output_0", np.asarray([-1], dtype=np.int64))
    target = b.node("Concat", [n, rest], "/Concat_output_0", axis=0)
    h = b.node("Reshape", [h, target], "/Reshape_output_0")
    b.linear(h, "fc", 8, 4, "logits")
    return b.model(("input", [BATCH, 3, 12, 12]), ("logits", [BATCH, 4]), opset, "depthwise_cnn")


def frozen_backbone(seed: int = 0, opset: int = 17, dtype: str = "float32") -> onnx.ModelProto:
    """A backbone (``backbone.*``: conv, BatchNormalization with running stats, relu, avgpool) and a
    two-layer head (``head.*``), for fine-tuning the head with the backbone frozen."""
    b = _ModelBuilder(seed, dtype)
    h = b.conv("input", "backbone.conv", 2, 4, 3, "/backbone/conv/Conv_output_0", pads=[1, 1, 1, 1])
    b.fixed("backbone.bn.weight", (1.0 + 0.1 * b.rng.standard_normal(4)).astype(b.np_dtype))
    b.fixed("backbone.bn.bias", (0.1 * b.rng.standard_normal(4)).astype(b.np_dtype))
    b.fixed("backbone.bn.running_mean", (0.1 * b.rng.standard_normal(4)).astype(b.np_dtype))
    b.fixed("backbone.bn.running_var", b.rng.uniform(0.5, 1.5, 4).astype(b.np_dtype))
    h = b.node(
        "BatchNormalization",
        [h, "backbone.bn.weight", "backbone.bn.bias", "backbone.bn.running_mean", "backbone.bn.running_var"],
        "/backbone/bn/BatchNormalization_output_0", epsilon=1e-5, momentum=0.9,
    )
    h = b.node("Relu", [h], "/backbone/Relu_output_0")
    h = b.node("AveragePool", [h], "/backbone/pool/AveragePool_output_0", kernel_shape=[2, 2], strides=[2, 2])
    h = b.node("Flatten", [h], "/Flatten_output_0", axis=1)
    h = b.linear(h, "head.0", 4 * 4 * 4, 12, "/head/0/Gemm_output_0")
    h = b.node("Relu", [h], "/head/1/Relu_output_0")
    b.linear(h, "head.2", 12, 3, "logits")
    return b.model(("input", [BATCH, 2, 8, 8]), ("logits", [BATCH, 3]), opset, "frozen_backbone")


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "regression": regression,
    "depthwise_cnn": depthwise_cnn,
    "frozen_backbone": frozen_backbone,
}
