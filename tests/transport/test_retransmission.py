"""The pure retransmission schedule, walked through by an explicit clock."""

from __future__ import annotations

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.transport.retransmission import RetransmitPolicy, RetransmitState, acknowledge, due, track

POLICY = RetransmitPolicy(initial_s=2.0, multiplier=2.0, maximum_s=16.0, jitter=0.25, deadline_s=100.0)


def tracked(sequence: int = 7, now: float = 0.0) -> RetransmitState:
    return track(RetransmitState(), POLICY, sequence=sequence, to="aggregator", topic="t", digest=b"d" * 32,
                 chunks=(b"c0", b"c1"), now=now)


def test_backoff_grows_to_its_ceiling_with_bounded_jitter():
    waits = [POLICY.wait(12345, attempt) for attempt in range(8)]
    ceilings = [2, 4, 8, 16, 16, 16, 16, 16]
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert 0.75 * ceiling <= wait <= ceiling
    spread = {round(POLICY.wait(seq, 0), 6) for seq in range(200)}
    assert len(spread) > 150  # senders with different sequences do not retransmit in step


def test_a_message_is_resent_when_due_and_given_up_at_its_deadline():
    state = tracked()
    state, resend, expired = due(state, POLICY, 1.0)
    assert (resend, expired) == ([], [])
    now, attempts = 0.0, []
    while state.outgoing:
        now = state.next_due()
        state, resend, expired = due(state, POLICY, now)
        attempts += [r.attempts for r in resend]
        if expired:
            assert expired[0].sequence == 7 and now >= 100.0
    assert attempts == list(range(2, 2 + len(attempts)))
    assert 6 <= len(attempts) <= 10  # 2+4+8+16+16+... with jitter reaches 100 s in this many resends


def test_only_the_matching_receipt_acknowledges():
    state = tracked()
    for wrong in ({"digest": b"x" * 32, "receiver": "aggregator"}, {"digest": b"d" * 32, "receiver": "dev9"}):
        same, entry = acknowledge(state, sequence=7, **wrong)
        assert entry is None and same is state
    state, entry = acknowledge(state, sequence=7, digest=b"d" * 32, receiver="aggregator")
    assert entry is not None and entry.chunks == (b"c0", b"c1") and not state.outgoing
    assert due(state, POLICY, 1e9) == (state, [], [])


def test_a_repeated_sequence_and_a_bad_policy_are_refused():
    with pytest.raises(ConfigError, match="already awaiting"):
        track(tracked(), POLICY, sequence=7, to="a", topic="t", digest=b"d" * 32, chunks=(), now=0.0)
    with pytest.raises(ConfigError, match="initial_s"):
        RetransmitPolicy(initial_s=0)
