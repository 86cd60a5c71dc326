"""The signed RoundPlan: everything a device needs to take part in one round, and must check.

Why one signed record: today's SecAgg+ RoundStart carries only bits, the vector length, the cohort
and t_honest. A device must also know which model to train (version and digest), how (epochs,
batch size, learning rate, seed), how to encode and noise its update (EncodingParams with the
round's rotation seed, the mechanism, the noise multiplier, t_honest and the privacy mode), whether
it was chosen by the server or flips its own coin, what SecAgg+ policy applies and how long each
stage may take. The aggregator signs the plan; the device verifies it against the aggregator's key,
derives its privacy event from it (``participation_event``) and checks the later RoundStart against
it (t_honest, bits, vector length).

Stable bytes (``edge_sdk.protocol.fields``): numbered fields, never removed or renumbered; fields
added later are optional, so plans written by this version keep loading
(``tests/vectors/round_plan_golden.json`` pins the bytes).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.modes import PrivacyMode
from edge_sdk.privacy.noise import NOISE_MECHANISMS
from edge_sdk.privacy.participation import ParticipationEvent, participation_event
from edge_sdk.protocol.fields import (
    BYTES,
    FLOAT,
    TEXT,
    TEXTS,
    UINT,
    Field,
    decode_fields,
    encode_fields,
    record_kind,
    split_signature,
    with_signature,
)
from edge_sdk.protocol.signing import sign_body, verify_body
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.secagg.parameters import ThreatModel
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import check_id
from edge_sdk.wire.limits import MAX_ID_BYTES

PLAN_FORMAT = 1
PLAN_DOMAIN = b"fleetlearn/round/v1/plan\x00"


class PlanError(ConfigError):
    """A plan's values are inconsistent or out of range; the message names the field."""


def check_identifier(value: str, what: str) -> str:
    """Fleet and device ids become MQTT topic levels: the wire's one id rule (``check_id``), as a PlanError."""
    try:
        check_id(value, what, MAX_ID_BYTES)
    except WireFormatError as exc:
        raise PlanError(str(exc)) from None
    return value


def _positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise PlanError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class TrainingPlan:
    """How each device trains the round's model locally."""

    epochs: int
    batch_size: int
    lr: float
    seed: int

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.seed < 0:
            raise PlanError(f"training needs epochs >= 1, batch_size >= 1 and seed >= 0, got {self}")
        _positive(self.lr, "training.lr")


@dataclass(frozen=True)
class Sampling:
    """Who takes part: ``server`` (the aggregator invites ``cohort``) or ``self`` (each device's coin, q).

    Only ``self`` earns amplification by subsampling, since nobody can predict a device's CSPRNG coin.
    """

    kind: str
    cohort: tuple[str, ...] = ()
    probability: float | None = None

    SERVER = "server"
    SELF = "self"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cohort", tuple(self.cohort))
        if self.kind == self.SERVER:
            if not self.cohort or self.probability is not None:
                raise PlanError("server sampling names a non-empty cohort and no probability")
            if list(self.cohort) != sorted(set(self.cohort)):
                raise PlanError("sampling.cohort must list device ids sorted and without repeats")
            for device in self.cohort:
                check_identifier(device, "a cohort device id")
        elif self.kind == self.SELF:
            if self.cohort or self.probability is None or not 0.0 < self.probability <= 1.0:
                raise PlanError(f"self sampling needs a probability in (0, 1] and no cohort, got {self.probability}")
        else:
            raise PlanError(f"sampling.kind must be 'server' or 'self', got {self.kind!r}")

    @classmethod
    def server(cls, cohort: tuple[str, ...] | list[str]) -> Sampling:
        return cls(cls.SERVER, tuple(sorted(cohort)))

    @classmethod
    def self_selected(cls, probability: float) -> Sampling:
        return cls(cls.SELF, (), probability)

    def invites(self, device_id: str) -> bool:
        """Whether the plan asks ``device_id`` (server sampling) or lets it toss its coin (self)."""
        return self.kind == self.SELF or device_id in self.cohort


@dataclass(frozen=True)
class SecAggPolicy:
    """The SecAgg+ terms: threat model, assumed dropout and collusion, per-stage timeout, optional (k, t)."""

    threat_model: str = ThreatModel.ACTIVE.value
    dropout_fraction: float = 0.05
    colluding_fraction: float = 0.05
    stage_timeout: float = 60.0
    degree: int | None = None
    threshold: int | None = None

    def __post_init__(self) -> None:
        try:
            ThreatModel(self.threat_model)
        except ValueError:
            raise PlanError(f"secagg.threat_model {self.threat_model!r} is unknown; choose one of "
                            f"{[t.value for t in ThreatModel]}") from None
        for name in ("dropout_fraction", "colluding_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise PlanError(f"secagg.{name} must be in [0, 1), got {value}")
        _positive(self.stage_timeout, "secagg.stage_timeout")
        if (self.degree is None) != (self.threshold is None):
            raise PlanError("secagg: give both degree and threshold, or neither")


@dataclass(frozen=True)
class StageDeadlines:
    """Seconds each pre-SecAgg stage may take, from the moment the device receives what opens it.

    ``ready``: from the plan to the aggregator's choice of cohort; ``train``: from the RoundStart to the
    device's advert (local training and encoding happen in between).
    """

    ready: float = 60.0
    train: float = 600.0

    def __post_init__(self) -> None:
        _positive(self.ready, "deadlines.ready")
        _positive(self.train, "deadlines.train")


@dataclass(frozen=True)
class RoundPlan:
    """One round's signed terms. ``signature`` is empty until ``sign`` (by the aggregator's identity)."""

    fleet: str
    round_index: int
    model_version: int
    model_digest: bytes  # SHA-256 of the model publication's parameter bytes
    training: TrainingPlan
    encoding: EncodingParams
    mechanism: str
    noise_multiplier: float
    t_honest: int
    privacy_mode: str
    sampling: Sampling
    secagg: SecAggPolicy = SecAggPolicy()
    deadlines: StageDeadlines = StageDeadlines()
    check_back_after: float = 600.0  # pace steering: a declined, unselected or late device waits this long
    signature: bytes = b""

    def __post_init__(self) -> None:
        check_identifier(self.fleet, "fleet")
        if self.round_index < 0 or self.model_version < 0:
            raise PlanError(f"round_index and model_version must be >= 0, got {self.round_index}, "
                            f"{self.model_version}")
        if not isinstance(self.model_digest, bytes) or len(self.model_digest) != 32:
            raise PlanError("model_digest must be the 32-byte SHA-256 of the model's parameter bytes")
        if self.mechanism not in NOISE_MECHANISMS:
            raise PlanError(f"mechanism {self.mechanism!r} is unknown; choose one of {sorted(NOISE_MECHANISMS)}")
        _positive(self.noise_multiplier, "noise_multiplier", allow_zero=True)
        if self.t_honest < 1:
            raise PlanError(f"t_honest must be at least 1, got {self.t_honest}")
        PrivacyMode.parse(self.privacy_mode)
        _positive(self.check_back_after, "check_back_after", allow_zero=True)

    # -- derived ------------------------------------------------------------------------------
    @property
    def round_id(self) -> str:
        """The id the device ledger and the aggregator's records use for this round."""
        return f"{self.fleet}/round-{self.round_index}"

    @property
    def vector_length(self) -> int:
        """The length of the uint32 vector SecAgg+ masks: the encoder's padded dimension."""
        return self.encoding.padded_dim

    def participation_event(self) -> ParticipationEvent:
        """The privacy event of taking part, as the device ledger records it and the aggregator accounts it."""
        q = self.sampling.probability if self.sampling.kind == Sampling.SELF else None
        return participation_event(self.encoding, self.privacy_mode, self.mechanism, self.noise_multiplier,
                                   self.t_honest, q)

    # -- bytes and signatures -----------------------------------------------------------------
    def body(self) -> bytes:
        """The canonical bytes the signature covers (everything but the signature)."""
        return encode_fields(_PLAN, _plan_values(self))

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the signed plan's bytes: Ready and Decline name the plan they answer by it."""
        return hashlib.sha256(self.to_bytes()).digest()

    def sign(self, identity: IdentityKey) -> RoundPlan:
        return replace(self, signature=sign_body(PLAN_DOMAIN, self.body(), identity))

    def verify(self, aggregator_public: bytes) -> None:
        """Raise ``SignatureError`` unless the aggregator signed exactly these terms."""
        verify_body(PLAN_DOMAIN, self.body(), self.signature, aggregator_public, f"round plan {self.round_id}")

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundPlan:
        """Parse strictly (``FieldFormatError``, ``PlanError``); the signature is checked by ``verify``."""
        body, signature = split_signature(data, "round plan")
        values = decode_fields(_PLAN, body, "round plan")
        if values.pop("format") != PLAN_FORMAT:
            raise PlanError(f"round plan format {PLAN_FORMAT} expected; upgrade this side to read newer plans")
        for name, default in (("secagg", SecAggPolicy()), ("deadlines", StageDeadlines()), ("check_back_after", 600.0)):
            if values[name] is None:
                values[name] = default
        return cls(**values, signature=signature)


# --- schemas ------------------------------------------------------------------------------------

_TRAINING = (Field(1, "epochs", UINT), Field(2, "batch_size", UINT), Field(3, "lr", FLOAT), Field(4, "seed", UINT))
_ENCODING = (Field(1, "dim", UINT), Field(2, "clip", FLOAT), Field(3, "gamma", FLOAT), Field(4, "bits", UINT),
             Field(5, "rotation_seed", BYTES), Field(6, "beta", FLOAT))
_SAMPLING = (Field(1, "kind", TEXT), Field(2, "cohort", TEXTS, required=False),
             Field(3, "probability", FLOAT, required=False))
_SECAGG = (Field(1, "threat_model", TEXT), Field(2, "dropout_fraction", FLOAT), Field(3, "colluding_fraction", FLOAT),
           Field(4, "stage_timeout", FLOAT), Field(5, "degree", UINT, required=False),
           Field(6, "threshold", UINT, required=False))
_DEADLINES = (Field(1, "ready", FLOAT), Field(2, "train", FLOAT))


def _fields_of(value: Any) -> dict[str, Any]:
    return dict(vars(value))


def _sampling_values(s: Sampling) -> dict[str, Any]:
    return {"kind": s.kind, "cohort": s.cohort or None, "probability": s.probability}


def _sampling_build(v: dict[str, Any]) -> Sampling:
    return Sampling(v["kind"], v["cohort"] or (), v["probability"])


_PLAN = (
    Field(1, "format", UINT),
    Field(2, "fleet", TEXT),
    Field(3, "round_index", UINT),
    Field(4, "model_version", UINT),
    Field(5, "model_digest", BYTES),
    Field(6, "training", record_kind(_TRAINING, lambda v: TrainingPlan(**v), _fields_of)),
    Field(7, "encoding", record_kind(_ENCODING, lambda v: EncodingParams(**v), _fields_of)),
    Field(8, "mechanism", TEXT),
    Field(9, "noise_multiplier", FLOAT),
    Field(10, "t_honest", UINT),
    Field(11, "privacy_mode", TEXT),
    Field(12, "sampling", record_kind(_SAMPLING, _sampling_build, _sampling_values)),
    Field(13, "secagg", record_kind(_SECAGG, lambda v: SecAggPolicy(**v), _fields_of), required=False),
    Field(14, "deadlines", record_kind(_DEADLINES, lambda v: StageDeadlines(**v), _fields_of), required=False),
    Field(15, "check_back_after", FLOAT, required=False),
)


def _plan_values(plan: RoundPlan) -> dict[str, Any]:
    values = {f.name: getattr(plan, f.name, None) for f in _PLAN}
    values["format"] = PLAN_FORMAT
    values["privacy_mode"] = PrivacyMode.parse(plan.privacy_mode).value
    return values
