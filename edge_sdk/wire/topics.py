"""MQTT topic names: building them, and parsing received ones strictly.

Why the device id sits in the uplink topic: the broker's ACL can then confine a device to
``up/<its id>/#``, so a device cannot publish as another one even before any signature is
checked; ``sender_check`` ties the topic id to the envelope and the signed body.

    fleetlearn/v1/<fleet>/up/<device_id>/<kind>   device -> aggregator
    fleetlearn/v1/<fleet>/down/<device_id>        aggregator -> one device
    fleetlearn/v1/<fleet>/plan[/<chunk>]          the signed plan, retained
    fleetlearn/v1/<fleet>/model[/<chunk>]         the signed model, retained
    fleetlearn/v1/<fleet>/directory[/<chunk>]     the signed enrolment directory, retained
    fleetlearn/v1/<fleet>/status/<device_id>      "online"/"offline", retained last will
    fleetlearn/v1/<fleet>/work[/<worker_id>]      sharded aggregation: tasks (shared subscription, or one worker's)
    fleetlearn/v1/<fleet>/result/<worker_id>      sharded aggregation: a worker's results
    fleetlearn/v1/<fleet>/worker/<worker_id>      sharded aggregation: a worker's "online"/"offline" (last will)

Retained broadcasts take one topic per chunk (``model/0``, ``model/1``, ...): a broker retains only
the last message of a topic, so a chunked model on one topic would leave late joiners its tail.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge_sdk.wire.envelope import MessageKind, kind_from_topic_name
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES

PREFIX = "fleetlearn/v1"
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name
MAX_CHUNK_LEVEL = (1 << 31) - 1


class Channel(enum.Enum):
    """What a topic is for; the value is its level name."""

    UP = "up"
    DOWN = "down"
    PLAN = "plan"
    MODEL = "model"
    STATUS = "status"
    DIRECTORY = "directory"
    WORK = "work"
    RESULT = "result"
    WORKER = "worker"


@dataclass(frozen=True)
class Topic:
    """A parsed topic: ``device_id`` for up/down/status, ``kind`` for up, ``chunk_index`` for plan/model."""

    fleet: str
    channel: Channel
    device_id: str | None = None
    kind: MessageKind | None = None
    chunk_index: int | None = None

    def __str__(self) -> str:
        levels = [PREFIX, self.fleet, self.channel.value]
        if self.device_id is not None:
            levels.append(self.device_id)
        if self.kind is not None:
            levels.append(self.kind.topic_name)
        if self.chunk_index is not None:
            levels.append(str(self.chunk_index))
        return "/".join(levels)


def _id(value: str, field: str) -> str:
    check_id(value, field, MAX_ID_BYTES)
    return value


def _chunk(index: int | None) -> int | None:
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                              or not 0 <= index <= MAX_CHUNK_LEVEL):
        raise WireFormatError(f"chunk_index must be an integer in [0, 2^31), got {index!r}")
    return index


def up_topic(fleet: str, device_id: str, kind: MessageKind) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.UP, _id(device_id, "device_id"), MessageKind(kind)))


def down_topic(fleet: str, device_id: str) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.DOWN, _id(device_id, "device_id")))


def plan_topic(fleet: str, chunk_index: int | None = None) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.PLAN, chunk_index=_chunk(chunk_index)))


def model_topic(fleet: str, chunk_index: int | None = None) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.MODEL, chunk_index=_chunk(chunk_index)))


def directory_topic(fleet: str, chunk_index: int | None = None) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.DIRECTORY, chunk_index=_chunk(chunk_index)))


def status_topic(fleet: str, device_id: str) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.STATUS, _id(device_id, "device_id")))


SHARED_WORKERS_GROUP = "fleetlearn-workers"  # the MQTT 5 shared-subscription group of a fleet's workers


def work_topic(fleet: str, worker_id: str | None = None) -> str:
    """Tasks: ``work`` (taken through the shared subscription) or ``work/<worker>`` (one worker's, plain MQTT)."""
    return str(Topic(_id(fleet, "fleet"), Channel.WORK, None if worker_id is None else _id(worker_id, "worker_id")))


def shared_work_subscription(fleet: str) -> str:
    """``$share/fleetlearn-workers/<work topic>``: each task goes to one subscribed worker (MQTT 5)."""
    return f"$share/{SHARED_WORKERS_GROUP}/{work_topic(fleet)}"


def result_topic(fleet: str, worker_id: str) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.RESULT, _id(worker_id, "worker_id")))


def worker_status_topic(fleet: str, worker_id: str) -> str:
    return str(Topic(_id(fleet, "fleet"), Channel.WORKER, _id(worker_id, "worker_id")))


def aggregator_subscriptions(fleet: str) -> tuple[str, ...]:
    """What the aggregator subscribes to: every device's uplinks and status."""
    base = f"{PREFIX}/{_id(fleet, 'fleet')}"
    return (f"{base}/up/+/+", f"{base}/status/+")


def device_subscriptions(fleet: str, device_id: str) -> tuple[str, ...]:
    """What a device subscribes to: its own downlink and the retained broadcasts (whole or chunked)."""
    base = f"{PREFIX}/{_id(fleet, 'fleet')}"
    return (down_topic(fleet, device_id), f"{base}/plan", f"{base}/plan/+", f"{base}/model", f"{base}/model/+",
            f"{base}/directory", f"{base}/directory/+")


def device_publications(fleet: str, device_id: str) -> tuple[str, ...]:
    """The ACL intent: the only topics a device may publish on (its uplinks and its status)."""
    return (f"{PREFIX}/{_id(fleet, 'fleet')}/up/{_id(device_id, 'device_id')}/#", status_topic(fleet, device_id))


def _parse_chunk_level(level: str, topic: str) -> int:
    if not level.isascii() or not level.isdigit() or (len(level) > 1 and level[0] == "0") \
            or int(level) > MAX_CHUNK_LEVEL:
        raise WireFormatError(f"topic {topic!r}: chunk level {level!r} is not a canonical index in [0, 2^31)")
    return int(level)


def parse_topic(topic: str) -> Topic:
    """The parts of a received topic; refuses foreign prefixes, unknown channels or kinds, and bad ids."""
    if not isinstance(topic, str):
        raise WireFormatError(f"topic must be a str, got {type(topic).__name__}")
    if len(topic.encode("utf-8", errors="surrogatepass")) > MAX_TOPIC_BYTES:
        raise WireFormatError(f"topic is longer than {MAX_TOPIC_BYTES} bytes")
    shown = topic[:200]
    head = PREFIX + "/"
    if not topic.startswith(head):
        raise WireFormatError(f"topic {shown!r} is not under {head!r}")
    levels = topic[len(head):].split("/")
    if len(levels) < 2:
        raise WireFormatError(f"topic {shown!r} has no channel level")
    fleet = _id(levels[0], f"topic {shown!r}: fleet")
    try:
        channel = Channel(levels[1])
    except ValueError:
        raise WireFormatError(f"topic {shown!r}: unknown channel {levels[1]!r}; known: "
                              f"{', '.join(c.value for c in Channel)}") from None
    rest = levels[2:]
    expected = {Channel.UP: (2,), Channel.DOWN: (1,), Channel.STATUS: (1,), Channel.PLAN: (0, 1),
                Channel.MODEL: (0, 1), Channel.DIRECTORY: (0, 1), Channel.WORK: (0, 1), Channel.RESULT: (1,),
                Channel.WORKER: (1,)}[channel]
    if len(rest) not in expected:
        raise WireFormatError(f"topic {shown!r}: a {channel.value} topic has {' or '.join(map(str, expected))} "
                              f"levels after the channel, got {len(rest)}")
    if channel in (Channel.PLAN, Channel.MODEL, Channel.DIRECTORY):
        return Topic(fleet, channel, chunk_index=_parse_chunk_level(rest[0], shown) if rest else None)
    if channel is Channel.WORK and not rest:
        return Topic(fleet, channel)
    device_id = _id(rest[0], f"topic {shown!r}: device id")
    kind = kind_from_topic_name(rest[1]) if channel is Channel.UP else None
    return Topic(fleet, channel, device_id, kind)
