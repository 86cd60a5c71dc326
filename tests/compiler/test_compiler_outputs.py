"""Choosing the output to train, and cross-entropy on the logits under a trailing Softmax.

Classifier exports (skl2onnx, Keras heads) end in Softmax and often add a second, int64 label
output built from ai.onnx.ml ops. The compiler keeps the one float output, prunes the rest, and
trains cross-entropy on the Softmax's input, so a real skl2onnx MLP trains like a torch one.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from compiler_harness import assert_loads_in_onnxruntime, assert_standard_graph
from onnx import TensorProto, helper, numpy_helper

from aggregator.compiler import CompileError, compile_graphs, compile_model
from edge_sdk.training.data import prepare_dataset
from edge_sdk.training.loop import TrainConfig, evaluate, train_local
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import TrainingState


def classifier_with_label_output(second_float_output: bool = False) -> onnx.ModelProto:
    """Shaped like skl2onnx's MLPClassifier with zipmap=False: probabilities and an ai.onnx.ml label."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "coef")
    b = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "intercept")
    classes = numpy_helper.from_array(np.arange(4, dtype=np.int64), "classes")
    nodes = [
        helper.make_node("MatMul", ["X", "coef"], ["mm"]),
        helper.make_node("Add", ["mm", "intercept"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["softmax_out"], axis=1),
        helper.make_node("Identity", ["softmax_out"], ["probabilities"]),
        helper.make_node("ArgMax", ["softmax_out"], ["argmax"], axis=1),
        helper.make_node("ArrayFeatureExtractor", ["classes", "argmax"], ["label"], domain="ai.onnx.ml"),
    ]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])]
    if second_float_output:
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]))
    graph = helper.make_graph(nodes, "skl2onnx_like", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 6])],
                              outputs, initializer=[w, b, classes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])


def test_label_output_is_pruned_and_cross_entropy_trains_the_logits():
    model = classifier_with_label_output()
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd")
    for graph in (compiled.train_step, compiled.eval):
        assert_standard_graph(graph)
        assert_loads_in_onnxruntime(graph)
    assert {p.name for p in compiled.manifest.trainable} == {"coef", "intercept"}

    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0], dtype=np.int64)
    probabilities = ort.InferenceSession(model.SerializeToString()).run(["probabilities"], {"X": x})[0]
    evaluation = ort.InferenceSession(compiled.eval.SerializeToString())
    loss, logits = evaluation.run(["loss", "output"], {"x": x, "y": y, **compiled.initial_params})
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(softmax, probabilities, rtol=1e-5, atol=1e-6)
    # the loss is cross-entropy of the model's own probabilities, not of a second softmax over them
    np.testing.assert_allclose(loss, -np.mean(np.log(probabilities[np.arange(5), y])), rtol=1e-5)


def test_mse_keeps_the_softmax_output():
    compiled = compile_graphs(classifier_with_label_output(), loss="mse", optimizer="sgd")
    assert any(n.op_type == "Softmax" for n in compiled.eval.graph.node)


def test_output_option_picks_among_several_float_outputs():
    model = classifier_with_label_output(second_float_output=True)
    with pytest.raises(CompileError, match="--output"):
        compile_graphs(model, loss="cross_entropy", optimizer="sgd")
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd", output="logits")
    assert not any(n.op_type == "Softmax" for n in compiled.eval.graph.node)


def test_unknown_output_name_is_an_error_listing_the_outputs():
    with pytest.raises(CompileError, match=r"'logit'.*\['label', 'probabilities'\]"):
        compile_graphs(classifier_with_label_output(), loss="cross_entropy", optimizer="sgd", output="logit")


def test_real_skl2onnx_mlp_classifier_keeps_its_accuracy_and_trains(tmp_path):
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    train, test = slice(0, 1300), slice(1300, None)
    with pytest.warns(ConvergenceWarning):
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=3, random_state=0).fit(x[train], y[train])
    onx = skl2onnx.to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    compile_model(onx, tmp_path, loss="cross_entropy", optimizer="adam", optimizer_params={"beta1": 0.9})

    session = ModelSession.open(tmp_path)
    state = TrainingState(session)
    test_set = prepare_dataset(session.manifest, x[test], y[test])
    before = evaluate(state, test_set).accuracy
    assert before == pytest.approx(clf.score(x[test], y[test]), abs=1e-9)  # the exported weights carried over
    train_local(state, prepare_dataset(session.manifest, x[train], y[train]),
                TrainConfig(epochs=10, batch_size=32, lr=0.003, seed=0))
    after = evaluate(state, test_set).accuracy
    assert after >= 0.9 and after > before
