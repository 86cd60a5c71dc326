"""FedAvg and FedAdam against hand computations, and the registry by name."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategy import StrategyError, make_strategy


def test_fedavg_adds_the_server_lr_times_the_mean_update():
    strategy = make_strategy("fedavg", server_lr=0.5)
    new, state = strategy.apply(np.array([1.0, -2.0], np.float32), np.array([0.4, 0.2], np.float32), None)
    assert new.tolist() == pytest.approx([1.2, -1.9]) and state is None


def test_fedadam_two_steps_by_hand():
    strategy = make_strategy("fedadam", server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.01)
    x = np.array([0.0], np.float32)
    state = strategy.initial_state(1)
    x, state = strategy.apply(x, np.array([2.0], np.float32), state)
    # m = 0.5*2 = 1, v = 0.25*4 = 1, x = 0 + 0.1 * 1 / (1 + 0.01)
    assert state.m.tolist() == [1.0] and state.v.tolist() == [1.0] and x[0] == pytest.approx(0.1 / 1.01)
    x, state = strategy.apply(x, np.array([-2.0], np.float32), state)
    # m = 0.5*1 + 0.5*(-2) = -0.5, v = 0.75*1 + 0.25*4 = 1.75
    assert state.m[0] == pytest.approx(-0.5) and state.v[0] == pytest.approx(1.75)
    assert x[0] == pytest.approx(0.1 / 1.01 - 0.1 * 0.5 / (np.sqrt(1.75) + 0.01), rel=1e-6)


def test_unknown_names_and_bad_options_are_refused():
    with pytest.raises(StrategyError, match="fedavg"):
        make_strategy("fedprox")
    with pytest.raises(StrategyError, match="server_lr"):
        make_strategy("fedavg", server_lr=0.0)
    with pytest.raises(StrategyError):
        make_strategy("fedadam", momentum=0.9)
