"""Exporter rewrites that would make the bundle train something other than PyTorch: each is undone by
the compiler (tied initializers, exporter-made scalars), avoided by ``aggregator.export.torch_to_onnx``,
or reported with an ``ExportRewriteWarning`` naming the layer and the export setting that keeps it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_compiler_rules import TinyModel

from aggregator.compiler import UnsupportedOpError, compile_graphs
from aggregator.compiler.errors import ExportRewriteWarning


def _compile(model, **kwargs):
    return compile_graphs(model, loss="cross_entropy", optimizer="sgd", **kwargs)


def _trained(compiled):
    return {p.name for p in compiled.manifest.trainable}


def test_identity_tied_initializers_are_untied_under_their_own_names():
    t = TinyModel([4])
    w, b = t.param([3, 4]), "shared_zeros"
    t.inits.append(numpy_helper.from_array(np.zeros(3, np.float32), b))
    t.nodes.append(helper.make_node("Identity", [b], ["second.bias"]))
    h = t.node("Gemm", ["x", w, b], transB=1)
    out = t.node("Gemm", [h, t.param([3, 3]), "second.bias"], transB=1)
    compiled = _compile(t.build(out))
    assert {"shared_zeros", "second.bias"} <= _trained(compiled)
    assert "Identity" not in {n.op_type for n in compiled.train_step.graph.node}


def test_exporter_made_scalars_are_frozen_but_named_and_layer_scalars_stay_trainable():
    t = TinyModel([4])
    t.inits.append(numpy_helper.from_array(np.asarray([0.5], np.float32), "val_69"))  # dynamo's attention scale
    t.inits.append(numpy_helper.from_array(np.asarray(2.0, np.float32), "logit_scale"))  # a learnable scalar
    h = t.node("Mul", [t.node("Mul", ["x", "val_69"]), "logit_scale"])
    out = t.node("Gemm", [h, t.param([1, 4]), t.param([1])], transB=1)  # Linear(4, 1): its bias is [1]
    compiled = compile_graphs(t.build(out), loss="mse", optimizer="sgd")
    assert _trained(compiled) == {"logit_scale", "p2", "p3"}
    explicit = compile_graphs(t.build(out), loss="mse", optimizer="sgd", trainable=["val_69", "p"])
    assert "val_69" in _trained(explicit)


def test_tf2onnx_layer_without_bias_warns():
    t = TinyModel([4])
    out = t.node("Gemm", ["x", t.param([3, 4])], transB=1)
    model = t.build(out)
    model.producer_name = "tf2onnx"
    with pytest.warns(ExportRewriteWarning, match=r"Gemm 'Gemm_0'.*tf2onnx drops all-zero biases"):
        _compile(model)


def test_every_unsupported_op_is_reported_in_one_error():
    t = TinyModel([4])
    h = t.node("Sin", [t.node("Gemm", ["x", t.param([3, 4])], transB=1)])
    out = t.node("Cos", [t.node("Softplus", [h])])
    with pytest.raises(UnsupportedOpError) as info:
        compile_graphs(t.build(out), loss="mse", optimizer="sgd")
    message = str(info.value)
    assert message.startswith("3 node(s) on the gradient path use ops with no gradient rule (Cos, Sin, Softplus)")
    assert message.index("'Sin_1'") < message.index("'Softplus_2'") < message.index("'Cos_3'")


def test_node_names_carry_the_pytorch_module_and_source_line():
    from aggregator.compiler.node_origin import origin

    node = helper.make_node("Relu", ["a"], ["b"], name="n0_19")
    helper.set_metadata_props(node, {
        "pkg.torch.onnx.name_scopes": "['', 'features', 'features.0', 'relu']",
        "pkg.torch.onnx.stack_trace": 'File "/home/u/net.py", line 12, in forward\n  File '
                                      '"/x/site-packages/torch/nn/modules/activation.py", line 9, in forward',
    })
    assert origin(node) == " (PyTorch module features.0, net.py:12)"
    assert origin(helper.make_node("Relu", ["a"], ["b"])) == ""


torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)
        torch.nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _export(net, **kwargs):
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 6, 6),), buffer, input_names=["input"], **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def test_legacy_constant_folding_of_batchnorm_warns_naming_the_layer_and_setting():
    model = _export(Block().eval(), dynamo=False, dynamic_axes={"input": {0: "b"}})
    with pytest.warns(ExportRewriteWarning, match=r"Conv '/conv/Conv'.*folded a BatchNormalization.*"
                                                  r"do_constant_folding=False"):
        _compile(model)


@pytest.mark.slow
def test_dynamo_optimizer_folding_and_dropped_biases_warn():
    pytest.importorskip("onnxscript")
    model = _export(Block().eval(), dynamo=True, dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    with pytest.warns(ExportRewriteWarning) as record:
        _compile(model)
    messages = [str(w.message) for w in record]
    assert any("PyTorch module bn" in m and "folded a BatchNormalization" in m for m in messages)
    assert any("PyTorch module fc" in m and "dropped this layer's all-zero bias" in m for m in messages)
    assert all("optimize=False" in m for m in messages)


@pytest.mark.slow
def test_dynamo_export_of_a_training_mode_batchnorm_warns():
    pytest.importorskip("onnxscript")
    model = _export(Block().train(), dynamo=True, optimize=False)
    with pytest.warns(ExportRewriteWarning, match=r"training mode \(model.train\(\)\).*call model.eval\(\)"):
        _compile(model)


@pytest.mark.parametrize("make", [Block, lambda: torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
    torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))], ids=["block", "sequential"])
def test_torch_to_onnx_keeps_every_parameter_and_the_bundle_trains_exactly_them(tmp_path, make):
    from aggregator.export import missing_parameters, torch_to_onnx

    net = make().eval()  # fresh: equal zero biases and unit weights that the default export would merge
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportRewriteWarning)
        model = torch_to_onnx(net, torch.randn(2, 3, 6, 6), path)
        compiled = _compile(path)
    names = [name for name, _ in net.named_parameters()]
    assert missing_parameters(model, names) == []
    assert _trained(compiled) == set(names)
    for name, p in net.named_parameters():
        np.testing.assert_array_equal(compiled.initial_params[name], p.detach().numpy())
    assert compiled.manifest.x.shape[0] is None
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
