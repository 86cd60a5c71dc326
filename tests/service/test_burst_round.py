"""Acceptance (burst): 200 devices upload at once through a Mosquitto with its default queue limits.

Mosquitto's defaults (``max_queued_messages 1000``, ``max_inflight_messages 20``: the test's broker
overrides neither) drop QoS 1 messages for a client whose queue is full. Here the aggregator's
queue is made to overflow: 200 devices in one process (one ``MqttLoop``, 200 connections) send
their masked inputs in the same few milliseconds, each in 1 KiB chunks (a broker's per-message
cap, as AWS IoT's 128 KiB is one), i.e. thousands of chunks at once. The real ``AggregatorService``
with active-secure SecAgg+ runs the round in this process. The test shows that the broker did drop
(its log, and the devices' retransmissions), that every device's update is in the published model
exactly once (the model equals the FedAvg of the 200 known updates, within a bound far tighter than
one update counted twice or left out), and that the round completed with all 200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.service.config import load_config
from aggregator.service.service import AggregatorService, load_or_create_identity
from aggregator.store import RoundStatus, open_store
from edge_sdk.protocol.plan import RoundPlan

from .burst_devices import device_id, identity_of, update_of

pytestmark = pytest.mark.slow

N = 200
D = 16384  # a masked input of 16,384 x 24 bits = 48 KiB: 50 chunks of 1 KiB, 10,000 chunks for the burst
MAX_PAYLOAD = 1024
FLEET = "burst"
ROOT = Path(__file__).resolve().parents[2]


def write_config(root: Path, url: str) -> Path:
    state_dir = root / "aggregator"
    state_dir.mkdir()
    params = root / "params.npz"
    np.savez(params, w=np.zeros(D, np.float32))
    config = root / "aggregator.toml"
    config.write_text(f"""
[fleet]
id = "{FLEET}"
state_dir = "{state_dir}"
[broker]
urls = ["{url}"]
[model]
bundle = "{root}/no-bundle"
initial_params = "{params}"
[rounds]
count = 1
cohort_min = {N}
cohort_max = {N}
over_selection = 0.0
retry_after = 1.0
check_back_after = 0.0
[deadlines]
ready = 60.0
train = 60.0
secagg_stage = 60.0
[privacy]
noise_multiplier = 1e-9
bits = 24
[metrics]
enabled = false
""")
    return config


def test_two_hundred_devices_upload_at_once_and_each_update_is_summed_exactly_once(tmp_path, broker):
    assert "max_queued_messages" not in broker.config_path.read_text()  # Mosquitto's defaults
    config = load_config(write_config(tmp_path, broker.url))
    aggregator = load_or_create_identity(config.identity_path)
    with open_store(config.store_path) as store:
        for i in range(N):
            store.enrol(device_id(i), identity_of(i).public, now=time.time())
    devices_dir = tmp_path / "devices"
    devices_dir.mkdir()
    out = tmp_path / "devices.json"
    started = time.monotonic()
    devices = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "service" / "burst_devices.py"), broker.url, FLEET, str(N), str(D),
         str(MAX_PAYLOAD), aggregator.public.hex(), str(devices_dir), str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        service = AggregatorService(config, max_payload=MAX_PAYLOAD)
        try:
            assert service.run(lambda: time.monotonic() - started > 90 or devices.poll() is not None) == 0
            aggregator_counters = dict(service.transport.channel.counters)
        finally:
            service.close()
        finished = Path(f"{out}.finished")
        wait_until = time.monotonic() + 30
        while not finished.exists() and devices.poll() is None and time.monotonic() < wait_until:
            time.sleep(0.05)
        devices.terminate()  # every device is done: stop waiting for receipts of retransmitted copies
        _, errors = devices.communicate(timeout=30)
    finally:
        if devices.poll() is None:
            devices.kill()
            devices.wait()
    assert devices.returncode == 0, errors[-3000:]
    totals = json.loads(out.read_text())
    seconds = time.monotonic() - started

    with open_store(config.store_path) as store:
        rounds = store.rounds()
        assert [(r.round_index, r.status) for r in rounds] == [(1, RoundStatus.COMPLETED)], rounds
        contributors = store.accounting_events()[-1].event["contributors"]
        plan = RoundPlan.from_bytes(store.plan(1).payload)
        new = np.frombuffer(store.model(1).payload, "<f4").astype(np.float64)
    assert sorted(contributors) == [device_id(i) for i in range(N)]
    assert totals["finished"] == N

    print(f"burst: {seconds:.1f} s, devices {totals}, aggregator {aggregator_counters}")
    # the broker dropped: its log says so for the aggregator's queue, and the devices had to send again
    broker_log = broker.log_path.read_text()
    assert "Outgoing messages are being dropped" in broker_log, broker_log[-2000:]
    assert totals.get("retransmissions", 0) > 0, totals
    assert totals.get("gave_up", 0) == 0, totals
    # ... yet each message was handed to the round once: the aggregator saw every extra copy as a duplicate
    assert aggregator_counters["delivered"] == totals["sent"], (aggregator_counters, totals)

    updates = np.stack([update_of(i, D).astype(np.float64) for i in range(N)])
    expected = updates.mean(axis=0)  # FedAvg of the unclipped (norm 0.9 < clip 1.0) updates from zero
    error = np.max(np.abs(new - expected))
    tolerance = 1e-6 + 4 * plan.encoding.gamma
    # the bound must tell "each once" from "one twice" or "one missing": an update moves the mean by u_i / N
    smallest_effect = min(np.max(np.abs(u)) for u in updates) / N
    assert tolerance < smallest_effect / 4, (tolerance, smallest_effect)
    assert error <= tolerance, (error, tolerance)
    print(f"burst: {N} devices, {totals['retransmissions']} retransmissions, {totals.get('duplicates', 0)} "
          f"duplicates at the devices, {aggregator_counters.get('duplicates', 0)} at the aggregator; {seconds:.1f} s")
