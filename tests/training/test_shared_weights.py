"""Frozen parameters are stored once per bundle, as external data both graphs reference
(aggregator.compiler.shared_weights), hashed and verified like every other bundle file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_graphs, compile_model
from aggregator.compiler.shared_weights import FROZEN_FILE
from edge_sdk.training.bundle import BundleIntegrityError, load_bundle
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import TrainingState

SIZES = (64, 96, 10)  # the frozen 96x64 first layer is 24 KB: large enough to be stored externally


@pytest.fixture
def head_only(tmp_path):
    model = model_zoo.mlp(SIZES, seed=0)
    out = tmp_path / "head"
    compile_model(model, out, loss="cross_entropy", optimizer="sgd", trainable=["layers.2."])
    return model, out


def test_the_frozen_layer_is_stored_once_and_referenced_by_both_graphs(head_only):
    _, out = head_only
    weight_bytes = 96 * 64 * 4
    assert weight_bytes <= (out / FROZEN_FILE).stat().st_size < 2 * weight_bytes
    for graph in ("train_step.onnx", "eval.onnx"):
        assert (out / graph).stat().st_size < weight_bytes
        model = onnx.load(out / graph, load_external_data=False)
        external = [i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert "layers.0.weight" in external
    assert FROZEN_FILE in load_bundle(out).manifest.files


def test_a_bundle_with_shared_weights_trains_like_the_in_memory_graphs(head_only):
    model, out = head_only
    compiled = compile_graphs(model, loss="cross_entropy", optimizer="sgd", trainable=["layers.2."])
    import onnxruntime as ort

    reference = ort.InferenceSession(compiled.train_step.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.random((8, 64), dtype=np.float32)
    y = rng.integers(0, 10, 8).astype(np.int64)
    state = TrainingState(ModelSession.open(out))
    loss = state.train_step(x, y, lr=0.1)
    feed = {"x": x, "y": y, "lr": np.asarray(0.1, np.float32), "step": np.asarray(1, np.int64),
            **compiled.initial_params}
    outputs = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feed), strict=True))
    assert loss == pytest.approx(float(outputs["loss"]), rel=1e-6)
    for p in compiled.manifest.trainable:
        np.testing.assert_allclose(state.get_params()[p.name], outputs[p.output], rtol=1e-6, atol=1e-7)
    evaluated, _ = state.evaluate_batch(x, y)
    assert np.isfinite(evaluated)


def test_a_modified_frozen_weights_file_is_refused(head_only):
    _, out = head_only
    data = bytearray((out / FROZEN_FILE).read_bytes())
    data[100] ^= 0xFF
    (out / FROZEN_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=FROZEN_FILE):
        load_bundle(out)
