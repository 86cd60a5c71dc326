"""Inputs of the capacity model in docs/scaling.md, measured side by side in one run.

One function per measurement, each picked with ``--only NAME`` (several allowed):
  * ``broker``: the broker's message rate per node at QoS 1, payloads of 1 KiB and 128 KiB: a
    3-node NATS cluster with MQTT (nats-server processes on free ports, JetStream on, MQTT streams
    with 3 replicas), publisher on node A and subscriber on node B (the message crosses a route,
    and NATS stores it in a replicated stream for the QoS 1 subscriber), and both on node A; next
    to one Mosquitto (its default limits). One publisher and one subscriber connection (paho, one
    MqttLoop, ``INFLIGHT`` awaiting PUBACK), at most ``WINDOW`` messages unreceived at a time so
    no broker queue limit drops any; msgs/s = messages received / time from the first publish to the
    last delivery, median of ``--runs`` runs (after one warm-up), and the ratio to Mosquitto's.
    These are the rates of one publisher-subscriber pair through one node (a Python client on 2
    shared cores), a floor for the node, not its ceiling;
  * ``unmask``: the aggregator's SecAgg+ unmask step for one session at d = 10^5, n = 100 and 1000,
    10% dropout (``benchmarks/secagg.py``'s prepared state and ``reconstruct_sum``): seconds per
    session, so devices unmasked per second per worker (one core);
  * ``sharded``: a sharded round's time, from the coordinator's plan announcement to its published
    model (the coordinator's own "published model version" log line), with 1, 2 and 4 aggregator
    workers, at ``--devices`` simulated devices (default 1000) over one Mosquitto: the real
    ``fleetlearn aggregator coordinator`` and ``worker`` processes and the devices as real
    ``DeviceAgent``s in 2 processes (``tests/sharding/device_swarm.py``, as the acceptance test runs
    them), SecAgg+ (active) and DP, a fresh fleet per worker count; ``--runs`` rounds each, the
    median and its ratio to 1 worker. On one 2-core machine the devices, the broker and every
    worker share the same cores, so this shows the hand-out's overhead, not the unmask speed-up
    more workers give on their own cores.

Run: .venv/bin/python benchmarks/scale.py [--only broker|unmask|sharded ...] [--runs N] [--devices N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the real-process broker helpers the tests use

from cluster.nats_cluster import NATS_SERVER, NatsCluster  # noqa: E402
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker  # noqa: E402

from edge_sdk.transport.event_loop import MqttLoop  # noqa: E402
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport  # noqa: E402

PAYLOADS = {"1 KiB": 1024, "128 KiB": 128 * 1024}
MESSAGES = {1024: 3000, 128 * 1024: 300}  # per run: enough for a steady rate, little enough for 2 cores
WINDOW = 500  # messages in flight between publisher and subscriber (below Mosquitto's 1000-message queue)
INFLIGHT = 200  # QoS 1 messages awaiting PUBACK per connection (the transport's default is 20): a node's rate,
# not one connection's round-trip latency (NATS acknowledges a QoS 1 publish after its replicated stream stores it)


def message_rate(publisher_url: str, subscriber_url: str, payload_bytes: int, messages: int) -> float:
    """Messages per second from one QoS 1 publisher on one node to one QoS 1 subscriber (same or another node)."""
    loop = MqttLoop()
    tag = uuid.uuid4().hex[:8]
    topic = f"fleetlearn/v1/bench/up/{tag}/x"
    subscriber = MqttTransport(MqttSettings(subscriber_url, f"sub-{tag}", persistent_session=False,
                                                  max_inflight=INFLIGHT), loop)
    subscriber.subscribe(topic)
    publisher = MqttTransport(MqttSettings(publisher_url, f"pub-{tag}", persistent_session=False,
                                                max_inflight=INFLIGHT), loop)
    if not loop.run(30, until=lambda: subscriber.ready and publisher.ready):
        raise RuntimeError(f"brokers at {publisher_url} / {subscriber_url} did not answer: "
                           f"{publisher.last_error or subscriber.last_error}")
    payload = os.urandom(payload_bytes)
    published = received = 0
    start = time.perf_counter()
    deadline = start + 120
    while received < messages:
        while published < messages and published - received < WINDOW:
            publisher.publish(topic, payload)
            published += 1
        received += len(subscriber.poll(0.05))
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {received} of {messages} messages arrived within 120 s")
    elapsed = time.perf_counter() - start
    publisher.close(timeout=1.0)
    subscriber.close(timeout=1.0)
    return messages / elapsed


def broker(runs: int) -> list[str]:
    """The broker rows: NATS cross-node and same-node, and Mosquitto, per payload size."""
    if not NATS_SERVER or not MOSQUITTO:
        sys.exit("benchmarks/scale.py --only broker needs nats-server and mosquitto")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        mosquitto = MosquittoBroker(Path(directory), "set_tcp_nodelay true").start()
        cluster = NatsCluster(Path(directory) / "nats", size=3).start()
        try:
            a, b = cluster.urls[0], cluster.urls[1]
            paths = [("Mosquitto, one broker", mosquitto.url, mosquitto.url),
                     ("NATS 3 nodes, node A -> node B", a, b),
                     ("NATS 3 nodes, node A -> node A", a, a)]
            rows.append(f"{'path (QoS 1)':34} {'payload':>8} {'msgs/s':>9} {'MB/s':>7} {'runs':>5} "
                        f"{'vs Mosquitto':>13}")
            for label, size in PAYLOADS.items():
                baseline = None
                for name, publisher_url, subscriber_url in paths:
                    message_rate(publisher_url, subscriber_url, size, 50)  # warm-up: stream and consumer leaders
                    rates = [message_rate(publisher_url, subscriber_url, size, MESSAGES[size]) for _ in range(runs)]
                    rate = statistics.median(rates)
                    baseline = baseline or rate
                    rows.append(f"{name:34} {label:>8} {rate:9.0f} {rate * size / 1e6:7.1f} {runs:5d} "
                                f"{rate / baseline:13.2f}")
        finally:
            cluster.stop()
            mosquitto.stop()
    return rows


def unmask(runs: int) -> list[str]:
    """Per-worker unmask throughput: one session's unmask at d = 10^5, 10% dropout."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from secagg import prepare_unmask

    from aggregator.secagg.unmask import reconstruct_sum
    from edge_sdk.secagg.parameters import choose_parameters

    rows = [f"{'unmask (one worker, one core)':34} {'n':>6} {'k':>3} {'t':>3} {'s/session':>10} {'devices/s':>10}"]
    for n in (100, 1000):
        p = choose_parameters(n, 0.1, 0.05)
        inputs, _ = prepare_unmask(n, p.degree, p.threshold, 10**5, 0.1)
        times = []
        for _ in range(max(1, runs // 2)):
            start = time.perf_counter()
            reconstruct_sum(inputs)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append(f"{'d = 10^5, 10% dropout':34} {n:6d} {p.degree:3d} {p.threshold:3d} {seconds:10.3f} "
                    f"{n / seconds:10.0f}")
    return rows


SHARD_WORKERS = (1, 2, 4)
SWARM_PROCESSES = 2
DEVICES = {"n": 1000}  # --devices


def _sharded_round_seconds(n: int, workers: int, rounds: int, root: Path, bundle_cache: Path) -> list[float]:
    """One fresh fleet of ``n`` devices, ``workers`` worker processes, ``rounds`` rounds: each round's seconds."""
    import json

    from service.round_fleet import Process, make_fleet

    broker = MosquittoBroker(root, "set_tcp_nodelay true\nmax_queued_messages 100000").start()
    try:
        fleet = make_fleet(root, n, broker.url, bundle_cache,
                           rounds={"count": rounds, "cohort_min": n, "cohort_max": n, "retry_after": 1.0},
                           deadlines={"ready": 60.0 + n / 5, "train": 60.0 + n / 5, "secagg_stage": 30.0 + n / 10},
                           privacy={"clip": 0.8},
                           sharding={"workers": workers, "sub_cohort_min": 10, "task_deadline": 60.0})
        base = [sys.executable, "-m", "edge_sdk.cli", "aggregator"]
        names = sorted(fleet.devices)
        processes = [Process.start(f"w{i}", base + ["worker", "--config", str(fleet.config), "--worker-id", f"w{i}"])
                     for i in range(workers)]
        swarm = ROOT / "tests" / "sharding" / "device_swarm.py"
        processes += [Process.start(f"swarm{k}", [sys.executable, str(swarm), broker.url, str(fleet.bundle)]
                                    + [str(fleet.devices[d]) for d in names[k::SWARM_PROCESSES]])
                      for k in range(SWARM_PROCESSES)]
        coordinator = Process.start("coordinator", base + ["coordinator", "--config", str(fleet.config)])
        deadline = time.monotonic() + rounds * (600 + n)
        try:
            while coordinator.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for process in [coordinator, *processes]:
                process.stop()
        seconds = []
        for line in coordinator.all_lines:
            if line.startswith("{") and "published model version" in line:
                seconds.append(float(json.loads(line)["seconds"]))
            elif line.startswith("{") and "aborted after" in line:
                print(f"  (workers={workers}) {json.loads(line)['message']}", file=sys.stderr)
        return seconds
    finally:
        broker.stop()


def sharded(runs: int) -> list[str]:
    """Round time against the number of aggregator workers (1, 2, 4) at ``--devices`` devices."""
    if not MOSQUITTO:
        sys.exit("benchmarks/scale.py --only sharded needs mosquitto")
    n = DEVICES["n"]
    rows = [f"{'sharded round, n = ' + str(n):34} {'workers':>7} {'rounds':>6} {'median s':>9} {'vs 1':>6}"]
    with tempfile.TemporaryDirectory(prefix="fleetlearn-sharded-") as tmp:
        cache = Path(tmp) / "bundle-cache"
        cache.mkdir()
        first = None
        for workers in SHARD_WORKERS:
            root = Path(tmp) / f"w{workers}"
            root.mkdir()
            seconds = _sharded_round_seconds(n, workers, runs, root, cache)
            if not seconds:
                rows.append(f"{'plan -> published model':34} {workers:7d} {0:6d} {'no round completed':>16}")
                continue
            median = statistics.median(seconds)
            first = first or median
            rows.append(f"{'plan -> published model':34} {workers:7d} {len(seconds):6d} {median:9.2f} "
                        f"{median / first:6.2f}")
    return rows


MEASUREMENTS: dict[str, Callable[[int], list[str]]] = {"broker": broker, "unmask": unmask, "sharded": sharded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(MEASUREMENTS),
                        help="run only this measurement (repeatable); default: all")
    parser.add_argument("--runs", type=int, default=5, help="runs per row; the median is printed (default 5)")
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices for --only sharded")
    args = parser.parse_args()
    DEVICES["n"] = args.devices
    for name in args.only or list(MEASUREMENTS):
        for line in MEASUREMENTS[name](args.runs):
            print(line)
        print()


if __name__ == "__main__":
    main()
