"""The strategy interface and the registry that finds a strategy by its configured name.

Why pure ``apply(params, mean_update, state) -> (params, state)``: the strategy runs inside the
pure HostRound, and its state (FedAdam's moments) must persist with the round state between rounds,
so it is a value the round carries, not something hidden in an object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edge_sdk.errors import ConfigError


class StrategyError(ConfigError):
    """An unknown strategy name or an invalid strategy option."""


class Strategy(Protocol):
    """A server optimiser over flat float32 parameter vectors."""

    name: str

    def initial_state(self, dim: int) -> Any: ...

    def apply(self, params: np.ndarray, mean_update: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


def _fedavg(**options: Any) -> Strategy:
    from aggregator.strategy.fedavg import FedAvg

    return FedAvg(**options)


def _fedadam(**options: Any) -> Strategy:
    from aggregator.strategy.fedadam import FedAdam

    return FedAdam(**options)


STRATEGIES: dict[str, Callable[..., Strategy]] = {"fedavg": _fedavg, "fedadam": _fedadam}


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name`` with its options (e.g. ``server_lr``)."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"strategy {name!r} is unknown; choose one of {sorted(STRATEGIES)}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise StrategyError(f"strategy {name!r}: {exc}") from None
