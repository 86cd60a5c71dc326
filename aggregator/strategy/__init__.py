"""Server strategies: how the decoded mean update moves the global model (FedAvg, FedAdam), by name."""

from aggregator.strategy.registry import STRATEGIES, Strategy, StrategyError, make_strategy

__all__ = ["STRATEGIES", "Strategy", "StrategyError", "make_strategy"]
