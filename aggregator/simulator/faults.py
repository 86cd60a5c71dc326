"""The fault schedule: who drops out, crashes or straggles in which round and stage, drawn from the seed.

Why a pure function of (seed, round, device, stage): the workers of every shard and the engine
that writes the report must agree on it without talking, and the same seed must inject the same
faults whatever the timing. Each draw is a SHA-256 of its coordinates, so adding devices or rounds
never reshuffles the faults of the others.

Per round a device walks the stages in protocol order (``FAULT_STAGES``); at each it crashes with
``crash[stage]``, else drops out with ``dropout[stage]``; the first fault ends its round. A
dropout goes silent (connection dropped, the broker publishes its last will) and rejoins at the
next round; a crash also loses the agent's memory, which is rebuilt from its state directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from aggregator.simulator.scenario import FAULT_STAGES, Scenario

DROPOUT = "dropout"
CRASH = "crash"


@dataclass(frozen=True)
class Fault:
    stage: str
    kind: str  # DROPOUT or CRASH


def _uniform(seed: int, *coordinates: object) -> float:
    digest = hashlib.sha256("/".join(["fleetlearn-faults", str(seed), *map(str, coordinates)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class FaultSchedule:
    seed: int
    dropout: Mapping[str, float] = field(default_factory=dict)
    crash: Mapping[str, float] = field(default_factory=dict)
    stragglers: float = 0.0
    straggler_delay: float = 0.0
    latency: float = 0.0

    @classmethod
    def of(cls, scenario: Scenario) -> FaultSchedule:
        return cls(scenario.seed, dict(scenario.dropout), dict(scenario.crash), scenario.stragglers,
                   scenario.straggler_delay, scenario.latency)

    def to_json(self) -> dict:
        return {"seed": self.seed, "dropout": dict(self.dropout), "crash": dict(self.crash),
                "stragglers": self.stragglers, "straggler_delay": self.straggler_delay, "latency": self.latency}

    @classmethod
    def from_json(cls, data: Mapping) -> FaultSchedule:
        return cls(int(data["seed"]), dict(data["dropout"]), dict(data["crash"]), float(data["stragglers"]),
                   float(data["straggler_delay"]), float(data["latency"]))

    def fault(self, round_index: int, device: str) -> Fault | None:
        """The first fault of ``device`` in round ``round_index``, or None."""
        for stage in FAULT_STAGES:
            crash, dropout = self.crash.get(stage, 0.0), self.dropout.get(stage, 0.0)
            if not crash and not dropout:
                continue
            u = _uniform(self.seed, round_index, device, stage)
            if u < crash:
                return Fault(stage, CRASH)
            if u < crash + dropout:
                return Fault(stage, DROPOUT)
        return None

    def delay(self, round_index: int, device: str) -> float:
        """Seconds ``device`` waits before it takes in each message this round (latency, plus a straggler's delay)."""
        slow = self.stragglers > 0 and _uniform(self.seed, round_index, device, "straggler") < self.stragglers
        return self.latency + (self.straggler_delay if slow else 0.0)
