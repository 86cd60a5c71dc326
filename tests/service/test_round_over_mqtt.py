"""Acceptance: an aggregator process and 10 device processes, each its own OS process and MQTT connection.

Everything is real: a Mosquitto started on a free port, ``fleetlearn aggregator serve`` and
``fleetlearn device run`` as subprocesses, onnxruntime training of the 64-16-10 digits MLP,
SecAgg+ (active-secure) and distributed DP, the SQLite store, devices killed with SIGKILL.

* With the noise (effectively) off, every new global model equals the previous one plus the mean of
  the contributors' clipped updates, recomputed here from each device's own data and the plan's
  training terms, up to the float32 decode and the quantisation step gamma.
* With the noise on, held-out accuracy rises over three rounds.
* A device killed in the middle of each stage: the round completes with the survivors (at least t
  and t_honest of them), a round that keeps fewer than t_honest aborts cleanly, and the next
  round proceeds; the killed devices restart from their state directories and take part again.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from aggregator.store import RoundStatus, open_store
from edge_sdk.privacy.encoding import clip_l2
from edge_sdk.protocol.device_effects import DeviceEffectHandlers
from edge_sdk.protocol.effects import Train
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.plan import RoundPlan

from .round_fleet import FleetOnDisk, Process, aggregator_command, device_command, make_fleet

pytestmark = pytest.mark.slow

DEVICES = 10


class Fleet:
    """The processes of one test: the aggregator's JSON log lines are parsed as they arrive."""

    def __init__(self, disk: FleetOnDisk, url: str) -> None:
        self.disk, self.url = disk, url
        self.aggregator: Process | None = None
        self.devices: dict[str, Process] = {}
        self.events: list[dict] = []

    def start_aggregator(self) -> None:
        self.aggregator = Process.start("aggregator", aggregator_command(self.disk))

    def start_device(self, device: str) -> None:
        self.devices[device] = Process.start(device, device_command(self.disk, device, self.url))

    def start_all(self) -> None:
        self.start_aggregator()
        for device in self.disk.devices:
            self.start_device(device)

    def read(self) -> list[dict]:
        new = []
        while self.aggregator.lines:
            line = self.aggregator.lines.popleft()
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.events += new
        return new

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.read():
                if predicate(event):
                    return event
            if self.aggregator.popen.poll() is not None and not self.aggregator.lines:
                break
            time.sleep(0.001)
        raise AssertionError(f"timed out waiting for {what}; aggregator log tail:\n"
                             + "".join(self.aggregator.all_lines[-30:]))

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.aggregator.popen.poll() is None:
            self.read()
            time.sleep(0.05)
        self.read()
        assert self.aggregator.popen.poll() is not None, "the aggregator did not finish its rounds in time:\n" + \
            "".join(self.aggregator.all_lines[-40:])
        return self.aggregator.popen.returncode

    def stop(self) -> dict[str, int]:
        codes = {name: p.stop() for name, p in self.devices.items()}
        if self.aggregator is not None:
            codes["aggregator"] = self.aggregator.stop()
        return codes


@pytest.fixture
def fleet_processes():
    fleets: list[Fleet] = []

    def make(disk: FleetOnDisk, url: str) -> Fleet:
        fleets.append(Fleet(disk, url))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.stop()


def replay_round(disk: FleetOnDisk, plan: RoundPlan, base: np.ndarray, contributors: list[str], layout, state):
    """The expected new model: base + mean of each contributor's clipped update, trained here as it did."""
    from edge_sdk.training import load_dataset_npz, prepare_dataset

    updates = []
    for device in contributors:
        data = prepare_dataset(state.session.manifest, *load_dataset_npz(disk.data_of(device)))
        trained = DeviceEffectHandlers(state, data, ledger=None).train(Train(plan, layout.unflatten(base)))
        updates.append(clip_l2(layout.flatten(trained) - base, plan.encoding.clip))
    return base + np.mean(updates, axis=0)


def test_ten_processes_three_rounds_give_the_fedavg_of_the_clipped_updates(tmp_path, broker, tmp_path_factory,
                                                                           fleet_processes):
    disk = make_fleet(tmp_path, DEVICES, broker.url, tmp_path_factory.getbasetemp(), privacy={"clip": 0.8})
    fleet = fleet_processes(disk, broker.url)
    fleet.start_all()
    assert fleet.wait_exit(120) == 0
    codes = fleet.stop()
    assert all(code == 0 for code in codes.values()), codes  # SIGTERM: every agent exits cleanly

    from edge_sdk.training import ModelSession, TrainingState

    state = TrainingState(ModelSession.open(disk.bundle, threads=2))
    layout = ParameterLayout.of(state.get_params())
    with open_store(disk.state_dir / "aggregator.sqlite") as store:
        assert [r.round_index for r in store.rounds(RoundStatus.COMPLETED)] == [1, 2, 3]
        events = {e.round_index: e.event for e in store.accounting_events()}
        for round_index in (1, 2, 3):
            plan = RoundPlan.from_bytes(store.plan(round_index).payload)
            plan.verify(disk.aggregator_public)
            base = np.frombuffer(store.model(round_index - 1).payload, "<f4").astype(np.float32)
            new = np.frombuffer(store.model(round_index).payload, "<f4").astype(np.float32)
            contributors = events[round_index]["contributors"]
            assert len(contributors) == DEVICES
            expected = replay_round(disk, plan, base, contributors, layout, state)
            # float32 decode of a 24-bit sum at gamma ~5e-8: far below any real discrepancy (a missing
            # clip or a missing device moves coordinates by 1e-3 and more)
            assert np.max(np.abs(new - expected)) <= 1e-6 + 4 * plan.encoding.gamma, round_index
    for directory in disk.devices.values():
        memory = json.loads((directory / "agent.json").read_text())
        assert memory["last_round"] == 3 and memory["model_version"] >= 2


def accuracy_of(disk: FleetOnDisk, payload: bytes) -> float:
    from edge_sdk.training import ModelSession, TrainingState, evaluate, load_dataset_npz, prepare_dataset

    state = TrainingState(ModelSession.open(disk.bundle, threads=1))
    layout = ParameterLayout.of(state.get_params())
    state.set_params(layout.from_bytes(payload))
    return evaluate(state, prepare_dataset(state.session.manifest, *load_dataset_npz(disk.heldout))).accuracy


def test_with_the_noise_on_accuracy_on_digits_rises(tmp_path, broker, tmp_path_factory, fleet_processes):
    disk = make_fleet(tmp_path, DEVICES, broker.url, tmp_path_factory.getbasetemp(),
                      privacy={"noise_multiplier": 0.5, "bits": 20},
                      training={"epochs": 5, "lr": 0.3})
    fleet = fleet_processes(disk, broker.url)
    fleet.start_all()
    assert fleet.wait_exit(120) == 0
    with open_store(disk.state_dir / "aggregator.sqlite") as store:
        assert len(store.rounds(RoundStatus.COMPLETED)) == 3
        plan = RoundPlan.from_bytes(store.plan(1).payload)
        assert plan.noise_multiplier == 0.5 and plan.privacy_mode == "distributed"
        first, last = store.model(0).payload, store.model(3).payload
        epsilon = store.accounting_events()[-1].event["fleet_epsilon"]
    before, after = accuracy_of(disk, first), accuracy_of(disk, last)
    assert after > before + 0.2, (before, after)
    assert np.isfinite(epsilon) and epsilon > 0


# The uplink a device sends last before stage S opens, and the stage whose loss the aggregator records.
STOP_AFTER = {"TRAIN": "READY", "ADVERTISE_KEYS": "ADVERTISE_KEYS", "SHARE_KEYS": "ADVERTISE_KEYS",
              "MASKED_INPUT": "SHARE_KEYS", "CONSISTENCY_CHECK": "MASKED_INPUT", "UNMASK": "CONSISTENCY_CHECK"}
LOST_IN = {"TRAIN": "TRAIN", "ADVERTISE_KEYS": "SHARE_KEYS", "SHARE_KEYS": "SHARE_KEYS",
           "MASKED_INPUT": "MASKED_INPUT", "CONSISTENCY_CHECK": "CONSISTENCY_CHECK", "UNMASK": "UNMASK"}


def kill_in_stage(fleet: Fleet, round_index: int, stage: str, count: int = 1) -> list[str]:
    """SIGKILL the first ``count`` devices to answer the stage before ``stage`` while ``stage`` is open.

    They are frozen (SIGSTOP) the moment the aggregator logs their last answer, so they cannot send
    anything for ``stage``, and killed once the aggregator logs that ``stage`` opened. For
    ADVERTISE_KEYS the device is killed as soon as its advert arrived, with the stage still open.
    """
    victims: list[str] = []

    def answered(event: dict) -> bool:
        return (event.get("round") == round_index and event.get("kind") == STOP_AFTER[stage]
                and event.get("device") not in victims)

    while len(victims) < count:
        device = fleet.wait_for(answered, 60, f"{STOP_AFTER[stage]} of round {round_index}")["device"]
        fleet.devices[device].popen.send_signal(signal.SIGKILL if stage == "ADVERTISE_KEYS" else signal.SIGSTOP)
        victims.append(device)
    if stage != "ADVERTISE_KEYS":
        fleet.wait_for(lambda e: e.get("round") == round_index and e.get("stage") == stage
                       and "entered stage" in e.get("message", ""), 60, f"stage {stage} of round {round_index}")
    for device in victims:
        fleet.devices[device].kill()
    return victims


def round_end(fleet: Fleet, round_index: int) -> dict:
    return fleet.wait_for(lambda e: e.get("round") == round_index and e.get("stage") in ("PUBLISH", "ABORTED")
                          and ("contributors" in e or "reason" in e), 90, f"the end of round {round_index}")


def test_a_device_killed_in_each_stage_and_a_round_below_t_honest(tmp_path, broker, tmp_path_factory,
                                                                 fleet_processes):
    disk = make_fleet(tmp_path, DEVICES, broker.url, tmp_path_factory.getbasetemp(),
                      rounds={"count": 7, "cohort_min": DEVICES, "retry_after": 0.2},
                      privacy={"dropout": 0.3, "t_honest": 8})
    fleet = fleet_processes(disk, broker.url)
    fleet.start_all()
    for round_index, stage in enumerate(STOP_AFTER, start=1):
        [victim] = kill_in_stage(fleet, round_index, stage)
        end = round_end(fleet, round_index)
        assert end["stage"] == "PUBLISH", (stage, end)
        lost = [e for e in fleet.events if e.get("round") == round_index and "dropped out" in e.get("message", "")]
        assert [(e["device"], e["stage"]) for e in lost] == [(victim, LOST_IN[stage])], (stage, lost)
        summed = set(end["contributors"])
        assert (victim in summed) == (stage in ("CONSISTENCY_CHECK", "UNMASK")), (stage, victim, summed)
        fleet.start_device(victim)  # rebooted: it resumes from its state directory and joins the next round
    # Three devices lost before their masked inputs: 7 < t_honest = 8, so the sum is never decoded.
    victims = kill_in_stage(fleet, 7, "MASKED_INPUT", count=3)
    end = round_end(fleet, 7)
    assert end["stage"] == "ABORTED" and ("t_honest" in end["reason"] or "noise floor" in end["reason"]), end
    for device in victims:
        fleet.start_device(device)
    end = round_end(fleet, 8)
    assert end["stage"] == "PUBLISH" and len(end["contributors"]) == DEVICES
    assert fleet.wait_exit(30) == 0
    with open_store(disk.state_dir / "aggregator.sqlite") as store:
        assert [r.round_index for r in store.rounds(RoundStatus.COMPLETED)] == [1, 2, 3, 4, 5, 6, 8]
        assert store.round(7).status is RoundStatus.ABORTED
        assert [e.round_index for e in store.accounting_events()] == [1, 2, 3, 4, 5, 6, 8]
        assert store.latest_model().version == 7  # the aborted round published nothing
