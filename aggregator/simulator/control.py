"""The simulator's control channel: the engine tells every worker (of every shard) when a round may start.

Why over the broker and not a pipe: with ``--shard i/N`` the workers run on other machines and share
only the broker. Topics are outside the fleet's ``fleetlearn/v1/`` tree, so no device or aggregator
code ever sees them. Messages are small JSON objects, retained so a late worker still reads them:

* engine -> workers, ``fleetlearn-sim/<fleet>/control``: ``{"action": "prepare", "round": r}``
  (bring every device back online for round r: rejoin the dropped, re-create the crashed) or
  ``{"action": "stop"}``;
* worker -> engine, ``fleetlearn-sim/<fleet>/ack/<shard>/<worker>``: ``{"round": r, "devices": n}``
  once its n devices are connected and subscribed for round r, then ``{"done": true, ...}``.
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "fleetlearn-sim"
PREPARE = "prepare"
STOP = "stop"


def control_topic(fleet: str) -> str:
    return f"{PREFIX}/{fleet}/control"


def ack_topic(fleet: str, shard: int, worker: int) -> str:
    return f"{PREFIX}/{fleet}/ack/{shard}/{worker}"


def ack_pattern(fleet: str) -> str:
    return f"{PREFIX}/{fleet}/ack/#"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode()


def decode(payload: bytes) -> dict[str, Any] | None:
    """The message, or None for an empty (cleared) retained payload or anything that is not a JSON object."""
    if not payload:
        return None
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None
