"""The enrolment directory as the aggregator broadcasts it: signed, versioned, retained.

Why a broadcast: every SecAgg+ client needs the enrolled identity key of every peer (it checks
each roster against the directory's digest and each relayed advert against its owner's key), and
the directory changes as devices are enrolled and revoked. The aggregator signs ``(fleet,
version, ids, keys)`` with its identity key, whose public half each device was provisioned with
at ``device init``; ``version`` only grows, so a device refuses an older directory (a replay that
would resurrect a revoked device) and keeps the newest it accepted across reboots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from edge_sdk.protocol.fields import (
    BYTES,
    TEXT,
    TEXTS,
    UINT,
    Field,
    FieldFormatError,
    decode_fields,
    encode_fields,
    split_signature,
    with_signature,
)
from edge_sdk.protocol.signing import sign_body, verify_body
from edge_sdk.secagg.keys import KEY_BYTES, IdentityKey
from edge_sdk.secagg.membership import Directory
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES

DIRECTORY_DOMAIN = b"fleetlearn/round/v1/directory\x00"


class DirectoryRollbackError(FieldFormatError):
    """A directory older than the one this device already accepted: refused, the newer one stays."""


@dataclass(frozen=True, eq=False)
class DirectoryRelease:
    """Aggregator → fleet: the active devices' identity keys as of ``version``, signed by the aggregator."""

    fleet: str
    version: int
    keys: Mapping[str, bytes]
    signature: bytes = b""

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet", MAX_ID_BYTES)
        for device_id, key in self.keys.items():
            check_id(device_id, "directory device id", MAX_ID_BYTES)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise FieldFormatError(f"directory key of {device_id!r} must be {KEY_BYTES} bytes")
        object.__setattr__(self, "keys", Directory.of(dict(self.keys)))

    @property
    def directory(self) -> Directory:
        return self.keys  # type: ignore[return-value]

    def body(self) -> bytes:
        order = self.directory.order
        return encode_fields(_DIRECTORY, {"fleet": self.fleet, "version": self.version, "device_ids": order,
                                          "keys": b"".join(self.keys[d] for d in order)})

    def sign(self, identity: IdentityKey) -> DirectoryRelease:
        return replace(self, signature=sign_body(DIRECTORY_DOMAIN, self.body(), identity))

    def verify(self, aggregator_public: bytes) -> None:
        verify_body(DIRECTORY_DOMAIN, self.body(), self.signature, aggregator_public,
                    f"enrolment directory version {self.version}")

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> DirectoryRelease:
        body, signature = split_signature(data, "directory")
        values = decode_fields(_DIRECTORY, body, "directory")
        ids, raw = values["device_ids"], values["keys"]
        if len(raw) != KEY_BYTES * len(ids) or list(ids) != sorted(set(ids)):
            raise FieldFormatError(f"directory lists {len(ids)} ids (sorted, unique) and {len(raw)} key bytes; "
                                   f"need {KEY_BYTES} per id")
        keys = {d: raw[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i, d in enumerate(ids)}
        return cls(values["fleet"], values["version"], keys, signature)


def accept_directory(release: DirectoryRelease, aggregator_public: bytes, fleet: str,
                     current_version: int) -> DirectoryRelease:
    """The release if it is signed by the aggregator, for ``fleet`` and not older than ``current_version``."""
    release.verify(aggregator_public)
    if release.fleet != fleet:
        raise FieldFormatError(f"directory is for fleet {release.fleet!r}, this device is in {fleet!r}")
    if release.version < current_version:
        raise DirectoryRollbackError(f"directory version {release.version} is older than version {current_version} "
                                     "already accepted: a rollback")
    return release


_DIRECTORY = (Field(1, "fleet", TEXT), Field(2, "version", UINT), Field(3, "device_ids", TEXTS),
              Field(4, "keys", BYTES))
