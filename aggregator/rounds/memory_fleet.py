"""A whole fleet in one process: one HostRound and many DeviceRounds, one pump, the memory transport.

Why: the example, the tests and the benchmarks run real rounds (every message enveloped, routed,
sender-checked and decoded, every effect run by the pump) without a broker, on a virtual clock,
with the memory transport's fault hooks for drops, duplicates, reordering and tampering. Devices
keep their ``DeviceMemory`` and last verified model from round to round, as the device agent does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.rounds.host_round import HostConfig, HostRound, HostState, start_host_round
from edge_sdk.protocol.device_round import DeviceConfig, DeviceRound, DeviceState, start_device
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.protocol.pump import Endpoint, Pump
from edge_sdk.protocol.routing import AGGREGATOR_ID, Router, limits_for_plan
from edge_sdk.transport.memory import Fault, MemoryBroker, VirtualClock
from edge_sdk.wire.limits import WireLimits

Handlers = Mapping[type, Callable[[Any], Any]]


@dataclass
class RoundOutcome:
    """How one round ended on every side."""

    host: HostState
    devices: dict[str, DeviceState]

    @property
    def published(self) -> bool:
        return self.host.new_model is not None


class MemoryFleet:
    """The aggregator and its devices on one ``MemoryBroker`` and one ``VirtualClock``.

    ``limits`` bound what arrives before the first plan; each round then uses its plan's.
    """

    def __init__(self, host_config: HostConfig, host_handlers: Handlers,
                 devices: Mapping[str, tuple[DeviceConfig, Handlers]], limits: WireLimits,
                 *, broker: MemoryBroker | None = None, clock: VirtualClock | None = None) -> None:
        self.broker = broker or MemoryBroker()
        self.clock = clock or VirtualClock()
        self.pump = Pump(self.clock)
        self.host_config = host_config
        self.host = Endpoint(AGGREGATOR_ID, HostRound(), None, self.broker.connect(AGGREGATOR_ID),
                             Router(host_config.fleet, AGGREGATOR_ID, limits), host_handlers)
        self.pump.add(self.host)
        self.devices: dict[str, Endpoint] = {}
        for device_id, (config, handlers) in devices.items():
            endpoint = Endpoint(device_id, DeviceRound(), start_device(config), self.broker.connect(device_id),
                                Router(config.fleet, device_id, limits), handlers)
            self.devices[device_id] = endpoint
            self.pump.add(endpoint)

    def run_round(self, plan: RoundPlan, params: Mapping[str, np.ndarray], strategy_state: Any = None,
                  faults: list[Fault] | None = None, max_steps: int = 100_000) -> RoundOutcome:
        """Open ``plan`` (unsigned, from ``draft_plan``) and run until the host and every device have finished."""
        for endpoint in self.devices.values():  # a new round: keep what survives rounds
            old: DeviceState = endpoint.state
            endpoint.state = start_device(old.config, old.memory, old.model)
        self.broker.faults = list(faults or [])
        limits = limits_for_plan(plan, len(self.host_config.enrolled))
        for endpoint in self.pump.endpoints:
            endpoint.router.limits = limits
        self.pump.settle(self.host, start_host_round(self.host_config, plan, params, self.clock.now(), strategy_state))

        def finished() -> bool:
            return HostRound.finished(self.host.state) and all(
                DeviceRound.finished(e.state) for e in self.devices.values())

        self.pump.run(finished, max_steps=max_steps)
        # Hand the published model to the devices while this round's faults still apply, then lift them.
        while sum(self.pump.deliver(e) for e in self.pump.endpoints):
            pass
        self.broker.faults = []
        return RoundOutcome(self.host.state, {d: e.state for d, e in self.devices.items()})
