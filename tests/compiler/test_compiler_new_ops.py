"""The mobile and transformer ops' gradient rules, each against central finite differences, an
independent numpy derivative and torch.autograd: HardSigmoid, HardSwish, Erf, Gelu (exact and tanh),
Pow, LayerNormalization, Gather (constant indices, any axis, duplicates; an int64 Embedding) and Expand.

Each case is ``h = x * s + b`` (trainable s, b, so the input gradient is exercised) followed by the
op, under an MSE loss. The numpy side knows only the op's textbook derivative; the torch side is
the same network written with torch functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from compiler_harness import (
    assert_loads_in_onnxruntime,
    compile_for_gradients,
    finite_difference_check,
    make_batch,
    sgd_gradients,
)
from onnx import TensorProto
from test_compiler_rules import TinyModel

from aggregator.compiler import compile_graphs

_erf = np.vectorize(math.erf)


@dataclass
class OpCase:
    """One op after the h = x*s + b prologue; ``extra`` names the op's own parameters (shape each)."""

    build: Callable  # (TinyModel, h, extra names) -> output name
    numpy_forward: Callable  # (h, extra arrays) -> y
    numpy_backward: Callable  # (h, extra arrays, dL/dy) -> (dL/dh, [dL/d extra])
    torch_forward: Callable  # (torch module, h, extra tensors) -> y
    x_shape: tuple = (3, 5)
    extra: tuple = ()
    opset: int = 17


def elementwise(op, forward, slope, torch_forward, opset=17, **attrs):
    return OpCase(
        build=lambda t, h, extra: t.node(op, [h], **attrs),
        numpy_forward=lambda h, extra: forward(h),
        numpy_backward=lambda h, extra, g: (g * slope(h), []),
        torch_forward=lambda torch, h, extra: torch_forward(torch, h),
        opset=opset,
    )


def _hardswish_slope(h):
    return np.where(h < -3, 0.0, np.where(h <= 3, h / 3 + 0.5, 1.0))


def _gelu_tanh(h):
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _gelu_tanh_slope(h):
    t = np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))
    return 0.5 * (1 + t) + 0.5 * h * (1 - t**2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * h**2)


def _layer_norm_forward(h, extra, eps=1e-5):
    scale, bias = extra
    mean = h.mean(axis=-1, keepdims=True)
    x_hat = (h - mean) / np.sqrt(h.var(axis=-1, keepdims=True) + eps)
    return x_hat * scale + bias


def _layer_norm_backward(h, extra, g, eps=1e-5):
    scale, _ = extra
    n = h.shape[-1]
    inv = 1 / np.sqrt(h.var(axis=-1, keepdims=True) + eps)
    x_hat = (h - h.mean(axis=-1, keepdims=True)) * inv
    gs = g * scale  # the textbook form: (n*gs - sum(gs) - x_hat*sum(gs*x_hat)) / (n*sigma)
    dh = (n * gs - gs.sum(-1, keepdims=True) - x_hat * (gs * x_hat).sum(-1, keepdims=True)) * inv / n
    axes = tuple(range(h.ndim - 1))
    return dh, [(g * x_hat).sum(axis=axes), g.sum(axis=axes)]


def _gather_backward(indices, axis):
    def backward(h, extra, g):
        dh = np.zeros_like(h)
        index = [slice(None)] * h.ndim
        index[axis] = indices
        np.add.at(dh, tuple(index), g)
        return dh, []
    return backward


def _torch_take(torch, h, indices, axis):
    picked = torch.as_tensor(np.atleast_1d(indices) % h.shape[axis])
    out = torch.index_select(h, axis, picked)
    return out.squeeze(axis) if np.ndim(indices) == 0 else out


def gather(indices, axis, x_shape):
    return OpCase(
        build=lambda t, h, extra: t.node("Gather", [h, t.ints(indices)], axis=axis),
        numpy_forward=lambda h, extra: np.take(h, indices, axis=axis),
        numpy_backward=_gather_backward(indices, axis),
        torch_forward=lambda torch, h, extra: _torch_take(torch, h, indices, axis),
        x_shape=x_shape,
    )


def _head_split_backward(h, extra, g):
    dh = np.zeros_like(h)
    dh[:, 1] = g
    return dh, []


CASES = {
    "hardsigmoid": elementwise(
        "HardSigmoid", lambda h: np.clip(h / 6 + 0.5, 0, 1), lambda h: ((h > -3) & (h < 3)) / 6,
        lambda torch, h: torch.nn.functional.hardsigmoid(h), alpha=1 / 6, beta=0.5),
    "hardswish": elementwise(
        "HardSwish", lambda h: h * np.clip(h / 6 + 0.5, 0, 1), _hardswish_slope,
        lambda torch, h: torch.nn.functional.hardswish(h)),
    "erf": elementwise("Erf", _erf, lambda h: 2 / math.sqrt(math.pi) * np.exp(-h * h), lambda torch, h: torch.erf(h)),
    "gelu_exact_opset20": elementwise(
        "Gelu", lambda h: 0.5 * h * (1 + _erf(h / math.sqrt(2))),
        lambda h: 0.5 * (1 + _erf(h / math.sqrt(2))) + h * np.exp(-h * h / 2) / math.sqrt(2 * math.pi),
        lambda torch, h: torch.nn.functional.gelu(h), opset=20),
    "gelu_tanh_opset20": elementwise(
        "Gelu", _gelu_tanh, _gelu_tanh_slope, lambda torch, h: torch.nn.functional.gelu(h, approximate="tanh"),
        opset=20, approximate="tanh"),
    "pow_cube": OpCase(
        build=lambda t, h, extra: t.node("Pow", [h, t.const(np.asarray(3.0, np.float32))]),
        numpy_forward=lambda h, extra: h**3, numpy_backward=lambda h, extra, g: (g * 3 * h**2, []),
        torch_forward=lambda torch, h, extra: h**3),
    "layernormalization_last_axis": OpCase(
        build=lambda t, h, extra: t.node("LayerNormalization", [h, *extra], axis=-1, epsilon=1e-5),
        numpy_forward=_layer_norm_forward, numpy_backward=_layer_norm_backward,
        torch_forward=lambda torch, h, extra: torch.nn.functional.layer_norm(h, (h.shape[-1],), *extra, eps=1e-5),
        x_shape=(3, 5), extra=((5,), (5,))),
    "gather_last_position_axis1": gather(np.asarray(-1), 1, (3, 5)),
    "gather_duplicate_indices_axis2": gather(np.asarray([2, 0, 2, -1]), 2, (3, 5)),
    "gather_head_split_axis0": OpCase(  # q, k, v = proj[0], proj[1], proj[2] of a [3, N, E] stack
        build=lambda t, h, extra: t.node("Gather", [t.node("Transpose", [h], perm=[1, 0, 2]), t.ints(1)], axis=0),
        numpy_forward=lambda h, extra: h[:, 1], numpy_backward=_head_split_backward,
        torch_forward=lambda torch, h, extra: h.transpose(0, 1)[1]),
    "castlike_between_floats": OpCase(  # dynamo's CastLike(value, like): an identity within one float dtype
        build=lambda t, h, extra: t.node("CastLike", [h, h]),
        numpy_forward=lambda h, extra: h, numpy_backward=lambda h, extra, g: (g, []),
        torch_forward=lambda torch, h, extra: h),
    "cast_between_floats": OpCase(  # Cast to the model's own float type (exporters' dtype bookkeeping)
        build=lambda t, h, extra: t.node("Cast", [h], to=TensorProto.FLOAT),
        numpy_forward=lambda h, extra: h, numpy_backward=lambda h, extra, g: (g, []),
        torch_forward=lambda torch, h, extra: h),
    "expand": OpCase(
        build=lambda t, h, extra: t.node("Expand", [h, t.ints([1, 4, 1])]),
        numpy_forward=lambda h, extra: np.broadcast_to(h, (h.shape[0], 4, h.shape[2])),
        numpy_backward=lambda h, extra, g: (g.sum(axis=1, keepdims=True), []),
        torch_forward=lambda torch, h, extra: h.expand(-1, 4, -1), x_shape=(1, 5)),
}


def build_model(case: OpCase):
    """x -> h = x*s + b -> op; s in [1.5, 2.5] so h spans about (-6, 6), every region of a piecewise op."""
    t = TinyModel(list(case.x_shape), opset=case.opset)
    features = case.x_shape[-1]
    h = t.node("Add", [t.node("Mul", ["x", t.param([features], 1.5, 2.5)]), t.param([features])])
    extra = [t.param(list(shape), 0.5, 1.5) for shape in case.extra]
    return t.build(case.build(t, h, extra))


def numpy_gradients(case: OpCase, params: dict, x, y) -> dict[str, np.ndarray]:
    s, b, *extra = (params[f"p{i}"] for i in range(2 + len(case.extra)))
    h = x * s + b
    out = case.numpy_forward(h, extra)
    g = 2 * (out - y) / out.size
    dh, d_extra = case.numpy_backward(h, extra, g)
    lead = tuple(range(h.ndim - 1))
    grads = {"p0": (dh * x).sum(axis=lead), "p1": dh.sum(axis=lead)}
    grads.update({f"p{2 + i}": d for i, d in enumerate(d_extra)})
    return grads


def torch_gradients(case: OpCase, params: dict, x, y) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    h = torch.from_numpy(x) * p["p0"] + p["p1"]
    out = case.torch_forward(torch, h, [p[f"p{2 + i}"] for i in range(len(case.extra))])
    torch.nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
    return {k: v.grad.numpy() for k, v in p.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_new_op_gradient_matches_finite_differences_numpy_and_torch(name):
    case = CASES[name]
    model = build_model(case)
    compiled = compile_for_gradients(model, "mse")
    x, y = make_batch(compiled, 4, seed=11)
    grads = sgd_gradients(compiled, compiled.initial_params, x, y)
    assert set(grads) == {f"p{i}" for i in range(2 + len(case.extra))}
    finite_difference_check(compiled, x, y, grads, probes=4)
    params = {k: v.astype(np.float64) for k, v in compiled.initial_params.items()}
    # rtol 1e-6 as in test_compiler_torch_export: ONNX attributes are float32 (HardSigmoid's alpha = 1/6 is
    # 0.16666667), so the float64 graph differs from the exact formulas by ~1e-8 relative.
    for reference in (numpy_gradients(case, params, x, y), torch_gradients(case, params, x, y)):
        for key, grad in grads.items():
            np.testing.assert_allclose(grad, reference[key], rtol=1e-6, atol=1e-10, err_msg=key)

    compiled32 = compile_graphs(model, loss="mse", optimizer="sgd")
    assert_loads_in_onnxruntime(compiled32.train_step)
    grads32 = sgd_gradients(compiled32, compiled32.initial_params, x.astype(np.float32), y.astype(np.float32))
    for key, grad in grads.items():
        np.testing.assert_allclose(grads32[key], grad, rtol=2e-3, atol=2e-4 * (np.abs(grad).max() + 1e-6), err_msg=key)
