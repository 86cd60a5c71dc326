"""The round layer's own messages: Ready and Decline (device → aggregator) and the model release.

Why signed by their senders: there is one signature per hop, on the payload; the envelope around
it carries none. Ready and Decline name the plan they answer by its digest, so an answer cannot
be replayed into another round or plan. The model release is signed by the aggregator over its
version and the SHA-256 of its parameter bytes; a device refuses an unsigned one, one signed by
another key, a version older than the last it accepted (rollback), and a digest other than the plan's.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace

from edge_sdk.protocol.fields import (
    BYTES,
    TEXT,
    UINT,
    Field,
    FieldFormatError,
    decode_fields,
    encode_fields,
    split_signature,
    with_signature,
)
from edge_sdk.protocol.plan import check_identifier
from edge_sdk.protocol.signing import sign_body, verify_body
from edge_sdk.secagg.keys import IdentityKey

READY_DOMAIN = b"fleetlearn/round/v1/ready\x00"
DECLINE_DOMAIN = b"fleetlearn/round/v1/decline\x00"
MODEL_DOMAIN = b"fleetlearn/round/v1/model\x00"


class DeclineReason(enum.IntEnum):
    """Why a device sits a round out; the value travels."""

    BUDGET = 1  # the participation would exceed the device's (epsilon, delta) budget
    INELIGIBLE = 2  # a local policy (charging, battery, temperature, idle) says no
    NOT_SAMPLED = 3  # self sampling: the device's coin said no (sent only if the plan asks for it)
    PLAN_REFUSED = 4  # the plan's terms do not fit this device (layout, bits, t_honest, threat model)
    MODEL_UNAVAILABLE = 5  # no verified model matching the plan's digest


@dataclass(frozen=True)
class Ready:
    """Device → aggregator: this device will take part in the plan with digest ``plan_digest``."""

    fleet: str
    device_id: str
    round_index: int
    plan_digest: bytes
    signature: bytes = b""

    def body(self) -> bytes:
        return encode_fields(_READY, vars(self))

    def sign(self, identity: IdentityKey) -> Ready:
        return replace(self, signature=sign_body(READY_DOMAIN, self.body(), identity))

    def verify(self, public_key: bytes) -> None:
        verify_body(READY_DOMAIN, self.body(), self.signature, public_key, f"Ready from {self.device_id!r}")

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ready:
        body, signature = split_signature(data, "Ready")
        return cls(**_checked(decode_fields(_READY, body, "Ready")), signature=signature)


@dataclass(frozen=True)
class Decline:
    """Device → aggregator: this device sits the round out, and why (``reason`` code, free ``detail``)."""

    fleet: str
    device_id: str
    round_index: int
    plan_digest: bytes
    reason: DeclineReason
    detail: str = ""
    signature: bytes = b""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "reason", DeclineReason(self.reason))
        except ValueError:
            raise FieldFormatError(f"Decline reason code {self.reason!r} is unknown") from None

    def body(self) -> bytes:
        return encode_fields(_DECLINE, {**vars(self), "reason": int(self.reason)})

    def sign(self, identity: IdentityKey) -> Decline:
        return replace(self, signature=sign_body(DECLINE_DOMAIN, self.body(), identity))

    def verify(self, public_key: bytes) -> None:
        verify_body(DECLINE_DOMAIN, self.body(), self.signature, public_key, f"Decline from {self.device_id!r}")

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Decline:
        body, signature = split_signature(data, "Decline")
        values = _checked(decode_fields(_DECLINE, body, "Decline"))
        values["detail"] = values["detail"] or ""
        return cls(**values, signature=signature)


@dataclass(frozen=True, eq=False)
class ModelRelease:
    """Aggregator → fleet: model ``version``, its parameter bytes and their SHA-256, signed.

    The signature covers fleet, version and digest; the digest binds the parameters, so verifying
    costs one hash of the payload and one Ed25519 check however large the model is.
    """

    fleet: str
    version: int
    digest: bytes
    parameters: bytes  # ParameterLayout.to_bytes: little-endian float32, in layout order
    signature: bytes = b""

    @classmethod
    def of(cls, fleet: str, version: int, parameters: bytes) -> ModelRelease:
        return cls(fleet, version, hashlib.sha256(parameters).digest(), parameters)

    def body(self) -> bytes:
        return encode_fields(_MODEL_SIGNED, vars(self))

    def sign(self, identity: IdentityKey) -> ModelRelease:
        return replace(self, signature=sign_body(MODEL_DOMAIN, self.body(), identity))

    def verify(self, aggregator_public: bytes) -> None:
        """Signature by the aggregator, then the parameters against the signed digest."""
        verify_body(MODEL_DOMAIN, self.body(), self.signature, aggregator_public, f"model version {self.version}")
        if hashlib.sha256(self.parameters).digest() != self.digest:
            raise ModelDigestError(f"model version {self.version}: parameter bytes do not match the signed digest")

    def to_bytes(self) -> bytes:
        head = with_signature(self.body(), self.signature)
        return encode_fields(_MODEL_WIRE, {"signed": head, "parameters": self.parameters})

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelRelease:
        outer = decode_fields(_MODEL_WIRE, data, "model release")
        body, signature = split_signature(outer["signed"], "model release")
        values = decode_fields(_MODEL_SIGNED, body, "model release")
        check_identifier(values["fleet"], "fleet")
        return cls(values["fleet"], values["version"], values["digest"], outer["parameters"], signature)


class ModelDigestError(FieldFormatError):
    """A model's bytes do not hash to the digest that was signed or planned."""


def _checked(values: dict) -> dict:
    check_identifier(values["fleet"], "fleet")
    check_identifier(values["device_id"], "device id")
    if len(values["plan_digest"]) != 32:
        raise FieldFormatError("plan_digest must be 32 bytes")
    return values


_READY = (Field(1, "fleet", TEXT), Field(2, "device_id", TEXT), Field(3, "round_index", UINT),
          Field(4, "plan_digest", BYTES))
_DECLINE = (*_READY, Field(5, "reason", UINT), Field(6, "detail", TEXT, required=False))
_MODEL_SIGNED = (Field(1, "fleet", TEXT), Field(2, "version", UINT), Field(3, "digest", BYTES))
_MODEL_WIRE = (Field(1, "signed", BYTES), Field(2, "parameters", BYTES))
