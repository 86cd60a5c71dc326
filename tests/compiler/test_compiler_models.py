"""End-to-end gradient checks of compiled reference models (issue acceptance: MLP, CNN, Sigmoid/Tanh/MSE,
depthwise conv, frozen backbone): finite differences in float64, an independent numpy reference, and
float32 onnxruntime runs."""

from __future__ import annotations

from dataclasses import dataclass

import compiler_numpy_reference as ref
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from compiler_harness import (
    GraphRunner,
    assert_loads_in_onnxruntime,
    compile_for_gradients,
    finite_difference_check,
    make_batch,
    param_feeds,
    sgd_gradients,
    train_step,
)
from onnx import numpy_helper

from aggregator import model_zoo
from aggregator.compiler import compile_graphs


@dataclass
class Case:
    name: str
    build: object  # () -> onnx.ModelProto
    layers: object  # () -> list of reference layers
    loss: str
    batch: int
    trainable: tuple[str, ...] | None = None


CASES = [
    Case("mlp_gemm_relu_ce", lambda: model_zoo.mlp((12, 9, 5)),
         lambda: [ref.Flatten(), ref.Linear("layers.0.weight", "layers.0.bias"), ref.Activation("relu"),
                  ref.Linear("layers.2.weight", "layers.2.bias")], "cross_entropy", 6),
    Case("cnn_conv_maxpool_flatten_gemm", lambda: model_zoo.cnn(),
         lambda: [ref.Conv2d("conv1.weight", "conv1.bias"), ref.Activation("relu"), ref.Pool2d("max"),
                  ref.Conv2d("conv2.weight", "conv2.bias"), ref.Activation("relu"), ref.Pool2d("max"),
                  ref.Flatten(), ref.Linear("fc.weight", "fc.bias")], "cross_entropy", 2),
    Case("cnn_conv_averagepool_maxpool", lambda: model_zoo.cnn(pools=("avg", "max")),
         lambda: [ref.Conv2d("conv1.weight", "conv1.bias"), ref.Activation("relu"), ref.Pool2d("avg"),
                  ref.Conv2d("conv2.weight", "conv2.bias"), ref.Activation("relu"), ref.Pool2d("max"),
                  ref.Flatten(), ref.Linear("fc.weight", "fc.bias")], "cross_entropy", 2),
    Case("sigmoid_tanh_mse", lambda: model_zoo.regression(),
         lambda: [ref.Linear("hidden.weight", "hidden.bias"), ref.Activation("sigmoid"),
                  ref.MatMulAdd("onnx::MatMul_17", "out.bias"), ref.Activation("tanh")], "mse", 5),
    Case("depthwise_conv_groups", lambda: model_zoo.depthwise_cnn(),
         lambda: [ref.Conv2d("stem.weight", "stem.bias", pad=1), ref.Activation("relu"),
                  ref.Conv2d("dw.weight", "dw.bias", stride=2, pad=1, groups=6), ref.Activation("leaky_relu", 0.1),
                  ref.Conv2d("pw.weight", "pw.bias"), ref.Activation("relu"), ref.GlobalAvgPool(), ref.Flatten(),
                  ref.Linear("fc.weight", "fc.bias")], "cross_entropy", 3),
    Case("frozen_backbone_head_only", lambda: model_zoo.frozen_backbone(),
         lambda: _backbone_layers(), "cross_entropy", 4, trainable=("head.",)),
    Case("backbone_with_batchnorm_trained", lambda: model_zoo.frozen_backbone(),
         lambda: _backbone_layers(), "cross_entropy", 4),
]


def _backbone_layers():
    return [ref.Conv2d("backbone.conv.weight", "backbone.conv.bias", pad=1),
            ref.BatchNormEval("backbone.bn.weight", "backbone.bn.bias", "backbone.bn.running_mean",
                              "backbone.bn.running_var"),
            ref.Activation("relu"), ref.Pool2d("avg"), ref.Flatten(),
            ref.Linear("head.0.weight", "head.0.bias"), ref.Activation("relu"),
            ref.Linear("head.2.weight", "head.2.bias")]


def all_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def compiled64(request):
    case = request.param
    compiled = compile_for_gradients(case.build(), case.loss, trainable=case.trainable)
    x, y = make_batch(compiled, case.batch, seed=3)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    return case, compiled, x, y, grads


def test_gradients_match_central_finite_differences(compiled64):
    case, compiled, x, y, grads = compiled64
    finite_difference_check(compiled, x, y, grads, probes=4)


def test_gradients_match_independent_numpy_reference(compiled64):
    case, compiled, x, y, grads = compiled64
    params = {k: v.astype(np.float64) for k, v in all_initializers(case.build()).items()}
    loss, expected = ref.loss_and_gradients(case.layers(), params, x, y, case.loss)
    out = GraphRunner(compiled.eval)({"x": x, "y": y, **param_feeds(compiled, compiled.initial_params)})
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-10)
    assert set(grads) == {p.name for p in compiled.manifest.trainable}
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, expected[name], rtol=1e-7, atol=1e-10, err_msg=name)


def test_float32_train_step_runs_in_onnxruntime_and_matches_reference(compiled64):
    case, _, _, _, _ = compiled64
    compiled = compile_graphs(case.build(), loss=case.loss, optimizer="sgd", trainable=case.trainable)
    assert_loads_in_onnxruntime(compiled.train_step)
    assert_loads_in_onnxruntime(compiled.eval)
    x, y = make_batch(compiled, case.batch, seed=4)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    params = {k: v.astype(np.float64) for k, v in all_initializers(case.build()).items()}
    _, expected = ref.loss_and_gradients(case.layers(), params, x, y, case.loss)
    for name, grad in grads.items():
        assert grad.dtype == np.float32
        scale = np.abs(expected[name]).max() + 1e-6
        np.testing.assert_allclose(grad, expected[name], atol=2e-4 * scale, rtol=1e-3, err_msg=name)


def test_eval_output_equals_the_inference_model_output(compiled64):
    case, _, _, _, _ = compiled64
    model = case.build()
    compiled = compile_graphs(model, loss=case.loss, optimizer="adam", trainable=case.trainable)
    x, y = make_batch(compiled, 7, seed=5)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {model.graph.input[0].name: x})[0]
    out = GraphRunner(compiled.eval)({"x": x, "y": y, **param_feeds(compiled, compiled.initial_params)})
    np.testing.assert_allclose(out["output"], expected, rtol=1e-5, atol=1e-6)


def test_frozen_backbone_parameters_never_change():
    model = model_zoo.frozen_backbone()
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="adam", trainable=["head."])
    m = compiled.manifest
    assert {p.name for p in m.trainable} == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    frozen = {p.name for p in m.frozen}
    assert frozen == {n for n in all_initializers(model) if n.startswith("backbone.")}
    graph_inputs = {i.name for i in compiled.train_step.graph.input}
    assert not frozen & graph_inputs, "frozen parameters must be constants, not inputs"
    baked = {t.name: numpy_helper.to_array(t) for t in compiled.train_step.graph.initializer}
    for name in frozen:
        np.testing.assert_array_equal(baked[name], all_initializers(model)[name])

    runner = GraphRunner(compiled.train_step)
    params = dict(compiled.initial_params)
    state = {s.input: np.zeros(s.shape, np.float32) for s in m.state}
    x, y = make_batch(compiled, 8, seed=6)
    for step in range(1, 4):
        out = train_step(compiled, runner, params, x, y, lr=0.05, step=step, state=state)
        params = {p.name: out[p.output] for p in m.trainable}
        state = {s.input: out[s.output] for s in m.state}
    assert not np.allclose(params["head.0.weight"], compiled.initial_params["head.0.weight"])
    # the trained head on the ORIGINAL backbone reproduces the eval graph's output exactly
    patched = onnx.ModelProto.FromString(model.SerializeToString())
    for init in patched.graph.initializer:
        if init.name in params:
            init.CopyFrom(numpy_helper.from_array(params[init.name], init.name))
    sess = ort.InferenceSession(patched.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"input": x})[0]
    got = GraphRunner(compiled.eval)({"x": x, "y": y, **params})["output"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_running_statistics_stay_frozen_when_training_everything():
    compiled = compile_graphs(model_zoo.frozen_backbone(), loss="cross_entropy", optimizer="sgd")
    trainable = {p.name for p in compiled.manifest.trainable}
    assert "backbone.bn.weight" in trainable and "backbone.bn.bias" in trainable
    assert "backbone.bn.running_mean" not in trainable and "backbone.bn.running_var" not in trainable


@pytest.mark.parametrize("build", [model_zoo.mlp, model_zoo.cnn], ids=["mlp", "cnn"])
def test_batch_dimension_is_dynamic_so_a_partial_last_batch_works(build):
    compiled = compile_graphs(build(), loss="cross_entropy", optimizer="momentum")
    assert compiled.manifest.x.shape[0] is None
    runner = GraphRunner(compiled.train_step)
    for n in (32, 7, 1):
        x, y = make_batch(compiled, n, seed=n)
        out = train_step(compiled, runner, compiled.initial_params, x, y, lr=0.1)
        assert np.isfinite(out["loss"]) and out["loss"].shape == ()


@pytest.mark.parametrize("opset", list(range(13, 22)))
def test_every_opset_from_13_to_21_compiles_and_trains(opset):
    for build in (lambda: model_zoo.mlp((10, 6, 3), opset=opset), lambda: model_zoo.depthwise_cnn(opset=opset)):
        compiled = compile_graphs(build(), loss="cross_entropy", optimizer="adamw")
        assert compiled.manifest.opset == opset
        assert [o.version for o in compiled.train_step.opset_import] == [opset]
        runner = GraphRunner(compiled.train_step)
        x, y = make_batch(compiled, 4)
        out = train_step(compiled, runner, compiled.initial_params, x, y, lr=0.01)
        assert np.isfinite(out["loss"])
