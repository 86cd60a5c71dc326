"""Regenerate tests/vectors/dp_rotation_overlap.json (run once; the JSON is the pinned known answer).

Provenance: the outputs are *not* computed by edge_sdk.privacy.rotation. Each case builds the
rotation as dense float64 matrices from its definition, with scipy's Sylvester Hadamard matrix:
    n = the largest power of two <= d; s = rotation_signs(seed, 2n) (the pinned SHAKE-256 signs)
    R_a = H_n diag(s[:n]) / sqrt(n) on coordinates [0, n), identity elsewhere
    R_b = H_n diag(s[n:]) / sqrt(n) on coordinates [d - n, d), identity elsewhere (only if d > n)
    y = R_b R_a x
test_dp_rotation.py checks the fast implementation against these values.

Run: .venv/bin/python tests/vectors/dp_rotation_make_overlap_vectors.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.linalg

from edge_sdk.privacy.rotation import rotation_signs

CASES = [  # (seed hex, d): a power of two, small odd sizes, and sizes just above and below one
    ("00000000000000000000000000000000", 1),
    ("00000000000000000000000000000000", 8),
    ("0123456789abcdef0123456789abcdef", 5),
    ("0123456789abcdef0123456789abcdef", 12),
    ("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", 33),
    ("6669787465642d726f746174696f6e2d", 63),
]


def reference_matrix(seed: bytes, d: int) -> np.ndarray:
    """The overlap rotation as a dense d x d float64 matrix, straight from its definition."""
    n = 1 << (d.bit_length() - 1)
    signs = rotation_signs(seed, 2 * n).astype(np.float64)
    block = scipy.linalg.hadamard(n).astype(np.float64) / np.sqrt(n)
    first = np.eye(d)
    first[:n, :n] = block @ np.diag(signs[:n])
    if d == n:
        return first
    second = np.eye(d)
    second[d - n:, d - n:] = block @ np.diag(signs[n:])
    return second @ first


def case_input(d: int) -> np.ndarray:
    """Small integers with a spike on the last coordinate: exact in float32, nothing symmetric."""
    x = np.array([(7 * i + 3) % 11 - 5 for i in range(d)], dtype=np.float64)
    x[-1] = 40.0
    return x


def main() -> None:
    cases = []
    for seed_hex, d in CASES:
        x = case_input(d)
        y = reference_matrix(bytes.fromhex(seed_hex), d) @ x
        cases.append({"seed_hex": seed_hex, "d": d, "x": x.tolist(), "y": [float(f"{v:.12g}") for v in y]})
    path = Path(__file__).with_name("dp_rotation_overlap.json")
    path.write_text(json.dumps({
        "description": "hadamard-overlap rotation y = R_b R_a x (see the generator's docstring for R_a, R_b)",
        "generator": "tests/vectors/dp_rotation_make_overlap_vectors.py (dense float64 matrices from scipy.linalg"
                     ".hadamard and the pinned rotation signs; independent of the fast transform)",
        "cases": cases,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
