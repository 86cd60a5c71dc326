"""A small ONNX node emitter used by the gradient rules, losses and optimisers.

It hands out fresh value names, de-duplicates constants, and hides the differences between
opsets 13-21 (ReduceMean/ReduceMax take ``axes`` as an attribute before opset 18 and as an
input from 18 on; ReduceSum, Squeeze and Unsqueeze take it as an input throughout).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
}
NUMPY_TO_ONNX = {np.dtype(v): k for k, v in ONNX_TO_NUMPY.items()}


class Emitter:
    """Appends nodes and constant initializers to a graph under construction."""

    def __init__(self, opset: int, dtype: np.dtype, taken_names: Iterable[str] = ()) -> None:
        self.opset = opset
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = NUMPY_TO_ONNX[self.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken_names)
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._counter = 0
        # Forward nodes a gradient rule replaced (e.g. MaxPool gaining its Indices output),
        # keyed by the node's first output name.
        self.forward_rewrites: dict[str, onnx.NodeProto] = {}
        self._producers: dict[str, onnx.NodeProto] = {}
        # Static 2-D shapes of emitted Gemm outputs, recorded by the rules that know them: the optimiser
        # fuses an update into a Gemm behind a Reshape (a conv weight's gradient) by reshaping the
        # weight to this shape, which it cannot read off the graph under construction.
        self.gemm_shapes: dict[str, tuple[int, int]] = {}

    def fresh(self, hint: str) -> str:
        """A value name not used anywhere else in the graph."""
        while True:
            self._counter += 1
            name = f"{hint}__{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def reserve(self, name: str) -> None:
        self._taken.add(name)

    def node(
        self, op: str, inputs: Sequence[str], hint: str | None = None, outputs: Sequence[str] | None = None,
        n_outputs: int = 1, **attrs,
    ) -> str | list[str]:
        """Emit one ai.onnx node; returns its output name (or names when more than one)."""
        if outputs is None:
            outputs = [self.fresh(hint or op.lower()) for _ in range(n_outputs)]
        else:
            for name in outputs:
                self._taken.add(name)
        node = helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"n_{op}"), **attrs)
        for name in outputs:
            self._producers[name] = node
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The emitted node that outputs ``name`` (None for forward values, inputs and constants)."""
        return self._producers.get(name)

    def consumers(self, name: str) -> int:
        """How many emitted nodes read ``name``."""
        return sum(name in n.input for n in self.nodes)

    def rename_output(self, node: onnx.NodeProto, new: str) -> None:
        """Make ``node`` write its first output to ``new`` (the old name must have no readers)."""
        self._producers.pop(node.output[0], None)
        self._taken.add(new)
        node.output[0] = new
        self._producers[new] = node

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop an emitted node whose outputs nothing reads."""
        self.nodes = [n for n in self.nodes if n is not node]
        for name in node.output:
            self._producers.pop(name, None)

    def insert_before(self, anchor: onnx.NodeProto, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        """Emit a node placed just before ``anchor``, keeping the node list topologically sorted."""
        output = self.fresh(hint)
        node = helper.make_node(op, list(inputs), [output], name=self.fresh(f"n_{op}"), **attrs)
        self._producers[output] = node
        index = next(i for i, n in enumerate(self.nodes) if n is anchor)
        self.nodes.insert(index, node)
        return output

    def const(self, value, dtype=None, hint: str = "const") -> str:
        """A constant initializer; equal constants share one name.

        Without ``dtype``, numpy arrays keep theirs and Python numbers take the graph's float dtype.
        """
        if dtype is None and not isinstance(value, np.ndarray):
            dtype = self.dtype
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="ints")

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, dtype=self.dtype), hint="scalar")

    # -- ops whose form depends on the opset ---------------------------------------------------
    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: bool, hint: str | None = None) -> str:
        """ReduceSum/ReduceMean/ReduceMax over ``axes`` in the form this opset wants."""
        axes = [int(a) for a in axes]
        takes_input = op == "ReduceSum" or self.opset >= 18
        if takes_input:
            return self.node(op, [x, self.ints(axes)], hint=hint, keepdims=int(keepdims))
        return self.node(op, [x], hint=hint, axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.node("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.node("Squeeze", [x, self.ints(axes)])

    def reshape(self, x: str, shape: Sequence[int], hint: str | None = None) -> str:
        return self.node("Reshape", [x, self.ints(shape)], hint=hint)

    def mul(self, a: str, b: str, hint: str | None = None) -> str:
        return self.node("Mul", [a, b], hint=hint)

    def add(self, a: str, b: str, hint: str | None = None) -> str:
        return self.node("Add", [a, b], hint=hint)

    def sub(self, a: str, b: str, hint: str | None = None) -> str:
        return self.node("Sub", [a, b], hint=hint)

    def div(self, a: str, b: str, hint: str | None = None) -> str:
        return self.node("Div", [a, b], hint=hint)

    def batch_size(self, x: str) -> str:
        """The first dimension of ``x`` as a scalar of the float dtype (for means over the batch)."""
        n = self.node("Gather", [self.node("Shape", [x]), self.const(np.asarray(0, dtype=np.int64))], axis=0)
        return self.node("Cast", [n], to=self.onnx_dtype)

    def element_count(self, x: str) -> str:
        return self.node("Cast", [self.node("Size", [x])], to=self.onnx_dtype)
