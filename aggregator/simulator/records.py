"""What a simulation run reports: one ``RoundOutcome`` per round and the ``SimulationReport`` around them.

Why a module of its own: the engine produces these, and the report writer, the plots, the progress
display, the tests and the benchmark consume them; they agree on nothing else. Fields named in
``TIMING_FIELDS`` vary from run to run; everything else is a function of the scenario and its seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_FORMAT = 1
TIMING_FIELDS = frozenset({"seconds", "started_at", "timings", "retransmissions", "wall_bytes"})


@dataclass(frozen=True)
class RoundOutcome:
    """How one round of the simulation ended, as the aggregator and the injected faults saw it."""

    round_index: int
    status: str  # "completed" or "aborted"
    abort_reason: str | None
    invited: int
    participants: int  # devices whose masked update is in the sum
    dropouts: Mapping[str, int]  # stage name -> devices lost there (injected or not)
    crashes: Mapping[str, int]  # stage name -> devices whose process was "killed" there by the injector
    accuracy: float | None  # held-out accuracy of the model after this round (None if not evaluated)
    loss: float | None
    epsilon: float  # the fleet's cumulative epsilon after this round, at the scenario's delta
    messages: int  # protocol messages through the aggregator's connection, both ways, first transmissions
    bytes_up: int  # bytes devices -> aggregator (first transmissions)
    bytes_down: int  # bytes aggregator -> devices (first transmissions)
    seconds: float  # timing: from plan to published model or abort
    retransmissions: int = 0  # timing-dependent: resent messages

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"dropouts": dict(self.dropouts), "crashes": dict(self.crashes)}


@dataclass
class SimulationReport:
    """A whole run: its configuration, the broker, every round, and the final figures."""

    run_id: str
    config: Mapping[str, Any]  # the scenario, JSON-ready (``Scenario.to_json``)
    broker: str  # what carried the messages, e.g. "embedded amqtt 0.12.1 (MQTT 3.1.1) on 127.0.0.1:41234"
    delta: float
    rounds: list[RoundOutcome] = field(default_factory=list)
    timings: Mapping[str, float] = field(default_factory=dict)  # total seconds, set-up, peak RSS (MB) ...

    @property
    def final_accuracy(self) -> float | None:
        scored = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return scored[-1] if scored else None

    @property
    def final_epsilon(self) -> float:
        return self.rounds[-1].epsilon if self.rounds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "run_id": self.run_id, "config": dict(self.config), "broker": self.broker,
                "delta": self.delta, "final_accuracy": self.final_accuracy, "final_epsilon": self.final_epsilon,
                "rounds": [r.to_json() for r in self.rounds], "timings": dict(self.timings)}


def without_timings(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` (as ``to_json`` gives it) less every run-dependent field: equal for equal seeds."""
    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    out = strip(report)
    out.pop("run_id", None)
    out.get("config", {}).pop("broker", None)  # the same scenario on another broker is the same scenario
    return out
