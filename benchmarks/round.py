"""Round latency and aggregator CPU through one Mosquitto: the real service against many simulated devices.

For n devices and a model of d parameters: `fleetlearn aggregator serve` runs as its own process
(active-secure SecAgg+, distributed DP with a fixed noise multiplier, b = 20); the n devices run in
this process, each with its own MQTT connection, all driven by one ``MqttLoop``, each a real
``DeviceRound`` through the pump with a real fsynced ledger, but a trivial local update (a fixed
random vector instead of training). Measured by the service itself and read from its JSON log:

* latency: from signing the plan (announcement) to the published model, wall clock;
* aggregator CPU: ``time.process_time()`` of the aggregator process over the same span;
* devices CPU: ``time.process_time()`` of this process (all n devices, one core at most) from the
  plan's log line to the round's: with n devices in one Python process this bounds the latency.

The floor, in the same run and through the same broker: 100 publishers x 327,680 B at QoS 1 in
128 KiB chunks to one subscriber (benchmarks/transport.py's ``raw_floor``). Medians over rounds.

    python benchmarks/round.py [--n 10 100] [--d 10000 100000 1000000] [--rounds 3] [--timeline] [--profile DIR]

``--timeline`` prints when each round entered each stage and the devices' channel counters
(retransmissions, duplicates); ``--profile DIR`` writes cProfile dumps of the aggregator process
and of this (devices') process. Profiled 2026-12 at n = 100, d = 10^5: the devices' process is
the bound, about 3.2 s CPU per round (Ed25519 verifies of neighbours' SecAgg+ signatures, DP noise,
masking), so one Python process cannot simulate 100 devices in under a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# One BLAS thread per process: broker, aggregator and 100 devices share 2 cores, and OpenBLAS's
# spinning worker threads made one 131,072-point Hadamard rotation 18 ms instead of 0.6 ms here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.service.service import load_or_create_identity  # noqa: E402
from aggregator.store import open_store  # noqa: E402
from edge_sdk.privacy.ledger import DeviceLedger  # noqa: E402
from edge_sdk.protocol.device_round import DeviceConfig, DeviceRound, start_device  # noqa: E402
from edge_sdk.protocol.effects import (  # noqa: E402
    CheckEligibility,
    Eligibility,
    Metric,
    PersistModel,
    PersistRound,
    RecordParticipation,
    Train,
)
from edge_sdk.protocol.layout import ParameterLayout  # noqa: E402
from edge_sdk.protocol.plan import RoundPlan  # noqa: E402
from edge_sdk.protocol.pump import Endpoint, Pump  # noqa: E402
from edge_sdk.protocol.routing import AGGREGATOR_ID, Router, limits_for, limits_for_plan  # noqa: E402
from edge_sdk.secagg.keys import IdentityKey  # noqa: E402
from edge_sdk.transport.event_loop import MqttLoop  # noqa: E402
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport  # noqa: E402
from edge_sdk.transport.round_transport import RoundTransport  # noqa: E402
from edge_sdk.wire.topics import Channel, parse_topic, status_topic  # noqa: E402


def _transport_benchmark():
    spec = importlib.util.spec_from_file_location("transport_benchmark", ROOT / "benchmarks" / "transport.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_mosquitto(directory: Path) -> tuple[subprocess.Popen, int]:
    """benchmarks/transport.py's broker plus ``set_tcp_nodelay true``, as `fleetlearn broker mosquitto-config` has."""
    return _transport_benchmark().start_mosquitto(directory, "set_tcp_nodelay true\n")


class Devices:
    """n simulated devices in this process: one MqttLoop, one connection and one DeviceRound each."""

    def __init__(self, url: str, fleet: str, directory: Path, identities: dict[str, IdentityKey],
                 aggregator_public: bytes, d: int) -> None:
        self.loop = MqttLoop()
        params = {"w": np.zeros(d, np.float32)}
        self.layout = ParameterLayout.of(params)
        enrolled = {k: v.public for k, v in identities.items()}
        rng = np.random.default_rng(0)
        self.endpoints = []
        from edge_sdk.privacy.encoding import EncodingParams

        limits = limits_for(EncodingParams(d, 1.0, 1.0, 20, bytes(16)).padded_dim, 20, len(identities), 4 * d)
        self.pump = Pump(_Clock())
        self._next_housekeeping = 0.0
        for device, identity in identities.items():
            update = rng.normal(0, 1, d).astype(np.float32)
            update *= 0.5 / np.linalg.norm(update)
            ledger = DeviceLedger.open(directory / f"{device}.ledger", 1e300, 1e-5)
            mqtt = MqttTransport(MqttSettings(url, device, status_topic=status_topic(fleet, device)), self.loop)
            transport = RoundTransport(mqtt, me=device, fleet=fleet, identity=identity,
                                       peer_key=lambda p: aggregator_public if p == AGGREGATOR_ID else None,
                                       limits=limits)
            config = DeviceConfig(fleet, device, identity, aggregator_public, enrolled, self.layout)
            handlers = {Train: lambda e, u=update: {"w": e.params["w"] + u},
                        CheckEligibility: lambda e: Eligibility(True),
                        RecordParticipation: lambda e, led=ledger: (led.record(e.round_id, e.event), led.head())[1],
                        PersistRound: lambda e: None, PersistModel: lambda e: None, Metric: lambda e: None}
            endpoint = Endpoint(device, DeviceRound(), start_device(config), transport,
                                Router(fleet, device, limits), handlers)
            self.pump.add(endpoint)
            self.endpoints.append(endpoint)

    def step(self) -> None:
        self.loop.run_once(0.002)
        now = time.monotonic()
        housekeeping = now >= self._next_housekeeping  # partial-message expiry in every channel, now and then
        if housekeeping:
            self._next_housekeeping = now + 1.0
        for e in self.endpoints:
            if not housekeeping and e.transport.quiet(now):
                deadline = DeviceRound.deadline(e.state)
                if deadline is None or now < deadline:
                    continue
            for topic, data in e.transport.poll(0.0):
                if parse_topic(topic).channel is Channel.DIRECTORY:
                    continue  # these devices were given the directory
                try:
                    message = e.router.incoming(topic, data).message
                except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
                    print(f"  {e.name} refused {topic}: {exc}", file=sys.stderr)
                    continue
                if isinstance(message, RoundPlan):
                    e.router.limits = limits_for_plan(message, len(self.endpoints))
                    if DeviceRound.finished(e.state) or e.state.plan is not None:
                        e.state = start_device(e.state.config, e.state.memory, e.state.model)
                self.pump.settle(e, DeviceRound.handle(e.state, message, time.monotonic()))
            deadline = DeviceRound.deadline(e.state)
            if deadline is not None and time.monotonic() >= deadline:  # before it a tick is a no-op
                self.pump.settle(e, DeviceRound.tick(e.state, time.monotonic()))

    def counters(self) -> dict[str, int]:
        """The devices' reliable channels' counters, summed (retransmissions, duplicates, ...)."""
        total: dict[str, int] = {}
        for e in self.endpoints:
            for key, value in e.transport.channel.counters.items():
                total[key] = total.get(key, 0) + value
        return total

    def close(self) -> None:
        for e in self.endpoints:
            e.transport.close()


class _Clock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


def config_toml(fleet: str, state_dir: Path, params: Path, url: str, n: int, rounds: int) -> str:
    return f"""
[fleet]
id = "{fleet}"
state_dir = "{state_dir}"
[broker]
urls = ["{url}"]
[model]
bundle = "{state_dir}/no-bundle"
initial_params = "{params}"
[rounds]
count = {rounds}
cohort_min = {n}
cohort_max = {n}
over_selection = 0.0
retry_after = 1.0
check_back_after = 0.0
[deadlines]
ready = 120.0
train = 300.0
secagg_stage = 300.0
[privacy]
noise_multiplier = 1.0
bits = 20
[metrics]
enabled = false
"""


def run_case(url: str, n: int, d: int, rounds: int, timeout: float,
             profile: Path | None = None, timeline: bool = False) -> list[tuple[float, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state_dir = root / "aggregator"
        state_dir.mkdir()
        params = root / "params.npz"
        np.savez(params, w=np.zeros(d, np.float32))
        aggregator = load_or_create_identity(state_dir / "aggregator.key")
        identities = {f"dev-{i:03d}": IdentityKey.generate() for i in range(n)}
        with open_store(state_dir / "aggregator.sqlite") as store:
            for device, identity in identities.items():
                store.enrol(device, identity.public, now=time.time())
        config = root / "aggregator.toml"
        fleet = f"bench-n{n}-d{d}"  # one fleet per case: the broker still retains the last case's model
        config.write_text(config_toml(fleet, state_dir, params, url, n, rounds))
        profiler = ["-m", "cProfile", "-o", str(profile / f"aggregator-n{n}-d{d}.prof")] if profile else []
        process = subprocess.Popen([sys.executable, *profiler, "-m", "edge_sdk.cli", "aggregator", "serve", "--config",
                                    str(config)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results: list[tuple[float, float, float]] = []
        lines: list[str] = []
        stages: list[tuple[float, str]] = []
        devices_cpu = [time.process_time()]

        def read() -> None:
            for line in process.stderr:
                lines.append(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("stage") == "PLAN" and "plan published" in event.get("message", ""):
                    devices_cpu[0] = time.process_time()  # this process: the n devices
                if timeline and "stage" in event and "entered stage" in event.get("message", ""):
                    stages.append((event["time"], event["stage"]))
                if "cpu_seconds" in event:
                    results.append((event["seconds"], event["cpu_seconds"], time.process_time() - devices_cpu[0]))
                    if timeline and stages:
                        t0 = stages[0][0]
                        print("  stages: " + ", ".join(f"{name} +{t - t0:.2f}" for t, name in stages)
                              + f", published +{event['time'] - t0:.2f}", file=sys.stderr)
                    stages.clear()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        devices = Devices(url, fleet, root, identities, aggregator.public, d)
        deadline = time.monotonic() + timeout
        device_profile = None
        if profile:
            import cProfile

            device_profile = cProfile.Profile()
            device_profile.enable()
        try:
            while process.poll() is None and time.monotonic() < deadline:
                devices.step()
        finally:
            if timeline:
                print(f"  devices' channels: {devices.counters()}", file=sys.stderr)
            if device_profile is not None:
                device_profile.disable()
                device_profile.dump_stats(str(profile / f"devices-n{n}-d{d}.prof"))
            devices.close()
            if process.poll() is None:
                process.terminate()
                process.wait(30)
            reader.join(5)
        if len(results) < rounds:
            tail = "".join(lines[-5:])
            print(f"  n={n} d={d}: only {len(results)} of {rounds} rounds within {timeout:.0f} s\n{tail}",
                  file=sys.stderr)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--d", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per (n, d) case")
    parser.add_argument("--floor-repeats", type=int, default=5)
    parser.add_argument("--timeline", action="store_true", help="print when each round entered each stage")
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory for cProfile dumps of the aggregator and of the devices' process")
    args = parser.parse_args()
    transport_benchmark = _transport_benchmark()
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_mosquitto(Path(tmp))
        url = f"mqtt://127.0.0.1:{port}"
        try:
            floor = statistics.median(transport_benchmark.raw_floor(url, args.floor_repeats))
            rows = []
            for n in args.n:
                for d in args.d:
                    results = run_case(url, n, d, args.rounds, args.timeout, args.profile, args.timeline)
                    rows.append((n, d, results))
                    if results:
                        print(f"  n={n} d={d}: rounds {[round(r[0], 3) for r in results]} s", file=sys.stderr)
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"floor: 100 publishers x 327,680 B, QoS 1, 128 KiB chunks -> 1 subscriber: {floor:.3f} s "
          f"(median of {args.floor_repeats})")
    print(f"{'n':>5}{'d':>10}{'rounds':>8}{'latency s':>11}{'agg CPU s':>11}{'devices CPU s':>15}"
          f"{'latency/floor':>15}")
    for n, d, results in rows:
        if not results:
            print(f"{n:>5}{d:>10}{0:>8}{'-':>11}{'-':>11}{'-':>15}{'-':>15}")
            continue
        latency = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        devices_cpu = statistics.median(r[2] for r in results)
        print(f"{n:>5}{d:>10}{len(results):>8}{latency:>11.3f}{cpu:>11.3f}{devices_cpu:>15.3f}"
              f"{latency / floor:>15.2f}")


if __name__ == "__main__":
    main()
