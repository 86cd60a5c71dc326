"""RoundPlan and the round-layer messages: golden bytes, strict parsing, signatures, stability."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_sdk.protocol.fields import FieldFormatError, encode_fields, split_signature, with_signature
from edge_sdk.protocol.messages import Decline, DeclineReason, ModelDigestError, ModelRelease, Ready
from edge_sdk.protocol.plan import PlanError, RoundPlan, Sampling
from edge_sdk.secagg.errors import SignatureError
from edge_sdk.secagg.keys import IdentityKey

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
sys.path.insert(0, str(VECTORS))
import round_plan_make_golden as golden  # noqa: E402

GOLDEN = json.loads((VECTORS / "round_plan_golden.json").read_text())["vectors"]


@pytest.mark.parametrize("name", ["plan", "plan_minimal", "ready", "decline", "model"])
def test_every_message_has_the_golden_bytes(name):
    assert golden.vectors()[name] == GOLDEN[name], f"the bytes of {name} changed; old peers would not read them"


def test_golden_plans_load_verify_and_round_trip():
    for name, expected in (("plan", golden.sample_plan()), ("plan_minimal", golden.minimal_plan())):
        plan = RoundPlan.from_bytes(bytes.fromhex(GOLDEN[name]))
        plan.verify(golden.AGGREGATOR_KEY.public)
        assert plan == expected and plan.to_bytes().hex() == GOLDEN[name]


def test_an_old_plan_without_optional_fields_loads_with_the_defaults():
    plan = RoundPlan.from_bytes(bytes.fromhex(GOLDEN["plan_minimal"]))
    assert (plan.secagg.threat_model, plan.secagg.stage_timeout, plan.deadlines.ready, plan.check_back_after) == (
        "active", 60.0, 60.0, 600.0)
    assert plan.sampling == Sampling.self_selected(0.25)


def test_a_field_from_a_newer_version_is_refused_by_name():
    body, signature = split_signature(bytes.fromhex(GOLDEN["plan"]), "plan")
    newer = body + struct.pack(">HI", 16, 1) + b"\x01"
    with pytest.raises(FieldFormatError, match="field 16.*newer version"):
        RoundPlan.from_bytes(with_signature(newer, signature))


@pytest.mark.parametrize("cut", [1, 5, 6, 40, -70])
def test_truncated_plans_are_refused(cut):
    data = bytes.fromhex(GOLDEN["plan"])
    with pytest.raises((FieldFormatError, PlanError, SignatureError)):
        plan = RoundPlan.from_bytes(data[:cut] if cut > 0 else data[:cut])
        plan.verify(golden.AGGREGATOR_KEY.public)


def test_fields_out_of_order_or_repeated_are_refused():
    body = encode_fields((), {}) + struct.pack(">HI", 3, 0) + struct.pack(">HI", 2, 0)
    with pytest.raises(FieldFormatError, match="out of order or repeated"):
        RoundPlan.from_bytes(body)


def test_a_plan_signed_by_another_key_or_altered_fails_to_verify():
    plan = golden.sample_plan()
    with pytest.raises(SignatureError):
        plan.verify(IdentityKey.generate().public)
    with pytest.raises(SignatureError):
        replace(plan, t_honest=plan.t_honest - 1).verify(golden.AGGREGATOR_KEY.public)
    with pytest.raises(SignatureError):
        replace(plan, signature=b"").verify(golden.AGGREGATOR_KEY.public)


def test_the_participation_event_comes_from_the_plan():
    plan = golden.sample_plan()
    event = plan.participation_event()
    assert (event.mechanism, event.mode, event.honest_contributors, event.dim) == ("skellam", "distributed", 3, 8)
    assert event.central_variance == pytest.approx((0.75 * 1.0 / 0.001953125) ** 2)
    assert event.sampling_probability is None  # server sampling claims no amplification
    q = replace(golden.minimal_plan(), privacy_mode="distributed", noise_multiplier=1.0).participation_event()
    assert q.sampling_probability == 0.25


@pytest.mark.parametrize("change, match", [
    ({"fleet": "a/b"}, "fleet"), ({"t_honest": 0}, "t_honest"), ({"mechanism": "laplace"}, "mechanism"),
    ({"model_digest": b"short"}, "model_digest"), ({"privacy_mode": "central"}, "privacy mode"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier"), ({"check_back_after": -1.0}, "check_back_after"),
])
def test_inconsistent_plans_are_refused_naming_the_field(change, match):
    with pytest.raises((PlanError, ValueError), match=match):
        replace(golden.sample_plan(), **change)


def test_sampling_is_either_a_sorted_cohort_or_a_probability():
    with pytest.raises(PlanError):
        Sampling("server", ("b", "a"))
    with pytest.raises(PlanError):
        Sampling("self", (), 0.0)
    with pytest.raises(PlanError):
        Sampling("server", ("a",), 0.5)


def test_ready_and_decline_round_trip_and_bind_their_signer():
    plan = golden.sample_plan()
    ready = Ready.from_bytes(bytes.fromhex(GOLDEN["ready"]))
    ready.verify(golden.DEVICE_KEY.public)
    assert ready.plan_digest == plan.digest
    decline = Decline.from_bytes(bytes.fromhex(GOLDEN["decline"]))
    decline.verify(golden.DEVICE_KEY.public)
    assert decline.reason is DeclineReason.BUDGET
    with pytest.raises(SignatureError):
        replace(ready, device_id="dev-b").verify(golden.DEVICE_KEY.public)
    # A Ready's signature does not verify as a Decline's: each type signs under its own domain.
    as_decline = Decline(ready.fleet, ready.device_id, ready.round_index, ready.plan_digest, DeclineReason.BUDGET,
                         "", ready.signature)
    with pytest.raises(SignatureError):
        as_decline.verify(golden.DEVICE_KEY.public)


def test_model_release_checks_its_signature_and_its_digest():
    model = ModelRelease.from_bytes(bytes.fromhex(GOLDEN["model"]))
    model.verify(golden.AGGREGATOR_KEY.public)
    with pytest.raises(ModelDigestError):
        replace(model, parameters=b"\xff" + model.parameters[1:]).verify(golden.AGGREGATOR_KEY.public)
    with pytest.raises(SignatureError):
        replace(model, version=model.version + 1).verify(golden.AGGREGATOR_KEY.public)
    with pytest.raises(SignatureError):
        replace(model, signature=b"").verify(golden.AGGREGATOR_KEY.public)
