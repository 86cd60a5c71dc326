"""A plain wheel install with the core dependencies only is a working device.

Builds the wheel from this checkout, installs it into a fresh virtual environment (no host
packages: no onnx, no dp-accounting, no access to this venv's site-packages), and runs the device
commands there on a bundle compiled on the host, with bundled device profiles. Host commands must
say which extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "edge_sdk", "aggregator")

pytestmark = pytest.mark.slow


def run(argv: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A venv holding the fleetlearn wheel and its four core dependencies, nothing else."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", root / "dist", source], cwd=root)
    wheel = next((root / "dist").glob("fleetlearn-*.whl"))
    env_dir = root / "device-venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    run([env_dir / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=root)
    return env_dir


@pytest.fixture(scope="module")
def host_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("host")
    compile_model(model_zoo.mlp((64, 32, 10), seed=0), root / "bundle", loss="cross_entropy", optimizer="sgd")
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", x=rng.random((64, 64), dtype=np.float32), y=rng.integers(0, 10, 64))
    return root


def test_the_device_install_holds_only_the_core_dependencies(device_venv, host_files):
    listed = run([device_venv / "bin" / "python", "-m", "pip", "list", "--format", "json"], cwd=host_files)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"fleetlearn", "onnxruntime", "numpy", "paho-mqtt", "cryptography"} <= names
    assert not names & {"onnx", "dp-accounting", "torch", "scikit-learn", "scipy"}
    version = run([device_venv / "bin" / "fleetlearn", "--version"], cwd=host_files)
    assert version.stdout.strip() == "fleetlearn 0.1.0"
    licence = run([device_venv / "bin" / "python", "-c", "from importlib.metadata import metadata; "
                   "m = metadata('fleetlearn'); print(m['License-Expression'], m.get_all('License-File'))"],
                  cwd=host_files)
    assert licence.stdout.strip() == "Apache-2.0 ['LICENSE']"


def test_train_and_evaluate_with_bundled_profiles_on_the_device_install(device_venv, host_files):
    fleetlearn = device_venv / "bin" / "fleetlearn"
    out = host_files / "trained.npz"
    trained = run([fleetlearn, "train", "bundle", "--data", "train.npz", "--epochs", "3", "--profile", "pi-zero-2w",
                   "--lr", "0.1", "--out", out], cwd=host_files)
    assert trained.stdout.count("epoch ") == 3 and out.is_file()
    assert "steps 4 " in trained.stdout  # pi-zero-2w's batch size 16 over 64 examples
    evaluated = run([fleetlearn, "evaluate", "bundle", "--data", "train.npz", "--params", out, "--profile",
                     "pi4-2gb", "--json"], cwd=host_files)
    result = json.loads(evaluated.stdout)
    assert result["examples"] == 64 and 0.0 <= result["accuracy"] <= 1.0
    profile = run([device_venv / "bin" / "python", "-c",
                   "from edge_sdk.config import load_profile; print(load_profile('pi5-8gb').threads)"], cwd=host_files)
    assert profile.stdout.strip() == "4"


def test_a_ledger_can_be_created_and_read_on_the_device_install(device_venv, host_files):
    fleetlearn = device_venv / "bin" / "fleetlearn"
    ledger = host_files / "device.ledger"
    run([fleetlearn, "device", "init", "--ledger", ledger, "--profile", "pi-zero-2w"], cwd=host_files)
    budget = json.loads(run([fleetlearn, "device", "budget", "--ledger", ledger, "--json"], cwd=host_files).stdout)
    assert budget["budget_epsilon"] == 8.0 and budget["participations"] == 0


@pytest.mark.parametrize(
    "argv",
    [["compile", "model.onnx", "--out", "b", "--loss", "mse", "--optimizer", "sgd"],
     ["plan", "--epsilon", "4", "--delta", "1e-6", "--cohort", "100", "--population", "10000", "--rounds", "5",
      "--dim", "100"]],
    ids=["compile", "plan"],
)
def test_host_commands_on_the_device_install_say_what_to_install(device_venv, host_files, argv):
    result = run([device_venv / "bin" / "fleetlearn", *argv], cwd=host_files, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert "pip install 'fleetlearn[host]'" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
