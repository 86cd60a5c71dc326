"""Bad input from the network, against one running fleet: a real Mosquitto, the aggregator service process and
four device agent processes, with the attacks published by the ``mosquitto_pub`` binary and by a raw paho client.

Three rounds run. Round 1 is clean and an eavesdropping client records every uplink chunk. In rounds 2 and 3 one
honest device is frozen (SIGSTOP) right after the plan is published, so the round stays open while the attacks are
injected; it is then resumed (SIGCONT). For every class of bad input the tests below assert that the aggregator
logged the refusal with its reason (the service logs JSON lines on stderr), that every process is still alive, and
that each round was completed by exactly the four honest devices with the model their updates give (recomputed
here, noise effectively off) and the model version advancing exactly once per round.

The broker in this test has no ACL, so the attacker can publish on any device's topics: the worst case (in a
deployment the ACL already confines a device to its own uplink).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker

from aggregator.store import RoundStatus, open_store
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.messages import ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.wire.chunking import Reassembler, split
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, decode_envelope, encode_envelope
from edge_sdk.wire.limits import WireLimits

from .round_fleet import FLEET, Process, aggregator_command, make_fleet
from .test_round_over_mqtt import replay_round

pytestmark = pytest.mark.slow

HONEST = ("dev-00", "dev-01", "dev-02", "dev-03")
REVOKED = "dev-04"
FROZEN = "dev-03"  # held still while a round's attacks are injected
ROUNDS = 3
BASE = f"fleetlearn/v1/{FLEET}"
LIMITS = WireLimits.for_plan(vector_length=4096, bits=24, cohort_size=8, model_bytes=1 << 16)
MOSQUITTO_PUB = "/usr/bin/mosquitto_pub" if os.path.exists("/usr/bin/mosquitto_pub") else ""


def up(device: str, kind: str) -> str:
    return f"{BASE}/up/{device}/{kind}"


def envelope_bytes(kind: MessageKind, sender: str, payload: bytes, *, round_index: int = 0,
                   session: bytes = NO_SESSION, stage: int = 0) -> bytes:
    sequence = random.getrandbits(62)
    return encode_envelope(Envelope(WIRE_VERSION, kind, FLEET, session, round_index, stage, sender, sequence, payload))


def frame(data: bytes, max_payload: int = 128 * 1024) -> bytes:
    [only] = split(data, max_payload)
    return only


def identity_of(fleet, device: str) -> IdentityKey:
    return IdentityKey(bytes.fromhex((fleet.devices[device] / "identity.key").read_text().strip()))


class Attacker:
    """A raw paho client: publishes whatever bytes it is given and records every uplink and downlink it sees."""

    def __init__(self, port: int) -> None:
        self.seen: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{BASE}/up/#", qos=1)
        self.client.subscribe(f"{BASE}/down/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), message.topic, bytes(message.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def captured(self, kind: MessageKind, sender: str, before: float = float("inf")) -> list[Envelope]:
        """Whole envelopes of ``kind`` that ``sender`` published on its uplink before ``before``."""
        assembler = Reassembler(LIMITS)
        out = []
        with self.lock:
            seen = list(self.seen)
        for stamp, topic, payload in seen:
            if stamp >= before or not topic.startswith(f"{BASE}/up/{sender}/"):
                continue
            data = assembler.add(sender, payload, now=0.0)
            if data is not None:
                envelope = decode_envelope(data, LIMITS)
                if envelope.kind is kind:
                    out.append(envelope)
        return out

    def receipts_for(self, device: str, sequence: int) -> int:
        assembler, count = Reassembler(LIMITS), 0
        with self.lock:
            seen = list(self.seen)
        for _, topic, payload in seen:
            if topic != f"{BASE}/down/{device}":
                continue
            data = assembler.add("aggregator", payload, now=0.0)
            if data is not None:
                envelope = decode_envelope(data, LIMITS)
                count += envelope.kind is MessageKind.RECEIPT and envelope.sequence == sequence
        return count

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def mosquitto_pub(port: int, topic: str, payload: bytes, directory: Path) -> None:
    path = directory / f"payload-{random.getrandbits(32):08x}.bin"
    path.write_bytes(payload)
    subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-f", str(path)],
                   check=True, timeout=10, capture_output=True)


class Running:
    """The fleet's processes, the aggregator's parsed JSON log and the attacker."""

    def __init__(self, fleet, broker: MosquittoBroker, scratch: Path) -> None:
        self.fleet, self.broker, self.scratch = fleet, broker, scratch
        self.aggregator = Process.start("aggregator", aggregator_command(fleet))
        self.devices = {d: Process.start(d, device_argv(fleet, d, broker.url)) for d in HONEST}
        self.events: list[dict] = []
        self.attacker = Attacker(broker.port)

    def read(self) -> list[dict]:
        new = []
        while self.aggregator.lines:
            try:
                new.append(json.loads(self.aggregator.lines.popleft()))
            except json.JSONDecodeError:
                continue
        self.events += new
        return new

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if predicate(event):
                return event
        while time.monotonic() < deadline:
            for event in self.read():
                if predicate(event):
                    return event
            assert self.aggregator.popen.poll() is None or self.aggregator.lines, self.tail()
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")

    def tail(self) -> str:
        return "".join(self.aggregator.all_lines[-40:])

    def plan_published(self, round_index: int) -> dict:
        return self.wait_for(lambda e: e.get("round") == round_index and "plan published" in e.get("message", ""),
                             60, f"round {round_index}'s plan")

    def round_end(self, round_index: int) -> dict:
        return self.wait_for(lambda e: e.get("round") == round_index and e.get("stage") in ("PUBLISH", "ABORTED")
                             and ("contributors" in e or "reason" in e), 60, f"the end of round {round_index}")

    def refusals(self, *needles: str) -> list[dict]:
        """Warning lines (rejections, refused messages) whose message contains every needle."""
        self.read()
        return [e for e in self.events if e.get("level") == "WARNING"
                and all(n in e.get("message", "") for n in needles)]

    def alive(self) -> None:
        assert self.aggregator.popen.poll() is None, self.tail()
        for name, process in self.devices.items():
            assert process.popen.poll() is None, (name, process.text()[-2000:])

    def stop(self) -> None:
        self.attacker.close()
        for process in self.devices.values():
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGCONT)
            process.stop()
        self.aggregator.stop()


def device_argv(fleet, device: str, url: str) -> list[str]:
    """``fleetlearn -vv device run``: -vv so that the device's refusals (debug lines) can be read."""
    return [sys.executable, "-m", "edge_sdk.cli", "-vv", "device", "run", "--profile", "pi4-2gb", "--state-dir",
            str(fleet.devices[device]), "--broker", url, "--bundle", str(fleet.bundle), "--data",
            str(fleet.data_of(device)), "--max-load-per-cpu", "off", "--max-cpu-celsius", "off",
            "--min-battery", "off"]


# --- the attacks, per round --------------------------------------------------------------------

def chunk_attacks(run: Running, round_1_ended: float) -> dict:
    """Round 2: the chunk, envelope and signature classes, the replays and the unused topics."""
    port, scratch, attacker, fleet = run.broker.port, run.scratch, run.attacker, run.fleet
    sent: dict = {}
    rng = random.Random(11)
    # garbage bytes, both ways
    mosquitto_pub(port, up("dev-00", "advertise_keys"), rng.randbytes(300), scratch)
    attacker.publish(up("dev-01", "share_keys"), b"\x00" * 7)
    # a valid single-chunk frame, then cut: truncated
    replayed_ready = attacker.captured(MessageKind.READY, "dev-00", before=round_1_ended)[0]
    whole = envelope_bytes(MessageKind.READY, "dev-00", replayed_ready.payload, round_index=1)
    mosquitto_pub(port, up("dev-00", "ready"), frame(whole)[:-9], scratch)
    # oversized: one MQTT payload past the 128 KiB chunk cap
    attacker.publish(up("dev-01", "masked_input"), frame(whole)[:51] + bytes(128 * 1024))
    # declared chunk count 2^31
    header = bytearray(frame(whole)[:51])
    struct.pack_into(">I", header, 39, 1 << 31)
    attacker.publish(up("dev-02", "masked_input"), bytes(header) + bytes(16))
    # a wrong digest over otherwise valid chunks
    corrupt = bytearray(frame(whole))
    corrupt[3] ^= 0xFF
    mosquitto_pub(port, up("dev-00", "ready"), bytes(corrupt), scratch)
    # more chunks than the round's largest message needs (every legitimate message of this round is one chunk)
    pieces = split(envelope_bytes(MessageKind.READY, "dev-01", replayed_ready.payload, round_index=1), 51 + 40)
    order = list(range(len(pieces)))
    rng.shuffle(order)
    for i in order:
        attacker.publish(up("dev-01", "ready"), pieces[i])
    sent["split_chunks"] = len(pieces)
    # out of order and duplicated: two honest-looking messages, the later sequence first, the first one twice.
    # Both must be reassembled and acknowledged; the duplicate is delivered once (the round then refuses both:
    # they are round 1's).
    first_shares = attacker.captured(MessageKind.SHARE_KEYS, "dev-01", before=round_1_ended)[0]
    first_advert = attacker.captured(MessageKind.ADVERTISE_KEYS, "dev-01", before=round_1_ended)[0]
    sequence = random.getrandbits(60)
    late = encode_envelope(Envelope(WIRE_VERSION, MessageKind.SHARE_KEYS, FLEET, first_shares.session, 1, 2,
                                    "dev-01", sequence + 1, first_shares.payload))
    early = encode_envelope(Envelope(WIRE_VERSION, MessageKind.ADVERTISE_KEYS, FLEET, first_advert.session, 1, 1,
                                     "dev-01", sequence, first_advert.payload))
    attacker.publish(up("dev-01", "share_keys"), frame(late))
    attacker.publish(up("dev-01", "advertise_keys"), frame(early))
    attacker.publish(up("dev-01", "advertise_keys"), frame(early))
    sent["reordered_sequences"] = (sequence, sequence + 1)
    # unsigned, wrong signature, another device's valid signature on the frozen device's topic, a revoked device
    plan_digest = bytes(32)
    unsigned = Ready(FLEET, FROZEN, 2, plan_digest)
    attacker.publish(up(FROZEN, "ready"), frame(envelope_bytes(MessageKind.READY, FROZEN, unsigned.to_bytes(),
                                                               round_index=2)))
    wrong = Ready(FLEET, FROZEN, 2, plan_digest).sign(IdentityKey.generate())
    mosquitto_pub(port, up(FROZEN, "ready"), frame(envelope_bytes(MessageKind.READY, FROZEN, wrong.to_bytes(),
                                                                  round_index=2)), scratch)
    others = Ready(FLEET, "dev-00", 2, plan_digest).sign(identity_of(fleet, "dev-00"))
    attacker.publish(up(FROZEN, "ready"), frame(envelope_bytes(MessageKind.READY, FROZEN, others.to_bytes(),
                                                               round_index=2)))
    attacker.publish(up(FROZEN, "ready"), frame(envelope_bytes(MessageKind.READY, "dev-00", others.to_bytes(),
                                                               round_index=2)))
    revoked = Ready(FLEET, REVOKED, 2, plan_digest).sign(identity_of(fleet, REVOKED))
    mosquitto_pub(port, up(REVOKED, "ready"), frame(envelope_bytes(MessageKind.READY, REVOKED, revoked.to_bytes(),
                                                                   round_index=2)), scratch)
    # replays of round 1: its exact bytes (the channel has seen the sequence), and re-sequenced (the round sees it)
    with attacker.lock:
        exact = [(t, p) for s, t, p in attacker.seen if s < round_1_ended and t == up("dev-02", "share_keys")]
    assert exact, "round 1's share keys of dev-02 were not captured"
    for topic, payload in exact:
        mosquitto_pub(port, topic, payload, scratch)
    old_shares = attacker.captured(MessageKind.SHARE_KEYS, "dev-02", before=round_1_ended)[0]
    attacker.publish(up("dev-02", "share_keys"),
                     frame(envelope_bytes(MessageKind.SHARE_KEYS, "dev-02", old_shares.payload, round_index=1,
                                          session=old_shares.session, stage=2)))
    sent["replayed_share_keys"] = old_shares.sequence
    # wrong shape and bits: round 1's masked input with its bit width and its count changed
    masked = attacker.captured(MessageKind.MASKED_INPUT, "dev-00", before=round_1_ended)[0]
    for offset, value in ((0, struct.pack(">B", 16)), (1, struct.pack(">I", 17))):
        payload = bytearray(masked.payload)
        payload[offset:offset + len(value)] = value
        attacker.publish(up("dev-00", "masked_input"),
                         frame(envelope_bytes(MessageKind.MASKED_INPUT, "dev-00", bytes(payload), round_index=2,
                                              session=masked.session, stage=3)))
    # topics the protocol does not use
    for topic in (up("dev-00", "bogus"), f"{BASE}/up/dev-00", f"{BASE}/uplink/dev-00/ready",
                  "fleetlearn/v1/otherfleet/up/dev-00/ready", "$SYS/fleetlearn", "random/topic"):
        mosquitto_pub(port, topic, frame(whole), scratch)
    return sent


def flood_and_downlink_attacks(run: Running) -> dict:
    """Round 3: a flood from one client, and NaN / out-of-range floats on the downlink towards the devices."""
    attacker, port = run.attacker, run.broker.port
    started = time.monotonic()
    count = 3000
    flood = frame(envelope_bytes(MessageKind.READY, "mallory", b"\x01" * 32))
    infos = [attacker.client.publish(up("mallory", "ready"), flood, qos=0) for _ in range(count)]
    for info in infos[-1:]:
        info.wait_for_publish(20)
    # a plan whose learning rate is NaN, then one whose learning rate is negative (floats travel only downlink)
    plan = RoundPlan.from_bytes(run.fleet_plan_bytes)
    lr = struct.pack(">d", plan.training.lr)
    raw = plan.to_bytes()
    assert raw.count(lr) == 1
    for bad in (float("nan"), -1.0):
        forged = raw.replace(lr, struct.pack(">d", bad))
        attacker.publish(f"{BASE}/plan/0", frame(envelope_bytes(MessageKind.PLAN, "aggregator", forged,
                                                                round_index=plan.round_index)))
    # a model with NaN parameters, signed with the aggregator's own key (a compromised or buggy aggregator)
    layout = ParameterLayout.of(run.params)
    vector = layout.flatten(run.params).astype(np.float32)
    vector[3] = np.nan
    release = ModelRelease.of(FLEET, 1000, vector.astype("<f4").tobytes()).sign(run.aggregator_key)
    mosquitto_pub(port, f"{BASE}/model/0", frame(envelope_bytes(MessageKind.MODEL, "aggregator", release.to_bytes(),
                                                                round_index=1000)), run.scratch)
    return {"flood_count": count, "flood_seconds": time.monotonic() - started}


# --- the fleet ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    if not MOSQUITTO or not MOSQUITTO_PUB:
        pytest.skip("mosquitto and mosquitto_pub are needed (apt-get install mosquitto mosquitto-clients)")
    root = tmp_path_factory.mktemp("bad_input")
    broker = MosquittoBroker(root, "set_tcp_nodelay true").start()
    (root / "fleet").mkdir()
    fleet = make_fleet(root / "fleet", len(HONEST) + 1, broker.url, tmp_path_factory.getbasetemp(),
                       rounds={"count": ROUNDS, "cohort_min": len(HONEST), "cohort_max": len(HONEST),
                               "interval": 0.5},
                       privacy={"dropout": 0.0})
    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        store.revoke(REVOKED, now=time.time(), reason="lost")
    scratch = root / "payloads"
    scratch.mkdir()
    run = Running(fleet, broker, scratch)
    from aggregator.service.service import load_or_create_identity
    from edge_sdk.training import load_bundle

    run.aggregator_key = load_or_create_identity(fleet.state_dir / "aggregator.key")
    run.params = dict(load_bundle(fleet.bundle).initial_params)
    results: dict = {}
    try:
        run.round_end(1)
        round_1_ended = time.monotonic()
        for round_index, attacks in ((2, chunk_attacks), (3, flood_and_downlink_attacks)):
            run.plan_published(round_index)
            run.devices[FROZEN].popen.send_signal(signal.SIGSTOP)
            with open_store(fleet.state_dir / "aggregator.sqlite") as store:
                run.fleet_plan_bytes = store.plan(round_index).payload
            if attacks is chunk_attacks:
                results.update(attacks(run, round_1_ended))
            else:
                results.update(attacks(run))
            time.sleep(0.5)
            run.alive()
            run.devices[FROZEN].popen.send_signal(signal.SIGCONT)
            run.round_end(round_index)
        deadline = time.monotonic() + 30
        while run.aggregator.popen.poll() is None and time.monotonic() < deadline:
            run.read()
            time.sleep(0.05)
        run.read()
        results["aggregator_exit"] = run.aggregator.popen.returncode
        run.alive_devices = {d: p.popen.poll() is None for d, p in run.devices.items()}
        run.results = results
        yield run
    finally:
        run.stop()
        broker.stop()


def refused(run: Running, *needles: str) -> dict:
    lines = run.refusals(*needles)
    assert lines, f"no refusal logged containing {needles}:\n" + "\n".join(
        e.get("message", "") for e in run.events if e.get("level") == "WARNING")
    return lines[0]


# --- one test per class ---------------------------------------------------------------------------

def test_the_rounds_complete_with_the_honest_devices_and_the_model_their_updates_give(attacked):
    from edge_sdk.training import ModelSession, TrainingState

    assert attacked.results["aggregator_exit"] == 0, attacked.tail()  # ran its 3 rounds, exited cleanly
    assert all(attacked.alive_devices.values()), attacked.alive_devices
    fleet = attacked.fleet
    state = TrainingState(ModelSession.open(fleet.bundle, threads=1))
    layout = ParameterLayout.of(state.get_params())
    with open_store(fleet.state_dir / "aggregator.sqlite") as store:
        assert [r.round_index for r in store.rounds(RoundStatus.COMPLETED)] == [1, 2, 3]
        assert [m for m in range(5) if store.model(m) is not None] == [0, 1, 2, 3]  # one version per round
        events = {e.round_index: e.event for e in store.accounting_events()}
        for round_index in (1, 2, 3):
            assert sorted(events[round_index]["contributors"]) == list(HONEST), round_index
            plan = RoundPlan.from_bytes(store.plan(round_index).payload)
            base = np.frombuffer(store.model(round_index - 1).payload, "<f4").astype(np.float32)
            new = np.frombuffer(store.model(round_index).payload, "<f4").astype(np.float32)
            expected = replay_round(fleet, plan, base, sorted(HONEST), layout, state)
            assert np.max(np.abs(new - expected)) <= 1e-6 + 4 * plan.encoding.gamma, round_index


def test_garbage_bytes_are_refused_by_the_channel(attacked):
    refused(attacked, "refused a message on", up("dev-00", "advertise_keys"))
    refused(attacked, "refused a message on", up("dev-01", "share_keys"))


def test_a_truncated_chunk_is_refused(attacked):
    line = refused(attacked, "refused a message on", up("dev-00", "ready"))
    assert "refused" in line["message"]


def test_an_oversized_payload_is_refused(attacked):
    refused(attacked, "refused a message on", up("dev-01", "masked_input"))


def test_a_declared_chunk_count_of_2_to_the_31_is_refused(attacked):
    refused(attacked, "refused a message on", up("dev-02", "masked_input"), "count")


def test_a_wrong_digest_is_refused(attacked):
    refused(attacked, "refused a message on", up("dev-00", "ready"), "digest")


def test_more_chunks_than_the_rounds_largest_message_needs_are_refused(attacked):
    assert attacked.results["split_chunks"] >= 3
    refused(attacked, "refused a message on", up("dev-01", "ready"), f"chunk count {attacked.results['split_chunks']}")


def test_out_of_order_messages_are_accepted_and_a_duplicate_is_delivered_once(attacked):
    early, late = attacked.results["reordered_sequences"]
    assert attacked.attacker.receipts_for("dev-01", late) == 1  # reassembled, digest-checked, acknowledged
    assert attacked.attacker.receipts_for("dev-01", early) == 2  # every copy is acknowledged ...
    duplicates = [e for e in attacked.events if f"duplicate ADVERTISE_KEYS from dev-01 (sequence {early})"
                  in e.get("message", "")]
    assert len(duplicates) == 1  # ... and the second one is dropped as a duplicate, not delivered again
    kinds = {e["message"].split(")")[0] for e in attacked.events if e.get("device") == "dev-01"
             and e.get("message", "").startswith("rejected (plan:")}
    assert {"rejected (plan:AdvertiseKeys", "rejected (plan:ShareKeys"} <= kinds, kinds  # delivered: round 1's


def test_an_unsigned_envelope_is_refused(attacked):
    refused(attacked, "rejected (plan:Ready)", FROZEN, "missing or malformed signature")


def test_a_wrong_signature_is_refused(attacked):
    refused(attacked, "rejected (plan:Ready)", FROZEN, "does not verify against the enrolled key")


def test_a_valid_signature_over_another_devices_topic_is_refused(attacked):
    refused(attacked, "rejected (SenderMismatchError)", FROZEN)
    refused(attacked, "refused a message on", up(FROZEN, "ready"), "dev-00")


def test_a_revoked_device_is_refused(attacked):
    refused(attacked, "rejected (plan:Ready)", REVOKED, "not enrolled")


def test_replays_of_an_earlier_round_and_session_are_refused(attacked):
    duplicates = [e for e in attacked.events if "duplicate SHARE_KEYS from dev-02" in e.get("message", "")]
    assert duplicates  # the exact bytes: the channel knows the sequence; acknowledged again, never delivered
    replays = [e for e in attacked.refusals("rejected (plan:ShareKeys)") if e.get("device") == "dev-02"]
    assert replays  # re-sequenced: delivered, and the round refuses the earlier session's message


def test_a_masked_input_of_the_wrong_bits_or_length_is_refused(attacked):
    refused(attacked, "rejected (WireFormatError)", "up/dev-00/masked_input", "packed at 16 bits, the round uses 24")
    assert len(attacked.refusals("rejected (WireFormatError)", "up/dev-00/masked_input")) == 2  # the count too


def test_nan_and_out_of_range_floats_on_the_downlink_are_refused_by_the_devices(attacked):
    for device, process in attacked.devices.items():
        text = process.text()
        assert "refused a message on fleetlearn/v1/digits/plan" in text and "finite" in text, device
        assert "learning rate" in text or "lr" in text, device
        assert "NaN or infinite parameters" in text, device
        memory = json.loads((attacked.fleet.devices[device] / "agent.json").read_text())
        assert memory["model_version"] == ROUNDS - 1 or memory["model_version"] == ROUNDS  # never 1000


def test_a_flood_from_one_client_is_rate_limited(attacked):
    line = refused(attacked, "rejected (flood)", "mallory")
    assert line.get("device") == "mallory"
    # what got past the guard reached the channel: the first copy delivered, the rest dropped there as duplicates
    admitted = 1 + sum("duplicate READY from mallory" in e.get("message", "") for e in attacked.events)
    assert 1 < admitted < attacked.results["flood_count"] / 4, admitted


def test_messages_on_unused_topics_are_refused_or_never_delivered(attacked):
    refused(attacked, "rejected (unused_topic)", "bogus")
    for topic in ("otherfleet", "$SYS", "random/topic", "uplink"):
        assert not any(topic in e.get("message", "") for e in attacked.events)  # not subscribed: never delivered
