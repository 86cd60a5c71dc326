"""A malicious aggregator for the SecAgg+ tests: the honest server's machinery plus the server key.

Why a stepped session: the attacks need to stop the honest protocol at one stage, alter what the
server sends (re-signed with ``fleet.server_identity``, as a real malicious aggregator could) and
feed it to the real client machines. Client and server states are immutable, so a ``Session`` can
``fork`` at any stage and try many attacks from one honest prefix.

``recover_input`` is the attacker's end-to-end attempt: rebuild a victim's self-mask seed and mask
key from whatever shares it collected, regenerate the masks and take them off the victim's masked
input. ``test_malicious_server`` checks that it does recover an input when the attacker really holds
t shares of both secrets, so a failed recovery elsewhere means the protocol held, not a broken tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from aggregator.secagg.driver import Fleet
from aggregator.secagg.server import ServerConfig, ServerState, handle_server, start_server, tick_server
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import ClientState, handle_client, start_client
from edge_sdk.secagg.errors import ReconstructionError
from edge_sdk.secagg.keys import AgreementKey
from edge_sdk.secagg.masking import pairwise_mask_key, self_mask_key
from edge_sdk.secagg.membership import to_bitmap
from edge_sdk.secagg.messages import (
    ConsistencyCheck,
    MaskedInput,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    survivors_digest,
)
from edge_sdk.secagg.prg import MaskExpander, modulus_mask, pairwise_sign
from edge_sdk.secagg.shamir import decode_share, reconstruct_secret

Delivery = list[tuple[str, object]]


def ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def make_inputs(devices: Iterable[str], length: int, bits: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 2**bits, length, dtype=np.uint64).astype(np.uint32) for d in devices}


def exact_sum(inputs: Mapping[str, np.ndarray], contributors: Iterable[str], bits: int) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).size, dtype=np.uint64)
    for d in contributors:
        total += inputs[d]
    return (total % (1 << bits)).astype(np.uint32)


def resign(fleet: Fleet, message):
    """What the malicious aggregator does to anything it altered: sign it again with its own key."""
    return codec.sign(message, fleet.server_identity)


@dataclasses.dataclass
class Session:
    """One round with the honest server machine and real client machines, stepped by hand."""

    fleet: Fleet
    config: ServerConfig
    inputs: dict[str, np.ndarray]
    server: ServerState
    clients: dict[str, ClientState]
    pending: Delivery  # what the server has sent and nobody has received yet
    sent: dict[str, list]  # every message each client sent, in order
    silent: set[str] = dataclasses.field(default_factory=set)
    now: float = 0.0

    @classmethod
    def open(cls, n: int, length: int = 16, bits: int = 16, round_index: int = 1, fleet: Fleet | None = None,
             seed: int = 0, **server_settings) -> Session:
        devices = ids(n)
        fleet = fleet or Fleet.enrol(devices)
        config = ServerConfig(fleet.server_identity, fleet.enrolled, bits, length, **server_settings)
        inputs = make_inputs(devices, length, bits, seed)
        server, pending = start_server(config, tuple(devices), round_index, 0.0)
        clients = {d: start_client(fleet.client_config(d, colluding_fraction=config.colluding_fraction,
                                                       threat_model=config.threat_model),
                                   inputs[d], 0.0, round_index, t_honest=server.noise_floor)
                   for d in devices}
        return cls(fleet, config, inputs, server, clients, pending, {d: [] for d in devices})

    def fork(self) -> Session:
        return dataclasses.replace(self, clients=dict(self.clients), pending=list(self.pending),
                                   sent={d: list(m) for d, m in self.sent.items()}, silent=set(self.silent))

    # --- the attacker's own primitives -----------------------------------------------------------

    def to_client(self, device: str, message) -> list:
        """Deliver one (wire round-tripped) message to a real client machine; returns what it sent."""
        self.clients[device], replies = handle_client(self.clients[device], codec.decode(codec.encode(message)),
                                                      self.now)
        self.sent[device].extend(replies)
        return replies

    def deliver(self, messages: Delivery) -> Delivery:
        replies = []
        for device, message in messages:
            if device not in self.silent:
                replies += [(device, r) for r in self.to_client(device, message)]
        return replies

    def to_server(self, replies: Delivery) -> Delivery:
        out = []
        for _, reply in replies:
            self.server, sends = handle_server(self.server, codec.decode(codec.encode(reply)), self.now)
            out += sends
        return out

    # --- honest stepping -------------------------------------------------------------------------

    def run_until(self, stage: Stage) -> Delivery:
        """Run honestly until the server opens ``stage``; returns (and takes) that stage's messages."""
        while self.server.stage is not stage:
            if self.server.stage in (Stage.DONE, Stage.ABORTED):
                raise AssertionError(f"round ended in {self.server.stage.name} before {stage.name}: "
                                     f"{self.server.abort_reason}")
            if not self.pending:
                self.now = self.server.deadline
                self.server, self.pending = tick_server(self.server, self.now)
                continue
            pending, self.pending = self.pending, []
            self.pending = self.to_server(self.deliver(pending))
        pending, self.pending = self.pending, []
        return pending

    def finish(self, messages: Delivery | None = None) -> ServerState:
        """Deliver ``messages`` (default: what is pending) and run honestly to the end."""
        self.pending = list(self.pending if messages is None else messages)
        while self.server.stage not in (Stage.DONE, Stage.ABORTED):
            if not self.pending:
                self.now = self.server.deadline
                self.server, self.pending = tick_server(self.server, self.now)
                continue
            pending, self.pending = self.pending, []
            self.pending = self.to_server(self.deliver(pending))
        self.deliver(self.pending)
        self.pending = []
        return self.server

    # --- what the attacker knows ------------------------------------------------------------------

    @property
    def members(self) -> tuple[str, ...]:
        return self.server.members

    @property
    def threshold(self) -> int:
        return self.server.threshold

    def holders_of(self, device: str) -> tuple[str, ...]:
        return self.server.holders[device]

    def view_digest(self, u2: Iterable[str], u3: Iterable[str]) -> bytes:
        return survivors_digest(self.server.session_id, self.server.round_index, to_bitmap(self.members, u2),
                                to_bitmap(self.members, u3))

    def forged_check(self, colluder: str, digest: bytes) -> bytes:
        """A colluding device's consistency signature over any view: the attacker holds its key."""
        check = ConsistencyCheck(colluder, self.server.session_id, self.server.round_index, digest)
        return codec.sign(check, self.fleet.identities[colluder]).signature

    def unmask_request(self, receiver: str, signatures: Mapping[str, bytes], b_owners: Iterable[str],
                       s_owners: Iterable[str]) -> UnmaskRequest:
        signers = sorted(signatures)
        return resign(self.fleet, UnmaskRequest(
            receiver, self.server.session_id, self.server.round_index, to_bitmap(self.members, signers),
            tuple(signatures[s] for s in signers), tuple(sorted(b_owners)), tuple(sorted(s_owners))))

    def unmask_shares(self, owner: str) -> tuple[dict[int, int], dict[int, int]]:
        """Every b- and s-share of ``owner`` the real clients have sent in UnmaskShares: {x: share}."""
        b, s = {}, {}
        for device, messages in self.sent.items():
            for message in messages:
                if isinstance(message, UnmaskShares):
                    x = self.server.index[device]
                    for shares, pairs in ((b, message.self_mask_shares), (s, message.mask_key_shares)):
                        shares.update((x, decode_share(raw)) for o, raw in pairs if o == owner)
        return b, s

    def held_by(self, holders: Iterable[str], owner: str) -> tuple[dict[int, int], dict[int, int]]:
        """Both shares of ``owner`` that colluding ``holders`` received (the attacker reads their state)."""
        b, s = {}, {}
        for h in holders:
            plain = self.clients[h].held_shares.get(owner)
            if plain is not None:
                b[self.server.index[h]] = decode_share(plain.self_mask_share)
                s[self.server.index[h]] = decode_share(plain.mask_key_share)
        return b, s


def recover_input(session: Session, victim: str, masked: np.ndarray, b_shares: Mapping[int, int],
                  s_shares: Mapping[int, int], partners: Iterable[str] | None = None) -> np.ndarray | None:
    """The attacker's best guess of ``victim``'s input from its masked vector and the shares it got.

    With t b-shares it takes the self-mask off; with t s-shares it also rebuilds the victim's mask key
    and takes off every pairwise mask with ``partners`` (default: its partners in U2). Returns None
    when not even the self-mask seed can be rebuilt.
    """
    client = session.clients[victim]
    t = client.roster.threshold
    if len(b_shares) < t:
        return None
    try:
        seed = reconstruct_secret(dict(b_shares), t)
    except ReconstructionError:
        return None
    out = masked.copy()
    expander = MaskExpander(out.size)
    expander.add_into(out, self_mask_key(seed, client.session_id, client.round_index), -1)
    if len(s_shares) >= t:
        try:
            key = AgreementKey(reconstruct_secret(dict(s_shares), t))
        except (ReconstructionError, ValueError):
            key = None
        if key is not None:
            partners = client.shared if partners is None else partners
            me = (client.index[victim], victim)
            for v, advert in client.partners.items():
                if v in set(partners):
                    mask = pairwise_mask_key(key.exchange(advert.s_public), client.session_id, client.round_index,
                                             me, (client.index[v], v))
                    expander.add_into(out, mask, -pairwise_sign(me[0], client.index[v]))
    return out & modulus_mask(session.config.bits)


def masked_input_of(session: Session, device: str) -> np.ndarray:
    return next(m.masked for m in session.sent[device] if isinstance(m, MaskedInput))
