"""The device package stays within its four dependencies and never reaches into the host side.

The device CLI path (`fleetlearn train`, `evaluate`, `device`) is checked by running it: the
process must end without having imported `aggregator` or any host-only package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_DEPENDENCIES = {"onnxruntime", "numpy", "paho", "cryptography", "edge_sdk"}


def imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_edge_sdk_imports_only_the_stdlib_and_its_four_dependencies():
    offenders = {}
    for path in sorted((ROOT / "edge_sdk").rglob("*.py")):
        foreign = {
            name
            for name in imported_top_level_modules(path)
            if name not in DEVICE_DEPENDENCIES and name not in sys.stdlib_module_names and name != "__future__"
        }
        if foreign:
            offenders[str(path.relative_to(ROOT))] = sorted(foreign)
    assert offenders == {}, f"edge_sdk modules import packages a device does not have: {offenders}"


def test_importing_every_edge_sdk_module_loads_no_host_package():
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "edge_sdk").rglob("*.py")
    )
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "host = sorted(m for m in ('aggregator', 'onnx', 'dp_accounting', 'scipy', 'sklearn', 'torch', 'pandas')"
        " if m in sys.modules)\n"
        "print(','.join(host))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"device modules pulled in host packages: {out.stdout.strip()}"


HOST_PACKAGES = ("onnx", "dp_accounting", "scipy", "sklearn", "torch", "pandas", "onnxscript", "skl2onnx", "sympy")


def loaded_after(statements: str) -> list[str]:
    """Run ``statements`` in a fresh interpreter; return the aggregator and host packages it loaded."""
    script = (
        "import sys\n"
        f"{statements}\n"
        f"host = [m for m in sys.modules if m.split('.')[0] in {('aggregator', *HOST_PACKAGES)!r}]\n"
        "print('loaded:' + ','.join(sorted(host)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), out.stdout
    return [m for m in last.removeprefix("loaded:").split(",") if m]


def test_cli_help_lists_every_command_without_host_packages():
    loaded = loaded_after("from edge_sdk.cli import build_parser\nbuild_parser().format_help()")
    assert [m for m in loaded if not m.startswith("aggregator")] == [], f"`fleetlearn --help` imports {loaded}"


@pytest.fixture(scope="module")
def bundle_and_data(tmp_path_factory):
    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    root = tmp_path_factory.mktemp("device_path")
    compile_model(model_zoo.mlp((64, 16, 10), seed=0), root / "bundle", loss="cross_entropy", optimizer="sgd")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.random((32, 64), dtype=np.float32), y=rng.integers(0, 10, 32))
    return root


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "{root}/bundle", "--data", "{root}/data.npz", "--epochs", "2", "--profile", "pi4-2gb",
         "--lr", "0.1", "--out", "{root}/p.npz"],
        ["evaluate", "{root}/bundle", "--data", "{root}/data.npz", "--json"],
        ["device", "init", "--ledger", "{root}/ledger", "--profile", "pi-zero-2w"],
        ["device", "budget", "--ledger", "{root}/ledger"],
    ],
    ids=["train", "evaluate", "device init", "device budget"],
)
def test_device_commands_load_no_aggregator_module_and_no_host_package(argv, bundle_and_data):
    argv = [a.format(root=bundle_and_data) for a in argv]
    loaded = loaded_after(f"from edge_sdk.cli import main\nassert main({argv!r}) == 0, 'command failed'")
    assert loaded == [], f"`fleetlearn {argv[0]}` loaded host-side modules: {loaded}"


@pytest.mark.parametrize("package", ["edge_sdk.training", "edge_sdk.privacy"])
def test_facades_resolve_every_public_name_without_host_packages(package):
    statements = (
        f"import importlib\npackage = importlib.import_module({package!r})\n"
        "missing = [n for n in package.__all__ if getattr(package, n, None) is None]\n"
        "assert package.__all__ and not missing, missing"
    )
    assert loaded_after(statements) == []


def test_device_run_help_loads_no_aggregator_module_and_no_host_package():
    """`fleetlearn device run` (the agent) and everything it imports stay on the device side."""
    statements = ("import contextlib, io\nfrom edge_sdk.cli import main\n"
                  "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                  "    assert main(['device', 'run', '--help']) == 0\n"
                  "assert '--state-dir' in out.getvalue() and '--broker' in out.getvalue()\n"
                  "import edge_sdk.device.agent, edge_sdk.transport.round_transport, edge_sdk.transport.mqtt")
    loaded = loaded_after(statements)
    assert loaded == [], f"`fleetlearn device run` loaded host-side modules: {loaded}"
