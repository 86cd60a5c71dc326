"""``simulate``: a real aggregator service, device workers as OS processes, real brokers (amqtt and Mosquitto).

What is proved here: a small fleet completes its rounds on the embedded broker and on Mosquitto,
and the two reports are equal apart from timings and the broker's name, bytes each way included
(so the report is a function of the seed, not of the broker or the timing); with 10% dropout per
stage and 5% crashes a round completes, with exactly the devices the seeded schedule left
standing, precisely when those survivors reach the noise floor the devices accept (t_honest after
the colluders they assume), and otherwise aborts naming the threshold or the floor, and the next
round still runs; a crashed device's ledger counts each round once; and two ``--shard`` processes
complete a round together over one broker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker

from aggregator.simulator import simulate
from aggregator.simulator.faults import FaultSchedule
from aggregator.simulator.fleet_setup import device_id
from aggregator.simulator.records import without_timings
from aggregator.simulator.scenario import FAULT_STAGES, Scenario
from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.privacy.noise_floor import expected_count, honest_contributors
from edge_sdk.protocol.device_round import DeviceConfig

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not MOSQUITTO, reason="mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    path = tmp_path_factory.mktemp("bundle") / "bundle"
    compile_model(model_zoo.mlp((64, 16, 10), seed=0), path, loss="cross_entropy", optimizer="sgd")
    return path


@pytest.fixture
def mosquitto(tmp_path):
    running = MosquittoBroker(tmp_path, "set_tcp_nodelay true").start()
    yield running
    running.stop()


def _comparable(report) -> dict:
    """The report less timings and the broker's name: everything else, bytes each way included, is the seed's.

    (The rosters' sizes depend on every device's X25519 keys and the server's round nonce; the
    simulator seeds both, SIMULATION ONLY, through ``DeviceConfig.noise_seed`` and the service's
    ``randomness``.)"""
    data = without_timings(report.to_json())
    data.pop("broker")
    return data


@pytest.mark.slow
def test_a_small_fleet_gives_the_same_report_on_amqtt_and_on_mosquitto(tmp_path, bundle, mosquitto):
    scenario = Scenario(devices=12, rounds=2, bundle=bundle, epsilon=10.0, partition="iid", seed=5, lr=0.2)
    embedded = simulate(scenario, tmp_path / "runs", run_id="embedded")
    assert embedded.broker.startswith("embedded amqtt 0.12")
    assert [r.status for r in embedded.rounds] == ["completed", "completed"]
    assert all(r.participants == r.invited == 12 and not r.dropouts for r in embedded.rounds)
    assert 0 < embedded.rounds[0].epsilon < embedded.rounds[1].epsilon <= 10.0 * 1.01
    assert all(r.accuracy is not None and r.bytes_up > 0 and r.bytes_down > 0 and r.messages > 0
               for r in embedded.rounds)
    run_dir = tmp_path / "runs" / "embedded"
    written = json.loads((run_dir / "report.json").read_text())
    assert written["rounds"][1]["participants"] == 12 and written["config"]["devices"] == 12
    assert all((run_dir / f"{name}.png").stat().st_size > 0 for name in ("accuracy", "epsilon", "bytes"))

    external = simulate(Scenario(**{**scenario.__dict__, "broker": mosquitto.url}), tmp_path / "runs",
                        run_id="mosquitto")
    assert external.broker == f"external broker at {mosquitto.url}"
    assert _comparable(external) == _comparable(embedded)  # same seed: same cohorts, noise, bytes, accuracy, ε


def _faulty(seed: int, bundle: Path, broker: str) -> Scenario:
    # expected_dropout 0.3: the plan's (k, t) = (12, 7) and t_honest are made for the losses injected (about 40%
    # over five stages); calibrated for 5%, (k, t) = (4, 3) and nearly every device loses a holder.
    return Scenario(devices=16, rounds=3, bundle=bundle, epsilon=10.0, partition="iid", seed=seed,
                    dropout={s: 0.1 for s in FAULT_STAGES}, crash={s: 0.05 for s in FAULT_STAGES}, broker=broker,
                    expected_dropout=0.3)


def _seed_with_late_crash(bundle: Path) -> int:
    """A seed whose schedule crashes some device after its masked input left (so its ledger holds the round)."""
    for seed in range(200):
        schedule = FaultSchedule.of(_faulty(seed, bundle, "mqtt://127.0.0.1:1"))
        faults = [schedule.fault(r, device_id(i)) for r in (1, 2, 3) for i in range(16)]
        if any(f is not None and f.kind == "crash" and f.stage in ("CONSISTENCY_CHECK", "UNMASK") for f in faults):
            return seed
    raise AssertionError("no seed in 0..199 crashes a device late")


@pytest.mark.slow
def test_dropouts_and_crashes_complete_or_abort_each_round_cleanly(tmp_path, bundle, mosquitto):
    scenario = _faulty(_seed_with_late_crash(bundle), bundle, mosquitto.url)
    report = simulate(scenario, tmp_path / "runs", run_id="faults")
    schedule = FaultSchedule.of(scenario)
    # What the devices (and the server) accept: a sum over at least t_honest honest survivors after the
    # colluders every device assumes (its own DeviceConfig.colluding_fraction, 0.05 as the plan's); at 16
    # devices, t_honest = 10 and 1 colluder: at least 11 survivors of the masked-input stage.
    t_honest = honest_contributors(16, scenario.expected_dropout, scenario.colluding)
    colluders = expected_count(DeviceConfig.colluding_fraction, 16)
    assert (t_honest, colluders) == (10, 1)
    assert [r.round_index for r in report.rounds] == [1, 2, 3]  # an aborted round does not stop the run
    for r in report.rounds:
        scheduled = {s: 0 for s in FAULT_STAGES}
        for i in range(16):
            fault = schedule.fault(r.round_index, device_id(i))
            if fault is not None:
                scheduled[fault.stage] += 1
        # every injected fault, nothing else, in each stage the round reached (an aborted round stops early)
        reached = FAULT_STAGES if r.status == "completed" else \
            FAULT_STAGES[:1 + max(map(FAULT_STAGES.index, r.dropouts), default=0)]
        assert r.dropouts == {s: n for s, n in scheduled.items() if n and s in reached}
        survivors = r.invited - sum(scheduled[s] for s in ("TRAIN", "SHARE_KEYS", "MASKED_INPUT"))
        # The round completes exactly when its survivors reach the noise floor; then it sums exactly them.
        assert (r.status == "completed") == (survivors - colluders >= t_honest), (r, survivors)
        if r.status == "completed":
            assert r.abort_reason is None and r.participants == survivors
        else:
            # Too few survivors: the server first leaves out every device with fewer than t of its own share
            # holders among them (a fixed point, which with k = 12 of 16 empties the set well above
            # t_honest), so the reason names the threshold t, or else the noise floor (t_honest).
            assert r.status == "aborted" and r.participants == 0
            assert re.search(r"below the threshold t=7$|t_honest=10", r.abort_reason), r.abort_reason
    assert {r.status for r in report.rounds} == {"completed", "aborted"}  # this seed has rounds of each kind
    # every device's ledger holds each round at most once, crashed and re-created or not
    for i in range(16):
        ledger = DeviceLedger.snapshot(tmp_path / "runs" / "faults" / "fleet" / device_id(i) / "privacy.ledger")
        rounds = [record["data"]["round"] for record in ledger._records if record["kind"] == "participation"]
        assert len(rounds) == len(set(rounds)) <= 3


@pytest.mark.slow
def test_two_shards_complete_a_round_over_one_broker(tmp_path, bundle, mosquitto):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def shard(i: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "simulate", "--devices", "8", "--rounds", "1",
                                 "--bundle", str(bundle), "--epsilon", "10", "--partition", "iid", "--workers", "1",
                                 "--shard", f"{i}/2", "--broker", mosquitto.url, "--run-id", "sharded", "--out",
                                 str(tmp_path / f"machine-{i}"), "--plain"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    other = shard(1)
    main = shard(0)
    out, err = main.communicate(timeout=300)
    other_out, other_err = other.communicate(timeout=60)
    assert main.returncode == 0, err
    assert other.returncode == 0, other_err
    report = json.loads((tmp_path / "machine-0" / "sharded" / "report.json").read_text())
    assert report["rounds"][0]["status"] == "completed" and report["rounds"][0]["participants"] == 8
    assert "final accuracy" in out and "report.json" in out
    assert "shard 1/2" in other_out
    # shard 1 ran the odd devices, shard 0 the even ones
    assert sorted(p.name for p in (tmp_path / "machine-1" / "sharded-shard1" / "fleet").iterdir()
                  if p.name.startswith("dev-")) == [device_id(i) for i in range(1, 8, 2)]
