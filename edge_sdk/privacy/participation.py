"""What one participation did, privacy-wise: the plain-data event the ledger stores.

Why events and not epsilons (as in Google's dp-accounting): epsilon depends on the accountant, on
delta and on everything else composed with it. The event records the facts of the round (the
mechanism, the integer-domain sensitivity, the noise variances, the honest-contributor guarantee,
the sampling) and an accountant turns a list of events into epsilon when asked: the device with
``edge_sdk.privacy.rdp``, the host with ``aggregator.accounting`` (dp-accounting).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.privacy.modes import PrivacyMode, local_noise_variance
from edge_sdk.privacy.noise import NOISE_MECHANISMS

NO_NOISE = "none"


@dataclass(frozen=True)
class ParticipationEvent:
    """One device's contribution to one round, in the integer (scaled) domain.

    ``central_variance`` is the per-coordinate variance the honest contributors' noise sums to;
    ``local_variance`` is what this device added itself. ``sampling_probability`` is set only when
    the device self-selected into the round with a CSPRNG coin of that probability (Poisson
    sampling), the one case in which amplification by subsampling may be claimed.
    """

    mechanism: str
    mode: str
    l2_sensitivity: float
    l1_sensitivity: float
    central_variance: float
    local_variance: float
    honest_contributors: int
    dim: int
    sampling_probability: float | None = None

    def __post_init__(self) -> None:
        if self.mechanism != NO_NOISE and self.mechanism not in NOISE_MECHANISMS:
            raise ConfigError(f"mechanism {self.mechanism!r} is unknown; choose one of {sorted(NOISE_MECHANISMS)}")
        PrivacyMode.parse(self.mode)
        for name in ("l2_sensitivity", "l1_sensitivity", "central_variance", "local_variance"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.honest_contributors < 1:
            raise ConfigError(f"honest_contributors must be >= 1, got {self.honest_contributors}")
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        q = self.sampling_probability
        if q is not None and not 0.0 < q <= 1.0:
            raise ConfigError(f"sampling_probability must be in (0, 1] or None, got {q}")

    @property
    def is_private(self) -> bool:
        return self.mode != PrivacyMode.OFF.value and self.central_variance > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParticipationEvent:
        try:
            return cls(
                mechanism=str(data["mechanism"]),
                mode=str(data["mode"]),
                l2_sensitivity=float(data["l2_sensitivity"]),
                l1_sensitivity=float(data["l1_sensitivity"]),
                central_variance=float(data["central_variance"]),
                local_variance=float(data["local_variance"]),
                honest_contributors=int(data["honest_contributors"]),
                dim=int(data["dim"]),
                sampling_probability=(
                    None if data.get("sampling_probability") is None else float(data["sampling_probability"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed participation event {data!r}: {exc}") from exc


def participation_event(
    params: EncodingParams,
    mode: PrivacyMode | str,
    mechanism: str,
    noise_multiplier: float,
    honest_contributors: int,
    sampling_probability: float | None = None,
) -> ParticipationEvent:
    """The event for a round encoded with ``params`` and central noise std ``noise_multiplier * C``.

    The integer-domain central variance is ``(noise_multiplier * C / gamma)^2``; the sensitivity is
    the conditional-rounding bound, and the L1 bound uses that rounded vectors are integers
    (``|x|_1 <= |x|_2^2``) as well as Cauchy-Schwarz (``|x|_1 <= sqrt(d) |x|_2``).
    """
    mode = PrivacyMode.parse(mode)
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    l2 = params.l2_sensitivity
    l1 = min(l2 * l2, math.sqrt(params.padded_dim) * l2)
    central = 0.0 if mode is PrivacyMode.OFF else (noise_multiplier * params.clip / params.gamma) ** 2
    t = honest_contributors if mode is PrivacyMode.DISTRIBUTED else 1
    return ParticipationEvent(
        mechanism=NO_NOISE if mode is PrivacyMode.OFF else mechanism,
        mode=mode.value,
        l2_sensitivity=l2,
        l1_sensitivity=l1,
        central_variance=central,
        local_variance=local_noise_variance(mode, central, t),
        honest_contributors=t,
        dim=params.padded_dim,
        sampling_probability=sampling_probability,
    )
