"""Where the DP noise comes from: distributed (with SecAgg+), local (no SecAgg), or off.

Why three modes: with SecAgg the server only sees the sum, so each device needs only its share
``sigma^2 / t_honest`` of the noise; without SecAgg the server sees each update, so each device must
add the full ``sigma^2`` itself; ``off`` is for debugging and trusted-server deployments and is
accounted as non-private.
"""

from __future__ import annotations

from enum import Enum

from edge_sdk.errors import ConfigError


class PrivacyMode(str, Enum):
    DISTRIBUTED = "distributed"
    LOCAL = "local"
    OFF = "off"

    @classmethod
    def parse(cls, value: str | PrivacyMode) -> PrivacyMode:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"privacy mode {value!r} is unknown; choose one of {[m.value for m in cls]}"
            ) from None


def local_noise_variance(mode: PrivacyMode, central_variance: float, t_honest: int) -> float:
    """The variance one device adds so that the released sum carries ``central_variance``."""
    if central_variance < 0:
        raise ConfigError(f"central_variance must be >= 0, got {central_variance}")
    if mode is PrivacyMode.OFF:
        return 0.0
    if mode is PrivacyMode.LOCAL:
        return float(central_variance)
    if t_honest < 1:
        raise ConfigError(f"t_honest must be >= 1 in distributed mode, got {t_honest}")
    return float(central_variance) / t_honest
