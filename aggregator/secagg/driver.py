"""An in-memory SecAgg+ session: the server and n simulated devices wired by queues.

Why it exists: tests and benchmarks need whole sessions, with dropouts at any stage and with
adversarial servers or devices, without a broker. Every message crosses a codec round trip
(``encode`` -> ``decode``), so the wire format is exercised and bytes are counted per device.
Hooks may rewrite or suppress any message in flight; this is how tests play a malicious server
(it can re-sign what it alters) or a malicious device.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.secagg.server import ServerConfig, ServerState, handle_server, start_server, tick_server
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import ClientConfig, ClientState, handle_client, start_client, tick_client
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    Roster,
    ShareKeys,
    Stage,
    UnmaskShares,
)

log = logging.getLogger(__name__)

# The stage in which a device sends each uplink message: dropping "at" a stage means the device
# goes silent instead of sending that message.
UPLINK_STAGE = {
    AdvertiseKeys: Stage.ADVERTISE_KEYS,
    ShareKeys: Stage.SHARE_KEYS,
    MaskedInput: Stage.MASKED_INPUT,
    ConsistencyCheck: Stage.CONSISTENCY_CHECK,
    UnmaskShares: Stage.UNMASK,
}

# (device id, message) -> the message to deliver, None to suppress it, or a list to deliver several
# (duplicates, injections).
Hook = Callable[[str, object], object | list | None]


def _apply(hook: Hook | None, device: str, message: object) -> list:
    if hook is None:
        return [message]
    result = hook(device, message)
    if result is None:
        return []
    return list(result) if isinstance(result, list) else [result]


@dataclass(frozen=True)
class Fleet:
    """Enrolment, played by the driver: identity keys for the aggregator and every device."""

    server_identity: IdentityKey
    identities: Mapping[str, IdentityKey]

    @classmethod
    def enrol(cls, device_ids: Iterable[str]) -> Fleet:
        return cls(IdentityKey.generate(), {d: IdentityKey.generate() for d in device_ids})

    @functools.cached_property
    def enrolled(self) -> Directory:
        return Directory({d: k.public for d, k in self.identities.items()})

    def client_config(self, device_id: str, stage_timeout: float = 60.0, **assumptions) -> ClientConfig:
        """A device's config; ``assumptions`` (colluding_fraction, threat_model) override the defaults."""
        return ClientConfig(device_id, self.identities[device_id], self.server_identity.public, self.enrolled,
                            stage_timeout=stage_timeout, **assumptions)


@dataclass
class SessionOutcome:
    """How a session ended, with both sides' final states and per-device traffic."""

    server: ServerState
    clients: dict[str, ClientState]
    uplink_bytes: dict[str, int] = field(default_factory=dict)  # excluding the masked vector payload
    downlink_bytes: dict[str, int] = field(default_factory=dict)
    roster_bytes: dict[str, int] = field(default_factory=dict)  # part of downlink: the relayed roster

    @property
    def result(self) -> np.ndarray | None:
        return self.server.result

    @property
    def aborted(self) -> bool:
        return self.server.stage is Stage.ABORTED

    @property
    def abort_reason(self) -> str | None:
        return self.server.abort_reason


def run_session(
    fleet: Fleet,
    config: ServerConfig,
    inputs: Mapping[str, np.ndarray],
    round_index: int = 1,
    drop_at: Mapping[Stage, Iterable[str]] | None = None,
    uplink_hook: Hook | None = None,
    downlink_hook: Hook | None = None,
    client_timeout: float = 600.0,
    client_configs: Mapping[str, ClientConfig] | None = None,
    ledger_heads: Mapping[str, bytes] | None = None,
) -> SessionOutcome:
    """Run one round over the devices in ``inputs`` and return its outcome.

    By default each device assumes the server's colluding fraction and threat model;
    ``client_configs`` gives devices their own.
    """
    drop_at = {stage: set(ids) for stage, ids in (drop_at or {}).items()}
    now = 0.0
    server, out = start_server(config, tuple(inputs), round_index, now)
    configs = dict(client_configs or {})
    for d in inputs:
        configs.setdefault(d, fleet.client_config(d, client_timeout, colluding_fraction=config.colluding_fraction,
                                                  threat_model=config.threat_model))
    heads = ledger_heads or {}
    clients = {d: start_client(configs[d], inputs[d], now, round_index, t_honest=server.noise_floor,
                               **({"ledger_head": heads[d]} if d in heads else {}))
               for d in inputs}
    silent: set[str] = set()
    outcome = SessionOutcome(server, clients, {d: 0 for d in inputs}, {d: 0 for d in inputs},
                             {d: 0 for d in inputs})
    downlink: deque = deque(out)
    uplink: deque = deque()
    while True:
        while downlink or uplink:
            while downlink:
                device, original = downlink.popleft()
                if device in silent or device not in clients:
                    continue
                for message in _apply(downlink_hook, device, original):
                    wire = codec.encode(message)
                    outcome.downlink_bytes[device] += len(wire)
                    if isinstance(message, Roster):
                        outcome.roster_bytes[device] += len(wire)
                    clients[device], replies = handle_client(clients[device], codec.decode(wire), now)
                    uplink.extend((device, reply) for reply in replies)
            while uplink:
                device, original = uplink.popleft()
                if device in silent or device in drop_at.get(UPLINK_STAGE[type(original)], ()):
                    silent.add(device)
                    continue
                for message in _apply(uplink_hook, device, original):
                    wire = codec.encode(message)
                    payload = 4 * message.masked.size if isinstance(message, MaskedInput) else 0
                    outcome.uplink_bytes[device] += len(wire) - payload
                    server, sends = handle_server(server, codec.decode(wire), now)
                    downlink.extend(sends)
        if server.stage in (Stage.DONE, Stage.ABORTED):
            break
        now = server.deadline  # nobody else will speak: let the stage deadline pass
        server, sends = tick_server(server, now)
        downlink.extend(sends)
    for device in clients:
        if device not in silent:
            clients[device], _ = tick_client(clients[device], now)
    outcome.server, outcome.clients = server, clients
    return outcome
