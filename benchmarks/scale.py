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
    session, so devices unmasked per second per worker (one core).

Run: .venv/bin/python benchmarks/scale.py [--only broker|unmask ...] [--runs N]
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


MEASUREMENTS: dict[str, Callable[[int], list[str]]] = {"broker": broker, "unmask": unmask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(MEASUREMENTS),
                        help="run only this measurement (repeatable); default: all")
    parser.add_argument("--runs", type=int, default=5, help="runs per row; the median is printed (default 5)")
    args = parser.parse_args()
    for name in args.only or list(MEASUREMENTS):
        for line in MEASUREMENTS[name](args.runs):
            print(line)
        print()


if __name__ == "__main__":
    main()
