"""Gradient rules for the activations of mobile and transformer models: HardSigmoid, HardSwish, Erf,
Gelu (opset 20, exact and tanh forms) and Pow with a constant exponent (the tanh-Gelu's x^3).

Boundaries follow PyTorch's backward kernels, so training matches torch.optim exactly at the kinks.
"""

from __future__ import annotations

import math

import numpy as np

from aggregator.compiler.grad_context import GradContext, node_attrs, rule


@rule("HardSigmoid")
def hard_sigmoid_grad(ctx: GradContext, node, grads):
    """y = clip(alpha*x + beta, 0, 1): slope alpha strictly inside, as torch's hardsigmoid_backward."""
    attrs = node_attrs(node)
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    em = ctx.em
    t = em.add(em.mul(node.input[0], em.scalar(alpha)), em.scalar(beta))
    inside = em.node("And", [em.node("Greater", [t, em.scalar(0.0)]), em.node("Less", [t, em.scalar(1.0)])])
    return [em.mul(grads[0], em.mul(em.node("Cast", [inside], to=em.onnx_dtype), em.scalar(alpha)))]


@rule("HardSwish")
def hard_swish_grad(ctx: GradContext, node, grads):
    """y = x * relu6(x + 3) / 6: slope 0 below -3, x/3 + 1/2 up to 3 (inclusive, as torch), 1 above."""
    x = node.input[0]
    em = ctx.em
    middle = em.add(em.mul(x, em.scalar(1.0 / 3.0)), em.scalar(0.5))
    upper = em.node("Where", [em.node("LessOrEqual", [x, em.scalar(3.0)]), middle, em.scalar(1.0)])
    slope = em.node("Where", [em.node("Less", [x, em.scalar(-3.0)]), em.scalar(0.0), upper])
    return [em.mul(grads[0], slope)]


@rule("Erf")
def erf_grad(ctx: GradContext, node, grads):
    """d erf(x)/dx = 2/sqrt(pi) * exp(-x^2)"""
    x = node.input[0]
    em = ctx.em
    density = em.node("Exp", [em.node("Neg", [em.mul(x, x)])])
    return [em.mul(grads[0], em.mul(density, em.scalar(2.0 / math.sqrt(math.pi))))]


@rule("Gelu")
def gelu_grad(ctx: GradContext, node, grads):
    """exact: Phi(x) + x*phi(x); tanh: 0.5(1+t) + 0.5x(1-t^2) * sqrt(2/pi)(1 + 3c x^2), t = tanh(u)."""
    approximate = node_attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    x = node.input[0]
    em = ctx.em
    if approximate == "none":
        cdf = em.mul(em.add(em.node("Erf", [em.mul(x, em.scalar(1.0 / math.sqrt(2.0)))]), em.scalar(1.0)),
                     em.scalar(0.5))
        pdf = em.mul(em.node("Exp", [em.mul(em.mul(x, x), em.scalar(-0.5))]), em.scalar(1.0 / math.sqrt(2 * math.pi)))
        return [em.mul(grads[0], em.add(cdf, em.mul(x, pdf)))]
    if approximate != "tanh":
        raise ctx.unsupported(node, f"approximate={approximate!r} (supported: none, tanh)")
    c, k = 0.044715, math.sqrt(2.0 / math.pi)
    x2 = em.mul(x, x)
    u = em.mul(em.mul(x, em.add(em.mul(x2, em.scalar(c)), em.scalar(1.0))), em.scalar(k))
    t = em.node("Tanh", [u])
    du = em.mul(em.add(em.mul(x2, em.scalar(3 * c)), em.scalar(1.0)), em.scalar(k))
    inner = em.mul(em.mul(em.sub(em.scalar(1.0), em.mul(t, t)), du), em.mul(x, em.scalar(0.5)))
    return [em.mul(grads[0], em.add(em.mul(em.add(t, em.scalar(1.0)), em.scalar(0.5)), inner))]


@rule("Pow")
def pow_grad(ctx: GradContext, node, grads):
    """y = a^b with a constant exponent b: dy/da = b * a^(b-1)."""
    a, b = node.input
    if ctx.needs(b):
        raise ctx.unsupported(node, "a trainable exponent")
    exponent = np.asarray(ctx.constant(node, b), dtype=np.float64)
    em = ctx.em
    if exponent.size == 1 and float(exponent.ravel()[0]) == 2.0:
        slope = em.mul(a, em.scalar(2.0))
    else:
        slope = em.mul(em.node("Pow", [a, em.const((exponent - 1).astype(em.dtype))]),
                       em.const(exponent.astype(em.dtype)))
    return [ctx.unbroadcast(em.mul(grads[0], slope), node, node.output[0], a), None]
