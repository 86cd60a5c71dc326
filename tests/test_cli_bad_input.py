"""Every bad input a new user hit is a one-line error with exit code 2, and no file changes.

Each case runs the real ``fleetlearn`` entry point on a working directory of real files (a compiled
bundle, datasets, ONNX models, a ledger), then checks the exit code, that the message names the
argument or file at fault, that it is one line without a traceback, and that every file in the
directory has the same sha256 as before (and no file appeared).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_model
from edge_sdk.cli import main
from edge_sdk.privacy import DeviceLedger

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["plan", "--delta", "1e-6", "--cohort", "100", "--population", "10000", "--rounds", "50", "--dim", "4096"]
TRAIN = ["train", "bundle", "--data", "train.npz", "--epochs", "1", "--batch-size", "8", "--lr", "0.1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_inputs")
    compile_model(model_zoo.mlp((64, 16, 10), seed=0), root / "bundle", loss="cross_entropy", optimizer="sgd")
    rng = np.random.default_rng(0)
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    np.savez(root / "train.npz", x=x, y=y)
    np.save(root / "features.npy", x)
    (root / "truncated.npz").write_bytes((root / "train.npz").read_bytes()[:300])
    x_nan = x.copy()
    x_nan[3, 5] = np.nan
    np.savez(root / "nan.npz", x=x_nan, y=y)
    params = dict(np.load(root / "bundle" / "initial_params.npz"))
    first = sorted(params)[0]
    params[first] = params[first].copy()
    params[first].flat[0] = np.inf
    np.savez(root / "inf_params.npz", **params)
    onnx.save(model_zoo.mlp((64, 16, 10), seed=1), root / "mlp.onnx")
    onnx.save(model_zoo.mlp((64, 16, 1), seed=1), root / "one_output.onnx")
    onnx.save(model_zoo.cnn(), root / "cnn.onnx")
    # What torch.onnx.export(dynamo=True) writes: the graph, and its weights in a .onnx.data file
    # beside it, which is then lost on the way to the host.
    onnx.save(model_zoo.mlp((64, 16, 10), seed=2), root / "exported.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="exported.onnx.data", size_threshold=0)
    (root / "exported.onnx.data").unlink()
    (root / "existing.txt").write_text("not a bundle\n")
    (root / "ledgers").mkdir()
    DeviceLedger.open(root / "ledgers" / "device.ledger", 8.0, 1e-6).close()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


COMPILE = ["compile", "mlp.onnx", "--loss", "cross_entropy", "--optimizer", "sgd"]
CASES = {
    "truncated npz": (["train", "bundle", "--data", "truncated.npz", *TRAIN[4:], "--out", "p.npz"], "truncated.npz"),
    "npy as data": (["train", "bundle", "--data", "features.npy", *TRAIN[4:], "--out", "p.npz"], "features.npy"),
    "negative seed": ([*TRAIN, "--seed", "-1", "--out", "p.npz"], "--seed"),
    "out in a missing directory": ([*TRAIN, "--out", "missing/p.npz"], "missing"),
    "out is a directory": ([*TRAIN, "--out", "ledgers"], "ledgers"),
    "out is the data": ([*TRAIN, "--out", "train.npz"], "--data"),
    "out inside the bundle": ([*TRAIN, "--out", "bundle/initial_params.npz"], "BUNDLE"),
    "out is the init params": ([*TRAIN, "--params", "inf_params.npz", "--out", "inf_params.npz"], "--params"),
    "zero epochs": (["train", "bundle", "--data", "train.npz", "--epochs", "0", "--batch-size", "8", "--lr", "0.1",
                     "--out", "p.npz"], "--epochs"),
    "infinite lr": (["train", "bundle", "--data", "train.npz", "--epochs", "1", "--batch-size", "8", "--lr", "inf",
                     "--out", "p.npz"], "--lr"),
    "zero batch size": (["train", "bundle", "--data", "train.npz", "--epochs", "1", "--batch-size", "0", "--lr", "0.1",
                         "--out", "p.npz"], "--batch-size"),
    "too many threads": ([*TRAIN, "--threads", "1000", "--out", "p.npz"], "--threads"),
    "zero threads": (["evaluate", "bundle", "--data", "train.npz", "--threads", "0"], "--threads"),
    "unknown profile": ([*TRAIN, "--profile", "pi-99", "--out", "p.npz"], "pi-99"),
    "evaluate nan data": (["evaluate", "bundle", "--data", "nan.npz"], "nan.npz"),
    "evaluate nan data json": (["evaluate", "bundle", "--data", "nan.npz", "--json"], "nan.npz"),
    "evaluate inf params": (["evaluate", "bundle", "--data", "train.npz", "--params", "inf_params.npz", "--json"],
                            "inf_params.npz"),
    "compile out is a file": ([*COMPILE, "--out", "existing.txt"], "existing.txt"),
    "compile out is a bundle": ([*COMPILE, "--out", "bundle"], "--force"),
    "compile out is another directory": ([*COMPILE, "--out", "ledgers", "--force"], "ledgers"),
    "compile out in a missing directory": ([*COMPILE, "--out", "missing/bundle"], "missing"),
    "compile missing onnx.data": (["compile", "exported.onnx", "--out", "b", "--loss", "cross_entropy",
                                   "--optimizer", "sgd"], "exported.onnx"),
    "compile one output with cross-entropy": (["compile", "one_output.onnx", "--out", "b", "--loss", "cross_entropy",
                                               "--optimizer", "sgd"], "cross_entropy"),
    "compile infinite weight decay": ([*COMPILE, "--out", "b", "--weight-decay", "inf"], "--weight-decay"),
    "compile float64 conv": (["compile", "cnn.onnx", "--out", "b", "--loss", "cross_entropy", "--optimizer", "sgd",
                              "--dtype", "float64"], "float64"),
    "budget of a directory": (["device", "budget", "--ledger", "ledgers"], "ledgers"),
    "budget of a missing ledger": (["device", "budget", "--ledger", "ledgers/none"], "ledgers/none"),
    "init over an existing ledger": (["device", "init", "--ledger", "ledgers/device.ledger", "--epsilon", "4",
                                      "--delta", "1e-6"], "device.ledger"),
    "init with a bad delta": (["device", "init", "--ledger", "ledgers/new", "--epsilon", "4", "--delta", "2"],
                              "--delta"),
    "plan with 7 bits": ([*PLAN, "--epsilon", "4", "--bits", "7"], "bits"),
    "plan with 33 bits": ([*PLAN, "--epsilon", "4", "--bits", "33"], "bits"),
    "plan with an infinite epsilon": ([*PLAN, "--epsilon", "inf"], "--epsilon"),
}


@pytest.mark.parametrize(("argv", "named"), list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, named, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fleetlearn {argv[0]}: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(workdir) == before


def test_a_real_process_prints_no_traceback_either(workdir):
    before = snapshot(workdir)
    result = subprocess.run([sys.executable, "-m", "edge_sdk.cli", *CASES["npy as data"][0]],
                            cwd=workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "features.npy" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(workdir) == before


def test_plan_says_when_the_epsilon_target_is_far_from_what_it_achieves(capsys):
    assert main([*PLAN, "--epsilon", "1e6", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["target"] == {"epsilon": 1e6, "met": True}
    assert plan["privacy"]["epsilon"] < 1e6
    assert any("target epsilon=1e+06 is not reached" in w for w in plan["warnings"])
    assert main([*PLAN, "--epsilon", "1e6"]) == 0
    text = capsys.readouterr().out
    assert "target    epsilon=1e+06: met" in text and "warning: target epsilon=1e+06 is not reached" in text


def test_compile_force_replaces_a_bundle_atomically(workdir, tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = ["compile", str(workdir / "mlp.onnx"), "--out", str(out), "--loss", "mse", "--optimizer", "sgd"]
    assert main(argv) == 0
    first = snapshot(out)
    assert main([*argv[:-4], "--loss", "cross_entropy", "--optimizer", "adam", "--force"]) == 0
    assert snapshot(out) != first and json.loads((out / "manifest.json").read_text())["optimizer"] == "adam"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging directory left behind
    capsys.readouterr()


def test_ctrl_c_during_training_exits_130_and_saves_nothing(workdir, tmp_path):
    out = tmp_path / "p.npz"
    argv = [sys.executable, "-m", "edge_sdk.cli", "train", "bundle", "--data", "train.npz", "--epochs", "100000",
            "--batch-size", "8", "--lr", "0.01", "--out", str(out)]
    process = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout.readline().startswith("epoch 1/100000")  # training is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted after" in err and "nothing was saved" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
