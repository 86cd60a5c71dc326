"""Whole rounds on the round layer: HostRound, DeviceRounds, the pump and the memory transport."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from aggregator.rounds import host_round
from aggregator.rounds.host_round import HostStage, start_host_round
from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig
from edge_sdk.privacy.encoding import clip_l2
from edge_sdk.privacy.ledger import DeviceLedger
from edge_sdk.protocol.device_round import DeviceStage
from edge_sdk.protocol.effects import AccountRound
from edge_sdk.protocol.routing import Router
from edge_sdk.secagg.messages import MaskedInput, Stage
from edge_sdk.transport.memory import drop_where

from .conftest import FLEET, NOISE, PARAMS


def test_a_round_publishes_the_fedavg_of_the_contributors_and_devices_accept_it(small_fleet):
    sf = small_fleet
    outcome = sf.fleet.run_round(sf.plan(), PARAMS)
    host = outcome.host
    assert host.stage is HostStage.PUBLISH, host.abort_reason
    assert host.contributors == tuple(sorted(sf.identities))
    expected = np.mean([clip_l2(s, 10.0) for s in sf.steps.values()], axis=0)
    # Rounding moves each rotated coordinate by under one step gamma; the noise of the mean has std z*C/n.
    tolerance = 1e-4 * np.sqrt(16) + 6 * NOISE * 10.0 / len(sf.steps) * np.sqrt(16)
    assert np.linalg.norm(host.new_params - expected) <= tolerance
    assert np.linalg.norm(expected) > 3 * tolerance
    assert host.new_model.version == 1
    host.new_model.verify(sf.aggregator_key.public)
    assert all(s.stage is DeviceStage.DONE and s.memory.model_version == 1 for s in outcome.devices.values())
    assert [a.contributors for a in sf.accounted] == [host.contributors]


def test_a_device_silent_from_its_masked_input_on_is_left_out_and_the_next_round_goes_on(small_fleet):
    sf = small_fleet
    gone = drop_where(lambda topic, _: "/up/dev-2/" in topic and topic.rsplit("/", 1)[1] in (
        "masked_input", "consistency_check", "unmask_shares"))
    first = sf.fleet.run_round(sf.plan(), PARAMS, faults=[gone])
    assert first.host.stage is HostStage.PUBLISH and "dev-2" not in first.host.contributors
    params = sf.layout.unflatten(first.host.new_params)
    second = sf.fleet.run_round(sf.plan(round_index=2, model_version=1, params=params), params)
    assert second.host.stage is HostStage.PUBLISH and "dev-2" in second.host.contributors
    assert second.host.new_model.version == 2


def test_the_ledger_entry_is_on_disk_before_the_masked_input_leaves(small_fleet):
    """Invariant 1: fails if MaskedInput could leave before RecordParticipation's fsync returned its head."""
    sf = small_fleet
    seen = []
    router = Router(FLEET, "aggregator", sf.fleet.host.router.limits)

    def check(sender, topic, payload):
        if not topic.endswith("/masked_input"):
            return
        router.limits = sf.fleet.host.router.limits  # this round's limits
        message = router.incoming(topic, payload).message
        assert isinstance(message, MaskedInput)
        on_disk = DeviceLedger.snapshot(sf.ledgers[sender].path)  # a fresh read of the files
        assert on_disk.head().to_bytes() == message.ledger_head, "the MaskedInput left before its ledger entry"
        assert [r for r, _ in on_disk.participations()] == [f"{FLEET}/round-1"]
        seen.append(sender)

    sf.fleet.broker.publish_hooks.append(check)
    outcome = sf.fleet.run_round(sf.plan(), PARAMS)
    assert outcome.host.stage is HostStage.PUBLISH
    assert sorted(seen) == sorted(sf.identities)


def test_no_ledger_entry_means_no_masked_input(small_fleet):
    """A device whose ledger refuses the record (over budget at record time) sends nothing masked."""
    sf = small_fleet
    sf.ledgers["dev-4"].close()  # a closed ledger cannot record: the effect fails
    masked = []
    sf.fleet.broker.publish_hooks.append(lambda s, t, p: masked.append(s) if t.endswith("/masked_input") else None)
    outcome = sf.fleet.run_round(sf.plan(), PARAMS)
    assert "dev-4" not in masked and "dev-4" not in outcome.host.contributors
    assert outcome.devices["dev-4"].stage is DeviceStage.ABORTED
    assert "could not be recorded" in outcome.devices["dev-4"].error


def test_host_round_never_decodes_below_the_plans_t_honest(small_fleet, monkeypatch):
    """Invariant 2: a sum the server produced with fewer contributors than t_honest is not decoded."""
    sf = small_fleet
    devices = sorted(sf.identities)
    fleet = Fleet(sf.aggregator_key, sf.identities)
    plan = sf.plan(t_honest=6)
    step = start_host_round(sf.host_config, plan, PARAMS, 0.0)
    # A server configured with a lower floor than the plan's (a bug, or a config drift): 5 inputs summed.
    config = ServerConfig(sf.aggregator_key, fleet.enrolled, bits=24, vector_length=plan.vector_length, degree=5,
                          threshold=4, colluding_fraction=0.0, noise_floor=2)
    inputs = {d: np.zeros(plan.vector_length, dtype=np.uint32) for d in devices}
    session = run_session(fleet, config, inputs, round_index=1, drop_at={Stage.MASKED_INPUT: {"dev-0"}})
    assert session.server.stage is Stage.DONE and len(session.server.contributors) == 5
    state = replace(step.state, stage=HostStage.SECAGG, server=session.server, cohort=tuple(devices))

    decoded = []
    monkeypatch.setattr(host_round, "decode_sum", lambda *a: decoded.append(a) or np.zeros(plan.vector_length))
    refused = host_round._after_server(state, [], 1.0)
    assert refused.state.stage is HostStage.ABORTED and "not decoded" in refused.state.abort_reason
    assert decoded == [] and not any(isinstance(e, AccountRound) for e in refused.effects)
    # The check has teeth: at t_honest = 5 the same sum is decoded and accounted.
    allowed = host_round._after_server(replace(state, plan=replace(plan, t_honest=5)), [], 1.0)
    assert allowed.state.stage is HostStage.AGGREGATE and len(decoded) == 1
