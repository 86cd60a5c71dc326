"""Each gradient rule alone against central finite differences (the micrograd way).

Every case is a tiny model: the op under test, fed by trainable parameters (and usually by a
trainable per-feature scale of x, so the rule's input gradient is exercised too), with an MSE
loss. The float64 compile is checked against finite differences; the float32 compile must run in
plain onnxruntime and agree with it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from compiler_harness import (
    assert_loads_in_onnxruntime,
    compile_for_gradients,
    finite_difference_check,
    make_batch,
    sgd_gradients,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from aggregator.compiler import compile_graphs


class TinyModel:
    """x [batch, *shape] -> nodes -> one output; parameters are random float32 initializers."""

    def __init__(self, x_shape, opset=17, seed=0):
        self.x_shape, self.opset = list(x_shape), opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def param(self, shape, low=-1.0, high=1.0):
        name = f"p{len(self.inits)}"
        value = self.rng.uniform(low, high, size=shape).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, value):
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values):
        return self.const(np.asarray(values, dtype=np.int64))

    def node(self, op, inputs, n_outputs=1, **attrs):
        outputs = [f"v{len(self.nodes)}_{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=f"{op}_{len(self.nodes)}", **attrs))
        return outputs[0]

    def scaled_x(self, axis_shape):
        """x times a trainable scale, so gradients must flow back through the op under test."""
        return self.node("Mul", ["x", self.param(axis_shape, 0.5, 1.5)])

    def build(self, out):
        graph = helper.make_graph(
            self.nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *self.x_shape])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        # declare the output's shape the way exporters do, from shape inference
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
        return model


def gemm(trans_a, trans_b, c_shape):
    def build():
        t = TinyModel([4])
        h = t.scaled_x([4])
        a = t.node("Transpose", [h], perm=[1, 0]) if trans_a else h
        w = t.param([3, 4] if trans_b else [4, 3])
        inputs = [a, w] + ([t.param(c_shape)] if c_shape else [])
        return t.build(t.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=0.7, beta=0.4))
    return build


def matmul(x_shape, w_shape, w_left=False):
    def build():
        t = TinyModel(x_shape)
        h = t.scaled_x([x_shape[-1]])
        w = t.param(w_shape)
        return t.build(t.node("MatMul", [w, h] if w_left else [h, w]))
    return build


def binary(op, b_shape, b_first=False):
    def build():
        t = TinyModel([3, 4])
        h = t.node("Add", [t.scaled_x([4]), t.param([3, 4], 0.5, 1.0)])  # keeps Div away from zero
        b = t.param(b_shape, 0.5, 1.5)
        return t.build(t.node(op, [b, h] if b_first else [h, b]))
    return build


def unary(op, **attrs):
    def build():
        t = TinyModel([3, 5])
        h = t.node("Add", [t.scaled_x([5]), t.param([5])])
        return t.build(t.node(op, [h], **attrs))
    return build


def positive_unary(op):
    def build():
        t = TinyModel([3, 5])
        h = t.node("Add", [t.node("Mul", [t.scaled_x([5]), t.scaled_x([5])]), t.param([5], 0.5, 1.0)])
        return t.build(t.node(op, [h]))
    return build


def slice_case(starts, ends, axes, opset=17):
    def build():
        t = TinyModel([2, 3, 4], opset=opset)
        h = t.node("Add", [t.scaled_x([4]), t.param([2, 3, 4])])
        inputs = [h, t.ints(starts), t.ints(ends)] + ([t.ints(axes)] if axes else [])
        out = t.node("Slice", inputs)
        return t.build(t.node("Mul", [out, out]))
    return build


def clip(low, high):
    def build():
        t = TinyModel([3, 5])
        h = t.node("Add", [t.scaled_x([5]), t.param([5])])
        bounds = [t.const(np.asarray(v, np.float32)) if v is not None else "" for v in (low, high)]
        return t.build(t.node("Clip", [h, *bounds]))
    return build


def pad(pads, opset, axes=None):
    def build():
        t = TinyModel([2, 3, 4], opset=opset)
        h = t.node("Add", [t.scaled_x([4]), t.param([2, 3, 4])])
        inputs = [h, t.ints(pads), t.const(np.asarray(0.5, np.float32))] + ([t.ints(axes)] if axes else [])
        out = t.node("Pad", inputs, mode="constant")
        return t.build(t.node("Mul", [out, out]))
    return build


def conv(x_shape, c_out, kernel, bias=True, **attrs):
    def build():
        t = TinyModel(x_shape)
        c_in = x_shape[0]
        h = t.scaled_x([c_in] + [1] * (len(x_shape) - 1))
        group = attrs.get("group", 1)
        inputs = [h, t.param([c_out, c_in // group, *kernel])] + ([t.param([c_out])] if bias else [])
        return t.build(t.node("Conv", inputs, kernel_shape=list(kernel), **attrs))
    return build


def pool(op, x_shape, opset=17, **attrs):
    def build():
        t = TinyModel(x_shape, opset=opset)
        h = t.node("Add", [t.scaled_x([x_shape[0]] + [1] * (len(x_shape) - 1)), t.param(x_shape)])
        return t.build(t.node(op, [h], **attrs))
    return build


def shape_op(kind, opset=17):
    def build():
        t = TinyModel([2, 3, 4], opset=opset)
        h = t.node("Add", [t.scaled_x([4]), t.param([2, 3, 4])])
        if kind == "flatten":
            out = t.node("Reshape", [t.node("Flatten", [h], axis=2), t.ints([-1, 24])])
        elif kind == "reshape":
            out = t.node("Reshape", [h, t.ints([0, 6, -1])])
        elif kind == "transpose":
            out = t.node("Transpose", [h], perm=[0, 3, 1, 2])
        elif kind == "squeeze_unsqueeze":
            out = t.node("Squeeze", [t.node("Unsqueeze", [h, t.ints([1, 4])]), t.ints([4])])
        elif kind == "concat":
            other = t.node("Mul", [t.node("Sigmoid", [h]), t.param([1, 1, 4])])
            out = t.node("Concat", [h, other, h], axis=1)
        elif kind == "identity_dropout":
            out = t.node("Dropout", [t.node("Identity", [h]), t.const(np.asarray(0.3, np.float32))])
        return t.build(t.node("Mul", [out, out]))  # a non-linear use so every position matters
    return build


def reduce_mean(axes, keepdims, opset):
    def build():
        t = TinyModel([3, 4], opset=opset)
        h = t.node("Tanh", [t.node("Add", [t.scaled_x([4]), t.param([3, 4])])])
        if opset >= 18:
            out = t.node("ReduceMean", [h, t.ints(axes)], keepdims=keepdims)
        else:
            out = t.node("ReduceMean", [h], axes=axes, keepdims=keepdims)
        if 0 in axes:  # a mean over the batch (keepdims): broadcast back so the output keeps its batch axis
            out = t.node("Mul", [out, h])
        return t.build(out)
    return build


def batch_norm():
    t = TinyModel([3, 4, 4])
    h = t.scaled_x([3, 1, 1])
    scale, bias = t.param([3], 0.5, 1.5), t.param([3])
    mean, var = t.param([3]), t.param([3], 0.5, 2.0)
    return t.build(t.node("BatchNormalization", [h, scale, bias, mean, var], epsilon=1e-3))


RULE_CASES = {
    "gemm": gemm(0, 0, [3]),
    "gemm_transB": gemm(0, 1, [1, 3]),
    "gemm_transA": gemm(1, 0, None),
    "gemm_transA_transB": gemm(1, 1, [1]),
    "matmul_2d": matmul([4], [4, 3]),
    "matmul_3d_by_2d": matmul([5, 4], [4, 3]),
    "matmul_batched_broadcast": matmul([2, 3, 4], [2, 4, 5]),
    "matmul_weight_on_the_left": matmul([3, 4], [5, 3], w_left=True),
    "add_broadcast_row": binary("Add", [4]),
    "add_broadcast_column": binary("Add", [3, 1]),
    "sub": binary("Sub", [1]),
    "sub_reversed": binary("Sub", [3, 4], b_first=True),
    "mul_broadcast": binary("Mul", [3, 1]),
    "div": binary("Div", [4]),
    "div_reversed": binary("Div", [1, 4], b_first=True),
    "relu": unary("Relu"),
    "leaky_relu": unary("LeakyRelu", alpha=0.2),
    "sigmoid": unary("Sigmoid"),
    "tanh": unary("Tanh"),
    "softmax_last_axis": unary("Softmax"),
    "softmax_axis1": unary("Softmax", axis=1),
    "log_softmax": unary("LogSoftmax", axis=-1),
    "neg": unary("Neg"),
    "exp": unary("Exp"),
    "log": positive_unary("Log"),
    "sqrt": positive_unary("Sqrt"),
    "slice_columns": slice_case([0, 1], [3, 100], [2, 1]),
    "slice_negative_indices_opset13": slice_case([-3], [-1], [-1], opset=13),
    "slice_all_axes_default": slice_case([0, 0, 1, 1], [2**63 - 1, 2, 3, 4], None),
    "clip_relu6": clip(0.0, 0.6),
    "clip_min_only": clip(-0.2, None),
    "pad_constant": pad([0, 0, 1, 2, 0, 0, 3, 0], 17),
    "pad_constant_axes_input": pad([1, 2, 0, 1], 18, axes=[1, -1]),
    "conv2d": conv([2, 6, 6], 3, (3, 3)),
    "conv2d_stride_asymmetric_pads": conv([2, 7, 6], 3, (3, 2), strides=[2, 2], pads=[1, 0, 2, 1]),
    "conv2d_dilation": conv([2, 7, 7], 2, (2, 3), dilations=[2, 1], pads=[1, 1, 1, 1]),
    "conv2d_groups": conv([4, 6, 6], 6, (3, 3), group=2, strides=[2, 1]),
    "conv2d_depthwise": conv([3, 5, 5], 3, (3, 3), group=3, pads=[1, 1, 1, 1]),
    "conv2d_no_bias_valid": conv([2, 5, 5], 2, (2, 2), bias=False, auto_pad="VALID"),
    "conv1d": conv([2, 9], 3, (3,), strides=[2]),
    "conv2d_5x5_kernel_transposed_path": conv([2, 8, 7], 3, (5, 5), strides=[1, 2], pads=[2, 1, 2, 1]),
    "conv3d": conv([2, 4, 5, 4], 2, (2, 3, 2), pads=[1, 0, 0, 0, 1, 1]),
    "maxpool_2x2_tiling": pool("MaxPool", [2, 6, 6], kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_2x2_odd_input": pool("MaxPool", [2, 7, 5], kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool_3x3_stride2_overlapping": pool("MaxPool", [2, 7, 7], kernel_shape=[3, 3], strides=[2, 2]),
    "maxpool_padded": pool("MaxPool", [2, 5, 5], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0]),
    "maxpool_ceil_mode": pool("MaxPool", [1, 5, 5], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "maxpool_dilated": pool("MaxPool", [1, 6, 6], kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2]),
    "maxpool_1d": pool("MaxPool", [2, 8], kernel_shape=[2], strides=[2]),
    "averagepool_2x2": pool("AveragePool", [2, 6, 6], kernel_shape=[2, 2], strides=[2, 2]),
    "averagepool_padded_exclude_pad": pool("AveragePool", [2, 6, 5], kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 1, 1, 1]),
    "averagepool_padded_include_pad": pool("AveragePool", [2, 6, 5], kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 0, 1, 1], count_include_pad=1),
    "averagepool_1d_overlapping": pool("AveragePool", [2, 9], kernel_shape=[3], strides=[2]),
    "global_averagepool": pool("GlobalAveragePool", [3, 4, 5]),
    "flatten": shape_op("flatten"),
    "reshape": shape_op("reshape"),
    "transpose": shape_op("transpose"),
    "squeeze_unsqueeze_opset13": shape_op("squeeze_unsqueeze", opset=13),
    "squeeze_unsqueeze_opset21": shape_op("squeeze_unsqueeze", opset=21),
    "concat_opset13": shape_op("concat", opset=13),
    "concat_opset18": shape_op("concat", opset=18),
    "identity_dropout_opset13": shape_op("identity_dropout", opset=13),
    "reducemean_axes_attribute_opset17": reduce_mean([1], 1, 17),
    "reducemean_axes_input_opset18": reduce_mean([2], 0, 18),
    "reducemean_over_batch_dim": reduce_mean([0, 2], 1, 18),
    "batchnormalization_frozen_stats": batch_norm,
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_gradient_matches_finite_differences(case):
    model = RULE_CASES[case]()
    trainable = [i.name for i in model.graph.initializer if i.name.startswith("p")]
    if case.startswith("batchnormalization"):
        trainable = trainable[:3]  # x-scale, BN scale and bias: running statistics stay frozen
    compiled = compile_for_gradients(model, "mse", trainable=trainable)
    x, y = make_batch(compiled, 3, seed=7)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    finite_difference_check(compiled, x, y, grads, probes=4)

    compiled32 = compile_graphs(model, loss="mse", optimizer="sgd", trainable=trainable)
    assert_loads_in_onnxruntime(compiled32.train_step)
    grads32 = sgd_gradients(compiled32, compiled32.initial_params, x.astype(np.float32), y.astype(np.float32))
    for name, g in grads.items():
        np.testing.assert_allclose(grads32[name], g, rtol=2e-3, atol=2e-4 * (np.abs(g).max() + 1e-6), err_msg=name)


def test_every_registered_rule_has_a_test_case():
    from test_compiler_new_ops import CASES as NEW_OP_CASES
    from test_compiler_new_ops import build_model

    from aggregator.compiler import supported_ops

    covered = {n.op_type for build in RULE_CASES.values() for n in build().graph.node}
    covered |= {n.op_type for case in NEW_OP_CASES.values() for n in build_model(case).graph.node}
    from test_compiler_recurrent import CONFIGS as RECURRENT_CASES
    from test_compiler_recurrent import recurrent_model

    covered |= {n.op_type for case in RECURRENT_CASES for n in recurrent_model(*case).graph.node}
    assert set(supported_ops()) <= covered, f"rules without a test: {set(supported_ops()) - covered}"


def test_nodes_off_the_gradient_path_may_use_any_standard_op():
    t = TinyModel([4])
    pre = t.node("Abs", ["x"])  # depends only on x: no gradient flows through it
    out = t.node("Gemm", [pre, t.param([3, 4]), t.param([3])], transB=1)
    compiled = compile_for_gradients(t.build(out), "mse")
    x, y = make_batch(compiled, 3)
    finite_difference_check(compiled, x, y, sgd_gradients(compiled, compiled.initial_params, x, y))


def test_generated_graph_for_tiling_maxpool_uses_no_scatter_and_no_maxpool_indices():
    compiled = compile_graphs(RULE_CASES["maxpool_2x2_tiling"](), loss="mse", optimizer="sgd")
    ops = [n.op_type for n in compiled.train_step.graph.node]
    assert "ScatterElements" not in ops and "ScatterND" not in ops
    assert all(len(n.output) == 1 for n in compiled.train_step.graph.node if n.op_type == "MaxPool")


def test_gemm_gradients_use_trans_flags_instead_of_transpose_nodes():
    from aggregator import model_zoo

    compiled = compile_graphs(model_zoo.mlp(), loss="cross_entropy", optimizer="adam")
    assert "Transpose" not in [n.op_type for n in compiled.train_step.graph.node]


def transposed_weight_linear():
    """torch-style ``x @ W.T + b`` exported as MatMul(x, Transpose(W)) then Add."""
    t = TinyModel([4])
    h = t.scaled_x([4])
    wt = t.node("Transpose", [t.param([3, 4])], perm=[1, 0])
    return t.build(t.node("Add", [t.node("MatMul", [h, wt]), t.param([3])]))


def test_matmul_on_transposed_weight_plus_bias_becomes_one_gemm():
    model = transposed_weight_linear()
    compiled = compile_for_gradients(model, "mse")
    for graph in (compiled.eval, compiled.train_step):
        ops = [n.op_type for n in graph.graph.node]
        assert "Transpose" not in ops and "MatMul" not in ops
    x, y = make_batch(compiled, 4)
    finite_difference_check(compiled, x, y, sgd_gradients(compiled, compiled.initial_params, x, y))
    import onnxruntime as ort

    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})[0]
    compiled32 = compile_graphs(model, loss="mse", optimizer="sgd")
    got = ort.InferenceSession(compiled32.eval.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["output"], {"x": x.astype(np.float32), "y": y.astype(np.float32), **compiled32.initial_params})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_intermediate_values_named_like_bundle_io_are_renamed():
    t = TinyModel([4])
    # an exporter's choice of value names that the bundle reserves for its own inputs and outputs
    t.nodes.append(helper.make_node("Gemm", ["x", t.param([4, 4]), t.param([4])], ["loss"], transB=1))
    t.nodes.append(helper.make_node("Relu", ["loss"], ["y"]))
    t.nodes.append(helper.make_node("Tanh", ["y"], ["prediction"]))
    compiled = compile_for_gradients(t.build("prediction"), "mse")
    x, y = make_batch(compiled, 3)
    finite_difference_check(compiled, x, y, sgd_gradients(compiled, compiled.initial_params, x, y))


def test_model_with_external_weights_compiles_from_its_path(tmp_path):
    from aggregator import model_zoo

    path = tmp_path / "mlp.onnx"
    onnx.save_model(model_zoo.mlp((64, 32, 10)), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.weights", size_threshold=0)
    assert (tmp_path / "mlp.weights").exists()
    compiled = compile_graphs(path, loss="cross_entropy", optimizer="sgd")
    expected = {t.name: numpy_helper.to_array(t) for t in model_zoo.mlp((64, 32, 10)).graph.initializer}
    for name, value in compiled.initial_params.items():
        np.testing.assert_array_equal(value, expected[name])


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},  # tiling windows: ArgMax path
    {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]},  # Indices + ScatterElements path
], ids=["tiling", "padded"])
def test_maxpool_gradient_goes_to_the_first_maximum_on_ties_like_pytorch(attrs):
    t = TinyModel([1, 4, 4])
    t.inits.append(numpy_helper.from_array(np.zeros((1, 4, 4), np.float32), "bias"))
    out = t.node("MaxPool", [t.node("Add", ["x", "bias"])], **attrs)
    compiled = compile_graphs(t.build(out), loss="mse", optimizer="sgd", trainable=["bias"])
    x = np.ones((1, 1, 4, 4), np.float32)  # every window is one big tie
    y = np.zeros((1, *compiled.manifest.output.shape[1:]), np.float32)
    grad = sgd_gradients(compiled, compiled.initial_params, x, y)["bias"][0]
    expected = np.zeros((4, 4), np.float32)
    expected[::2, ::2] = 1.0  # the top-left (first, row-major) element of each 2x2 window
    assert np.count_nonzero(grad) == 4
    np.testing.assert_array_equal(grad != 0, expected != 0)


@settings(max_examples=20, deadline=None)
@given(
    op=st.sampled_from(["Add", "Sub", "Mul", "Div"]),
    mask=st.lists(st.booleans(), min_size=3, max_size=3),
    drop_leading=st.integers(0, 2),
    swap=st.booleans(),
)
def test_broadcast_gradients_sum_back_to_any_operand_shape(op, mask, drop_leading, swap):
    """For any numpy-broadcastable parameter shape, the parameter's gradient has its shape and is right."""
    full = [2, 3, 4]
    shape = [d if keep else 1 for d, keep in zip(full, mask, strict=True)][drop_leading:]
    t = TinyModel(full)
    h = t.node("Add", [t.scaled_x([4]), t.param(full, 0.5, 1.0)])
    b = t.param(shape or [1], 0.5, 1.5)
    out = t.node(op, [b, h] if swap else [h, b])
    compiled = compile_for_gradients(t.build(out), "mse")
    x, y = make_batch(compiled, 2, seed=len(shape))
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    assert grads[b].shape == tuple(shape or [1])
    finite_difference_check(compiled, x, y, grads, probes=3)


def test_compiling_twice_gives_byte_identical_graphs():
    from aggregator import model_zoo

    first = compile_graphs(model_zoo.cnn(), loss="cross_entropy", optimizer="adamw")
    second = compile_graphs(model_zoo.cnn(), loss="cross_entropy", optimizer="adamw")
    assert first.train_step.SerializeToString() == second.train_step.SerializeToString()
    assert first.eval.SerializeToString() == second.eval.SerializeToString()
    assert first.manifest == second.manifest
