"""Train a compiled bundle and torch.optim side by side from the same weights and compare them.

The acceptance bar of issue 13: after ``steps`` full-batch steps every tensor PyTorch trains
(``requires_grad`` parameters, by name) must match within ``1e-5 + 1e-4 * |torch|`` per element,
and the bundle must train exactly that set of tensors.
"""

from __future__ import annotations

import numpy as np
from compiler_harness import GraphRunner, train_step, zero_state

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

    runner = GraphRunner(compiled.train_step)
    params, state = dict(compiled.initial_params), zero_state(compiled)
    for step in range(1, steps + 1):
        out = train_step(compiled, runner, params, x, y, lr=lr, step=step, state=state)
        params = {p.name: out[p.output] for p in m.trainable}
        state = {s.input: out[s.output] for s in m.state}

    trained = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=lr) if optimizer == "sgd" else torch.optim.Adam(trained, lr=lr, eps=1e-8)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        output = net(tx)
        value = (torch.nn.functional.cross_entropy(output, ty) if loss == "cross_entropy"
                 else torch.nn.functional.mse_loss(output, ty))
        value.backward()
        opt.step()
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
