"""The device package stays within its four dependencies and never reaches into the host side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def test_cli_starts_without_host_packages():
    script = (
        "import sys\n"
        "from aggregator.cli import build_parser\n"
        "build_parser()\n"
        "print(','.join(sorted(m for m in ('onnx', 'dp_accounting', 'scipy', 'torch') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"`fleetlearn --help` imports host-only packages: {out.stdout.strip()}"
