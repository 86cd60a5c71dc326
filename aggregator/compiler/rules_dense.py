"""Gradient rules for dense, elementwise and shape ops (one small rule per op).

Notation: for y = f(a, b), a rule receives dL/dy and returns dL/da, dL/db. Broadcast inputs get
their gradient summed back to their own shape (``GradContext.unbroadcast``).
"""

from __future__ import annotations

import numpy as np

from aggregator.compiler.grad_context import GradContext, node_attrs, rule


@rule("Identity", "Dropout")
def identity_grad(ctx: GradContext, node, grads):
    """Dropout is exported in inference mode (it is the identity), and so is its gradient."""
    if node.op_type == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            mode = ctx.constant(node, node.input[2])
            if bool(np.asarray(mode)):
                raise ctx.unsupported(node, "training_mode=True (export the model in eval mode)")
        if len(node.output) > 1 and node.output[1] and grads[1] is not None:
            raise ctx.unsupported(node, "using the mask output")
    return [grads[0]] + [None] * (len(node.input) - 1)


@rule("Add", "Sub")
def add_grad(ctx: GradContext, node, grads):
    (g,) = grads[:1]
    a, b = node.input
    out = node.output[0]
    ga = ctx.unbroadcast(g, node, out, a) if ctx.needs(a) else None
    gb = None
    if ctx.needs(b):
        gb = ctx.unbroadcast(g, node, out, b)
        if node.op_type == "Sub":
            gb = ctx.em.node("Neg", [gb])
    return [ga, gb]


@rule("Mul")
def mul_grad(ctx: GradContext, node, grads):
    g = grads[0]
    a, b = node.input
    out = node.output[0]
    ga = ctx.unbroadcast(ctx.em.mul(g, b), node, out, a) if ctx.needs(a) else None
    gb = ctx.unbroadcast(ctx.em.mul(g, a), node, out, b) if ctx.needs(b) else None
    return [ga, gb]


@rule("Div")
def div_grad(ctx: GradContext, node, grads):
    g = grads[0]
    a, b = node.input
    out = node.output[0]
    ga = ctx.unbroadcast(ctx.em.div(g, b), node, out, a) if ctx.needs(a) else None
    gb = None
    if ctx.needs(b):  # d(a/b)/db = -y/b
        gb = ctx.em.node("Neg", [ctx.em.div(ctx.em.mul(g, out), b)])
        gb = ctx.unbroadcast(gb, node, out, b)
    return [ga, gb]


def _mask(ctx: GradContext, condition: str) -> str:
    """A 0/1 float mask; Mul by Cast(bool) is several times faster in onnxruntime than Where."""
    return ctx.em.node("Cast", [condition], to=ctx.em.onnx_dtype)


@rule("Relu")
def relu_grad(ctx: GradContext, node, grads):
    positive = ctx.em.node("Greater", [node.output[0], ctx.em.scalar(0.0)])
    return [ctx.em.mul(grads[0], _mask(ctx, positive))]


@rule("LeakyRelu")
def leaky_relu_grad(ctx: GradContext, node, grads):
    """slope = alpha + (1 - alpha) * [x > 0]"""
    alpha = float(node_attrs(node).get("alpha", 0.01))
    positive = _mask(ctx, ctx.em.node("Greater", [node.input[0], ctx.em.scalar(0.0)]))
    slope = ctx.em.add(ctx.em.mul(positive, ctx.em.scalar(1.0 - alpha)), ctx.em.scalar(alpha))
    return [ctx.em.mul(grads[0], slope)]


@rule("Sigmoid")
def sigmoid_grad(ctx: GradContext, node, grads):
    y = node.output[0]
    return [ctx.em.mul(ctx.em.mul(grads[0], y), ctx.em.sub(ctx.em.scalar(1.0), y))]


@rule("Tanh")
def tanh_grad(ctx: GradContext, node, grads):
    y = node.output[0]
    return [ctx.em.mul(grads[0], ctx.em.sub(ctx.em.scalar(1.0), ctx.em.mul(y, y)))]


@rule("Softmax")
def softmax_grad(ctx: GradContext, node, grads):
    axis = node_attrs(node).get("axis", -1)
    y, g = node.output[0], grads[0]
    dot = ctx.em.reduce("ReduceSum", ctx.em.mul(g, y), [axis], keepdims=True)
    return [ctx.em.mul(y, ctx.em.sub(g, dot))]


@rule("LogSoftmax")
def log_softmax_grad(ctx: GradContext, node, grads):
    axis = node_attrs(node).get("axis", -1)
    y, g = node.output[0], grads[0]
    total = ctx.em.reduce("ReduceSum", g, [axis], keepdims=True)
    return [ctx.em.sub(g, ctx.em.mul(ctx.em.node("Exp", [y]), total))]


def _record_gemm_shape(ctx: GradContext, grad: str | None, like: str) -> None:
    """Note the static 2-D shape of a Gemm-made gradient (a weight's), for the optimiser's fusion."""
    shape = ctx.shapes.get(like)
    if grad is not None and shape is not None and len(shape) == 2 and all(d is not None for d in shape):
        ctx.em.gemm_shapes[grad] = (int(shape[0]), int(shape[1]))


@rule("Gemm")
def gemm_grad(ctx: GradContext, node, grads):
    """Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T; uses Gemm's trans flags, never Transpose."""
    attrs = node_attrs(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    g = grads[0]
    em = ctx.em
    ga = gb = gc = None
    if ctx.needs(a):
        if not ta:  # dA = dY B'^T
            ga = em.node("Gemm", [g, b], alpha=alpha, transB=0 if tb else 1)
        else:  # dA = B' dY^T
            ga = em.node("Gemm", [b, g], alpha=alpha, transA=tb, transB=1)
    if ctx.needs(b):
        if not tb:  # dB = A'^T dY
            gb = em.node("Gemm", [a, g], alpha=alpha, transA=0 if ta else 1)
        else:  # dB = dY^T A'
            gb = em.node("Gemm", [g, a], alpha=alpha, transA=1, transB=ta)
    for grad, operand in ((ga, a), (gb, b)):
        _record_gemm_shape(ctx, grad, operand)
    if c and ctx.needs(c):
        gc = ctx.unbroadcast(g, node, node.output[0], c)
        if beta != 1.0:
            gc = em.mul(gc, em.scalar(beta))
    return [ga, gb, gc][: len(node.input)]


@rule("MatMul")
def matmul_grad(ctx: GradContext, node, grads):
    """2-D operands use Gemm flags; a batched A times a 2-D B folds the batch into rows; else batched MatMul."""
    a, b = node.input
    g = grads[0]
    em = ctx.em
    sa, sb = ctx.shape(node, a), ctx.shape(node, b)
    if len(sa) < 2 or len(sb) < 2:
        raise ctx.unsupported(node, "a 1-D operand")
    ga = gb = None
    if len(sb) == 2:
        if ctx.needs(a):
            if len(sa) == 2:
                ga = em.node("Gemm", [g, b], transB=1)
            else:  # fold the batch dims into rows: one Gemm, no Transpose of the weight
                ga = em.node("Gemm", [em.reshape(g, [-1, sb[1]]), b], transB=1)
                ga = ctx.reshape_like(ga, node, a)
        if ctx.needs(b):
            if len(sa) == 2:
                gb = em.node("Gemm", [a, g], transA=1)
            else:
                k, n = sb
                gb = em.node("Gemm", [em.reshape(a, [-1, k]), em.reshape(g, [-1, n])], transA=1)
            _record_gemm_shape(ctx, gb, b)
        return [ga, gb]
    out = node.output[0]
    so = ctx.shape(node, out)
    swap_a = list(range(len(sa) - 2)) + [len(sa) - 1, len(sa) - 2]
    swap_b = list(range(len(sb) - 2)) + [len(sb) - 1, len(sb) - 2]

    def batch_sum(grad, name, shape):
        """Sum over broadcast batch dims; the matrix dims of ``name`` need not match the output's."""
        if len(shape) == len(so) and shape[:-2] == so[:-2]:
            return grad  # the batch dims match (attention's [N, heads, T, d]): nothing was broadcast
        return ctx.unbroadcast(grad, node, out, name)

    if ctx.needs(a):
        ga = batch_sum(em.node("MatMul", [g, em.node("Transpose", [b], perm=swap_b)]), a, sa)
    if ctx.needs(b):
        gb = batch_sum(em.node("MatMul", [em.node("Transpose", [a], perm=swap_a), g]), b, sb)
    return [ga, gb]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape_grad(ctx: GradContext, node, grads):
    """Shape-only ops: the gradient is the incoming one, reshaped back to the input's shape."""
    return [ctx.reshape_like(grads[0], node, node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose_grad(ctx: GradContext, node, grads):
    rank = len(ctx.shape(node, node.input[0]))
    perm = list(node_attrs(node).get("perm", list(reversed(range(rank)))))
    inverse = [perm.index(i) for i in range(rank)]
    return [ctx.em.node("Transpose", [grads[0]], perm=inverse)]


@rule("Concat")
def concat_grad(ctx: GradContext, node, grads):
    axis = int(node_attrs(node)["axis"])
    rank = len(ctx.shape(node, node.output[0]))
    axis = axis % rank
    sizes = []
    for name in node.input:
        size = ctx.shape(node, name)[axis]
        if size is None:
            raise ctx.unsupported(node, f"a dynamic size along the concat axis for {name!r}")
        sizes.append(size)
    parts = ctx.em.node("Split", [grads[0], ctx.em.ints(sizes)], n_outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if ctx.needs(name) else None for p, name in zip(parts, node.input, strict=True)]


@rule("ReduceMean")
def reduce_mean_grad(ctx: GradContext, node, grads):
    attrs = node_attrs(node)
    x = node.input[0]
    in_shape = ctx.shape(node, x)
    rank = len(in_shape)
    if ctx.opset >= 18:
        axes = list(ctx.constant(node, node.input[1]).tolist()) if len(node.input) > 1 and node.input[1] else []
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [grads[0]] + [None] * (len(node.input) - 1)
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    g = grads[0]
    if not attrs.get("keepdims", 1):
        g = ctx.em.unsqueeze(g, axes)
    em = ctx.em
    sizes = [in_shape[a] for a in axes]
    if any(s is None for s in sizes):
        scale = em.div(em.element_count(node.output[0]), em.element_count(x))
    else:
        scale = em.scalar(1.0 / float(np.prod(sizes)))
    g = em.mul(g, scale)
    return [em.node("Expand", [g, em.node("Shape", [x])])] + [None] * (len(node.input) - 1)


@rule("Neg")
def neg_grad(ctx: GradContext, node, grads):
    return [ctx.em.node("Neg", [grads[0]])]


@rule("Clip")
def clip_grad(ctx: GradContext, node, grads):
    """Gradient 1 strictly inside (min, max), as PyTorch's hardtanh/ReLU6 backward; min/max are settings."""
    x = node.input[0]
    em = ctx.em
    inside = None
    for index, op in ((1, "Greater"), (2, "Less")):
        if len(node.input) > index and node.input[index]:
            test = em.node(op, [x, node.input[index]])
            inside = test if inside is None else em.node("And", [inside, test])
    if inside is None:
        return [grads[0]] + [None] * (len(node.input) - 1)
    return [em.mul(grads[0], _mask(ctx, inside))] + [None] * (len(node.input) - 1)


@rule("Pad")
def pad_grad(ctx: GradContext, node, grads):
    """Constant-mode padding: the gradient is the unpadded window of the incoming gradient."""
    mode = node_attrs(node).get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise ctx.unsupported(node, f"mode={mode} (supported: constant)")
    x = node.input[0]
    shape = ctx.shape(node, x)
    rank = len(shape)
    pads = [int(p) for p in ctx.constant(node, node.input[1]).tolist()]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in ctx.constant(node, node.input[3]).tolist()]
    if any(p < 0 for p in pads):
        raise ctx.unsupported(node, "negative pads (cropping)")
    begins, ends, sliced = [], [], []
    for i, axis in enumerate(axes):
        before, after = pads[i], pads[len(axes) + i]
        if before or after:
            if shape[axis] is None:
                raise ctx.unsupported(node, f"padding the dynamic axis {axis}")
            begins.append(before)
            ends.append(before + shape[axis])
            sliced.append(axis)
    if not sliced:
        return [grads[0]] + [None] * (len(node.input) - 1)
    em = ctx.em
    window = em.node("Slice", [grads[0], em.ints(begins), em.ints(ends), em.ints(sliced)])
    return [window] + [None] * (len(node.input) - 1)


@rule("Exp")
def exp_grad(ctx: GradContext, node, grads):
    return [ctx.em.mul(grads[0], node.output[0])]


@rule("Log")
def log_grad(ctx: GradContext, node, grads):
    return [ctx.em.div(grads[0], node.input[0])]


@rule("Sqrt")
def sqrt_grad(ctx: GradContext, node, grads):
    return [ctx.em.div(ctx.em.mul(grads[0], ctx.em.scalar(0.5)), node.output[0])]


@rule("Slice")
def slice_grad(ctx: GradContext, node, grads):
    """Unit-step slices (what ``x[:, a:b]`` and ``torch.chunk`` export): zero-pad the gradient back."""
    x = node.input[0]
    shape = ctx.shape(node, x)
    rank = len(shape)

    def ints(index, default):
        if len(node.input) > index and node.input[index]:
            return [int(v) for v in ctx.constant(node, node.input[index]).tolist()]
        return default

    starts, ends = ints(1, None), ints(2, None)
    axes = [a % rank for a in ints(3, list(range(len(starts))))]
    steps = ints(4, [1] * len(starts))
    if any(s != 1 for s in steps):
        raise ctx.unsupported(node, f"steps={steps} (supported: 1)")
    pads = [0] * (2 * rank)
    for start, end, axis in zip(starts, ends, axes, strict=True):
        size = shape[axis]
        if size is None:
            if start == 0 and end >= 2**31 - 1:  # the whole dynamic (batch) axis: nothing is cut
                continue
            raise ctx.unsupported(node, f"slicing the dynamic axis {axis}")
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        pads[axis] = start
        pads[rank + axis] = size - max(end, start)
    if not any(pads):
        return [grads[0]] + [None] * (len(node.input) - 1)
    padded = ctx.em.node("Pad", [grads[0], ctx.em.ints(pads)], mode="constant")
    return [padded] + [None] * (len(node.input) - 1)
