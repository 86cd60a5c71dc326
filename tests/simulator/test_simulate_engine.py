"""``simulate``: a real aggregator service, device workers as OS processes, real brokers (amqtt and Mosquitto).

What is proved here: a small fleet completes its rounds on the embedded broker and on Mosquitto,
and the two reports are equal apart from timings and the broker's name (so the report is a
function of the seed, not of the broker or the timing); with 10% dropout per stage and 5% crashes
every round either completes with exactly the devices the seeded schedule left standing, or
aborts naming why, and the next round still runs; a crashed device's ledger counts each round
once; and two ``--shard`` processes complete a round together over one broker.
"""

from __future__ import annotations

import json
import os
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
    """The report less timings and the broker's name, and less ``bytes_down``: each SecAgg+ roster carries
    the adverts of the member's mask partners, whom devices draw from their fresh X25519 keys and the
    server's fresh round nonce (OS randomness by design, not the seed), so its length varies by a few
    dozen bytes per device from run to run."""
    data = without_timings(report.to_json())
    data.pop("broker")
    for r in data["rounds"]:
        r.pop("bytes_down")
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
    assert [r.round_index for r in report.rounds] == [1, 2, 3]  # an aborted round does not stop the run
    for r in report.rounds:
        scheduled = {s: 0 for s in FAULT_STAGES}
        for i in range(16):
            fault = schedule.fault(r.round_index, device_id(i))
            if fault is not None:
                scheduled[fault.stage] += 1
        if r.status == "completed":
            assert r.abort_reason is None
            assert r.dropouts == {s: n for s, n in scheduled.items() if n}  # every injected fault, nothing else
            lost_before_sum = sum(scheduled[s] for s in ("TRAIN", "SHARE_KEYS", "MASKED_INPUT"))
            assert r.participants == r.invited - lost_before_sum  # the survivors, exactly
        else:
            assert r.status == "aborted" and r.abort_reason and r.participants == 0
    assert any(r.status == "completed" for r in report.rounds)
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
