"""A device and an aggregator with ReliableChannels over real MQTT connections, on the contract's topics."""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.event_loop import MqttLoop
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport
from edge_sdk.transport.reliable import ReliableChannel
from edge_sdk.transport.retransmission import RetransmitPolicy
from edge_sdk.wire.limits import WireLimits

FLEET = "f"
AGGREGATOR = "aggregator"


def up(device: str, kind: str) -> str:
    return f"fleetlearn/v1/{FLEET}/up/{device}/{kind}"


def down(device: str) -> str:
    return f"fleetlearn/v1/{FLEET}/down/{device}"


def uplink_origin(topic: str) -> str | None:
    parts = topic.split("/")
    return parts[4] if len(parts) == 6 and parts[3] == "up" else None


def downlink_origin(topic: str) -> str | None:
    return AGGREGATOR if topic.startswith(f"fleetlearn/v1/{FLEET}/down/") else None


def limits(senders: int, message_bytes: int, max_payload: int) -> WireLimits:
    return WireLimits(max_payload_bytes=max_payload, max_chunks=message_bytes // (max_payload - 51) + 2,
                      max_message_bytes=message_bytes + 4096, max_vector_length=1, bits=20,
                      max_reassembly_bytes=(senders + 1) * 2 * (message_bytes + 4096))


@dataclass
class Fleet:
    keys: dict[str, IdentityKey]

    def key_of(self, party: str) -> bytes | None:
        key = self.keys.get(party)
        return key.public if key else None


def aggregator_channel(url: str, loop: MqttLoop, fleet: Fleet, lim: WireLimits, max_payload: int,
                       policy: RetransmitPolicy | None = None, receipt_topic=down) -> ReliableChannel:
    transport = MqttTransport(MqttSettings(url, AGGREGATOR), loop)
    transport.subscribe(f"fleetlearn/v1/{FLEET}/up/+/+")
    return ReliableChannel(transport, me=AGGREGATOR, fleet=FLEET, identity=fleet.keys[AGGREGATOR],
                           peer_key=fleet.key_of, receipt_topic=receipt_topic, origin_of=uplink_origin,
                           limits=lim, max_payload=max_payload, policy=policy)


def device_channel(url: str, loop: MqttLoop, fleet: Fleet, device: str, lim: WireLimits, max_payload: int,
                   policy: RetransmitPolicy | None = None) -> ReliableChannel:
    transport = MqttTransport(MqttSettings(url, device), loop)
    transport.subscribe(down(device))
    return ReliableChannel(transport, me=device, fleet=FLEET, identity=fleet.keys[device],
                           peer_key=fleet.key_of, receipt_topic=lambda peer: up(device, "receipt"),
                           origin_of=downlink_origin, limits=lim, max_payload=max_payload, policy=policy)
