"""FedAvg (McMahan et al., 2017) over the decoded mean: x <- x + server_lr * mean update.

The secure sum already weights every contributor equally (each sends one clipped update), so the
mean is the unweighted FedAvg step; ``server_lr`` = 1 is plain FedAvg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.strategy.registry import StrategyError


@dataclass(frozen=True)
class FedAvg:
    server_lr: float = 1.0
    name: str = "fedavg"

    def __post_init__(self) -> None:
        if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            raise StrategyError(f"fedavg server_lr must be a finite number > 0, got {self.server_lr}")

    def initial_state(self, dim: int) -> None:
        return None

    def apply(self, params: np.ndarray, mean_update: np.ndarray, state: None) -> tuple[np.ndarray, None]:
        return (params + np.float32(self.server_lr) * mean_update).astype(np.float32), None
