"""One check, before any handler runs: the topic, the envelope and the signed body name the same sender.

Why three ids: the broker's ACL vouches for the topic id, the envelope's sender is what
deduplication keys on, and the body's sender is what the signature binds. If all three agree, the
machine that verifies the body's signature against the enrolled key of that id completes the
chain (topic id = header sender = body sender = signing key); if any differs, someone speaks for
another device and the message is dropped before it costs anything.
"""

from __future__ import annotations

from edge_sdk.wire.envelope import Envelope
from edge_sdk.wire.errors import SenderMismatchError
from edge_sdk.wire.topics import Channel, Topic


def check_sender(topic: Topic, envelope: Envelope, body_sender: str) -> None:
    """Raise SenderMismatchError unless ``topic``, ``envelope`` and the body agree on fleet, sender and kind.

    On uplink and status topics the topic's device id must be the sender too; on downlinks and
    broadcasts (whose topic names a receiver or nobody) ``body_sender`` is the aggregator id whose
    enrolled key the caller will verify the body with.
    """
    if topic.fleet != envelope.fleet:
        raise SenderMismatchError(f"topic fleet {topic.fleet!r} differs from envelope fleet {envelope.fleet!r}")
    if topic.channel in (Channel.UP, Channel.STATUS) and topic.device_id != envelope.sender:
        raise SenderMismatchError(f"topic device {topic.device_id!r} differs from envelope sender "
                                  f"{envelope.sender!r}: a device may speak only for itself")
    if envelope.sender != body_sender:
        raise SenderMismatchError(f"envelope sender {envelope.sender!r} differs from the signed body's sender "
                                  f"{body_sender!r}")
    if topic.kind is not None and topic.kind != envelope.kind:
        raise SenderMismatchError(f"topic kind {topic.kind.name} differs from envelope kind {envelope.kind.name}")
