"""Lower convolutions with tiny output maps to one Gemm over the whole batch, before differentiation.

Why: onnxruntime's CPU Conv runs one matrix product per image. When the output map is tiny (the
last stages of a resnet at 32x32 input: 2x2 and 1x1), each product has one to four columns, so the
weight (9.4 MB in resnet18's layer4) is streamed from memory once per image, and at 1x1 with
padding 1 eight of the nine kernel taps only ever multiply padding. Written as an explicit im2col
over the batch ([N*O, C*K']) times the weight's live taps ([M, C*K']), the layer is one Gemm that
reads the weight once and skips the dead taps. Its backward needs no rule of its own: the Pad,
Slice, Concat, Transpose, Reshape and Gemm rules give dX and dW as one Gemm each.

Only ungrouped convolutions with static non-batch shapes whose taps are unit-step slices (stride 1,
or an output of size 1 along the strided axis) are lowered: the Slice rule handles unit steps only.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

# Output maps of at most this many positions per image are lowered (2x2: resnet's layer3 at 32x32).
MAX_OUTPUT_POSITIONS = 4


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class _Geometry:
    """Per spatial axis: which kernel taps are live and how much padding the live taps still need."""

    live: list[range]  # kernel taps that touch real input for at least one output position
    pad_before: list[int]
    pad_after: list[int]
    strides: list[int]
    dilations: list[int]
    out_size: list[int]
    pad_origin: list[int]  # the original leading pads, to place slices in padded coordinates


def _geometry(node: onnx.NodeProto, x_shape: tuple, w_shape: tuple, y_shape: tuple) -> _Geometry | None:
    rank = len(x_shape) - 2
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = [0] * 2 * rank if auto_pad == "VALID" else list(_attr(node, "pads", [0] * 2 * rank))
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    live, before, after = [], [], []
    for i in range(rank):
        size, kernel, out = x_shape[2 + i], w_shape[2 + i], y_shape[2 + i]
        if out > 1 and strides[i] != 1:
            return None  # a strided tap is a strided Slice, which has no gradient rule
        taps = [k for k in range(kernel)
                if any(0 <= o * strides[i] + k * dilations[i] - pads[i] < size for o in range(out))]
        if not taps or taps != list(range(taps[0], taps[-1] + 1)):
            return None
        low = taps[0] * dilations[i] - pads[i]
        high = (out - 1) * strides[i] + taps[-1] * dilations[i] - pads[i]
        live.append(range(taps[0], taps[-1] + 1))
        before.append(max(0, -low))
        after.append(max(0, high - (size - 1)))
    return _Geometry(live, before, after, strides, dilations, list(y_shape[2:]), pads[:rank])


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
    source = x
    if any(geo.pad_before) or any(geo.pad_after):
        spatial = [s + p + q for s, p, q in zip(spatial, geo.pad_before, geo.pad_after, strict=True)]
        source = b.node("Pad", [x, b.ints([0, 0] + geo.pad_before + [0, 0] + geo.pad_after)],
                        (None, channels, *spatial), mode="constant")
    patches = []
    for tap in itertools.product(*geo.live):
        starts = [k * d - p0 + pb for k, d, p0, pb in zip(tap, geo.dilations, geo.pad_origin, geo.pad_before,
                                                          strict=True)]
        ends = [s + o for s, o in zip(starts, geo.out_size, strict=True)]
        patch = source
        if starts != [0] * rank or ends != spatial:
            patch = b.node("Slice", [source, b.ints(starts), b.ints(ends), b.ints(range(2, 2 + rank))],
                           (None, channels, *geo.out_size))
        patches.append(b.node("Unsqueeze", [patch, b.ints([2])], (None, channels, 1, *geo.out_size)))
    cols = patches[0] if taps == 1 else b.node("Concat", patches, (None, channels, taps, *geo.out_size), axis=2)
    if positions > 1:  # [N, C, K', *O] -> [N, *O, C, K'], so rows are (image, position)
        cols = b.node("Transpose", [cols], (None, *geo.out_size, channels, taps),
                      perm=[0] + list(range(3, 3 + rank)) + [1, 2])
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
        if (x_shape is None or w is None or y_shape is None or int(_attr(node, "group", 1)) != 1
                or len(x_shape) < 3 or any(d is None for d in x_shape[1:]) or any(d is None for d in y_shape[1:])
                or int(np.prod(y_shape[2:])) > MAX_OUTPUT_POSITIONS):
            nodes.append(node)
            continue
        geo = _geometry(node, x_shape, w.shape, y_shape)
        if geo is None:
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
