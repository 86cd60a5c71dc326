"""The simulation engine: an aggregator service in this process, device workers in others, one broker between.

Why this shape: the aggregator is the production ``AggregatorService`` (the code a deployment
runs), driven round by round from here so the engine can read each round's outcome; the devices
are production ``DeviceAgent``s in worker processes (``device_worker``), one per core. Before each
round the engine tells every worker, over the broker (``control``), to bring its devices back
(dropped-out ones rejoin, crashed ones are re-created from their state directories), waits for
every worker's acknowledgement and for every device's ``online`` status, and only then plans the
round: so the cohort, and with it the whole report, is a function of the seed and not of timing.

What the report counts: dropouts per stage as the aggregator saw them (``dropouts_by_stage``),
crashes among them as the seeded schedule injected them, messages and bytes as the aggregator's
round transport handed them over (first transmissions; the reliable channel's retransmissions
are counted apart, as timing), ε from the fleet accountant, accuracy and loss of the model after
the round on the held-out set.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aggregator.simulator import control
from aggregator.simulator.faults import CRASH, FaultSchedule
from aggregator.simulator.fleet_setup import (
    check_run_id,
    device_id,
    fleet_id,
    service_config,
    shard_devices,
    split_data,
    write_aggregator_state,
)
from aggregator.simulator.progress import Progress, make_progress
from aggregator.simulator.records import RoundOutcome, SimulationReport
from aggregator.simulator.scenario import FAULT_STAGES, Scenario, ScenarioError
from edge_sdk.errors import FleetlearnError

log = logging.getLogger("fleetlearn.simulator")

SETUP_TIMEOUT_S = 900.0  # every device of the fleet connected and acknowledged (1000 on 2 loaded cores)
WORKER_STOP_S = 120.0
ROOT = Path(__file__).resolve().parents[2]


class SimulationError(FleetlearnError):
    """The simulation could not go on: a worker died, the broker vanished, the fleet never came online."""


class CountingTransport:
    """The aggregator's round transport, counting the messages it hands over each way (first transmissions)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent = 0
        self.received = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sent += 1
        self.inner.publish(topic, payload, retain=retain)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        out = self.inner.poll(timeout)
        self.received += len(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _StageEvents(logging.Handler):
    """Turns the service's "entered stage" log records into progress updates (no hook in the service needed)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        stage, round_index = getattr(record, "stage", None), getattr(record, "round", None)
        if stage and round_index is not None and "entered stage" in record.getMessage():
            self.progress.stage(int(round_index), str(stage))


@dataclass
class _Worker:
    shard: int
    number: int
    popen: subprocess.Popen
    log_path: Path
    totals: dict[str, Any] = field(default_factory=dict)

    def tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])


def _bundle(scenario: Scenario, run_dir: Path) -> Path:
    if scenario.bundle is not None:
        return Path(scenario.bundle)
    from aggregator.simulator.models import build_bundle

    return build_bundle(scenario.model, run_dir / "bundle", seed=scenario.seed)


def _start_broker(scenario: Scenario) -> tuple[Any, str, str]:
    """(broker or None, url, description)."""
    if scenario.broker is not None:
        return None, scenario.broker, f"external broker at {scenario.broker}"
    if scenario.shard[1] > 1:
        raise ScenarioError("shard: a fleet spread over machines needs one shared broker; give --broker mqtt://HOST:PORT")
    from aggregator.broker.embedded import EmbeddedBroker

    broker = EmbeddedBroker().start()
    return broker, broker.url, broker.description


class _Control:
    """The engine's end of the control channel, on a connection of its own."""

    def __init__(self, url: str, fleet: str, name: str) -> None:
        from edge_sdk.transport.mqtt import MqttSettings, MqttTransport

        self.fleet = fleet
        self.connection = MqttTransport(MqttSettings(url, name, persistent_session=False))
        self.connection.subscribe(control.ack_pattern(fleet))
        self.acks: dict[str, dict[str, Any]] = {}
        if not self.connection.wait_ready(30.0):
            raise SimulationError(f"the broker at {url} did not accept the simulator's control connection: "
                                  f"{self.connection.last_error}")

    def send(self, message: dict[str, Any]) -> None:
        self.connection.publish(control.control_topic(self.fleet), control.encode(message), retain=True)
        self.connection.flush(10.0)

    def poll(self, timeout: float = 0.0) -> None:
        for topic, payload in self.connection.poll(timeout):
            message = control.decode(payload)
            if message is not None:
                self.acks[topic] = message

    def acknowledged(self, round_index: int) -> int:
        return sum(int(a.get("devices", 0)) for a in self.acks.values() if a.get("round") == round_index)

    def clear(self) -> None:
        self.connection.publish(control.control_topic(self.fleet), b"", retain=True)
        for topic in self.acks:
            self.connection.publish(topic, b"", retain=True)
        self.connection.flush(5.0)
        self.connection.close()


def _start_workers(scenario: Scenario, run_dir: Path, url: str, fleet: str, bundle: Path, data: Path,
                   state_root: Path) -> list[_Worker]:
    mine = shard_devices(scenario)
    count = max(1, min(scenario.workers, len(mine)))
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    workers = []
    for number in range(count):
        spec = {"url": url, "fleet": fleet, "shard": scenario.shard[0], "worker": number, "seed": scenario.seed,
                "delta": scenario.delta, "bundle": str(bundle), "data": str(data), "state_root": str(state_root),
                "devices": mine[number::count], "faults": FaultSchedule.of(scenario).to_json()}
        spec_path = run_dir / f"worker-{scenario.shard[0]}-{number}.json"
        spec_path.write_text(json.dumps(spec))
        log_path = logs / f"worker-{scenario.shard[0]}-{number}.log"
        with open(log_path, "wb") as stderr:
            popen = subprocess.Popen([sys.executable, "-m", "aggregator.simulator.device_worker", str(spec_path)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env)
        workers.append(_Worker(scenario.shard[0], number, popen, log_path))
    return workers


def _check_workers(workers: list[_Worker]) -> None:
    for w in workers:
        if w.popen.poll() is not None:
            raise SimulationError(f"device worker {w.shard}/{w.number} exited with code {w.popen.returncode}: "
                                  f"{w.tail() or 'no output'} (log: {w.log_path})")


def _stop_workers(workers: list[_Worker], control_channel: _Control | None) -> None:
    if control_channel is not None:
        try:
            control_channel.send({"action": control.STOP})
        except FleetlearnError as exc:
            log.warning("could not tell the workers to stop: %s", exc)
    for w in workers:
        try:
            out, _ = w.popen.communicate(timeout=WORKER_STOP_S)
            lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
            if lines:
                w.totals = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            w.popen.kill()
            w.popen.communicate(timeout=10)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def simulate(scenario: Scenario, out_dir: Path = Path("runs"), *, run_id: str | None = None,
             progress: Progress | None = None, stop: Callable[[], bool] = lambda: False) -> SimulationReport:
    """Run ``scenario`` and write ``out_dir/<run id>/report.json`` and its plots; returns the report.

    With ``scenario.shard = (i, N)``, N > 1, every machine runs this with the same scenario and
    ``run_id`` against one broker; shard 0 runs the aggregator and writes the report, the others
    run their devices until shard 0 says stop and return a report without rounds.
    """
    from aggregator.simulator.report import new_run_id, plot_report, write_report

    started = time.monotonic()
    progress = progress if progress is not None else make_progress(None)
    shard, shards = scenario.shard
    if shards > 1 and run_id is None:
        raise ScenarioError("shard: every machine of a sharded run needs the same --run-id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = check_run_id(run_id) if run_id is not None else new_run_id(datetime.now(), scenario.seed, taken=out_dir)
    run_dir = out_dir / (run_id if shard == 0 else f"{run_id}-shard{shard}")
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise ScenarioError(f"run id {run_id!r}: {run_dir} exists already; choose another --run-id") from None
    fleet = fleet_id(run_id)
    bundle = _bundle(scenario, run_dir)
    data = split_data(scenario)
    fleet_dir = run_dir / "fleet"
    fleet_dir.mkdir()
    data_path = fleet_dir / "data.npz"
    data.save(data_path)
    broker, url, description = _start_broker(scenario)
    workers: list[_Worker] = []
    control_channel: _Control | None = None
    service = None
    report = SimulationReport(run_id, scenario.to_json(), description, scenario.delta)
    try:
        if shard == 0:
            write_aggregator_state(fleet_dir / "aggregator", scenario)
        workers = _start_workers(scenario, run_dir, url, fleet, bundle, data_path, fleet_dir)
        control_channel = _Control(url, fleet, f"{fleet}-engine-{shard}")
        if shard == 0:
            service = _Engine(scenario, fleet, fleet_dir / "aggregator", bundle, url, data, control_channel,
                              workers, progress, stop, run_dir / "logs")
            setup = time.monotonic() - started
            service.run(report)
        else:
            setup = time.monotonic() - started
            _serve_shard(control_channel, workers, stop)
    finally:
        if service is not None:
            service.close()
        _stop_workers(workers, control_channel)
        if control_channel is not None and shard == 0:
            control_channel.clear()
        if broker is not None:
            broker.stop()
    worker_rss = [float(w.totals.get("peak_rss_mb", 0.0)) for w in workers]
    report.timings = {"seconds": round(time.monotonic() - started, 3), "setup_seconds": round(setup, 3),
                      "peak_rss_mb_engine": round(_peak_rss_mb(), 1),
                      "peak_rss_mb_workers": round(sum(worker_rss), 1),
                      "peak_rss_mb_total": round(_peak_rss_mb() + sum(worker_rss), 1),
                      "workers": len(workers)}
    if shard == 0:
        paths = [write_report(report, run_dir), *plot_report(report, run_dir)]
        progress.finish(report, paths)
    return report


def _serve_shard(control_channel: _Control, workers: list[_Worker], stop: Callable[[], bool]) -> None:
    """A shard without the aggregator: its workers answer shard 0's control messages until it says stop."""
    while not stop():
        control_channel.poll(0.2)
        if all(w.popen.poll() is not None for w in workers):
            return
        for w in workers:
            if w.popen.poll() not in (None, 0):
                _check_workers(workers)


class _Engine:
    """Shard 0: the aggregator service, round by round, and the outcome of each round."""

    def __init__(self, scenario: Scenario, fleet: str, state_dir: Path, bundle: Path, url: str, data: Any,
                 control_channel: _Control, workers: list[_Worker], progress: Progress,
                 stop: Callable[[], bool], log_dir: Path) -> None:
        from aggregator.service.logs import JsonLineFormatter
        from aggregator.service.service import AggregatorService
        from edge_sdk.training import ModelSession, TrainingState, prepare_dataset

        self.scenario = scenario
        self.control = control_channel
        self.workers = workers
        self.progress = progress
        self.stop = stop
        self.schedule = FaultSchedule.of(scenario)
        self.devices = [device_id(i) for i in range(scenario.devices)]
        config = service_config(scenario, fleet, state_dir, bundle, url)
        self.service = AggregatorService(config, randomness=random.Random(scenario.seed))
        self.counting = CountingTransport(self.service.transport)
        self.service.transport = self.counting
        self.service.endpoint.transport = self.counting
        session = ModelSession.open(bundle, threads=1)
        self.evaluation = TrainingState(session), prepare_dataset(session.manifest, data.test_x, data.test_y)
        self.stage_events = _StageEvents(progress)
        # The service's own JSON lines (stages, dropouts, refusals, abort reasons) beside the workers' logs.
        self.log_file = logging.FileHandler(log_dir / "aggregator.log")
        self.log_file.setLevel(logging.INFO)
        self.log_file.setFormatter(JsonLineFormatter())

    def close(self) -> None:
        self.service.close()

    def run(self, report: SimulationReport) -> None:
        service_log = logging.getLogger("fleetlearn.aggregator")
        level = service_log.level
        service_log.setLevel(min(level or logging.INFO, logging.INFO))
        service_log.addHandler(self.stage_events)
        service_log.addHandler(self.log_file)
        self.progress.start(self.scenario.rounds, f"{self.scenario.devices} devices, {self.scenario.rounds} rounds "
                                                  f"({report.broker})")
        try:
            for _ in range(self.scenario.rounds):
                if self.stop():
                    break
                report.rounds.append(self._round())
                self.progress.round_done(report.rounds[-1])
        finally:
            service_log.removeHandler(self.stage_events)
            service_log.removeHandler(self.log_file)
            self.log_file.close()
            service_log.setLevel(level)

    def _await_fleet(self, round_index: int) -> None:
        """Every worker brought its devices up for ``round_index``, and the aggregator sees all of them online."""
        self.control.send({"action": control.PREPARE, "round": round_index})
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not self.stop():
            self.control.poll(0.0)
            acked = self.control.acknowledged(round_index)
            online = self.service.wait_online(self.devices, 0.05, self.stop)
            if acked == len(self.devices) and online:
                return
            _check_workers(self.workers)
            if time.monotonic() > deadline:
                statuses = self.service.transport.statuses
                missing = [d for d in self.devices if statuses.get(d) != b"online"]
                raise SimulationError(f"round {round_index}: after {SETUP_TIMEOUT_S:.0f} s, workers acknowledged "
                                      f"{acked} of {len(self.devices)} devices and {len(missing)} are not online "
                                      f"(e.g. {', '.join(missing[:3])})")

    def _round(self) -> RoundOutcome:
        from aggregator.service.service import dropouts_by_stage
        from edge_sdk.training import evaluate

        service = self.service
        round_index = service.next_round
        self._await_fleet(round_index)
        self.progress.stage(round_index, "PLAN")
        inner = self.counting.inner
        sent, received = self.counting.sent, self.counting.received
        bytes_in, bytes_out = inner.bytes_in, inner.bytes_out
        resent = inner.channel.counters.get("retransmissions", 0)
        summary = service.run_round(self.stop)
        state = service.endpoint.state
        lost = dropouts_by_stage(state)
        dropouts = {stage: len(lost[stage]) for stage in FAULT_STAGES if stage in lost}
        crashes = {}
        for stage, devices in lost.items():
            crashed = [d for d in devices if (f := self.schedule.fault(round_index, d)) is not None
                       and f.kind == CRASH and f.stage == stage]
            if crashed:
                crashes[stage] = len(crashed)
        training, test = self.evaluation
        training.set_params(service.params)
        result = evaluate(training, test)
        events = service.store.accounting_events()
        epsilon = float(events[-1].event["fleet_epsilon"]) if events else 0.0
        return RoundOutcome(
            round_index=round_index, status="completed" if summary.published else "aborted",
            abort_reason=summary.abort_reason, invited=len(state.invited),
            participants=len(summary.contributors), dropouts=dropouts, crashes=crashes,
            accuracy=None if result.accuracy is None else float(result.accuracy), loss=float(result.loss),
            epsilon=epsilon, messages=self.counting.sent - sent + self.counting.received - received,
            bytes_up=inner.bytes_in - bytes_in, bytes_down=inner.bytes_out - bytes_out,
            seconds=round(summary.seconds, 3),
            retransmissions=inner.channel.counters.get("retransmissions", 0) - resent)
