"""Optimiser updates fused into the train-step graph, following PyTorch's conventions exactly.

Users compare a compiled model against their framework, so each update is the one ``torch.optim``
performs (``lr`` is a graph input, the hyper-parameters are baked constants, ``step`` is 1-based):

* sgd:      g += wd*p;  p -= lr*g                                         (torch.optim.SGD, momentum=0)
* momentum: g += wd*p;  buf = mu*buf + g;  p -= lr*buf                    (torch.optim.SGD, dampening=0,
            nesterov=False; buf starts at zero, which equals torch's buf=g on the first step)
* adam:     g += wd*p;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
            p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)           (torch.optim.Adam, amsgrad=False)
* adamw:    p *= 1 - lr*wd, then the adam update without the L2 term       (torch.optim.AdamW, decoupled)
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def _adam_scalars(self) -> tuple[str, str]:
        """(lr / (1 - b1^t), sqrt(1 - b2^t))"""
        if self._step_scalars is None:
            em = self.em
            t = em.node("Cast", [self.step], to=em.onnx_dtype)
            one = em.scalar(1.0)
            bc1 = em.sub(one, em.node("Pow", [em.scalar(self.hp["beta1"]), t]))
            bc2 = em.sub(one, em.node("Pow", [em.scalar(self.hp["beta2"]), t]))
            self._step_scalars = (em.div(self.lr, bc1, hint="step_size"), em.node("Sqrt", [bc2]))
        return self._step_scalars

    def update(self, param: str, grad: str, state: dict[str, str], out_param: str, out_state: dict[str, str]) -> None:
        em, hp = self.em, self.hp
        wd = hp["weight_decay"]
        if wd and self.optimizer != "adamw":
            grad = em.add(grad, em.mul(param, em.scalar(wd)))
        if self.optimizer == "sgd":
            em.node("Sub", [param, em.mul(self.lr, grad)], outputs=[out_param])
        elif self.optimizer == "momentum":
            buf = em.node("Add", [em.mul(state["velocity"], em.scalar(hp["momentum"])), grad],
                          outputs=[out_state["velocity"]])
            em.node("Sub", [param, em.mul(self.lr, buf)], outputs=[out_param])
        else:
            step_size, bc2_sqrt = self._adam_scalars()
            if self.optimizer == "adamw" and wd:
                decay = em.sub(em.scalar(1.0), em.mul(self.lr, em.scalar(wd)))
                param = em.mul(param, decay)
            b1, b2 = hp["beta1"], hp["beta2"]
            m = em.node("Add", [em.mul(state["m"], em.scalar(b1)), em.mul(grad, em.scalar(1.0 - b1))],
                        outputs=[out_state["m"]])
            v = em.node("Add", [em.mul(state["v"], em.scalar(b2)), em.mul(em.mul(grad, grad), em.scalar(1.0 - b2))],
                        outputs=[out_state["v"]])
            denom = em.add(em.div(em.node("Sqrt", [v]), bc2_sqrt), em.scalar(hp["eps"]))
            em.node("Sub", [param, em.mul(em.div(m, denom), step_size)], outputs=[out_param])
