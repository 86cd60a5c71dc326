"""A device worker process: many production ``DeviceAgent``s, one MQTT connection each, all on one ``MqttLoop``.

Why this shape: paho's ``loop_start()`` thread per client does not scale (1000 clients, 1000
threads delivered a third of their messages here), and one Python process is one core; so the
engine starts one worker per core, each driving its slice of the fleet from one selector loop.
All agents of a worker share one onnxruntime ``ModelSession`` and one ``TrainingState`` (the train
step is stateless and training runs to completion inside one call), so memory grows with the
number of connections, not of models. Each agent keeps its own state directory (identity, ledger,
agent.json) and its own data.

Faults come from the seeded schedule (``faults``), applied where a real device would fail: just
before the device sends the message of its fault stage, its connection is dropped without
DISCONNECT (the broker publishes the ``offline`` last will). A dropped-out device keeps its agent
and rejoins over a new connection when the engine prepares the next round; a crashed one loses its
agent (as a SIGKILL would) and is re-created from its state directory then. Stragglers and latency
hold each incoming message for the round's delay before the agent sees it.

    python -m aggregator.simulator.device_worker SPEC.json

SPEC.json (written by the engine): broker url, fleet, shard and worker numbers, the device
indices, the bundle, the data file, the state root and the fault schedule. The worker reports
through the broker (``control``) and prints one JSON line of totals on stdout when stopped.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # many processes share two cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from aggregator.simulator import control  # noqa: E402
from aggregator.simulator.faults import CRASH, Fault, FaultSchedule  # noqa: E402
from aggregator.simulator.fleet_setup import (  # noqa: E402
    aggregator_identity,
    create_device_state,
    device_id,
    device_identity,
    noise_seed,
)
from edge_sdk.device.agent import AgentSettings, DeviceAgent  # noqa: E402
from edge_sdk.device.eligibility import DevicePolicy  # noqa: E402
from edge_sdk.errors import FleetlearnError  # noqa: E402
from edge_sdk.transport.event_loop import MqttLoop  # noqa: E402
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport  # noqa: E402
from edge_sdk.wire.envelope import MessageKind, decode_envelope  # noqa: E402
from edge_sdk.wire.errors import WireFormatError  # noqa: E402
from edge_sdk.wire.topics import Channel, parse_topic, status_topic  # noqa: E402

log = logging.getLogger("fleetlearn.simulator.worker")

# The message whose sending a fault at each stage prevents (FAULT_STAGES, in protocol order).
STAGE_OF_KIND = {MessageKind.ADVERTISE_KEYS: "TRAIN", MessageKind.SHARE_KEYS: "SHARE_KEYS",
                 MessageKind.MASKED_INPUT: "MASKED_INPUT", MessageKind.CONSISTENCY_CHECK: "CONSISTENCY_CHECK",
                 MessageKind.UNMASK_SHARES: "UNMASK"}
NO_RULES = DevicePolicy(require_charging=False, min_battery_percent=None, max_cpu_celsius=None,
                        max_load_per_cpu=None)  # a simulated device is always plugged in, cool and idle
PASS_S = 0.05
# Why both: at 1000 devices on 2 loaded cores, answering one UnmaskRequest (a quorum of 526 signatures to
# verify) takes tens of ms per device, so one pass over a worker's 500 devices took longer than the broker's
# keepalive grace (1.5 x 60 s): it disconnected them all, published their last wills, and the aggregator
# closed UNMASK for devices "gone offline". So the loop serves every socket between devices at least every
# IO_EVERY_S, and a simulated device (which shares its core with hundreds) pings less often. Faults are not
# affected: a dropout closes its socket, which the broker notices at once whatever the keepalive.
IO_EVERY_S = 0.5
KEEPALIVE_S = 300


class LaggedInput:
    """A connection whose incoming messages reach the agent ``delay`` seconds after they arrived."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        self.delay = 0.0
        self._held: deque[tuple[float, tuple[str, bytes]]] = deque()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        return self.inner.publish(topic, payload, retain=retain)

    def left(self, mid: int) -> bool:
        return self.inner.left(mid)

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def close(self) -> None:
        self.inner.close()

    def _take_in(self) -> None:
        if self.inner.has_input:
            due = time.monotonic() + self.delay
            self._held.extend((due, m) for m in self.inner.poll(0.0))

    @property
    def has_input(self) -> bool:
        if self.delay <= 0 and not self._held:
            return self.inner.has_input
        self._take_in()
        return bool(self._held) and self._held[0][0] <= time.monotonic()

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        if self.delay <= 0 and not self._held:
            return self.inner.poll(timeout)
        self._held.extend((time.monotonic() + self.delay, m) for m in self.inner.poll(0.0))
        now, out = time.monotonic(), []
        while self._held and self._held[0][0] <= now:
            out.append(self._held.popleft()[1])
        return out


class FaultGate:
    """The agent's outgoing side: the message of a device's fault stage is never sent, the device goes silent."""

    def __init__(self, inner: Any, device: SimDevice, worker: FleetWorker) -> None:
        self.inner = inner
        self.device = device
        self.worker = worker

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        device = self.device
        if device.pending is not None:
            return  # silent already: nothing after the fault leaves
        try:
            parsed = parse_topic(topic)
        except WireFormatError:
            parsed = None
        stage = STAGE_OF_KIND.get(parsed.kind) if parsed is not None and parsed.channel is Channel.UP else None
        if stage is not None:
            round_index = decode_envelope(payload, device.agent.limits).round_index
            fault = self.worker.schedule.fault(round_index, device.name)
            if round_index == self.worker.current_round and fault is not None and fault.stage == stage:
                device.pending = fault
                return
        self.inner.publish(topic, payload, retain=retain)

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def poll(self, timeout: float) -> list[tuple[str, bytes]]:
        return self.inner.poll(timeout)

    def close(self) -> None:
        self.inner.close()


@dataclass(eq=False)
class SimDevice:
    index: int
    name: str
    state_dir: Path
    dataset: Any
    agent: DeviceAgent | None = None
    connection: LaggedInput | None = None
    down: str | None = None  # None (up), "dropout" or "crash": what it is waiting to recover from
    pending: Fault | None = None  # a fault the gate caught during the last step


class FleetWorker:
    def __init__(self, spec: dict[str, Any]) -> None:
        from edge_sdk.training import ModelSession, TrainingState, prepare_dataset

        self.spec = spec
        self.url = spec["url"]
        self.fleet = spec["fleet"]
        self.shard, self.number = int(spec["shard"]), int(spec["worker"])
        self.schedule = FaultSchedule.from_json(spec["faults"])
        self.current_round = 0
        self.loop = MqttLoop()
        self.session = ModelSession.open(spec["bundle"], threads=1)
        self.training = TrainingState(self.session)
        data = np.load(spec["data"], allow_pickle=False)
        x, y, order, offsets = data["x"], data["y"], data["order"], data["offsets"]
        seed = int(spec["seed"])
        aggregator_public = aggregator_identity(seed).public
        root = Path(spec["state_root"])
        self.devices: list[SimDevice] = []
        for index in spec["devices"]:
            name = device_id(index)
            directory = root / name
            if not directory.exists():
                create_device_state(directory, name, device_identity(seed, index), self.fleet, aggregator_public,
                                    float(spec["delta"]))
            rows = order[offsets[index]:offsets[index + 1]]
            self.devices.append(SimDevice(index, name, directory, prepare_dataset(self.session.manifest, x[rows],
                                                                                  y[rows])))
        self.control = MqttTransport(MqttSettings(self.url, f"{self.fleet}-worker-{self.shard}-{self.number}",
                                                  persistent_session=False, keepalive_s=KEEPALIVE_S), self.loop)
        self.control.subscribe(control.control_topic(self.fleet))
        self.preparing: int | None = None
        self.stopped = False
        self.faults = {"dropout": 0, "crash": 0}
        for device in self.devices:
            self._bring_up(device)

    # -- devices ---------------------------------------------------------------------------------

    def _bring_up(self, device: SimDevice) -> None:
        """Connect ``device`` (re-creating its agent from its state directory if it has none)."""
        mqtt = MqttTransport(MqttSettings(self.url, device.name, status_topic=status_topic(self.fleet, device.name),
                                          keepalive_s=KEEPALIVE_S), self.loop)
        device.connection = LaggedInput(mqtt)
        if device.agent is None:
            settings = AgentSettings(state_dir=device.state_dir, broker_url=self.url, bundle=Path(self.spec["bundle"]),
                                     data=device.state_dir / "in-memory", policy=NO_RULES)
            device.agent = DeviceAgent(settings, device.connection, session=self.session, training=self.training,
                                       dataset=device.dataset, noise_seed=noise_seed(int(self.spec["seed"]),
                                                                                     device.index))
        else:
            device.agent.reconnect(device.connection)
        device.agent.endpoint.transport = FaultGate(device.agent.transport, device, self)
        device.down = None
        device.pending = None

    def _fail(self, device: SimDevice) -> None:
        """Apply the fault the gate caught: drop the connection without DISCONNECT; a crash also loses the agent."""
        fault, device.pending = device.pending, None
        device.connection.inner.drop()
        device.down = fault.kind
        self.faults[fault.kind] += 1
        log.info("%s: %s at %s in round %d", device.name, fault.kind, fault.stage, self.current_round)
        if fault.kind == CRASH:
            device.agent.ledger.close()  # the file descriptor only: every write was fsynced, as after a SIGKILL
            device.agent = None

    def _prepare(self, round_index: int) -> None:
        self.current_round = round_index
        for device in self.devices:
            if device.down is not None:
                self._bring_up(device)
            device.connection.delay = self.schedule.delay(round_index, device.name)
        self.preparing = round_index

    # -- the loop --------------------------------------------------------------------------------

    def _take_control(self) -> None:
        for _topic, payload in self.control.poll(0.0):
            message = control.decode(payload)
            if message is None:
                continue
            if message.get("action") == control.STOP:
                self.stopped = True
            elif message.get("action") == control.PREPARE and int(message["round"]) > self.current_round:
                self._prepare(int(message["round"]))

    def _acknowledge(self) -> None:
        if self.preparing is None or not all(d.connection.inner.ready for d in self.devices):
            return
        self.control.publish(control.ack_topic(self.fleet, self.shard, self.number),
                             control.encode({"round": self.preparing, "devices": len(self.devices)}), retain=True)
        self.preparing = None

    def run(self, stop: list[int]) -> dict[str, Any]:
        parent = os.getppid()
        next_check = 0.0
        while not self.stopped and not stop:
            self.loop.run_once(PASS_S)
            self._take_control()
            now = time.monotonic()
            io_due = now + IO_EVERY_S
            for device in self.devices:
                agent = device.agent
                if device.down is not None or agent.idle(now):
                    continue
                try:
                    agent.step(0.0)
                except FleetlearnError as exc:
                    log.warning("%s: %s", device.name, exc)
                if device.pending is not None:
                    self._fail(device)
                if time.monotonic() >= io_due:  # a long pass: keep every connection alive and flowing
                    self.loop.run_once(0.0)
                    io_due = time.monotonic() + IO_EVERY_S
            self._acknowledge()
            if now >= next_check:
                next_check = now + 1.0
                if os.getppid() != parent:  # the engine died: do not linger as an orphan
                    break
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        counters: dict[str, int] = {}
        for device in self.devices:
            if device.agent is None:
                continue
            for key, value in device.agent.transport.channel.counters.items():
                counters[key] = counters.get(key, 0) + value
            if device.down is None:
                device.agent.close()
            else:
                device.agent.ledger.close()
        totals = {"done": True, "shard": self.shard, "worker": self.number, "devices": len(self.devices),
                  "faults": self.faults, "counters": counters,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        self.control.publish(control.ack_topic(self.fleet, self.shard, self.number), control.encode(totals),
                             retain=True)
        self.control.close()
        self.loop.close()
        return totals


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("FLEETLEARN_WORKER_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(argv) != 1:
        sys.stderr.write("usage: python -m aggregator.simulator.device_worker SPEC.json\n")
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    worker = FleetWorker(spec)
    totals = worker.run(stop)
    sys.stdout.write(json.dumps(totals) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
