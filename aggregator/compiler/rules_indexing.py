"""Gradient rules for indexing, broadcasting and casts: Gather (constant indices and Embedding look-ups),
Expand, and Cast/CastLike between float values (the model has one float dtype, so they are identities).

Gather's gradient scatters dY back to the gathered positions, summing duplicates. It is written as a
product with a one-hot matrix, which needs only Gemm/MatMul and works at every opset: a constant
matrix for constant indices (``out[:, -1]``, attention head splits, CLS pooling, any axis), and
``OneHot`` of the int64 model input for an Embedding (axis 0), so dW = onehot(tokens)^T dY.
"""

from __future__ import annotations

import numpy as np

from aggregator.compiler.grad_context import GradContext, node_attrs, rule


def _static_product(dims) -> int:
    """The element count of ``dims``, or -1 (a Reshape wildcard) when one of them is dynamic."""
    return -1 if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


@rule("Gather")
def gather_grad(ctx: GradContext, node, grads):
    """dData = scatter^T applied to dY seen as [before axis, K gathered, after axis]."""
    data, indices = node.input
    em = ctx.em
    shape = ctx.shape(node, data)
    axis = int(node_attrs(node).get("axis", 0)) % len(shape)
    size, rows, columns = shape[axis], _static_product(shape[:axis]), _static_product(shape[axis + 1:])
    if size is None or (rows == -1 and columns == -1):
        raise ctx.unsupported(node, f"gathering along axis {axis} of {data!r} {shape} (needs a static axis size "
                                    "and static dimensions on one side of it)")
    if indices in ctx.constants:
        picked = np.asarray(ctx.constants[indices], dtype=np.int64).reshape(-1)
        picked = np.where(picked < 0, picked + size, picked)
        scatter = np.zeros((size, picked.size), dtype=em.dtype)  # [size, K]: column k holds a 1 at index k
        scatter[picked, np.arange(picked.size)] = 1.0
        scatter = em.const(scatter, hint="gather_scatter")
        if axis == 0:
            grad = em.node("Gemm", [scatter, em.reshape(grads[0], [picked.size, columns])])
        else:
            grad = em.node("MatMul", [scatter, em.reshape(grads[0], [rows, picked.size, columns])])
        return [ctx.reshape_like(grad, node, data), None]
    if axis != 0 or columns == -1:
        raise ctx.unsupported(node, f"runtime indices along axis {axis} of {shape} (supported: an Embedding, "
                                    "axis 0 of a static table)")
    one_hot = em.node("OneHot", [em.reshape(indices, [-1]), em.const(np.asarray([size], dtype=np.int64)),
                                 em.const(np.asarray([0.0, 1.0], dtype=em.dtype))], axis=-1)  # [K, size]
    grad = em.node("Gemm", [one_hot, em.reshape(grads[0], [-1, columns])], transA=1, hint="d_embedding")
    return [ctx.reshape_like(grad, node, data), None]


@rule("Expand")
def expand_grad(ctx: GradContext, node, grads):
    """Expand broadcasts like Add with a zero tensor: sum the gradient back to the input's shape."""
    return [ctx.unbroadcast(grads[0], node, node.output[0], node.input[0]), None]


@rule("Cast", "CastLike")
def cast_grad(ctx: GradContext, node, grads):
    """Only float-to-float casts carry a gradient, and every float value has the compile dtype."""
    return [grads[0]] + [None] * (len(node.input) - 1)
