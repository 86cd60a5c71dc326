"""The one pump: it drives round machines over transports, and it alone decides the order of side effects.

For every step a machine returns, the pump runs the effects first, each through its handler, and
feeds each result back to the machine (``resolve``) before it publishes any send of that step; the
sends ``resolve`` returns join the same step. Then it ticks the machine with the clock. So a send
that depends on an effect (the MaskedInput carries the ledger head that ``RecordParticipation``
returns after the fsync) can never leave before the effect is done. The aggregator service, the
device agent, the simulator and the tests all use this pump; only the transport and the clock differ.

Received bytes go through the endpoint's ``Router`` (envelope, fleet, kind and sender checks) before
any machine handler sees them; refused bytes are counted and logged, never handed on.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.effects import EffectFailed
from edge_sdk.protocol.routing import Router, Send
from edge_sdk.transport.base import Transport

log = logging.getLogger(__name__)


class Step(NamedTuple):
    """What a machine returns: its next state, the messages to send and the effects to run."""

    state: Any
    sends: tuple[Send, ...] = ()
    effects: tuple[Any, ...] = ()


class RoundMachine(Protocol):
    """A pure round machine as the pump drives it (``DeviceRound``, ``HostRound``)."""

    def handle(self, state: Any, message: Any, now: float) -> Step: ...

    def resolve(self, state: Any, effect: Any, result: Any, now: float) -> Step: ...

    def tick(self, state: Any, now: float) -> Step: ...

    def deadline(self, state: Any) -> float | None: ...

    def finished(self, state: Any) -> bool: ...


class Clock(Protocol):
    """``now`` in seconds; ``wait`` lets time pass (a virtual clock jumps, a real one sleeps)."""

    def now(self) -> float: ...

    def wait(self, seconds: float) -> None: ...


class UnhandledEffectError(FleetlearnError, LookupError):
    """A machine asked for an effect that this endpoint has no handler for."""


class PumpStalledError(FleetlearnError, RuntimeError):
    """The machines kept exchanging messages past the step limit: a livelock, or a limit set too low."""


@dataclass
class Endpoint:
    """One machine with its state, its transport, its router and its effect handlers."""

    name: str
    machine: RoundMachine
    state: Any
    transport: Transport
    router: Router
    handlers: Mapping[type, Callable[[Any], Any]]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (topic, why) of bytes the router refused
    subscribed: bool = False

    def subscribe(self) -> None:
        if not self.subscribed:
            for pattern in self.router.subscriptions():
                self.transport.subscribe(pattern)
            self.subscribed = True


class Pump:
    """Runs endpoints until a condition holds; see the module docstring for the order it guarantees."""

    def __init__(self, clock: Clock, endpoints: list[Endpoint] | None = None) -> None:
        self.clock = clock
        self.published = 0  # messages published so far: a tick that sends means time must not jump yet
        self.endpoints: list[Endpoint] = []
        for endpoint in endpoints or []:
            self.add(endpoint)

    def add(self, endpoint: Endpoint, first: Step | None = None) -> None:
        """Subscribe ``endpoint`` and settle its opening step (a start that already sends)."""
        endpoint.subscribe()
        self.endpoints.append(endpoint)
        if first is not None:
            self.settle(endpoint, first)

    def settle(self, endpoint: Endpoint, step: Step) -> None:
        """Run ``step``'s effects (feeding results back, in order), then publish every send."""
        endpoint.state = step.state
        sends: list[Send] = list(step.sends)
        pending = deque(step.effects)
        while pending:
            effect = pending.popleft()
            handler = endpoint.handlers.get(type(effect))
            if handler is None:
                raise UnhandledEffectError(f"endpoint {endpoint.name!r} has no handler for {type(effect).__name__}")
            try:
                result = handler(effect)
            except FleetlearnError as exc:
                log.info("%s: %s failed: %s", endpoint.name, type(effect).__name__, exc)
                result = EffectFailed(exc)
            follow = endpoint.machine.resolve(endpoint.state, effect, result, self.clock.now())
            endpoint.state = follow.state
            pending.extend(follow.effects)
            sends.extend(follow.sends)
        for send in sends:
            topic, payload, retain = endpoint.router.outgoing(send)
            endpoint.transport.publish(topic, payload, retain=retain)
            self.published += 1

    def deliver(self, endpoint: Endpoint, timeout: float = 0.0) -> int:
        """Hand every polled message to the machine; returns how many arrived."""
        received = endpoint.transport.poll(timeout)
        for topic, data in received:
            try:
                message = endpoint.router.incoming(topic, data)
            except FleetlearnError as exc:
                log.debug("%s refused bytes on %s: %s", endpoint.name, topic, exc)
                endpoint.refused.append((topic, str(exc)))
                continue
            self.settle(endpoint, endpoint.machine.handle(endpoint.state, message.message, self.clock.now()))
        return len(received)

    def tick(self) -> None:
        for endpoint in self.endpoints:
            self.settle(endpoint, endpoint.machine.tick(endpoint.state, self.clock.now()))

    def next_deadline(self) -> float | None:
        deadlines = [d for e in self.endpoints if not e.machine.finished(e.state)
                     if (d := e.machine.deadline(e.state)) is not None]
        return min(deadlines) if deadlines else None

    def run(self, until: Callable[[], bool], max_steps: int = 1_000_000, poll_timeout: float = 0.0,
            max_wait: float = math.inf) -> int:
        """Deliver, tick, and when nothing moves let time pass to the next deadline; returns steps taken.

        ``max_wait`` bounds one idle wait (a real clock must keep polling while it waits).
        """
        for steps in range(max_steps):
            if until():
                return steps
            published = self.published
            moved = sum(self.deliver(e, poll_timeout) for e in self.endpoints)
            self.tick()
            if moved or self.published != published or until():
                continue
            deadline = self.next_deadline()
            if deadline is None:
                return steps  # nobody waits for anything: the run is over
            self.clock.wait(min(max_wait, max(0.0, deadline - self.clock.now())))
        raise PumpStalledError(f"the pump did not settle within {max_steps} steps")
