"""Opening a bundle: hash verification, unloadable graphs, and graph/manifest agreement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_sdk.errors import FleetlearnError
from edge_sdk.training.bundle import (
    MANIFEST_FILE,
    TRAIN_STEP_FILE,
    BundleError,
    BundleIntegrityError,
    load_bundle,
    sha256_file,
)
from edge_sdk.training.session import ModelSession, SessionError, SessionOptions


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(bundle: Path, name: str) -> None:
    """Make the manifest agree with a modified file, as a buggy compiler (not an attacker) would."""
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_open_bundle_exposes_manifest_and_initial_params(mlp_bundle):
    session = ModelSession.open(mlp_bundle)
    names = [p.name for p in session.manifest.trainable]
    assert names and set(names) == set(session.bundle.initial_params)
    assert session.options.threads == 1
    assert session.train_step.get_session_options().intra_op_num_threads == 1
    assert session.train_step.get_session_options().inter_op_num_threads == 1


def test_thread_count_comes_from_the_caller(mlp_bundle):
    session = ModelSession.open(mlp_bundle, threads=2)
    assert session.train_step.get_session_options().intra_op_num_threads == 2
    assert session.evaluator.get_session_options().intra_op_num_threads == 2


def test_non_positive_thread_count_is_a_typed_error():
    with pytest.raises(SessionError, match="threads must be a positive integer"):
        SessionOptions(threads=0)


def test_modified_graph_fails_the_manifest_hash(mlp_bundle, tmp_path):
    bundle = copy_bundle(mlp_bundle, tmp_path / "b")
    data = bytearray((bundle / TRAIN_STEP_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / TRAIN_STEP_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="train_step.onnx has sha256"):
        ModelSession.open(bundle)


def test_modified_initial_params_fail_the_manifest_hash(mlp_bundle, tmp_path):
    bundle = copy_bundle(mlp_bundle, tmp_path / "b")
    with open(bundle / "initial_params.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleIntegrityError, match="initial_params.npz"):
        load_bundle(bundle)


def test_directory_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        ModelSession.open(tmp_path)


def test_truncated_graph_is_a_typed_error_not_an_onnxruntime_traceback(mlp_bundle, tmp_path):
    bundle = copy_bundle(mlp_bundle, tmp_path / "b")
    data = (bundle / TRAIN_STEP_FILE).read_bytes()
    (bundle / TRAIN_STEP_FILE).write_bytes(data[: len(data) // 3])
    rehash(bundle, TRAIN_STEP_FILE)
    with pytest.raises(SessionError, match=r"cannot load train_step\.onnx.*recompile the bundle") as info:
        ModelSession.open(bundle)
    assert isinstance(info.value, FleetlearnError)


def test_corrupt_graph_is_a_typed_error(mlp_bundle, tmp_path):
    bundle = copy_bundle(mlp_bundle, tmp_path / "b")
    (bundle / "eval.onnx").write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    rehash(bundle, "eval.onnx")
    with pytest.raises(SessionError, match=r"cannot load eval\.onnx"):
        ModelSession.open(bundle)


def test_manifest_naming_an_input_the_graph_lacks_is_a_typed_error(mlp_bundle, tmp_path):
    bundle = copy_bundle(mlp_bundle, tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    first = next(p for p in manifest["parameters"] if p["trainable"])
    first["input"] = "no_such_input"
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SessionError, match="lacks the inputs.*no_such_input"):
        ModelSession.open(bundle)


@pytest.mark.parametrize("scale", [0, -1.5, "nan", "inf"])
def test_manifest_with_an_unusable_optimizer_state_scale_is_refused(adam64_bundle, tmp_path, scale):
    bundle = copy_bundle(adam64_bundle, tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["state"][0]["scale"] = scale
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="scale is .*it must be a positive finite number"):
        load_bundle(bundle)


def test_pool_threads_do_not_spin_unless_asked(mlp_bundle):
    bundle = load_bundle(mlp_bundle)
    quiet = ModelSession(bundle, SessionOptions(threads=2))
    spinning = ModelSession(bundle, SessionOptions(threads=2, spin_wait=True))
    key = "session.intra_op.allow_spinning"
    assert quiet.train_step.get_session_options().get_session_config_entry(key) == "0"
    assert spinning.train_step.get_session_options().get_session_config_entry(key) == "1"
