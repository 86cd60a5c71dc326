"""A malicious aggregator against the real client machines, at n = 100 and n = 1000, default settings.

The attacker holds the aggregator's signing key, runs the honest server's machinery up to the stage
it attacks, then sends whatever it likes (re-signed) and, where the clients do not refuse outright,
tries end to end to recover one victim's exact input from everything it collected (``recover_input``).
Each test asserts that the honest clients refuse (ABORTED, a reason naming the problem, nothing more
sent) or that the recovery attempt fails; ``test_the_recovery_attempt_works_given_t_shares_of_both_secrets``
shows the attempt is real.

One honest round per n is run up to each stage and forked (client machines are pure functions), so
the n = 1000 cases only pay for delivering the attacked messages to the devices that matter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.secagg.driver import Fleet, run_session
from aggregator.secagg.server import ServerConfig
from edge_sdk.secagg.errors import ConsistencyError, ProtocolViolationError, ReplayError, SignatureError
from edge_sdk.secagg.graph import holder_seed, share_holders
from edge_sdk.secagg.keys import AgreementKey
from edge_sdk.secagg.membership import from_bitmap, to_bitmap
from edge_sdk.secagg.messages import (
    ConsistencyCheck,
    MaskedInput,
    NeighbourKey,
    Roster,
    RoundStart,
    ShareKeys,
    ShareRelay,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
)
from edge_sdk.secagg.parameters import ThreatModel, choose_parameters, expected_count

from .attacker import Session, exact_sum, ids, make_inputs, masked_input_of, recover_input, resign

STAGES = (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK)
SIZES = [100, pytest.param(1000, marks=pytest.mark.slow)]


@dataclasses.dataclass
class Round:
    """Forks of one honest round: ``at[stage]`` holds the server's opening messages of that stage."""

    at: dict[Stage, Session]
    done: Session
    victim: str

    def fork(self, stage: Stage) -> Session:
        return self.at[stage].fork()

    def opening(self, stage: Stage, device: str):
        return next(m for d, m in self.at[stage].pending if d == device)


def honest_round(n: int) -> Round:
    session = Session.open(n)
    at = {}
    for stage in STAGES:
        session.pending = session.run_until(stage)
        at[stage] = session.fork()
    victim = session.members[n // 2]
    if n <= 100:
        session.finish()
        assert session.server.stage is Stage.DONE, session.server.abort_reason
    else:  # checking 1000 quorums of n/2 signatures takes a minute: only the victim's holders answer
        askers = {victim, *session.holders_of(victim)}
        session.deliver([(d, m) for d, m in session.run_until(Stage.UNMASK) if d in askers])
    return Round(at, session, victim)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n={n}")
def rnd(request) -> Round:
    return honest_round(request.param)


def assert_refused(session: Session, device: str, before: int, *words: str, error: type = ProtocolViolationError):
    client = session.clients[device]
    assert client.stage is Stage.ABORTED, f"{device} went on in {client.stage.name}"
    assert isinstance(client.error, error), repr(client.error)
    for word in words:
        assert word in client.abort_reason, client.abort_reason
    assert len(session.sent[device]) == before, "a refusing device sent something"


def victim_shares_released(rnd: Round, victim: str) -> tuple[dict[int, int], dict[int, int]]:
    return rnd.done.unmask_shares(victim)


# --- the attacker's tool works ---------------------------------------------------------------------


def test_the_recovery_attempt_works_given_t_shares_of_both_secrets(rnd):
    """Control: with t holders' shares of both secrets (t colluders), the attempt rebuilds x exactly."""
    s, victim = rnd.done, rnd.victim
    b, sk = s.held_by(s.holders_of(victim)[: s.threshold], victim)
    recovered = recover_input(s, victim, masked_input_of(s, victim), b, sk)
    np.testing.assert_array_equal(recovered, s.inputs[victim])
    short = recover_input(s, victim, masked_input_of(s, victim), b, dict(list(sk.items())[:-1]))
    assert not np.array_equal(short, s.inputs[victim])  # one s-share short: the pairwise masks stay


# --- relay omission ---------------------------------------------------------------------------------


def omission_order(s: Session, victim: str, senders: list[str], how: str) -> list[str]:
    cohort = s.server.cohort
    me, n = cohort.index(victim), len(cohort)
    ahead = sorted(senders, key=lambda v: (cohort.index(v) - me) % n)  # one side: next in cohort order first
    distance = sorted(senders, key=lambda v: min((cohort.index(v) - me) % n, (me - cohort.index(v)) % n))
    return {"nearest": distance, "farthest": distance[::-1], "one-sided": ahead, "last-ids": sorted(senders)[::-1]}[how]


@pytest.mark.parametrize("how", ["nearest", "farthest", "one-sided", "last-ids"])
def test_withholding_relayed_shares_strips_no_mask_and_recovery_fails(rnd, how):
    victim = rnd.victim
    relay = rnd.opening(Stage.MASKED_INPUT, victim)
    senders = [share.sender for share in relay.shares]
    t = rnd.done.threshold
    assert len(senders) >= 2
    honest_masked = masked_input_of(rnd.done, victim)
    order = omission_order(rnd.done, victim, senders, how)
    b, s = victim_shares_released(rnd, victim)
    assert len(b) >= t and s == {}  # the holders released b_victim, as the victim survived
    for size in range(min(t + 1, len(senders)) + 1):
        session = rnd.fork(Stage.MASKED_INPUT)
        withheld = set(order[:size])
        kept = tuple(share for share in relay.shares if share.sender not in withheld)
        (reply,) = session.to_client(victim, resign(session.fleet, dataclasses.replace(relay, shares=kept)))
        assert isinstance(reply, MaskedInput) and reply.rejected == ()
        # The victim masks with every partner in U2 whatever reached it: the upload is the same vector.
        np.testing.assert_array_equal(reply.masked, honest_masked)
        assert set(session.clients[victim].held_shares) == {victim, *senders} - withheld
        assert not np.array_equal(recover_input(rnd.done, victim, reply.masked, b, s), rnd.done.inputs[victim])


def test_victim_refuses_a_u2_view_with_fewer_than_t_of_its_holders(rnd):
    victim = rnd.victim
    session = rnd.fork(Stage.MASKED_INPUT)
    relay = rnd.opening(Stage.MASKED_INPUT, victim)
    holders = session.holders_of(victim)
    cut = set(holders[: len(holders) - session.threshold + 1])
    u2 = [d for d in from_bitmap(session.members, relay.shared, "U2") if d not in cut]
    shrunk = dataclasses.replace(relay, shared=to_bitmap(session.members, u2),
                                 shares=tuple(s for s in relay.shares if s.sender not in cut))
    before = len(session.sent[victim])
    assert session.to_client(victim, resign(session.fleet, shrunk)) == []
    assert_refused(session, victim, before, "keeps only", f"t={session.threshold}")


def test_a_shrunk_u2_view_fails_the_consistency_check_and_recovery_fails(rnd):
    victim = rnd.victim
    session = rnd.fork(Stage.MASKED_INPUT)
    relay = rnd.opening(Stage.MASKED_INPUT, victim)
    holders = session.holders_of(victim)
    cut = {holders[0]}  # one holder fewer: t or more stay, and the survivor set still clears the noise floor
    u2 = [d for d in session.server.u2 if d not in cut]
    shrunk = dataclasses.replace(relay, shared=to_bitmap(session.members, u2),
                                 shares=tuple(s for s in relay.shares if s.sender not in cut))
    (masked,) = session.to_client(victim, resign(session.fleet, shrunk))
    # The survivor set must fit inside the victim's U2, so the attacker shows it the same cut.
    u3 = [d for d in rnd.done.server.u3 if d not in cut]
    survivors = SurvivorSet(victim, session.server.session_id, session.server.round_index,
                            to_bitmap(session.members, u3))
    (check,) = session.to_client(victim, resign(session.fleet, survivors))
    assert isinstance(check, ConsistencyCheck) and check.survivors_digest != rnd.done.server.digest
    # Everyone else signed the honest view: a quorum of their signatures does not cover the victim's.
    others = {d: sig for d, sig in rnd.done.server.consistency.items() if d not in cut}
    before = len(session.sent[victim])
    assert session.to_client(victim, session.unmask_request(victim, others, [victim], [])) == []
    assert_refused(session, victim, before, "survivor views differ", error=ConsistencyError)
    b, s = victim_shares_released(rnd, victim)
    assert recover_input(session, victim, masked.masked, b, s) is not None  # b was released ...
    assert not np.array_equal(recover_input(session, victim, masked.masked, b, s), session.inputs[victim])


# --- split survivor views ----------------------------------------------------------------------------


def colluders_for(s: Session, victim: str) -> tuple[list[str], list[str]]:
    """The worst placement of the ceil(gamma n) colluders: t - 1 of them among the victim's holders."""
    count = expected_count(s.config.colluding_fraction, len(s.server.cohort))
    holders = list(s.holders_of(victim))
    inside = holders[: min(count, s.threshold - 1)]
    outside = [d for d in s.members if d not in holders and d != victim][: count - len(inside)]
    return inside + outside, [h for h in holders if h not in inside]


@pytest.mark.parametrize("most_see_out", [False, True], ids=["few-see-out", "most-see-out"])
def test_split_survivor_views_with_colluders_are_refused_and_recovery_fails(rnd, most_see_out):
    session, victim = rnd.fork(Stage.CONSISTENCY_CHECK), rnd.victim
    t = session.threshold
    colluders, honest_holders = colluders_for(session, victim)
    inside = [c for c in colluders if c in session.holders_of(victim)]
    need_out = t - len(inside)  # honest holders that must reveal s_victim
    assert need_out >= 1 and len(honest_holders) >= need_out + max(0, t - len(inside) - 1)
    if most_see_out:
        see_in = {victim, *honest_holders[: t - len(inside) - 1]}
        see_out = set(session.members) - see_in
    else:
        see_out = set(honest_holders[:need_out])
        see_in = set(session.members) - see_out
    u2, u3 = session.server.u2, session.server.u3
    views = {True: [d for d in u3], False: [d for d in u3 if d != victim]}
    digests = {True: session.view_digest(u2, views[True]), False: session.view_digest(u2, views[False])}
    signatures: dict[bool, dict[str, bytes]] = {True: {}, False: {}}
    targets = {victim, *session.holders_of(victim)} - set(colluders)
    for device in u3:
        if device in colluders:
            continue
        shown = device in see_in
        survivors = SurvivorSet(device, session.server.session_id, session.server.round_index,
                                to_bitmap(session.members, views[shown]))
        (check,) = session.to_client(device, resign(session.fleet, survivors))
        assert check.survivors_digest == digests[shown]
        signatures[shown][device] = check.signature
    for shown in (True, False):
        signatures[shown].update({c: session.forged_check(c, digests[shown]) for c in colluders})
    before = {d: len(session.sent[d]) for d in targets}
    for device in sorted(targets):
        shown = device in see_in
        held = {v for v in u2 if device in session.holders_of(v)} | {device}
        b_owners = (held & set(views[shown])) if shown else (held & set(views[False]))
        s_owners = set() if shown else held & {victim}
        session.to_client(device, session.unmask_request(device, signatures[shown], b_owners, s_owners))
    small_group = see_in if most_see_out else see_out
    for device in targets & small_group:
        assert_refused(session, device, before[device], "confirmed this view", error=ConsistencyError)
    b, s = session.unmask_shares(victim)
    cb, cs = session.held_by(colluders, victim)
    b, s = {**b, **cb}, {**s, **cs}
    assert len(b) < t or len(s) < t  # never both secrets
    recovered = recover_input(session, victim, masked_input_of(session, victim), b, s)
    assert recovered is None or not np.array_equal(recovered, session.inputs[victim])


def test_a_quorum_over_another_view_does_not_unlock_a_device(rnd):
    """Group B was shown the victim dropped; the attacker hands it the honest majority's signatures."""
    session, victim = rnd.fork(Stage.CONSISTENCY_CHECK), rnd.victim
    holder = rnd.done.holders_of(victim)[0]
    out = [d for d in session.server.u3 if d != victim]
    survivors = SurvivorSet(holder, session.server.session_id, session.server.round_index,
                            to_bitmap(session.members, out))
    session.to_client(holder, resign(session.fleet, survivors))
    before = len(session.sent[holder])
    honest = {d: sig for d, sig in rnd.done.server.consistency.items() if d != victim}
    request = session.unmask_request(holder, honest, [], [victim])
    assert session.to_client(holder, request) == []
    assert_refused(session, holder, before, "survivor views differ", error=ConsistencyError)


# --- server-chosen parameters ------------------------------------------------------------------------


def weak_parameters(n: int) -> list[tuple[int, int]]:
    finder = choose_parameters(n, 0.05, 0.05)
    hbc = choose_parameters(n, 0.05, 0.05, ThreatModel.HONEST_BUT_CURIOUS)
    weak = [(finder.degree, 2), (n - 1, 2), (3, 3), (2, 2), (finder.degree, finder.threshold - 1)]
    if 2 * hbc.threshold <= hbc.degree + 1:  # the opt-in profile's own choice, where it lacks a majority
        weak.append((hbc.degree, hbc.threshold))
    return weak


def test_clients_refuse_server_chosen_parameters_weaker_than_their_own(rnd):
    n = len(rnd.done.server.cohort)
    victim = rnd.victim
    roster = rnd.opening(Stage.SHARE_KEYS, victim)
    for degree, threshold in weak_parameters(n):
        session = rnd.fork(Stage.SHARE_KEYS)
        before = len(session.sent[victim])
        changed = resign(session.fleet, dataclasses.replace(roster, degree=degree, threshold=threshold))
        assert session.to_client(victim, changed) == [], (degree, threshold)
        assert_refused(session, victim, before, "roster parameters refused")


# --- survivor sets and unmask requests -------------------------------------------------------------


def test_client_refuses_a_survivor_set_without_itself(rnd):
    session, victim = rnd.fork(Stage.CONSISTENCY_CHECK), rnd.victim
    message = rnd.opening(Stage.CONSISTENCY_CHECK, victim)
    without = [d for d in session.server.u3 if d != victim]
    before = len(session.sent[victim])
    changed = resign(session.fleet, dataclasses.replace(message, survivors=to_bitmap(session.members, without)))
    assert session.to_client(victim, changed) == []
    assert_refused(session, victim, before, "leaves out this device")


def forbidden_requests(rnd: Round, holder: str):
    victim = rnd.victim
    honest = rnd.opening(Stage.UNMASK, holder)
    assert victim in honest.self_mask_owners
    stranger = next(d for d in rnd.done.members if d not in rnd.done.clients[holder].held_shares)
    yield "both", dataclasses.replace(honest, mask_key_owners=(victim,))
    yield "submitted input", dataclasses.replace(
        honest, self_mask_owners=tuple(o for o in honest.self_mask_owners if o != victim), mask_key_owners=(victim,))
    yield "does not hold", dataclasses.replace(honest, self_mask_owners=tuple(sorted({*honest.self_mask_owners,
                                                                                       stranger})))


def test_client_refuses_both_shares_survivor_mask_keys_and_shares_it_does_not_hold(rnd):
    holder = rnd.done.holders_of(rnd.victim)[0]
    for words, request in forbidden_requests(rnd, holder):
        session = rnd.fork(Stage.UNMASK)
        before = len(session.sent[holder])
        assert session.to_client(holder, resign(session.fleet, request)) == []
        assert_refused(session, holder, before, words)
        assert not any(isinstance(m, UnmaskShares) for m in session.sent[holder])


# --- rosters: key substitution, hidden holders, invented partners, steering ---------------------------


def test_client_refuses_a_roster_with_a_substituted_key_re_signed_by_the_server(rnd):
    victim = rnd.victim
    roster = rnd.opening(Stage.SHARE_KEYS, victim)
    partner = roster.neighbours[0].device_id
    for field in ("c_public", "s_public"):
        session = rnd.fork(Stage.SHARE_KEYS)
        keys = tuple(dataclasses.replace(k, **{field: AgreementKey.generate().public}) if k.device_id == partner
                     else k for k in roster.neighbours)
        before = len(session.sent[victim])
        assert session.to_client(victim, resign(session.fleet, dataclasses.replace(roster, neighbours=keys))) == []
        assert_refused(session, victim, before, repr(partner), error=SignatureError)


def test_client_refuses_a_roster_that_hides_one_of_its_drawn_holders(rnd):
    session, victim = rnd.fork(Stage.SHARE_KEYS), rnd.victim
    roster = rnd.opening(Stage.SHARE_KEYS, victim)
    hidden = session.holders_of(victim)[0]
    keys = tuple(k for k in roster.neighbours if k.device_id != hidden)
    before = len(session.sent[victim])
    assert session.to_client(victim, resign(session.fleet, dataclasses.replace(roster, neighbours=keys))) == []
    assert_refused(session, victim, before, "withholds the adverts", repr(hidden))


def test_client_refuses_a_roster_that_invents_a_partner_which_did_not_draw_it(rnd):
    session, victim = rnd.fork(Stage.SHARE_KEYS), rnd.victim
    roster = rnd.opening(Stage.SHARE_KEYS, victim)
    listed = {k.device_id for k in roster.neighbours}
    stranger = next(d for d in session.members if d != victim and d not in listed)
    a = session.server.adverts[stranger]
    keys = tuple(sorted(roster.neighbours + (NeighbourKey(stranger, a.c_public, a.s_public, a.self_mask_commitment,
                                                          a.signature),), key=lambda k: k.device_id))
    before = len(session.sent[victim])
    assert session.to_client(victim, resign(session.fleet, dataclasses.replace(roster, neighbours=keys))) == []
    assert_refused(session, victim, before, repr(stranger), "did not draw this device")


def test_share_holders_are_fixed_by_the_devices_own_advert_and_the_cohort(rnd):
    """The server cannot steer the draw: it is a prefix of one permutation seeded by the device's advert."""
    s, victim = rnd.done, rnd.victim
    advert = s.server.adverts[victim]
    cohort = s.server.cohort
    seed = holder_seed(s.server.round_nonce, victim, advert.c_public, advert.s_public, advert.self_mask_commitment)
    k = s.server.params.degree
    drawn = share_holders(cohort, cohort.index(victim), k, seed)
    shares = next(m for m in s.sent[victim] if isinstance(m, ShareKeys))
    assert {share.receiver for share in shares.shares} == set(drawn)
    for other_k in (1, k // 2, k + 7):  # a server-chosen k only takes a longer or shorter prefix
        longer = share_holders(cohort, cohort.index(victim), other_k, seed)
        assert longer[: min(k, other_k)] == drawn[: min(k, other_k)]
    rng = np.random.default_rng(0)
    for _ in range(5):  # member subsets only remove holders, never add one
        subset = {d for d in cohort if rng.random() < 0.9} | {victim}
        assert tuple(h for h in drawn if h in subset) == tuple(d for d in drawn if d in subset)
    other_nonce = holder_seed(bytes(32), victim, advert.c_public, advert.s_public, advert.self_mask_commitment)
    assert share_holders(cohort, cohort.index(victim), k, other_nonce) != drawn  # the nonce is bound in ...
    # ... but the device answers one RoundStart per round: a second nonce to grind with is refused.
    start = Session.open(len(cohort), fleet=s.fleet)
    first = next(m for d, m in start.pending if d == victim)
    assert len(start.to_client(victim, first)) == 1
    regrind = resign(start.fleet, dataclasses.replace(first, round_nonce=bytes(32)))
    assert start.to_client(victim, regrind) == []
    assert start.clients[victim].start.round_nonce == first.round_nonce
    assert isinstance(start.clients[victim].rejections[-1], ReplayError)


def test_client_refuses_a_roster_whose_members_leave_it_fewer_than_t_of_its_holders(rnd):
    session, victim = rnd.fork(Stage.SHARE_KEYS), rnd.victim
    roster = rnd.opening(Stage.SHARE_KEYS, victim)
    holders = session.holders_of(victim)
    cut = set(holders[: len(holders) - session.threshold + 1])
    members = [d for d in session.members if d not in cut]
    directory = session.fleet.enrolled.order
    changed = dataclasses.replace(roster, members=to_bitmap(directory, members),
                                  neighbours=tuple(k for k in roster.neighbours if k.device_id not in cut))
    before = len(session.sent[victim])
    assert session.to_client(victim, resign(session.fleet, changed)) == []
    assert_refused(session, victim, before, "keeps only")


# --- replays ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rounds():
    """Two honest rounds of one fleet at n = 100: the second is the one replayed into."""
    first = honest_round(100)
    second = Session.open(100, fleet=first.done.fleet, round_index=2)
    at = {}
    for stage in STAGES:
        second.pending = second.run_until(stage)
        at[stage] = second.fork()
    second.finish()
    return first, Round(at, second, victim=first.victim)


@pytest.mark.parametrize("kind", [RoundStart, Roster, ShareRelay, SurvivorSet, UnmaskRequest],
                         ids=lambda k: k.__name__)
def test_client_ignores_a_message_replayed_from_another_round(two_rounds, kind):
    first, second = two_rounds
    victim = first.victim
    opening = {RoundStart: None, Roster: Stage.SHARE_KEYS, ShareRelay: Stage.MASKED_INPUT,
               SurvivorSet: Stage.CONSISTENCY_CHECK, UnmaskRequest: Stage.UNMASK}[kind]
    if opening is None:
        old = next(m for d, m in Session.open(100, fleet=first.done.fleet).pending if d == victim)
        session = Session.open(100, fleet=first.done.fleet, round_index=2)
    else:
        old = first.opening(opening, victim)
        session = second.fork(opening)
    assert isinstance(old, kind)
    state = session.clients[victim]
    before = len(session.sent[victim])
    assert session.to_client(victim, old) == []
    after = session.clients[victim]
    assert after.stage is state.stage and after.session_id == state.session_id
    assert isinstance(after.rejections[-1], ReplayError) and len(session.sent[victim]) == before


# --- the noise floor ------------------------------------------------------------------------------------


def test_every_client_refuses_a_survivor_set_below_the_noise_floor(rnd):
    session = rnd.fork(Stage.CONSISTENCY_CHECK)
    n = len(session.server.cohort)
    floor, colluding = session.server.noise_floor, expected_count(0.05, n)
    survivors = list(session.server.u3)[: floor + colluding - 1]  # one short after discounting colluders
    bitmap = to_bitmap(session.members, survivors)
    for device in survivors:
        message = SurvivorSet(device, session.server.session_id, session.server.round_index, bitmap)
        before = len(session.sent[device])
        assert session.to_client(device, resign(session.fleet, message)) == []
        assert_refused(session, device, before, f"t_honest={floor}")


def test_the_honest_server_aborts_without_decoding_below_the_noise_floor():
    devices = ids(100)
    fleet = Fleet.enrol(devices)
    config = ServerConfig(fleet.server_identity, fleet.enrolled, 16, 16)
    inputs = make_inputs(devices, 16, 16)
    dropped = set(devices[:6])  # 94 survivors - 5 colluders = 89 < t_honest = 90
    sent: list[str] = []
    outcome = run_session(fleet, config, inputs, drop_at={Stage.MASKED_INPUT: dropped},
                          uplink_hook=lambda d, m: sent.append(type(m).__name__) or m)
    assert outcome.aborted and outcome.result is None
    assert "t_honest=90" in outcome.abort_reason
    assert "UnmaskShares" not in sent and "ConsistencyCheck" not in sent
    assert all(outcome.clients[d].stage is Stage.ABORTED for d in devices[6:])  # told, and revealed nothing
    five = run_session(fleet, config, inputs, round_index=2, drop_at={Stage.MASKED_INPUT: set(devices[:5])})
    assert not five.aborted, five.abort_reason  # the floor has teeth but no more than that
    np.testing.assert_array_equal(five.result, exact_sum(inputs, devices[5:], 16))
