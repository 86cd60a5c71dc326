"""The fleet simulator: an aggregator service and many simulated devices through a real MQTT broker.

``fleetlearn simulate`` (``aggregator.commands.simulate``) is the shell; ``simulate(scenario, ...)``
is the Python entry point. Parts: ``scenario`` (what to simulate), ``partition`` (how the data is
split), ``records`` (what a run reports), ``report`` (report.json and plots), ``progress`` (what the
terminal shows), and the engine that runs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SimulationError", "simulate"]


def __getattr__(name: str) -> Any:
    # Lazily, so a device worker importing one submodule does not load the engine and the service.
    if name in __all__:
        from aggregator.simulator import run

        return getattr(run, name)
    raise AttributeError(f"module 'aggregator.simulator' has no attribute {name!r}")
