"""Many simulated devices in one process for the burst test: one ``MqttLoop``, one connection each.

Why a separate process: the aggregator (in the test's process) and the devices then use both
cores, as in production, and the devices' uploads leave in the same few milliseconds. Each device
is a real ``DeviceRound`` through the pump with a real fsynced ledger; only training is replaced
by a known update (``update_of``), so the test can recompute the FedAvg. Identities are derived
from the device index (``identity_of``), so the test enrols them without a key exchange.

    python tests/service/burst_devices.py URL FLEET N D MAX_PAYLOAD AGGREGATOR_PUBLIC_HEX STATE_DIR OUT_JSON

Runs until every device finished its round (or a signal), touches OUT_JSON.finished, waits for the
receipts still due (until SIGTERM), then writes the summed counters of the devices' reliable
channels to OUT_JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 200 devices and an aggregator on 2 cores

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_sdk.privacy.encoding import EncodingParams  # noqa: E402
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
from edge_sdk.protocol.routing import AGGREGATOR_ID, Router, limits_for  # noqa: E402
from edge_sdk.secagg.keys import IdentityKey  # noqa: E402
from edge_sdk.transport.event_loop import MqttLoop  # noqa: E402
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport  # noqa: E402
from edge_sdk.transport.round_transport import RoundTransport  # noqa: E402
from edge_sdk.wire.topics import Channel, parse_topic, status_topic  # noqa: E402

log = logging.getLogger("burst_devices")
BITS = 24  # as the test's plan: the limits bound the packed masked vector


def device_id(index: int) -> str:
    return f"dev-{index:03d}"


def identity_of(index: int) -> IdentityKey:
    return IdentityKey(hashlib.sha256(f"burst-device-{index}".encode()).digest())


def update_of(index: int, d: int) -> np.ndarray:
    """Device ``index``'s update: random, of L2 norm 0.9 (under the clip of 1.0, so clipping is a no-op)."""
    update = np.random.default_rng(index).normal(0, 1, d).astype(np.float32)
    return update * np.float32(0.9 / np.linalg.norm(update))


class _Clock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


def run(url: str, fleet: str, n: int, d: int, max_payload: int, aggregator_public: bytes, state_dir: Path,
        stop: list[int], finished: Path) -> dict[str, int]:
    loop = MqttLoop()
    layout = ParameterLayout.of({"w": np.zeros(d, np.float32)})
    identities = {device_id(i): identity_of(i) for i in range(n)}
    enrolled = {k: v.public for k, v in identities.items()}
    limits = limits_for(EncodingParams(d, 1.0, 1.0, BITS, bytes(16)).padded_dim, BITS, n, 4 * d, max_payload)
    pump = Pump(_Clock())
    endpoints = []
    for index, (device, identity) in enumerate(identities.items()):
        update = update_of(index, d)
        ledger = DeviceLedger.open(state_dir / f"{device}.ledger", 1e300, 1e-5)
        mqtt = MqttTransport(MqttSettings(url, device, status_topic=status_topic(fleet, device)), loop)
        transport = RoundTransport(mqtt, me=device, fleet=fleet, identity=identity,
                                   peer_key=lambda p: aggregator_public if p == AGGREGATOR_ID else None,
                                   limits=limits, max_payload=max_payload)
        config = DeviceConfig(fleet, device, identity, aggregator_public, enrolled, layout)
        handlers = {Train: lambda e, u=update: {"w": e.params["w"] + u},
                    CheckEligibility: lambda e: Eligibility(True),
                    RecordParticipation: lambda e, led=ledger: (led.record(e.round_id, e.event), led.head())[1],
                    PersistRound: lambda e: None, PersistModel: lambda e: None, Metric: lambda e: None}
        endpoint = Endpoint(device, DeviceRound(), start_device(config), transport, Router(fleet, device, limits),
                            handlers)
        pump.add(endpoint)
        endpoints.append(endpoint)
    started = [False] * n
    while not stop and not all(s and DeviceRound.finished(e.state) for s, e in zip(started, endpoints, strict=True)):
        loop.run_once(0.002)
        now = time.monotonic()
        for i, e in enumerate(endpoints):
            if e.transport.quiet(now):
                deadline = DeviceRound.deadline(e.state)
                if deadline is None or now < deadline:
                    continue
            for topic, data in e.transport.poll(0.0):
                if parse_topic(topic).channel is Channel.DIRECTORY:
                    continue  # these devices were given the directory
                try:
                    message = e.router.incoming(topic, data).message
                except Exception as exc:  # noqa: BLE001 - counted and shown, the others go on
                    log.warning("%s refused %s: %s", e.name, topic, exc)
                    continue
                if isinstance(message, RoundPlan):
                    started[i] = True
                pump.settle(e, DeviceRound.handle(e.state, message, time.monotonic()))
            pump.settle(e, DeviceRound.tick(e.state, time.monotonic()))
    finished.touch()  # the test may now stop us
    # every receipt for our uploads must be in before we go: the aggregator may still be unmasking
    # (the test stops us with SIGTERM once its service is done: then no receipt can come any more)
    loop.run(30.0, until=lambda: bool(stop) or all(e.transport.pending == 0 for e in endpoints))
    totals: dict[str, int] = {"finished": sum(DeviceRound.finished(e.state) for e in endpoints)}
    for e in endpoints:
        for key, value in e.transport.channel.counters.items():
            totals[key] = totals.get(key, 0) + value
    for e in endpoints:
        e.transport.close()
    return totals


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    url, fleet, n, d, max_payload, public_hex, state_dir, out = argv
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    totals = run(url, fleet, int(n), int(d), int(max_payload), bytes.fromhex(public_hex), Path(state_dir), stop,
                 Path(out + ".finished"))
    Path(out).write_text(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
