"""The manifest's format version: old bundles still load, bundles from a newer format are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_sdk.training.bundle import FORMAT_VERSION, BundleError, load_bundle


def _with_version(source, target, version):
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["format_version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_new_bundles_carry_the_current_format_and_load(mlp_bundle):
    assert json.loads((mlp_bundle / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 2
    assert load_bundle(mlp_bundle).manifest.format_version == 2


def test_a_version_1_bundle_without_the_new_fields_still_loads(mlp_bundle, tmp_path):
    manifest = json.loads((mlp_bundle / "manifest.json").read_text())
    assert not manifest.get("buffers") and all(p.get("graph_shape") is None for p in manifest["parameters"])
    assert load_bundle(_with_version(mlp_bundle, tmp_path / "v1", 1)).manifest.format_version == 1


def test_a_bundle_from_a_newer_format_is_refused_with_what_to_do(mlp_bundle, tmp_path):
    with pytest.raises(BundleError, match="format_version 3 is not supported .*update fleetlearn"):
        load_bundle(_with_version(mlp_bundle, tmp_path / "v3", 3))
