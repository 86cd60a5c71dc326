"""Every (stage, message kind) pair of DeviceRound and HostRound: valid ones advance, the rest are refused,
recorded, and answered with nothing. Messages are the real ones of an honest round, captured off the broker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aggregator.rounds.host_round import HostStage, handle_host, start_host_round
from edge_sdk.protocol.device_round import DeviceStage, handle_device, resolve_device, start_device
from edge_sdk.protocol.effects import CheckEligibility, Eligibility, Train
from edge_sdk.protocol.messages import Decline, DeclineReason, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.protocol.routing import Router
from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as sm
from edge_sdk.secagg.client import ClientConfig, handle_client, start_client
from edge_sdk.secagg.keys import IdentityKey

from .conftest import FLEET, PARAMS, build_small_fleet

DEVICE = "dev-1"


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    sf = build_small_fleet(tmp_path_factory.mktemp("ledgers"))
    plan = sf.plan()
    outcome = sf.fleet.run_round(plan, PARAMS)
    assert outcome.host.stage is HostStage.PUBLISH
    limits = sf.fleet.host.router.limits
    down, up = Router(FLEET, DEVICE, limits), Router(FLEET, "aggregator", limits)
    to_device, from_devices = {}, {}
    for sender, topic, payload in sf.fleet.broker.published_log:
        if sender == "aggregator" and (topic.endswith(f"/down/{DEVICE}") or "/down/" not in topic):
            message = down.incoming(topic, payload).message
            to_device.setdefault(type(message), message)
        elif sender == DEVICE:
            message = up.incoming(topic, payload).message
            from_devices.setdefault(type(message), message)
    to_device[sm.Abort] = codec.sign(sm.Abort(bytes(32), plan.round_index, "test abort"), sf.aggregator_key)
    return sf, to_device, from_devices, outcome


DOWN_KINDS = [RoundPlan, ModelRelease, sm.RoundStart, sm.Roster, sm.ShareRelay, sm.SurvivorSet, sm.UnmaskRequest,
              sm.Abort]


def _device_states(sf, to_device):
    """A fresh device taken through its stages with the captured messages and honest effect results."""
    config = sf.fleet.devices[DEVICE].state.config
    fresh = start_device(config)
    with_model = handle_device(fresh, to_device[ModelRelease], 0.0).state
    planned = handle_device(with_model, to_device[RoundPlan], 0.0)
    check = next(e for e in planned.effects if isinstance(e, CheckEligibility))
    ready = resolve_device(planned.state, check, Eligibility(True), 0.0)
    assert ready.state.ready_sent and isinstance(ready.sends[0].message, Ready)
    trained = handle_device(ready.state, to_device[sm.RoundStart], 0.0)
    train = next(e for e in trained.effects if isinstance(e, Train))
    secagg = resolve_device(trained.state, train, dict(train.params), 0.0)
    aborted = replace(secagg.state, stage=DeviceStage.ABORTED)
    return {"plan-waiting": with_model, "plan-ready": ready.state, "train": trained.state, "secagg": secagg.state,
            "aborted": aborted}


VALID_DEVICE = {("plan-waiting", RoundPlan), ("plan-ready", sm.RoundStart), ("plan-ready", sm.Abort),
                ("train", sm.Abort), ("secagg", sm.Abort), ("secagg", sm.Roster)}


@pytest.mark.parametrize("stage", ["plan-waiting", "plan-ready", "train", "secagg", "aborted"])
@pytest.mark.parametrize("kind", DOWN_KINDS, ids=lambda k: k.__name__)
def test_device_transitions(captured, stage, kind):
    sf, to_device, _, _ = captured
    state = _device_states(sf, to_device)[stage]
    step = handle_device(state, to_device[kind], 1.0)
    if kind is ModelRelease:  # the very model it holds: a retained copy, accepted as a no-op in any stage
        assert step.sends == () and step.state.stage is state.stage
        return
    if (stage, kind) in VALID_DEVICE:
        assert step.state.stage is not state.stage or step.sends or step.effects, "a valid message must advance"
        return
    assert step.sends == () and step.effects == (), f"{kind.__name__} in {stage} must send nothing"
    # The device records its own refusals and mirrors its SecAgg+ client's, one entry per refused message.
    assert step.state.stage is state.stage and len(step.state.refusals) == len(state.refusals) + 1


UP_KINDS = [Ready, Decline, sm.AdvertiseKeys, sm.ShareKeys, sm.MaskedInput, sm.ConsistencyCheck, sm.UnmaskShares]


@pytest.mark.parametrize("stage", ["plan", "train", "publish", "aborted"])
@pytest.mark.parametrize("kind", UP_KINDS, ids=lambda k: k.__name__)
def test_host_transitions(captured, stage, kind):
    sf, _, from_devices, outcome = captured
    plan = outcome.host.plan
    messages = dict(from_devices)
    key = sf.identities[DEVICE]
    messages[Decline] = Decline(FLEET, DEVICE, plan.round_index, plan.digest, DeclineReason.BUDGET, "").sign(key)
    opened = start_host_round(sf.host_config, replace(plan, signature=b""), PARAMS, 0.0).state
    # Re-signing the same terms with the same key gives the same plan digest the captured answers name.
    assert opened.plan.digest == plan.digest
    states = {"plan": opened, "publish": outcome.host, "aborted": replace(outcome.host, stage=HostStage.ABORTED)}
    train = opened
    for d in sorted(sf.identities):
        ready = Ready(FLEET, d, plan.round_index, plan.digest).sign(sf.identities[d])
        step = handle_host(train, ready, 0.0)
        train = step.state
    assert train.stage is HostStage.TRAIN
    states["train"] = train
    if (stage, kind) == ("train", sm.AdvertiseKeys):  # an advert for this server's nonce (the captured one is a replay)
        start = next(s.message for s in step.sends if s.to == DEVICE)
        client = start_client(ClientConfig(DEVICE, key, sf.aggregator_key.public, sf.host_config.enrolled,
                                           colluding_fraction=0.0), np.zeros(plan.vector_length, np.uint32), 0.0,
                              plan.round_index, t_honest=plan.t_honest)
        messages[kind] = handle_client(client, start, 0.0)[1][0]
    state = states[stage]
    message = messages[kind]
    step = handle_host(state, message, 1.0)
    if (stage, kind) in {("plan", Ready), ("plan", Decline), ("train", sm.AdvertiseKeys)}:
        assert step.state.refusals == state.refusals
        advanced = step.state.ready != state.ready or step.state.declines != state.declines
        advanced = advanced or (step.state.server is not state.server and not step.state.refusals)
        assert advanced, f"{kind.__name__} in {stage} must be taken"
        return
    assert step.sends == () and step.effects == (), f"{kind.__name__} in {stage} must send nothing"
    assert len(step.state.refusals) == len(state.refusals) + 1 and step.state.stage is state.stage


def test_models_that_are_unsigned_foreign_rolled_back_or_not_the_plans_are_refused(captured):
    sf, to_device, _, outcome = captured
    config = sf.fleet.devices[DEVICE].state.config
    model = to_device[ModelRelease]
    newer = outcome.host.new_model  # version 1
    holding = handle_device(start_device(config), newer, 0.0).state
    assert holding.memory.model_version == 1
    for bad, why in ((replace(newer, signature=b""), "signature"),
                     (ModelRelease.of(FLEET, 2, newer.parameters).sign(IdentityKey.generate()), "Ed25519"),
                     (model, "rollback"),
                     (ModelRelease.of(FLEET, 1, model.parameters).sign(sf.aggregator_key), "other bytes")):
        step = handle_device(holding, bad, 1.0)
        assert step.sends == () and step.state.memory == holding.memory and why in step.state.refusals[-1].reason
    # A verified model whose digest is not the plan's: the device says nothing until the plan's model arrives.
    planned = handle_device(holding, to_device[RoundPlan], 0.0)
    check = next(e for e in planned.effects if isinstance(e, CheckEligibility))
    waiting = resolve_device(planned.state, check, Eligibility(True), 0.0)
    assert waiting.sends == () and not waiting.state.ready_sent
