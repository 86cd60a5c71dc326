"""Lower convolutions with tiny output maps to one Gemm over the whole batch, before differentiation.

Why: onnxruntime's CPU Conv runs one matrix product per image. When the output map is tiny (the
last stages of a resnet at 32x32 input: 2x2 and 1x1), each product has one to four columns, so the
weight (9.4 MB in resnet18's layer4) is streamed from memory once per image, and at 1x1 with
padding 1 eight of the nine kernel taps only ever multiply padding. Written as an explicit im2col
over the batch ([N*O, C*K']) times the weight's live taps ([M, C*K']), the layer is one Gemm that
reads the weight once and skips the dead taps. Its backward needs no rule of its own: the Pad,
Slice, Concat, Transpose, Reshape and Gemm rules give dX and dW as one Gemm each.

The im2col itself is a product with a constant 0/1 matrix (input positions x (output position, live
tap)), so strides and padding cost nothing and its gradient is one Gemm, not a Pad per tap. Only
ungrouped convolutions with static non-batch shapes are lowered, and only while that matrix stays small.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aggregator.compiler.grad_context import node_attrs

log = logging.getLogger(__name__)

# Output maps of at most this many positions per image are lowered (2x2: resnet's layer3 at 32x32).
MAX_OUTPUT_POSITIONS = 4
# Largest im2col matrix (input positions x output positions x live taps) worth a constant.
MAX_GATHER_ENTRIES = 1 << 16


@dataclass(frozen=True)
class _Geometry:
    """Per spatial axis: which kernel taps are live, and the convolution's strides, dilations and pads."""

    live: list[list[int]]  # kernel taps that touch real input for at least one output position
    strides: list[int]
    dilations: list[int]
    pads: list[int]  # leading pads
    out_size: list[int]


def _geometry(node: onnx.NodeProto, x_shape: tuple, w_shape: tuple, y_shape: tuple) -> _Geometry | None:
    rank = len(x_shape) - 2
    attrs = node_attrs(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = [0] * 2 * rank if auto_pad == "VALID" else list(attrs.get("pads", [0] * 2 * rank))
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    live = []
    for i in range(rank):
        size, kernel, out = x_shape[2 + i], w_shape[2 + i], y_shape[2 + i]
        taps = [k for k in range(kernel)
                if any(0 <= o * strides[i] + k * dilations[i] - pads[i] < size for o in range(out))]
        if not taps:
            return None
        live.append(taps)
    return _Geometry(live, strides, dilations, pads[:rank], list(y_shape[2:]))


def _gather_matrix(geo: _Geometry, spatial: list[int], dtype: np.dtype) -> np.ndarray:
    """S[s, (o, k)] = 1 where output position o reads input position s through live tap k (0 in padding)."""
    taps = list(itertools.product(*geo.live))
    outs = list(itertools.product(*(range(o) for o in geo.out_size)))
    matrix = np.zeros((int(np.prod(spatial)), len(outs) * len(taps)), dtype=dtype)
    for j, (o, k) in enumerate(itertools.product(outs, taps)):
        pos = [oi * st + ki * d - p for oi, ki, st, d, p in zip(o, k, geo.strides, geo.dilations, geo.pads,
                                                                  strict=True)]
        if all(0 <= q < n for q, n in zip(pos, spatial, strict=True)):
            matrix[np.ravel_multi_index(pos, spatial), j] = 1.0
    return matrix


class _Builder:
    """Appends the lowered nodes, with fresh names, shapes and element types for the later passes."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict, elem_types: dict, fresh: Callable[[str], str],
                 float_type: int) -> None:
        self.graph, self.shapes, self.elem_types, self.fresh = graph, shapes, elem_types, fresh
        self.float_type = float_type
        self.nodes: list[onnx.NodeProto] = []

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.float_type))

    def const(self, array: np.ndarray) -> str:
        """A Constant node, not an initializer: float initializers are the model's trainable parameters."""
        name = self.fresh("conv_gemm_const")
        self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("conv_gemm_Constant"),
                                           value=numpy_helper.from_array(array, name)))
        self.shapes[name] = tuple(array.shape)
        self.elem_types[name] = helper.np_dtype_to_tensor_dtype(array.dtype)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def node(self, op: str, inputs: list[str], shape: tuple, output: str | None = None, **attrs) -> str:
        output = output or self.fresh(f"conv_gemm_{op.lower()}")
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(f"conv_gemm_{op}"), **attrs))
        self.shapes[output] = shape
        self.elem_types[output] = self.float_type
        return output


def _lower(node: onnx.NodeProto, b: _Builder, x_shape: tuple, w_shape: tuple, geo: _Geometry) -> None:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = len(x_shape) - 2
    channels, m_out = x_shape[1], w_shape[0]
    spatial = list(x_shape[2:])
    positions = int(np.prod(geo.out_size))
    taps = int(np.prod([len(r) for r in geo.live]))
    # im2col as one Gemm with a constant 0/1 matrix: [N*C, S] x [S, O*K'] -> [N, C, O, K']. Padding is
    # rows of zeros and strides are just other entries, and its gradient is one Gemm too, where per-tap
    # Slices would differentiate into a Pad each and a Sum (~2 ms per resnet18 layer3 conv).
    gather = _gather_matrix(geo, spatial, b.dtype)
    flat = b.node("Reshape", [x, b.ints([-1, int(np.prod(spatial))])], (None, int(np.prod(spatial))))
    same = gather.shape[0] == gather.shape[1] and np.array_equal(gather, np.eye(len(gather), dtype=b.dtype))
    cols = flat if same else b.node("Gemm", [flat, b.const(gather)], (None, positions * taps))
    if positions > 1:  # [N, C, O, K'] -> [N, O, C, K'], so rows are (image, position)
        cols = b.node("Reshape", [cols, b.ints([-1, channels, positions, taps])], (None, channels, positions, taps))
        cols = b.node("Transpose", [cols], (None, positions, channels, taps), perm=[0, 2, 1, 3])
    cols = b.node("Reshape", [cols, b.ints([-1, channels * taps])], (None, channels * taps))
    weight = w
    kernel = int(np.prod(w_shape[2:]))
    if taps != kernel:
        # The live taps as a product with a constant 0/1 selection matrix, not a Slice: the Slice's
        # gradient is a Pad with a tiny inner axis, which onnxruntime runs ~10x slower than this Gemm.
        selection = np.zeros((kernel, taps), dtype=b.dtype)
        for j, tap in enumerate(itertools.product(*geo.live)):
            selection[np.ravel_multi_index(tap, w_shape[2:]), j] = 1.0
        weight = b.node("Reshape", [w, b.ints([m_out * channels, kernel])], (m_out * channels, kernel))
        weight = b.node("Gemm", [weight, b.const(selection)], (m_out * channels, taps))
    weight = b.node("Reshape", [weight, b.ints([m_out, channels * taps])], (m_out, channels * taps))
    product = b.node("Gemm", [cols, weight] + ([bias] if bias else []), (None, m_out), transB=1)
    y = node.output[0]
    if positions == 1:
        b.node("Reshape", [product, b.ints([-1, m_out] + [1] * rank)], (None, m_out, *geo.out_size), output=y)
    else:
        grid = b.node("Reshape", [product, b.ints([-1, *geo.out_size, m_out])], (None, *geo.out_size, m_out))
        b.node("Transpose", [grid], (None, m_out, *geo.out_size), output=y,
               perm=[0, 1 + rank] + list(range(1, 1 + rank)))


def lower_small_convolutions(
    graph: onnx.GraphProto, float_inits: dict[str, np.ndarray], shapes: dict, elem_types: dict,
    fresh: Callable[[str], str], float_type: int,
) -> int:
    """Replace each qualifying Conv in ``graph`` by its im2col + Gemm form, in place; returns the count.

    ``shapes`` and ``elem_types`` gain entries for every new value (the gradient rules read them);
    ``fresh`` hands out unused value names.
    """
    lowered = 0
    nodes = []
    for node in graph.node:
        x_shape = shapes.get(node.input[0]) if node.op_type == "Conv" else None
        w = float_inits.get(node.input[1]) if node.op_type == "Conv" else None
        y_shape = shapes.get(node.output[0]) if node.op_type == "Conv" else None
        if (x_shape is None or w is None or y_shape is None or int(node_attrs(node).get("group", 1)) != 1
                or len(x_shape) < 3 or any(d is None for d in x_shape[1:]) or any(d is None for d in y_shape[1:])
                or int(np.prod(y_shape[2:])) > MAX_OUTPUT_POSITIONS):
            nodes.append(node)
            continue
        geo = _geometry(node, x_shape, w.shape, y_shape)
        if geo is None or (int(np.prod(x_shape[2:])) * int(np.prod(y_shape[2:]))
                           * int(np.prod([len(t) for t in geo.live])) > MAX_GATHER_ENTRIES):
            nodes.append(node)
            continue
        builder = _Builder(graph, shapes, elem_types, fresh, float_type)
        _lower(node, builder, tuple(x_shape), tuple(w.shape), geo)
        nodes.extend(builder.nodes)
        lowered += 1
    if lowered:
        del graph.node[:]
        graph.node.extend(nodes)
        log.debug("lowered %d small-output convolutions to im2col + Gemm", lowered)
    return lowered
