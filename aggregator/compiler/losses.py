"""Loss functions: forward value and the gradient seed dL/d(output), both batch means.

cross_entropy matches ``torch.nn.functional.cross_entropy(logits, labels)`` (mean over the batch,
int64 class indices [N]); mse matches ``torch.nn.functional.mse_loss`` (mean over every element).
"""

from __future__ import annotations

import numpy as np

from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import CompileError

LOSSES = ("cross_entropy", "mse")


def emit_loss(em: Emitter, kind: str, output: str, labels: str, output_shape: tuple, with_grad: bool,
              loss_name: str = "loss") -> str | None:
    """Emit the loss into ``loss_name``; returns the name of dL/d(output) when ``with_grad``."""
    if kind == "cross_entropy":
        return _cross_entropy(em, output, labels, output_shape, with_grad, loss_name)
    if kind == "mse":
        return _mse(em, output, labels, with_grad, loss_name)
    raise CompileError(f"loss must be one of {LOSSES}, got {kind!r}")


def _cross_entropy(em: Emitter, logits: str, labels: str, shape: tuple, with_grad: bool, loss_name: str):
    if len(shape) != 2 or shape[1] is None:
        raise CompileError(
            f"cross_entropy needs the model output to be logits of shape [N, classes], got {list(shape)}"
        )
    classes = int(shape[1])
    if classes < 2:
        raise CompileError(
            f"cross_entropy needs at least 2 classes, but the model output has shape {list(shape)}: softmax over "
            "one logit is always 1 (accuracy 1.0, zero gradient); use --loss mse, or give the model 2 outputs"
        )
    log_prob = em.node("LogSoftmax", [logits], hint="log_prob", axis=1)
    label_col = em.unsqueeze(labels, [1])
    picked = em.node("GatherElements", [log_prob, label_col], hint="picked", axis=1)
    mean = em.reduce("ReduceMean", picked, [0, 1], keepdims=False)
    em.node("Neg", [mean], outputs=[loss_name])
    if not with_grad:
        return None
    # d/dlogits mean_i(-log softmax(z_i)[y_i]) = (softmax(z) - onehot(y)) / N
    classes_row = em.const(np.arange(classes, dtype=np.int64).reshape(1, classes), dtype=np.int64)
    onehot = em.node("Cast", [em.node("Equal", [label_col, classes_row])], to=em.onnx_dtype)
    diff = em.sub(em.node("Exp", [log_prob]), onehot)
    return em.div(diff, em.batch_size(logits), hint="d_logits")


def _mse(em: Emitter, output: str, target: str, with_grad: bool, loss_name: str):
    diff = em.sub(output, target, hint="residual")
    em.node("ReduceMean", [em.mul(diff, diff)], outputs=[loss_name], keepdims=0)
    if not with_grad:
        return None
    return em.mul(diff, em.div(em.scalar(2.0), em.element_count(output)), hint="d_output")
