"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

The mean update Δ is the pseudo-gradient's negative: m <- β1 m + (1 - β1) Δ, v <- β2 v + (1 - β2) Δ²,
x <- x + η m / (√v + τ). No bias correction, as in the paper; τ (not Adam's tiny ε) controls the
adaptivity and is 1e-3 by default there. The moments are the round-to-round state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.strategy.registry import StrategyError


@dataclass(frozen=True)
class FedAdamState:
    m: np.ndarray
    v: np.ndarray


@dataclass(frozen=True)
class FedAdam:
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"

    def __post_init__(self) -> None:
        for option in ("server_lr", "tau"):
            value = getattr(self, option)
            if not (value > 0 and math.isfinite(value)):
                raise StrategyError(f"fedadam {option} must be a finite number > 0, got {value}")
        for option in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, option) < 1.0:
                raise StrategyError(f"fedadam {option} must be in [0, 1), got {getattr(self, option)}")

    def initial_state(self, dim: int) -> FedAdamState:
        return FedAdamState(np.zeros(dim, dtype=np.float64), np.zeros(dim, dtype=np.float64))

    def apply(self, params: np.ndarray, mean_update: np.ndarray, state: FedAdamState
              ) -> tuple[np.ndarray, FedAdamState]:
        delta = mean_update.astype(np.float64)
        m = self.beta1 * state.m + (1.0 - self.beta1) * delta
        v = self.beta2 * state.v + (1.0 - self.beta2) * delta * delta
        new = params.astype(np.float64) + self.server_lr * m / (np.sqrt(v) + self.tau)
        return new.astype(np.float32), FedAdamState(m, v)
