"""The service's Prometheus metrics: rounds, participants, dropouts per stage, bytes, epsilon.

Why a registry per instance: the service owns one, and tests (or two services in one process) can
make their own without clashing in prometheus-client's global default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

ROUND_OUTCOMES = ("completed", "aborted")
DIRECTIONS = ("in", "out")


class ServiceMetrics:
    """Every metric the service exports; method names say which event they count."""

    def __init__(self, fleet: str) -> None:
        self.registry = CollectorRegistry()
        self.fleet = fleet
        r = self.registry
        self.rounds = Counter("fleetlearn_rounds", "Rounds finished, by outcome", ["fleet", "outcome"], registry=r)
        self.round_seconds = Histogram(
            "fleetlearn_round_duration_seconds", "From the plan's announcement to the published model or the abort",
            ["fleet"], registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.participants = Gauge("fleetlearn_round_participants", "Devices summed in the last completed round",
                                  ["fleet"], registry=r)
        self.participants_total = Counter("fleetlearn_participants", "Device inputs summed, over all rounds",
                                          ["fleet"], registry=r)
        self.dropouts = Counter("fleetlearn_dropouts", "Devices lost, by the stage they were lost in",
                                ["fleet", "stage"], registry=r)
        self.bytes = Counter("fleetlearn_bytes", "Payload bytes through the broker, by direction",
                             ["fleet", "direction"], registry=r)
        self.epsilon = Gauge("fleetlearn_epsilon_spent", "The fleet's epsilon so far (at the configured delta)",
                             ["fleet"], registry=r)
        self.rejections = Counter("fleetlearn_rejections", "Messages refused before or by a handler, by reason",
                                  ["fleet", "reason"], registry=r)
        self.enrolled = Gauge("fleetlearn_enrolled_devices", "Active enrolled devices", ["fleet"], registry=r)
        self.model_version = Gauge("fleetlearn_model_version", "The published global model's version", ["fleet"],
                                   registry=r)
        self.machine = Gauge("fleetlearn_round_value", "The last value of each metric the round machine reports",
                             ["fleet", "name"], registry=r)
        self.accuracy = Gauge("fleetlearn_eval_accuracy", "Held-out accuracy of the published model", ["fleet"],
                              registry=r)

    # -- events --------------------------------------------------------------------------------
    def round_finished(self, outcome: str, seconds: float, participants: int) -> None:
        if outcome not in ROUND_OUTCOMES:
            raise ValueError(f"round outcome must be one of {ROUND_OUTCOMES}, got {outcome!r}")
        self.rounds.labels(self.fleet, outcome).inc()
        self.round_seconds.labels(self.fleet).observe(seconds)
        if outcome == "completed":
            self.participants.labels(self.fleet).set(participants)
            self.participants_total.labels(self.fleet).inc(participants)

    def dropped(self, stage: str, count: int = 1) -> None:
        if count:
            self.dropouts.labels(self.fleet, stage).inc(count)

    def moved(self, direction: str, count: int) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.bytes.labels(self.fleet, direction).inc(count)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(self.fleet, reason).inc()

    def set_epsilon(self, epsilon: float) -> None:
        self.epsilon.labels(self.fleet).set(epsilon)

    def set_enrolled(self, count: int) -> None:
        self.enrolled.labels(self.fleet).set(count)

    def set_model(self, version: int, accuracy: float | None = None) -> None:
        self.model_version.labels(self.fleet).set(version)
        if accuracy is not None:
            self.accuracy.labels(self.fleet).set(accuracy)

    def machine_metric(self, name: str, value: float, labels: dict[str, str]) -> None:
        """A ``Metric`` effect of the round machine; its round label is left out (it would grow without end)."""
        self.machine.labels(self.fleet, name).set(value)

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition format, as the endpoint serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns the port it listens on (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
