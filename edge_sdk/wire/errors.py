"""Typed wire errors, so a transport can tell garbage on the wire from an impostor.

Each message names the field and the bound it broke: these end up in rate-limited service logs,
where "payload declares 9000000 bytes, limit is 4194304 (max_message_bytes)" is actionable and
"bad message" is not.
"""

from __future__ import annotations

from edge_sdk.errors import FleetlearnError


class WireError(FleetlearnError):
    """Base class of every wire-level refusal."""


class WireFormatError(WireError, ValueError):
    """Bytes do not parse as a well-formed frame, or break a bound of ``WireLimits``; names the field."""


class ReassemblyError(WireFormatError):
    """A chunk is refused: inconsistent with its siblings, over a memory bound, or its message's digest fails."""


class SenderMismatchError(WireError):
    """Topic device id, envelope sender and body sender disagree: someone speaks for another device."""
