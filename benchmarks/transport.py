"""The MQTT transport against the broker's raw floor, measured in the same run through the same Mosquitto.

Prints medians (s) and the ratio for:
  * the floor: 100 publishers each send 327,680 B at QoS 1 as 128 KiB payloads (3 each) to one
    subscriber, from publish to the last payload received (one MqttLoop drives all 101 connections);
  * the same 100 messages through ReliableChannel: envelope, 128 KiB wire chunks, reassembly,
    digest check, dedup, and a signed receipt back to every sender, until every sender holds its
    verified receipt.
Mosquitto runs on a free port with its default queue limits (max_queued_messages 1000,
max_inflight_messages 20); 300 payloads fit them, so nothing is dropped in either row.
The same two rows then run through the embedded amqtt broker (``aggregator.broker.embedded``), in
its own process (the default) and, with ``--amqtt-thread``, also in a thread of this process,
and the table gives each row's ratio to Mosquitto's.

Run: .venv/bin/python benchmarks/transport.py [--repeats N] [--no-amqtt] [--amqtt-thread]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
from edge_sdk.transport.reliable import ReliableChannel
from edge_sdk.wire.envelope import MessageKind
from edge_sdk.wire.limits import WireLimits

PUBLISHERS = 100
MESSAGE_BYTES = 327_680
PAYLOAD_BYTES = 128 * 1024
FLEET = "bench"


def start_mosquitto(directory: Path, extra_config: str = "") -> tuple[subprocess.Popen, int]:
    """A Mosquitto with its default queue limits on a free port; ``extra_config`` adds lines."""
    binary = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else shutil.which("mosquitto")
    if not binary:
        sys.exit("benchmarks/transport.py needs mosquitto (apt-get install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = directory / "mosquitto.conf"
    config.write_text(f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlistener {port} 127.0.0.1\n"
                      "allow_anonymous true\nmax_queued_messages 1000\nmax_inflight_messages 20\n" + extra_config)
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.02)
    process.kill()
    sys.exit("mosquitto did not start")


def raw_floor(url: str, repeats: int) -> list[float]:
    loop = MqttLoop()
    subscriber = MqttTransport(MqttSettings(url, "raw-aggregator"), loop)
    subscriber.subscribe(f"fleetlearn/v1/{FLEET}/raw/+")
    publishers = [MqttTransport(MqttSettings(url, f"raw-{i}"), loop) for i in range(PUBLISHERS)]
    assert loop.run(30, until=lambda: subscriber.ready and all(p.connected for p in publishers))
    message = os.urandom(MESSAGE_BYTES)
    pieces = [message[i:i + PAYLOAD_BYTES] for i in range(0, MESSAGE_BYTES, PAYLOAD_BYTES)]
    times = []
    for _ in range(repeats):
        received = 0
        start = time.perf_counter()
        for i, publisher in enumerate(publishers):
            for piece in pieces:
                publisher.publish(f"fleetlearn/v1/{FLEET}/raw/{i}", piece)
        while received < PUBLISHERS * len(pieces):
            received += len(subscriber.poll(5))
        times.append(time.perf_counter() - start)
    for transport in (*publishers, subscriber):
        transport.close(timeout=0.5)
    return times


def reliable(url: str, repeats: int) -> list[float]:
    names = [f"dev-{i}" for i in range(PUBLISHERS)]
    keys = {name: IdentityKey.generate() for name in ("aggregator", *names)}
    limits = WireLimits.for_plan(vector_length=MESSAGE_BYTES * 8 // 20, bits=20, cohort_size=PUBLISHERS,
                                 model_bytes=0, max_payload_bytes=PAYLOAD_BYTES)
    loop = MqttLoop()

    def key_of(party: str) -> bytes | None:
        return keys[party].public if party in keys else None

    agg_transport = MqttTransport(MqttSettings(url, "aggregator"), loop)
    agg_transport.subscribe(f"fleetlearn/v1/{FLEET}/up/+/+")
    aggregator = ReliableChannel(
        agg_transport, me="aggregator", fleet=FLEET, identity=keys["aggregator"], peer_key=key_of,
        receipt_topic=lambda peer: f"fleetlearn/v1/{FLEET}/down/{peer}",
        origin_of=lambda topic: topic.split("/")[4] if topic.split("/")[3:4] == ["up"] else None, limits=limits)
    devices = []
    for name in names:
        transport = MqttTransport(MqttSettings(url, name), loop)
        transport.subscribe(f"fleetlearn/v1/{FLEET}/down/{name}")
        devices.append(ReliableChannel(
            transport, me=name, fleet=FLEET, identity=keys[name], peer_key=key_of,
            receipt_topic=lambda peer, n=name: f"fleetlearn/v1/{FLEET}/up/{n}/receipt",
            origin_of=lambda topic: "aggregator" if "/down/" in topic else None, limits=limits))
    assert loop.run(30, until=lambda: agg_transport.ready and all(d.transport.ready for d in devices))
    message = os.urandom(MESSAGE_BYTES)
    times = []
    for _ in range(repeats):
        delivered = 0
        start = time.perf_counter()
        for device in devices:
            device.send(f"fleetlearn/v1/{FLEET}/up/{device.me}/masked_input", to="aggregator",
                        kind=MessageKind.MASKED_INPUT, payload=message)
        while delivered < PUBLISHERS or any(d.pending for d in devices):
            delivered += len(aggregator.poll(0.01))
            for device in devices:
                if device.pending:
                    device.poll(0)
        times.append(time.perf_counter() - start)
    retransmissions = sum(d.counters["retransmissions"] for d in devices)
    for transport in (*[d.transport for d in devices], agg_transport):
        transport.close(timeout=0.5)
    print(f"  (reliable: {retransmissions} retransmissions over {repeats} runs)")
    return times


def measure(url: str, repeats: int) -> tuple[float, float]:
    """Median seconds of the raw floor and of ReliableChannel through the broker at ``url``."""
    return statistics.median(raw_floor(url, repeats)), statistics.median(reliable(url, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-amqtt", action="store_true", help="Mosquitto only")
    parser.add_argument("--amqtt-thread", action="store_true", help="also amqtt in a thread of this process")
    args = parser.parse_args()
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            print("mosquitto")
            results["Mosquitto"] = measure(f"mqtt://127.0.0.1:{port}", args.repeats)
        finally:
            broker.terminate()
            broker.wait(10)
    if not args.no_amqtt:
        from aggregator.broker.embedded import EmbeddedBroker

        for in_thread in (False, True) if args.amqtt_thread else (False,):
            with EmbeddedBroker(in_thread=in_thread) as embedded:
                print(embedded.description)
                where = "thread" if in_thread else "process"
                results[f"amqtt {embedded.version}, own {where}"] = measure(embedded.url, args.repeats)
    floor_ref, channel_ref = results["Mosquitto"]
    print(f"{PUBLISHERS} publishers x {MESSAGE_BYTES:,} B, QoS 1, {PAYLOAD_BYTES // 1024} KiB payloads -> 1 subscriber "
          f"(medians of {args.repeats})")
    print(f"{'broker':<28}{'case':<44}{'median s':>10}{'/ floor':>9}{'/ Mosquitto':>13}")
    for name, (floor, channel) in results.items():
        print(f"{name:<28}{'raw paho publish (floor)':<44}{floor:>10.3f}{1.0:>9.2f}{floor / floor_ref:>13.2f}")
        print(f"{name:<28}{'ReliableChannel (chunks, receipts, dedup)':<44}{channel:>10.3f}{channel / floor:>9.2f}"
              f"{channel / channel_ref:>13.2f}")


if __name__ == "__main__":
    main()
