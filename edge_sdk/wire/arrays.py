"""numpy arrays on the wire: a dtype code, the shape, then the raw little-endian bytes. No pickle.

Why a fixed dtype table instead of numpy's dtype strings: the decoder must refuse anything it was
not built for (object arrays, big-endian, structured dtypes) with a one-byte check, and the codes
are part of the pinned format. Named sets (a model's parameters) keep their order, so the bytes
of a model are fixed by its layout.

Array: u8 dtype code, u8 ndim, ndim x u32 dims, prod(dims) x itemsize bytes.
Named set: u32 count, then per array a u16-length UTF-8 name (1..1024 bytes, unique) and the array.
"""

from __future__ import annotations

import math

import numpy as np

from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import FrameReader, FrameWriter
from edge_sdk.wire.limits import WireLimits

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2"),
    4: np.dtype("i1"), 5: np.dtype("<i2"), 6: np.dtype("<i4"), 7: np.dtype("<i8"),
    8: np.dtype("u1"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
_CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in DTYPE_CODES.items()}
MAX_NAME_BYTES = 1024  # ONNX initializer names, which may contain '/' and '.'


def _dtype_code(arr: np.ndarray) -> int:
    dt = arr.dtype
    code = _CODE_BY_KIND.get((dt.kind, dt.itemsize))  # any byte order: the bytes are written little-endian
    if code is None:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise WireFormatError(f"dtype {dt} cannot travel; supported: {supported}")
    return code


def write_array(w: FrameWriter, arr: np.ndarray, field: str) -> None:
    """Append ``arr`` (any shape, a supported dtype) to ``w``."""
    if not isinstance(arr, np.ndarray):
        raise WireFormatError(f"{field} must be a numpy array, got {type(arr).__name__}")
    code = _dtype_code(arr)
    w.uint(code, 1, f"{field} dtype")
    w.uint(arr.ndim, 1, f"{field} ndim")
    for axis, dim in enumerate(arr.shape):
        w.uint(dim, 4, f"{field} dim {axis}")
    w.raw(np.ascontiguousarray(arr, dtype=DTYPE_CODES[code]).tobytes())


def read_array(r: FrameReader, limits: WireLimits, field: str) -> np.ndarray:
    """Read one array; ndim, element count and byte length are checked before anything is allocated."""
    code = r.uint(1, f"{field} dtype")
    if code not in DTYPE_CODES:
        raise WireFormatError(f"{r.what}: {field} has unknown dtype code {code}")
    ndim = r.uint(1, f"{field} ndim")
    if ndim > limits.max_ndim:
        raise WireFormatError(f"{r.what}: {field} has {ndim} dimensions, limit is {limits.max_ndim} (max_ndim)")
    shape = tuple(r.uint(4, f"{field} dim {axis}") for axis in range(ndim))
    count = math.prod(shape)
    if count > limits.max_vector_length:
        raise WireFormatError(f"{r.what}: {field} shape {shape} has {count} elements, limit is "
                              f"{limits.max_vector_length} (max_vector_length)")
    dtype = DTYPE_CODES[code]
    raw = r.take(count * dtype.itemsize, f"{field} data")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def encode_array(arr: np.ndarray) -> bytes:
    w = FrameWriter()
    write_array(w, arr, "array")
    return w.bytes()


def decode_array(data: bytes, limits: WireLimits) -> np.ndarray:
    r = FrameReader(data, "array")
    arr = read_array(r, limits, "array")
    r.finish()
    return arr


def encode_named_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """A named set in the dict's order (a model's parameters in layout order)."""
    w = FrameWriter()
    w.uint(len(arrays), 4, "array count")
    for name, arr in arrays.items():
        raw = name.encode("utf-8") if isinstance(name, str) else b""
        if not 1 <= len(raw) <= MAX_NAME_BYTES:
            raise WireFormatError(f"array name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        w.uint(len(raw), 2, "array name length")
        w.raw(raw)
        write_array(w, arr, f"array {name!r}")
    return w.bytes()


def decode_named_arrays(data: bytes, limits: WireLimits) -> dict[str, np.ndarray]:
    """The named set in ``data``; refuses more than ``max_arrays``, duplicate or invalid names, trailing bytes."""
    r = FrameReader(data, "named arrays")
    count = r.uint(4, "array count")
    if count > limits.max_arrays:
        raise WireFormatError(f"named arrays declare {count} arrays, limit is {limits.max_arrays} (max_arrays)")
    out: dict[str, np.ndarray] = {}
    for i in range(count):
        n = r.uint(2, f"array {i} name length")
        if not 1 <= n <= MAX_NAME_BYTES:
            raise WireFormatError(f"named arrays: array {i} name declares {n} bytes, must be 1..{MAX_NAME_BYTES}")
        try:
            name = bytes(r.take(n, f"array {i} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError(f"named arrays: array {i} name is not valid UTF-8") from None
        if name in out:
            raise WireFormatError(f"named arrays: array name {name!r} appears twice")
        out[name] = read_array(r, limits, f"array {name!r}")
    r.finish()
    return out
