"""Every (stage, message type) pair of both machines, once (Flower's exhaustive-transition test is the model).

One honest round is captured: each machine's state on entering every stage, and one real signed
message of every type, addressed to (or sent by) the device whose state it is fed to. A valid pair
must advance the machine; every other pair must be refused: recorded in ``rejections`` (or, once the
machine is finished, simply ignored), the stage and everything else unchanged, nothing sent.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from aggregator.secagg.server import handle_server, tick_server
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import handle_client
from edge_sdk.secagg.messages import (
    Abort,
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    Roster,
    RoundStart,
    ShareKeys,
    ShareRelay,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
)

from .attacker import Session

DOWNLINK = [RoundStart, Roster, ShareRelay, SurvivorSet, UnmaskRequest, Abort]
UPLINK = [AdvertiseKeys, ShareKeys, MaskedInput, ConsistencyCheck, UnmaskShares]
ALL = DOWNLINK + UPLINK
DEVICE = "dev-0003"
# The client's stages; ADVERTISE_KEYS is split by whether the RoundStart has been accepted.
CLIENT_STAGES = ["waiting", "advertised", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY_CHECK", "DONE", "ABORTED"]
CLIENT_VALID = {("waiting", RoundStart), ("advertised", Roster), ("SHARE_KEYS", ShareRelay),
                ("MASKED_INPUT", SurvivorSet), ("CONSISTENCY_CHECK", UnmaskRequest)}
CLIENT_VALID |= {(stage, Abort) for stage in CLIENT_STAGES if stage != "ABORTED"}
SERVER_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK,
                 Stage.DONE, Stage.ABORTED]
SERVER_VALID = {(Stage.ADVERTISE_KEYS, AdvertiseKeys), (Stage.SHARE_KEYS, ShareKeys),
                (Stage.MASKED_INPUT, MaskedInput), (Stage.CONSISTENCY_CHECK, ConsistencyCheck),
                (Stage.UNMASK, UnmaskShares)}


@dataclasses.dataclass
class Captured:
    clients: dict[str, object]  # client stage name -> DEVICE's state on entering it
    servers: dict[Stage, object]  # server stage -> state on entering it
    messages: dict[type, object]  # one real message of each type, to or from DEVICE
    fleet: object

    def abort_for(self, state) -> Abort:
        """The signed Abort the server sends a device in ``state``'s session (see ``server._abort``)."""
        return codec.sign(Abort(state.session_id or bytes(32), 1, "the round is over"), self.fleet.server_identity)


# The client state on entering each server stage, before the server's opening message arrives.
CLIENT_BEFORE = {Stage.SHARE_KEYS: "advertised", Stage.MASKED_INPUT: "SHARE_KEYS",
                 Stage.CONSISTENCY_CHECK: "MASKED_INPUT", Stage.UNMASK: "CONSISTENCY_CHECK"}


@pytest.fixture(scope="module")
def captured() -> Captured:
    session = Session.open(6)
    clients = {"waiting": session.clients[DEVICE]}
    servers = {Stage.ADVERTISE_KEYS: session.server}
    messages = {type(m): m for d, m in session.pending if d == DEVICE}
    for stage, name in CLIENT_BEFORE.items():
        opening = session.run_until(stage)
        servers[stage], clients[name] = session.server, session.clients[DEVICE]
        messages.update({type(m): m for d, m in opening if d == DEVICE})
        session.pending = opening
    servers[Stage.DONE] = session.finish()
    clients["DONE"] = session.clients[DEVICE]
    messages.update({type(m): m for m in session.sent[DEVICE]})
    # A real Abort: a server gives up at its first deadline when nobody advertises.
    lonely = Session.open(6, fleet=session.fleet)
    servers[Stage.ABORTED], notices = tick_server(lonely.server, lonely.server.deadline)
    messages[Abort] = next(m for d, m in notices if d == DEVICE)
    lonely.to_client(DEVICE, messages[Abort])
    clients["ABORTED"] = lonely.clients[DEVICE]
    return Captured(clients, servers, messages, session.fleet)


def client_stage_of(state) -> str:
    if state.stage is Stage.ADVERTISE_KEYS:
        return "waiting" if state.start is None else "advertised"
    return state.stage.name


def test_the_capture_has_every_stage_and_message_type(captured):
    assert [client_stage_of(captured.clients[s]) for s in CLIENT_STAGES] == CLIENT_STAGES
    assert [captured.servers[s].stage for s in SERVER_STAGES] == SERVER_STAGES
    assert set(captured.messages) == set(ALL)


@pytest.mark.parametrize(("stage", "kind"), list(itertools.product(CLIENT_STAGES, ALL)),
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_client_transition(captured, stage, kind):
    state = captured.clients[stage]
    message = captured.abort_for(state) if kind is Abort else captured.messages[kind]
    new, sent = handle_client(state, message, now=0.0)
    if (stage, kind) in CLIENT_VALID:
        assert client_stage_of(new) != stage, "a valid message did not advance the machine"
        if kind is Abort:
            assert new.stage is Stage.ABORTED and sent == [] and "aborted the round" in new.abort_reason
        else:
            assert new.rejections == state.rejections and new.error is None and len(sent) == 1
        return
    assert sent == []
    if stage in ("DONE", "ABORTED"):
        assert new is state  # a finished machine ignores everything
        return
    assert len(new.rejections) == len(state.rejections) + 1
    for f in dataclasses.fields(state):
        if f.name != "rejections":
            assert getattr(new, f.name) is getattr(state, f.name), f.name


SERVER_RECORDS = ["adverts", "share_keys", "masked", "consistency", "unmask", "offenders", "stage", "result"]


@pytest.mark.parametrize(("stage", "kind"), list(itertools.product(SERVER_STAGES, ALL)),
                         ids=lambda v: v.name if isinstance(v, Stage) else v.__name__)
def test_server_transition(captured, stage, kind):
    state = captured.servers[stage]
    new, sent = handle_server(state, captured.messages[kind], now=0.0)
    if (stage, kind) in SERVER_VALID:
        record = {Stage.ADVERTISE_KEYS: "adverts", Stage.SHARE_KEYS: "share_keys", Stage.MASKED_INPUT: "masked",
                  Stage.CONSISTENCY_CHECK: "consistency", Stage.UNMASK: "unmask"}[stage]
        assert DEVICE in getattr(new, record) and DEVICE not in getattr(state, record)
        assert new.rejections == state.rejections and new.offenders == state.offenders
        assert sent == [] and new.stage is stage  # five others are still awaited
        return
    assert sent == []
    if stage in (Stage.DONE, Stage.ABORTED):
        assert new is state
        return
    assert len(new.rejections) == len(state.rejections) + 1
    assert new.rejections[-1].message_type == kind.__name__
    for name in SERVER_RECORDS:
        assert getattr(new, name) == getattr(state, name), name
