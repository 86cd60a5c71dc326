"""Every example runs end to end, as a user would run it (a subprocess), in a small configuration.

The digits test is the reduced demo: ``make demo``'s program at 20 devices and 5 rounds over the
embedded broker, with the demo's privacy target, so ε must stay within it and the report and the
plots must exist.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def result_fields(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout[-2000:]}"
    return dict(re.findall(r"(\w+)=('[^']*'|\S+)", lines[-1]))


@pytest.mark.slow
def test_reduced_demo_federated_digits(tmp_path):
    done = run_example("federated_digits.py", "--devices", "20", "--rounds", "5", "--out", str(tmp_path / "runs"),
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fields = result_fields(done.stdout)
    assert float(fields["epsilon"]) <= 3.05
    assert float(fields["accuracy"]) >= 0.25  # chance is 0.1; 20 devices hide each other in little noise
    assert "embedded amqtt" in fields["broker"]
    assert "final accuracy" in done.stdout and "final ε" in done.stdout
    plots = done.stdout.split("plots: ")[1].split(", ")
    assert [Path(p.strip()).name for p in plots] == ["accuracy.png", "epsilon.png", "bytes.png"]
    assert all(Path(p.strip()).stat().st_size > 1000 for p in plots)
    report = json.loads((Path(plots[0].strip()).parent / "report.json").read_text())
    assert len(report["rounds"]) == 5 and report["config"]["partition"] == "dirichlet"
    assert report["config"]["model"] == "softmax" and report["config"]["privacy_mode"] == "distributed"
    assert report["final_epsilon"] == pytest.approx(float(fields["epsilon"]), abs=1e-3)


@pytest.mark.slow
def test_anomaly_detection_on_vibration_windows(tmp_path):
    done = run_example("anomaly_vibration.py", "--devices", "10", "--rounds", "5", "--windows", "80", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fields = result_fields(done.stdout)
    assert float(fields["auc"]) >= 0.85
    assert float(fields["precision"]) >= 0.8 and float(fields["recall"]) >= 0.4
    assert float(fields["epsilon"]) <= 8.0 + 1e-6


@pytest.mark.slow
def test_finetune_head_keeps_the_backbone_and_learns(tmp_path):
    done = run_example("finetune_head.py", "--devices", "6", "--rounds", "5", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    fields = result_fields(done.stdout)
    assert fields["backbone_unchanged"] == "True"
    assert float(fields["after"]) >= float(fields["before"]) + 0.2
    assert "federated update carried only: head.bias, head.weight" in done.stdout


@pytest.mark.slow
def test_torch_to_bundle(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    done = run_example("torch_to_bundle.py", "--epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fields = result_fields(done.stdout)
    assert fields["first_loss_matches_torch"] == "True"
    assert float(fields["accuracy"]) >= 0.8
