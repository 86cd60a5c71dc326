"""Regenerate tests/vectors/wire_golden.json: the pinned bytes of every frame and message that travels.

Run ``.venv/bin/python tests/vectors/wire_make_golden.py`` only for a deliberate, versioned format
change; tests/wire/test_golden.py fails on any byte that differs. Everything is fixed: the
messages below, and Ed25519 identities whose private keys are SHA-256 of a label. Ed25519 is
deterministic (RFC 8032), so signatures, and hence every byte, come out the same on every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as m
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.receipt import Receipt, sign_receipt
from edge_sdk.wire.arrays import encode_array, encode_named_arrays
from edge_sdk.wire.bitpack import pack_bits
from edge_sdk.wire.chunking import split
from edge_sdk.wire.envelope import NO_SESSION, WIRE_VERSION, Envelope, MessageKind, encode_envelope
from edge_sdk.wire.secagg_payload import encode_secagg
from edge_sdk.wire.topics import down_topic, model_topic, plan_topic, status_topic, up_topic

PATH = Path(__file__).with_name("wire_golden.json")
FLEET = "golden-fleet"
AGGREGATOR = "aggregator"
DEVICES = ("dev-1", "dev-2", "dev-3")
BITS = 20
CHUNK_MAX_PAYLOAD = 51 + 40  # a 40-byte chunk body, so the sample message spans several chunks
PROVENANCE = ("Made by tests/vectors/wire_make_golden.py from fixed sample messages; Ed25519 identities have "
              "private key = SHA-256(b'fleetlearn/wire-golden/' + name), and Ed25519 is deterministic, so every "
              "byte is fixed. SecAgg+ 'codec' bytes are edge_sdk.secagg.codec.encode of the signed message; "
              "'payload' is edge_sdk.wire.secagg_payload.encode_secagg (MaskedInput bit-packed at b=20); "
              "'envelope' wraps the payload. Regenerate only for a deliberate format change.")


def identity(name: str) -> IdentityKey:
    return IdentityKey(hashlib.sha256(b"fleetlearn/wire-golden/" + name.encode()).digest())


def _bytes(label: str, n: int) -> bytes:
    """n fixed bytes named by ``label``."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}|{counter}".encode()).digest()
        counter += 1
    return out[:n]


SESSION = _bytes("session", 32)
NONCE = _bytes("round-nonce", 32)
DIRECTORY = _bytes("directory", 32)
SHARE = b"\x01" + _bytes("share", 32)  # 33 bytes, below the field prime
HEAD = (7).to_bytes(8, "big") + _bytes("ledger-record", 32)
MASKED = np.array([0, 1, 2**BITS - 1, 123456, 2**19, 77, 999999, 31337, 5], dtype=np.uint32)


def _advert(device: str, round_index: int) -> m.AdvertiseKeys:
    return codec.sign(m.AdvertiseKeys(device, round_index, NONCE, _bytes(f"c-{device}", 32), _bytes(f"s-{device}", 32),
                                      _bytes(f"h-{device}", 32)), identity(device))


def secagg_samples() -> list[Any]:
    """One signed sample of every SecAgg+ message type that travels (device messages signed by devices)."""
    agg, dev1 = identity(AGGREGATOR), identity("dev-1")
    adverts = [_advert(d, 4) for d in DEVICES]
    neighbours = tuple(m.NeighbourKey(a.device_id, a.c_public, a.s_public, a.self_mask_commitment, a.signature)
                       for a in adverts[1:])
    share = m.EncryptedShare("dev-1", "dev-2", _bytes("gcm-nonce", 12), _bytes("ciphertext", 82))
    view = m.survivors_digest(SESSION, 4, b"\x07", b"\x07")
    consistency = [codec.sign(m.ConsistencyCheck(d, SESSION, 4, view), identity(d)) for d in DEVICES]
    return [
        codec.sign(m.RoundStart(4, NONCE, BITS, MASKED.size, DIRECTORY, b"\x07", 2), agg),
        adverts[0],
        codec.sign(m.Roster("dev-1", 4, NONCE, BITS, MASKED.size, 2, 2, DIRECTORY, b"\x07", b"\x07", 2, neighbours),
                   agg),
        codec.sign(m.ShareKeys("dev-1", SESSION, 4, (share,)), dev1),
        codec.sign(m.ShareRelay("dev-2", SESSION, 4, b"\x07", (share,)), agg),
        codec.sign(m.MaskedInput("dev-1", SESSION, 4, ("dev-3",), HEAD, MASKED), dev1),
        codec.sign(m.SurvivorSet("dev-1", SESSION, 4, b"\x07"), agg),
        consistency[0],
        codec.sign(m.UnmaskRequest("dev-1", SESSION, 4, b"\x03", tuple(c.signature for c in consistency[:2]),
                                   ("dev-1", "dev-2"), ("dev-3",)), agg),
        codec.sign(m.UnmaskShares("dev-1", SESSION, 4, (("dev-2", SHARE),), (("dev-3", SHARE),)), dev1),
        codec.sign(m.Abort(SESSION, 4, "only 1 device shared its keys, below the threshold t=2"), agg),
    ]


def _sender_of(message: Any) -> str:
    return getattr(message, "sender", None) or getattr(message, "device_id", None) or AGGREGATOR


def _stage_of(kind: MessageKind) -> int:
    stages = {MessageKind.ROUND_START: 1, MessageKind.ADVERTISE_KEYS: 1, MessageKind.ROSTER: 1,
              MessageKind.SHARE_KEYS: 2, MessageKind.SHARE_RELAY: 2, MessageKind.MASKED_INPUT: 3,
              MessageKind.SURVIVOR_SET: 3, MessageKind.CONSISTENCY_CHECK: 4, MessageKind.UNMASK_REQUEST: 4,
              MessageKind.UNMASK_SHARES: 5, MessageKind.ABORT: 7}
    return stages.get(kind, 0)


def envelope_for(kind: MessageKind, sender: str, payload: bytes, sequence: int,
                 session: bytes = SESSION) -> Envelope:
    return Envelope(WIRE_VERSION, kind, FLEET, session, 4, _stage_of(kind), sender, sequence, payload)


# The round layer's and transport's own kinds: fixed sample payloads pin their envelope headers here;
# the receipt is the transport's real signed receipt; plan, Ready/Decline and model payloads are pinned
# next to their own codecs in the round layer.
OTHER_KIND_PAYLOADS = {
    MessageKind.PLAN: (AGGREGATOR, NO_SESSION, _bytes("plan-payload", 48)),
    MessageKind.READY: ("dev-1", NO_SESSION, _bytes("ready-payload", 40)),
    MessageKind.DECLINE: ("dev-2", NO_SESSION, _bytes("decline-payload", 40)),
    MessageKind.MODEL: (AGGREGATOR, NO_SESSION, encode_named_arrays({
        "fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 8,
        "fc1.bias": np.array([0.5, -1.25], np.float32)})),
    MessageKind.RECEIPT: (AGGREGATOR, SESSION, sign_receipt(identity(AGGREGATOR), Receipt(
        AGGREGATOR, "dev-1", SESSION, MessageKind.MASKED_INPUT, 6, _bytes("acknowledged-envelope", 32)))),
    MessageKind.STATUS: ("dev-3", NO_SESSION, b"online"),
    MessageKind.DIRECTORY: (AGGREGATOR, NO_SESSION, _bytes("directory-payload", 48)),
    MessageKind.TASK: (AGGREGATOR, NO_SESSION, _bytes("task-payload", 48)),
    MessageKind.TASK_RESULT: ("worker-1", NO_SESSION, _bytes("task-result-payload", 48)),
}


def build() -> dict[str, Any]:
    """The whole golden document, as the generator writes it and the test recomputes it."""
    envelope = envelope_for(MessageKind.SHARE_KEYS, "dev-1", b"sample payload", 9)
    chunk_message = _bytes("chunked-message", 100)
    secagg = {}
    for sequence, message in enumerate(secagg_samples(), start=1):
        kind, payload = encode_secagg(message, BITS)
        secagg[type(message).__name__] = {
            "kind": kind.name, "codec": codec.encode(message).hex(), "payload": payload.hex(),
            "envelope": encode_envelope(envelope_for(kind, _sender_of(message), payload, sequence)).hex(),
        }
    other = {kind.name: encode_envelope(envelope_for(kind, sender, payload, 100 + kind.value, session)).hex()
             for kind, (sender, session, payload) in OTHER_KIND_PAYLOADS.items()}
    return {
        "provenance": PROVENANCE,
        "wire_version": WIRE_VERSION,
        "identities": {name: identity(name).public.hex() for name in (AGGREGATOR, *DEVICES)},
        "kinds": {kind.name: kind.value for kind in MessageKind},
        "envelope": {"fields": {"version": envelope.version, "kind": envelope.kind.name, "fleet": envelope.fleet,
                                "session": envelope.session.hex(), "round_index": envelope.round_index,
                                "stage": envelope.stage, "sender": envelope.sender, "sequence": envelope.sequence,
                                "payload": envelope.payload.hex()},
                     "bytes": encode_envelope(envelope).hex()},
        "chunks": {"message": chunk_message.hex(), "max_payload": CHUNK_MAX_PAYLOAD,
                   "frames": [c.hex() for c in split(chunk_message, CHUNK_MAX_PAYLOAD)]},
        "packed_vector": {"bits": BITS, "values": [int(v) for v in MASKED], "bytes": pack_bits(MASKED, BITS).hex(),
                          "odd_bits": 13, "odd_bytes": pack_bits(MASKED & np.uint32(2**13 - 1), 13).hex()},
        "array": {"dtype": "float32", "shape": [2, 3], "bytes":
                  encode_array(np.arange(6, dtype=np.float32).reshape(2, 3) / 8).hex()},
        "secagg": secagg,
        "other_kinds": other,
        "topics": {"up": up_topic(FLEET, "dev-1", MessageKind.MASKED_INPUT), "down": down_topic(FLEET, "dev-1"),
                   "plan": plan_topic(FLEET), "plan_chunk": plan_topic(FLEET, 2), "model": model_topic(FLEET),
                   "model_chunk": model_topic(FLEET, 0), "status": status_topic(FLEET, "dev-1")},
    }


def main() -> None:
    PATH.write_text(json.dumps(build(), indent=1) + "\n")


if __name__ == "__main__":
    main()
