"""Datasets are validated against the bundle before the first step."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.training.bundle import load_bundle
from edge_sdk.training.data import DataError, load_dataset_npz, prepare_dataset


@pytest.fixture(scope="module")
def manifest(mlp_bundle):
    return load_bundle(mlp_bundle).manifest


def features(n: int = 6, d: int = 64) -> np.ndarray:
    return np.random.default_rng(0).random((n, d))


def test_features_are_cast_to_the_bundle_dtype_and_labels_to_int64(manifest):
    data = prepare_dataset(manifest, features(), np.array([0, 1, 2, 3, 4, 9], dtype=np.int32))
    assert data.x.dtype == np.float32 and data.x.flags.c_contiguous
    assert data.y.dtype == np.int64
    assert len(data) == 6


def test_float_labels_name_the_expected_dtype_and_shape(manifest):
    with pytest.raises(DataError, match=r"y has dtype float64; .*integer class indices \(int64, shape \[N\]\)"):
        prepare_dataset(manifest, features(), np.zeros(6))


def test_one_hot_labels_name_the_expected_shape(manifest):
    one_hot = np.eye(10, dtype=np.int64)[[0, 1, 2, 3, 4, 5]]
    with pytest.raises(DataError, match=r"y has shape \[6, 10\]; the bundle expects \[N\] with N = 6"):
        prepare_dataset(manifest, features(), one_hot)


def test_column_vector_labels_are_rejected(manifest):
    with pytest.raises(DataError, match=r"y has shape \[6, 1\]"):
        prepare_dataset(manifest, features(), np.zeros((6, 1), dtype=np.int64))


def test_label_count_must_match_the_rows_of_x(manifest):
    with pytest.raises(DataError, match=r"y has shape \[5\]; the bundle expects \[N\] with N = 6"):
        prepare_dataset(manifest, features(), np.zeros(5, dtype=np.int64))


def test_labels_outside_the_models_classes_are_rejected(manifest):
    with pytest.raises(DataError, match=r"class indices 0\.\.10; the model has classes 0\.\.9"):
        prepare_dataset(manifest, features(), np.array([0, 1, 2, 3, 4, 10]))
    with pytest.raises(DataError, match=r"class indices -1\.\.4"):
        prepare_dataset(manifest, features(), np.array([0, 1, 2, 3, 4, -1]))


def test_features_of_the_wrong_width_name_the_expected_shape(manifest):
    with pytest.raises(DataError, match=r"x has shape \[6, 63\]; the bundle expects \[N, 64\]"):
        prepare_dataset(manifest, features(d=63), np.zeros(6, dtype=np.int64))


def test_mse_targets_must_be_float_of_the_output_shape(regression_bundle):
    manifest = load_bundle(regression_bundle).manifest
    x = features(d=6)
    data = prepare_dataset(manifest, x, np.zeros((6, 3)))
    assert data.y.dtype == np.float32 and data.y.shape == (6, 3)
    with pytest.raises(DataError, match=r"MSE targets must be floating point \(float32\)"):
        prepare_dataset(manifest, x, np.zeros((6, 3), dtype=np.int64))
    with pytest.raises(DataError, match=r"y has shape \[6\]; the bundle expects \[N, 3\]"):
        prepare_dataset(manifest, x, np.zeros(6))


def test_dataset_file_must_hold_x_and_y(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 2)), labels=np.zeros(2))
    with pytest.raises(DataError, match=r"lacks array\(s\) \['y'\]"):
        load_dataset_npz(tmp_path / "d.npz")


def test_pickled_dataset_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match="cannot read a dataset"):
        load_dataset_npz(tmp_path / "d.npz")
