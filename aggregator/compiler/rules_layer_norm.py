"""Gradient rule for LayerNormalization (opset 17), the normalisation of every transformer.

With x_hat = (x - mean) * r over the normalised axes (r = 1/sqrt(var + eps)) and y = x_hat*scale + bias:
    dx = r * (g' - mean(g') - x_hat * mean(g' * x_hat)),  g' = dY * scale
    dscale = sum of dY * x_hat over the leading axes,   dbias = sum of dY over the leading axes.
x_hat and r are recomputed from x (two reductions) rather than kept from the forward pass.
"""

from __future__ import annotations

from aggregator.compiler.grad_context import GradContext, node_attrs, rule


@rule("LayerNormalization")
def layer_norm_grad(ctx: GradContext, node, grads):
    if len(grads) > 1 and any(g is not None for g in grads[1:]):
        raise ctx.unsupported(node, "using the Mean or InvStdDev outputs")
    attrs = node_attrs(node)
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    rank = len(ctx.shape(node, x))
    axes = list(range(int(attrs.get("axis", -1)) % rank, rank))
    eps = float(attrs.get("epsilon", 1e-5))
    em, g, y = ctx.em, grads[0], node.output[0]
    centred = em.sub(x, em.reduce("ReduceMean", x, axes, keepdims=True))
    variance = em.reduce("ReduceMean", em.mul(centred, centred), axes, keepdims=True)
    inv_std = em.node("Reciprocal", [em.node("Sqrt", [em.add(variance, em.scalar(eps))])])
    x_hat = em.mul(centred, inv_std)
    out = [None] * len(node.input)
    if ctx.needs(x):
        gs = em.mul(g, scale)
        mean_g = em.reduce("ReduceMean", gs, axes, keepdims=True)
        mean_gx = em.reduce("ReduceMean", em.mul(gs, x_hat), axes, keepdims=True)
        out[0] = em.mul(em.sub(em.sub(gs, mean_g), em.mul(x_hat, mean_gx)), inv_std)
    if ctx.needs(scale):
        out[1] = ctx.unbroadcast(em.mul(g, x_hat), node, y, scale)
    if bias and ctx.needs(bias):
        out[2] = ctx.unbroadcast(g, node, y, bias)
    return out
