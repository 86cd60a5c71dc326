"""Reverse-mode differentiation of a forward node list with the per-op rule table."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx

# Importing the rule modules registers their rules in RULES.
from aggregator.compiler import (  # noqa: F401
    rules_activation,
    rules_dense,
    rules_indexing,
    rules_layer_norm,
    rules_recurrent,
    rules_spatial,
)
from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import UnsupportedOpError
from aggregator.compiler.grad_context import RULES, GradContext, describe

log = logging.getLogger(__name__)

# Ops whose outputs carry no gradient (integer or shape-valued results).
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
    "Not", "And", "Or", "NonZero", "ConstantOfShape", "Constant", "EyeLike", "RandomNormalLike",
    "RandomUniformLike",
})


def supported_ops() -> list[str]:
    return sorted(RULES)


def requires_grad(nodes: Sequence[onnx.NodeProto], wrt: Sequence[str], float_values: set[str]) -> set[str]:
    """Every float value that depends on a parameter in ``wrt``."""
    marked = set(wrt)
    for node in nodes:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(name in marked for name in node.input if name):
            marked.update(o for o in node.output if o and o in float_values)
    return marked


def check_rules_exist(nodes: Sequence[onnx.NodeProto], output: str, marked: set[str]) -> None:
    """Raise one UnsupportedOpError naming every node on the gradient path that has no rule."""
    needed, missing = {output}, []
    for node in reversed(list(nodes)):
        if not any(o in needed for o in node.output):
            continue
        needed.update(node.input)
        if node.op_type not in RULES and node.op_type not in NON_DIFFERENTIABLE and any(
            name in marked for name in node.input
        ):
            missing.append(node)
    if missing:
        lines = "\n".join(f"  - {describe(node)}" for node in reversed(missing))
        ops = sorted({node.op_type for node in missing})
        raise UnsupportedOpError(
            f"{len(missing)} node(s) on the gradient path use ops with no gradient rule ({', '.join(ops)}):\n"
            f"{lines}\nsupported ops: {', '.join(supported_ops())}"
        )


def build_gradients(
    em: Emitter,
    nodes: Sequence[onnx.NodeProto],
    output: str,
    output_grad: str,
    wrt: Sequence[str],
    shapes: dict[str, tuple],
    constants: dict[str, np.ndarray],
    float_values: set[str],
) -> dict[str, str]:
    """Emit dL/dp for each p in ``wrt`` given dL/d(output); returns p -> gradient value name."""
    marked = requires_grad(nodes, wrt, float_values)
    check_rules_exist(nodes, output, marked)
    ctx = GradContext(em=em, shapes=shapes, constants=constants, requires_grad=marked)
    pending: dict[str, list[str]] = {output: [output_grad]}

    def total(name: str) -> str | None:
        parts = pending.pop(name, None)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return em.node("Sum", parts, hint="grad_sum")

    for node in reversed(list(nodes)):
        if not any(o in pending for o in node.output):
            continue
        if not any(ctx.needs(name) for name in node.input):
            for o in node.output:
                pending.pop(o, None)
            continue
        out_grads = [total(o) for o in node.output]
        if node.op_type not in RULES:
            raise UnsupportedOpError(
                f"{describe(node)} lies on the gradient path and has no gradient rule; "
                f"supported ops: {', '.join(supported_ops())}"
            )
        in_grads = RULES[node.op_type](ctx, node, out_grads)
        for name, grad in zip(node.input, in_grads, strict=False):
            if grad is not None and ctx.needs(name):
                pending.setdefault(name, []).append(grad)
    grads: dict[str, str] = {}
    for param in wrt:
        grad = total(param)
        if grad is None:
            log.warning("parameter %s does not influence the output; its gradient is zero", param)
            grad = em.const(np.zeros(shapes[param], dtype=em.dtype), hint=f"zero_grad_{param}")
        grads[param] = grad
    return grads
