"""Optimiser updates fused into the train-step graph, following PyTorch's conventions exactly.

Users compare a compiled model against their framework, so each update is the one ``torch.optim``
performs (``lr`` is a graph input, the hyper-parameters are baked constants, ``step`` is 1-based):

* sgd:      g += wd*p;  p -= lr*g                                         (torch.optim.SGD, momentum=0)
* momentum: g += wd*p;  buf = mu*buf + g;  p -= lr*buf                    (torch.optim.SGD, dampening=0,
            nesterov=False; buf starts at zero, which equals torch's buf=g on the first step)
* adam:     g += wd*p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
            p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)           (torch.optim.Adam, amsgrad=False)
* adamw:    p *= 1 - lr*wd, then the adam update without the L2 term       (torch.optim.AdamW, decoupled)

Adam's v is stored scaled (see ``state_scales``); every other state tensor is stored as torch holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import CompileError

DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"weight_decay": 0.0},
    "momentum": {"momentum": 0.9, "weight_decay": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},  # torch's AdamW default
}
STATE_KINDS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "momentum": ("velocity",),
    "adam": ("m", "v"),
    "adamw": ("m", "v"),
}


def state_scales(optimizer: str, hp: dict[str, float]) -> dict[str, float]:
    """Factor between each stored state tensor and torch's value of it (stored = scale * torch's).

    Adam's v is kept as v * (1-b1)^2 / (1-b2): its update then reads v' = b2*v + s*s with s = (1-b1)*g,
    the value m is updated with, so no pass over the weight is spent scaling g^2 (the factor folds into
    the step scalars instead). On the 784x128 weight that pass is ~9 us of a ~0.35 ms step.
    """
    if optimizer in ("adam", "adamw"):
        return {"m": 1.0, "v": (1.0 - hp["beta1"]) ** 2 / (1.0 - hp["beta2"])}
    return {kind: 1.0 for kind in STATE_KINDS[optimizer]}


def resolve_hyperparameters(optimizer: str, params: dict | None) -> dict[str, float]:
    """Defaults overridden by ``params``; unknown names and out-of-range values are errors."""
    if optimizer not in DEFAULTS:
        raise CompileError(f"optimizer must be one of {sorted(DEFAULTS)}, got {optimizer!r}")
    resolved = dict(DEFAULTS[optimizer])
    for key, value in (params or {}).items():
        if key not in resolved:
            raise CompileError(
                f"optimizer {optimizer!r} has no hyper-parameter {key!r}; it takes {sorted(resolved)}"
            )
        try:
            resolved[key] = float(value)
        except (TypeError, ValueError) as exc:
            raise CompileError(f"hyper-parameter {key}={value!r} is not a number") from exc
        if not math.isfinite(resolved[key]):
            raise CompileError(f"hyper-parameter {key}={value!r} must be a finite number")
    for key in ("beta1", "beta2", "momentum"):
        if key in resolved and not 0.0 <= resolved[key] < 1.0:
            raise CompileError(f"{key} must be in [0, 1), got {resolved[key]}")
    if resolved.get("eps", 1.0) <= 0.0:
        raise CompileError(f"eps must be positive, got {resolved['eps']}")
    if resolved["weight_decay"] < 0.0:
        raise CompileError(f"weight_decay must be >= 0, got {resolved['weight_decay']}")
    return resolved


@dataclass
class UpdateEmitter:
    """Emits the update of each parameter; step-dependent scalars are computed once per graph."""

    em: Emitter
    optimizer: str
    hp: dict[str, float]
    lr: str
    step: str
    _step_scalars: tuple[str, str] | None = None
    _neg_lr_name: str | None = None
    # Parameters whose SGD update writes the 2-D shape of their weight-gradient Gemm: param -> (the
    # graph input carrying the parameter in that shape, the shape). The compiler declares both graphs'
    # input and output in it and reshapes the input back for the forward pass (a view in onnxruntime).
    flattened: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)

    def _neg_lr(self) -> str:
        if self._neg_lr_name is None:
            self._neg_lr_name = self.em.node("Neg", [self.lr], hint="neg_lr")
        return self._neg_lr_name

    def _adam_scalars(self) -> tuple[str, str]:
        """(lr * r / (1 - b1^t), eps * r) with r = sqrt((1 - b2^t) / k), k = (1-b2) / (1-b1)^2.

        torch computes p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). The stored v is v/k (``state_scales``),
        so sqrt(v) = sqrt(k) * sqrt(stored); multiplying numerator and denominator by sqrt(bc2/k) gives
        the same value as m / (sqrt(stored) + eps*r) * lr*r/bc1, with one elementwise pass fewer per
        parameter than dividing by sqrt(bc2) and none for k.
        """
        if self._step_scalars is None:
            em, hp = self.em, self.hp
            t = em.node("Cast", [self.step], to=em.onnx_dtype)
            one = em.scalar(1.0)
            bc1 = em.sub(one, em.node("Pow", [em.scalar(hp["beta1"]), t]))
            bc2 = em.sub(one, em.node("Pow", [em.scalar(hp["beta2"]), t]))
            r = em.node("Sqrt", [em.mul(bc2, em.scalar(state_scales(self.optimizer, hp)["v"]))])
            step_size = em.div(em.mul(self.lr, r), bc1, hint="step_size")
            self._step_scalars = (step_size, em.mul(r, em.scalar(hp["eps"]), hint="eps_hat"))
        return self._step_scalars

    def _gemm_behind(self, grad: str, need_shape: bool) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
        """The Gemm that produced ``grad``, directly or through one Reshape (a conv weight's gradient
        is a 2-D Gemm reshaped to [M, C, *K]), and that Reshape; None unless every value on the way is
        read by nothing else, since the rewrite changes what they hold. With ``need_shape`` a Reshape
        qualifies only when the Gemm's 2-D shape is recorded (``Emitter.gemm_shapes``)."""
        node = self.em.producer(grad)
        if node is None or self.em.consumers(grad):
            return None
        reshape = None
        if node.op_type == "Reshape":
            reshape, node = node, self.em.producer(node.input[0])
            if node is None or self.em.consumers(node.output[0]) != 1:
                return None
            if need_shape and node.output[0] not in self.em.gemm_shapes:
                return None
        if node.op_type != "Gemm" or len(node.input) != 2:
            return None
        return node, reshape

    def _scaled_operand(self, node: onnx.NodeProto) -> int:
        """Which Gemm input to multiply by a runtime scale: the smaller one when the output's shape
        [rows, cols] is known (A holds rows x K elements, B K x cols), else the one the backward pass
        emitted (the upstream gradient, usually batch-sized) rather than a forward activation."""
        shape = self.em.gemm_shapes.get(node.output[0])
        if shape is not None:
            return 0 if shape[0] <= shape[1] else 1
        return 0 if self.em.producer(node.input[0]) is not None or self.em.producer(node.input[1]) is None else 1

    def _fuse_into_gemm(self, grad: str, accumulator: str, beta: float, scale: str | None, out: str,
                        flatten: str | None = None) -> bool:
        """Rewrite the Gemm that produced ``grad`` into ``out = beta*accumulator + scale*grad``.

        Gemm computes alpha*A*B + beta*C in one pass, so a plain SGD step (C = p, the smaller operand
        scaled by -lr) or a momentum buffer update (C = buf, beta = mu) costs no extra elementwise
        passes over the weight. Behind a Reshape (a conv weight's gradient), C is the accumulator
        reshaped to the Gemm's 2-D shape (a view) and the Reshape writes ``out``; a Reshape into a
        bound graph output is a copy, though, so with ``flatten`` (the parameter being updated, which
        must be the accumulator) the graph instead carries that parameter in the Gemm's shape
        (``flattened``) and the Gemm writes ``out`` itself: resnet18's conv weights (45 MB) then cost
        no elementwise pass at all, where a Mul and a Sub took ~24 ms of a ~100 ms step.
        """
        if self.em.dtype != np.float32 and float(np.float32(beta)) != beta:
            return False  # Gemm's beta attribute is a float32: it would round a float64 graph's momentum
        found = self._gemm_behind(grad, need_shape=True)
        if found is None:
            return False
        node, reshape = found
        if scale is not None:
            k = self._scaled_operand(node)
            node.input[k] = self.em.insert_before(node, "Mul", [node.input[k], scale], hint="scaled_grad")
        if reshape is not None:
            shape = self.em.gemm_shapes[node.output[0]]
            if flatten is not None:
                accumulator = self.em.fresh(f"{flatten}__2d")
                self.flattened[flatten] = (accumulator, shape)
                self.em.remove(reshape)
                reshape = None
            else:
                accumulator = self.em.insert_before(node, "Reshape", [accumulator, self.em.ints(shape)],
                                                    hint="accumulator_2d")
        node.input.append(accumulator)
        _set_float_attribute(node, "beta", beta)
        self.em.rename_output(reshape if reshape is not None else node, out)
        return True

    def _prescale_gemm(self, grad: str, factor: float) -> bool:
        """Multiply the alpha of the Gemm that produced ``grad`` (possibly behind a Reshape) by ``factor``:
        saves one pass over the weight. Alpha is a float32 attribute too."""
        if self.em.dtype != np.float32 and float(np.float32(factor)) != factor:
            return False
        found = self._gemm_behind(grad, need_shape=False)
        if found is None:
            return False
        node = found[0]
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        _set_float_attribute(node, "alpha", alpha * factor)
        return True

    def update(self, param: str, grad: str, state: dict[str, str], out_param: str, out_state: dict[str, str]) -> None:
        em, hp = self.em, self.hp
        wd = hp["weight_decay"]
        if wd and self.optimizer != "adamw":
            grad = em.add(grad, em.mul(param, em.scalar(wd)))
        if self.optimizer == "sgd":
            if wd or not self._fuse_into_gemm(grad, param, 1.0, self._neg_lr(), out_param, flatten=param):
                em.node("Sub", [param, em.mul(self.lr, grad)], outputs=[out_param])
        elif self.optimizer == "momentum":
            buf = out_state["velocity"]
            if wd or not self._fuse_into_gemm(grad, state["velocity"], hp["momentum"], None, buf):
                em.node("Add", [em.mul(state["velocity"], em.scalar(hp["momentum"])), grad], outputs=[buf])
            em.node("Sub", [param, em.mul(self.lr, buf)], outputs=[out_param])
        else:
            step_size, eps_hat = self._adam_scalars()
            if self.optimizer == "adamw" and wd:
                decay = em.sub(em.scalar(1.0), em.mul(self.lr, em.scalar(wd)))
                param = em.mul(param, decay)
            self._adam_moments(param, grad, state, out_param, out_state, step_size, eps_hat)

    def _adam_moments(
        self, param: str, grad: str, state: dict[str, str], out_param: str, out_state: dict[str, str],
        step_size: str, eps_hat: str,
    ) -> None:
        """m' = b1*m + s;  v' = b2*v + s*s (v stored scaled);  p -= step_size * m' / (sqrt(v') + eps_hat).

        s = (1-b1)*g comes straight out of the weight-gradient Gemm when its alpha can carry the
        factor, so a weight costs ten elementwise passes: Mul+Add for m, Mul+Mul+Add for v, and
        Sqrt, Add, Div, Mul, Sub for p.
        """
        em, b1, b2 = self.em, self.hp["beta1"], self.hp["beta2"]
        scaled = grad if self._prescale_gemm(grad, 1.0 - b1) else em.mul(grad, em.scalar(1.0 - b1))
        m = em.node("Add", [em.mul(state["m"], em.scalar(b1)), scaled], outputs=[out_state["m"]])
        v = em.node("Add", [em.mul(state["v"], em.scalar(b2)), em.mul(scaled, scaled)], outputs=[out_state["v"]])
        denom = em.add(em.node("Sqrt", [v]), eps_hat)
        em.node("Sub", [param, em.mul(em.div(m, denom), step_size)], outputs=[out_param])


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(onnx.helper.make_attribute(name, float(value)))
