"""Five full-batch steps in fleetlearn and in torch.optim from the same weights, and the acceptance bound
``|fleetlearn - torch| <= 1e-5 + 1e-4 * |torch|`` per element."""

from __future__ import annotations

import numpy as np
from compiler_harness import GraphRunner, train_step

from aggregator.compiler import CompiledGraphs


def torch_optimizer(torch, net, optimizer: str, lr: float):
    if optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr)
    return torch.optim.Adam(net.parameters(), lr=lr)


def torch_steps(torch, net, optimizer: str, x: np.ndarray, y: np.ndarray, lr: float, steps: int,
                loss: str = "cross_entropy") -> list[float]:
    """Train ``net`` in place on one batch; returns the loss before each step."""
    opt = torch_optimizer(torch, net, optimizer, lr)
    criterion = torch.nn.functional.cross_entropy if loss == "cross_entropy" else torch.nn.functional.mse_loss
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        value = criterion(net(torch.from_numpy(x)), torch.from_numpy(y))
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


def compiled_steps(compiled: CompiledGraphs, x: np.ndarray, y: np.ndarray, lr: float,
                   steps: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """The train-step graph run ``steps`` times, feeding each step's outputs back in."""
    m = compiled.manifest
    runner = GraphRunner(compiled.train_step)
    params = dict(compiled.initial_params)
    state = {s.input: np.zeros(s.shape, dtype=s.dtype) for s in m.state}
    losses = []
    for step in range(1, steps + 1):
        out = train_step(compiled, runner, params, x, y, lr=lr, step=step, state=state)
        params = {p.name: out[p.output] for p in m.trainable}
        state = {s.input: out[s.output] for s in m.state}
        losses.append(float(out["loss"]))
    return params, losses


def assert_matches_torch(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, value in expected.items():
        error = np.abs(actual[name] - value)
        bound = 1e-5 + 1e-4 * np.abs(value)
        assert (error <= bound).all(), f"{name}: max error {error.max()} exceeds 1e-5 + 1e-4*|torch|"
