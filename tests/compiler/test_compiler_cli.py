"""``fleetlearn compile`` writes a bundle the device runtime accepts, and reports errors in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from aggregator import model_zoo
from edge_sdk.cli import main
from edge_sdk.training.bundle import load_bundle


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "backbone.onnx"
    onnx.save(model_zoo.frozen_backbone(), path)
    return path


def test_compile_writes_a_verified_bundle_with_the_requested_options(model_path, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main([
        "compile", str(model_path), "--out", str(out), "--loss", "cross_entropy", "--optimizer", "adamw",
        "--trainable", "head.2.", "head.0.weight", "--beta1", "0.8", "--weight-decay", "0.1",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable"] == ["head.0.weight", "head.2.weight", "head.2.bias"]
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.optimizer == "adamw" and m.loss == "cross_entropy"
    assert m.optimizer_params == {"beta1": 0.8, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
    assert [p.name for p in m.trainable] == summary["trainable"]
    assert "head.0.bias" in {p.name for p in m.frozen}
    assert {s.kind for s in m.state} == {"m", "v"} and len(m.state) == 6
    assert set(bundle.initial_params) == set(summary["trainable"])
    assert bundle.initial_params["head.0.weight"].dtype == np.float32


def test_compile_float64_bundle(tmp_path):
    model_path = tmp_path / "regression.onnx"
    onnx.save(model_zoo.regression(), model_path)
    out = tmp_path / "bundle64"
    assert main(["compile", str(model_path), "--out", str(out), "--loss", "mse", "--optimizer", "sgd",
                 "--dtype", "float64"]) == 0
    m = load_bundle(out).manifest
    assert m.x.dtype == "float64" and m.y.dtype == "float64" and m.y.shape == (None, 3)


def test_compile_refuses_float64_for_a_conv_model_onnxruntime_cannot_run(model_path, tmp_path, capsys):
    out = tmp_path / "bundle64"
    assert main(["compile", str(model_path), "--out", str(out), "--loss", "mse", "--optimizer", "sgd",
                 "--dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert "NOT_IMPLEMENTED" in err and "Conv" in err and "--dtype float32" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [model_path]


def test_compile_reports_a_corrupt_model_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model_zoo.mlp().SerializeToString()[:5000])
    code = main(["compile", str(bad), "--out", str(tmp_path / "b"), "--loss", "mse", "--optimizer", "sgd"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleetlearn compile: error:") and "bad.onnx" in err and "\n" not in err


def test_momentum_option_is_refused_for_another_optimizer(model_path, tmp_path, capsys):
    code = main(["compile", str(model_path), "--out", str(tmp_path / "b"), "--loss", "mse", "--optimizer", "adam",
                 "--momentum", "0.5"])
    assert code == 2
    assert "--momentum applies to --optimizer momentum" in capsys.readouterr().err
