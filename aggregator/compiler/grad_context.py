"""What a gradient rule may look at, and the rule registry.

A rule is ``rule(ctx, node, output_grads) -> input_grads``: it reads only its own node's inputs and
outputs, emits standard ai.onnx nodes through ``ctx.em``, and returns one gradient name (or None)
per node input. It computes a gradient only where ``ctx.needs(input)`` says one is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import UnsupportedOpError
from aggregator.compiler.node_origin import origin

GradRule = Callable[["GradContext", onnx.NodeProto, list], list]
RULES: dict[str, GradRule] = {}


def rule(*ops: str) -> Callable[[GradRule], GradRule]:
    """Register a gradient rule for one or more op types."""

    def register(fn: GradRule) -> GradRule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def describe(node: onnx.NodeProto) -> str:
    """The node's name and op, and its PyTorch module and source line when the export recorded them."""
    return f"node {node.name or node.output[0]!r} (op {node.op_type}){origin(node)}"


@dataclass
class GradContext:
    em: Emitter
    shapes: dict[str, tuple]
    constants: dict[str, np.ndarray]  # values known at compile time (frozen params, shape tensors)
    requires_grad: set[str]

    @property
    def opset(self) -> int:
        return self.em.opset

    def needs(self, name: str) -> bool:
        return bool(name) and name in self.requires_grad

    def unsupported(self, node: onnx.NodeProto, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{describe(node)}: {what} is not supported by the compiler's gradient rule")

    def shape(self, node: onnx.NodeProto, name: str) -> tuple:
        if name not in self.shapes:
            raise UnsupportedOpError(
                f"{describe(node)}: the shape of {name!r} could not be inferred; export the model with static "
                "shapes except for the batch dimension"
            )
        return self.shapes[name]

    def static_shape(self, node: onnx.NodeProto, name: str, skip_batch: bool = True) -> tuple:
        shape = self.shape(node, name)
        if any(d is None for d in (shape[1:] if skip_batch else shape)):
            raise UnsupportedOpError(f"{describe(node)}: needs static non-batch dimensions for {name!r}, got {shape}")
        return shape

    def constant(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        if name not in self.constants:
            raise UnsupportedOpError(f"{describe(node)}: input {name!r} must be a constant for the gradient rule")
        return self.constants[name]

    # -- helpers shared by several rules --------------------------------------------------------
    def reshape_like(self, grad: str, node: onnx.NodeProto, like: str) -> str:
        """Reshape ``grad`` to the shape of value ``like``, with a constant shape when possible."""
        shape = self.shapes.get(like)
        if shape is not None and sum(d is None for d in shape) <= 1:
            return self.em.reshape(grad, [-1 if d is None else d for d in shape])
        return self.em.node("Reshape", [grad, self.em.node("Shape", [like])])

    def unbroadcast(self, grad: str, node: onnx.NodeProto, out: str, inp: str) -> str:
        """Sum ``grad`` (shaped like ``out``) down to the shape of the broadcast input ``inp``."""
        out_shape, in_shape = self.shape(node, out), self.shape(node, inp)
        lead = len(out_shape) - len(in_shape)
        axes = list(range(lead)) + [
            lead + i for i, d in enumerate(in_shape) if d == 1 and out_shape[lead + i] != 1
        ]
        if any(d is None for i, d in enumerate(in_shape) if out_shape[lead + i] != d):
            raise UnsupportedOpError(f"{describe(node)}: cannot tell how {inp!r} {in_shape} broadcasts to {out_shape}")
        if axes:
            grad = self.em.reduce("ReduceSum", grad, axes, keepdims=True)
        if lead:
            grad = self.em.squeeze(grad, list(range(lead)))
        return grad


def spatial_attrs(ctx: GradContext, node: onnx.NodeProto, rank: int, kernel: Sequence[int]) -> dict:
    """strides, pads, dilations with their ONNX defaults; rejects auto_pad SAME_*."""
    attrs = node_attrs(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise ctx.unsupported(node, f"auto_pad={auto_pad} (supported: NOTSET, VALID; export with explicit pads)")
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        pads = [0] * 2 * rank
    return {
        "strides": list(attrs.get("strides", [1] * rank)),
        "pads": pads,
        "dilations": list(attrs.get("dilations", [1] * rank)),
        "kernel": list(kernel),
        "attrs": attrs,
    }
