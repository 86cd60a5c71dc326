"""Train a compiled bundle and torch.optim side by side from the same weights and compare them.

The acceptance bar of issue 13: after ``steps`` full-batch steps every tensor PyTorch trains
(``requires_grad`` parameters, by name) must match within ``1e-5 + 1e-4 * |torch|`` per element,
and the bundle must train exactly that set of tensors.
"""

from __future__ import annotations

import numpy as np
from torch_training import compiled_steps, torch_steps

from aggregator.compiler import compile_graphs

ATOL, RTOL = 1e-5, 1e-4


def assert_trains_like_torch(torch, net, model, x: np.ndarray, y: np.ndarray, *, optimizer: str, lr: float,
                             trainable=None, steps: int = 5, loss: str = "cross_entropy",
                             zero_gradient: dict | None = None) -> dict[str, np.ndarray]:
    """Compile ``model`` (the export of ``net``), train both, assert parity; returns the bundle's parameters.

    ``zero_gradient`` maps a parameter name to an index of entries whose exact gradient is zero (an
    attention key bias: softmax ignores a shift shared by all keys). Adam divides each side's float
    rounding noise there by its own tiny RMS, so those entries are checked to have a noise-level
    torch gradient instead of being compared.
    """
    compiled = compile_graphs(model, loss=loss, optimizer=optimizer, trainable=trainable)
    m = compiled.manifest
    expected = {name for name, p in net.named_parameters() if p.requires_grad}
    assert {p.name for p in m.trainable} == expected, "the bundle must train exactly what PyTorch trains"

    params, _ = compiled_steps(compiled, x, y, lr, steps)
    torch_steps(torch, net, optimizer, x, y, lr, steps, loss=loss)
    reference = {name: p.detach().numpy() for name, p in net.named_parameters() if p.requires_grad}
    grads = {name: p.grad.numpy() for name, p in net.named_parameters() if p.requires_grad}
    for name, value in params.items():
        error = np.abs(value - reference[name])
        bound = ATOL + RTOL * np.abs(reference[name])
        if zero_gradient and name in zero_gradient:
            index = zero_gradient[name]
            assert np.abs(grads[name][index]).max() <= 1e-6 * np.abs(grads[name]).max(), f"{name}: not a zero gradient"
            error[index] = 0.0
        assert np.all(error <= bound), f"{name}: max excess {np.max(error - bound):.3g} after {steps} {optimizer} steps"
    return params
