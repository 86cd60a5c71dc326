"""Whole SecAgg+ sessions through the in-memory driver: exact sums, dropouts, aborts, attacks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig, start_server
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import handle_client, start_client, tick_client
from edge_sdk.secagg.errors import (
    ConsistencyError,
    ProtocolViolationError,
    ReplayError,
    SignatureError,
)
from edge_sdk.secagg.graph import holder_seed, share_holders
from edge_sdk.secagg.keys import AgreementKey, IdentityKey
from edge_sdk.secagg.membership import from_bitmap, to_bitmap
from edge_sdk.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    Roster,
    ShareKeys,
    ShareRelay,
    Stage,
    SurvivorSet,
    UnmaskRequest,
)
from edge_sdk.secagg.parameters import ThreatModel, choose_parameters

from .attacker import exact_sum, ids, make_inputs, resign

DROP_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK]
# Devices dropping at these stages have already submitted their masked input: they stay in the sum.
INPUT_SUBMITTED = {Stage.CONSISTENCY_CHECK, Stage.UNMASK}


def setup(n: int, degree: int | None, threshold: int | None, length: int = 32, bits: int = 16, seed: int = 0,
          noise_floor: int | None = 1, **settings):
    """A small fleet with an explicit active-secure (k, t) (2t > k + 1, t <= k).

    ``noise_floor`` is 1 unless given: these tests are about masking and dropouts, the noise floor
    has its own tests (test_malicious_server), and at n ~ 10 the default t_honest allows one dropout.
    """
    devices = ids(n)
    fleet = Fleet.enrol(devices)
    config = ServerConfig(fleet.server_identity, fleet.enrolled, bits, length, degree=degree, threshold=threshold,
                          noise_floor=noise_floor, **settings)
    return devices, fleet, config, make_inputs(devices, length, bits, seed)


resign_as_server = resign


# --- correctness ----------------------------------------------------------------------------------


def test_unmasked_result_is_the_exact_sum_of_every_input():
    devices, fleet, config, inputs = setup(10, 4, 3)
    outcome = run_session(fleet, config, inputs)
    assert not outcome.aborted, outcome.abort_reason
    assert outcome.server.contributors == tuple(devices)
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, devices, 16))
    assert all(c.stage is Stage.DONE for c in outcome.clients.values())


@pytest.mark.parametrize("stage", DROP_STAGES, ids=lambda s: s.name)
def test_sum_is_exact_over_survivors_with_dropouts_at_each_stage(stage):
    devices, fleet, config, inputs = setup(12, 6, 4)
    dropped = {devices[1], devices[7]}
    outcome = run_session(fleet, config, inputs, drop_at={stage: dropped})
    assert not outcome.aborted, outcome.abort_reason
    expected = set(devices) if stage in INPUT_SUBMITTED else set(devices) - dropped
    assert set(outcome.server.contributors) == expected
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, expected, 16))


def test_sum_is_exact_with_dropouts_at_every_stage_in_one_round():
    devices, fleet, config, inputs = setup(16, 10, 6, bits=32)  # 5 drops leave every device t shares
    drops = {stage: {devices[i]} for i, stage in enumerate(DROP_STAGES)}
    outcome = run_session(fleet, config, inputs, drop_at=drops)
    assert not outcome.aborted, outcome.abort_reason
    expected = set(devices) - set(devices[:3])
    assert set(outcome.server.contributors) == expected
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, expected, 32))


@st.composite
def sessions(draw):
    n = draw(st.integers(3, 9))
    degree = draw(st.integers(2, n - 1))
    threshold = draw(st.integers((degree + 1) // 2 + 1, degree))  # a strict majority, and t <= k
    length = draw(st.integers(1, 40))
    bits = draw(st.integers(8, 32))
    drop = draw(st.lists(st.sampled_from([None, *DROP_STAGES]), min_size=n, max_size=n))
    return n, degree, threshold, length, bits, drop, draw(st.integers(0, 2**16))


ABORT_REASONS = ("below the threshold", "cannot reconstruct", "consistency quorum", "at least 2")


@given(sessions())
@settings(max_examples=25, deadline=None)
def test_property_result_is_exact_sum_mod_2_to_the_b_or_a_clean_abort(session):
    n, degree, threshold, length, bits, drop, seed = session
    devices, fleet, config, inputs = setup(n, degree, threshold, length, bits, seed)
    drop_at: dict[Stage, set[str]] = {}
    for device, stage in zip(devices, drop, strict=True):
        if stage is not None:
            drop_at.setdefault(stage, set()).add(device)
    outcome = run_session(fleet, config, inputs, drop_at=drop_at)
    if outcome.aborted:
        assert outcome.result is None
        assert any(reason in outcome.abort_reason for reason in ABORT_REASONS), outcome.abort_reason
    else:
        early = {d for s in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT) for d in drop_at.get(s, ())}
        assert set(outcome.server.contributors) <= set(devices) - early
        np.testing.assert_array_equal(outcome.result, exact_sum(inputs, outcome.server.contributors, bits))


def test_duplicated_messages_in_both_directions_change_nothing():
    devices, fleet, config, inputs = setup(8, 4, 3)

    def twice(device, message):
        return [message, message]

    outcome = run_session(fleet, config, inputs, uplink_hook=twice, downlink_hook=twice)
    assert not outcome.aborted, outcome.abort_reason
    assert outcome.server.offenders == frozenset()
    assert all(type(r.error).__name__ == "StaleMessageError" for r in outcome.server.rejections)
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, devices, 16))


# --- thresholds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", DROP_STAGES, ids=lambda s: s.name)
def test_round_aborts_below_threshold_or_quorum_and_reveals_nothing(stage):
    devices, fleet, config, inputs = setup(7, 6, 4)  # consistency quorum: max(4, (7 + 1) // 2 + 1) = 5
    dropped = devices[:4] if stage in (Stage.ADVERTISE_KEYS, Stage.UNMASK) else devices[:3]  # t - 1 left, or Q - 1
    outcome = run_session(fleet, config, inputs, drop_at={stage: set(dropped)})
    assert outcome.aborted and outcome.result is None
    if stage is Stage.UNMASK:
        assert "below the threshold t=4" in outcome.abort_reason
    elif stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT):
        assert "below the threshold t=4" in outcome.abort_reason or "quorum 5" in outcome.abort_reason
    else:
        assert "below the consistency quorum 5" in outcome.abort_reason
    if stage is not Stage.UNMASK:
        assert outcome.server.unmask == {}  # no device revealed a single share
    for device in set(devices) - set(dropped):
        assert outcome.clients[device].stage is Stage.ABORTED
        assert "aborted the round" in outcome.clients[device].abort_reason


@pytest.mark.parametrize("stage", DROP_STAGES, ids=lambda s: s.name)
def test_round_succeeds_with_the_fewest_survivors_its_stage_allows(stage):
    devices, fleet, config, inputs = setup(7, 6, 4)
    # Non-members count as dropped holders: 2 may go before unmasking (Q = 5 signers), 3 at it (t = 4 answers).
    dropped = devices[:3] if stage is Stage.UNMASK else devices[:2]
    outcome = run_session(fleet, config, inputs, drop_at={stage: set(dropped)})
    assert not outcome.aborted, outcome.abort_reason
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, outcome.server.contributors, 16))


def test_honest_but_curious_profile_unmasks_behind_only_t_signatures():
    devices, fleet, config, inputs = setup(7, 6, 3, threat_model=ThreatModel.HONEST_BUT_CURIOUS)
    outcome = run_session(fleet, config, inputs, drop_at={Stage.SHARE_KEYS: set(devices[:3])})
    assert not outcome.aborted, outcome.abort_reason  # 4 signers: an active device would want 5
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, devices[3:], 16))


def test_a_device_that_loses_more_than_k_minus_t_holders_before_sharing_sits_out_and_the_round_goes_on():
    # k - t = 5 spare holders. Silencing 6 devices can leave other devices short of t holders too (a
    # cascade, which is correct); at n = 60 that is rare enough that most of the cohort still sums.
    devices, fleet, config, inputs = setup(60, 12, 7)
    victim, adverts, holders = devices[5], {}, set()

    def learn(device, message):
        if isinstance(message, Roster) and device == victim:
            cohort = tuple(devices)
            a = adverts[victim]
            seed = holder_seed(message.round_nonce, victim, a.c_public, a.s_public, a.self_mask_commitment)
            drawn = share_holders(cohort, cohort.index(victim), message.degree, seed)
            holders.update(sorted(drawn)[: message.degree - message.threshold + 1])  # t - 1 stay
        return message

    def silence_holders(device, message):
        if isinstance(message, AdvertiseKeys):
            adverts[device] = message
        return None if device in holders and isinstance(message, ShareKeys) else message

    outcome = run_session(fleet, config, inputs, downlink_hook=learn, uplink_hook=silence_holders)
    assert len(holders) == 6 and not outcome.aborted, outcome.abort_reason
    contributors = set(outcome.server.contributors)  # devices short of t holders sit out with the victim
    assert victim not in contributors and not contributors & holders and len(contributors) >= 40
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, contributors, 16))


def test_finder_parameters_run_a_full_session():
    devices, fleet, config, inputs = setup(40, None, None, noise_floor=None)  # t_honest = 36: 2 may drop
    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: {devices[3], devices[20]}})
    assert not outcome.aborted, outcome.abort_reason
    chosen = choose_parameters(40, config.dropout_fraction, config.colluding_fraction)
    assert outcome.server.params == chosen and chosen.degree < 39  # each device draws k < n - 1 holders
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, outcome.server.contributors, 16))


# --- malicious server -------------------------------------------------------------------------------


def _rewrite_unmask_request(fleet: Fleet, victim: str, change):
    def hook(device, message):
        if device == victim and isinstance(message, UnmaskRequest):
            return resign_as_server(fleet, change(message))
        return message

    return hook


def test_client_refuses_to_reveal_both_shares_of_one_device():
    devices, fleet, config, inputs = setup(8, 4, 3)
    victim = devices[0]

    def ask_both(request: UnmaskRequest) -> UnmaskRequest:
        target = request.self_mask_owners[0]
        return dataclasses.replace(request, mask_key_owners=request.mask_key_owners + (target,))

    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: {devices[4]}},
                          downlink_hook=_rewrite_unmask_request(fleet, victim, ask_both))
    client = outcome.clients[victim]
    assert client.stage is Stage.ABORTED
    assert isinstance(client.error, ProtocolViolationError) and "both" in str(client.error)
    assert victim not in outcome.server.unmask


def test_client_refuses_the_mask_key_share_of_a_device_that_submitted_input():
    devices, fleet, config, inputs = setup(8, 4, 3)
    victim = devices[0]

    def ask_mask_key_of_survivor(request: UnmaskRequest) -> UnmaskRequest:
        target = request.self_mask_owners[0]
        return dataclasses.replace(request, self_mask_owners=request.self_mask_owners[1:],
                                   mask_key_owners=request.mask_key_owners + (target,))

    outcome = run_session(fleet, config, inputs, downlink_hook=_rewrite_unmask_request(fleet, victim,
                                                                                       ask_mask_key_of_survivor))
    client = outcome.clients[victim]
    assert client.stage is Stage.ABORTED
    assert isinstance(client.error, ProtocolViolationError) and "submitted input" in str(client.error)
    assert victim not in outcome.server.unmask


def test_different_survivor_sets_leave_the_server_short_of_a_quorum_and_nobody_unmasks():
    devices, fleet, config, inputs = setup(8, 7, 5)  # quorum: max(5, (8 + 1) // 2 + 1) = 5
    group_b = set(devices[4:])
    sent: list[str] = []

    def downlink(device, message):
        if isinstance(message, SurvivorSet) and device in group_b:
            # The server tells group B that devices[0] dropped, while group A is told it survived.
            fewer = set(from_bitmap(devices, message.survivors, "survivors")) - {devices[0]}
            return resign_as_server(fleet, dataclasses.replace(message, survivors=to_bitmap(devices, fewer)))
        return message

    outcome = run_session(fleet, config, inputs, downlink_hook=downlink,
                          uplink_hook=lambda d, m: sent.append(type(m).__name__) or m)
    assert outcome.aborted and outcome.result is None
    assert "below the consistency quorum 5" in outcome.abort_reason
    assert "UnmaskShares" not in sent


def test_client_needs_a_quorum_of_signatures_over_the_view_it_signed():
    devices, fleet, config, inputs = setup(6, 5, 4)  # quorum: max(4, (6 + 1) // 2 + 1) = 4
    victim = devices[0]

    def keep_three(request: UnmaskRequest) -> UnmaskRequest:
        signers = from_bitmap(devices, request.signers, "signers")[:3]
        return dataclasses.replace(request, signers=to_bitmap(devices, signers), signatures=request.signatures[:3])

    outcome = run_session(fleet, config, inputs, downlink_hook=_rewrite_unmask_request(fleet, victim, keep_three))
    client = outcome.clients[victim]
    assert isinstance(client.error, ConsistencyError) and "only 3 of 6 members confirmed" in str(client.error)
    assert victim not in outcome.server.unmask


def _substitute_in_rosters(fleet: Fleet, owner: str, **keys: bytes):
    """A server that swaps ``owner``'s advertised keys in every roster that carries them, and re-signs."""
    carriers: set[str] = set()

    def hook(device, message):
        if isinstance(message, Roster) and any(k.device_id == owner for k in message.neighbours):
            carriers.add(device)
            neighbours = tuple(dataclasses.replace(k, **keys) if k.device_id == owner else k
                               for k in message.neighbours)
            return resign_as_server(fleet, dataclasses.replace(message, neighbours=neighbours))
        return message

    return hook, carriers


def test_clients_catch_a_substituted_public_key_by_its_signature():
    devices, fleet, config, inputs = setup(6, 5, 4)
    hook, carriers = _substitute_in_rosters(fleet, devices[2], s_public=AgreementKey.generate().public)
    outcome = run_session(fleet, config, inputs, downlink_hook=hook)
    assert carriers == set(devices) - {devices[2]}  # a complete graph: everyone else uses the key
    for device in carriers:
        client = outcome.clients[device]
        assert client.stage is Stage.ABORTED
        assert isinstance(client.error, SignatureError) and repr(devices[2]) in str(client.error)
    assert outcome.aborted and set(outcome.server.share_keys) == {devices[2]}  # no other device shared
    assert "aborted the round" in outcome.clients[devices[2]].abort_reason


def test_a_device_with_another_enrolment_directory_refuses_the_round_and_says_why():
    devices, fleet, config, inputs = setup(5, 4, 3)
    stale = {d: k for d, k in fleet.enrolled.items() if d != devices[4]}  # missed one enrolment
    _, starts = start_server(config, tuple(devices[:4]), 1, now=0.0)
    client = start_client(dataclasses.replace(fleet.client_config(devices[0]), enrolled=stale), inputs[devices[0]],
                          now=0.0, round_index=1)
    client, sent = handle_client(client, dict(starts)[devices[0]], now=0.0)
    assert client.stage is Stage.ABORTED and sent == []
    assert "different enrolment directory" in client.abort_reason


def test_a_roster_that_leaves_the_device_out_or_pads_its_bitmap_is_refused():
    devices, fleet, config, inputs = setup(6, 5, 4)

    def run_with(change):
        def hook(device, message):
            if isinstance(message, Roster) and device == devices[0]:
                return resign_as_server(fleet, change(message))
            return message

        return run_session(fleet, config, inputs, downlink_hook=hook)

    left_out = run_with(lambda r: dataclasses.replace(r, members=to_bitmap(devices, devices[1:]))).clients[devices[0]]
    assert isinstance(left_out.error, ProtocolViolationError) and "lacks this device" in str(left_out.error)
    padded = run_with(lambda r: dataclasses.replace(r, members=r.members + b"\x00"))
    device = padded.clients[devices[0]]
    assert any("roster members bitmap is 2 bytes" in str(e) for e in device.rejections)
    assert device.stage is Stage.ADVERTISE_KEYS and device.session_id == b""  # still waiting for a valid roster
    assert set(padded.server.contributors) == set(devices[1:])  # and the round went on without it


def test_active_devices_refuse_a_roster_without_a_strict_majority_threshold():
    # t = 3 of k + 1 = 6 holders: fine for an honest-but-curious server, refused by the active default.
    devices, fleet, config, inputs = setup(6, 5, 3, threat_model=ThreatModel.HONEST_BUT_CURIOUS)
    active = {d: fleet.client_config(d) for d in devices}
    outcome = run_session(fleet, config, inputs, client_configs=active)
    assert outcome.aborted and outcome.server.share_keys == {}
    for client in outcome.clients.values():
        assert isinstance(client.error, ProtocolViolationError) and "strict majority" in client.abort_reason


# --- malicious or broken devices and replays -------------------------------------------------------------


def test_a_tampered_share_ciphertext_is_only_noted_and_the_round_goes_on_with_its_sender():
    """The server cannot tell who broke a share (sender or receiver), so it drops neither."""
    devices, fleet, config, inputs = setup(10, 4, 3)
    cheat = devices[3]
    victims: list[str] = []

    def uplink(device, message):
        if device == cheat and isinstance(message, ShareKeys):
            first = message.shares[0]
            victims.append(first.receiver)
            broken = EncryptedShare(first.sender, first.receiver, first.nonce,
                                    bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:])
            return codec.sign(dataclasses.replace(message, shares=(broken,) + message.shares[1:]),
                              fleet.identities[cheat])
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink)
    assert outcome.clients[victims[0]].rejected == (cheat,)
    assert outcome.server.accusations[victims[0]] == (cheat,)
    assert not outcome.aborted, outcome.abort_reason
    assert outcome.server.offenders == frozenset()
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, devices, 16))


@pytest.mark.parametrize("forgery", ["unsigned", "mis-signed"])
def test_an_unsigned_or_mis_signed_masked_input_is_ignored_without_penalising_its_claimed_sender(forgery):
    devices, fleet, config, inputs = setup(8, 4, 3)
    target = devices[5]
    impostor = IdentityKey.generate()

    def uplink(device, message):
        if device == target and isinstance(message, MaskedInput):
            if forgery == "unsigned":
                return dataclasses.replace(message, signature=b"")
            return codec.sign(message, impostor)
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink)
    rejection = next(r for r in outcome.server.rejections if r.sender == target)
    assert isinstance(rejection.error, SignatureError) and target not in outcome.server.offenders
    assert not outcome.aborted, outcome.abort_reason  # the target's input never arrived: it counts as dropped
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, set(devices) - {target}, 16))


def test_messages_replayed_from_an_earlier_round_are_rejected():
    devices, fleet, config, inputs = setup(8, 4, 3)
    recorded: dict[type, object] = {}

    def record(device, message):
        if device == devices[2]:
            recorded[type(message)] = message
        return message

    first = run_session(fleet, config, inputs, round_index=1, uplink_hook=record)
    assert not first.aborted

    def replay(device, message):
        if device == devices[2] and isinstance(message, MaskedInput):
            return recorded[MaskedInput]
        return message

    second = run_session(fleet, config, inputs, round_index=2, uplink_hook=replay)
    rejection = next(r for r in second.server.rejections if r.sender == devices[2])
    assert isinstance(rejection.error, ReplayError) and "round 1" in str(rejection.error)
    assert devices[2] not in second.server.offenders
    assert not second.aborted, second.abort_reason
    np.testing.assert_array_equal(second.result, exact_sum(inputs, set(devices) - {devices[2]}, 16))

    def replay_advert(device, message):
        if device == devices[2] and isinstance(message, AdvertiseKeys):
            return recorded[AdvertiseKeys]
        return message

    third = run_session(fleet, config, inputs, round_index=3, uplink_hook=replay_advert)
    assert isinstance(next(r for r in third.server.rejections if r.sender == devices[2]).error, ReplayError)
    assert devices[2] not in third.server.members
    np.testing.assert_array_equal(third.result, exact_sum(inputs, set(devices) - {devices[2]}, 16))


def test_client_ignores_a_relay_replayed_from_an_earlier_session():
    devices, fleet, config, inputs = setup(8, 4, 3)
    old: dict[str, ShareRelay] = {}

    def record(device, message):
        if isinstance(message, ShareRelay):
            old[device] = message
        return message

    run_session(fleet, config, inputs, round_index=1, downlink_hook=record)

    def replay(device, message):
        return old[device] if isinstance(message, ShareRelay) and device == devices[1] else message

    outcome = run_session(fleet, config, inputs, round_index=2, downlink_hook=replay)
    client = outcome.clients[devices[1]]
    assert any(isinstance(e, ReplayError) for e in client.rejections)
    assert not outcome.aborted, outcome.abort_reason
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, set(devices) - {devices[1]}, 16))


def test_client_ignores_a_round_start_replayed_from_an_older_round():
    devices, fleet, config, inputs = setup(4, 3, 3)
    old: dict[str, object] = {}

    def record(device, message):
        old.setdefault(device, message)  # the first downlink is RoundStart
        return message

    run_session(fleet, config, inputs, round_index=1, downlink_hook=record)

    def replay(device, message):
        return [old[device], message] if type(message).__name__ == "RoundStart" else message

    outcome = run_session(fleet, config, inputs, round_index=2, downlink_hook=replay)
    assert not outcome.aborted, outcome.abort_reason
    assert all(isinstance(c.rejections[0], ReplayError) for c in outcome.clients.values())
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, devices, 16))


def test_client_gives_up_after_its_stage_deadline():
    devices, fleet, config, inputs = setup(4, 3, 3)
    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: set(devices[:3])})
    lonely = outcome.clients[devices[3]]
    assert lonely.stage is Stage.ABORTED  # the server aborted and told it
    waiting = start_client(fleet.client_config(devices[0], stage_timeout=5.0), inputs[devices[0]], now=0.0)
    assert tick_client(waiting, 4.9)[0].stage is Stage.ADVERTISE_KEYS
    timed_out, sent = tick_client(waiting, 5.0)
    assert timed_out.stage is Stage.ABORTED and sent == [] and "timed out" in timed_out.abort_reason


# --- what the server sees --------------------------------------------------------------------------------


def test_one_devices_masked_vector_is_uniform_under_chi_square():
    devices, fleet, config, _ = setup(4, 3, 3, length=1 << 16, bits=8)
    inputs = {d: np.zeros(1 << 16, dtype=np.uint32) for d in devices}  # maximally structured input
    seen: dict[str, np.ndarray] = {}

    def capture(device, message):
        if isinstance(message, MaskedInput):
            seen[device] = message.masked.copy()
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=capture)
    assert not outcome.aborted
    counts = np.bincount(seen[devices[0]], minlength=256)
    assert counts.size == 256
    assert chisquare(counts).pvalue > 1e-4
    assert chisquare(np.bincount(inputs[devices[0]], minlength=256)).pvalue < 1e-4  # the test can fail


# --- the honest server's own rules --------------------------------------------------------------------


def test_honest_server_never_asks_for_both_shares_or_for_mask_keys_of_survivors():
    devices, fleet, config, inputs = setup(12, 6, 4)
    requests: list[UnmaskRequest] = []

    def capture(device, message):
        if isinstance(message, UnmaskRequest):
            requests.append(message)
        return message

    outcome = run_session(fleet, config, inputs, downlink_hook=capture,
                          drop_at={Stage.MASKED_INPUT: {devices[0], devices[6]}})
    assert not outcome.aborted and requests
    assert any(r.mask_key_owners for r in requests)
    for request in requests:
        assert not set(request.self_mask_owners) & set(request.mask_key_owners)
        assert not set(request.mask_key_owners) & set(outcome.server.u3)


@pytest.mark.parametrize("defect", ["short vector", "entries above 2^b", "unknown rejection"])
def test_server_drops_a_device_whose_signed_masked_input_breaks_the_rules(defect):
    devices, fleet, config, inputs = setup(8, 4, 3, bits=12)
    cheat = devices[2]

    def uplink(device, message):
        if device == cheat and isinstance(message, MaskedInput):
            if defect == "short vector":
                message = dataclasses.replace(message, masked=message.masked[:-1].copy())
            elif defect == "entries above 2^b":
                message = dataclasses.replace(message, masked=message.masked | np.uint32(1 << 12))
            else:
                message = dataclasses.replace(message, rejected=("dev-99",))  # never sent it a share
            return codec.sign(message, fleet.identities[cheat])
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink)
    rejection = next(r for r in outcome.server.rejections if r.sender == cheat)
    assert isinstance(rejection.error, ProtocolViolationError)
    assert cheat not in outcome.server.contributors
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, set(devices) - {cheat}, 12))


def test_server_drops_a_device_advertising_a_low_order_key():
    devices, fleet, config, inputs = setup(6, 5, 4)
    cheat = devices[1]

    def uplink(device, message):
        if device == cheat and isinstance(message, AdvertiseKeys):
            return codec.sign(dataclasses.replace(message, s_public=bytes(32)), fleet.identities[cheat])
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink)
    rejection = next(r for r in outcome.server.rejections if r.sender == cheat)
    assert isinstance(rejection.error, ProtocolViolationError) and "low-order" in str(rejection.error)
    assert cheat not in outcome.server.members
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, set(devices) - {cheat}, 16))


def test_server_refuses_shares_addressed_to_devices_the_sender_did_not_draw():
    devices, fleet, config, inputs = setup(10, 4, 3)
    cheat = devices[4]

    def uplink(device, message):
        if device == cheat and isinstance(message, ShareKeys):
            first = message.shares[0]
            stranger = next(d for d in devices if d != cheat and d not in {s.receiver for s in message.shares})
            moved = EncryptedShare(first.sender, stranger, first.nonce, first.ciphertext)
            return codec.sign(dataclasses.replace(message, shares=(moved,) + message.shares[1:]),
                              fleet.identities[cheat])
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink)
    rejection = next(r for r in outcome.server.rejections if r.sender == cheat)
    assert isinstance(rejection.error, ProtocolViolationError) and "holders it drew" in str(rejection.error)
    assert cheat not in outcome.server.u2
    np.testing.assert_array_equal(outcome.result, exact_sum(inputs, set(devices) - {cheat}, 16))


def test_client_reveals_nothing_to_a_second_unmask_request():
    devices, fleet, config, inputs = setup(6, 5, 4)
    sent: list[str] = []

    def downlink(device, message):
        if isinstance(message, UnmaskRequest) and device == devices[0]:
            both = dataclasses.replace(message, mask_key_owners=message.self_mask_owners[:1])
            return [message, resign_as_server(fleet, both)]
        return message

    def uplink(device, message):
        if device == devices[0] and type(message).__name__ == "UnmaskShares":
            sent.append(device)
        return message

    outcome = run_session(fleet, config, inputs, uplink_hook=uplink, downlink_hook=downlink)
    assert sent == [devices[0]]  # one answer, to the first (honest) request only
    assert outcome.clients[devices[0]].stage is Stage.DONE
