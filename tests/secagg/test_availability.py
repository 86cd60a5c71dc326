"""One bad device, or an outsider on the path, cannot take a round down while t honest devices survive.

Only a message that verifies under its claimed sender's own key and breaks the protocol costs that
sender anything: forged, unsigned and replayed messages naming honest devices are ignored, a device's
false accusations exclude nobody, and a corrupted unmasking share is left out and named.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig
from edge_sdk.secagg import codec
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskShares,
)
from edge_sdk.secagg.shamir import PRIME, decode_share, encode_share

from .attacker import exact_sum, ids, make_inputs

N = 20
KINDS = [AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck, UnmaskShares]


@pytest.fixture(scope="module")
def fleet_setup():
    devices = ids(N)
    fleet = Fleet.enrol(devices)
    config = ServerConfig(fleet.server_identity, fleet.enrolled, 16, 16)
    return devices, fleet, config, make_inputs(devices, 16, 16)


@pytest.fixture(scope="module")
def earlier_round(fleet_setup):
    """Every message each device sent in round 1, for replays into round 2."""
    devices, fleet, config, inputs = fleet_setup
    recorded: dict[tuple[str, type], object] = {}

    def record(device, message):
        recorded[(device, type(message))] = message
        return message

    assert not run_session(fleet, config, inputs, round_index=1, uplink_hook=record).aborted
    return recorded


def forge(kind: str, device: str, message, earlier):
    if kind == "unsigned":
        return dataclasses.replace(message, signature=b"")
    if kind == "wrongly signed":
        return codec.sign(message, IdentityKey.generate())
    return earlier[(device, type(message))]


def assert_complete(outcome, inputs, contributors):
    assert not outcome.aborted, outcome.abort_reason
    assert set(outcome.server.contributors) == set(contributors)
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, contributors, 16))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("forgery", ["unsigned", "wrongly signed", "replayed"])
def test_an_outsiders_forged_or_replayed_messages_exclude_nobody(fleet_setup, earlier_round, forgery, kind):
    devices, fleet, config, inputs = fleet_setup
    named = set(devices[::3])  # the outsider forges a message in the name of every third device

    def uplink(device, message):
        if device in named and isinstance(message, kind):
            return [forge(forgery, device, message, earlier_round), message]  # the forgery arrives first
        return message

    outcome = run_session(fleet, config, inputs, round_index=2, uplink_hook=uplink)
    assert outcome.server.offenders == frozenset()
    assert {r.sender for r in outcome.server.rejections} == named
    assert_complete(outcome, inputs, devices)


def test_one_devices_false_accusations_exclude_nobody(fleet_setup):
    devices, fleet, config, inputs = fleet_setup
    liar = devices[4]
    senders: list[str] = []

    def downlink(device, message):
        if device == liar and hasattr(message, "shares") and type(message).__name__ == "ShareRelay":
            senders.extend(share.sender for share in message.shares)
        return message

    def uplink(device, message):
        if device == liar and isinstance(message, MaskedInput):
            accusing = dataclasses.replace(message, rejected=tuple(sorted(senders)))
            return codec.sign(accusing, fleet.identities[liar])  # signed with its own key
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink, downlink_hook=downlink)
    assert senders and outcome.server.accusations[liar] == tuple(sorted(senders))
    assert outcome.server.offenders == frozenset()
    assert_complete(outcome, inputs, devices)


@pytest.mark.parametrize("pick", [0, -1], ids=["lowest-x", "highest-x"])  # among the t lowest x's, or above
@pytest.mark.parametrize("secret", ["self-mask", "mask-key"])
def test_one_corrupted_unmasking_share_is_left_out_and_its_sender_named(fleet_setup, secret, pick):
    devices, fleet, config, inputs = fleet_setup
    dropped = devices[7]  # drops after sharing keys: its mask-key shares are asked for
    field, owner = ("self_mask_shares", devices[3]) if secret == "self-mask" else ("mask_key_shares", dropped)
    asked: list[str] = []  # every unmask request goes out before the first answer comes back

    def downlink(device, message):
        if isinstance(message, UnmaskRequest):
            owners = message.self_mask_owners if secret == "self-mask" else message.mask_key_owners
            if owner in owners:
                asked.append(device)
        return message

    def uplink(device, message):
        if isinstance(message, UnmaskShares) and device == sorted(asked)[pick]:
            pairs = tuple((o, encode_share((decode_share(raw) + 1) % PRIME)) if o == owner else (o, raw)
                          for o, raw in getattr(message, field))
            return codec.sign(dataclasses.replace(message, **{field: pairs}), fleet.identities[device])
        return message

    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: {dropped}}, uplink_hook=uplink,
                          downlink_hook=downlink)
    assert len(asked) > outcome.server.threshold  # more than t shares: the bad one can be left out
    assert_complete(outcome, inputs, set(devices) - {dropped})
    assert outcome.server.bad_shares == {owner: (sorted(asked)[pick],)}
